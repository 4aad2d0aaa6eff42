//! cgroup v2 `memory.events` of the workload: the kernel notifies a change of
//! the file (inotify IN_MODIFY) whenever a counter moves, so we read it at
//! once and report each counter's increase. Where inotify is unavailable we
//! re-read the file on a timer instead.

use crate::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use crate::procfs::{parse_memory_events, MemoryEvents};
use crate::source::{Source, SourceStatus};
use inotify::{Inotify, WatchMask};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The increases from `prev` to `now`, one per counter that moved. `None`
/// when a counter went down: the cgroup was re-created, and `now` is the new
/// baseline rather than news.
pub fn deltas(prev: &MemoryEvents, now: &MemoryEvents) -> Option<Vec<(PressureKind, u32)>> {
    let pairs = [
        (PressureKind::CgroupHigh, prev.high, now.high),
        (PressureKind::CgroupMax, prev.max, now.max),
        (PressureKind::CgroupOom, prev.oom, now.oom),
        (PressureKind::CgroupOomKill, prev.oom_kill, now.oom_kill),
    ];
    if pairs.iter().any(|&(_, a, b)| b < a) {
        return None;
    }
    Some(
        pairs
            .iter()
            .filter(|&&(_, a, b)| b > a)
            .map(|&(k, a, b)| (k, u32::try_from(b - a).unwrap_or(u32::MAX)))
            .collect(),
    )
}

#[derive(Debug)]
pub struct CgroupEventsSource {
    path: PathBuf,
    baseline: MemoryEvents,
    inotify: Option<AsyncFd<Inotify>>,
    poll: Duration,
}

impl CgroupEventsSource {
    /// Reads the baseline and sets up the watch; must run inside a tokio runtime.
    pub fn start(cgroup_dir: &Path, poll: Duration) -> (Option<CgroupEventsSource>, SourceStatus) {
        let path = cgroup_dir.join("memory.events");
        let baseline = match read(&path) {
            Ok(b) => b,
            Err(e) => {
                let reason = format!(
                    "cannot read {} ({e}); is {} a cgroup v2 directory whose parent enables the memory \
                     controller in cgroup.subtree_control?",
                    path.display(),
                    cgroup_dir.display()
                );
                warn!("cgroup events unavailable: {reason}");
                return (None, SourceStatus::down(SourceKind::CgroupEvents, reason));
            }
        };
        let mut status = SourceStatus::up(SourceKind::CgroupEvents);
        let inotify = match watch(&path) {
            Ok(fd) => Some(fd),
            Err(e) => {
                status.reason = format!(
                    "inotify unavailable ({e}); re-reading {} every {} ms",
                    path.display(),
                    poll.as_millis()
                );
                warn!("cgroup events: {}", status.reason);
                None
            }
        };
        info!(path = %path.display(), inotify = inotify.is_some(), "watching memory.events");
        (Some(CgroupEventsSource { path, baseline, inotify, poll }), status)
    }
}

fn read(path: &Path) -> io::Result<MemoryEvents> {
    let text = std::fs::read_to_string(path)?;
    parse_memory_events(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a memory.events file"))
}

fn watch(path: &Path) -> io::Result<AsyncFd<Inotify>> {
    let inotify = Inotify::init()?;
    inotify.watches().add(path, WatchMask::MODIFY)?;
    // SAFETY: `Inotify` owns its descriptor and never closes or replaces it
    // while the `AsyncFd` holds it; it is closed when the `AsyncFd` drops it.
    Ok(unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }?)
}

impl Source for CgroupEventsSource {
    fn kind(&self) -> SourceKind {
        SourceKind::CgroupEvents
    }

    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(*self, tx, cancel))
    }
}

