//! Live migration over QMP: capabilities and limits, `migrate` on the
//! source, `migrate-incoming` on a target started with `-incoming defer`,
//! progress from `query-migrate`, and `migrate_cancel`.
//!
//! The target must be built with the devices the source has *now*; that
//! part (reading hot-added vCPUs, DIMMs and virtio-mem sizes into command
//! line arguments) is in [`super::migrate_spec`].
//!
//! Waiting is a poll of `query-migrate`, woken early by QEMU's `MIGRATION`
//! and `STOP` events: the reply carries the figures we report (transferred,
//! remaining, downtime), a lost event cannot leave us waiting, and the
//! switch-over is seen the moment it happens rather than up to a poll
//! interval later (the guest runs nowhere until the target is resumed).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;
use vmscale_common::error::Chain;

use super::client::QmpClient;
use super::error::Error as QmpError;
pub use super::types::{MigrationStatus, RunState};

/// What can go wrong moving a VM.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP command failed (QEMU gone, refused, no reply).
    #[error("qmp")]
    Qmp(#[from] QmpError),
    /// QEMU reported the migration failed (e.g. the target went away).
    #[error("migration failed in qemu: {reason}")]
    Failed { reason: String },
    /// Cancelled (by us or somebody else) before it completed.
    #[error("migration was cancelled")]
    Cancelled,
    /// Still not done at the deadline: the guest dirties memory faster than
    /// the bandwidth limit carries it, or the link is too slow. The caller
    /// cancels; the VM keeps running on the source.
    #[error(
        "migration did not complete within {after:?} ({remaining_bytes} bytes left, status {status}); \
         raise the bandwidth or downtime limit, or move a quieter VM"
    )]
    NotConverged { after: Duration, status: MigrationStatus, remaining_bytes: u64 },
    /// Nothing was sent for a while: the target or the way to it is gone.
    #[error(
        "the migration stream made no progress for {after:?} ({remaining_bytes} bytes left): the network to \
         the target or the target itself is down"
    )]
    Stalled { after: Duration, remaining_bytes: u64 },
    /// The device state cannot be rebuilt on a target's command line.
    #[error("cannot describe the vm for a migration target: {0}")]
    Unsupported(String),
}

impl MigrateError {
    /// Whether the failure is QEMU's connection going away.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, MigrateError::Qmp(e) if e.is_disconnected())
    }
}

pub type Result<T, E = MigrateError> = std::result::Result<T, E>;

/// Limits and options of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// Bandwidth cap in bytes per second (QEMU's `max-bandwidth`). QEMU's
    /// own default is 32 MiB/s; a node link is much faster, and a low cap is
    /// the most common reason for a migration that does not converge.
    pub max_bandwidth_bytes_per_s: u64,
    /// Longest pause of the guest at switch-over, in milliseconds (QEMU's
    /// `downtime-limit`; its default is 300).
    pub downtime_limit_ms: u64,
    /// Give up (and cancel) after this long, in milliseconds.
    pub timeout_ms: u64,
    /// How often progress is read, in milliseconds.
    pub poll_ms: u64,
    /// Throttle the guest's vCPUs when it dirties memory faster than it can
    /// be sent (`auto-converge`): slower for a while instead of never done.
    pub auto_converge: bool,
    /// Give up (and cancel) when no byte was sent for this long, ms: a cut
    /// network ends the move early, with a reason that names it.
    pub stall_timeout_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            max_bandwidth_bytes_per_s: 1 << 30,
            downtime_limit_ms: 300,
            timeout_ms: 120_000,
            poll_ms: 50,
            auto_converge: true,
            stall_timeout_ms: 10_000,
        }
    }
}

/// A [`MigrationConfig`] value that cannot work; the message names the
/// field and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("migration max_bandwidth_bytes_per_s must be above zero")]
    NoBandwidth,
    #[error("migration downtime_limit_ms must be 1..={MAX_DOWNTIME_LIMIT_MS}")]
    DowntimeLimit,
    #[error("migration poll_ms must be above zero and at most timeout_ms")]
    Poll,
    #[error("migration stall_timeout_ms must be at least poll_ms")]
    Stall,
}

