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
//! for safety, between `min_interval` and `max_interval_ms`: every 10 ms close
//! to the line, a few times a second far from it; sooner when use is growing
//! and its projection nears the line; every `min_interval` while memory is
//! on its way, to time its arrival.
//!
//! Every threshold here is a field of `Tuning` (the config's
//! `[watermark_tuning]`), checked by `Tuning::validate`; the constants are
//! its defaults.

use crate::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use crate::procfs;
use crate::source::{Source, SourceStatus};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vmscale_common::config::ConfigError;

// The defaults of `Tuning`'s fields (what each does is documented there).

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

const NS_PER_MS: u64 = 1_000_000;

/// The watermark's thresholds: pacing of the reads, the growth projection
/// and the learned lead. The defaults are the constants above; the fields
/// are here for guests whose memory arrives much slower, or whose
/// workloads grow very differently, than the defaults assume.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// How far under the use at the last event use must fall before another
    /// crossing counts, as a fraction of MemTotal, above 0 and below 0.5:
    /// use wobbling around the line sends one event, not one per read.
    /// Default 0.02.
    pub rearm_margin: f64,
    /// The longest wait between two reads of `/proc/meminfo`, however far
    /// use is from the watermark, milliseconds, 1 to 10000. Default 250.
    pub max_interval_ms: u64,
    /// Use's growth rate is taken over the readings of this last span,
    /// milliseconds, 1 to 60000; also how long a chunk of allocation
    /// (`step_span_ms`) is remembered. Default 500.
    pub rate_window_ms: u64,
    /// Readings closer together than this give no rate (one chunk of a
    /// workload's allocation is not a ramp), milliseconds, 1 to
    /// `rate_window_ms`. Default 20.
    pub min_rate_span_ms: u64,
    /// A chunk of allocation is a rise of use within this span,
    /// milliseconds, 1 to `rate_window_ms`; the event goes when one more
    /// chunk like the largest recent one would pass the line. Default 50.
    pub step_span_ms: u64,
    /// The learned lead is at least this, milliseconds, 0 to
    /// `max_lead_ms`. Default 20.
    pub min_lead_ms: u64,
    /// The learned lead (and the configured `watermark_lead_ms`) is at most
    /// this, milliseconds, 1 to 60000. Default 1000.
    pub max_lead_ms: u64,
    /// Memory that took longer than this after an event was held up
    /// elsewhere (a full node, a denied permit): not a plug's time, not
    /// learned, and no longer awaited, milliseconds, 1 to 600000.
    /// Default 2000.
    pub max_arrival_ms: u64,
    /// How many arrivals the lead remembers; it leads by the slowest, 1 to
    /// 64. Default 8.
    pub arrivals: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            rearm_margin: REARM_MARGIN,
            max_interval_ms: u64::try_from(MAX_INTERVAL.as_millis()).unwrap_or(u64::MAX),
            rate_window_ms: RATE_WINDOW_NS / NS_PER_MS,
            min_rate_span_ms: MIN_RATE_SPAN_NS / NS_PER_MS,
            step_span_ms: STEP_SPAN_NS / NS_PER_MS,
            min_lead_ms: MIN_LEAD_NS / NS_PER_MS,
            max_lead_ms: MAX_LEAD_NS / NS_PER_MS,
            max_arrival_ms: MAX_ARRIVAL_NS / NS_PER_MS,
            arrivals: ARRIVALS,
        }
    }
}

impl Tuning {
    /// The one check of every field. Errors name the field as it is spelt
    /// in the section (the config adds the section's name) and the range
    /// that would do; the upper bounds keep every time far from
    /// overflowing in nanoseconds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: &dyn std::fmt::Display, reason: String| {
            Err(ConfigError::invalid(field, value, reason))
        };
        // Written so that NaN fails too.
        if !(self.rearm_margin > 0.0 && self.rearm_margin < 0.5) {
            return bad(
                "rearm_margin",
                &self.rearm_margin,
                "must be above 0 and below 0.5 (a fraction of MemTotal, e.g. 0.02)".into(),
            );
        }
        let within = |field, value: u64, low: u64, high: u64, why: &str| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                bad(field, &value, format!("must be within {low}..={high} ms{why}"))
            }
        };
        within("max_interval_ms", self.max_interval_ms, 1, 10_000, "")?;
        within("rate_window_ms", self.rate_window_ms, 1, 60_000, "")?;
        let in_window = " (at most rate_window_ms: older readings are forgotten)";
        within("min_rate_span_ms", self.min_rate_span_ms, 1, self.rate_window_ms, in_window)?;
        within("step_span_ms", self.step_span_ms, 1, self.rate_window_ms, in_window)?;
        within("max_lead_ms", self.max_lead_ms, 1, 60_000, "")?;
        within("min_lead_ms", self.min_lead_ms, 0, self.max_lead_ms, " (at most max_lead_ms)")?;
        within("max_arrival_ms", self.max_arrival_ms, 1, 600_000, "")?;
        if !(1..=64).contains(&self.arrivals) {
            return bad("arrivals", &self.arrivals, "must be within 1..=64".into());
        }
        Ok(())
    }
}

