//! Latency of QMP hotplug from our client, against a real QEMU. Feeds the
//! `qmp_cpu_plug_ms` and `qmp_mem_plug_ms` benchmark figures
//! (`cargo run -p vmscale-agent --example qmp_bench`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::client::{ClientConfig, Endpoint, QmpClient};
use super::hypervisor::{Hotplug, HotplugConfig};
use super::process::{QemuOptions, QemuProcess};
use super::vm::QmpVm;

/// How many times to repeat each measurement.
#[derive(Debug, Clone, Copy)]
pub struct BenchPlan {
    pub roundtrips: usize,
    /// vCPU plugs (the bench VM gets this many free slots).
    pub cpu_plugs: usize,
    /// DIMM plugs (the bench VM gets this many slots).
    pub dimm_plugs: usize,
    pub dimm_bytes: u64,
}

impl Default for BenchPlan {
    fn default() -> Self {
        Self { roundtrips: 200, cpu_plugs: 30, dimm_plugs: 30, dimm_bytes: 128 << 20 }
    }
}

/// The figures, in milliseconds; `_p50`/`_p99` over the repeats.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub qemu_version: String,
    pub accel: String,
    pub roundtrips: usize,
    /// `query-status` through a blocking socket and nothing else: the floor.
    pub raw_roundtrip_ms_p50: f64,
    /// `query-status` through [`QmpClient`].
    pub qmp_roundtrip_ms_p50: f64,
    pub qmp_roundtrip_ms_p99: f64,
    pub cpu_plugs: usize,
    /// The bare `device_add` of a vCPU.
    pub cpu_device_add_ms_p50: f64,
    /// `query-hotpluggable-cpus` on the same QEMU, the op's extra step.
    pub cpu_slot_query_ms_p50: f64,
    /// [`Hotplug::plug_vcpu`]: slot query plus `device_add`.
    pub qmp_cpu_plug_ms: f64,
    pub dimm_plugs: usize,
    pub dimm_bytes: u64,
    /// The bare `object-add` plus `device_add pc-dimm`.
    pub dimm_add_ms_p50: f64,
    /// [`Hotplug::plug_dimm`]: leftover check, `object-add`, `device_add`.
    pub qmp_mem_plug_ms: f64,
    /// `qom-set requested-size` on virtio-mem through [`Hotplug`].
    pub virtio_mem_resize_ms_p50: f64,
}

