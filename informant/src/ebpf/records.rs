//! Kernel records to events: the pure part of the eBPF source.
//!
//! The programs send cumulative totals per kind (see
//! `vmscale_ebpf_common::Record`); the [`Tracker`] remembers what it has
//! already reported and turns each record, or a read of the state map, into
//! an event carrying only what is new. A record that brings nothing new
//! (overtaken by a later one or by a state read) gives no event.

use vmscale_ebpf_common::{Kind, KindState, Record, KIND_COUNT};

use crate::event::{Event, EventBody, Pressure, PressureKind, SourceKind};

/// What has been reported of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    count: u64,
    stall_ns: u64,
    dropped: u64,
}

/// Per kind, the totals reported so far.
#[derive(Debug, Default)]
pub struct Tracker {
    seen: [Seen; KIND_COUNT as usize],
}

/// What one record or state read adds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    pub event: Option<Event>,
    /// Records the kernel could not queue since the previous update.
    pub newly_dropped: u64,
}

impl Tracker {
    /// A record from the ring buffer; the event is stamped with the
    /// record's kernel time. `None` for a record of an unknown kind (an
    /// object newer than this binary).
    pub fn record(&mut self, r: &Record) -> Option<Update> {
        let kind = Kind::from_u32(r.kind)?;
        Some(self.advance(kind, r.count, r.stall_ns, r.dropped, r.ts_ns, r.pid))
    }

    /// A read of one kind's state map entry at `now_ns`: what the last
    /// window of a burst left behind. The event is stamped `now_ns` and
    /// names no process (the state doesn't keep one).
    pub fn state(&mut self, kind: Kind, s: &KindState, now_ns: u64) -> Update {
        self.advance(kind, s.count, s.stall_ns, s.dropped, now_ns, 0)
    }

    fn advance(
        &mut self,
        kind: Kind,
        count: u64,
        stall_ns: u64,
        dropped: u64,
        ts_ns: u64,
        pid: u32,
    ) -> Update {
        let seen = &mut self.seen[kind as usize];
        let d_count = count.saturating_sub(seen.count);
        let d_stall = stall_ns.saturating_sub(seen.stall_ns);
        let newly_dropped = dropped.saturating_sub(seen.dropped);
        seen.count = seen.count.max(count);
        seen.stall_ns = seen.stall_ns.max(stall_ns);
        seen.dropped = seen.dropped.max(dropped);
        let event = (d_count > 0 || d_stall > 0).then(|| Event {
            monotonic_ns: ts_ns,
            source: SourceKind::Ebpf,
            body: EventBody::Pressure(Pressure {
                kind: pressure_kind(kind),
                count: u32::try_from(d_count).unwrap_or(u32::MAX),
                stall_ns: d_stall,
                pid,
            }),
        });
        Update { event, newly_dropped }
    }
}

pub fn pressure_kind(kind: Kind) -> PressureKind {
    match kind {
        Kind::DirectReclaim => PressureKind::DirectReclaim,
        Kind::MemcgReclaim => PressureKind::MemcgReclaim,
        Kind::KswapdWake => PressureKind::KswapdWake,
        Kind::OomVictim => PressureKind::OomVictim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, ts: u64, count: u64, stall: u64, pid: u32) -> Record {
        Record { ts_ns: ts, count, stall_ns: stall, reclaimed_pages: 0, dropped: 0, kind: kind as u32, pid }
    }

    fn pressure(u: &Update) -> Option<(u64, Pressure)> {
        match u.event? {
            Event { monotonic_ns, source: SourceKind::Ebpf, body: EventBody::Pressure(p) } => {
                Some((monotonic_ns, p))
            }
            _ => None,
        }
    }

    #[test]
    fn a_burst_reports_each_window_then_the_tail() {
        let mut t = Tracker::default();
        let k = Kind::MemcgReclaim;
        // First begin of a quiet spell: emitted at once, no stall yet.
        let u = t.record(&rec(k, 100, 1, 0, 42)).unwrap();
        let (ts, p) = pressure(&u).unwrap();
        assert_eq!((ts, p.kind, p.count, p.stall_ns, p.pid), (100, PressureKind::MemcgReclaim, 1, 0, 42));
        // Next window: 40 more begins, 3 ms of stall.
        let (_, p) = pressure(&t.record(&rec(k, 10_100, 41, 3_000_000, 42)).unwrap()).unwrap();
        assert_eq!((p.count, p.stall_ns), (40, 3_000_000));
        // The tail, read from the state map.
        let s = KindState { count: 45, stall_ns: 3_500_000, ..KindState::default() };
        let (ts, p) = pressure(&t.state(k, &s, 25_000)).unwrap();
        assert_eq!((ts, p.count, p.stall_ns, p.pid), (25_000, 4, 500_000, 0));
        // Nothing new: no event.
        assert_eq!(t.state(k, &s, 30_000).event, None);
    }

    #[test]
    fn a_record_overtaken_by_a_state_read_adds_nothing() {
        let mut t = Tracker::default();
        let k = Kind::DirectReclaim;
        let s = KindState { count: 10, stall_ns: 7, ..KindState::default() };
        assert!(t.state(k, &s, 50).event.is_some());
        // A record from another CPU with older totals arrives late.
        assert_eq!(t.record(&rec(k, 40, 9, 5, 1)).unwrap().event, None);
        // Only the part beyond what was seen counts.
        let (_, p) = pressure(&t.record(&rec(k, 60, 12, 7, 1)).unwrap()).unwrap();
        assert_eq!((p.count, p.stall_ns), (2, 0));
    }

    #[test]
    fn kinds_are_tracked_apart_and_oom_victims_carry_their_pid() {
        let mut t = Tracker::default();
        assert!(t.record(&rec(Kind::KswapdWake, 1, 5, 0, 9)).unwrap().event.is_some());
        let (_, p) = pressure(&t.record(&rec(Kind::OomVictim, 2, 1, 0, 4242)).unwrap()).unwrap();
        assert_eq!((p.kind, p.count, p.pid), (PressureKind::OomVictim, 1, 4242));
        let (_, p) = pressure(&t.record(&rec(Kind::OomVictim, 3, 2, 0, 4343)).unwrap()).unwrap();
        assert_eq!((p.count, p.pid), (1, 4343));
    }

    #[test]
    fn drops_are_reported_once() {
        let mut t = Tracker::default();
        let mut r = rec(Kind::MemcgReclaim, 1, 1, 0, 1);
        r.dropped = 3;
        assert_eq!(t.record(&r).unwrap().newly_dropped, 3);
        r.count = 2;
        assert_eq!(t.record(&r).unwrap().newly_dropped, 0);
    }

    #[test]
    fn unknown_kinds_are_ignored() {
        let mut t = Tracker::default();
        let mut r = rec(Kind::MemcgReclaim, 1, 1, 0, 1);
        r.kind = 99;
        assert_eq!(t.record(&r), None);
    }
}
