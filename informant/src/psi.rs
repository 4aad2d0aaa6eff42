//! PSI triggers: the kernel wakes us (POLLPRI) when the stall time inside a
//! window passes a threshold, on `/proc/pressure/{memory,cpu}` and the
//! workload cgroup's `memory.pressure`. Nothing is polled.
//!
//! Without CAP_SYS_RESOURCE the kernel only accepts windows that are whole
//! multiples of 2 s (it answers EINVAL, or EPERM on older kernels); arming
//! then retries with the next such window and the threshold scaled to match,
//! and says so.

use crate::config::TriggerConfig;
use crate::event::{monotonic_ns, Event, EventBody, Pressure, PressureKind, SourceKind};
use crate::source::{Source, SourceStatus};
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const TWO_S_US: u64 = 2_000_000;
const MAX_WINDOW_US: u64 = 10_000_000;

/// What a trigger asks the kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    pub full: bool,
    pub stall_us: u64,
    pub window_us: u64,
}

impl From<TriggerConfig> for Trigger {
    fn from(c: TriggerConfig) -> Self {
        Trigger { full: c.full, stall_us: c.stall_us, window_us: c.window_us }
    }
}

impl Trigger {
    /// The string the kernel parses. It overwrites the last byte written with
    /// NUL, so the string must end in a terminator of its own.
    pub fn kernel_string(&self) -> String {
        let which = if self.full { "full" } else { "some" };
        format!("{which} {} {}\0", self.stall_us, self.window_us)
    }

    /// The same stall ratio over the next window the kernel accepts without
    /// CAP_SYS_RESOURCE, or `None` when this window already is one.
    pub fn widened_to_2s(&self) -> Option<Trigger> {
        if self.window_us.is_multiple_of(TWO_S_US) {
            return None;
        }
        let window_us =
            self.window_us.div_ceil(TWO_S_US).saturating_mul(TWO_S_US).clamp(TWO_S_US, MAX_WINDOW_US);
        let scaled = u128::from(self.stall_us) * u128::from(window_us) / u128::from(self.window_us.max(1));
        let stall_us = u64::try_from(scaled).unwrap_or(window_us).clamp(1, window_us);
        Some(Trigger { full: self.full, stall_us, window_us })
    }

