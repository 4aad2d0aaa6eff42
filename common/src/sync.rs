//! Locks that survive a panicked holder. The daemons' mutexes guard plain
//! maps whose every update is a single insert or remove, so the data behind a
//! poisoned lock is still whole: carrying on beats taking the node down.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
