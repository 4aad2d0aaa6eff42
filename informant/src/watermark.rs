//! Use passing a watermark, told the moment it happens.
//!
//! At 90% use the kernel shows no pressure yet: no reclaim, PSI quiet. The
//! only event-driven signals arrive when memory is already short, and the
//! sampler's once-a-second sample is what told the agent of the crossing
//! before: relief came 0.5-0.9 s after the workload passed 90% (see
//! BENCHMARKS.md, "End to end"). This source reads `/proc/meminfo` inside
//! the guest (no network, no agent) and sends one pressure event, kind
//! `usage_watermark`, when use (MemTotal - MemAvailable) passes the watermark
//! from below. It re-arms once use is back under the watermark by a margin,
//! which new memory coming online does by itself.
//!
//! A read of `/proc/meminfo` costs tens of µs, so reading it every 10 ms
//! idles at over 1% of a core. The next read is instead due when use could
//! first reach the watermark at the fastest ramp assumed (`max_ramp`), halved
//! for safety, between `min_interval` and `MAX_INTERVAL`: every 10 ms close
//! to the line, a few times a second far from it.

use crate::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use crate::procfs;
use crate::source::{Source, SourceStatus};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How far under the watermark use must fall before another crossing
/// counts, as a fraction of MemTotal: use wobbling around the line sends
/// one event, not one per read.
pub const REARM_MARGIN: f64 = 0.02;

/// The longest wait between reads, however far use is from the watermark.
pub const MAX_INTERVAL: Duration = Duration::from_millis(250);

/// When to read next: half the time use needs to reach the watermark at
/// `max_ramp_bytes_per_s`, within `[min, MAX_INTERVAL]`. Past the watermark
/// (waiting to re-arm), `min`: new memory coming online must be seen soon.
pub fn next_interval(
    used: u64,
    total: u64,
    fraction: f64,
    max_ramp_bytes_per_s: u64,
    min: Duration,
) -> Duration {
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let line = (total as f64 * fraction) as u64;
    let headroom = line.saturating_sub(used);
    if headroom == 0 || max_ramp_bytes_per_s == 0 {
        return min;
    }
    #[allow(clippy::cast_precision_loss)]
    let secs = headroom as f64 / max_ramp_bytes_per_s as f64 / 2.0;
    Duration::from_secs_f64(secs).clamp(min, MAX_INTERVAL.max(min))
}

/// The pure part: fed readings, says when one is a crossing.
#[derive(Debug, Clone)]
pub struct Crossing {
    fraction: f64,
    armed: bool,
}

impl Crossing {
    pub fn new(fraction: f64) -> Self {
        Crossing { fraction, armed: true }
    }

    /// True when this reading passes the watermark and the last crossing was
    /// re-armed since.
    pub fn observe(&mut self, used: u64, total: u64) -> bool {
        if total == 0 {
            return false;
        }
        #[allow(clippy::cast_precision_loss)]
        let f = used as f64 / total as f64;
        if self.armed && f >= self.fraction {
            self.armed = false;
            return true;
        }
        if !self.armed && f < self.fraction - REARM_MARGIN {
            self.armed = true;
        }
        false
    }
}

#[derive(Debug)]
pub struct WatermarkSource {
    meminfo: PathBuf,
    fraction: f64,
    interval: Duration,
    max_ramp_bytes_per_s: u64,
}

impl WatermarkSource {
    /// Checks that `/proc/meminfo` reads and parses here.
    /// `interval` is the shortest time between reads; `max_ramp_bytes_per_s`
    /// the fastest growth of use the reads must keep up with.
    pub fn start(
        meminfo: PathBuf,
        fraction: f64,
        interval: Duration,
        max_ramp_bytes_per_s: u64,
    ) -> (Option<Self>, SourceStatus) {
        let ok = std::fs::read_to_string(&meminfo)
            .map_err(|e| format!("cannot read {} ({e})", meminfo.display()))
            .and_then(|t| {
                procfs::parse_meminfo(&t)
                    .map(|_| ())
                    .ok_or_else(|| format!("no MemTotal/MemAvailable in {}", meminfo.display()))
            });
        match ok {
            Ok(()) => {
                info!(
                    fraction,
                    min_interval_ms = interval.as_millis(),
                    max_ramp_mib_per_s = max_ramp_bytes_per_s >> 20,
                    "usage watermark armed"
                );
                let s = WatermarkSource { meminfo, fraction, interval, max_ramp_bytes_per_s };
                (Some(s), SourceStatus::up(SourceKind::Watermark))
            }
            Err(reason) => (None, SourceStatus::down(SourceKind::Watermark, reason)),
        }
    }
}