/// QEMU refuses a downtime limit above 2000 s.
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

impl MigrationConfig {
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.max_bandwidth_bytes_per_s == 0 {
            return Err(ConfigError::NoBandwidth);
        }
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            return Err(ConfigError::DowntimeLimit);
        }
        if self.poll_ms == 0 || self.timeout_ms < self.poll_ms {
            return Err(ConfigError::Poll);
        }
        if self.stall_timeout_ms < self.poll_ms {
            return Err(ConfigError::Stall);
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The capabilities both sides get. `events` makes QEMU send MIGRATION
    /// events, which a person watching QMP finds useful; the rest is tuning.
    pub fn capabilities(&self) -> Vec<(&'static str, bool)> {
        vec![("events", true), ("auto-converge", self.auto_converge)]
    }
}

/// `query-migrate`'s `ram` member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamStats {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(rename = "dirty-sync-count", default)]
    pub dirty_sync_count: u64,
}

/// `query-migrate`'s reply. Members appear as the migration goes on; before
/// any migration the reply is `{}` and `status` is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: MigrationStatus,
    /// Milliseconds since the migration started (final once completed).
    #[serde(rename = "total-time", default)]
    pub total_time_ms: Option<u64>,
    /// The guest's pause at switch-over, in milliseconds; set on completion.
    #[serde(default)]
    pub downtime: Option<u64>,
    #[serde(rename = "expected-downtime", default)]
    pub expected_downtime: Option<u64>,
    #[serde(rename = "setup-time", default)]
    pub setup_time_ms: Option<u64>,
    #[serde(default)]
    pub ram: Option<RamStats>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

/// Where a migration stands, from `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    NotStarted,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationInfo {
    /// As the source sees it. A QEMU that was itself a migration target
    /// reports its incoming migration as `completed` (without `total-time`)
    /// until a new outgoing one has connected: that is not this one done.
    pub fn progress(&self) -> Progress {
        match self.status {
            MigrationStatus::Completed if self.total_time_ms.is_none() => Progress::NotStarted,
            _ => self.incoming(),
        }
    }

    /// As a migration target sees its incoming stream: `completed` is the
    /// stream in.
    pub fn incoming(&self) -> Progress {
        match self.status {
            MigrationStatus::None => Progress::NotStarted,
            MigrationStatus::Completed => Progress::Completed,
            MigrationStatus::Failed => Progress::Failed,
            MigrationStatus::Cancelled => Progress::Cancelled,
            // setup, active, device, pre-switchover, cancelling, postcopy-*,
            // wait-unplug, colo, and any a newer QEMU adds: still going.
            _ => Progress::Running,
        }
    }

    /// Whether the source is sending (set up or copying memory, the guest
    /// still running there): a stream that a cancel stops cleanly.
    pub fn is_sending(&self) -> bool {
        matches!(self.status, MigrationStatus::Setup | MigrationStatus::Active)
    }

    pub fn remaining_bytes(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.remaining)
    }
}

/// `query-status`: whether the guest's vCPUs run, and QEMU's run state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub status: RunState,
    pub running: bool,
}

/// Migration commands on one QEMU's connection.
#[derive(Debug, Clone)]
pub struct Migration {
    client: QmpClient,
}

impl Migration {
    pub fn new(client: QmpClient) -> Self {
        Self { client }
    }

    pub fn client(&self) -> &QmpClient {
        &self.client
    }

