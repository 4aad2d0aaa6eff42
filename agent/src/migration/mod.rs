//! Live migration between agents: the source's side of a move and the
//! target's. Each side's lifecycle is a pure enum with one transition
//! function; the async code around it only carries steps out.
//!
//! The source:
//! - [`MoveState`]: the lifecycle of one move with its one transition
//!   function; what the allocator hears follows from it ([`MoveState::report`]).
//! - [`machine`]: the VM as typed, bounded data ([`machine::MachineSpec`]),
//!   all a target gets to build its QEMU from; [`command_line`] and
//!   [`machine_from_args`] describe the source's QEMU that way from its
//!   `/proc/<pid>/cmdline`, refusing what cannot be described (pure).
//! - [`stream_uri`]: the only stream URI the source hands QEMU,
//!   `tcp:<the target agent's address>:<port>` (pure).
//! - [`target`]: the narrow boundary to whoever starts the incoming QEMU
//!   ([`target::IncomingTarget`]), and [`target::LocalIncoming`], which starts
//!   it on this host (the target agent's executor, and the tests').
//! - [`source`]: the executor: read the devices, have the target started,
//!   migrate, switch over, and on any failure leave exactly one running VM:
//!   the source.
//! - [`remote`]: the target agent over the network (`IncomingTarget` over
//!   proto/migration.proto).
//! - [`mover`]: the node's side of an order: hold the VM's loop still, carry
//!   the move out, report every phase to the allocator until it is heard;
//!   after a restart, settle an interrupted move by [`recovery`]'s table
//!   (pure).
//!
//! The target:
//! - [`target_state`]: an order's lifecycle on the target (starting,
//!   prepared, confirming, running), its source node, and the authorised
//!   orders, each good for one prepare by that node (pure).
//! - [`template`]: the incoming QEMU's command line from this node's
//!   template and the VM's spec (pure).
//! - [`tombstones`]: orders confirmed here, remembered for good.
//! - [`target_node`]: starts an incoming QEMU only under an order the
//!   allocator pushed to this node, resumes the guest on the source's
//!   confirm, and adopts the VM once it runs here; [`adopted`]: what of that
//!   survives a restart.
//! - [`service`]: its gRPC face (proto/migration.proto).
//!
//! And [`settings`]: the `[migration]` config section.

pub mod adopted;
pub mod command_line;
pub mod machine;
pub mod machine_from_args;
pub mod mover;
pub mod recovery;
pub mod remote;
pub mod service;
pub mod settings;
pub mod source;
pub mod stream_tls;
pub mod stream_uri;
pub mod target;
pub mod target_node;
pub mod target_state;
pub mod template;
pub mod tombstones;

use crate::qmp::migrate::MigrateError;
use vmscale_proto::allocator::migration_status::Phase;

/// Where one move stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveState {
    /// Received; nothing done yet.
    Ordered,
    /// The target QEMU is being started with the source's devices.
    Preparing,
    /// Memory is being sent; the guest still runs on the source.
    Migrating,
    /// Sent; the source QEMU is paused with the guest's final state and the
    /// target should be running it.
    SwitchedOver,
    /// The guest runs on the target only.
    Completed,
    /// The guest runs on the source only; the target QEMU is gone.
    Failed,
}

/// A step the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a move cannot go from {from:?} to {to:?}")]
pub struct BadTransition {
    pub from: MoveState,
    pub to: MoveState,
}

impl MoveState {
    /// The one place that says which steps a move may take. A move may fail
    /// from any state before `Completed`: after the switch-over only when
    /// the target does not run the guest, in which case its QEMU is killed
    /// first and the paused source resumed, so one QEMU runs the guest.
    pub fn transition(self, to: MoveState) -> Result<MoveState, BadTransition> {
        use MoveState::*;
        match (self, to) {
            (Ordered, Preparing)
            | (Preparing, Migrating)
            | (Migrating, SwitchedOver)
            | (SwitchedOver, Completed)
            | (Ordered | Preparing | Migrating | SwitchedOver, Failed) => Ok(to),
            _ => Err(BadTransition { from: self, to }),
        }
    }

