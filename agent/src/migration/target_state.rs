//! The target's side of a move as a lifecycle, kept apart from the I/O that
//! drives it: [`TargetState`] with the one function that says which steps
//! an order may take on this node, [`Moves`] (the orders this node holds,
//! changed only through that function, each with the node that prepared
//! it), [`Authorised`] (the orders the allocator pushed naming this node the
//! target, each good for one prepare) and [`Caller`] (who sent a request).

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

/// The orders this node holds as a target, and the source node of each:
/// only that node's agent hears about or changes the order.
#[derive(Debug)]
pub struct Moves<P> {
    by_order: HashMap<u64, Move<P>>,
    sources: HashMap<u64, String>,
}

impl<P> Default for Moves<P> {
    fn default() -> Self {
        Self { by_order: HashMap::new(), sources: HashMap::new() }
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
            None => {
                self.sources.remove(&order);
                self.by_order.remove(&order)
            }
        })
    }

    /// Names the node whose agent prepared `order` (or, after a restart,
    /// whose guest runs here under it).
    pub fn set_source(&mut self, order: u64, node: &str) {
        self.sources.insert(order, node.to_owned());
    }

    /// Drops a running order read back after a restart that, as its VM's
    /// record shows, never ran here after all (the one way out of
    /// `Running`, and only before anyone was told about it).
    pub fn forget_running(&mut self, order: u64) {
        if self.state(order) == TargetState::Running {
            self.by_order.remove(&order);
            self.sources.remove(&order);
        }
    }

    pub fn source(&self, order: u64) -> Option<&str> {
        self.sources.get(&order).map(String::as_str)
    }

    /// Whether `caller` may ask about or change `order`: its source node, or
    /// anyone for an order this node does not hold (it learns only "none").
    /// An empty source (a record from before sources were kept) is anyone's.
    pub fn may_ask(&self, order: u64, caller: &Caller) -> bool {
        match self.sources.get(&order) {
            Some(source) => source.is_empty() || caller.is_node(source),
            None => true,
        }
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

/// Who sent a request, as far as its link can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A link without TLS (`insecure = true`): anyone may be calling.
    Anyone,
    /// The node names in the caller's certificate (none: not a node's).
    Nodes(Vec<String>),
}

impl Caller {
    pub fn is_node(&self, node: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Nodes(names) => names.iter().any(|n| n == node),
        }
    }
}

/// What the allocator's order allows: one prepare of `vm`, by `source`'s agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorisation {
    pub vm: String,
    pub source: String,
}

/// Why a prepare is not authorised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No order (or it was used already), or one for another VM.
    NoOrder,
    /// The order's source node is not the caller.
    NotTheSource(String),
}

/// Orders the allocator pushed naming this node the target; each is used
/// by the first prepare that names it, and gone afterwards.
#[derive(Debug, Default)]
pub struct Authorised {
    by_order: BTreeMap<u64, Authorisation>,
}

impl Authorised {
    pub fn insert(&mut self, order: u64, vm: &str, source: &str) {
        self.by_order.insert(order, Authorisation { vm: vm.to_owned(), source: source.to_owned() });
        while self.by_order.len() > MAX_AUTHORISED_ORDERS {
            self.by_order.pop_first();
        }
    }

    pub fn contains(&self, order: u64) -> bool {
        self.by_order.contains_key(&order)
    }

    /// Uses the authorisation of `order` if it names `vm` and `caller` is
    /// its source node: it is gone afterwards, whatever the prepare does. A
    /// refused prepare leaves it for the real source.
    pub fn take(&mut self, order: u64, vm: &str, caller: &Caller) -> Result<Authorisation, Refusal> {
        let a = self.by_order.get(&order).filter(|a| a.vm == vm).ok_or(Refusal::NoOrder)?;
        if !caller.is_node(&a.source) {
            return Err(Refusal::NotTheSource(a.source.clone()));
        }
        self.by_order.remove(&order).ok_or(Refusal::NoOrder)
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

    fn node(n: &str) -> Caller {
        Caller::Nodes(vec![n.to_owned()])
    }

    #[test]
    fn an_authorisation_is_good_for_one_prepare_by_its_source() {
        let mut a = Authorised::default();
        a.insert(7, "vm2", "a");
        assert_eq!(a.take(7, "vm1", &node("a")), Err(Refusal::NoOrder), "another vm");
        assert_eq!(a.take(7, "vm2", &node("c")), Err(Refusal::NotTheSource("a".into())), "another node");
        assert_eq!(a.take(7, "vm2", &Caller::Nodes(vec![])), Err(Refusal::NotTheSource("a".into())));
        assert!(a.contains(7), "a refused prepare leaves it for the real source");
        assert_eq!(a.take(7, "vm2", &node("a")), Ok(Authorisation { vm: "vm2".into(), source: "a".into() }));
        assert_eq!(a.take(7, "vm2", &node("a")), Err(Refusal::NoOrder), "used once, then gone");
        a.insert(8, "vm2", "a");
        assert!(a.take(8, "vm2", &Caller::Anyone).is_ok(), "a link without tls cannot tell");
    }

    #[test]
    fn only_the_source_asks_about_its_order() {
        let mut moves = Moves::<&str>::default();
        moves.step(1, Some(Move::Starting)).unwrap();
        moves.set_source(1, "a");
        assert!(moves.may_ask(1, &node("a")) && moves.may_ask(1, &Caller::Anyone));
        assert!(!moves.may_ask(1, &node("c")) && !moves.may_ask(1, &Caller::Nodes(vec![])));
        assert!(moves.may_ask(2, &node("c")), "an order not held here: none, to anyone");
        moves.step(1, None).unwrap();
        assert!(moves.may_ask(1, &node("c")), "gone with its order");
        moves.step(3, Some(Move::Running { vm: "vm".into() })).unwrap();
        moves.set_source(3, "");
        assert!(moves.may_ask(3, &node("c")), "a record from before sources were kept");
    }

    #[test]
    fn authorisations_the_oldest_go_first() {
        let mut a = Authorised::default();
        a.insert(7, "vm2", "a");
        for order in 100..100 + MAX_AUTHORISED_ORDERS as u64 {
            a.insert(order, "vm", "a");
        }
        assert!(!a.contains(7), "the oldest order went");
        assert!(a.contains(100) && a.contains(99 + MAX_AUTHORISED_ORDERS as u64));
        assert_eq!(a.by_order.len(), MAX_AUTHORISED_ORDERS);
    }
}
