//! Fake `/proc`, `/sys` and cgroup trees for tests and the benchmark: plain
//! files laid out as the kernel lays them out, under one root directory.
//! (A regular file cannot stand in for a PSI trigger, which needs POLLPRI;
//! the PSI source reports itself unavailable on a fake tree.)

use crate::config::Config;
use crate::sampler::SamplerPaths;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FakeGuest {
    root: PathBuf,
    #[cfg(test)]
    _dir: Option<tempfile::TempDir>,
}

const BLOCK: u64 = 128 << 20;

fn put(path: PathBuf, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn psi_text(some10: f64, full10: f64) -> String {
    format!(
        "some avg10={some10:.2} avg60=0.00 avg300=0.00 total=100\nfull avg10={full10:.2} avg60=0.00 avg300=0.00 total=10\n"
    )
}

impl FakeGuest {
    /// Lays out a guest with 2 online CPUs, 8 online memory blocks of
    /// 128 MiB, 4 GiB MemTotal (3 GiB available) and a workload cgroup using
    /// 512 MiB anon. Panics on I/O errors: this is test scaffolding.
    pub fn create(root: &Path) -> FakeGuest {
        let g = FakeGuest {
            root: root.to_owned(),
            #[cfg(test)]
            _dir: None,
        };
        g.set_meminfo(4 << 30, 3 << 30);
        put(g.proc().join("loadavg"), "0.50 0.25 0.10 1/100 1234\n");
        put(g.proc().join("pressure/memory"), &psi_text(1.5, 0.5));
        put(g.proc().join("pressure/cpu"), &psi_text(3.0, 0.0));
        put(g.cpu_dir().join("online"), "0-1\n");
        put(g.cpu_dir().join("present"), "0-1\n");
        fs::create_dir_all(g.cpu_dir().join("cpu0")).unwrap_or_else(|e| panic!("cannot create cpu0: {e}"));
        g.add_cpu(1, true);
        put(g.memory_dir().join("block_size_bytes"), &format!("{BLOCK:x}\n"));
        for n in 0..8 {
            g.add_memory_block(n, "online");
        }
        g.set_anon(512 << 20);
        put(g.cgroup().join("memory.events"), "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n");
        put(g.cgroup().join("memory.pressure"), &psi_text(0.0, 0.0));
        g
    }

    #[cfg(test)]
    #[allow(clippy::new_without_default)] // a fresh temp dir each time, not a default value
    pub fn new() -> FakeGuest {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut g = FakeGuest::create(dir.path());
        g._dir = Some(dir);
        g
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn proc(&self) -> PathBuf {
        self.root.join("proc")
    }
    pub fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }
    pub fn cgroup(&self) -> PathBuf {
        self.root.join("cgroup/workload")
    }
    pub fn cpu_dir(&self) -> PathBuf {
        self.sys().join("devices/system/cpu")
    }
    pub fn memory_dir(&self) -> PathBuf {
        self.sys().join("devices/system/memory")
    }

    pub fn sampler_paths(&self) -> SamplerPaths {
        SamplerPaths::new(&self.proc(), &self.sys(), Some(&self.cgroup()))
    }

    /// A config whose paths all point into this tree, serving TCP on
    /// 127.0.0.1:0, sampling every 50 ms, without eBPF.
    pub fn config(&self) -> Config {
        Config {
            listen: crate::config::ListenAddr::Tcp(([127, 0, 0, 1], 0).into()),
            // Tests dial it in plain text on loopback.
            insecure: true,
            proc_root: self.proc(),
            sys_root: self.sys(),
            workload_cgroup: Some(self.cgroup()),
            sample_interval_ms: 50,
            events_poll_ms: 50,
            ebpf: false,
            upscale_wait_ms: 200,
            ..Config::default()
        }
    }

    pub fn set_meminfo(&self, total: u64, available: u64) {
        put(
            self.proc().join("meminfo"),
            &format!(
                "MemTotal:       {} kB\nMemFree:        {} kB\nMemAvailable:   {} kB\n",
                total / 1024,
                available / 1024,
                available / 1024
            ),
        );
    }

    pub fn set_anon(&self, bytes: u64) {
        put(self.cgroup().join("memory.stat"), &format!("anon {bytes}\nfile 4096\nkernel 8192\n"));
    }

    /// Writes `memory.events` in place (one write, no truncation), as the
    /// kernel's counters only grow, so a watcher never sees an empty file.
    pub fn set_memory_events(&self, high: u64, max: u64, oom: u64, oom_kill: u64) {
        use std::io::Write;
        let text =
            format!("low 0\nhigh {high}\nmax {max}\noom {oom}\noom_kill {oom_kill}\noom_group_kill 0\n");
        let path = self.cgroup().join("memory.events");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    pub fn add_cpu(&self, n: u32, online: bool) {
        put(self.cpu_dir().join(format!("cpu{n}/online")), if online { "1\n" } else { "0\n" });
    }

    /// Whether cpuN's `online` file says 1 (cpu0 without the file is online).
    pub fn cpu_online(&self, n: u32) -> bool {
        fs::read_to_string(self.cpu_dir().join(format!("cpu{n}/online"))).map_or(true, |s| s.trim() == "1")
    }

    pub fn add_memory_block(&self, n: u32, state: &str) {
        put(self.memory_dir().join(format!("memory{n}/state")), &format!("{state}\n"));
    }

    pub fn block_state(&self, n: u32) -> String {
        fs::read_to_string(self.memory_dir().join(format!("memory{n}/state")))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }
}
