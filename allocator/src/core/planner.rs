//! The migration planner: which VMs leave hot nodes, and where they go.
//!
//! A node is hot when what its VMs want (reservations plus demand that was
//! denied) passes its watermark in either dimension. For each hot node the
//! planner looks for the fewest moves that bring it back under: first a single
//! VM that covers the whole excess (the smallest such, so the least memory is
//! copied), otherwise the largest VMs first. A VM goes to the connected node
//! with the most headroom that stays under its own watermark with the VM on it.
//! Moves already under way count as done for their source and as present on
//! their target, so a node is not planned twice for the same excess. A node
//! whose agent reports vCPUs waiting long for a host CPU (run-queue delay p99
//! at least `contended_p99_us`, see `contention`) is over-committed in fact
//! whatever its ledger says: it takes a VM only when no calm node has room.
//! A VM whose last move failed waits before it is planned again, longer
//! after each failure in a row (see [`super::Cluster::move_backoff`]), so a
//! broken target or network is not hammered with moves.

use super::units::Resources;
use super::vm::VmState;
use super::Cluster;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub vm: String,
    pub source: String,
    pub target: String,
    /// Held on the target: the VM's reservation plus its unmet demand.
    pub reserved: Resources,
    pub reason: String,
}

struct Target<'a> {
    name: &'a str,
    usable: Resources,
    level: Resources,
    load: Resources,
    contended: bool,
}

impl Target<'_> {
    fn headroom(&self) -> Resources {
        self.level.saturating_sub(self.load)
    }
}

/// A node above its watermark: how far above (the larger share of its
/// usable capacity wanted) and by how much.
struct Hot<'a> {
    share: f64,
    name: &'a str,
    excess: Resources,
}

/// The moves to order at `now_ms`.
pub fn plan(c: &Cluster, now_ms: u64) -> Vec<Move> {
    let budget = c.config.max_moves_per_round;
    if budget == 0 {
        return Vec::new();
    }
    let (mut hot, mut targets) = classify(c, &leaving(c));
    if hot.is_empty() || targets.is_empty() {
        return Vec::new();
    }
    // Worst first; names break ties so that plans are reproducible.
    hot.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.name.cmp(b.name)));
    targets.sort_by(|a, b| a.name.cmp(b.name));
    let mut round =
        Round { c, best_room: max_headroom(&targets), targets, no_room: Vec::new(), moves: Vec::new() };
    for h in hot {
        round.relieve(h.name, h.excess, now_ms);
        if round.moves.len() >= budget {
            break;
        }
    }
    round.moves
}

/// What open orders are taking away from their sources.
fn leaving(c: &Cluster) -> HashMap<&str, Resources> {
    let mut leaving: HashMap<&str, Resources> = HashMap::new();
    for o in c.orders.values() {
        let size = c
            .nodes
            .get(&o.source)
            .and_then(|n| n.vms.get(&o.vm))
            .map(|e| e.reserved.saturating_add(e.unmet))
            .unwrap_or_default();
        let l = leaving.entry(o.source.as_str()).or_default();
        *l = l.saturating_add(size);
    }
    leaving
}

/// The connected nodes, as hot ones (to relieve) and the others that take
/// VMs in (targets).
fn classify<'a>(c: &'a Cluster, leaving: &HashMap<&str, Resources>) -> (Vec<Hot<'a>>, Vec<Target<'a>>) {
    let mut hot = Vec::new();
    let mut targets = Vec::new();
    for (name, n) in &c.nodes {
        if n.session.is_none() {
            continue;
        }
        let wanted = n.wanted().saturating_sub(leaving.get(name.as_str()).copied().unwrap_or_default());
        let level = n.watermark_level();
        if !wanted.fits_in(level) {
            let share = wanted.max_fraction_of(n.usable());
            hot.push(Hot { share, name, excess: wanted.saturating_sub(level) });
        } else if !n.migration_endpoint.is_empty() {
            // (A node whose agent takes no VMs in may still shed them.)
            let contended = n
                .contention
                .as_ref()
                .and_then(|c| c.worst_p99_us())
                .is_some_and(|p99| p99 >= c.config.contended_p99_us);
            targets.push(Target { name, usable: n.usable(), level, load: n.wanted(), contended });
        }
    }
    (hot, targets)
}

/// One planning round's view of the targets as it fills them.
struct Round<'a> {
    c: &'a Cluster,
    targets: Vec<Target<'a>>,
    /// The most headroom any target has left, per dimension.
    best_room: Resources,
    /// Sizes no target had room for (see [`Round::pick_target`]).
    no_room: Vec<Resources>,
    moves: Vec<Move>,
}

