//! Errors of the pure core. Every error leaves the cluster state exactly as it was.

use super::order_ids::OrderIdError;
use super::units::AbsurdAmount;

/// What kind of mistake an error is; the gRPC edge maps it onto a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("node {0:?} is not registered; its agent must open a session and register first")]
    UnknownNode(String),
    #[error("vm {vm:?} is not registered on node {node:?}; add it first")]
    UnknownVm { node: String, vm: String },
    #[error("vm {vm:?} is registered on node {owner:?}, not on this session's node {node:?}")]
    VmOnOtherNode { node: String, vm: String, owner: String },
    #[error("this session does not own node {requested:?}; it registered node {own:?}")]
    NotOwnNode { own: String, requested: String },
    #[error("session {session} no longer owns node {node:?}: a newer session replaced it")]
    StaleSession { node: String, session: u64 },
    #[error("vm {0:?} is already registered on this node; remove it first or re-register the node")]
    VmExists(String),
    #[error("vm {0:?} appears twice in one registration")]
    DuplicateVm(String),
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error(transparent)]
    Absurd(#[from] AbsurdAmount),
    #[error("vm {vm:?} is moving to node {target:?} (order {order}); it may not change until the move ends")]
    Migrating { vm: String, order: u64, target: String },
    #[error("migration order {0} is unknown (finished, expired, or from before an allocator restart)")]
    UnknownOrder(u64),
    #[error("migration order {order} is run by node {source_node:?}, not by this session's node {node:?}")]
    OrderNotOwned { order: u64, node: String, source_node: String },
    #[error("migration order {order} cannot go from {from} to {to}")]
    BadTransition { order: u64, from: &'static str, to: &'static str },
    #[error("{what}: at most {limit} allowed (the allocator's `{setting}`)")]
    TooMany { what: String, limit: usize, setting: &'static str },
    #[error("node {0:?} is not a Node of this cluster; only nodes the cluster knows may register (if the Node is new, retry in a few seconds)")]
    NotClusterNode(String),
    #[error(transparent)]
    OrderId(#[from] OrderIdError),
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        use CoreError::*;
        match self {
            UnknownNode(_) | UnknownVm { .. } | UnknownOrder(_) => ErrorKind::NotFound,
            VmOnOtherNode { .. }
            | NotOwnNode { .. }
            | OrderNotOwned { .. }
            | NotClusterNode(_)
            | OrderId(_) => ErrorKind::PermissionDenied,
            TooMany { .. } => ErrorKind::ResourceExhausted,
            StaleSession { .. } | Migrating { .. } | BadTransition { .. } => ErrorKind::FailedPrecondition,
            VmExists(_) => ErrorKind::AlreadyExists,
            DuplicateVm(_) | Invalid { .. } | Absurd(_) => ErrorKind::InvalidArgument,
        }
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        use CoreError::*;
        match self {
            UnknownNode(_) => "unknown_node",
            UnknownVm { .. } => "unknown_vm",
            VmOnOtherNode { .. } => "vm_on_other_node",
            NotOwnNode { .. } => "not_own_node",
            StaleSession { .. } => "stale_session",
            VmExists(_) => "vm_exists",
            DuplicateVm(_) => "duplicate_vm",
            Invalid { .. } => "invalid",
            Absurd(_) => "absurd_amount",
            Migrating { .. } => "migrating",
            UnknownOrder(_) => "unknown_order",
            OrderNotOwned { .. } => "order_not_owned",
            BadTransition { .. } => "bad_transition",
            TooMany { .. } => "too_many",
            NotClusterNode(_) => "not_cluster_node",
            OrderId(OrderIdError::Forged { .. }) => "forged_order",
            OrderId(OrderIdError::Expired { .. }) => "expired_order",
            OrderId(OrderIdError::Future { .. }) => "future_order",
        }
    }

    pub(crate) fn too_many(what: impl Into<String>, limit: usize, setting: &'static str) -> Self {
        CoreError::TooMany { what: what.into(), limit, setting }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        CoreError::Invalid { what: what.into(), reason: reason.into() }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
