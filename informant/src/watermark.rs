//! Use passing a watermark, told the moment it happens, or a little before.
//!
//! At 90% use the kernel shows no pressure yet: no reclaim, PSI quiet. The
//! only event-driven signals arrive when memory is already short, and the
//! sampler's once-a-second sample is what told the agent of the crossing
//! before: relief came 0.5-0.9 s after the workload passed 90% (see
//! BENCHMARKS.md, "End to end"). This source reads `/proc/meminfo` inside
//! the guest (no network, no agent) and sends one pressure event, kind
//! `usage_watermark`, when use (MemTotal - MemAvailable) passes the watermark
//! from below. It re-arms once memory came (MemTotal changed) or use fell
//! by a margin below where it was when the event went out.
//!
//! Memory takes time to arrive: the agent's permit and plug, and the guest
//! kernel onlining the block, 40-120 ms under TCG, longer when the workload
//! holds every vCPU. An event sent when use reaches the line leaves the
//! workload past it for all that time. So the event goes when use *will*
//! reach the line within the lead, at the rate it grew over the last half
//! second: at 200 MiB/s and a 100 ms lead, 20 MiB before the line; at a
//! standstill, at the line as before; and a workload that grows in chunks
//! gets its event when one more chunk like its last would pass the line.
//! The lead is learned: after each event the source times how long until
//! MemTotal grows, and leads by the slowest of the last few arrivals when
//! that is longer than the configured lead (`Lead`). A ramp that stops
//! short of the line gets memory it did not need yet; the agent's downscale
//! returns it.
//!
//! A read of `/proc/meminfo` costs tens of µs, so reading it every 10 ms
//! idles at over 1% of a core. The next read is instead due when use could
//! first reach the watermark at the fastest ramp assumed (`max_ramp`), halved
//! for safety, between `min_interval` and `MAX_INTERVAL`: every 10 ms close
//! to the line, a few times a second far from it; sooner when use is growing
//! and its projection nears the line; every `min_interval` while memory is
//! on its way, to time its arrival.

use crate::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use crate::procfs;
use crate::source::{Source, SourceStatus};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How far under the use at the last event use must fall before another
/// crossing counts, as a fraction of MemTotal: use wobbling around the line
/// sends one event, not one per read.
pub const REARM_MARGIN: f64 = 0.02;

/// The longest wait between reads, however far use is from the watermark.
pub const MAX_INTERVAL: Duration = Duration::from_millis(250);

/// Use's growth rate is taken over the readings of this last span.
pub const RATE_WINDOW_NS: u64 = 500_000_000;
/// Readings closer together than this give no rate (one chunk of a
/// workload's allocation is not a ramp).
pub const MIN_RATE_SPAN_NS: u64 = 20_000_000;
/// A chunk of allocation is a rise of use within this span (`step_bytes`).
pub const STEP_SPAN_NS: u64 = 50_000_000;
/// The learned lead stays within these bounds.
pub const MIN_LEAD_NS: u64 = 20_000_000;
pub const MAX_LEAD_NS: u64 = 1_000_000_000;
/// Memory that took longer than this after an event was held up elsewhere
/// (a full node, a denied permit): not a plug's time, not learned.
pub const MAX_ARRIVAL_NS: u64 = 2_000_000_000;
/// How many arrivals the lead remembers; it leads by the slowest.
pub const ARRIVALS: usize = 8;

/// When to read next: half the time use needs to reach the watermark at
/// `max_ramp_bytes_per_s`, within `[min, MAX_INTERVAL]`; no later than half
/// the time until use, at `rate_bytes_per_s`, comes within `lead` of it.
/// Past the watermark (waiting to re-arm), `min`: new memory coming online
/// must be seen soon.
pub fn next_interval(
    used: u64,
    total: u64,
    fraction: f64,
    max_ramp_bytes_per_s: u64,
    min: Duration,
    rate_bytes_per_s: f64,
    lead: Duration,
) -> Duration {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let line = (total as f64 * fraction) as u64;
    let headroom = line.saturating_sub(used);
    if headroom == 0 || max_ramp_bytes_per_s == 0 {
        return min;
    }
    let mut secs = headroom as f64 / max_ramp_bytes_per_s as f64 / 2.0;
    if rate_bytes_per_s > 0.0 {
        let ahead = (headroom as f64 - rate_bytes_per_s * lead.as_secs_f64()).max(0.0);
        secs = secs.min(ahead / rate_bytes_per_s / 2.0);
    }
    Duration::from_secs_f64(secs).clamp(min, MAX_INTERVAL.max(min))
}

