//! Memory plugged into a full guest: `full.pl` fills the guest's 512 MiB of
//! boot memory (MemAvailable under 24 MiB), the harness plugs 10 DIMMs of
//! 128 MiB over QMP, and 8 new processes allocate 96 MiB each. The guest must
//! use the new memory: every process gets its memory and nothing is
//! OOM-killed, and each DIMM's memory map lies inside the DIMM (the new
//! zone manages less than was plugged). Once the processes are gone, the
//! last DIMM unplugs: the maps inside do not pin it. Without
//! `memory_hotplug.memmap_on_memory=1` (guest/mod.rs's CMDLINE) the same
//! guest OOM-kills here with 1.2 GiB of new memory free: the maps filled
//! what the boot memory had left, and the kernel's own allocations (page
//! tables, new processes) cannot use movable memory.
//!
//! No agent and no allocator: an agent plugs before the guest is this full
//! (the lead of its watermark), so the harness plugs after the fill itself,
//! on the path the agent's plugs take (QMP `object-add` and `device_add` of a
//! `pc-dimm`, ACPI hot-add in the guest). What is tested is the guest image's
//! kernel settings, with the real informant running inside as in production.

use anyhow::{ensure, Context};
use serde_json::json;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{guest_healthy, Console, Ctx};
use crate::cluster::qmp::Qmp;
use crate::cluster::{self, Vm, VmPlan};
use crate::console::value;

const BOOT_MIB: u64 = 512;
/// What the harness plugs in all, in DIMMs of `--dimm-mib` (128 MiB, one
/// memory block of the guest, by default).
const PLUGGED_MIB: u64 = 1280;
const CHILDREN: usize = 8;
const CHILD_MIB: u64 = 96;

/// One zone's free and managed MiB, from a `zones=Name:free/managed,...` word.
fn zone(line: &str, name: &str) -> Option<(f64, f64)> {
    let zones = line.split_whitespace().find_map(|w| w.strip_prefix("zones="))?;
    let (_, rest) = zones.split(',').filter_map(|z| z.split_once(':')).find(|(n, _)| *n == name)?;
    let (free, managed) = rest.split_once('/')?;
    Some((free.parse().ok()?, managed.parse().ok()?))
}

/// Free MiB of the zones the kernel's own allocations may use (all but Movable).
fn kernel_free(line: &str) -> f64 {
    ["DMA", "DMA32", "Normal"].iter().filter_map(|z| zone(line, z)).map(|(free, _)| free).sum()
}

/// The first console line holding `pat`, once there; fails as
/// [`guest_healthy`] does.
fn seen(console: &mut Console, vm: &mut Vm, pat: &str) -> anyhow::Result<Option<String>> {
    guest_healthy(vm, console)?;
    Ok(console.find_from(0, pat).map(|i| console.lines[i].1.clone()))
}

/// The guest: `BOOT_MIB` of boot memory, DIMMs of `--dimm-mib`, the full workload.
fn full_plan(ctx: &Ctx, go: &Path) -> VmPlan {
    VmPlan {
        id: "e2e-fullboot".into(),
        cu_milli_cpu: 125,
        cu_mib: ctx.dimm_mib,
        min_cus: 4,
        max_cus: 16, // QEMU's DIMM slots
        boot_mib: BOOT_MIB,
        boot_dimms: 0,
        cpus: 2,
        max_cpus: 2,
        workload: Some(format!("perl,{},{},{CHILDREN},{CHILD_MIB}", ctx.full, go.display())),
    }
}

/// The agent's plug, as it does it (backend, then DIMM), once per DIMM;
/// how long QEMU took for them all, s.
fn plug(qmp: &mut Qmp, dimms: u64, dimm_mib: u64) -> anyhow::Result<f64> {
    let plugged_at = Instant::now();
    for i in 0..dimms {
        let mem = format!("full-mem{i}");
        qmp.execute(
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": mem, "size": dimm_mib * cluster::MIB}),
        )?;
        qmp.execute(
            "device_add",
            json!({"driver": "pc-dimm", "id": format!("full-dimm{i}"), "memdev": mem}),
        )?;
    }
    Ok(plugged_at.elapsed().as_secs_f64())
}

/// The maps inside must not pin the DIMMs: with the processes gone, the
/// last DIMM unplugs (the guest offlines and ejects it, QEMU drops it).
/// How long that took, s.
fn unplug_last(
    ctx: &Ctx,
    (vm, console, qmp): (&mut Vm, &mut Console, &mut Qmp),
    dimms: u64,
    left: Duration,
) -> anyhow::Result<f64> {
    fs::write(ctx.dir.join("go.free"), "free\n")?;
    crate::harness::wait_for("the processes to free their memory", left, || {
        seen(console, vm, "full: freed")
    })?;
    let last = format!("full-dimm{}", dimms - 1);
    let unplug_at = Instant::now();
    qmp.execute("device_del", json!({ "id": last }))?;
    crate::harness::wait_for("the guest to let the last DIMM go", left.min(Duration::from_secs(60)), || {
        vm.check()?;
        let (ids, _) = qmp.memory()?;
        Ok((!ids.contains(&last)).then_some(()))
    })?;
    Ok(unplug_at.elapsed().as_secs_f64())
}

