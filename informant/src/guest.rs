//! What the guest sees of its CPUs and memory, and the sysfs writes that take
//! CPUs and memory blocks online or offline. Every path hangs off roots given
//! to [`Guest::new`], so tests run on a fake tree.
//!
//! CPUs are counted from the per-CPU `cpuN/online` files (cpu0 usually has
//! none: it cannot go offline), which is what the writes change.

use crate::procfs;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestResources {
    pub online_cpus: u32,
    pub present_cpus: u32,
    /// MemTotal, bytes.
    pub memory_total_bytes: u64,
    /// Online memory blocks times the block size, bytes.
    pub memory_online_bytes: u64,
    /// What could not be done or read, one sentence each.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cpu {
    n: u32,
    online: bool,
    /// Has an `online` file (cpu0 normally has not).
    switchable: bool,
}

#[derive(Debug, Clone)]
pub struct Guest {
    cpu_dir: PathBuf,
    memory_dir: PathBuf,
    meminfo: PathBuf,
}

/// `prefix<N>` directory names in `dir`, sorted by N.
fn numbered(dir: &Path, prefix: &str) -> io::Result<Vec<u32>> {
    let mut out: Vec<u32> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

impl Guest {
    pub fn new(proc_root: &Path, sys_root: &Path) -> Guest {
        Guest {
            cpu_dir: sys_root.join("devices/system/cpu"),
            memory_dir: sys_root.join("devices/system/memory"),
            meminfo: proc_root.join("meminfo"),
        }
    }

    fn cpus(&self) -> io::Result<Vec<Cpu>> {
        numbered(&self.cpu_dir, "cpu")?
            .into_iter()
            .map(|n| match fs::read_to_string(self.cpu_dir.join(format!("cpu{n}/online"))) {
                Ok(s) => Ok(Cpu { n, online: s.trim() == "1", switchable: true }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Ok(Cpu { n, online: true, switchable: false })
                }
                Err(e) => Err(e),
            })
            .collect()
    }

    fn set_cpu(&self, n: u32, online: bool) -> io::Result<()> {
        fs::write(self.cpu_dir.join(format!("cpu{n}/online")), if online { "1" } else { "0" })
    }

    fn block_size(&self) -> io::Result<u64> {
        let s = fs::read_to_string(self.memory_dir.join("block_size_bytes"))?;
        u64::from_str_radix(s.trim(), 16).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// (block number, state) of every memory block; "unreadable" where the
    /// state cannot be read.
    fn blocks(&self) -> io::Result<Vec<(u32, String)>> {
        Ok(numbered(&self.memory_dir, "memory")?
            .into_iter()
            .map(|n| {
                let s = fs::read_to_string(self.memory_dir.join(format!("memory{n}/state")));
                (n, s.map_or_else(|_| "unreadable".to_owned(), |s| s.trim().to_owned()))
            })
            .collect())
    }

    /// What the guest sees now.
    pub fn resources(&self) -> GuestResources {
        let mut r = GuestResources::default();
        match self.cpus() {
            Ok(cpus) => {
                r.present_cpus = u32::try_from(cpus.len()).unwrap_or(u32::MAX);
                r.online_cpus = u32::try_from(cpus.iter().filter(|c| c.online).count()).unwrap_or(u32::MAX);
            }
            Err(e) => r.warnings.push(format!("cannot list CPUs in {}: {e}", self.cpu_dir.display())),
        }
        match fs::read_to_string(&self.meminfo).ok().and_then(|t| procfs::parse_meminfo(&t)) {
            Some(m) => r.memory_total_bytes = m.total_bytes,
            None => r.warnings.push(format!("cannot read MemTotal from {}", self.meminfo.display())),
        }
        match self.block_size().and_then(|size| Ok((size, self.blocks()?))) {
            Ok((size, blocks)) => {
                let online = blocks.iter().filter(|(_, s)| s.starts_with("online")).count();
                r.memory_online_bytes = size.saturating_mul(u64::try_from(online).unwrap_or(u64::MAX));
            }
            Err(e) => r.warnings.push(format!(
                "cannot read memory blocks in {} ({e}); is the guest kernel built with memory hotplug?",
                self.memory_dir.display()
            )),
        }
        r
    }

    /// Brings CPUs online, lowest number first: all offline ones when
    /// `target` is `None`, else until `target` are online. Returns warnings.
    pub fn online_cpus(&self, target: Option<u32>) -> Vec<String> {
        let cpus = match self.cpus() {
            Ok(c) => c,
            Err(e) => return vec![format!("cannot list CPUs in {}: {e}", self.cpu_dir.display())],
        };
        let mut online = cpus.iter().filter(|c| c.online).count();
        let mut warnings = Vec::new();
        for c in cpus.iter().filter(|c| !c.online && c.switchable) {
            if target.is_some_and(|t| online >= t as usize) {
                break;
            }
            match self.set_cpu(c.n, true) {
                Ok(()) => {
                    online += 1;
                    info!(cpu = c.n, "cpu online");
                }
                Err(e) => warnings.push(format!("cpu{} would not come online: {e}", c.n)),
            }
        }
        if let Some(t) = target.filter(|&t| online < t as usize) {
            warnings
                .push(format!("{online} CPUs online, fewer than the {t} asked for: the guest has no more"));
        }
        warnings
    }

    /// Takes CPUs offline, highest number first and never cpu0, until
    /// `target` remain online. Returns warnings.
    pub fn offline_cpus(&self, target: u32) -> Vec<String> {
        let cpus = match self.cpus() {
            Ok(c) => c,
            Err(e) => return vec![format!("cannot list CPUs in {}: {e}", self.cpu_dir.display())],
        };
        let mut online = cpus.iter().filter(|c| c.online).count();
        let mut warnings = Vec::new();
        for c in cpus.iter().rev().filter(|c| c.online && c.switchable && c.n != 0) {
            if online <= target.max(1) as usize {
                break;
            }
            match self.set_cpu(c.n, false) {
                Ok(()) => {
                    online -= 1;
                    info!(cpu = c.n, "cpu offline");
                }
                Err(e) => warnings.push(format!("cpu{} would not go offline: {e}", c.n)),
            }
        }
        if online > target as usize {
            warnings.push(format!("{online} CPUs still online, more than the {target} asked for"));
        }
        warnings
    }

    /// Brings every offline memory block online, movable where the kernel
    /// allows (so it can be unplugged again), else as normal memory.
    pub fn online_memory(&self) -> Vec<String> {
        let blocks = match self.blocks() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                return vec![format!("cannot list memory blocks in {}: {e}", self.memory_dir.display())]
            }
        };
        let mut warnings = Vec::new();
        for (n, _) in blocks.iter().filter(|(_, s)| s == "offline") {
            let state = self.memory_dir.join(format!("memory{n}/state"));
            let read = || fs::read_to_string(&state).map(|s| s.trim().to_owned());
            match online_block(|s| fs::write(&state, s), read) {
                Ok(how) => info!(block = n, how, "memory block online"),
                Err(e) => {
                    warn!(block = n, "memory block would not come online: {e}");
                    warnings.push(format!("memory block memory{n} would not come online: {e}"));
                }
            }
        }
        warnings
    }

    /// Whether the guest has what an upscale announced (0 = unchanged).
    /// Memory counts as arrived within one block of the announced size,
    /// since the kernel's view and QEMU's differ by holes.
    pub fn has_arrived(&self, r: &GuestResources, cpus: u32, memory_bytes: u64) -> bool {
        let cpus_ok = cpus == 0 || r.online_cpus >= cpus;
        let memory_ok = memory_bytes == 0
            || match self.block_size() {
                Ok(size) => r.memory_online_bytes.saturating_add(size) > memory_bytes,
                Err(_) => true, // no memory hotplug in this guest: nothing to wait for
            };
        cpus_ok && memory_ok
    }
}

