//! "Nodes" as network namespaces on one flat L2 network, for live migration
//! with TCP connections that survive the move.
//!
//! ```text
//!   host ns: <p>h 10.N.M.254 ──┐
//!                              │ veth
//!   <p>-sw:  bridge sw ────────┼──────────────┐
//!                              │ veth         │ veth
//!   <p>-n0:  bridge br0 10.N.M.1   <p>-n1: bridge br0 10.N.M.2
//!              └─ tap vm0 (QEMU)             └─ tap vm0 (QEMU after the move)
//! ```
//!
//! Each node's bridge holds the node's own address (where a migration
//! target listens) and the taps of its VMs, so a VM keeps its address on
//! whichever node it runs: the bridges learn the new port from QEMU's
//! announcement after the move. The host end lets a client in this process
//! talk to the guests without entering a namespace.
//!
//! Everything is named after this process's pid (`vmsm<pid>`), removed when
//! the [`Fabric`] drops (also on an error or a panic), and a later run sweeps
//! namespaces left by runs that were killed.

use anyhow::{bail, Context};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Where the fabric's namespace names start.
const PREFIX: &str = "vmsm";

/// One node: a namespace with a bridge holding the node's address.
#[derive(Debug, Clone)]
pub struct Node {
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The node's veth towards the switch, for cutting its network.
    uplink: String,
}

/// The switch, the nodes and the host's link to them.
#[derive(Debug)]
pub struct Fabric {
    prefix: String,
    switch: String,
    pub nodes: Vec<Node>,
    /// The /24 everything lives in: `a.b.c.0`.
    net: [u8; 3],
    /// Namespaces created so far; dropped ones are deleted.
    created: Vec<String>,
}

/// Runs `ip` with `args`; the error names the command and ip's complaint.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `ip -n NS ...`
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    // Lines look like "name (id: 3)" or "name".
    text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

/// The pid in one of our namespace names, `vmsm<pid>-...`.
fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes namespaces of earlier runs whose process is gone (killed by a
/// signal, so no destructor ran), and kills the QEMUs still running in
/// them: children of a killed xtask get no signal of their own.
pub fn sweep_stale() {
    for ns in namespaces() {
        let Some(pid) = owner_pid(&ns) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_processes_in(&ns);
        if ip(&["netns", "del", &ns]).is_ok() {
            eprintln!("    removed network namespace {ns} left by a run that was killed");
        }
    }
}

/// Kills every process whose network namespace is `ns` (`ip netns pids`).
fn kill_processes_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<u32>() {
            // A process that ended meanwhile is fine.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

/// Whether this process may build namespaces (root), and why not.
pub fn can_run() -> Result<(), String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if !root {
        return Err("network namespaces, bridges and taps need root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing: tap devices cannot be made".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("`ip` is missing: install iproute2".into());
    }
    Ok(())
}

impl Fabric {
    /// Builds the switch and `nodes` nodes. The subnet comes from the pid,
    /// so two runs at once (a test and a benchmark) don't collide.
    pub fn new(nodes: usize) -> anyhow::Result<Fabric> {
        if let Err(why) = can_run() {
            bail!("cannot build the migration network: {why}");
        }
        sweep_stale();
        let pid = std::process::id();
        let prefix = format!("{PREFIX}{pid}");
        let net = [10, 201 + (pid % 50) as u8, (pid / 50 % 250) as u8];
        let mut f =
            Fabric { switch: format!("{prefix}-sw"), prefix, nodes: Vec::new(), net, created: Vec::new() };
        f.build(nodes)?;
        Ok(f)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        ip_in(ns, &["link", "set", "lo", "up"])
    }

    fn build(&mut self, nodes: usize) -> anyhow::Result<()> {
        let sw = self.switch.clone();
        self.add_ns(&sw)?;
        ip_in(&sw, &["link", "add", "sw", "type", "bridge"])?;
        ip_in(&sw, &["link", "set", "sw", "up"])?;
        // The host's end: created in the host ns, its peer moved to the switch.
        let host = self.host_link();
        ip(&["link", "add", &host, "type", "veth", "peer", "name", "uplink-h", "netns", &sw])?;
        ip_in(&sw, &["link", "set", "uplink-h", "master", "sw", "up"])?;
        ip(&["addr", "add", &format!("{}/24", self.addr(254)), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        for i in 0..nodes {
            let ns = format!("{}-n{i}", self.prefix);
            self.add_ns(&ns)?;
            let uplink = format!("uplink-{i}");
            ip_in(&ns, &["link", "add", "br0", "type", "bridge"])?;
            ip_in(&ns, &["link", "add", "eth0", "type", "veth", "peer", "name", &uplink, "netns", &sw])?;
            ip_in(&ns, &["link", "set", "eth0", "master", "br0", "up"])?;
            ip_in(&sw, &["link", "set", &uplink, "master", "sw", "up"])?;
            let addr = self.addr(u8::try_from(i + 1).ok().filter(|&n| n < 50).context("at most 49 nodes")?);
            ip_in(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "br0"])?;
            ip_in(&ns, &["link", "set", "br0", "up"])?;
            self.nodes.push(Node { ns, addr, uplink });
        }
        Ok(())
    }

    /// The host's veth towards the switch.
    fn host_link(&self) -> String {
        format!("{}h", self.prefix)
    }

    /// `a.b.c.last` in the fabric's subnet.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], last)
    }

    /// The gateway a guest uses: the host's end.
    pub fn gateway(&self) -> Ipv4Addr {
        self.addr(254)
    }

    /// A tap `name` on `node`'s bridge, for a QEMU started in that node's
    /// namespace (`-netdev tap,ifname=NAME,script=no,downscript=no`).
    pub fn add_tap(&self, node: usize, name: &str) -> anyhow::Result<()> {
        let ns = &self.nodes[node].ns;
        ip_in(ns, &["tuntap", "add", "dev", name, "mode", "tap"])?;
        ip_in(ns, &["link", "set", name, "master", "br0", "up"])
    }

    /// `ip netns exec NS program`: a command that runs in `node`'s namespace.
    pub fn command_in(&self, node: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nodes[node].ns, program]);
        c
    }

    /// Cuts (`false`) or restores (`true`) a node's link to the switch.
    pub fn set_link(&self, node: usize, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        ip_in(&self.switch, &["link", "set", &self.nodes[node].uplink, state])
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Nodes first, then the switch (which takes the host's veth with it).
        for ns in self.created.iter().rev() {
            kill_processes_in(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("warning: cannot delete network namespace {ns}: {e:#}");
            }
        }
        // In case the switch went first somehow: the host end must not stay.
        let host = self.host_link();
        if Command::new("ip").args(["link", "show", &host]).output().is_ok_and(|o| o.status.success()) {
            let _ = ip(&["link", "del", &host]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_come_from_our_names_only() {
        assert_eq!(owner_pid("vmsm1234-n0"), Some(1234));
        assert_eq!(owner_pid("vmsm77-sw"), Some(77));
        assert_eq!(owner_pid("other-ns"), None);
        assert_eq!(owner_pid("vmsmx-sw"), None);
    }
}
