//! The verified-key cache: `verify_key` and `validate_key` at memory speed, with a revocation
//! delay that is bounded by [`KeyCache::max_staleness`] across every replica.
//!
//! # What is cached
//! - Keys found, by the HMAC of the presented key under the current signing secret (never by
//!   the plaintext), with everything the decision needs. `decide()` still runs against the
//!   client's clock on every call, so expiry stays exact.
//! - Product facts: a product's organization, and whether a project is linked to a product.
//! - Keys not found ("unknown"), by HMAC, for at most `max_staleness`.
//!
//! # Why a stale entry is never served past the bound
//! Every change that could make an entry stale appends a row to the change feed in its own
//! transaction (see [`feed`](crate::feed)); feed rows become visible in order. A poller reads
//! the rows after the last one it applied, at a period well under `max_staleness`, and drops
//! the entries they name. The cache serves an entry only while the last poll that caught up
//! *started* less than `max_staleness` ago. A change committed at time T is in every poll
//! that starts after T, so whenever the cache serves (some poll started after `now -
//! max_staleness` and applied everything up to its snapshot), any change committed before
//! `now - max_staleness` has been applied.
//!
//! The poller checks every row it reads against what it applied before (see
//! [`feed`](crate::feed)): each row must be numbered one more than the last, the last row it
//! applied must still carry the token it had, and the head must not be below it. A feed that
//! fails these (rows purged while the client was behind, a point-in-time restore, a failover
//! to a replica that lost commits, the tables created afresh) empties the cache, which goes on
//! from the head; so does a row of a kind this version does not know.
//!
//! A lookup that misses reads the database and then inserts what it read. An invalidation
//! racing it could land between the read and the insert; so every invalidation first bumps a
//! generation counter, and an insert whose lookup began under an older generation removes
//! itself again. Invalidations find an entry by the key's id through a map that holds exactly
//! the cached keys: it changes under one lock together with the cache, and the entries an
//! insert evicts leave it in the same step (quick_cache reports them to the insert), so no
//! entry is ever cached that a change to its key cannot find, however fast keys churn.
//!
//! While the cache is not serving (its last successful poll is too old, or a poll has been
//! under way for longer than the bound), keys it holds are read from the database at once,
//! bounded by the pool; only keys it does not hold, which may be made up, wait for one of the
//! [`max_concurrent_misses`](KeyCache::max_concurrent_misses) turns. With
//! [`stale_if_error`](KeyCache::stale_if_error), a poll in flight past the bound counts as
//! failing, so a slow database is treated as an unreachable one.
//!
//! Writes the client makes itself drop the entries they touch once they commit (the next
//! call through this client sees the change). Writes in a transaction the host owns
//! ([`InTransaction`](crate::InTransaction)) drop them at once, and the entries they touch
//! are not served from the cache again until the poller has seen the change's feed row (or
//! the row that took its number after a rollback).

mod cached;
mod config;
#[cfg(feature = "redis")]
pub(crate) mod notices;
mod poll;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::hazmat::{KeyHash, ProductAccess};
use apikeys_core::{ApiKey, Error, KeyId, OrgId, ProductId, ProjectId, Result};
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter, Weighter};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::feed::Change;
use crate::lock::lock;
pub(crate) use cached::CachedLookup;
use config::Counts;
pub(crate) use config::DEFAULT_RETENTION;
pub use config::{CacheStats, KeyCache};
pub(crate) use poll::spawn_poller;

/// A key found, as cached: shared with every check it answers (no copy per hit).
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub(crate) key: Arc<ApiKey>,
    /// Set when the stored hash is under a previous signing secret (a re-hash is due).
    pub(crate) rehash: Option<crate::lookup::Rehash>,
    /// The plan of the key's owner, read with the key (`None`: no plan).
    pub(crate) owner: Option<Arc<crate::owner::OwnerShare>>,
    /// The entry's weight in the cache's bound (see [`KeyCache::max_keys`]), worked out
    /// once.
    pub(crate) weight: u64,
}

/// What one unit of the cache's bound holds: a key whose record takes up to this many bytes
/// weighs one; a larger one (long custom metadata) one more per this many bytes.
pub(crate) const BYTES_PER_UNIT: usize = 1024;