    /// `migrate-set-capabilities`. Both sides need the same set for some
    /// capabilities; call this on the target too.
    pub async fn set_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps.iter().map(|(c, on)| json!({"capability": c, "state": on})).collect();
        self.client
            .execute::<Value>("migrate-set-capabilities", Some(json!({ "capabilities": list })))
            .await?;
        Ok(())
    }

    /// `migrate-set-parameters` with the bandwidth and downtime limits.
    pub async fn set_limits(&self, config: &MigrationConfig) -> Result<()> {
        let args = json!({
            "max-bandwidth": config.max_bandwidth_bytes_per_s,
            "downtime-limit": config.downtime_limit_ms,
        });
        self.client.execute::<Value>("migrate-set-parameters", Some(args)).await?;
        Ok(())
    }

    /// Capabilities and limits from `config`, on this side.
    pub async fn configure(&self, config: &MigrationConfig) -> Result<()> {
        self.set_capabilities(&config.capabilities()).await?;
        self.set_limits(config).await
    }

    /// Target side: listen at `uri` (`tcp:IP:PORT`) on a QEMU started with
    /// `-incoming defer`.
    pub async fn listen(&self, uri: &str) -> Result<()> {
        self.client.execute::<Value>("migrate-incoming", Some(json!({ "uri": uri }))).await?;
        Ok(())
    }

    /// Source side: start sending to `uri`. Returns at once; see [`Self::wait`].
    pub async fn start(&self, uri: &str) -> Result<()> {
        self.client.execute::<Value>("migrate", Some(json!({ "uri": uri }))).await?;
        Ok(())
    }

    pub async fn query(&self) -> Result<MigrationInfo> {
        Ok(self.client.execute("query-migrate", None).await?)
    }

    /// `migrate_cancel`: the source keeps (or resumes) running the guest.
    pub async fn cancel(&self) -> Result<()> {
        self.client.execute::<Value>("migrate_cancel", None).await?;
        Ok(())
    }

    pub async fn run_status(&self) -> Result<RunStatus> {
        Ok(self.client.execute("query-status", None).await?)
    }

    /// `cont`: runs the guest's vCPUs (a target after its stream is in, or
    /// a source after a failed move).
    pub async fn cont(&self) -> Result<()> {
        self.client.execute::<Value>("cont", None).await?;
        Ok(())
    }

    /// `quit`: ends the QEMU process (a source whose guest runs on the
    /// target now). QEMU may close the connection before it answers: see
    /// [`MigrateError::is_disconnected`].
    pub async fn quit(&self) -> Result<()> {
        self.client.execute::<Value>("quit", None).await?;
        Ok(())
    }

    /// Polls until the migration completes, fails, or `config`'s timeout
    /// passes; in the last case it is cancelled here, so the guest keeps
    /// running on the source. `progress` sees every reading.
    pub async fn wait(
        &self,
        config: &MigrationConfig,
        mut progress: impl FnMut(&MigrationInfo),
    ) -> Result<MigrationInfo> {
        let mut events = self.client.events();
        let started = Instant::now();
        let deadline = started + config.timeout();
        let poll = Duration::from_millis(config.poll_ms);
        let stall = Duration::from_millis(config.stall_timeout_ms);
        // (bytes sent, when that figure last grew)
        let mut sent: (u64, Instant) = (0, started);
        loop {
            let info = self.query().await?;
            progress(&info);
            let now_sent = info.ram.as_ref().map_or(0, |r| r.transferred);
            if now_sent > sent.0 {
                sent = (now_sent, Instant::now());
            }
            match info.progress() {
                // A former migration target may still show its incoming
                // migration as completed; only a source whose guest has
                // stopped has finished sending. QEMU also reports
                // `completed` a moment before it fills in `total-time` and
                // `downtime` (both 0 until then): poll once more for them.
                Progress::Completed => {
                    let settled = info.total_time_ms.unwrap_or(0) > 0 || Instant::now() >= deadline;
                    if settled && !self.run_status().await?.running {
                        return Ok(info);
                    }
                    if Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                }
                Progress::Failed => {
                    return Err(MigrateError::Failed {
                        reason: info.error_desc.unwrap_or_else(|| "qemu gave no reason".into()),
                    })
                }
                Progress::Cancelled => return Err(MigrateError::Cancelled),
                Progress::NotStarted | Progress::Running => {}
            }
            if sent.1.elapsed() >= stall && Instant::now() < deadline {
                if let Err(e) = self.cancel().await {
                    tracing::warn!("cannot cancel a stalled migration: {}", Chain(&e));
                }
                return Err(MigrateError::Stalled { after: stall, remaining_bytes: info.remaining_bytes() });
            }
            if Instant::now() >= deadline {
                if let Err(e) = self.cancel().await {
                    tracing::warn!("cannot cancel a migration past its deadline: {}", Chain(&e));
                }
                // Not one byte went out: the stream never got going, which
                // no bandwidth or downtime limit would change.
                if sent.0 == 0 {
                    return Err(MigrateError::Stalled {
                        after: config.timeout(),
                        remaining_bytes: info.remaining_bytes(),
                    });
                }
                return Err(MigrateError::NotConverged {
                    after: config.timeout(),
                    remaining_bytes: info.remaining_bytes(),
                    status: info.status,
                });
            }
            nap(poll, &mut events).await;
        }
    }
}

