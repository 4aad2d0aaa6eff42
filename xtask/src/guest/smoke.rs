//! `cargo xtask build-guest --smoke`: boots the image under QEMU (TCG), waits
//! for the informant in the guest to answer a gRPC Handshake through QEMU's
//! port forward, checks the sources it reports, and stops QEMU.

use anyhow::{bail, Context};
use std::time::{Duration, Instant};
use vmscale_proto::informant as pb;
use vmscale_proto::informant::informant_client::InformantClient;

use super::qemu::{self, VmSpec};
use super::Image;

/// What the informant must report as running in our guest. `ebpf` joins
/// them when the image carries the eBPF object.
const REQUIRED_SOURCES: &[&str] = &["psi", "cgroup_events", "sampler"];

/// The figures of one boot, seconds.
#[derive(Debug, Default)]
pub struct Report {
    /// Host time from starting QEMU to the first line of /init.
    pub init_s: Option<f64>,
    /// The guest's uptime when /init started (kernel boot alone).
    pub init_uptime_s: Option<f64>,
    /// Host time from starting QEMU to the informant's "serving" log line.
    pub serving_s: Option<f64>,
    /// Host time from starting QEMU to the informant's Handshake answer.
    pub handshake_s: f64,
}

pub fn run(image: &Image, timeout: Duration, with_ebpf: bool) -> anyhow::Result<Report> {
    let port = crate::harness::free_port()?;
    let log = image.dir.join("smoke-console.log");
    let mut vm = qemu::boot(image, &VmSpec::small(port, log.clone()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut report = Report::default();
    let deadline = vm.started + timeout;
    let answer = loop {
        report.read_console(&vm);
        if let Some(status) = vm.exited() {
            bail!("QEMU stopped ({status}) before the informant answered; console in {}", log.display());
        }
        if Instant::now() > deadline {
            bail!(
                "the informant did not answer a Handshake on 127.0.0.1:{port} within {} s; console in {}",
                timeout.as_secs(),
                log.display()
            );
        }
        match rt.block_on(handshake(port)) {
            Ok(r) => break r,
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    report.handshake_s = vm.started.elapsed().as_secs_f64();
    report.read_console(&vm);
    drop(vm);

    let mut required = REQUIRED_SOURCES.to_vec();
    if with_ebpf {
        required.push("ebpf");
    }
    for s in &answer.sources {
        let state = if s.available { "up" } else { "down" };
        eprintln!("    source {:<14} {state:<4} {}", s.name, s.reason);
    }
    for name in required {
        match answer.sources.iter().find(|s| s.name == name) {
            Some(s) if s.available => {}
            Some(s) => bail!("the informant in the guest runs without its {name} source: {}", s.reason),
            None => bail!("the informant's handshake does not list a {name} source"),
        }
    }
    Ok(report)
}

impl Report {
    /// Picks the boot's milestones from the console lines that arrived.
    fn read_console(&mut self, vm: &qemu::Vm) {
        while let Ok((at, line)) = vm.console.try_recv() {
            let since_start = Some(at.duration_since(vm.started).as_secs_f64());
            if self.init_s.is_none() && line.contains("init started") {
                self.init_s = since_start;
                self.init_uptime_s = uptime_of(&line);
            }
            if self.serving_s.is_none() && line.contains("informant serving") {
                self.serving_s = since_start;
            }
        }
    }
}

async fn handshake(port: u16) -> anyhow::Result<pb::HandshakeResponse> {
    let attempt = async {
        let mut client = InformantClient::connect(format!("http://127.0.0.1:{port}")).await?;
        let versions = vmscale_proto::INFORMANT_PROTOCOL;
        let req = pb::HandshakeRequest {
            versions: Some(pb::VersionRange { min: *versions.start(), max: *versions.end() }),
            agent: "xtask build-guest --smoke".into(),
        };
        anyhow::Ok(client.handshake(req).await?.into_inner())
    };
    // QEMU's forward accepts at once even while nothing listens in the guest,
    // and such an attempt can stall; once the informant listens it answers
    // in milliseconds.
    tokio::time::timeout(Duration::from_secs(1), attempt).await.context("handshake timed out")?
}

/// `vmscale: [9.87] init started: ...` -> 9.87.
fn uptime_of(line: &str) -> Option<f64> {
    let rest = line.split_once("vmscale: [")?.1;
    rest.split_once(']')?.0.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_comes_from_the_log_line() {
        assert_eq!(uptime_of("vmscale: [9.87] init started: kernel x"), Some(9.87));
        assert_eq!(uptime_of("[    1.0] random kernel line"), None);
    }
}