/// Writes `online_movable`, falling back to `online` when the kernel refuses
/// (a block next to normal memory cannot be movable). Returns what worked.
/// A block the kernel onlined itself meanwhile (`memhp_default_state`: it
/// lists as offline for a moment after the plug, then the write finds it
/// online and fails with EINVAL) is no failure: `state` reads `online`.
fn online_block(
    mut write: impl FnMut(&str) -> io::Result<()>,
    state: impl Fn() -> io::Result<String>,
) -> io::Result<&'static str> {
    let online_already = || state().is_ok_and(|s| s == "online");
    match write("online_movable") {
        Ok(()) => Ok("online_movable"),
        Err(_) if online_already() => Ok("by the kernel"),
        Err(_) => match write("online") {
            Ok(()) => Ok("online"),
            Err(_) if online_already() => Ok("by the kernel"),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeGuest;

    const MIB: u64 = 1 << 20;

    fn guest(g: &FakeGuest) -> Guest {
        Guest::new(&g.proc(), &g.sys())
    }

    #[test]
    fn resources_of_a_fresh_guest() {
        let g = FakeGuest::new();
        g.add_cpu(2, false);
        g.add_memory_block(8, "offline");
        let r = guest(&g).resources();
        assert_eq!(
            r,
            GuestResources {
                online_cpus: 2,
                present_cpus: 3,
                memory_total_bytes: 4 << 30,
                memory_online_bytes: 1 << 30,
                warnings: vec![],
            }
        );
    }

    #[test]
    fn upscale_onlines_every_offline_cpu_and_block() {
        let g = FakeGuest::new();
        g.add_cpu(2, false);
        g.add_cpu(3, false);
        g.add_memory_block(8, "offline");
        g.add_memory_block(9, "offline");
        let gu = guest(&g);
        assert!(gu.online_cpus(None).is_empty());
        assert!(gu.online_memory().is_empty());
        assert!(g.cpu_online(2) && g.cpu_online(3));
        assert_eq!(g.block_state(8), "online_movable");
        let r = gu.resources();
        assert_eq!((r.online_cpus, r.memory_online_bytes), (4, 10 * 128 * MIB));
        assert!(gu.has_arrived(&r, 4, 10 * 128 * MIB));
        assert!(!gu.has_arrived(&r, 5, 0));
        assert!(!gu.has_arrived(&r, 0, 12 * 128 * MIB));
    }

    #[test]
    fn sysfs_mode_onlines_only_up_to_the_target() {
        let g = FakeGuest::new();
        for n in 2..6 {
            g.add_cpu(n, false);
        }
        let gu = guest(&g);
        assert!(gu.online_cpus(Some(4)).is_empty());
        assert_eq!((2..6).map(|n| g.cpu_online(n)).collect::<Vec<_>>(), [true, true, false, false]);
        let w = gu.online_cpus(Some(9));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("fewer than the 9"), "{w:?}");
    }

    #[test]
    fn offlining_goes_highest_first_and_never_takes_cpu0() {
        let g = FakeGuest::new();
        g.add_cpu(2, true);
        g.add_cpu(3, true);
        let gu = guest(&g);
        assert!(gu.offline_cpus(2).is_empty());
        assert_eq!((0..4).map(|n| g.cpu_online(n)).collect::<Vec<_>>(), [true, true, false, false]);
        // Asking for 0 still leaves cpu0 (and one CPU) running.
        let w = gu.offline_cpus(0);
        assert!(g.cpu_online(0) && !g.cpu_online(1));
        assert_eq!(w, ["1 CPUs still online, more than the 0 asked for"]);
    }

    #[test]
    fn a_block_refusing_movable_comes_online_as_normal_memory() {
        let mut tried = Vec::new();
        let offline = || Ok("offline".to_owned());
        let how = online_block(
            |s| {
                tried.push(s.to_owned());
                if s == "online_movable" {
                    Err(io::Error::from_raw_os_error(22))
                } else {
                    Ok(())
                }
            },
            offline,
        );
        assert_eq!(how.unwrap(), "online");
        assert_eq!(tried, ["online_movable", "online"]);
        assert!(online_block(|_| Err(io::Error::from_raw_os_error(16)), offline).is_err());
    }

    #[test]
    fn a_block_the_kernel_onlined_first_is_no_failure() {
        let refused = |_: &str| Err(io::Error::from_raw_os_error(22));
        assert_eq!(online_block(refused, || Ok("online".to_owned())).unwrap(), "by the kernel");
        // Unreadable state: the write's error stands.
        let unreadable = || Err(io::Error::from_raw_os_error(5));
        assert_eq!(online_block(refused, unreadable).unwrap_err().raw_os_error(), Some(22));
    }

    #[test]
    fn a_block_that_cannot_be_written_is_a_warning() {
        let g = FakeGuest::new();
        g.add_memory_block(8, "offline");
        g.add_memory_block(9, "offline");
        // A directory where memory9's `state` should be: unreadable, unwritable.
        let bad = g.memory_dir().join("memory10/state");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::remove_file(g.memory_dir().join("memory9/state")).unwrap();
        std::fs::create_dir_all(g.memory_dir().join("memory9/state")).unwrap();
        let w = guest(&g).online_memory();
        assert_eq!(g.block_state(8), "online_movable");
        assert!(w.is_empty(), "unreadable blocks are skipped, not written: {w:?}");
        let r = guest(&g).resources();
        assert_eq!(r.memory_online_bytes, 9 * 128 * MIB);
    }

    /// Reads only: the real kernel's view agrees with /proc and with the
    /// kernel's own CPU list.
    #[test]
    fn real_sysfs_reads_sensibly() {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online");
        let Some(list) = online.ok().and_then(|t| crate::procfs::parse_cpu_list(&t)) else {
            crate::skip_unless_ci("no readable /sys/devices/system/cpu/online");
            return;
        };
        let r = Guest::new(Path::new("/proc"), Path::new("/sys")).resources();
        assert_eq!(r.online_cpus as usize, list.len(), "{r:?}");
        assert!(r.present_cpus >= r.online_cpus);
        assert!(r.memory_total_bytes > 0);
        if Path::new("/sys/devices/system/memory/block_size_bytes").exists() {
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            // Online blocks cover all RAM the kernel manages, and more (holes, reserved).
            assert!(r.memory_online_bytes >= r.memory_total_bytes, "{r:?}");
        }
    }

    #[test]
    fn missing_sysfs_gives_warnings_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let gu = Guest::new(dir.path(), dir.path());
        let r = gu.resources();
        assert_eq!(r.warnings.len(), 3, "{:?}", r.warnings);
        assert_eq!(gu.online_cpus(None).len(), 1);
        assert!(gu.online_memory().is_empty());
        assert!(gu.has_arrived(&r, 0, 1 << 30));
    }
}