impl CachedKey {
    pub(crate) fn new(
        key: Arc<ApiKey>,
        rehash: Option<crate::lookup::Rehash>,
        owner: Option<Arc<crate::owner::OwnerShare>>,
    ) -> Self {
        let bytes =
            record_bytes(&key) + owner.as_deref().map_or(0, crate::owner::OwnerShare::bytes);
        let weight = (bytes.div_ceil(BYTES_PER_UNIT)).max(1) as u64;
        Self { key, rehash, owner, weight }
    }
}

/// About how many bytes a cached record takes: the struct, its strings, its scopes, its
/// custom metadata, its IP allowlist and its named limits.
fn record_bytes(key: &ApiKey) -> usize {
    let strings = key.name.len() + key.hint.len() + key.owner_id.as_ref().map_or(0, String::len);
    let scopes: usize = key.scopes.iter().map(|s| s.as_str().len() + 24).sum();
    let custom: usize = key.custom.iter().map(|(k, v)| k.len() + 32 + json_bytes(v)).sum();
    // A network takes at most 18 bytes (an IPv6 address, its prefix and the tag).
    let networks = key.allowed_ips.as_ref().map_or(0, |a| a.len() * 24);
    // A named limit: its name, the limit and a map node.
    let limits: usize = key.rate_limits.iter().map(|(name, _)| name.len() + 24 + 48).sum();
    std::mem::size_of::<CachedKey>()
        + std::mem::size_of::<ApiKey>()
        + strings
        + scopes
        + custom
        + networks
        + limits
}

/// About how many bytes a JSON value takes in memory.
fn json_bytes(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    std::mem::size_of::<Value>()
        + match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(json_bytes).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.len() + 32 + json_bytes(v)).sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
}

/// Weighs cached keys by the memory they take (see [`BYTES_PER_UNIT`]).
#[derive(Clone, Copy, Debug, Default)]
struct ByMemory;

impl Weighter<[u8; 32], Arc<CachedKey>> for ByMemory {
    fn weight(&self, _: &[u8; 32], entry: &Arc<CachedKey>) -> u64 {
        entry.weight
    }
}

/// What the cache knows about a presented key.
pub(crate) enum Lookup {
    /// Found, with the product facts asked for.
    Hit(Arc<CachedKey>, Option<ProductAccess>),
    /// Known not to exist (recently).
    Unknown,
    /// Not known: read the database, after waiting for a miss turn.
    Miss,
    /// Known, but the cache is not serving: read the database without a miss turn.
    Bypass,
}

/// A product's organization (`None`: no such product), and when that was read.
#[derive(Clone, Copy)]
struct ProductFact {
    org: Option<OrgId>,
    read_at: Instant,
}

/// A change whose transaction the host owns: not served from the cache until the poller has
/// seen the feed row numbered `seq`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: i64,
    change: Change,
}

/// The cache's state, shared by the client and its poller.
pub(crate) struct CacheState {
    config: KeyCache,
    keys: Cache<[u8; 32], Arc<CachedKey>, ByMemory, DefaultHashBuilder, Evictions>,
    /// The hash each cached key is under, to drop it by id: exactly the entries of `keys`.
    /// Changed only under its lock, together with `keys` (see [`insert`](Self::insert)).
    ids: Mutex<HashMap<apikeys_core::KeyId, [u8; 32]>>,
    unknown: Cache<[u8; 32], Instant>,
    products: Cache<ProductId, ProductFact>,
    links: Cache<(ProjectId, ProductId), bool>,
    generation: AtomicU64,
    /// The instant times below are measured from.
    epoch: Instant,
    /// When the last poll that caught up started (nanoseconds after `epoch`, plus one; 0:
    /// never).
    last_ok: AtomicU64,
    /// When the poll under way started (as `last_ok`; 0: none is under way).
    polling_since: AtomicU64,
    failing: AtomicBool,
    /// The last feed row applied (`-1`: none yet; the first poll starts at the head).
    applied: AtomicI64,
    pending: Mutex<Vec<Pending>>,
    pending_len: AtomicUsize,
    misses: Semaphore,
    miss_wait: Duration,
    counts: Counts,
    /// Wakes the poller before its next tick: a change notice from another client.
    wake: Arc<Notify>,
}