impl Source for WatermarkSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Watermark
    }

    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(*self, tx, cancel))
    }
}

async fn run(s: WatermarkSource, tx: mpsc::Sender<Event>, cancel: CancellationToken) {
    let mut crossing = Crossing::new(s.fraction);
    let mut failing = false;
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let m = std::fs::read_to_string(&s.meminfo).ok().and_then(|t| procfs::parse_meminfo(&t));
        let Some(m) = m else {
            if !failing {
                warn!(path = %s.meminfo.display(), "usage watermark: cannot read memory use; retrying");
                failing = true;
            }
            wait = MAX_INTERVAL;
            continue;
        };
        failing = false;
        let used = m.total_bytes.saturating_sub(m.available_bytes);
        wait = next_interval(used, m.total_bytes, s.fraction, s.max_ramp_bytes_per_s, s.interval);
        if crossing.observe(used, m.total_bytes) {
            let p = Pressure { kind: PressureKind::UsageWatermark, count: 1, stall_ns: 0, pid: 0 };
            let ev = Event {
                monotonic_ns: monotonic_ns(),
                source: SourceKind::Watermark,
                body: EventBody::Pressure(p),
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn one_event_per_crossing_rearmed_by_new_memory_or_falling_use() {
        let mut c = Crossing::new(0.9);
        let total = 1000 * MIB;
        assert!(!c.observe(800 * MIB, total));
        assert!(c.observe(900 * MIB, total), "at the watermark is past it");
        // Wobbling around the line, or climbing further: no new event.
        for used in [905, 895, 899, 950, 885] {
            assert!(!c.observe(used * MIB, total), "{used}");
        }
        // More than the margin under it re-arms (879 < 880)...
        assert!(!c.observe(879 * MIB, total));
        assert!(c.observe(920 * MIB, total));
        // ...and so does memory coming online: 920 of 1128 MiB is 82%.
        assert!(!c.observe(920 * MIB, 1128 * MIB));
        assert!(c.observe(1016 * MIB, 1128 * MIB));
    }

    #[test]
    fn reads_come_sooner_the_closer_use_is_to_the_watermark() {
        let min = Duration::from_millis(10);
        let gib_s = 1024 * MIB;
        let total = 1000 * MIB;
        // 600 MiB under the line at 1 GiB/s: 0.59 s to reach it; half that
        // is past the 250 ms cap.
        assert_eq!(next_interval(300 * MIB, total, 0.9, gib_s, min), MAX_INTERVAL);
        // 100 MiB under: 98 ms to reach it at 1 GiB/s, read in 49 ms.
        let d = next_interval(800 * MIB, total, 0.9, gib_s, min);
        assert!(d > Duration::from_millis(45) && d < Duration::from_millis(50), "{d:?}");
        // Close to it, at it, past it: as often as allowed.
        assert_eq!(next_interval(899 * MIB, total, 0.9, gib_s, min), min);
        assert_eq!(next_interval(900 * MIB, total, 0.9, gib_s, min), min);
        assert_eq!(next_interval(990 * MIB, total, 0.9, gib_s, min), min);
        // A minimum above the cap wins; no ramp assumed means every min.
        assert_eq!(next_interval(0, total, 0.9, gib_s, Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(next_interval(0, total, 0.9, 0, min), min);
    }

    #[test]
    fn no_total_no_event() {
        let mut c = Crossing::new(0.9);
        assert!(!c.observe(0, 0));
        assert!(!c.observe(5, 0));
    }

    #[tokio::test]
    async fn a_real_meminfo_file_crossing_sends_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        let write = |avail_kib: u64| {
            std::fs::write(&path, format!("MemTotal: 1000000 kB\nMemAvailable: {avail_kib} kB\n")).unwrap();
        };
        write(500_000);
        let (src, status) = WatermarkSource::start(path.clone(), 0.9, Duration::from_millis(5), 1 << 30);
        assert!(status.available, "{status:?}");
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = Box::new(src.unwrap()).spawn(tx, cancel.clone());
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(rx.try_recv().is_err(), "50% use is no crossing");
        write(50_000);
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(ev.source, SourceKind::Watermark);
        assert!(
            matches!(ev.body, EventBody::Pressure(Pressure { kind: PressureKind::UsageWatermark, .. })),
            "{ev:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(rx.try_recv().is_err(), "still past it: no second event");
        cancel.cancel();
        task.await.unwrap();

        let (src, status) =
            WatermarkSource::start(dir.path().join("missing"), 0.9, Duration::from_millis(5), 1 << 30);
        assert!(src.is_none() && !status.available && status.reason.contains("cannot read"), "{status:?}");
    }
}
