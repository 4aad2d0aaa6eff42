//! The target's side of a move as a lifecycle, kept apart from the I/O that
//! drives it: [`TargetState`] with the one function that says which steps
//! an order may take on this node, [`Moves`] (the orders this node holds,
//! changed only through that function) and [`Authorised`] (the orders the
//! allocator pushed naming this node the target).

use std::collections::{BTreeMap, HashMap};

/// How many authorised orders are remembered. The allocator pushes a few
/// per move; the oldest (lowest id) go first, so the table never grows
/// without bound however long the agent runs.
pub const MAX_AUTHORISED_ORDERS: usize = 1024;

/// Where one order stands on the target node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Never prepared here, or its QEMU is gone again.
    Absent,
    /// Its incoming QEMU is being started.
    Starting,
    /// The QEMU waits, paused, for the stream and the source's confirm.
    Prepared,
    /// The confirm arrived: the guest is being resumed here.
    Confirming,
    /// The guest runs here.
    Running,
}

/// A step the target's lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("order {order} cannot go from {from:?} to {to:?} on the target")]
pub struct BadTargetTransition {
    pub order: u64,
    pub from: TargetState,
    pub to: TargetState,
}

impl TargetState {
    /// The one place that says which steps an order may take here. Only
    /// a confirm makes the guest run here, and a guest that runs here is
    /// never thrown away by this table: `Running` is final.
    pub fn transition(self, to: TargetState, order: u64) -> Result<TargetState, BadTargetTransition> {
        use TargetState::*;
        match (self, to) {
            // prepare: start the QEMU; it listens, or it did not start.
            (Absent, Starting)
            | (Starting, Prepared | Absent)
            // the source confirms, or aborts, or never comes back.
            | (Prepared, Confirming | Absent)
            // the guest runs here, or did not resume and its QEMU is killed.
            | (Confirming, Running | Absent)
            // after a restart: a guest confirmed here, read from its record.
            | (Absent, Running) => Ok(to),
            _ => Err(BadTargetTransition { order, from: self, to }),
        }
    }
}

/// One order on the target with what its state holds; `P` is what a
/// prepared order keeps until it is confirmed or thrown away (its spec and
/// QEMU).
#[derive(Debug)]
pub enum Move<P> {
    Starting,
    Prepared(P),
    Confirming,
    Running { vm: String },
}

impl<P> Move<P> {
    pub fn state(&self) -> TargetState {
        match self {
            Move::Starting => TargetState::Starting,
            Move::Prepared(_) => TargetState::Prepared,
            Move::Confirming => TargetState::Confirming,
            Move::Running { .. } => TargetState::Running,
        }
    }
}

/// The orders this node holds as a target.
#[derive(Debug)]
pub struct Moves<P> {
    by_order: HashMap<u64, Move<P>>,
}

impl<P> Default for Moves<P> {
    fn default() -> Self {
        Self { by_order: HashMap::new() }
    }
}

impl<P> Moves<P> {
    pub fn state(&self, order: u64) -> TargetState {
        self.by_order.get(&order).map_or(TargetState::Absent, Move::state)
    }

    /// Moves `order` to `to` (`None`: absent) if the lifecycle allows it,
    /// and returns what the order held before.
    pub fn step(&mut self, order: u64, to: Option<Move<P>>) -> Result<Option<Move<P>>, BadTargetTransition> {
        let next = to.as_ref().map_or(TargetState::Absent, Move::state);
        self.state(order).transition(next, order)?;
        Ok(match to {
            Some(m) => self.by_order.insert(order, m),
            None => self.by_order.remove(&order),
        })
    }

    /// What a prepared order holds, taken as it steps to `to`; `None` (and
    /// no change) if the order is not prepared.
    pub fn take_prepared(&mut self, order: u64, to: Option<Move<P>>) -> Option<P> {
        if self.state(order) != TargetState::Prepared {
            return None;
        }
        match self.step(order, to) {
            Ok(Some(Move::Prepared(p))) => Some(p),
            _ => None,
        }
    }
}

/// Orders the allocator pushed naming this node the target, with their VM.
#[derive(Debug, Default)]
pub struct Authorised {
    by_order: BTreeMap<u64, String>,
}

impl Authorised {
    pub fn insert(&mut self, order: u64, vm: &str) {
        self.by_order.insert(order, vm.to_owned());
        while self.by_order.len() > MAX_AUTHORISED_ORDERS {
            self.by_order.pop_first();
        }
    }

    pub fn contains(&self, order: u64) -> bool {
        self.by_order.contains_key(&order)
    }

    /// Whether `order` is authorised, and for `vm`.
    pub fn names(&self, order: u64, vm: &str) -> bool {
        self.by_order.get(&order).is_some_and(|v| v == vm)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::TargetState::{self, *};
    use super::*;

    const ALL: [TargetState; 5] = [Absent, Starting, Prepared, Confirming, Running];

    #[test]
    fn every_transition_pair() {
        let allowed = [
            (Absent, Starting),
            (Starting, Prepared),
            (Starting, Absent),
            (Prepared, Confirming),
            (Prepared, Absent),
            (Confirming, Running),
            (Confirming, Absent),
            (Absent, Running),
        ];
        for from in ALL {
            for to in ALL {
                let got = from.transition(to, 7);
                if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(to), "{from:?} -> {to:?}");
                } else {
                    assert_eq!(got, Err(BadTargetTransition { order: 7, from, to }), "{from:?} -> {to:?}");
                }
            }
        }
    }

    #[test]
    fn the_table_changes_only_along_the_lifecycle() {
        let mut moves = Moves::<&str>::default();
        assert_eq!(moves.state(1), Absent);
        // Not prepared: nothing to take, nothing changes.
        assert_eq!(moves.take_prepared(1, None), None);
        assert!(moves.step(1, Some(Move::Confirming)).is_err());
        assert!(moves.step(1, Some(Move::Starting)).unwrap().is_none());
        assert_eq!(moves.take_prepared(1, None), None, "still starting");
        assert!(moves.step(1, Some(Move::Starting)).is_err(), "a second prepare of the order is refused");
        moves.step(1, Some(Move::Prepared("qemu"))).unwrap();
        assert_eq!(moves.take_prepared(1, Some(Move::Confirming)), Some("qemu"));
        assert_eq!(moves.state(1), Confirming);
        assert_eq!(moves.take_prepared(1, None), None, "a confirm under way is not aborted");
        moves.step(1, Some(Move::Running { vm: "vm1".into() })).unwrap();
        assert!(moves.step(1, None).is_err(), "a guest running here is never dropped");
        assert_eq!(moves.state(1), Running);
        // After a restart, read back from the VM's record.
        moves.step(2, Some(Move::Running { vm: "vm2".into() })).unwrap();
        assert_eq!(moves.state(2), Running);
    }

    #[test]
    fn authorisations_name_their_vm_and_the_oldest_go_first() {
        let mut a = Authorised::default();
        a.insert(7, "vm2");
        assert!(a.contains(7) && !a.names(7, "vm1") && a.names(7, "vm2"));
        for order in 100..100 + MAX_AUTHORISED_ORDERS as u64 {
            a.insert(order, "vm");
        }
        assert!(!a.contains(7), "the oldest order went");
        assert!(a.contains(100) && a.contains(99 + MAX_AUTHORISED_ORDERS as u64));
        assert_eq!(a.by_order.len(), MAX_AUTHORISED_ORDERS);
    }
}