impl fmt::Debug for CacheState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache")
            .field("config", &self.config)
            .field("keys", &self.keys.len())
            .field("applied", &self.applied.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CacheState {
    /// An empty cache; `miss_wait` is how long a miss waits to start its lookup.
    pub(crate) fn new(config: KeyCache, miss_wait: Duration) -> Result<Self> {
        let n = config.max_keys;
        Ok(Self {
            keys: bounded(n, ByMemory, Evictions)?,
            ids: Mutex::new(HashMap::new()),
            unknown: bounded(n, UnitWeighter, DefaultLifecycle::default())?,
            products: bounded(n, UnitWeighter, DefaultLifecycle::default())?,
            links: bounded(n, UnitWeighter, DefaultLifecycle::default())?,
            generation: AtomicU64::new(0),
            epoch: Instant::now(),
            last_ok: AtomicU64::new(0),
            polling_since: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            applied: AtomicI64::new(-1),
            pending: Mutex::new(Vec::new()),
            pending_len: AtomicUsize::new(0),
            misses: Semaphore::new(config.max_concurrent_misses),
            miss_wait,
            counts: Counts::default(),
            wake: Arc::new(Notify::new()),
            config,
        })
    }

    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long ago the last poll that caught up started (`None`: none has yet).
    fn since_last_ok(&self) -> Option<Duration> {
        self.since(&self.last_ok)
    }

    /// How long ago the instant stored in `stamp` was (`None`: none is stored). Stamps are
    /// nanoseconds after `epoch`, plus one, so that 0 can mean none.
    fn since(&self, stamp: &AtomicU64) -> Option<Duration> {
        let at = stamp.load(Ordering::Acquire);
        (at > 0).then(|| Duration::from_nanos(self.since_epoch().saturating_sub(at - 1)))
    }

    /// Whether entries may be served now: the last poll that caught up started less than
    /// `max_staleness` ago, or, while polls fail, less than `stale_if_error` ago. A poll still
    /// under way `max_staleness` after it started counts as failing: a database that has
    /// become slow is treated as one that has become unreachable.
    pub(crate) fn serving(&self) -> bool {
        let Some(age) = self.since_last_ok() else { return false };
        age < self.config.max_staleness
            || (self.config.stale_if_error.is_some_and(|b| age < b) && self.is_failing())
    }

    /// Whether the last poll failed, or the one under way has run for `max_staleness`.
    fn is_failing(&self) -> bool {
        if self.failing.load(Ordering::Relaxed) {
            return true;
        }
        self.since(&self.polling_since).is_some_and(|age| age >= self.config.max_staleness)
    }

    /// Waits until the poller has taken its place in the change feed (its first poll
    /// empties the cache, so what is cached before then is lost): at most the longer of
    /// `max_staleness` and the pool's acquire timeout, twice over.
    pub(crate) async fn positioned(&self) -> Result<()> {
        let deadline = Instant::now() + 2 * self.config.max_staleness.max(self.miss_wait);
        while self.applied.load(Ordering::Acquire) < 0 {
            if Instant::now() >= deadline {
                return Err(Error::unavailable(NotPositioned));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The room for keys, in units of the bound (see [`KeyCache::max_keys`]).
    pub(crate) fn room(&self) -> u64 {
        self.config.max_keys as u64
    }

    /// The generation a lookup that misses must remember and pass to the inserts.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// What the cache knows about the key whose current hash is `hash`, with the facts
    /// about `product` if one is asked for.
    pub(crate) fn lookup(&self, hash: &KeyHash, product: Option<ProductId>) -> Lookup {
        // Counted here; the metrics get the counts from the poller (off the hot path).
        if !self.serving() {
            self.counts.bypassed.fetch_add(1, Ordering::Relaxed);
            // A key the cache holds is a real key: it goes to the database without waiting
            // for a miss turn, which only keys never seen (possibly made up) need. One it
            // holds as revoked stays refused (revocation is final) without a read, so a leaked
            // key revoked long ago cannot take the pool's connections either.
            return match self.keys.peek(hash.as_bytes()) {
                Some(cached) if cached.key.revoked_at.is_some() => Lookup::Hit(cached, None),
                Some(_) => Lookup::Bypass,
                None => Lookup::Miss,
            };
        }
        let result = self.lookup_inner(hash, product);
        let count = match &result {
            Lookup::Hit(..) => &self.counts.hits,
            Lookup::Unknown => &self.counts.unknown,
            Lookup::Miss | Lookup::Bypass => &self.counts.misses,
        };
        count.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn lookup_inner(&self, hash: &KeyHash, product: Option<ProductId>) -> Lookup {
        let Some(cached) = self.keys.get(hash.as_bytes()) else {
            return match self.unknown.get(hash.as_bytes()) {
                Some(at) if at.elapsed() < self.config.max_staleness => Lookup::Unknown,
                _ => Lookup::Miss,
            };
        };
        if self.pending_len.load(Ordering::Acquire) > 0 && self.is_pending(&cached.key, product) {
            return Lookup::Miss;
        }
        let Some(product_id) = product else { return Lookup::Hit(cached, None) };
        let Some(fact) = self.products.get(&product_id) else { return Lookup::Miss };
        if fact.org.is_none() && fact.read_at.elapsed() >= self.config.max_staleness {
            return Lookup::Miss;
        }
        let linked = match cached.key.project_id {
            Some(project) => match self.links.get(&(project, product_id)) {
                Some(linked) => linked,
                None => return Lookup::Miss,
            },
            None => false,
        };
        let access = ProductAccess {
            product_id,
            org_id: fact.org.unwrap_or_else(|| OrgId::from_uuid(uuid::Uuid::nil())),
            key_project_linked: linked,
        };
        Lookup::Hit(cached, Some(access))
    }

    /// Whether a change in a host's transaction touches this key or its product facts.
    fn is_pending(&self, key: &ApiKey, product: Option<ProductId>) -> bool {
        lock(&self.pending).iter().any(|p| match p.change {
            Change::Key(id) => id == key.id,
            Change::Link { project, product: linked } => {
                Some(project) == key.project_id && Some(linked) == product
            }
        })
    }

    /// Waits for a turn to look a key up in the database (see
    /// [`KeyCache::max_concurrent_misses`]).
    pub(crate) async fn miss_permit(&self) -> Result<SemaphorePermit<'_>> {
        match tokio::time::timeout(self.miss_wait, self.misses.acquire()).await {
            Ok(Ok(permit)) => {
                self.counts.lookups.fetch_add(1, Ordering::Relaxed);
                Ok(permit)
            }
            _ => Err(Error::unavailable(MissQueueFull)),
        }
    }

    /// Caches a key read by a lookup that began at `generation`, with the product facts it
    /// read.
    pub(crate) fn insert(
        &self,
        hash: &KeyHash,
        entry: CachedKey,
        product: Option<ProductAccess>,
        generation: u64,
    ) {
        self.insert_by_hash(*hash.as_bytes(), entry, product, generation);
    }

    /// [`insert`](Self::insert), by the hash's bytes. Says whether the entry was cached (not
    /// when an invalidation ran since `generation`) and which keys the insert evicted.
    pub(crate) fn insert_by_hash(
        &self,
        hash: [u8; 32],
        entry: CachedKey,
        product: Option<ProductAccess>,
        generation: u64,
    ) -> Inserted {
        let id = entry.key.id;
        let project = entry.key.project_id;
        let mut evicted = Vec::new();
        let replacing;
        {
            // The id map and the keys change together under its lock, and every entry the
            // insert evicts is dropped from the map here (quick_cache reports them through
            // `Evictions`): the map is exactly the cached keys, so any change to a cached key
            // finds its entry.
            let mut ids = lock(&self.ids);
            // An invalidation bumps the generation before it takes this lock: one that ran
            // since the lookup began is seen here, and the entry is never shown at all; one
            // that runs later finds the entry through the map once this lock is released.
            if self.generation() != generation {
                return Inserted { kept: false, evicted: Vec::new() };
            }
            replacing = self.keys.peek(&hash).is_some_and(|e| e.key.id == id);
            self.keys.insert_with_lifecycle(hash, Arc::new(entry), &mut evicted);
            for (evicted_id, evicted_hash) in &evicted {
                if ids.get(evicted_id) == Some(evicted_hash) {
                    ids.remove(evicted_id);
                }
            }
            // Last: quick_cache reports the value an insert replaces as evicted too.
            ids.insert(id, hash);
        }
        if let Some(access) = product {
            let org = (!access.org_id.as_uuid().is_nil()).then_some(access.org_id);
            let fact = ProductFact { org, read_at: Instant::now() };
            self.products.insert(access.product_id, fact);
            if let Some(project) = project {
                self.links.insert((project, access.product_id), access.key_project_linked);
            }
        }
        let kept = self.generation() == generation;
        if !kept {
            // An invalidation ran meanwhile; the product facts read may be older than it
            // (a link change takes no lock of the map's).
            self.remove_key(id, &hash);
            if let Some(access) = product {
                self.products.remove(&access.product_id);
                if let Some(project) = project {
                    self.links.remove(&(project, access.product_id));
                }
            }
        }
        let mut evicted: Vec<KeyId> = evicted.into_iter().map(|(e, _)| e).collect();
        // The entry of the same key that the insert replaced is reported too: not an eviction.
        if replacing && let Some(at) = evicted.iter().position(|e| *e == id) {
            evicted.swap_remove(at);
        }
        Inserted { kept, evicted }
    }

    /// Drops the entry of key `id` under `hash`, if it is still there.
    fn remove_key(&self, id: apikeys_core::KeyId, hash: &[u8; 32]) {
        let mut ids = lock(&self.ids);
        if ids.get(&id) == Some(hash) {
            ids.remove(&id);
        }
        self.keys.remove(hash);
    }

    /// Remembers that no key has this hash.
    pub(crate) fn insert_unknown(&self, hash: &KeyHash, generation: u64) {
        self.unknown.insert(*hash.as_bytes(), Instant::now());
        if self.generation() != generation {
            self.unknown.remove(hash.as_bytes());
        }
    }

    /// Drops what `change` may have made stale.
    pub(crate) fn forget(&self, change: Change) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        match change {
            Change::Key(id) => {
                let mut ids = lock(&self.ids);
                if let Some(hash) = ids.remove(&id) {
                    self.keys.remove(&hash);
                }
            }
            Change::Link { project, product } => {
                self.links.remove(&(project, product));
            }
        }
    }

    /// Drops what `change` (numbered `seq`, in a transaction the host owns) may have made
    /// stale, and keeps it from being served until the poller has seen `seq`.
    pub(crate) fn forget_pending(&self, change: Change, seq: i64) {
        {
            let mut pending = lock(&self.pending);
            if seq > self.applied.load(Ordering::Acquire) {
                pending.push(Pending { seq, change });
                self.pending_len.store(pending.len(), Ordering::Release);
            }
        }
        self.forget(change);
    }

    /// What the cache has done so far.
    pub(crate) fn stats(&self) -> CacheStats {
        let c = &self.counts;
        let applied = self.applied.load(Ordering::Acquire);
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            unknown: c.unknown.load(Ordering::Relaxed),
            bypassed: c.bypassed.load(Ordering::Relaxed),
            lookups: c.lookups.load(Ordering::Relaxed),
            failed_polls: c.failed_polls.load(Ordering::Relaxed),
            woken_polls: c.woken_polls.load(Ordering::Relaxed),
            feed_restarts: c.restarts.load(Ordering::Relaxed),
            keys: self.keys.len() as u64,
            feed_position: (applied >= 0).then_some(applied),
        }
    }

    /// Empties the cache.
    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut ids = lock(&self.ids);
        ids.clear();
        self.keys.clear();
        drop(ids);
        self.unknown.clear();
        self.products.clear();
        self.links.clear();
    }
}

impl crate::feed::ChangeListener for CacheState {
    fn changed(&self, change: Change) {
        self.forget(change);
    }

    fn changed_pending(&self, change: Change, seq: i64) {
        self.forget_pending(change, seq);
    }
}

/// A cache whose entries never weigh more than `n` in all (with [`UnitWeighter`]: never more
/// than `n` entries). quick_cache splits its capacity into shards and rounds each shard's
/// share up (so `Cache::new(250)` may hold 256): the capacity given is `n` rounded down to a
/// multiple of the shard count, which is chosen here the way quick_cache would (8, halved
/// while a shard would hold fewer than 32 items).
fn bounded<K, V, W, L>(
    n: usize,
    weighter: W,
    lifecycle: L,
) -> Result<Cache<K, V, W, DefaultHashBuilder, L>>
where
    K: Eq + std::hash::Hash,
    V: Clone,
    W: Weighter<K, V> + Clone,
    L: quick_cache::Lifecycle<K, V> + Clone,
{
    let mut shards: usize = 8;
    while shards > 1 && n.div_ceil(shards) < 32 {
        shards /= 2;
    }
    let capacity = (n / shards * shards).max(1);
    let options = OptionsBuilder::new()
        .shards(shards)
        .estimated_items_capacity(n)
        .weight_capacity(capacity as u64)
        .build()
        // Refused only when a required option is missing; both are set above.
        .map_err(|e| Error::configuration(format!("key cache: {e}")))?;
    Ok(Cache::with_options(options, weighter, DefaultHashBuilder::default(), lifecycle))
}

/// Reports the keys quick_cache evicts from `keys` to the insert that evicted them, which
/// drops them from the id map.
#[derive(Clone, Copy, Debug, Default)]
struct Evictions;

impl quick_cache::Lifecycle<[u8; 32], Arc<CachedKey>> for Evictions {
    type RequestState = Vec<(apikeys_core::KeyId, [u8; 32])>;

    fn on_evict(&self, state: &mut Self::RequestState, hash: [u8; 32], entry: Arc<CachedKey>) {
        state.push((entry.key.id, hash));
    }
}

/// Too many lookups of keys not in the cache are waiting already.
#[derive(Debug, thiserror::Error)]
#[error("too many concurrent lookups of uncached keys (KeyCache::max_concurrent_misses)")]
struct MissQueueFull;

/// What [`CacheState::insert_by_hash`] did.
pub(crate) struct Inserted {
    /// The entry is cached (no invalidation ran since its lookup began).
    pub(crate) kept: bool,
    /// The keys whose entries the insert evicted to make room.
    pub(crate) evicted: Vec<KeyId>,
}

/// The cache's first poll has not run in time (the database is slow or unreachable).
#[derive(Debug, thiserror::Error)]
#[error("the key cache has not read the change feed yet")]
struct NotPositioned;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use apikeys_core::hazmat::KeyHasher;
    use apikeys_core::{KeyId, Scopes, SigningSecret};

    fn key(id: KeyId) -> CachedKey {
        CachedKey::new(Arc::new(record(id)), None, None)
    }

    fn record(id: KeyId) -> ApiKey {
        let now = chrono::Utc::now();
        ApiKey {
            id,
            org_id: OrgId::new(),
            project_id: None,
            product_id: None,
            name: "k".into(),
            hint: "sk_…".into(),
            scopes: Scopes::new(),
            rate_limit: None,
            rate_limits: apikeys_core::RateLimits::new(),
            custom: serde_json::Map::new(),
            created_at: now,
            updated_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            use_count: 0,
            owner_id: None,
            credits: None,
            rolled_from: None,
            rolled_to: None,
            disabled_at: None,
            allowed_ips: None,
        }
    }

    fn hasher() -> KeyHasher {
        KeyHasher::new(SigningSecret::new("a-signing-secret-of-at-least-32-bytes!!").unwrap())
            .unwrap()
    }

    /// Keys inserted by many threads into a cache far smaller than them, so that every
    /// insert evicts: afterwards every cached entry must be findable by its id (what every
    /// revoke, update, delete and roll goes through). The id map once was swept apart from
    /// the insert, and a sweep running between an insert's two steps dropped the mapping of
    /// an entry then cached for good.
    #[test]
    fn churn_never_leaves_an_entry_its_id_cannot_find() {
        let hasher = Arc::new(hasher());
        // Rounds of 8 threads inserting keys each once into a cache of 32, each key then
        // answered from the cache a few times (so keys in use stay): an entry whose mapping
        // was lost stays lost until evicted, and the last ones lost are still cached when a
        // round ends.
        for round in 0..100 {
            let cache =
                Arc::new(CacheState::new(KeyCache::new().max_keys(32), Duration::ZERO).unwrap());
            let start = Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let (cache, hasher, start) = (cache.clone(), hasher.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for i in 0..256_usize {
                            let hash = hasher.hash(&format!("key-{round}-{t}-{i}"));
                            cache.insert(&hash, key(KeyId::new()), None, cache.generation());
                            // Checks answered from the cache: a key in use stays cached.
                            for _ in 0..3 {
                                cache.keys.get(hash.as_bytes());
                            }
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            let ids = lock(&cache.ids);
            let mut cached = 0;
            for (hash, entry) in cache.keys.iter() {
                cached += 1;
                assert_eq!(
                    ids.get(&entry.key.id),
                    Some(&hash),
                    "round {round}: an entry its id does not find"
                );
            }
            assert!(cached > 0 && cached <= 32);
            assert_eq!(ids.len(), cached, "the id map holds exactly the cached keys");
            drop(ids);
            // And so a change to each cached key drops it.
            let entries: Vec<_> = cache.keys.iter().map(|(_, e)| e.key.id).collect();
            for id in entries {
                cache.forget(Change::Key(id));
            }
            assert_eq!(cache.keys.len(), 0);
        }
    }

    /// The bound is by weight: a key whose record takes 4 KiB (long custom metadata) takes
    /// the room of four, so a cache with room for 32 holds at most 8 of them, and a small
    /// key weighs one.
    #[test]
    fn large_records_take_more_room() {
        let cache = CacheState::new(KeyCache::new().max_keys(32), Duration::ZERO).unwrap();
        let hasher = hasher();
        let mut big = record(KeyId::new());
        big.custom.insert("notes".into(), serde_json::Value::String("x".repeat(3_500)));
        let big = CachedKey::new(Arc::new(big), None, None);
        assert_eq!(big.weight, 4);
        assert_eq!(key(KeyId::new()).weight, 1);
        for i in 0..64 {
            let mut r = record(KeyId::new());
            r.custom = big.key.custom.clone();
            let entry = CachedKey::new(Arc::new(r), None, None);
            cache.insert(&hasher.hash(&format!("big-{i}")), entry, None, cache.generation());
        }
        assert!(cache.keys.len() <= 8, "{} large keys held", cache.keys.len());
        assert!(cache.keys.weight() <= 32);
    }

    /// While the cache is not serving, a key it holds is read from the database without a
    /// miss turn, one it holds as revoked is refused from memory, and a key it does not hold
    /// waits for a turn.
    #[test]
    fn known_keys_bypass_the_miss_limit_while_not_serving() {
        let cache = CacheState::new(KeyCache::new(), Duration::ZERO).unwrap();
        let hasher = hasher();
        let (known, unknown) = (hasher.hash("known"), hasher.hash("unknown"));
        cache.insert(&known, key(KeyId::new()), None, cache.generation());
        assert!(!cache.serving(), "no poll has caught up yet");
        assert!(matches!(cache.lookup(&known, None), Lookup::Bypass));
        assert!(matches!(cache.lookup(&unknown, None), Lookup::Miss));
        // A key held as revoked is refused from memory: no read, no miss turn.
        let revoked = hasher.hash("revoked");
        let mut record = record(KeyId::new());
        record.revoked_at = Some(chrono::Utc::now());
        let entry = CachedKey::new(Arc::new(record), None, None);
        cache.insert(&revoked, entry, None, cache.generation());
        assert!(
            matches!(cache.lookup(&revoked, None), Lookup::Hit(hit, None) if hit.key.revoked_at.is_some())
        );
        // Once a poll has caught up, it is served from memory.
        cache.last_ok.store(cache.since_epoch() + 1, Ordering::Release);
        assert!(matches!(cache.lookup(&known, None), Lookup::Hit(..)));
    }

    /// A poll still under way `max_staleness` after it started counts as failing: with
    /// `stale_if_error`, the cache keeps serving through it; without, it stops.
    #[test]
    fn a_poll_in_flight_past_the_bound_counts_as_failing() {
        let bound = Duration::from_millis(20);
        let lenient = KeyCache::new().max_staleness(bound).stale_if_error(Duration::from_secs(60));
        for (config, serves) in [(lenient, true), (KeyCache::new().max_staleness(bound), false)] {
            let cache = CacheState::new(config, Duration::ZERO).unwrap();
            let started = cache.since_epoch() + 1;
            cache.last_ok.store(started, Ordering::Release);
            cache.polling_since.store(started, Ordering::Release);
            std::thread::sleep(bound * 2);
            assert_eq!(cache.serving(), serves);
        }
    }
}
