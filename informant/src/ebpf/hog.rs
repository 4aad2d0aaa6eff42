//! Memory pressure on demand, for the integration tests and the benchmark:
//! a process that allocates without bound inside a memory cgroup with a
//! small limit. The kernel reclaims in that cgroup (memcg reclaim
//! tracepoints) and then the OOM killer picks the process (`oom/mark_victim`
//! with its pid). Works on a cgroup v1 `memory` hierarchy (this host) and on
//! cgroup v2 (the guest).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running hog and its cgroup. Dropping it kills the process (if the OOM
/// killer has not) and removes the cgroup.
#[derive(Debug)]
pub struct MemoryHog {
    cgroup: PathBuf,
    child: Child,
}

impl MemoryHog {
    /// Creates `<root>/<name>` with a memory limit of `limit_bytes` and no
    /// swap, and starts `tail /dev/zero` in it (it buffers an endless line).
    /// `root` is the memory controller's hierarchy: `/sys/fs/cgroup/memory`
    /// for v1, a v2 directory with the `memory` controller enabled for its
    /// children otherwise.
    pub fn start(root: &Path, name: &str, limit_bytes: u64) -> io::Result<MemoryHog> {
        let cgroup = root.join(name);
        // A leftover of a run that was killed: empty, so it can go.
        let _ = std::fs::remove_dir(&cgroup);
        std::fs::create_dir(&cgroup)?;
        match limit(&cgroup, limit_bytes) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup);
                return Err(e);
            }
        }
        // The shell joins the cgroup, then becomes `tail`: the pid stays the
        // same and every byte `tail` allocates is charged to the cgroup.
        let child = Command::new("sh")
            .args(["-c", "echo $$ > \"$1/cgroup.procs\" && exec tail /dev/zero", "hog"])
            .arg(&cgroup)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        match child {
            Ok(child) => Ok(MemoryHog { cgroup, child }),
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup);
                Err(e)
            }
        }
    }

    /// The hog's pid, which the OOM victim event should carry.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Waits up to `timeout` for the hog to end (killed by the OOM killer).
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MemoryHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup can be removed once the kernel has let go of the dead
        // task, which may take a moment after wait().
        for _ in 0..100 {
            match std::fs::remove_dir(&self.cgroup) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("could not remove cgroup {}", self.cgroup.display());
    }
}

/// Writes the memory limit in whichever cgroup version `cgroup` is, and
/// turns swap off for it where the kernel accounts swap.
fn limit(cgroup: &Path, bytes: u64) -> io::Result<()> {
    let v1 = cgroup.join("memory.limit_in_bytes");
    let v2 = cgroup.join("memory.max");
    let value = bytes.to_string();
    if v1.exists() {
        std::fs::write(v1, &value)?;
        // memsw (memory + swap) may not go below memory: set it after.
        let memsw = cgroup.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            std::fs::write(memsw, &value)?;
        }
        Ok(())
    } else if v2.exists() {
        std::fs::write(v2, &value)?;
        let swap = cgroup.join("memory.swap.max");
        if swap.exists() {
            std::fs::write(swap, "0")?;
        }
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} has no memory controller (no memory.limit_in_bytes, no memory.max)",
                cgroup.display()
            ),
        ))
    }
}
