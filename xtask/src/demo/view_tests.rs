//! The live view's screen, as text: the whole of one frame, and the rules
//! of its table (alignment, cut names, missing figures).

use std::time::Duration;

use super::screen::{in_place, plain};
use super::view::{cut, render, Frame, LastAction, NodeRow, VmRow, EVENTS};

fn node(name: &str, reserved: u64, vms: &[&str]) -> NodeRow {
    NodeRow {
        name: name.into(),
        reserved_mib: reserved,
        usable_mib: 2304,
        watermark_mib: 2073,
        reserved_vcpus: 2.5,
        usable_vcpus: 8.0,
        vms: vms.iter().map(|v| (*v).to_owned()).collect(),
    }
}

fn pg1() -> VmRow {
    VmRow {
        vcpus: Some(2.0),
        max_vcpus: Some(4.0),
        memory_mib: Some(1280),
        used_mib: Some(960),
        cpu_pct: Some(93.4),
        tps: Some(812.46),
        latency_ms: Some(9.84),
        pressure_events: 4,
        last_action: Some(LastAction {
            name: "upscale".into(),
            took_ms: Some(340),
            age: Some(Duration::from_secs(2)),
        }),
        ..VmRow::new("pg-1", Some("node-a"))
    }
}

fn frame() -> Frame {
    Frame {
        elapsed: Duration::from_secs(83),
        phase: "rising clients: 8".into(),
        nodes: vec![node("node-a", 2304, &["pg-1", "pg-2 (migrating_out)"]), node("node-b", 1024, &[])],
        vms: vec![
            pg1(),
            VmRow {
                vcpus: Some(1.25),
                max_vcpus: Some(2.0),
                memory_mib: Some(1024),
                moving: Some("to node-b (order 7): migrating".into()),
                ..VmRow::new("pg-2", Some("node-a"))
            },
        ],
        events: vec!["80.1 s allocator: order 7 pg-2 node-a -> node-b: started".into()],
    }
}

#[test]
fn a_frame_is_the_whole_screen() {
    let want = "\
vmscale demo   1:23 elapsed   phase: rising clients: 8

NODE       RESERVED/USABLE WATERMARK       vCPUs  VMS
node-a       2304/2304 MiB  2073 MiB   2.50/8.00  pg-1, pg-2 (migrating_out)
node-b       1024/2304 MiB  2073 MiB   2.50/8.00  -

VM         NODE           vCPUs MEM MiB USED MiB USE% CPU%      TPS  LAT ms PRESS  LAST ACTION
pg-1       node-a           2/4    1280      960   75   93    812.5     9.8     4  upscale (340 ms), 2 s ago
pg-2       node-a        1.25/2    1024        -    -    -        -       -     0  -
           `- moving to node-b (order 7): migrating

  80.1 s allocator: order 7 pg-2 node-a -> node-b: started
";
    assert_eq!(render(&frame()), want);
}

/// Where each column of `header` ends, by its label's last character.
fn ends(header: &str, labels: &[&str]) -> Vec<usize> {
    labels
        .iter()
        .map(|l| header.find(l).map(|i| header[..i].chars().count() + l.chars().count()).unwrap_or(0))
        .collect()
}

#[test]
fn numbers_line_up_under_their_headers_and_long_names_are_cut() {
    let mut f = frame();
    f.vms.push(VmRow {
        tps: Some(123_456.7),
        memory_mib: Some(65_536),
        ..VmRow::new("postgres-primary-with-a-long-name", Some("node-with-a-long-name"))
    });
    let screen = render(&f);
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines.iter().find(|l| l.starts_with("VM ")).copied().unwrap_or_default();
    let right = ["vCPUs", "MEM MiB", "USED MiB", "USE%", "CPU%", "TPS", "LAT ms", "PRESS"];
    let cols = ends(header, &right);
    let rows: Vec<&str> =
        lines.iter().filter(|l| l.starts_with("pg-") || l.starts_with("postgres")).copied().collect();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let chars: Vec<char> = row.chars().collect();
        for (label, end) in right.iter().zip(&cols) {
            let last = chars[end - 1];
            assert!(last.is_ascii_digit() || last == '-', "{label} ends at {end} in {row:?}");
            assert_eq!(chars.get(*end), Some(&' '), "{label} overflows in {row:?}");
        }
    }
    let long = rows[2];
    assert!(long.starts_with("postgres-~ node-with~ "), "names cut to their columns: {long:?}");
    assert!(long.contains("123456.7"), "{long:?}");
    assert_eq!(cut("node-a", 10), "node-a");
    assert_eq!(cut("abcdefghijk", 10), "abcdefghi~");
}

#[test]
fn what_is_not_known_is_a_dash() {
    let f = Frame { vms: vec![VmRow::new("pg-3", None)], ..Frame::default() };
    let screen = render(&f);
    let row = screen.lines().find(|l| l.starts_with("pg-3")).unwrap_or_default();
    let header = screen.lines().find(|l| l.starts_with("VM ")).unwrap_or_default();
    let tps_end = ends(header, &["TPS"])[0];
    assert_eq!(row.chars().nth(tps_end - 1), Some('-'), "TPS: {row:?}");
    assert_eq!(row.split_whitespace().filter(|w| *w == "-").count(), 9, "{row:?}");
    assert!(screen.starts_with("vmscale demo   0:00 elapsed   phase: -\n"), "{screen}");
    assert!(screen.contains("(the allocator has not answered yet)"));
}

#[test]
fn only_the_latest_events_are_shown_and_no_line_has_trailing_blanks() {
    let mut f = frame();
    f.events = (0..10).map(|i| format!("event {i}")).collect();
    let screen = render(&f);
    assert!(!screen.contains("event 3\n"));
    for i in 10 - EVENTS..10 {
        assert!(screen.contains(&format!("  event {i}\n")), "event {i} missing:\n{screen}");
    }
    assert!(screen.lines().all(|l| l == l.trim_end()), "{screen:?}");
}

#[test]
fn a_terminal_gets_the_frame_over_the_last_and_a_log_separated_frames() {
    let drawn = in_place("a\nbb\n");
    assert_eq!(drawn, "\x1b[Ha\x1b[K\nbb\x1b[K\n\x1b[J");
    assert_eq!(plain("a\n", Duration::from_secs(12)), "\n--- 12 s ---\na\n");
}
