//! The one policy for a poisoned lock.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, carrying on if a panicking holder poisoned it. Every lock in this crate guards
/// a map or a handle whose every state is valid (an entry is inserted, replaced or removed
/// whole), so a panic elsewhere never leaves it half-changed, and refusing every later call
/// would turn one panic into an outage.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