/// How far ahead of the line the event goes: `initial`, or the slowest of
/// the last `ARRIVALS` arrivals when memory took longer, within
/// `[MIN_LEAD_NS, MAX_LEAD_NS]`. Learning only ever raises the lead: an
/// arrival can be quicker than a plug (memory another signal asked for
/// was already on its way), never slower. A lead of zero turns prediction
/// off: events go at the line and nothing is learned.
#[derive(Debug, Clone)]
pub struct Lead {
    initial_ns: u64,
    arrivals: VecDeque<u64>,
}

impl Lead {
    pub fn new(initial: Duration) -> Self {
        let initial_ns = u64::try_from(initial.as_nanos()).unwrap_or(MAX_LEAD_NS);
        Lead { initial_ns, arrivals: VecDeque::with_capacity(ARRIVALS) }
    }

    pub fn enabled(&self) -> bool {
        self.initial_ns > 0
    }

    pub fn ns(&self) -> u64 {
        if !self.enabled() {
            return 0;
        }
        let slowest = self.arrivals.iter().copied().max().unwrap_or(0);
        slowest.max(self.initial_ns).clamp(MIN_LEAD_NS, MAX_LEAD_NS)
    }

    fn arrived(&mut self, after_ns: u64) {
        if !self.enabled() || after_ns > MAX_ARRIVAL_NS {
            return;
        }
        if self.arrivals.len() == ARRIVALS {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(after_ns);
    }
}

/// The event that went out and is not re-armed yet.
#[derive(Debug, Clone, Copy)]
struct Fired {
    at_ns: u64,
    used: u64,
    total: u64,
}

/// Why a reading sent an event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fire {
    /// Use was already at or past the line (else it was projected to be
    /// within the lead).
    pub at_line: bool,
    /// The growth rate the projection used, bytes/s.
    pub rate_bytes_per_s: f64,
    /// The lead the projection used.
    pub lead_ns: u64,
    /// How far ahead of use the projection put it, bytes: the lead's growth
    /// at `rate_bytes_per_s`, or the largest recent step.
    pub margin_bytes: u64,
}

/// The pure part: fed readings (time, use, total), says when one is a
/// crossing, now or within the lead.
#[derive(Debug, Clone)]
pub struct Crossing {
    fraction: f64,
    fired: Option<Fired>,
    recent: VecDeque<(u64, u64)>,
    lead: Lead,
}

impl Crossing {
    pub fn new(fraction: f64, lead: Lead) -> Self {
        Crossing { fraction, fired: None, recent: VecDeque::new(), lead }
    }

    /// The largest rise of use within `STEP_SPAN_NS` over the last
    /// `RATE_WINDOW_NS`, bytes: a workload that allocates in chunks (4 MiB
    /// every 250 ms is 16 MiB/s, 1.6 MiB in a 100 ms lead) may pass the line
    /// with its next chunk, whatever the average rate says. A chunk's pages
    /// are touched over a few ms, so a rise is taken over a short span, not
    /// from one read to the next.
    pub fn step_bytes(&self) -> u64 {
        let mut step = 0;
        for (j, &(tj, uj)) in self.recent.iter().enumerate() {
            let low = self
                .recent
                .iter()
                .take(j)
                .filter(|&&(ti, _)| tj.saturating_sub(ti) <= STEP_SPAN_NS)
                .map(|&(_, ui)| ui)
                .min()
                .unwrap_or(uj);
            step = step.max(uj.saturating_sub(low));
        }
        step
    }

    /// Use's growth over the last `RATE_WINDOW_NS` of readings, bytes/s; 0
    /// when falling, flat or too few readings.
    pub fn rate_bytes_per_s(&self) -> f64 {
        let (Some(&(t0, u0)), Some(&(t1, u1))) = (self.recent.front(), self.recent.back()) else {
            return 0.0;
        };
        let span = t1.saturating_sub(t0);
        if span < MIN_RATE_SPAN_NS || u1 <= u0 {
            return 0.0;
        }
        (u1 - u0) as f64 / (span as f64 / 1e9)
    }

    pub fn lead(&self) -> Duration {
        Duration::from_nanos(self.lead.ns())
    }

    /// An event went out and memory has not come yet (for at most
    /// `MAX_ARRIVAL_NS`): its arrival is being timed.
    pub fn awaiting(&self, now_ns: u64) -> bool {
        self.lead.enabled() && self.fired.is_some_and(|f| now_ns.saturating_sub(f.at_ns) <= MAX_ARRIVAL_NS)
    }

