//! Prometheus metrics, all prefixed `vmscale_allocator_`. Per-node gauges are
//! filled from the ledger at scrape time, so they can never drift from it.

use crate::core::Cluster;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeVmLabels {
    pub node: String,
    pub vm: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub decision_seconds: Histogram,
    pub sessions_opened: Counter,
    pub sessions_replaced: Counter,
    pub sessions_live: Gauge,
    pub orders: Family<RequestLabels, Counter>,
    capacity_cpu: Family<NodeLabel, Gauge>,
    capacity_mem: Family<NodeLabel, Gauge>,
    usable_cpu: Family<NodeLabel, Gauge>,
    usable_mem: Family<NodeLabel, Gauge>,
    reserved_cpu: Family<NodeLabel, Gauge>,
    reserved_mem: Family<NodeLabel, Gauge>,
    unmet_cpu: Family<NodeLabel, Gauge>,
    unmet_mem: Family<NodeLabel, Gauge>,
    watermark: Family<NodeLabel, FloatGauge>,
    run_queue_p99: Family<NodeLabel, FloatGauge>,
    vm_run_queue_p99: Family<NodeVmLabels, FloatGauge>,
    connected: Family<NodeLabel, Gauge>,
    vms: Family<NodeLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vmscale_allocator");
        let m = Metrics {
            requests: Family::default(),
            errors: Family::default(),
            // 1 µs .. ~1 s: decisions are microseconds, lock waits may be more.
            decision_seconds: Histogram::new(exponential_buckets(1e-6, 2.0, 21)),
            sessions_opened: Counter::default(),
            sessions_replaced: Counter::default(),
            sessions_live: Gauge::default(),
            orders: Family::default(),
            capacity_cpu: Family::default(),
            capacity_mem: Family::default(),
            usable_cpu: Family::default(),
            usable_mem: Family::default(),
            reserved_cpu: Family::default(),
            reserved_mem: Family::default(),
            unmet_cpu: Family::default(),
            unmet_mem: Family::default(),
            watermark: Family::default(),
            run_queue_p99: Family::default(),
            vm_run_queue_p99: Family::default(),
            connected: Family::default(),
            vms: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("requests", "Agent requests by kind and outcome", m.requests.clone());
        r.register("errors", "Rejected agent requests by kind and error", m.errors.clone());
        r.register(
            "decision_seconds",
            "Time the core took to decide one request, lock wait included",
            m.decision_seconds.clone(),
        );
        r.register("sessions_opened", "Agent sessions opened", m.sessions_opened.clone());
        r.register(
            "sessions_replaced",
            "Sessions ended because a newer one registered the same node",
            m.sessions_replaced.clone(),
        );
        r.register("sessions_live", "Agent sessions open now", m.sessions_live.clone());
        r.register("migration_orders", "Migration orders by phase", m.orders.clone());
        let node_gauges: [(&str, &str, &Family<NodeLabel, Gauge>); 10] = [
            ("node_capacity_milli_cpu", "Node CPU capacity reported by its agent", &m.capacity_cpu),
            ("node_capacity_memory_bytes", "Node memory capacity reported by its agent", &m.capacity_mem),
            ("node_usable_milli_cpu", "Node CPU capacity less the system reserve", &m.usable_cpu),
            ("node_usable_memory_bytes", "Node memory capacity less the system reserve", &m.usable_mem),
            ("node_reserved_milli_cpu", "CPU reserved by the node's VMs", &m.reserved_cpu),
            ("node_reserved_memory_bytes", "Memory reserved by the node's VMs", &m.reserved_mem),
            ("node_unmet_milli_cpu", "CPU asked for and not granted", &m.unmet_cpu),
            ("node_unmet_memory_bytes", "Memory asked for and not granted", &m.unmet_mem),
            ("node_connected", "1 while the node's agent holds a session", &m.connected),
            ("node_vms", "VMs in the node's ledger (incoming holds included)", &m.vms),
        ];
        for (name, help, fam) in node_gauges {
            r.register(name, help, fam.clone());
        }
        r.register(
            "node_watermark_ratio",
            "Node watermark as a fraction of usable capacity",
            m.watermark.clone(),
        );
        r.register(
            "node_run_queue_delay_p99_seconds",
            "Run-queue delay of vCPU threads, p99 of the worst VM over the agent's last interval",
            m.run_queue_p99.clone(),
        );
        r.register(
            "vm_run_queue_delay_p99_seconds",
            "Run-queue delay of a VM's vCPU threads, p99 over the agent's last interval",
            m.vm_run_queue_p99.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Renders the text exposition, refreshing the per-node gauges from `cluster`.
    pub fn render(&self, cluster: &Cluster) -> String {
        let fams = [
            &self.capacity_cpu,
            &self.capacity_mem,
            &self.usable_cpu,
            &self.usable_mem,
            &self.reserved_cpu,
            &self.reserved_mem,
            &self.unmet_cpu,
            &self.unmet_mem,
            &self.connected,
            &self.vms,
        ];
        for f in fams {
            f.clear();
        }
        self.watermark.clear();
        self.run_queue_p99.clear();
        self.vm_run_queue_p99.clear();
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, n) in &cluster.nodes {
            let l = NodeLabel { node: name.clone() };
            let values = [
                g(n.capacity.milli_cpu),
                g(n.capacity.memory_bytes),
                g(n.usable().milli_cpu),
                g(n.usable().memory_bytes),
                g(n.reserved().milli_cpu),
                g(n.reserved().memory_bytes),
                g(n.unmet().milli_cpu),
                g(n.unmet().memory_bytes),
                i64::from(n.session.is_some()),
                g(n.vms.len() as u64),
            ];
            for (f, v) in fams.iter().zip(values) {
                f.get_or_create(&l).set(v);
            }
            self.watermark.get_or_create(&l).set(n.watermark);
            if let Some(c) = &n.contention {
                let secs = |us: u64| us as f64 / 1e6;
                if let Some(p99) = c.worst_p99_us() {
                    self.run_queue_p99.get_or_create(&l).set(secs(p99));
                }
                for (vm, v) in &c.vms {
                    let vl = NodeVmLabels { node: name.clone(), vm: vm.clone() };
                    self.vm_run_queue_p99.get_or_create(&vl).set(secs(v.p99_us));
                }
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::contention::{NodeContention, VmContention};
    use crate::core::ledger::NodeLedger;
    use crate::core::units::Resources;
    use crate::core::CoreConfig;

    #[test]
    fn run_queue_delay_is_exported_per_node_and_vm() {
        let mut c = Cluster::new(CoreConfig {
            system_reserve: Resources::ZERO,
            watermark: 0.9,
            order_timeout_ms: 1000,
            max_moves_per_round: 1,
            contended_p99_us: 5_000,
            move_retry_base_ms: 5_000,
            move_retry_max_ms: 300_000,
            ..CoreConfig::default()
        });
        let mut n = NodeLedger::new(Resources::new(4000, 1 << 34), Resources::ZERO, 0.9);
        let v = |p99_us| VmContention { p50_us: 10, p99_us, mean_us: 20, max_us: 5000, samples: 9 };
        n.contention = Some(NodeContention {
            at_ms: 1,
            interval_ms: 5000,
            vms: [("a".to_owned(), v(1500)), ("b".to_owned(), v(250))].into_iter().collect(),
        });
        c.nodes.insert("n1".into(), n);
        c.nodes.insert("n2".into(), NodeLedger::new(Resources::new(4000, 1 << 34), Resources::ZERO, 0.9));
        let m = Metrics::new();
        let text = m.render(&c);
        assert!(
            text.contains("vmscale_allocator_node_run_queue_delay_p99_seconds{node=\"n1\"} 0.0015"),
            "{text}"
        );
        assert!(
            text.contains("vmscale_allocator_vm_run_queue_delay_p99_seconds{node=\"n1\",vm=\"b\"} 0.00025")
        );
        // A node without a report has no series rather than a misleading zero.
        assert!(!text.contains("delay_p99_seconds{node=\"n2\"}"), "{text}");
        c.nodes.remove("n1");
        assert!(!m.render(&c).contains("run_queue_delay_p99_seconds{"));
    }
}