async fn run(mut s: CgroupEventsSource, tx: mpsc::Sender<Event>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(s.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 1024];
    let mut read_failed = false;
    loop {
        let woke = tokio::select! {
            () = cancel.cancelled() => return,
            r = changed(s.inotify.as_mut(), &mut buf) => r,
            _ = tick.tick(), if s.inotify.is_none() => Ok(()),
        };
        if let Err(e) = woke {
            warn!(path = %s.path.display(), "inotify failed ({e}); re-reading every {} ms", s.poll.as_millis());
            s.inotify = None;
            tick.reset();
        }
        let now = match read(&s.path) {
            Ok(n) => {
                read_failed = false;
                n
            }
            Err(e) => {
                // A file caught mid-rewrite or a removed cgroup: keep the baseline.
                if !read_failed {
                    warn!(path = %s.path.display(), "cannot read memory.events: {e}");
                }
                read_failed = true;
                continue;
            }
        };
        let ts = monotonic_ns();
        let Some(moved) = deltas(&s.baseline, &now) else {
            info!(path = %s.path.display(), "memory.events counters went down (cgroup re-created?); new baseline");
            s.baseline = now;
            continue;
        };
        s.baseline = now;
        for (kind, count) in moved {
            let ev = Event {
                monotonic_ns: ts,
                source: SourceKind::CgroupEvents,
                body: EventBody::Pressure(Pressure { kind, count, stall_ns: 0, pid: 0 }),
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

/// Waits for the next modification, draining the inotify queue. Pending
/// forever when there is no inotify (the timer runs instead).
async fn changed(fd: Option<&mut AsyncFd<Inotify>>, buf: &mut [u8]) -> io::Result<()> {
    let Some(fd) = fd else { return std::future::pending().await };
    loop {
        let mut guard = fd.readable_mut().await?;
        match guard.try_io(|inner| inner.get_mut().read_events(buf).map(|evs| evs.count())) {
            Ok(Ok(_)) => {
                // Drain whatever else queued up; one re-read covers all of it.
                while let Ok(Ok(n)) =
                    guard.try_io(|inner| inner.get_mut().read_events(buf).map(|e| e.count()))
                {
                    if n == 0 {
                        break;
                    }
                }
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ev(high: u64, max: u64, oom: u64, oom_kill: u64) -> MemoryEvents {
        MemoryEvents { high, max, oom, oom_kill }
    }

    #[test]
    fn deltas_table() {
        use PressureKind::*;
        type Case = (MemoryEvents, MemoryEvents, Option<Vec<(PressureKind, u32)>>);
        let cases: [Case; 4] = [
            (ev(0, 0, 0, 0), ev(0, 0, 0, 0), Some(vec![])),
            (ev(1, 2, 3, 4), ev(4, 2, 4, 6), Some(vec![(CgroupHigh, 3), (CgroupOom, 1), (CgroupOomKill, 2)])),
            (ev(0, 0, 0, 0), ev(0, u64::MAX, 0, 0), Some(vec![(CgroupMax, u32::MAX)])),
            (ev(5, 0, 0, 0), ev(1, 9, 0, 0), None),
        ];
        for (prev, now, want) in cases {
            assert_eq!(deltas(&prev, &now), want, "{prev:?} -> {now:?}");
        }
    }

    fn text(e: MemoryEvents) -> String {
        format!(
            "low 0\nhigh {}\nmax {}\noom {}\noom_kill {}\noom_group_kill 0\n",
            e.high, e.max, e.oom, e.oom_kill
        )
    }

    /// Rewrites in place (no truncation, one write), as the kernel's counters
    /// only grow; a truncating write would show an empty file in between.
    fn bump(path: &Path, e: MemoryEvents) {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all(text(e).as_bytes()).unwrap();
    }

    async fn next_pressure(rx: &mut mpsc::Receiver<Event>) -> Pressure {
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(ev.source, SourceKind::CgroupEvents);
        match ev.body {
            EventBody::Pressure(p) => p,
            other => panic!("not a pressure event: {other:?}"),
        }
    }

    async fn changes_become_events(poll_only: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.events");
        std::fs::write(&path, text(ev(1, 0, 0, 0))).unwrap();
        let (src, status) = CgroupEventsSource::start(dir.path(), Duration::from_millis(20));
        assert!(status.available && status.reason.is_empty(), "{status:?}");
        let mut src = src.unwrap();
        if poll_only {
            src.inotify = None;
        }
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = Box::new(src).spawn(tx, cancel.clone());

        bump(&path, ev(3, 0, 0, 0));
        assert_eq!(
            next_pressure(&mut rx).await,
            Pressure { kind: PressureKind::CgroupHigh, count: 2, stall_ns: 0, pid: 0 }
        );
        bump(&path, ev(3, 1, 1, 1));
        let kinds: Vec<_> =
            [next_pressure(&mut rx).await, next_pressure(&mut rx).await, next_pressure(&mut rx).await]
                .iter()
                .map(|p| (p.kind, p.count))
                .collect();
        assert_eq!(
            kinds,
            [(PressureKind::CgroupMax, 1), (PressureKind::CgroupOom, 1), (PressureKind::CgroupOomKill, 1)]
        );
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn inotify_changes_become_events() {
        changes_become_events(false).await;
    }

    #[tokio::test]
    async fn polled_changes_become_events() {
        changes_become_events(true).await;
    }

    #[tokio::test]
    async fn missing_file_is_a_reason_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (src, status) = CgroupEventsSource::start(dir.path(), Duration::from_millis(20));
        assert!(src.is_none());
        assert!(!status.available);
        assert!(status.reason.contains("subtree_control"), "{}", status.reason);
    }
}
