//! A TCP port for a listener that someone else binds later (QEMU's
//! `-incoming`, a daemon started as a child process). A port from `bind(0)`
//! goes back to the kernel's pool when the probe closes, and another process
//! can take it before the real listener binds it ("Address already in use",
//! seen in CI). These ports come from below the ephemeral range (32768 up by
//! default), one per call from a per-process counter whose start differs by
//! process, checked free: two callers get the same port only if they are 400
//! processes apart and collide in the same millisecond.

use std::net::{IpAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const SPAN: u32 = 10_000;

/// A free port on `ip` in 20000-29999.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 400) * 25;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(FIRST + (start.wrapping_add(n)) % SPAN) else { continue };
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {FIRST}-{} on {ip}", FIRST + SPAN - 1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successive_calls_give_distinct_bindable_ports() {
        let ip: IpAddr = [127, 0, 0, 1].into();
        let a = free_port(ip).unwrap();
        let b = free_port(ip).unwrap();
        assert_ne!(a, b);
        assert!((20_000..30_000).contains(&a));
        TcpListener::bind((ip, a)).unwrap();
    }
}
