//! The one policy for a poisoned lock, and the one way leases are released key by key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use apikeys_core::{KeyId, Result};

/// Locks `m`, carrying on if a panicking holder poisoned it. Every lock in this crate guards
/// a map or a handle whose every state is valid (an entry is inserted, replaced or removed
/// whole), so a panic elsewhere never leaves it half-changed, and refusing every later call
/// would turn one panic into an outage.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes out and gives back what each entry of a lease map holds, one key at a time: the
/// key's reservation lock (from `reserving`) is taken first, so a reservation in flight lands
/// before its entry is removed, and never two keys' locks at once, so two shutdowns running
/// together cannot wait for each other. `take` says what an entry removed holds (`None`:
/// nothing to give back); `give` gives it back and returns how much went. Keeps going after
/// a failed give-back and reports the last failure.
pub(crate) async fn release_each<L, T, Fut>(
    map: &Mutex<HashMap<KeyId, L>>,
    reserving: impl Fn(&L) -> &Arc<tokio::sync::Mutex<()>>,
    take: impl Fn(L) -> Option<T>,
    // A plain closure returning a future (not an async closure): the caller's future stays
    // `Send` for any lifetime, so `shutdown()` can run in a spawned task.
    give: impl Fn(KeyId, T) -> Fut,
) -> Result<u64>
where
    Fut: Future<Output = Result<u64>>,
{
    let keys: Vec<(KeyId, Arc<tokio::sync::Mutex<()>>)> =
        lock(map).iter().map(|(k, l)| (*k, Arc::clone(reserving(l)))).collect();
    let mut released = 0;
    let mut failed = None;
    for (key, turn) in keys {
        let held = {
            let _turn = turn.lock().await;
            lock(map).remove(&key).and_then(&take)
        };
        let Some(held) = held else { continue };
        match give(key, held).await {
            Ok(n) => released += n,
            Err(e) => failed = Some(e),
        }
    }
    failed.map_or(Ok(released), Err)
}
