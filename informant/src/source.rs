//! The boundary every event source sits behind. A source is started once; it
//! pushes events into the shared channel until cancelled. Sources that cannot
//! run on this guest (no BTF, no CAP_BPF, no tracefs, no PSI) are reported as
//! unavailable with a reason, and the informant runs on the others.

use crate::event::{Event, SourceKind};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub trait Source: Send + 'static {
    fn kind(&self) -> SourceKind;

    /// Runs the source on the current tokio runtime until `cancel` fires or
    /// `tx` is closed. Errors after start are logged by the source and end it;
    /// they never end the informant.
    fn spawn(
        self: Box<Self>,
        tx: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()>;
}

/// What the informant tells the agent (and its log) about one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub available: bool,
    /// Why not, when unavailable. When available, empty, or what part is
    /// missing or changed (a widened PSI window, a field the sampler cannot
    /// read).
    pub reason: String,
}

impl SourceStatus {
    pub fn up(kind: SourceKind) -> Self {
        SourceStatus { name: kind.name().to_owned(), available: true, reason: String::new() }
    }

    pub fn down(kind: SourceKind, reason: impl Into<String>) -> Self {
        SourceStatus { name: kind.name().to_owned(), available: false, reason: reason.into() }
    }
}
