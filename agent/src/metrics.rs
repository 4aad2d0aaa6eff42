//! Agent metrics, all prefixed `vmscale_agent_`: per-VM sizes, per-stage
//! latency histograms of upscales, operation outcomes, stuck VMs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    pub vm: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SizeLabels {
    pub vm: String,
    /// current, desired or permitted
    pub size: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub action: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// to_permit, to_plug, to_confirm (from the event that started the upscale)
    pub stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DelayLabels {
    pub vm: String,
    /// p50, p99, mean or max
    pub stat: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    /// source or target
    pub role: &'static str,
    /// completed or failed
    pub outcome: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn latency() -> Histogram {
    // 100 µs .. ~100 s
    Histogram::new(exponential_buckets(1e-4, 2.0, 21))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub milli_cpu: Family<SizeLabels, Gauge>,
    pub memory_bytes: Family<SizeLabels, Gauge>,
    pub stuck: Family<VmLabel, Gauge>,
    pub ops: Family<OpLabels, Counter>,
    pub op_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub upscale_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
    pub pressure_events: Family<VmLabel, Counter>,
    pub run_queue_delay: Family<DelayLabels, FloatGauge>,
    pub run_queue_waits: Family<VmLabel, Counter>,
    pub migrations: Family<MoveLabels, Counter>,
    pub migration_seconds: Family<MoveLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("vmscale_agent");
        let m = Metrics {
            registry: Registry::default(),
            milli_cpu: Family::default(),
            memory_bytes: Family::default(),
            stuck: Family::default(),
            ops: Family::default(),
            op_seconds: Family::new_with_constructor(latency),
            upscale_seconds: Family::new_with_constructor(latency),
            pressure_events: Family::default(),
            run_queue_delay: Family::default(),
            run_queue_waits: Family::default(),
            migrations: Family::default(),
            migration_seconds: Family::new_with_constructor(latency),
        };
        r.register("vm_milli_cpu", "VM CPU: current, desired or permitted", m.milli_cpu.clone());
        r.register("vm_memory_bytes", "VM memory: current, desired or permitted", m.memory_bytes.clone());
        r.register("vm_stuck", "1 while a VM's operations keep failing", m.stuck.clone());
        r.register("operations", "Executed actions by outcome", m.ops.clone());
        r.register("operation_seconds", "Time of one executed action", m.op_seconds.clone());
        r.register(
            "upscale_seconds",
            "Time from the event that called for an upscale to each stage",
            m.upscale_seconds.clone(),
        );
        r.register("pressure_events", "Pressure events received from the guest", m.pressure_events.clone());
        r.register(
            "vm_run_queue_delay_seconds",
            "Run-queue delay of the VM's vCPU threads on the host over the last interval (p50, p99, mean, max)",
            m.run_queue_delay.clone(),
        );
        r.register(
            "vm_run_queue_waits",
            "Waits of the VM's vCPU threads for a host CPU, measured",
            m.run_queue_waits.clone(),
        );
        r.register(
            "migrations",
            "Live migrations this node took part in, by role and outcome",
            m.migrations.clone(),
        );
        r.register(
            "migration_seconds",
            "Time of a live migration from the order to its end, by role and outcome",
            m.migration_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Drops a VM's series when its loop ends.
    pub fn forget(&self, vm: &str) {
        for size in ["current", "desired", "permitted"] {
            let l = SizeLabels { vm: vm.to_owned(), size };
            self.milli_cpu.remove(&l);
            self.memory_bytes.remove(&l);
        }
        self.stuck.remove(&VmLabel { vm: vm.to_owned() });
        self.forget_run_queue(vm);
    }

    /// Drops a VM's run-queue delay series (its threads are no longer watched).
    pub fn forget_run_queue(&self, vm: &str) {
        for stat in RUN_QUEUE_STATS {
            self.run_queue_delay.remove(&DelayLabels { vm: vm.to_owned(), stat });
        }
        self.run_queue_waits.remove(&VmLabel { vm: vm.to_owned() });
    }
}

/// The `stat` label values of `vm_run_queue_delay_seconds`.
pub const RUN_QUEUE_STATS: [&str; 4] = ["p50", "p99", "mean", "max"];