    fn describe(&self) -> String {
        let which = if self.full { "full" } else { "some" };
        format!("{which} {} ms per {} ms", self.stall_us / 1000, self.window_us / 1000)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    #[error("cannot open {path} (is the kernel built with PSI and booted without psi=0?)")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} refused the trigger `{trigger}`")]
    Refused {
        path: String,
        trigger: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for POLLPRI on {path} (not a PSI file?)")]
    Register {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// An armed trigger and, when the kernel made us widen it, a sentence saying so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    pub trigger: Trigger,
    pub note: Option<String>,
}

/// Arms `want` through `write` (one write of the kernel string), widening the
/// window to a multiple of 2 s when the kernel refuses a shorter one.
pub fn arm_with_fallback(
    want: Trigger,
    mut write: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<Armed, (Trigger, io::Error)> {
    let first = match write(want.kernel_string().as_bytes()) {
        Ok(()) => return Ok(Armed { trigger: want, note: None }),
        Err(e) => e,
    };
    let refused_window = matches!(first.raw_os_error(), Some(libc_errno::EINVAL) | Some(libc_errno::EPERM));
    let Some(wider) = want.widened_to_2s().filter(|_| refused_window) else {
        return Err((want, first));
    };
    match write(wider.kernel_string().as_bytes()) {
        Ok(()) => Ok(Armed {
            trigger: wider,
            note: Some(format!(
                "window {} ms refused ({first}; a window under 2 s or not a multiple of 2 s needs \
                 CAP_SYS_RESOURCE), using {}",
                want.window_us / 1000,
                wider.describe()
            )),
        }),
        Err(e) => Err((wider, e)),
    }
}

/// errno values, without a libc dependency for two constants.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const EINVAL: i32 = 22;
}

/// Which PSI file to watch for which event.
#[derive(Debug, Clone)]
pub struct TriggerSpec {
    pub kind: PressureKind,
    pub path: PathBuf,
    pub trigger: Trigger,
}

#[derive(Debug)]
struct Watch {
    kind: PressureKind,
    path: PathBuf,
    trigger: Trigger,
    fd: AsyncFd<File>,
}

/// The PSI source: one armed trigger per file that accepted one.
#[derive(Debug)]
pub struct PsiSource {
    watches: Vec<Watch>,
}

impl PsiSource {
    /// Arms every spec; must run inside a tokio runtime (the triggers are
    /// registered with its reactor here, so failures show in the status).
    /// `skipped` lists triggers the caller left out, with why, for the status.
    pub fn start(specs: Vec<TriggerSpec>, skipped: Vec<String>) -> (Option<PsiSource>, SourceStatus) {
        let mut watches = Vec::new();
        let mut notes = skipped;
        let mut widened = Vec::new();
        for spec in specs {
            match arm(&spec) {
                Ok((w, note)) => {
                    info!(path = %w.path.display(), trigger = %w.trigger.describe(), "psi trigger armed");
                    if let Some(n) = note {
                        warn!(path = %w.path.display(), "psi trigger: {n}");
                        widened.push(format!("{} {}", w.path.display(), w.trigger.describe()));
                    }
                    watches.push(w);
                }
                Err(e) => {
                    let e = crate::error_chain(&e);
                    warn!("psi trigger unavailable: {e}");
                    notes.push(e);
                }
            }
        }
        if !widened.is_empty() {
            // One sentence for the handshake; the log has each trigger's details.
            notes.push(format!(
                "windows under 2 s need CAP_SYS_RESOURCE, so these were widened: {}",
                widened.join(", ")
            ));
        }
        let reason = notes.join("; ");
        if watches.is_empty() {
            let reason = if reason.is_empty() { "no PSI trigger configured".to_owned() } else { reason };
            return (None, SourceStatus::down(SourceKind::Psi, reason));
        }
        let mut status = SourceStatus::up(SourceKind::Psi);
        status.reason = reason;
        (Some(PsiSource { watches }), status)
    }
}

fn arm(spec: &TriggerSpec) -> Result<(Watch, Option<String>), PsiError> {
    let path = spec.path.display().to_string();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&spec.path)
        .map_err(|source| PsiError::Open { path: path.clone(), source })?;
    let armed = arm_with_fallback(spec.trigger, |bytes| file.write(bytes).map(drop))
        .map_err(|(t, source)| PsiError::Refused { path: path.clone(), trigger: t.describe(), source })?;
    // SAFETY: the `File` owns its descriptor and never closes or replaces it
    // while the `AsyncFd` holds it; it is closed when the `AsyncFd` drops it.
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
        .map_err(|e| PsiError::Register { path: path.clone(), source: e.into() })?;
    Ok((Watch { kind: spec.kind, path: spec.path.clone(), trigger: armed.trigger, fd }, armed.note))
}

impl Source for PsiSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Psi
    }

    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let runs = self.watches.into_iter().map(|w| watch(w, tx.clone(), cancel.clone()));
            futures::future::join_all(runs).await;
        })
    }
}