/// Sleeps for `max`, or less if a `MIGRATION` (status change) or `STOP`
/// (switch-over) event comes first.
pub async fn nap(max: Duration, events: &mut tokio::sync::broadcast::Receiver<super::QmpEvent>) {
    use tokio::sync::broadcast::error::RecvError;
    let _ = tokio::time::timeout(max, async {
        loop {
            match events.recv().await {
                Ok(e) if e.name == "MIGRATION" || e.name == "STOP" => return,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                // The connection is gone: the next query says so.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    })
    .await;
}

/// `tcp:IP:PORT` for an address, with brackets for IPv6.
pub fn tcp_uri(addr: std::net::SocketAddr) -> String {
    format!("tcp:{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_replies_parse() {
        let empty: MigrationInfo = serde_json::from_str("{}").expect("parses");
        assert_eq!(empty.progress(), Progress::NotStarted);
        let active: MigrationInfo = serde_json::from_value(json!({
            "status": "active", "total-time": 120, "setup-time": 3, "expected-downtime": 300,
            "ram": {"transferred": 1000, "remaining": 5000, "total": 268435456, "duplicate": 7,
                    "dirty-sync-count": 1, "mbps": 800.5}
        }))
        .expect("parses");
        assert_eq!(active.progress(), Progress::Running);
        assert_eq!(active.remaining_bytes(), 5000);
        let done: MigrationInfo =
            serde_json::from_value(json!({"status": "completed", "total-time": 700, "downtime": 12}))
                .expect("parses");
        assert_eq!((done.progress(), done.downtime), (Progress::Completed, Some(12)));
        // What a former migration target says before its own outgoing
        // migration has connected.
        let incoming_done: MigrationInfo =
            serde_json::from_value(json!({"status": "completed"})).expect("parses");
        assert_eq!(incoming_done.progress(), Progress::NotStarted);
        assert_eq!(incoming_done.incoming(), Progress::Completed);
        assert!(active.is_sending() && !done.is_sending() && !empty.is_sending());
        let newer: MigrationInfo = serde_json::from_value(json!({"status": "teleporting"})).expect("parses");
        assert_eq!((newer.progress(), newer.incoming()), (Progress::Running, Progress::Running));
        let failed: MigrationInfo =
            serde_json::from_value(json!({"status": "failed", "error-desc": "Connection refused"}))
                .expect("parses");
        assert_eq!(failed.progress(), Progress::Failed);
        assert_eq!(failed.error_desc.as_deref(), Some("Connection refused"));
    }

    #[test]
    fn config_defaults_are_valid_and_bad_ones_say_which_field() {
        assert_eq!(MigrationConfig::default().validate(), Ok(()));
        let zero_bw = MigrationConfig { max_bandwidth_bytes_per_s: 0, ..Default::default() };
        assert!(zero_bw.validate().unwrap_err().to_string().contains("max_bandwidth"));
        let no_poll = MigrationConfig { poll_ms: 0, ..Default::default() };
        assert!(no_poll.validate().unwrap_err().to_string().contains("poll_ms"));
        let long = MigrationConfig { downtime_limit_ms: 2_000_001, ..Default::default() };
        assert_eq!(
            long.validate().unwrap_err().to_string(),
            "migration downtime_limit_ms must be 1..=2000000"
        );
        let caps = MigrationConfig::default().capabilities();
        assert!(caps.contains(&("events", true)));
    }

    #[test]
    fn ipv6_uris_have_brackets() {
        assert_eq!(tcp_uri("10.0.0.2:4444".parse().expect("addr")), "tcp:10.0.0.2:4444");
        assert_eq!(tcp_uri("[fd00::2]:4444".parse().expect("addr")), "tcp:[fd00::2]:4444");
    }
}
