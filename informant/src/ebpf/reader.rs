//! The running source: waits on the ring buffer, turns records into events,
//! and one window after a burst's last record collects what the programs
//! left in their state map.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{Array, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vmscale_ebpf_common::{Kind, KindState, Record, KIND_COUNT};

use super::records::Tracker;
use super::Error;
use crate::event::{monotonic_ns, Event};

/// Counters of a running eBPF source, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct EbpfStats {
    /// Records read from the ring buffer.
    pub records: AtomicU64,
    /// Events handed to the channel (records and tails that brought news).
    pub events: AtomicU64,
    /// Tails of bursts collected from the state map.
    pub tails: AtomicU64,
    /// Records the programs could not queue because the ring was full.
    pub kernel_dropped: AtomicU64,
    /// Sum and maximum, over records, of the time from the kernel's
    /// timestamp to the reader taking the record out of the ring, ns.
    pub ring_latency_sum_ns: AtomicU64,
    pub ring_latency_max_ns: AtomicU64,
}

impl EbpfStats {
    /// Mean kernel-to-reader latency over all records so far, ns.
    pub fn mean_ring_latency_ns(&self) -> Option<u64> {
        let n = self.records.load(Ordering::Relaxed);
        (n > 0).then(|| self.ring_latency_sum_ns.load(Ordering::Relaxed) / n)
    }

    fn saw_record(&self, latency_ns: u64) {
        self.records.fetch_add(1, Ordering::Relaxed);
        self.ring_latency_sum_ns.fetch_add(latency_ns, Ordering::Relaxed);
        self.ring_latency_max_ns.fetch_max(latency_ns, Ordering::Relaxed);
    }
}

/// Slack after the window before a tail is collected, so that a record the
/// kernel is emitting right at the window's end comes first.
const TAIL_SLACK: Duration = Duration::from_millis(1);

pub(super) struct Reader {
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub state: Array<MapData, KindState>,
    pub window: Duration,
    pub stats: Arc<EbpfStats>,
    pub tx: mpsc::Sender<Event>,
}

impl Reader {
    /// Runs until cancelled or the channel closes.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), Error> {
        let mut tracker = Tracker::default();
        // Per kind, when to collect the tail of the current burst.
        let mut tails: [Option<Instant>; KIND_COUNT as usize] = [None; KIND_COUNT as usize];
        let mut batch: Vec<Record> = Vec::with_capacity(64);
        loop {
            let next_tail = tails.iter().flatten().min().copied();
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                ready = self.ring.readable_mut() => {
                    let mut guard = ready.map_err(Error::Poll)?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        batch.extend(parse(&item));
                    }
                    guard.clear_ready();
                }
                () = sleep_until(next_tail), if next_tail.is_some() => {}
            }

            let mut events = Vec::with_capacity(batch.len() + 1);
            for r in batch.drain(..) {
                self.stats.saw_record(monotonic_ns().saturating_sub(r.ts_ns));
                let Some(update) = tracker.record(&r) else {
                    tracing::debug!(
                        kind = r.kind,
                        "record of unknown kind ignored (object newer than binary?)"
                    );
                    continue;
                };
                self.note_drops(update.newly_dropped);
                if let Some(kind) = Kind::from_u32(r.kind).filter(|k| k.is_aggregated()) {
                    tails[kind as usize] = Some(Instant::now() + self.window + TAIL_SLACK);
                }
                events.extend(update.event);
            }
            let now = Instant::now();
            for kind in Kind::ALL {
                if tails[kind as usize].is_some_and(|t| t <= now) {
                    tails[kind as usize] = None;
                    match self.state.get(&(kind as u32), 0) {
                        Ok(s) => {
                            let update = tracker.state(kind, &s, monotonic_ns());
                            self.note_drops(update.newly_dropped);
                            if update.event.is_some() {
                                self.stats.tails.fetch_add(1, Ordering::Relaxed);
                            }
                            events.extend(update.event);
                        }
                        Err(e) => tracing::warn!(?kind, "reading the eBPF state map: {e}"),
                    }
                }
            }
            for ev in events {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Ok(()),
                    sent = self.tx.send(ev) => {
                        if sent.is_err() {
                            return Ok(());
                        }
                        self.stats.events.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn note_drops(&self, n: u64) {
        if n > 0 {
            self.stats.kernel_dropped.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(
                records = n,
                "the eBPF ring buffer was full; counts stay right, some events came late"
            );
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A record from ring buffer bytes; `None` if too short (never, for an
/// object built from the same common crate).
fn parse(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < std::mem::size_of::<Record>() {
        return None;
    }
    // SAFETY: the slice holds at least size_of::<Record>() bytes, the read
    // is unaligned-safe, and Record is plain integers (repr(C), no padding),
    // so every bit pattern is a valid value.
    Some(unsafe { bytes.as_ptr().cast::<Record>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_bytes_the_kernel_writes() {
        let r = Record { ts_ns: 1, count: 2, stall_ns: 3, reclaimed_pages: 4, dropped: 5, kind: 1, pid: 77 };
        let mut bytes = Vec::new();
        for v in [r.ts_ns, r.count, r.stall_ns, r.reclaimed_pages, r.dropped] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        bytes.extend_from_slice(&r.kind.to_ne_bytes());
        bytes.extend_from_slice(&r.pid.to_ne_bytes());
        assert_eq!(parse(&bytes), Some(r));
        assert_eq!(parse(&bytes[1..]), None);
    }

    #[test]
    fn mean_latency_needs_records() {
        let s = EbpfStats::default();
        assert_eq!(s.mean_ring_latency_ns(), None);
        s.saw_record(100);
        s.saw_record(300);
        assert_eq!(s.mean_ring_latency_ns(), Some(200));
        assert_eq!(s.ring_latency_max_ns.load(Ordering::Relaxed), 300);
    }
}
