//! The kinds of pressure a guest reports, and sets of them. They are part of
//! the pod contract (a policy's `ignore_pressure` names them), so they live
//! in `contract/src/pressure.rs`; the core uses them from here.

pub use vmscale_contract::pressure::{PressureKind, PressureKinds};