    /// `Some` when this reading passes the watermark, or is projected to
    /// within the lead, and the last event was re-armed since.
    pub fn observe(&mut self, now_ns: u64, used: u64, total: u64) -> Option<Fire> {
        if total == 0 {
            return None;
        }
        if self.lead.enabled() {
            while self.recent.front().is_some_and(|&(t, _)| now_ns.saturating_sub(t) > RATE_WINDOW_NS) {
                self.recent.pop_front();
            }
            self.recent.push_back((now_ns, used));
        }
        if let Some(f) = self.fired {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let margin = (total as f64 * REARM_MARGIN) as u64;
            if total != f.total {
                if total > f.total {
                    self.lead.arrived(now_ns.saturating_sub(f.at_ns));
                }
                // Use against the new total is a new question; the old
                // readings' rate still holds.
                self.fired = None;
            } else if used.saturating_add(margin) < f.used {
                self.fired = None;
            } else {
                return None;
            }
        }
        let line = total as f64 * self.fraction;
        let rate = self.rate_bytes_per_s();
        let lead_ns = self.lead.ns();
        // The lead's growth at the current rate, or one more step like the
        // last ones, whichever is more.
        let margin = (rate * lead_ns as f64 / 1e9).max(self.step_bytes() as f64);
        let projected = used as f64 + margin;
        let at_line = used as f64 >= line;
        if at_line || projected >= line {
            self.fired = Some(Fired { at_ns: now_ns, used, total });
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let margin_bytes = margin as u64;
            return Some(Fire { at_line, rate_bytes_per_s: rate, lead_ns, margin_bytes });
        }
        None
    }
}

#[derive(Debug)]
pub struct WatermarkSource {
    meminfo: PathBuf,
    fraction: f64,
    interval: Duration,
    max_ramp_bytes_per_s: u64,
    lead: Duration,
}