impl<'a> Round<'a> {
    /// Plans the moves that bring `source` back under its watermark, as far
    /// as targets have room and the round's budget lasts.
    fn relieve(&mut self, source: &'a str, mut excess: Resources, now_ms: u64) {
        let candidates = self.candidates(source, excess, now_ms);
        if candidates.is_empty() {
            return;
        }
        let picks = match self.single(source, excess, &candidates) {
            Some(one) => vec![one],
            None => candidates,
        };
        for (vm, size) in picks {
            if excess.is_zero() || self.moves.len() >= self.c.config.max_moves_per_round {
                break;
            }
            let Some(t) = self.pick_target(source, vm, size) else {
                continue;
            };
            self.targets[t].load = self.targets[t].load.saturating_add(size);
            self.best_room = max_headroom(&self.targets);
            excess = excess.saturating_sub(size);
            self.moves.push(Move {
                vm: vm.to_owned(),
                source: source.to_owned(),
                target: self.targets[t].name.to_owned(),
                reserved: size,
                reason: format!("node {source} above its watermark"),
            });
        }
    }

    /// The VMs of `source` that may move now, largest share of the excess
    /// first (ids break ties). Targets only fill up during a round, so a VM
    /// that fits nowhere now never will: it is left out before sorting. On
    /// a full cluster that is every VM, and the round costs a scan of the
    /// hot nodes and no sort.
    fn candidates(&self, source: &str, excess: Resources, now_ms: u64) -> Vec<(&'a str, Resources)> {
        let c = self.c;
        let mut candidates: Vec<(f64, &str, Resources)> = c.nodes[source]
            .vms
            .iter()
            .filter(|(id, e)| e.state == VmState::Active && !c.backing_off(id, now_ms))
            .map(|(id, e)| (id.as_str(), e.reserved.saturating_add(e.unmet)))
            .filter(|(_, size)| !size.is_zero() && size.fits_in(self.best_room))
            .filter(|(_, size)| !self.no_room.iter().any(|small| small.fits_in(*size)))
            .map(|(id, size)| (coverage(size, excess), id, size))
            .collect();
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        candidates.into_iter().map(|(_, id, size)| (id, size)).collect()
    }

    /// One move is best: the smallest VM that covers the excess alone and
    /// has somewhere to go.
    fn single(
        &mut self,
        source: &str,
        excess: Resources,
        candidates: &[(&'a str, Resources)],
    ) -> Option<(&'a str, Resources)> {
        let usable = self.c.nodes[source].usable();
        candidates
            .iter()
            .filter(|(_, size)| excess.fits_in(*size))
            .filter(|(vm, size)| self.pick_target(source, vm, *size).is_some())
            .min_by(|a, b| {
                a.1.max_fraction_of(usable).total_cmp(&b.1.max_fraction_of(usable)).then_with(|| a.0.cmp(b.0))
            })
            .copied()
    }
}

/// How much of the excess a VM of this size removes, summed over the
/// dimensions that are over (each at most 1).
fn coverage(size: Resources, excess: Resources) -> f64 {
    let part = |s: u64, e: u64| if e == 0 { 0.0 } else { s.min(e) as f64 / e as f64 };
    part(size.milli_cpu, excess.milli_cpu) + part(size.memory_bytes, excess.memory_bytes)
}

fn max_headroom(targets: &[Target]) -> Resources {
    targets.iter().fold(Resources::ZERO, |m, t| m.max(t.headroom()))
}

impl Round<'_> {
    /// The target with the most headroom left after taking the VM, if any fits;
    /// a contended one only if no calm one fits.
    fn pick_target(&mut self, source: &str, vm: &str, size: Resources) -> Option<usize> {
        let (targets, best_room, no_room, c) = (&self.targets, self.best_room, &mut self.no_room, self.c);
        if !size.fits_in(best_room) {
            return None; // no node has room in some dimension: skip the scan
        }
        // Targets only fill up during a round: once no node had room for a size,
        // none has room for anything at least as large. On a full cluster this
        // turns a scan per candidate into one per distinct small size.
        if no_room.iter().any(|small| small.fits_in(size)) {
            return None;
        }
        let mut best: Option<(usize, (bool, f64))> = None;
        let mut any_room = false;
        for (i, t) in targets.iter().enumerate() {
            if !size.fits_in(t.headroom()) {
                continue;
            }
            any_room = true;
            if t.name == source {
                continue;
            }
            let after = (t.contended, t.load.saturating_add(size).max_fraction_of(t.usable));
            let better = |b: (bool, f64)| (!after.0 && b.0) || (after.0 == b.0 && after.1 < b.1);
            // The id lookup only for a target that would win: it is rarely held
            // there, and a lookup per target made unbounded rounds quadratic.
            if best.is_none_or(|(_, b)| better(b))
                && !c.nodes.get(t.name).is_some_and(|n| n.vms.contains_key(vm))
            {
                best = Some((i, after));
            }
        }
        if !any_room && no_room.len() < 64 {
            no_room.push(size);
        }
        best.map(|(i, _)| i)
    }
}
