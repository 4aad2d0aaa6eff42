//! The node's inventory of VMs and the pure decisions over it: which VMs run
//! a loop here, which loops stop, and whether a VM that leaves gives its
//! reservation back. The async shell in [`super`] feeds it what the VM source
//! lists, what migration adopted and how moves ended, and carries out the
//! [`Plan`] that [`reconcile`] returns.
//!
//! The rules, and the races they answer:
//! - A VM moved here runs on the QEMU this agent started, whatever the list
//!   says of it (the list may still name it with its old node's socket).
//! - A VM that moved away is not scaled here while the list names it as it was
//!   (the VM source lags the move); an entry the list changed names a new VM.
//!   One the list no longer names stays apart: a VM that came and went again by
//!   migration was never listed.
//! - A VM whose interrupted move (found on disk after a restart) is not settled
//!   is not scaled until it is.
//! - A VM that leaves releases its reservation unless it is not this node's to
//!   release: a VM that moved away is on its target's ledger, and one held for
//!   recovery is settled by the move's report.

use crate::migration::mover::Ended;
use crate::vms::VmSpec;
use std::collections::{BTreeMap, BTreeSet};

/// What the node knows of its VMs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// The VM source's list, as last read.
    pub listed: Vec<VmSpec>,
    /// VMs moved here by live migration.
    pub adopted: Vec<VmSpec>,
    /// VMs that moved away, with the spec their loop ran here (none when
    /// they had no loop here, e.g. a move settled after a restart).
    pub moved_away: BTreeMap<String, Option<VmSpec>>,
    /// VMs whose interrupted move is not settled yet.
    pub held: BTreeSet<String>,
    /// VMs whose loop runs, with the spec it runs with.
    pub running: BTreeMap<String, VmSpec>,
}

/// Why a VM's loop stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its spec changed: the loop starts again with the new one (it is in
    /// [`Plan::start`]); the VM's entries and reservation stay.
    Restart,
    /// It left the node: its entries go and its reservation is released.
    Release,
    /// It left the node, but its reservation is not this node's to release
    /// (moved away, or held for recovery): its entries go, nothing is sent.
    Leave,
}

/// One turn's actions, in order: stop loops, then start loops.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Moved-away VMs no longer kept apart: the list changed their entry,
    /// or they moved back here.
    pub forget_moved: Vec<String>,
    /// Loops to stop, each with what becomes of its VM.
    pub stop: Vec<(String, Stop)>,
    /// Loops to start (again, for a [`Stop::Restart`]), with their spec.
    pub start: Vec<VmSpec>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.forget_moved.is_empty() && self.stop.is_empty() && self.start.is_empty()
    }
}

/// The loops this node should run, from what it knows now.
pub fn reconcile(inv: &Inventory) -> Plan {
    let listed = |id: &str| inv.listed.iter().find(|v| v.id == id);
    let adopted = |id: &str| inv.adopted.iter().any(|v| v.id == id);
    // A changed entry names a new VM; a VM adopted again came back.
    let forget_moved: Vec<String> = inv
        .moved_away
        .iter()
        .filter(|(id, was)| {
            let changed = listed(id).is_some_and(|v| was.as_ref().is_some_and(|w| w != v));
            changed || adopted(id)
        })
        .map(|(id, _)| id.clone())
        .collect();
    let moved_away = |id: &str| inv.moved_away.contains_key(id) && !forget_moved.iter().any(|f| f == id);

    let mut wanted: BTreeMap<&str, &VmSpec> =
        inv.listed.iter().filter(|v| !moved_away(&v.id)).map(|v| (v.id.as_str(), v)).collect();
    // An adopted VM's spec wins over the list's: its QEMU is the one started here.
    for v in &inv.adopted {
        wanted.insert(&v.id, v);
    }
    // Its interrupted move may yet take it away: not scaled until settled.
    wanted.retain(|id, _| !inv.held.contains(*id));

    let stop = inv
        .running
        .iter()
        .filter(|(id, spec)| wanted.get(id.as_str()) != Some(spec))
        .map(|(id, _)| {
            let why = if wanted.contains_key(id.as_str()) {
                Stop::Restart
            } else if moved_away(id) || inv.held.contains(id) {
                // The target's ledger holds it, or the move's report settles it.
                Stop::Leave
            } else {
                Stop::Release
            };
            (id.clone(), why)
        })
        .collect::<Vec<_>>();
    let start = wanted
        .into_iter()
        .filter(|(id, _)| !inv.running.contains_key(*id) || stop.iter().any(|(s, _)| s == id))
        .map(|(_, v)| v.clone())
        .collect();
    Plan { forget_moved, stop, start }
}

