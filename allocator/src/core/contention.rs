//! CPU contention the agents measure on their nodes: how long each VM's
//! runnable vCPUs waited for a host CPU (run-queue delay, host eBPF). The
//! core records the latest report per node; the metrics and the state dump
//! show it, and the planner sends moved VMs to a contended node only when no
//! calm node has room (its worst p99 at or over the `contended_p99_us` setting): such a node is
//! over-committed in fact, whatever its ledger says.

use super::error::{CoreError, Result};
use super::names::check_vm_id;
use super::{Cluster, SessionRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest interval a report may cover: an hour. More is a unit mix-up.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// Longest delay figure accepted: an hour, in µs.
pub const MAX_DELAY_US: u64 = 3_600_000_000;

/// One VM's run-queue delay over a report's interval, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmContention {
    pub p50_us: u64,
    pub p99_us: u64,
    pub mean_us: u64,
    pub max_us: u64,
    pub samples: u64,
}

impl VmContention {
    /// Checks that the figures can be true together; `vm` names the VM in
    /// the error.
    pub fn checked(self, vm: &str) -> Result<Self> {
        let bad = |reason: String| Err(CoreError::invalid(format!("contention of vm {vm:?}"), reason));
        let VmContention { p50_us, p99_us, mean_us, max_us, samples } = self;
        if let Some(v) = [p50_us, p99_us, mean_us, max_us].into_iter().find(|v| *v > MAX_DELAY_US) {
            return bad(format!("{v} µs is beyond {MAX_DELAY_US} µs (an hour); figures are microseconds"));
        }
        if samples == 0 && self != VmContention::default() {
            return bad("no samples but non-zero figures".into());
        }
        if !(p50_us <= p99_us && p99_us <= max_us && mean_us <= max_us) {
            return bad(format!(
                "need p50 ({p50_us}) <= p99 ({p99_us}) <= max ({max_us}) and mean ({mean_us}) <= max"
            ));
        }
        Ok(self)
    }
}

/// A report as it came off the wire, checked in itself; whether its VMs
/// belong to the node is checked when it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentionReport {
    pub interval_ms: u64,
    pub vms: Vec<(String, VmContention)>,
}