/// The `p`-quantile (0..=1) of durations, in milliseconds (nearest rank).
pub fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    vmscale_common::stats::quantile(samples, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

type BenchResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn timed<T, F: std::future::Future<Output = super::Result<T>>>(f: F) -> BenchResult<Duration> {
    let start = Instant::now();
    f.await?;
    Ok(start.elapsed())
}

/// Starts QEMUs in `dir` (one per phase, so each has fresh slots) and
/// measures. `binary` is `qemu-system-x86_64`.
pub async fn run(binary: &Path, dir: &Path, plan: BenchPlan) -> BenchResult<BenchReport> {
    let mut options = QemuOptions::new(binary.to_path_buf());
    options.max_cpus = u32::try_from(plan.cpu_plugs + 1)?;
    options.dimm_slots = u32::try_from(plan.dimm_plugs)?.max(1);
    let dimm_mib = plan.dimm_bytes >> 20;
    options.max_memory_mib = options.memory_mib + dimm_mib * 2 * plan.dimm_plugs as u64;
    let config = ClientConfig::default();

    // Round trips; the raw client first, while QEMU's socket is still free.
    let qemu = QemuProcess::spawn(&options, &phase_dir(dir, "roundtrip")?).await?;
    let raw = raw_roundtrips(qemu.endpoint(), plan.roundtrips)?;
    let client = QmpClient::connect(qemu.endpoint(), config.clone()).await?;
    let qemu_version = {
        let v = &client.greeting().version;
        format!("{}.{}.{} ({})", v.qemu.major, v.qemu.minor, v.qemu.micro, v.package)
    };
    let mut ours = Vec::with_capacity(plan.roundtrips);
    for _ in 0..plan.roundtrips {
        ours.push(timed(client.execute::<Value>("query-status", None)).await?);
    }
    let vm = QmpVm::new(client, HotplugConfig::default());
    let mut resize = Vec::new();
    for i in 0..20u64 {
        resize.push(timed(vm.set_virtio_mem_size((i % 4) * (128 << 20))).await?);
    }
    drop((vm, qemu));

    // vCPUs: half bare device_add, half through the Hotplug op.
    let qemu = QemuProcess::spawn(&options, &phase_dir(dir, "cpu")?).await?;
    let vm = QmpVm::new(QmpClient::connect(qemu.endpoint(), config.clone()).await?, HotplugConfig::default());
    let (mut cpu_raw, mut cpu_op, mut cpu_query) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..plan.cpu_plugs {
        settle().await;
        if i % 2 == 0 {
            cpu_op.push(timed(vm.plug_vcpu()).await?);
        } else {
            let start = Instant::now();
            let cpus = vm.hotpluggable_cpus().await?;
            cpu_query.push(start.elapsed());
            let (index, slot) = super::cpu::plan_plug(&cpus)?;
            let args = super::cpu::device_add_args(slot, &super::cpu::cpu_device_id(index));
            cpu_raw.push(timed(vm.client().execute::<Value>("device_add", Some(args))).await?);
        }
    }
    drop((vm, qemu));

    // DIMMs, the same way.
    let qemu = QemuProcess::spawn(&options, &phase_dir(dir, "dimm")?).await?;
    let vm = QmpVm::new(QmpClient::connect(qemu.endpoint(), config).await?, HotplugConfig::default());
    let (mut dimm_raw, mut dimm_op) = (Vec::new(), Vec::new());
    for i in 0..plan.dimm_plugs {
        settle().await;
        if i % 2 == 0 {
            dimm_op.push(timed(vm.plug_dimm(plan.dimm_bytes)).await?);
        } else {
            let (id, backend) = (format!("bench-dimm{i}"), format!("bench-dimm{i}-mem"));
            let start = Instant::now();
            let backend_args =
                json!({"qom-type": "memory-backend-ram", "id": backend, "size": plan.dimm_bytes});
            vm.client().execute::<Value>("object-add", Some(backend_args)).await?;
            let device_args = json!({"driver": "pc-dimm", "id": id, "memdev": backend});
            vm.client().execute::<Value>("device_add", Some(device_args)).await?;
            dimm_raw.push(start.elapsed());
        }
    }
    drop((vm, qemu));

    Ok(BenchReport {
        qemu_version,
        accel: options.accel.name().to_owned(),
        roundtrips: plan.roundtrips,
        raw_roundtrip_ms_p50: percentile_ms(&mut raw.clone(), 0.5),
        qmp_roundtrip_ms_p50: percentile_ms(&mut ours, 0.5),
        qmp_roundtrip_ms_p99: percentile_ms(&mut ours, 0.99),
        cpu_plugs: plan.cpu_plugs,
        cpu_device_add_ms_p50: percentile_ms(&mut cpu_raw, 0.5),
        cpu_slot_query_ms_p50: percentile_ms(&mut cpu_query, 0.5),
        qmp_cpu_plug_ms: percentile_ms(&mut cpu_op, 0.5),
        dimm_plugs: plan.dimm_plugs,
        dimm_bytes: plan.dimm_bytes,
        dimm_add_ms_p50: percentile_ms(&mut dimm_raw, 0.5),
        qmp_mem_plug_ms: percentile_ms(&mut dimm_op, 0.5),
        virtio_mem_resize_ms_p50: percentile_ms(&mut resize, 0.5),
    })
}

/// QEMU keeps working for a few ms after a `device_add` returns (memory map
/// updates); the next command would pay for it. Plugs in the agent are far
/// apart, so each measurement starts from a quiet QEMU.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

fn phase_dir(dir: &Path, phase: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(phase);
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// Round trips over a plain blocking socket: what QEMU itself costs.
fn raw_roundtrips(endpoint: &Endpoint, n: usize) -> BenchResult<Vec<Duration>> {
    let Endpoint::Unix(path) = endpoint else {
        return Err("the raw baseline needs a unix socket".into());
    };
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    let mut exchange = |request: &[u8]| -> std::io::Result<()> {
        writer.write_all(request)?;
        line.clear();
        reader.read_line(&mut line)?;
        Ok(())
    };
    // The greeting arrives unasked.
    exchange(b"")?;
    exchange(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        exchange(b"{\"execute\":\"query-status\"}\n")?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=10).rev().map(Duration::from_millis).collect();
        assert!((percentile_ms(&mut samples, 0.5) - 5.0).abs() < 1e-9);
        assert!((percentile_ms(&mut samples, 0.99) - 10.0).abs() < 1e-9);
        assert!((percentile_ms(&mut samples, 0.0) - 1.0).abs() < 1e-9);
        assert!(percentile_ms(&mut [], 0.5).is_nan());
    }
}
