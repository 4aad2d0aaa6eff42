//! What every harness command shares (the e2e scenarios, the demo, the
//! benchmarks, the migration run): ports to listen on, waiting for a
//! condition, and the date and load a benchmark records beside its figures.

use anyhow::bail;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 for a daemon or QEMU to listen on (see [`free_port_on`]).
pub fn free_port() -> anyhow::Result<u16> {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A port on `ip` (an address of this namespace) for a daemon or QEMU to
/// listen on. Not one from bind(0): that goes back to the kernel's ephemeral
/// pool when the probe closes, where any outgoing connection may take it
/// before the daemon binds it. These come from below the ephemeral range
/// (32768 up by default), one number per call from a counter of this process
/// (whose start differs by process, so two test runs rarely meet), checked
/// free.
pub fn free_port_on(ip: Ipv4Addr) -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 400) * 25;
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(20_000 + (start + n) % 10_000)?;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 20000-29999 on {ip}")
}

/// Waits up to `timeout` for `f` to give `Some`, asking every 200 ms; `f`
/// fails fast (when a process died, say) with an error.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    poll(what, timeout, Duration::from_millis(200), f)
}

/// [`wait_for`] from async code, asking every 50 ms: the worker thread is
/// handed over meanwhile (`block_in_place`), so the runtime's other tasks
/// (QMP readers, say) go on. Needs the multi-threaded runtime.
pub async fn until<T>(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    tokio::task::block_in_place(|| poll(what, timeout, Duration::from_millis(50), f))
}

/// The one wait-until loop.
fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(every);
    }
}

/// The date and time a benchmark ran, e.g. "2026-12-06 02:30 UTC".
pub fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine's load averages (1, 5, 15 min): TCG guests share the cores
/// with whatever else runs, and a figure means little without it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_differ_per_call_and_are_below_the_ephemeral_range() {
        let (a, b) = (free_port().unwrap(), free_port().unwrap());
        assert_ne!(a, b);
        assert!((20_000..30_000).contains(&a) && (20_000..30_000).contains(&b), "{a} {b}");
    }

    #[test]
    fn a_wait_gives_the_value_or_names_what_it_waited_for() {
        let mut n = 0;
        let v = wait_for("three calls", Duration::from_secs(5), || {
            n += 1;
            Ok((n == 3).then_some(n))
        });
        assert_eq!(v.unwrap(), 3);
        let e = poll("nothing", Duration::ZERO, Duration::ZERO, || Ok(None::<()>)).unwrap_err();
        assert!(e.to_string().contains("waiting for nothing"), "{e}");
        let e = wait_for("a failure", Duration::from_secs(5), || -> anyhow::Result<Option<()>> {
            bail!("the process died")
        });
        assert_eq!(e.unwrap_err().to_string(), "the process died");
    }
}
