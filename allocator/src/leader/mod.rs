//! Leader election among allocator replicas on a `coordination.k8s.io/v1`
//! Lease, as Kubernetes' own controllers do it: the holder renews the Lease
//! every `renew_interval`; a replica that sees the same holder and renew time
//! for `lease_duration` (by its own clock: clocks of different nodes are not
//! compared) takes the Lease over; writes carry the resource version they
//! read, so of two replicas racing for it one wins and the other gets a
//! conflict. A leader that could not renew for `renew_deadline` (shorter than
//! the duration) stops serving before anyone else may start.
//!
//! This file is the pure decision ([`Elector`]); [`lease`] does the I/O.

pub mod lease;

use std::time::Duration;

/// The Lease's fields that election reads and writes. Times are wall-clock
/// milliseconds since the epoch, as written by whoever wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub holder: Option<String>,
    pub lease_duration_ms: Option<u64>,
    pub acquire_ms: Option<i64>,
    pub renew_ms: Option<i64>,
    pub transitions: i32,
    /// The object's resourceVersion as read (never written): every write
    /// changes it, so it shows a renewal even when two renew times are
    /// equal to the millisecond.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_interval: Duration,
    pub renew_deadline: Duration,
}

/// What to do after a read of the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// There is no Lease: create it with this record.
    Create(Record),
    /// Write this record over the one read (a renewal, or a takeover).
    Update(Record),
    /// Someone else holds a live Lease.
    Wait,
}

/// One replica's view. `now` arguments are the replica's monotonic clock in
/// ms (only differences matter); `wall_ms` is what goes into the Lease.
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    timing: Timing,
    /// The last record read and when it was first seen as it is.
    seen: Option<(Record, u64)>,
    /// When our last write as holder succeeded.
    renewed_at: Option<u64>,
}

impl Elector {
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Elector { identity: identity.into(), timing, seen: None, renewed_at: None }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes in a read of the Lease (`None`: it does not exist) and decides.
    pub fn observe(&mut self, read: Option<&Record>, now: u64, wall_ms: i64) -> Step {
        let Some(read) = read else {
            self.seen = None;
            self.renewed_at = None;
            return Step::Create(self.claim(None, wall_ms));
        };
        // Only a change of holder, renew time or resourceVersion restarts
        // the expiry clock; our own clock measures it, so skew between nodes
        // cannot matter.
        let changed = self.seen.as_ref().is_none_or(|(r, _)| {
            r.holder != read.holder || r.renew_ms != read.renew_ms || r.version != read.version
        });
        if changed {
            self.seen = Some((read.clone(), now));
        }
        if read.holder.as_deref() == Some(self.identity.as_str()) {
            return Step::Update(self.renewal(read, wall_ms));
        }
        // Someone else holds it (or nobody): we are not leading any more.
        self.renewed_at = None;
        let free = read.holder.as_deref().is_none_or(str::is_empty);
        let since = self.seen.as_ref().map_or(0, |(_, t)| now.saturating_sub(*t));
        let duration =
            read.lease_duration_ms.unwrap_or(vmscale_common::time::millis(self.timing.lease_duration));
        if free || since >= duration {
            Step::Update(self.claim(Some(read), wall_ms))
        } else {
            Step::Wait
        }
    }

    /// Our write of `step`'s record succeeded.
    pub fn wrote(&mut self, record: &Record, now: u64) {
        if record.holder.as_deref() == Some(self.identity.as_str()) {
            self.renewed_at = Some(now);
            self.seen = Some((record.clone(), now));
        }
    }

    /// A write failed or lost a race: nothing changes but time, and
    /// [`is_leader`](Self::is_leader) runs out at the renew deadline.
    pub fn failed(&mut self) {}

    /// Leading: our last successful renewal is younger than the deadline.
    pub fn is_leader(&self, now: u64) -> bool {
        self.renewed_at
            .is_some_and(|t| now.saturating_sub(t) < vmscale_common::time::millis(self.timing.renew_deadline))
    }

    /// The record that hands the Lease back on a clean shutdown: no holder,
    /// so a standby takes it on its next look instead of waiting it out.
    pub fn release(&self, current: &Record, wall_ms: i64) -> Option<Record> {
        (current.holder.as_deref() == Some(self.identity.as_str())).then_some(Record {
            holder: None,
            lease_duration_ms: Some(1000),
            acquire_ms: None,
            renew_ms: Some(wall_ms),
            transitions: current.transitions,
            version: None,
        })
    }

    fn renewal(&self, read: &Record, wall_ms: i64) -> Record {
        Record {
            holder: Some(self.identity.clone()),
            lease_duration_ms: Some(self.duration_ms()),
            acquire_ms: read.acquire_ms.or(Some(wall_ms)),
            renew_ms: Some(wall_ms),
            transitions: read.transitions,
            version: None,
        }
    }