    /// What the allocator is told on entering this state, if anything:
    /// `Started` once memory flows (the target's hold is then in use),
    /// `Completed` only when the source QEMU is gone, so the reservation
    /// never moves while two QEMUs could run the guest.
    pub fn report(self) -> Option<Phase> {
        match self {
            MoveState::Migrating => Some(Phase::Started),
            MoveState::Completed => Some(Phase::Completed),
            MoveState::Failed => Some(Phase::Failed),
            MoveState::Ordered | MoveState::Preparing | MoveState::SwitchedOver => None,
        }
    }
}

/// A move's durable record (the source's, or the target's of a VM taken
/// in) that could not be written: the step it guards is not taken.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", path.display())]
pub struct RecordError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Why a move failed; the message and its sources ([`reason`]) go to the
/// allocator as the reason.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("the vm's last scaling action did not finish within {0:?}")]
    NotQuiet(std::time::Duration),
    #[error("cannot read the source vm's command line")]
    CommandLine(#[from] command_line::CommandLineError),
    #[error("cannot describe the vm for the target")]
    Describe(#[source] machine_from_args::ArgsError),
    #[error("cannot ask the source qemu whether the guest runs")]
    SourceStatus(#[source] MigrateError),
    #[error("no way to the target agent")]
    Target(#[source] target::IncomingError),
    #[error("cannot set the stream's tls up (migration.tls needs the agent's [tls] files)")]
    StreamTls(#[source] Option<stream_tls::StreamTlsError>),
    #[error("cannot record the move")]
    NotRecorded(#[source] RecordError),
    #[error("the target qemu did not start")]
    TargetStart(#[source] target::IncomingError),
    #[error("migration")]
    Migrate(#[from] MigrateError),
    #[error("the target did not take the guest over")]
    Switchover(#[source] target::ConfirmError),
}

/// A file name for a VM's records: its id with every byte outside
/// `[A-Za-z0-9_-]` written as `%XX`, so that an id with `/` or `..` in it
/// never names a path elsewhere.
pub fn file_name(vm: &str, ext: &str) -> String {
    // One escaping, the contract's, which also bounds ids so that this fits
    // in NAME_MAX (`vmscale_contract::vm_id::check`).
    format!("{}.{ext}", vmscale_contract::vm_id::file_stem(vm))
}

/// An error and its sources on one line, for the allocator's order reason
/// and the target's status messages (the workspace's one chain printer).
pub use vmscale_common::error::chain as reason;

#[cfg(test)]
mod tests {
    use super::MoveState::{self, *};
    use vmscale_proto::allocator::migration_status::Phase;

    const ALL: [MoveState; 6] = [Ordered, Preparing, Migrating, SwitchedOver, Completed, Failed];

    #[test]
    fn record_file_names_stay_in_their_directory() {
        assert_eq!(super::file_name("pg-1_a", "json"), "pg-1_a.json");
        assert_eq!(super::file_name("../x/y", "json"), "%2E%2E%2Fx%2Fy.json");
        assert_eq!(super::file_name("a.b", "json"), "a%2Eb.json");
    }

    #[test]
    fn every_transition_pair() {
        let allowed = [
            (Ordered, Preparing),
            (Preparing, Migrating),
            (Migrating, SwitchedOver),
            (SwitchedOver, Completed),
            (Ordered, Failed),
            (Preparing, Failed),
            (Migrating, Failed),
            (SwitchedOver, Failed),
        ];
        for from in ALL {
            for to in ALL {
                let got = from.transition(to);
                if allowed.contains(&(from, to)) {
                    assert_eq!(got, Ok(to), "{from:?} -> {to:?}");
                } else {
                    assert!(got.is_err(), "{from:?} -> {to:?} must be refused");
                }
            }
        }
    }

    #[test]
    fn the_allocator_hears_started_completed_and_failed_only() {
        let reported: Vec<(MoveState, Phase)> = ALL.iter().filter_map(|s| Some((*s, s.report()?))).collect();
        assert_eq!(
            reported,
            vec![(Migrating, Phase::Started), (Completed, Phase::Completed), (Failed, Phase::Failed)]
        );
    }
}