impl WatermarkSource {
    /// Checks that `/proc/meminfo` reads and parses here.
    /// `interval` is the shortest time between reads; `max_ramp_bytes_per_s`
    /// the fastest growth of use the reads must keep up with; `lead` how
    /// far ahead of the line events go at least, longer when arrivals were
    /// slower (zero: at the line, nothing learned).
    pub fn start(
        meminfo: PathBuf,
        fraction: f64,
        interval: Duration,
        max_ramp_bytes_per_s: u64,
        lead: Duration,
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
                    lead_ms = lead.as_millis(),
                    "usage watermark armed"
                );
                let s = WatermarkSource { meminfo, fraction, interval, max_ramp_bytes_per_s, lead };
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
    let mut crossing = Crossing::new(s.fraction, Lead::new(s.lead));
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
        let now = monotonic_ns();
        let used = m.total_bytes.saturating_sub(m.available_bytes);
        let fire = crossing.observe(now, used, m.total_bytes);
        wait = if crossing.awaiting(now) {
            s.interval
        } else {
            next_interval(
                used,
                m.total_bytes,
                s.fraction,
                s.max_ramp_bytes_per_s,
                s.interval,
                crossing.rate_bytes_per_s(),
                crossing.lead(),
            )
        };
        if let Some(f) = fire {
            // Once per crossing: worth a line at info.
            info!(
                at_line = f.at_line,
                used_mib = used >> 20,
                total_mib = m.total_bytes >> 20,
                rate_mib_per_s = f.rate_bytes_per_s / f64::from(1u32 << 20),
                lead_ms = f.lead_ns / 1_000_000,
                margin_mib = f.margin_bytes >> 20,
                "usage watermark event"
            );
            let p = Pressure { kind: PressureKind::UsageWatermark, count: 1, stall_ns: 0, pid: 0 };
            let ev = Event { monotonic_ns: now, source: SourceKind::Watermark, body: EventBody::Pressure(p) };
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
    const MS: u64 = 1_000_000;

    fn at_the_line_only() -> Crossing {
        Crossing::new(0.9, Lead::new(Duration::ZERO))
    }

    #[test]
    fn one_event_per_crossing_rearmed_by_new_memory_or_falling_use() {
        let mut c = at_the_line_only();
        let total = 1000 * MIB;
        let mut t = 0;
        let mut see = |c: &mut Crossing, used: u64, total: u64| {
            t += 10 * MS;
            c.observe(t, used * MIB, total).is_some()
        };
        assert!(!see(&mut c, 800, total));
        assert!(see(&mut c, 900, total), "at the watermark is past it");
        // Wobbling around the line, or climbing further: no new event.
        for used in [905, 895, 899, 950, 885] {
            assert!(!see(&mut c, used, total), "{used}");
        }
        // More than the margin under the use at the event re-arms (879 < 880)...
        assert!(!see(&mut c, 879, total));
        assert!(see(&mut c, 920, total));
        // ...and so does memory coming online: 920 of 1128 MiB is 82%.
        assert!(!see(&mut c, 920, 1128 * MIB));
        assert!(see(&mut c, 1016, 1128 * MIB));
    }

    #[test]
    fn a_growing_use_fires_the_lead_ahead_of_the_line_a_standing_one_at_it() {
        // 200 MiB/s in 4 MiB steps every 20 ms; 100 ms lead: 20 MiB ahead.
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        let total = 1000 * MIB;
        let mut fired_at = None;
        for k in 0..60u64 {
            let used = 700 * MIB + k * 4 * MIB;
            if let Some(f) = c.observe(k * 20 * MS, used, total) {
                fired_at = Some((used, f));
                break;
            }
        }
        let (used, f) = fired_at.expect("fired");
        assert!(!f.at_line);
        assert!((876 * MIB..900 * MIB).contains(&used), "fired at {} MiB", used / MIB);
        assert!((f.rate_bytes_per_s / MIB as f64 - 200.0).abs() < 1.0, "{f:?}");
        assert_eq!(f.lead_ns, 100 * MS);

        // The same line approached and then held: no rate, no early event.
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        for k in 0..100u64 {
            assert!(c.observe(k * 20 * MS, 890 * MIB, total).is_none());
        }
        assert_eq!(c.rate_bytes_per_s(), 0.0);
        assert!(c.observe(2_000 * MS, 900 * MIB, total).is_some_and(|f| f.at_line));
    }

    #[test]
    fn a_workload_growing_in_chunks_fires_one_chunk_ahead() {
        // 4 MiB every 250 ms (16 MiB/s), read every 10 ms: 1.6 MiB of lead
        // at that rate, but the next chunk is 4 MiB.
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        let total = 1000 * MIB;
        let base = 880 * MIB + MIB / 2;
        let mut fired = None;
        for k in 0..200u64 {
            let used = base + (k / 25) * 4 * MIB;
            if let Some(f) = c.observe(k * 10 * MS, used, total) {
                fired = Some((used, f));
                break;
            }
        }
        let (used, f) = fired.expect("fired");
        assert_eq!(used, base + 16 * MIB, "896.5 MiB: the next chunk would reach 900.5");
        assert!(!f.at_line && f.margin_bytes == 4 * MIB, "{f:?}");
        // Off, it waits for the line.
        let mut c = at_the_line_only();
        for k in 0..200u64 {
            let used = base + (k / 25) * 4 * MIB;
            if let Some(f) = c.observe(k * 10 * MS, used, total) {
                assert!(f.at_line && used == base + 20 * MIB);
                return;
            }
        }
        panic!("never fired");
    }

    #[test]
    fn a_chunk_seen_over_several_reads_is_one_step() {
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        let total = 1000 * MIB;
        // 4 MiB touched over 3 reads, then nothing for 200 ms.
        for (t, used) in [(0, 500), (10, 501), (20, 503), (30, 504), (230, 504)] {
            assert!(c.observe(t * MS, used * MIB, total).is_none());
        }
        assert_eq!(c.step_bytes(), 4 * MIB);
        // Rises further apart than `STEP_SPAN_NS` are separate steps.
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        for (t, used) in [(0, 500), (40, 502), (100, 504)] {
            assert!(c.observe(t * MS, used * MIB, total).is_none());
        }
        assert_eq!(c.step_bytes(), 2 * MIB);
    }

    #[test]
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn the_lead_is_the_slowest_recent_arrival_within_bounds() {
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        let total = 1000 * MIB;
        let mut t = 0;
        // Memory arrives 160 ms after each event; the lead follows it...
        for k in 0..3u64 {
            let total_k = total + k * 128 * MIB;
            let line = (total_k as f64 * 0.9) as u64 + MIB;
            t += 1_000 * MS;
            assert!(c.observe(t, line, total_k).is_some(), "event {k}");
            assert!(c.awaiting(t + 10 * MS));
            t += 160 * MS;
            assert!(c.observe(t, line, total_k + 128 * MIB).is_none());
        }
        assert_eq!(c.lead(), Duration::from_millis(160));
        // ...one slow arrival raises it; one stuck for minutes is not
        // learned; quick ones never take it under the initial lead.
        let mut l = Lead::new(Duration::from_millis(100));
        l.arrived(60 * MS);
        assert_eq!(l.ns(), 100 * MS);
        l.arrived(180 * MS);
        l.arrived(50 * MS);
        l.arrived(600_000 * MS);
        assert_eq!(l.ns(), 180 * MS);
        // The slow one ages out after `ARRIVALS` more.
        for _ in 0..ARRIVALS {
            l.arrived(MS);
        }
        assert_eq!(l.ns(), 100 * MS);
        // Bounds: a tiny or huge initial lead is clamped; zero is off.
        assert_eq!(Lead::new(Duration::from_millis(1)).ns(), MIN_LEAD_NS);
        assert_eq!(Lead::new(Duration::from_secs(60)).ns(), MAX_LEAD_NS);
        assert_eq!(Lead::new(Duration::ZERO).ns(), 0);
        // An event whose memory never comes stops being awaited.
        let mut c = Crossing::new(0.9, Lead::new(Duration::from_millis(100)));
        assert!(c.observe(0, 950 * MIB, total).is_some());
        assert!(c.awaiting(MAX_ARRIVAL_NS) && !c.awaiting(MAX_ARRIVAL_NS + 1));
    }

    #[test]
    fn reads_come_sooner_the_closer_use_is_to_the_watermark() {
        let min = Duration::from_millis(10);
        let gib_s = 1024 * MIB;
        let total = 1000 * MIB;
        let no = Duration::ZERO;
        let next = |used: u64, ramp: u64, min: Duration| next_interval(used, total, 0.9, ramp, min, 0.0, no);
        // 600 MiB under the line at 1 GiB/s: 0.59 s to reach it; half that
        // is past the 250 ms cap.
        assert_eq!(next(300 * MIB, gib_s, min), MAX_INTERVAL);
        // 100 MiB under: 98 ms to reach it at 1 GiB/s, read in 49 ms.
        let d = next(800 * MIB, gib_s, min);
        assert!(d > Duration::from_millis(45) && d < Duration::from_millis(50), "{d:?}");
        // Close to it, at it, past it: as often as allowed.
        assert_eq!(next(899 * MIB, gib_s, min), min);
        assert_eq!(next(900 * MIB, gib_s, min), min);
        assert_eq!(next(990 * MIB, gib_s, min), min);
        // A minimum above the cap wins; no ramp assumed means every min.
        assert_eq!(next(0, gib_s, Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(next(0, 0, min), min);
        // Growing at 100 MiB/s with a 200 ms lead, 100 MiB under the line:
        // the projection reaches it in 0.8 s; read within half that, 49 ms
        // being sooner still from the fastest ramp.
        let d =
            next_interval(800 * MIB, total, 0.9, gib_s, min, 100.0 * MIB as f64, Duration::from_millis(200));
        assert!(d < Duration::from_millis(50), "{d:?}");
        // 40 MiB under, 100 MiB/s, 200 ms lead: 20 MiB of projection left,
        // 0.2 s to go; read within 0.1 s (the fastest ramp alone: 19.5 ms).
        let slow = MIB * 100;
        let d = next_interval(860 * MIB, total, 0.9, slow * 10, min, slow as f64, Duration::from_millis(200));
        assert!(d <= Duration::from_millis(100) && d > Duration::from_millis(15), "{d:?}");
    }

    #[test]
    fn no_total_no_event() {
        let mut c = at_the_line_only();
        assert!(c.observe(0, 0, 0).is_none());
        assert!(c.observe(1, 5, 0).is_none());
    }

    #[tokio::test]
    async fn a_real_meminfo_file_crossing_sends_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        let write = |avail_kib: u64| {
            std::fs::write(&path, format!("MemTotal: 1000000 kB\nMemAvailable: {avail_kib} kB\n")).unwrap();
        };
        write(500_000);
        let lead = Duration::from_millis(100);
        let (src, status) =
            WatermarkSource::start(path.clone(), 0.9, Duration::from_millis(5), 1 << 30, lead);
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
            WatermarkSource::start(dir.path().join("missing"), 0.9, Duration::from_millis(5), 1 << 30, lead);
        assert!(src.is_none() && !status.available && status.reason.contains("cannot read"), "{status:?}");
    }
}