    fn claim(&self, read: Option<&Record>, wall_ms: i64) -> Record {
        let transitions =
            read.map_or(0, |r| if r.holder.is_some() { r.transitions + 1 } else { r.transitions });
        Record {
            holder: Some(self.identity.clone()),
            lease_duration_ms: Some(self.duration_ms()),
            acquire_ms: Some(wall_ms),
            renew_ms: Some(wall_ms),
            transitions,
            version: None,
        }
    }

    fn duration_ms(&self) -> u64 {
        // The Lease holds whole seconds; round up so nobody expires us early.
        vmscale_common::time::millis(self.timing.lease_duration).div_ceil(1000).saturating_mul(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(7),
        }
    }

    fn held(by: &str, renew_ms: i64) -> Record {
        Record {
            holder: Some(by.into()),
            lease_duration_ms: Some(10_000),
            acquire_ms: Some(0),
            renew_ms: Some(renew_ms),
            transitions: 3,
            version: None,
        }
    }

    #[test]
    fn no_lease_creates_it() {
        let mut e = Elector::new("a", timing());
        let Step::Create(r) = e.observe(None, 0, 1_000) else { panic!() };
        assert_eq!(r.holder.as_deref(), Some("a"));
        assert_eq!((r.transitions, r.renew_ms, r.acquire_ms), (0, Some(1_000), Some(1_000)));
        assert!(!e.is_leader(0));
        e.wrote(&r, 5);
        assert!(e.is_leader(5));
    }

    #[test]
    fn a_live_holder_is_waited_out_by_our_own_clock() {
        let mut e = Elector::new("b", timing());
        // The holder's wall clock is far off ours: it does not matter.
        let r = held("a", 999_999_999);
        assert_eq!(e.observe(Some(&r), 100, 0), Step::Wait);
        assert_eq!(e.observe(Some(&r), 9_000, 0), Step::Wait);
        // Renewed at 9 s: the clock starts again.
        let r2 = held("a", 1_000_000_001);
        assert_eq!(e.observe(Some(&r2), 9_100, 0), Step::Wait);
        assert_eq!(e.observe(Some(&r2), 19_000, 0), Step::Wait);
        let Step::Update(t) = e.observe(Some(&r2), 19_100, 42) else { panic!("expired") };
        assert_eq!(t.holder.as_deref(), Some("b"));
        assert_eq!((t.transitions, t.acquire_ms, t.renew_ms), (4, Some(42), Some(42)));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut e = Elector::new("b", timing());
        let a = Elector::new("a", timing());
        let released = a.release(&held("a", 5), 6).unwrap();
        assert_eq!(released.holder, None);
        let Step::Update(t) = e.observe(Some(&released), 0, 7) else { panic!() };
        assert_eq!((t.holder.as_deref(), t.transitions), (Some("b"), 3));
        assert_eq!(a.release(&held("c", 5), 6), None, "only the holder releases");
    }

    #[test]
    fn a_new_resource_version_counts_as_a_renewal() {
        let mut e = Elector::new("b", timing());
        // Two renewals within one millisecond of wall time: same renewTime.
        let v = |n: &str| Record { version: Some(n.into()), ..held("a", 5) };
        assert_eq!(e.observe(Some(&v("1")), 0, 0), Step::Wait);
        assert_eq!(e.observe(Some(&v("2")), 9_000, 0), Step::Wait);
        assert_eq!(e.observe(Some(&v("2")), 18_000, 0), Step::Wait);
        assert!(matches!(e.observe(Some(&v("2")), 19_000, 0), Step::Update(_)));
    }

    #[test]
    fn the_holder_renews_and_keeps_its_acquire_time() {
        let mut e = Elector::new("a", timing());
        let r = held("a", 5);
        let Step::Update(t) = e.observe(Some(&r), 0, 2_000) else { panic!() };
        assert_eq!((t.acquire_ms, t.renew_ms, t.transitions), (Some(0), Some(2_000), 3));
        e.wrote(&t, 10);
        assert!(e.is_leader(16_999 - 10_000));
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_before_the_lease_runs_out() {
        let mut e = Elector::new("a", timing());
        let Step::Create(r) = e.observe(None, 0, 0) else { panic!() };
        e.wrote(&r, 0);
        e.failed();
        assert!(e.is_leader(6_999));
        assert!(!e.is_leader(7_000), "deadline 7 s < lease 10 s: no overlap with a successor");
    }

    #[test]
    fn seeing_another_holder_ends_leadership_at_once() {
        let mut e = Elector::new("a", timing());
        let Step::Create(r) = e.observe(None, 0, 0) else { panic!() };
        e.wrote(&r, 0);
        assert_eq!(e.observe(Some(&held("b", 1)), 1_000, 1), Step::Wait);
        assert!(!e.is_leader(1_000));
    }

    #[test]
    fn the_lease_holds_whole_seconds_rounded_up() {
        let t = Timing { lease_duration: Duration::from_millis(2_500), ..timing() };
        let mut e = Elector::new("a", t);
        let Step::Create(r) = e.observe(None, 0, 0) else { panic!() };
        assert_eq!(r.lease_duration_ms, Some(3_000));
    }
}