/// `Tuning` with its times in nanoseconds, converted once (saturating:
/// an unvalidated tuning is still no overflow).
#[derive(Debug, Clone, Copy, PartialEq)]
struct TuningNs {
    rearm_margin: f64,
    max_interval: Duration,
    rate_window_ns: u64,
    min_rate_span_ns: u64,
    step_span_ns: u64,
    min_lead_ns: u64,
    max_lead_ns: u64,
    max_arrival_ns: u64,
    arrivals: usize,
}

impl From<&Tuning> for TuningNs {
    fn from(t: &Tuning) -> Self {
        let ns = |ms: u64| ms.saturating_mul(NS_PER_MS);
        TuningNs {
            rearm_margin: t.rearm_margin,
            max_interval: Duration::from_millis(t.max_interval_ms),
            rate_window_ns: ns(t.rate_window_ms),
            min_rate_span_ns: ns(t.min_rate_span_ms),
            step_span_ns: ns(t.step_span_ms),
            min_lead_ns: ns(t.min_lead_ms),
            // `max` keeps `clamp` from panicking on an unvalidated tuning.
            max_lead_ns: ns(t.max_lead_ms).max(ns(t.min_lead_ms)),
            max_arrival_ns: ns(t.max_arrival_ms),
            arrivals: t.arrivals.max(1),
        }
    }
}

/// When to read next: half the time use needs to reach the watermark at
/// `max_ramp_bytes_per_s`, within `[min, MAX_INTERVAL]`; no later than half
/// the time until use, at `rate_bytes_per_s`, comes within `lead` of it.
/// Past the watermark (waiting to re-arm), `min`: new memory coming online
/// must be seen soon. With the default cap; `Crossing::next_interval` uses
/// its tuning's.
pub fn next_interval(
    used: u64,
    total: u64,
    fraction: f64,
    max_ramp_bytes_per_s: u64,
    min: Duration,
    rate_bytes_per_s: f64,
    lead: Duration,
) -> Duration {
    uncapped_interval(used, total, fraction, max_ramp_bytes_per_s, min, rate_bytes_per_s, lead)
        .clamp(min, MAX_INTERVAL.max(min))
}

/// `next_interval` before the cap: at least `min`, or `min` at once.
fn uncapped_interval(
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
    Duration::from_secs_f64(secs).max(min)
}

/// How far ahead of the line the event goes: `initial`, or the slowest of
/// the last `arrivals` arrivals when memory took longer, within
/// `[min_lead_ms, max_lead_ms]` (the tuning's). Learning only ever raises the lead: an
/// arrival can be quicker than a plug (memory another signal asked for
/// was already on its way), never slower. A lead of zero turns prediction
/// off: events go at the line and nothing is learned.
#[derive(Debug, Clone)]
pub struct Lead {
    initial_ns: u64,
    arrivals: VecDeque<u64>,
    /// Every threshold of the crossing that holds this lead, too: one
    /// tuning for both.
    t: TuningNs,
}

impl Lead {
    /// With the default tuning.
    pub fn new(initial: Duration) -> Self {
        Lead::tuned(initial, &Tuning::default())
    }

    pub fn tuned(initial: Duration, tuning: &Tuning) -> Self {
        let t = TuningNs::from(tuning);
        let initial_ns = u64::try_from(initial.as_nanos()).unwrap_or(t.max_lead_ns);
        Lead { initial_ns, arrivals: VecDeque::with_capacity(t.arrivals), t }
    }

    pub fn enabled(&self) -> bool {
        self.initial_ns > 0
    }

    pub fn ns(&self) -> u64 {
        if !self.enabled() {
            return 0;
        }
        let slowest = self.arrivals.iter().copied().max().unwrap_or(0);
        slowest.max(self.initial_ns).clamp(self.t.min_lead_ns, self.t.max_lead_ns)
    }

