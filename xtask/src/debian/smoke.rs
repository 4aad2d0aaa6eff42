//! `cargo xtask build-guest --os debian --smoke`: boots the image under QEMU
//! (TCG, 1 vCPU, 1 GiB, user networking with PostgreSQL's port forwarded),
//! waits for the ready line with both services active and for the
//! informant's line with every source running, then runs `SELECT 1` with
//! psql (`crate::pgbench::sql`) from the host through the forward, and stops
//! QEMU.

use anyhow::{bail, Context};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use vmscale_agent::qmp::qemu_args::{loopback, Network};

use super::boot::{self, Shape};
use super::{DebianImage, IMAGE_DIR, PG_PASSWORD, PG_PORT, READY_PREFIX};
use crate::guest::qemu::Vm;
use crate::pgbench::Target;

/// The informant's port in the smoke test's guest.
const INFORMANT_PORT: u16 = 7080;
/// The informant's sources that must run in the guest.
const REQUIRED_SOURCES: &[&str] = &["ebpf", "psi", "cgroup_events", "sampler", "watermark"];
/// How long the informant's lines may take after the ready line.
const SOURCES_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the first query may take after the ready line.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds from QEMU's start.
#[derive(Debug)]
pub struct Report {
    pub ready_s: f64,
    pub query_s: f64,
}

pub fn run(root: &Path, image: &DebianImage, timeout: Duration) -> anyhow::Result<Report> {
    crate::pgbench::ensure_client()?;
    let dir = root.join(IMAGE_DIR).join("smoke");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A fresh overlay each run: the image may have been rebuilt since.
    let overlay = dir.join("root.qcow2");
    let _ = std::fs::remove_file(&overlay);
    super::overlay(image, &overlay)?;
    let port = crate::harness::free_port()?;
    // The informant on TCP (no vsock device here): the ready line then also
    // says the kernel command line reached it.
    let mut extra = boot::static_ip(Ipv4Addr::new(10, 0, 2, 15), 24, Some(Ipv4Addr::new(10, 0, 2, 2)));
    extra.push(boot::informant_tcp(INFORMANT_PORT));
    let mut q = boot::qemu_args(image, &overlay, &Shape::small(), &extra);
    q.network = Some(Network::User { host: loopback(port), guest_port: PG_PORT });
    let log = dir.join("console.log");
    let mut vm = boot::start(&q, &log, true)?;

    let line = wait_ready(&mut vm, &log, timeout)?;
    let ready_s = vm.started.elapsed().as_secs_f64();
    match boot::ready_states(&line) {
        Some(("active", "active")) => {}
        Some((pg, inf)) => {
            // The guest prints why after the line: let it arrive in the log.
            std::thread::sleep(Duration::from_secs(3));
            bail!(
                "the guest is up but postgres={pg} informant={inf}; its failed units and the \
                 informant's journal follow the ready line in {}",
                log.display()
            );
        }
        None => bail!("a ready line without both states: {line}"),
    }
    check_sources(&vm, &log)?;
    first_query(port)?;
    let query_s = vm.started.elapsed().as_secs_f64();
    drop(vm);
    let _ = std::fs::remove_file(&overlay);
    Ok(Report { ready_s, query_s })
}

/// The console's ready line, once it comes.
fn wait_ready(vm: &mut Vm, log: &Path, timeout: Duration) -> anyhow::Result<String> {
    let deadline = vm.started + timeout;
    loop {
        if let Some(status) = vm.exited() {
            bail!("QEMU stopped ({status}) before the guest was ready; console in {}", log.display());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "no ready line (\"{READY_PREFIX} ...\") within {} s; console in {}",
                timeout.as_secs(),
                log.display()
            );
        }
        match vm.console.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok((_, l)) if l.contains(READY_PREFIX) => return Ok(l),
            _ => {}
        }
    }
}

/// `SELECT 1` in the guest's `pgbench` database as `postgres` with the
/// image's password, through the port forward, until it answers.
fn first_query(port: u16) -> anyhow::Result<()> {
    let target = Target { connect_timeout_s: 3, ..Target::new("127.0.0.1", port, "pgbench", "postgres") }
        .password(PG_PASSWORD);
    let started = Instant::now();
    loop {
        let out = crate::pgbench::sql(&target, &crate::pgbench::host, "SELECT 1", QUERY_TIMEOUT)?;
        if out.error.is_none() && out.output == "1" {
            return Ok(());
        }
        if started.elapsed() > QUERY_TIMEOUT {
            bail!(
                "SELECT 1 through 127.0.0.1:{port} failed for {} s after the ready line: {}",
                QUERY_TIMEOUT.as_secs(),
                out.error.unwrap_or(out.output)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The guest prints the informant's "informant serving ... sources=[...]"
/// line (and any "source unavailable" line) right after the ready line: every
/// source must run, eBPF included (it needs the package's sysctl on Debian's
/// kernel).
fn check_sources(vm: &Vm, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + SOURCES_TIMEOUT;
    let mut unavailable = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the guest printed no \"informant serving\" line after its ready line; console in {}",
                log.display()
            );
        }
        let Ok((_, line)) = vm.console.recv_timeout(left) else { continue };
        if line.contains("source unavailable") {
            unavailable.push(line);
        } else if line.contains("informant serving") {
            let missing: Vec<&str> =
                REQUIRED_SOURCES.iter().copied().filter(|s| !line.contains(&format!("\"{s}\""))).collect();
            if !missing.is_empty() {
                bail!("the informant runs without {missing:?}: {}", unavailable.join("; "));
            }
            eprintln!("    informant sources: {}", line.split_once("sources=").map_or("?", |(_, s)| s));
            return Ok(());
        }
    }
}
