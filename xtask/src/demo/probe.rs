//! The guest's own view (online CPUs, memory in use, OOM kills), read in the
//! background through Postgres (`crate::pg::probe`). Each read forks a
//! backend and runs a program in a TCG guest: reads every 2.5 s (three
//! sessions each, then) kept an idle guest under CPU pressure, so that it
//! never shrank. So at most one read runs per VM, a new one no sooner than
//! [`EVERY`] after the last.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::pg::probe::{Conn, GuestView};

/// How often a guest is read.
const EVERY: Duration = Duration::from_secs(5);

/// One VM's reads.
pub(super) struct GuestProbe {
    conn: Conn,
    running: Option<JoinHandle<anyhow::Result<GuestView>>>,
    started: Option<Instant>,
    /// The latest successful read.
    pub latest: Option<GuestView>,
    /// The last error, for the view's note; cleared by a good read.
    pub error: Option<String>,
}

impl GuestProbe {
    pub fn new(conn: Conn) -> GuestProbe {
        GuestProbe { conn, running: None, started: None, latest: None, error: None }
    }

    /// Collects a finished read and starts the next one when due.
    pub fn poll(&mut self) {
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            match self.running.take().map(JoinHandle::join) {
                Some(Ok(Ok(v))) => {
                    self.latest = Some(v);
                    self.error = None;
                }
                Some(Ok(Err(e))) => self.error = Some(format!("{e:#}")),
                Some(Err(_)) => self.error = Some("the probe's thread panicked".into()),
                None => {}
            }
        }
        if self.running.is_none() && self.started.is_none_or(|t| t.elapsed() >= EVERY) {
            let conn = self.conn.clone();
            self.started = Some(Instant::now());
            self.running =
                std::thread::Builder::new().name("guest-probe".into()).spawn(move || conn.guest()).ok();
        }
    }

    /// OOM kills since the guest booted (`/proc/vmstat`), as last read.
    pub fn oom_kills(&self) -> Option<u64> {
        self.latest.map(|l| l.oom_kills)
    }
}

/// Memory the guest uses (total less available), MiB.
pub(super) fn used_mib(v: &GuestView) -> u64 {
    v.mem_total_kib.saturating_sub(v.mem_available_kib) / 1024
}