    fn arrived(&mut self, after_ns: u64) {
        if !self.enabled() || after_ns > self.t.max_arrival_ns {
            return;
        }
        if self.arrivals.len() >= self.t.arrivals {
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
    /// Its thresholds are the lead's tuning (`Lead::tuned`; `Lead::new`
    /// for the defaults).
    pub fn new(fraction: f64, lead: Lead) -> Self {
        Crossing { fraction, fired: None, recent: VecDeque::new(), lead }
    }

    /// `next_interval` for this crossing's watermark, growth rate and lead,
    /// capped at its tuning's `max_interval_ms`.
    pub fn next_interval(&self, used: u64, total: u64, max_ramp_bytes_per_s: u64, min: Duration) -> Duration {
        let rate = self.rate_bytes_per_s();
        uncapped_interval(used, total, self.fraction, max_ramp_bytes_per_s, min, rate, self.lead())
            .clamp(min, self.lead.t.max_interval.max(min))
    }

    /// The largest rise of use within `step_span_ms` over the last
    /// `rate_window_ms`, bytes: a workload that allocates in chunks (4 MiB
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
                .filter(|&&(ti, _)| tj.saturating_sub(ti) <= self.lead.t.step_span_ns)
                .map(|&(_, ui)| ui)
                .min()
                .unwrap_or(uj);
            step = step.max(uj.saturating_sub(low));
        }
        step
    }

    /// Use's growth over the last `rate_window_ms` of readings, bytes/s; 0
    /// when falling, flat or too few readings.
    pub fn rate_bytes_per_s(&self) -> f64 {
        let (Some(&(t0, u0)), Some(&(t1, u1))) = (self.recent.front(), self.recent.back()) else {
            return 0.0;
        };
        let span = t1.saturating_sub(t0);
        if span < self.lead.t.min_rate_span_ns || u1 <= u0 {
            return 0.0;
        }
        (u1 - u0) as f64 / (span as f64 / 1e9)
    }

    pub fn lead(&self) -> Duration {
        Duration::from_nanos(self.lead.ns())
    }

    /// An event went out and memory has not come yet (for at most
    /// `max_arrival_ms`): its arrival is being timed.
    pub fn awaiting(&self, now_ns: u64) -> bool {
        let within = |f: Fired| now_ns.saturating_sub(f.at_ns) <= self.lead.t.max_arrival_ns;
        self.lead.enabled() && self.fired.is_some_and(within)
    }