async fn watch(w: Watch, tx: mpsc::Sender<Event>, cancel: CancellationToken) {
    // The kernel reports at most once per window that the stall passed the
    // threshold; the threshold is the stall we know of.
    let stall_ns = w.trigger.stall_us.saturating_mul(1000);
    loop {
        let ready = tokio::select! {
            () = cancel.cancelled() => return,
            r = w.fd.ready(Interest::PRIORITY) => r,
        };
        let mut guard = match ready {
            Ok(g) => g,
            Err(e) => {
                warn!(path = %w.path.display(), "psi trigger stopped: {e}");
                return;
            }
        };
        guard.clear_ready();
        let ev = Event {
            monotonic_ns: monotonic_ns(),
            source: SourceKind::Psi,
            body: EventBody::Pressure(Pressure { kind: w.kind, count: 1, stall_ns, pid: 0 }),
        };
        debug!(path = %w.path.display(), "psi trigger fired");
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(stall_us: u64, window_us: u64) -> Trigger {
        Trigger { full: false, stall_us, window_us }
    }

    #[test]
    fn kernel_string_is_terminated() {
        assert_eq!(t(150_000, 2_000_000).kernel_string(), "some 150000 2000000\0");
        let full = Trigger { full: true, ..t(1, 500_000) };
        assert_eq!(full.kernel_string(), "full 1 500000\0");
    }

    #[test]
    fn widening_keeps_the_ratio_and_the_kernel_limits() {
        let cases = [
            (t(50_000, 500_000), Some(t(200_000, 2_000_000))),
            (t(100_000, 1_000_000), Some(t(200_000, 2_000_000))),
            (t(300_000, 3_000_000), Some(t(400_000, 4_000_000))),
            (t(9_500_000, 9_500_000), Some(t(10_000_000, 10_000_000))),
            (t(150_000, 2_000_000), None),
            (t(1, 10_000_000), None),
        ];
        for (input, want) in cases {
            assert_eq!(input.widened_to_2s(), want, "{input:?}");
        }
    }

    /// A fake kernel: accepts only windows that are multiples of 2 s, failing
    /// others with `errno`.
    fn unprivileged(errno: i32, log: &mut Vec<String>) -> impl FnMut(&[u8]) -> io::Result<()> + '_ {
        move |b| {
            let s = String::from_utf8_lossy(b).into_owned();
            log.push(s.clone());
            let window: u64 = s.trim_end_matches('\0').rsplit(' ').next().unwrap().parse().unwrap();
            if window.is_multiple_of(2_000_000) {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    #[test]
    fn refused_windows_fall_back_to_2s() {
        for errno in [libc_errno::EINVAL, libc_errno::EPERM] {
            let mut log = Vec::new();
            let armed = arm_with_fallback(t(50_000, 500_000), unprivileged(errno, &mut log)).unwrap();
            assert_eq!(armed.trigger, t(200_000, 2_000_000));
            let note = armed.note.unwrap();
            assert!(note.contains("CAP_SYS_RESOURCE") && note.contains("200 ms per 2000 ms"), "{note}");
            assert_eq!(log, ["some 50000 500000\0", "some 200000 2000000\0"]);
        }
    }

    #[test]
    fn accepted_windows_and_other_errors_do_not_retry() {
        let mut log = Vec::new();
        let armed = arm_with_fallback(t(150_000, 2_000_000), unprivileged(22, &mut log)).unwrap();
        assert_eq!(armed, Armed { trigger: t(150_000, 2_000_000), note: None });
        assert_eq!(log.len(), 1);

        let mut calls = 0;
        let err = arm_with_fallback(t(50_000, 500_000), |_| {
            calls += 1;
            Err(io::Error::from_raw_os_error(95)) // EOPNOTSUPP: PSI disabled
        })
        .unwrap_err();
        assert_eq!((calls, err.0), (1, t(50_000, 500_000)));

        // A 2 s window refused with EINVAL has nothing to fall back to.
        let err = arm_with_fallback(t(150_000, 2_000_000), |_| Err(io::Error::from_raw_os_error(22)));
        assert!(err.is_err());
    }

    #[tokio::test]
    async fn regular_files_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        let spec =
            TriggerSpec { kind: PressureKind::PsiMemory, path: path.clone(), trigger: t(50_000, 500_000) };
        let missing =
            TriggerSpec { path: dir.path().join("cpu"), kind: PressureKind::PsiCpu, ..spec.clone() };
        let (src, status) = PsiSource::start(vec![spec, missing], vec!["cgroup: none configured".into()]);
        assert!(src.is_none());
        assert!(!status.available);
        assert!(status.reason.contains("POLLPRI"), "{}", status.reason);
        assert!(status.reason.contains("cannot open"), "{}", status.reason);
        assert!(status.reason.contains("none configured"), "{}", status.reason);
    }

    /// On a kernel with PSI, a real trigger arms (widened where this process
    /// lacks CAP_SYS_RESOURCE) and the source starts.
    #[tokio::test]
    async fn real_psi_file_arms_when_present() {
        let path = PathBuf::from("/proc/pressure/memory");
        if std::fs::read_to_string(&path).is_err()
            && crate::skip_unless_ci("no readable /proc/pressure/memory")
        {
            return;
        }
        let spec = TriggerSpec { kind: PressureKind::PsiMemory, path, trigger: t(50_000, 500_000) };
        let (src, status) = PsiSource::start(vec![spec], vec![]);
        assert!(status.available, "{status:?}");
        assert_eq!(src.unwrap().watches.len(), 1);
    }
}