impl Inventory {
    /// Records that `plan` was carried out.
    pub fn apply(&mut self, plan: &Plan) {
        for id in &plan.forget_moved {
            self.moved_away.remove(id);
        }
        for (id, _) in &plan.stop {
            self.running.remove(id);
        }
        for v in &plan.start {
            self.running.insert(v.id.clone(), v.clone());
        }
    }

    /// A move of `vm` ended (carried out, or recovered after a restart).
    /// Returns whether the VM moved away, so that the migration target
    /// forgets it too (it may have been adopted here before).
    pub fn settled(&mut self, vm: &str, ended: Ended) -> bool {
        self.held.remove(vm);
        if ended != Ended::MovedAway {
            return false;
        }
        self.moved_away.insert(vm.to_owned(), self.running.get(vm).cloned());
        true
    }

    /// Whether `vm`'s loop runs here: only such a VM can be moved out.
    pub fn runs(&self, vm: &str) -> bool {
        self.running.contains_key(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::tests::spec;

    fn changed(id: &str) -> VmSpec {
        VmSpec { max_cus: 16, ..spec(id) }
    }

    fn at(id: &str, qmp: &str) -> VmSpec {
        VmSpec { qmp: qmp.into(), ..spec(id) }
    }

    /// One turn of the node: reconcile, then record the plan as done.
    fn turn(inv: &mut Inventory) -> Plan {
        let plan = reconcile(inv);
        inv.apply(&plan);
        plan
    }

    fn ids(specs: &[VmSpec]) -> Vec<&str> {
        specs.iter().map(|v| v.id.as_str()).collect()
    }

    fn stops(plan: &Plan) -> Vec<(&str, Stop)> {
        plan.stop.iter().map(|(id, s)| (id.as_str(), *s)).collect()
    }

    fn running(specs: Vec<VmSpec>) -> BTreeMap<String, VmSpec> {
        specs.into_iter().map(|v| (v.id.clone(), v)).collect()
    }

    struct Case {
        name: &'static str,
        inv: Inventory,
        start: Vec<VmSpec>,
        stop: Vec<(&'static str, Stop)>,
        forget_moved: Vec<&'static str>,
    }

    #[test]
    fn one_turn_from_each_inventory() {
        let a = spec("a");
        let moved_a = || BTreeMap::from([("a".to_owned(), Some(spec("a")))]);
        let cases = vec![
            Case {
                name: "a listed VM starts",
                inv: Inventory { listed: vec![a.clone()], ..Default::default() },
                start: vec![a.clone()],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a running VM as listed: nothing to do",
                inv: Inventory {
                    listed: vec![a.clone()],
                    running: running(vec![a.clone()]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a VM the list changed restarts with its new spec, reservation kept",
                inv: Inventory {
                    listed: vec![changed("a")],
                    running: running(vec![a.clone()]),
                    ..Default::default()
                },
                start: vec![changed("a")],
                stop: vec![("a", Stop::Restart)],
                forget_moved: vec![],
            },
            Case {
                name: "a VM the list dropped leaves and releases its reservation",
                inv: Inventory { running: running(vec![a.clone()]), ..Default::default() },
                start: vec![],
                stop: vec![("a", Stop::Release)],
                forget_moved: vec![],
            },
            Case {
                name: "a VM that just moved away leaves without releasing",
                inv: Inventory {
                    listed: vec![a.clone()],
                    running: running(vec![a.clone()]),
                    moved_away: moved_a(),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![("a", Stop::Leave)],
                forget_moved: vec![],
            },
            Case {
                name: "a moved-away VM still listed as it was stays unscaled",
                inv: Inventory { listed: vec![a.clone()], moved_away: moved_a(), ..Default::default() },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a moved-away VM listed again with a changed spec is a new VM",
                inv: Inventory { listed: vec![changed("a")], moved_away: moved_a(), ..Default::default() },
                start: vec![changed("a")],
                stop: vec![],
                forget_moved: vec!["a"],
            },
            Case {
                name: "a moved-away VM the list no longer names stays apart",
                inv: Inventory { moved_away: moved_a(), ..Default::default() },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a VM settled as moved away after a restart stays apart whatever the list says",
                inv: Inventory {
                    listed: vec![changed("a")],
                    moved_away: BTreeMap::from([("a".to_owned(), None)]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "an adopted VM runs on this agent's QEMU, whatever the list says",
                inv: Inventory {
                    listed: vec![at("a", "/run/old-node/qmp.sock")],
                    adopted: vec![at("a", "/run/here/qmp.sock")],
                    ..Default::default()
                },
                start: vec![at("a", "/run/here/qmp.sock")],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a VM that moved away and back is adopted, no longer apart",
                inv: Inventory {
                    listed: vec![a.clone()],
                    adopted: vec![at("a", "/run/here/qmp.sock")],
                    moved_away: moved_a(),
                    ..Default::default()
                },
                start: vec![at("a", "/run/here/qmp.sock")],
                stop: vec![],
                forget_moved: vec!["a"],
            },
            Case {
                name: "a VM neither adopted nor listed any more (not moved away) leaves and releases",
                inv: Inventory {
                    running: running(vec![at("a", "/run/here/qmp.sock")]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![("a", Stop::Release)],
                forget_moved: vec![],
            },
            Case {
                name: "a held VM does not start until its move is settled",
                inv: Inventory {
                    listed: vec![a.clone()],
                    held: BTreeSet::from(["a".to_owned()]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a held VM, adopted too, still waits",
                inv: Inventory {
                    adopted: vec![a.clone()],
                    held: BTreeSet::from(["a".to_owned()]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![],
                forget_moved: vec![],
            },
            Case {
                name: "a running VM that becomes held leaves without releasing",
                inv: Inventory {
                    listed: vec![a.clone()],
                    running: running(vec![a.clone()]),
                    held: BTreeSet::from(["a".to_owned()]),
                    ..Default::default()
                },
                start: vec![],
                stop: vec![("a", Stop::Leave)],
                forget_moved: vec![],
            },
        ];
        for c in cases {
            let plan = reconcile(&c.inv);
            assert_eq!(ids(&plan.start), ids(&c.start), "{}: start", c.name);
            assert_eq!(plan.start, c.start, "{}: start specs", c.name);
            assert_eq!(stops(&plan), c.stop, "{}: stop", c.name);
            assert_eq!(plan.forget_moved, c.forget_moved, "{}: forget_moved", c.name);
        }
    }

    #[test]
    fn a_turn_after_a_turn_has_nothing_to_do() {
        let mut inv = Inventory {
            listed: vec![spec("a"), changed("b"), spec("c")],
            adopted: vec![at("d", "/run/here/qmp.sock")],
            moved_away: BTreeMap::from([
                ("b".to_owned(), Some(spec("b"))),
                ("c".to_owned(), Some(spec("c"))),
            ]),
            held: BTreeSet::from(["e".to_owned()]),
            running: running(vec![spec("f")]),
        };
        let first = turn(&mut inv);
        assert_eq!(ids(&first.start), ["a", "b", "d"]);
        assert_eq!(stops(&first), [("f", Stop::Release)]);
        assert!(turn(&mut inv).is_empty(), "{inv:?}");
    }

    /// The source side of a move: the loop runs, the move ends, the list lags
    /// and then names the VM anew.
    #[test]
    fn a_vm_that_moved_away_and_is_listed_again_with_a_changed_spec() {
        let mut inv = Inventory { listed: vec![spec("a")], ..Default::default() };
        assert_eq!(ids(&turn(&mut inv).start), ["a"]);
        assert!(inv.settled("a", Ended::MovedAway), "the target forgets it too");
        assert_eq!(inv.moved_away.get("a"), Some(&Some(spec("a"))), "kept with the spec it ran here");
        assert_eq!(stops(&turn(&mut inv)), [("a", Stop::Leave)], "no RemoveVm: the target's ledger holds it");
        assert!(turn(&mut inv).is_empty(), "the lagging list does not bring it back");
        inv.listed = vec![];
        assert!(turn(&mut inv).is_empty());
        inv.listed = vec![changed("a")];
        let plan = turn(&mut inv);
        assert_eq!(
            (plan.forget_moved.as_slice(), plan.start.as_slice()),
            (&["a".to_owned()][..], &[changed("a")][..])
        );
        inv.listed = vec![];
        assert_eq!(stops(&turn(&mut inv)), [("a", Stop::Release)], "the new VM's reservation is this node's");
    }

    #[test]
    fn a_move_that_failed_keeps_the_vm_running() {
        let mut inv = Inventory { listed: vec![spec("a")], ..Default::default() };
        turn(&mut inv);
        assert!(!inv.settled("a", Ended::Stayed));
        assert!(turn(&mut inv).is_empty());
        assert!(inv.runs("a"));
    }

    /// An order naming this node the source of a VM it no longer runs: the
    /// shell gives the mover no VM (it reports the order failed), and how the
    /// move "ended" changes nothing here.
    #[test]
    fn an_order_for_a_vm_this_node_no_longer_holds() {
        let mut inv = Inventory { listed: vec![spec("a")], ..Default::default() };
        turn(&mut inv);
        inv.settled("a", Ended::MovedAway);
        turn(&mut inv);
        assert!(!inv.runs("a"), "moved away: nothing to move");
        let before = inv.clone();
        assert!(!inv.settled("a", Ended::Stayed));
        assert_eq!(inv, before);
        assert!(turn(&mut inv).is_empty());
        assert!(!inv.runs("never-here"));
    }

    /// The agent restarts with a move's record on disk: the VM is held until
    /// the recovery settles the move either way.
    #[test]
    fn a_restart_in_the_middle_of_a_move_out() {
        for (ended, start, apart) in [(Ended::Stayed, vec!["a"], false), (Ended::MovedAway, vec![], true)] {
            let mut inv = Inventory {
                listed: vec![spec("a")],
                held: BTreeSet::from(["a".to_owned()]),
                ..Default::default()
            };
            assert!(turn(&mut inv).is_empty(), "{ended:?}: held");
            assert_eq!(inv.settled("a", ended), apart);
            assert_eq!(ids(&turn(&mut inv).start), start, "{ended:?}");
            assert_eq!(inv.moved_away.get("a"), apart.then_some(&None), "{ended:?}: no loop ran here");
            inv.listed = vec![changed("a")];
            assert_eq!(turn(&mut inv).start.is_empty(), apart, "{ended:?}: a settled move keeps it apart");
        }
    }

    /// The agent restarts after a move settled (its record is gone): nothing
    /// remembers the move, so the list decides again.
    #[test]
    fn a_restart_after_a_move_settled_forgets_it() {
        let mut inv = Inventory { listed: vec![spec("a")], ..Default::default() };
        turn(&mut inv);
        inv.settled("a", Ended::MovedAway);
        turn(&mut inv);
        let mut restarted = Inventory { listed: inv.listed.clone(), ..Default::default() };
        assert_eq!(ids(&turn(&mut restarted).start), ["a"]);
    }

    /// The target side: the VM is adopted, then a restart of the agent finds
    /// it adopted again (the target recovers its records before the first
    /// turn), and the loop runs on this node's QEMU.
    #[test]
    fn a_restart_in_the_middle_of_a_move_in() {
        let here = at("a", "/run/here/qmp.sock");
        let mut inv = Inventory { listed: vec![at("a", "/run/there/qmp.sock")], ..Default::default() };
        turn(&mut inv);
        inv.adopted = vec![here.clone()];
        let plan = turn(&mut inv);
        assert_eq!(stops(&plan), [("a", Stop::Restart)]);
        assert_eq!(plan.start, std::slice::from_ref(&here));
        let mut restarted =
            Inventory { listed: inv.listed.clone(), adopted: vec![here.clone()], ..Default::default() };
        assert_eq!(turn(&mut restarted).start, [here]);
    }

    /// A VM moved here and then away again: the list never named it, and a
    /// list that names it later as it ran here is not brought back.
    #[test]
    fn a_vm_that_came_and_went_by_migration() {
        let here = at("a", "/run/here/qmp.sock");
        let mut inv = Inventory { adopted: vec![here.clone()], ..Default::default() };
        turn(&mut inv);
        assert!(inv.settled("a", Ended::MovedAway));
        inv.adopted.clear(); // the target forgot it
        assert_eq!(stops(&turn(&mut inv)), [("a", Stop::Leave)]);
        inv.listed = vec![here];
        assert!(turn(&mut inv).is_empty());
    }
}