    /// `Some` when this reading passes the watermark, or is projected to
    /// within the lead, and the last event was re-armed since.
    pub fn observe(&mut self, now_ns: u64, used: u64, total: u64) -> Option<Fire> {
        if total == 0 {
            return None;
        }
        if self.lead.enabled() {
            while self
                .recent
                .front()
                .is_some_and(|&(t, _)| now_ns.saturating_sub(t) > self.lead.t.rate_window_ns)
            {
                self.recent.pop_front();
            }
            self.recent.push_back((now_ns, used));
        }
        if let Some(f) = self.fired {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let margin = (total as f64 * self.lead.t.rearm_margin) as u64;
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
    tuning: Tuning,
}

impl WatermarkSource {
    /// `start_tuned` with the default tuning.
    pub fn start(
        meminfo: PathBuf,
        fraction: f64,
        interval: Duration,
        max_ramp_bytes_per_s: u64,
        lead: Duration,
    ) -> (Option<Self>, SourceStatus) {
        Self::start_tuned(meminfo, fraction, interval, max_ramp_bytes_per_s, lead, Tuning::default())
    }

    /// Checks that `/proc/meminfo` reads and parses here.
    /// `interval` is the shortest time between reads; `max_ramp_bytes_per_s`
    /// the fastest growth of use the reads must keep up with; `lead` how
    /// far ahead of the line events go at least, longer when arrivals were
    /// slower (zero: at the line, nothing learned); `tuning` every other
    /// threshold, validated by the caller (`Tuning::validate`).
    pub fn start_tuned(
        meminfo: PathBuf,
        fraction: f64,
        interval: Duration,
        max_ramp_bytes_per_s: u64,
        lead: Duration,
        tuning: Tuning,
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
                    ?tuning,
                    "usage watermark armed"
                );
                let s = WatermarkSource { meminfo, fraction, interval, max_ramp_bytes_per_s, lead, tuning };
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
    let mut crossing = Crossing::new(s.fraction, Lead::tuned(s.lead, &s.tuning));
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
            wait = crossing.lead.t.max_interval;
            continue;
        };
        failing = false;
        let now = monotonic_ns();
        let used = m.total_bytes.saturating_sub(m.available_bytes);
        let fire = crossing.observe(now, used, m.total_bytes);
        wait = if crossing.awaiting(now) {
            s.interval
        } else {
            crossing.next_interval(used, m.total_bytes, s.max_ramp_bytes_per_s, s.interval)
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

    #[test]
    fn the_default_tuning_is_the_constants() {
        let t = TuningNs::from(&Tuning::default());
        assert_eq!(t.max_interval, MAX_INTERVAL);
        assert_eq!(
            (t.rate_window_ns, t.min_rate_span_ns, t.step_span_ns),
            (RATE_WINDOW_NS, MIN_RATE_SPAN_NS, STEP_SPAN_NS)
        );
        assert_eq!(
            (t.min_lead_ns, t.max_lead_ns, t.max_arrival_ns),
            (MIN_LEAD_NS, MAX_LEAD_NS, MAX_ARRIVAL_NS)
        );
        assert_eq!((t.rearm_margin, t.arrivals), (REARM_MARGIN, ARRIVALS));
        assert_eq!(Tuning::default().validate().map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn a_tuning_changes_the_lead_and_the_pacing() {
        // Memory arriving 400 ms after an event: learned up to 1 s by
        // default, capped at 150 ms here.
        let capped = Tuning { max_lead_ms: 150, ..Tuning::default() };
        let mut l = Lead::tuned(Duration::from_millis(100), &capped);
        l.arrived(400 * MS);
        assert_eq!(l.ns(), 150 * MS);
        let mut l = Lead::new(Duration::from_millis(100));
        l.arrived(400 * MS);
        assert_eq!(l.ns(), 400 * MS);
        // One arrival remembered: a quick one forgets the slow one.
        let mut l = Lead::tuned(Duration::from_millis(100), &Tuning { arrivals: 1, ..Tuning::default() });
        l.arrived(300 * MS);
        assert_eq!(l.ns(), 300 * MS);
        l.arrived(MS);
        assert_eq!(l.ns(), 100 * MS);
        // The crossing takes its lead's tuning: a 3 s arrival is learned
        // when `max_arrival_ms` allows it...
        let slow = Tuning { max_arrival_ms: 5_000, max_lead_ms: 5_000, ..Tuning::default() };
        let mut c = Crossing::new(0.9, Lead::tuned(Duration::from_millis(100), &slow));
        let total = 1000 * MIB;
        assert!(c.observe(0, 950 * MIB, total).is_some());
        assert!(c.awaiting(3_000 * MS));
        assert!(c.observe(3_000 * MS, 950 * MIB, total + 128 * MIB).is_none());
        assert_eq!(c.lead(), Duration::from_secs(3));
        // ...and far from the line, reads wait up to its `max_interval_ms`.
        let c = Crossing::new(0.9, Lead::tuned(Duration::ZERO, &Tuning { max_interval_ms: 40, ..slow }));
        assert_eq!(c.next_interval(300 * MIB, total, 1024 * MIB, MS_10), Duration::from_millis(40));
        let c = Crossing::new(0.9, Lead::new(Duration::ZERO));
        assert_eq!(c.next_interval(300 * MIB, total, 1024 * MIB, MS_10), MAX_INTERVAL);
    }

    const MS_10: Duration = Duration::from_millis(10);

    #[test]
    fn a_bad_tuning_is_refused_naming_the_field() {
        let d = Tuning::default();
        for (t, field, says) in [
            (Tuning { rearm_margin: 0.0, ..d }, "rearm_margin", "above 0 and below 0.5"),
            (Tuning { rearm_margin: f64::NAN, ..d }, "rearm_margin", "above 0"),
            (Tuning { max_interval_ms: 0, ..d }, "max_interval_ms", "1..=10000"),
            (Tuning { rate_window_ms: u64::MAX, ..d }, "rate_window_ms", "1..=60000"),
            (Tuning { min_rate_span_ms: 600, ..d }, "min_rate_span_ms", "at most rate_window_ms"),
            (Tuning { step_span_ms: 0, ..d }, "step_span_ms", "1..=500"),
            (Tuning { min_lead_ms: 2_000, ..d }, "min_lead_ms", "at most max_lead_ms"),
            (Tuning { max_lead_ms: 0, ..d }, "max_lead_ms", "1..=60000"),
            (Tuning { max_arrival_ms: 0, ..d }, "max_arrival_ms", "1..=600000"),
            (Tuning { arrivals: 0, ..d }, "arrivals", "1..=64"),
            (Tuning { arrivals: 65, ..d }, "arrivals", "1..=64"),
        ] {
            let e = t.validate().expect_err(field).to_string();
            assert!(e.contains(field) && e.contains(says), "{field}: {e}");
        }
        // Unvalidated, it still neither overflows nor panics.
        let wild = Tuning { min_lead_ms: u64::MAX, max_lead_ms: 1, arrivals: 0, ..d };
        let mut l = Lead::tuned(Duration::from_millis(100), &wild);
        l.arrived(MS);
        assert_eq!(l.ns(), u64::MAX);
    }
}
