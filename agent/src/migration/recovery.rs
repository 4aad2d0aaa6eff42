//! How the source settles a move that a previous run of the agent left
//! unsettled: one pure function over the move's record, what the target
//! says and what the source QEMU says, called again after each answer until
//! it ends the move ([`super::mover::recover`] carries its steps out).
//!
//! | record says          | target says | the VM then runs on                    |
//! |----------------------|-------------|----------------------------------------|
//! | confirm not sent     | (any)       | source: target aborted, source resumed |
//! | confirm sent         | running     | target: source QEMU quits              |
//! | confirm sent         | none        | source: target aborted, source resumed |
//! | confirm sent         | can't say   | nowhere yet: asked again until it says |
//!
//! "Target says" is its answer to an abort: it kills its QEMU unless the
//! guest runs there, and says which. The source "resumed" means: a stream
//! still flowing is cancelled first, then the guest runs again if it ran
//! before the move.

use super::mover::MoveRecord;

/// What the target said to the source's abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSays {
    NotAsked,
    /// No QEMU of the move runs the guest there, nor can it any more.
    Gone,
    /// The confirm went through: the guest runs there.
    RunsThere,
    /// Unreachable or busy; why.
    CannotSay(String),
    /// The record's endpoint is not a URL, so there is no one to ask. The
    /// move wrote its record only after the endpoint parsed, so no confirm
    /// can have gone there.
    NoEndpoint,
}

/// What the source QEMU said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuSays {
    NotAsked,
    /// No QMP connection to it: nothing there to cancel or resume.
    Unreachable,
    /// `sending`: its outgoing stream is set up or copying memory;
    /// `running`: whether its guest runs (`None`: it did not say);
    /// `cancelled`: the stream was cancelled already (and given time to
    /// settle), so what it says now is final.
    Answered {
        sending: bool,
        running: Option<bool>,
        cancelled: bool,
    },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the target an abort and hear what it says.
    AskTarget,
    /// The target could not say whether it runs the guest after a confirm:
    /// ask again after a pause. The source stays paused meanwhile, since
    /// resuming it while the target may run the guest would run it twice.
    AskAgain,
    /// Ask the source QEMU about its stream and its guest.
    AskQemu,
    /// Cancel the source's stream (the target's QEMU is gone or going), let
    /// it settle, and ask the source again.
    CancelStream,
    /// The guest runs on the target: the source QEMU quits and the
    /// allocator hears `Completed`.
    MoveAway,
    /// The guest stays on the source, resumed first if `resume`; the
    /// allocator hears `Failed`.
    Stay { resume: bool },
}

/// The module's table as a function.
pub fn recovery(record: &MoveRecord, target: &TargetSays, qemu: &QemuSays) -> Step {
    match target {
        TargetSays::NotAsked => return Step::AskTarget,
        TargetSays::CannotSay(_) if record.confirm_sent => return Step::AskAgain,
        TargetSays::RunsThere if record.confirm_sent => return Step::MoveAway,
        // Before the confirm the target never runs the guest, whatever it
        // says (an unreachable target kills its unconfirmed QEMU by itself).
        TargetSays::CannotSay(_) | TargetSays::RunsThere | TargetSays::Gone | TargetSays::NoEndpoint => {}
    }
    match qemu {
        QemuSays::NotAsked => Step::AskQemu,
        QemuSays::Unreachable => Step::Stay { resume: false },
        QemuSays::Answered { sending: true, cancelled: false, .. } => Step::CancelStream,
        // A guest paused before the move stays paused.
        QemuSays::Answered { running, .. } => {
            Step::Stay { resume: record.source_running && *running == Some(false) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(confirm_sent: bool, source_running: bool) -> MoveRecord {
        MoveRecord {
            order_id: 3,
            vm: "vm1".into(),
            target_node: "b".into(),
            target_endpoint: "http://b:7073".into(),
            qmp: "/run/vm1.sock".into(),
            spec: crate::vms::tests::spec("vm1"),
            confirm_sent,
            source_running,
        }
    }

    const fn answered(sending: bool, running: Option<bool>, cancelled: bool) -> QemuSays {
        QemuSays::Answered { sending, running, cancelled }
    }

    #[test]
    fn every_row_of_the_table() {
        use QemuSays::{NotAsked as QNotAsked, Unreachable};
        use Step::*;
        use TargetSays::*;
        let cannot = || CannotSay("unreachable".into());
        let paused = answered(false, Some(false), false);
        let running = answered(false, Some(true), false);
        #[rustfmt::skip]
        let rows: Vec<(bool, bool, TargetSays, QemuSays, Step)> = vec![
            // (confirm sent, ran before, target, source qemu) -> step
            (false, true, NotAsked, QNotAsked, AskTarget),
            (true, true, NotAsked, QNotAsked, AskTarget),
            // Confirm not sent: the source, whatever the target says.
            (false, true, Gone, QNotAsked, AskQemu),
            (false, true, RunsThere, QNotAsked, AskQemu),
            (false, true, cannot(), QNotAsked, AskQemu),
            (false, true, NoEndpoint, QNotAsked, AskQemu),
            (false, true, RunsThere, paused.clone(), Stay { resume: true }),
            (false, true, cannot(), paused.clone(), Stay { resume: true }),
            // Confirm sent: the target's word decides.
            (true, true, RunsThere, QNotAsked, MoveAway),
            (true, true, RunsThere, paused.clone(), MoveAway),
            (true, true, cannot(), QNotAsked, AskAgain),
            (true, true, cannot(), paused.clone(), AskAgain),
            (true, true, Gone, QNotAsked, AskQemu),
            (true, true, Gone, paused.clone(), Stay { resume: true }),
            (true, true, NoEndpoint, paused.clone(), Stay { resume: true }),
            // How the source is left.
            (true, true, Gone, Unreachable, Stay { resume: false }),
            (true, true, Gone, running.clone(), Stay { resume: false }),
            (true, false, Gone, paused.clone(), Stay { resume: false }),
            (true, true, Gone, answered(false, None, false), Stay { resume: false }),
            (false, true, Gone, answered(true, Some(true), false), CancelStream),
            (false, true, Gone, answered(true, Some(false), false), CancelStream),
            (false, true, Gone, answered(true, Some(false), true), Stay { resume: true }),
            (false, true, Gone, answered(false, Some(false), true), Stay { resume: true }),
            (false, true, Gone, answered(false, Some(true), true), Stay { resume: false }),
            (false, false, Gone, answered(true, Some(false), false), CancelStream),
            (false, false, Gone, answered(false, Some(false), true), Stay { resume: false }),
        ];
        for (confirm_sent, ran, target, qemu, want) in rows {
            let r = record(confirm_sent, ran);
            assert_eq!(
                recovery(&r, &target, &qemu),
                want,
                "confirm sent {confirm_sent}, ran before {ran}, target {target:?}, qemu {qemu:?}"
            );
        }
    }
}