impl ContentionReport {
    pub fn new(interval_ms: u64, vms: Vec<(String, VmContention)>) -> Result<Self> {
        if interval_ms == 0 || interval_ms > MAX_INTERVAL_MS {
            return Err(CoreError::invalid(
                "contention interval_ms",
                format!("{interval_ms} is not between 1 and {MAX_INTERVAL_MS} ms"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (vm, c) in &vms {
            check_vm_id("vm id", vm)?;
            if !seen.insert(vm.as_str()) {
                return Err(CoreError::DuplicateVm(vm.clone()));
            }
            c.checked(vm)?;
        }
        Ok(ContentionReport { interval_ms, vms })
    }
}

/// A node's latest report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeContention {
    /// The core's clock when it arrived.
    pub at_ms: u64,
    pub interval_ms: u64,
    pub vms: BTreeMap<String, VmContention>,
}

impl NodeContention {
    /// The worst VM's p99: the node's figure. VMs' histograms are not on the
    /// wire, so no true node-wide percentile exists; the worst VM is what an
    /// operator (and a planner) must act on anyway.
    pub fn worst_p99_us(&self) -> Option<u64> {
        self.vms.values().map(|c| c.p99_us).max()
    }
}

impl Cluster {
    /// Records a node's report, replacing its previous one. Every VM named
    /// must be in the session's node ledger.
    pub fn record_contention(&mut self, s: &SessionRef, r: ContentionReport, now_ms: u64) -> Result<()> {
        for (vm, _) in &r.vms {
            self.owned_vm(s, vm)?;
        }
        if r.vms.is_empty() {
            self.owned(s)?;
        }
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.contention = Some(NodeContention {
                at_ms: now_ms,
                interval_ms: r.interval_ms,
                vms: r.vms.into_iter().collect(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::units::{ComputeUnit, Resources};
    use crate::core::vm::{Bounds, VmRegistration};
    use crate::core::{CoreConfig, NodeRegistration};

    const GIB: u64 = 1 << 30;

    fn cluster_with(node: &str, vms: &[&str]) -> (Cluster, SessionRef) {
        let mut c = Cluster::new(CoreConfig {
            system_reserve: Resources::ZERO,
            watermark: 0.9,
            order_timeout_ms: 60_000,
            max_moves_per_round: 1,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            ..CoreConfig::default()
        });
        let cu = ComputeUnit::new(Resources::new(250, GIB)).unwrap();
        let bounds = Bounds::new(Resources::new(250, GIB), Resources::new(4000, 16 * GIB)).unwrap();
        let vms = vms
            .iter()
            .map(|id| {
                VmRegistration::new((*id).into(), Resources::new(500, 2 * GIB), Resources::ZERO, bounds, cu)
                    .unwrap()
            })
            .collect();
        let reg = NodeRegistration {
            node: node.into(),
            capacity: Resources::new(8000, 32 * GIB),
            vms,
            migration_endpoint: format!("https://{node}:7073"),
            refused: Vec::new(),
        };
        let opened = c.open_session(reg, 0).unwrap();
        (c, opened.session)
    }

    fn figures(p99_us: u64) -> VmContention {
        VmContention { p50_us: p99_us / 4, p99_us, mean_us: p99_us / 3, max_us: p99_us * 2, samples: 100 }
    }

    #[test]
    fn a_report_replaces_the_last_and_leaves_with_its_vm_and_session() {
        let (mut c, s) = cluster_with("n1", &["a", "b"]);
        let r =
            ContentionReport::new(5000, vec![("a".into(), figures(800)), ("b".into(), figures(50))]).unwrap();
        c.record_contention(&s, r, 42).unwrap();
        let n = c.node("n1").unwrap().contention.clone().unwrap();
        assert_eq!((n.at_ms, n.interval_ms, n.worst_p99_us()), (42, 5000, Some(800)));
        let r = ContentionReport::new(5000, vec![("b".into(), figures(70))]).unwrap();
        c.record_contention(&s, r, 43).unwrap();
        assert_eq!(c.node("n1").unwrap().contention.as_ref().unwrap().worst_p99_us(), Some(70));
        // The VM leaves: its figures go with it.
        c.remove_vm(&s, "b").unwrap();
        assert_eq!(c.node("n1").unwrap().contention.as_ref().unwrap().worst_p99_us(), None);
        // The session ends: figures of a node nobody measures are stale.
        c.close_session(&s);
        assert!(c.node("n1").unwrap().contention.is_none());
        c.check_sums().unwrap();
    }

    #[test]
    fn reports_naming_other_vms_change_nothing() {
        let (mut c, s) = cluster_with("n1", &["a"]);
        let r =
            ContentionReport::new(5000, vec![("a".into(), figures(800)), ("zz".into(), figures(1))]).unwrap();
        let e = c.record_contention(&s, r, 1).unwrap_err();
        assert!(matches!(e, CoreError::UnknownVm { .. }), "{e}");
        assert!(c.node("n1").unwrap().contention.is_none());
        let stale = SessionRef { node: "n1".into(), id: s.id + 100 };
        let r = ContentionReport::new(5000, vec![]).unwrap();
        assert!(matches!(c.record_contention(&stale, r, 1), Err(CoreError::StaleSession { .. })));
    }

    #[test]
    fn bad_figures_are_refused_with_a_reason() {
        let ok = figures(100);
        type Case = (u64, Vec<(String, VmContention)>, &'static str);
        let cases: Vec<Case> = vec![
            (0, vec![], "interval_ms"),
            (MAX_INTERVAL_MS + 1, vec![], "interval_ms"),
            (5000, vec![("a".into(), ok), ("a".into(), ok)], "twice"),
            (5000, vec![(String::new(), ok)], "vm id"),
            (5000, vec![("a".into(), VmContention { p99_us: MAX_DELAY_US + 1, ..ok })], "microseconds"),
            (5000, vec![("a".into(), VmContention { samples: 0, ..ok })], "no samples"),
            (5000, vec![("a".into(), VmContention { p50_us: 101, ..ok })], "p50"),
            (5000, vec![("a".into(), VmContention { max_us: 99, ..ok })], "max"),
            (5000, vec![("a".into(), VmContention { mean_us: 201, ..ok })], "mean"),
        ];
        for (interval, vms, want) in cases {
            let e = ContentionReport::new(interval, vms).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        assert!(ContentionReport::new(5000, vec![("a".into(), VmContention::default())]).is_ok());
    }
}