pub(super) fn full_boot_memory(ctx: &Ctx) -> anyhow::Result<String> {
    let timeout = ctx.timeout;
    let t0 = Instant::now();
    let left = || timeout.saturating_sub(t0.elapsed());
    let go = ctx.dir.join("go");
    let dimm_mib = ctx.dimm_mib;
    let dimms = PLUGGED_MIB / dimm_mib;
    let plan = full_plan(ctx, &go);
    let mut vm = Vm::boot_with_kernel_args(&ctx.image, &ctx.dir, &plan, &[], &ctx.kernel_args)?;
    let mut console = Console::default();
    let filled = crate::harness::wait_for("the guest's boot memory to fill", left(), || {
        seen(&mut console, &mut vm, "full: filled")
    })?;
    console.require_oom_watch(&vm)?;
    let total_full = value(&filled, "total").context("no total= in the filled line")?;

    let mut qmp = Qmp::connect(&vm.watch_qmp)?;
    let plug_s = plug(&mut qmp, dimms, dimm_mib)?;
    let (ids, qemu_bytes) = qmp.memory()?;
    ensure!(ids.len() as u64 == dimms, "QEMU holds {} DIMMs, not {dimms}", ids.len());
    let plugged_mib = PLUGGED_MIB as f64;
    // The guest onlines the DIMMs as ACPI tells it, one after the other:
    // the workload waits for MemTotal to have grown by nearly all of them
    // (their memory maps may take 1/64) before its processes start.
    let want = total_full + plugged_mib * 0.95;
    // Whole or not at all: the guest may look the moment the file appears.
    let tmp = ctx.dir.join("go.tmp");
    fs::write(&tmp, format!("{want:.0}\n"))?;
    fs::rename(&tmp, &go)?;
    let went = crate::harness::wait_for("the processes to start", left(), || {
        seen(&mut console, &mut vm, "full: go")
    })?;
    let total_go = value(&went, "total").context("no total= in the go line")?;
    ensure!(
        total_go >= want,
        "the guest onlined {:.0} of {plugged_mib:.0} MiB plugged within 60 s; console {}",
        total_go - total_full,
        vm.console_log.display()
    );
    let end = crate::harness::wait_for("every process to get its memory", left(), || {
        seen(&mut console, &mut vm, "full: end")
    })?;
    let children = value(&end, "children").context("no children= in the end line")?;
    ensure!(
        children == CHILDREN as f64,
        "{children} of {CHILDREN} processes got their {CHILD_MIB} MiB; console {}",
        vm.console_log.display()
    );
    ensure!(console.oom_kills() == 0, "OOM kill in the guest; console {}", vm.console_log.display());

    // Where the DIMMs' memory maps went: inside them, or out of the boot
    // memory (the zone they went to then manages all that was plugged).
    let (movable_free, movable_managed) = zone(&went, "Movable").context("no Movable zone after the plug")?;
    ensure!(
        movable_managed < plugged_mib - (dimms as f64) * 1.5,
        "the new zone manages {movable_managed:.0} of {plugged_mib:.0} MiB plugged: the DIMMs' memory maps \
         (2 MiB each) came out of the boot memory (memory_hotplug.memmap_on_memory off?)"
    );
    let (t_go, t_end) = (value(&went, "t").unwrap_or(0.0), value(&end, "t").unwrap_or(0.0));

    let unplug_s = unplug_last(ctx, (&mut vm, &mut console, &mut qmp), dimms, left())?;
    Ok(format!(
        "boot memory full ({:.0} MiB held, {:.0} MiB free in the kernel's zones); {dimms} DIMMs of {dimm_mib} MiB \
         plugged in {plug_s:.2} s (QEMU {} MiB), all online {:.2} s after the go file: MemTotal {total_full:.0} -> \
         {total_go:.0} MiB, the kernel's zones {:.0} MiB free, Movable manages {movable_managed:.0} MiB \
         ({movable_free:.0} free: the memory maps lie inside the DIMMs); {CHILDREN} new processes got {CHILD_MIB} \
         MiB each in {:.1} s, the kernel's zones kept {:.0} MiB free; OOM kills 0; once they were gone the last \
         DIMM unplugged in {unplug_s:.2} s",
        value(&filled, "held").unwrap_or(0.0),
        kernel_free(&filled),
        qemu_bytes / cluster::MIB,
        value(&went, "waited").unwrap_or(f64::NAN),
        kernel_free(&went),
        t_end - t_go,
        kernel_free(&end),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_are_read_from_the_workload_line() {
        let l = "full: go t=20.5 total=1652 avail=1269 zones=DMA:15/15,DMA32:6/377,Movable:1260/1260";
        assert_eq!(zone(l, "Movable"), Some((1260.0, 1260.0)));
        assert_eq!(zone(l, "DMA32"), Some((6.0, 377.0)));
        assert_eq!(zone(l, "Normal"), None);
        assert_eq!(kernel_free(l), 21.0);
        assert_eq!(zone("full: go t=1", "DMA"), None);
    }
}
