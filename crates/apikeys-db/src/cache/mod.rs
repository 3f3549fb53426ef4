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
//! A lookup that misses reads the database and then inserts what it read. An invalidation
//! racing it could land between the read and the insert; so every invalidation first bumps a
//! generation counter, and an insert whose lookup began under an older generation removes
//! itself again.
//!
//! Writes the client makes itself drop the entries they touch once they commit (the next
//! call through this client sees the change). Writes in a transaction the host owns
//! ([`InTransaction`](crate::InTransaction)) drop them at once, and the entries they touch
//! are not served from the cache again until the poller has seen the change's feed row (or
//! the row that took its number after a rollback).

mod config;
mod poll;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::hazmat::{KeyHash, ProductAccess};
use apikeys_core::{ApiKey, Error, OrgId, ProductId, ProjectId, Result};
use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::feed::Change;
use crate::lock::lock;
use config::Counts;
pub(crate) use config::DEFAULT_RETENTION;
pub use config::{CacheStats, KeyCache};
pub(crate) use poll::spawn_poller;

/// A key found, as cached.
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub(crate) key: ApiKey,
    /// Set when the stored hash is under a previous signing secret (a re-hash is due).
    pub(crate) rehash: Option<crate::validate::Rehash>,
}

/// What the cache knows about a presented key.
pub(crate) enum Lookup {
    /// Found, with the product facts asked for.
    Hit(Arc<CachedKey>, Option<ProductAccess>),
    /// Known not to exist (recently).
    Unknown,
    /// Not known: read the database.
    Miss,
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
    keys: Cache<[u8; 32], Arc<CachedKey>>,
    /// The hash each cached key is under, to drop it by id. May name hashes already
    /// evicted; swept when it outgrows the cache.
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
    failing: AtomicBool,
    /// The last feed row applied (`-1`: none yet; the first poll starts at the head).
    applied: AtomicI64,
    pending: Mutex<Vec<Pending>>,
    pending_len: AtomicUsize,
    misses: Semaphore,
    miss_wait: Duration,
    counts: Counts,
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
    pub(crate) fn new(config: KeyCache, miss_wait: Duration) -> Self {
        let n = config.max_keys;
        Self {
            keys: bounded(n),
            ids: Mutex::new(HashMap::new()),
            unknown: bounded(n),
            products: bounded(n),
            links: bounded(n),
            generation: AtomicU64::new(0),
            epoch: Instant::now(),
            last_ok: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            applied: AtomicI64::new(-1),
            pending: Mutex::new(Vec::new()),
            pending_len: AtomicUsize::new(0),
            misses: Semaphore::new(config.max_concurrent_misses),
            miss_wait,
            counts: Counts::default(),
            config,
        }
    }

    fn since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long ago the last poll that caught up started (`None`: none has yet).
    fn since_last_ok(&self) -> Option<Duration> {
        let ok = self.last_ok.load(Ordering::Acquire);
        (ok > 0).then(|| Duration::from_nanos(self.since_epoch().saturating_sub(ok - 1)))
    }

    /// Whether entries may be served now: the last poll that caught up started less than
    /// `max_staleness` ago (or, while polls fail, less than `stale_if_error`).
    pub(crate) fn serving(&self) -> bool {
        let Some(age) = self.since_last_ok() else { return false };
        age < self.config.max_staleness
            || (self.failing.load(Ordering::Relaxed)
                && self.config.stale_if_error.is_some_and(|b| age < b))
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
            return Lookup::Miss;
        }
        let result = self.lookup_inner(hash, product);
        let count = match &result {
            Lookup::Hit(..) => &self.counts.hits,
            Lookup::Unknown => &self.counts.unknown,
            Lookup::Miss => &self.counts.misses,
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
        let id = entry.key.id;
        let project = entry.key.project_id;
        {
            let mut ids = lock(&self.ids);
            if ids.len() >= self.config.max_keys.saturating_mul(2) {
                ids.retain(|_, h| self.keys.contains_key(h));
            }
            ids.insert(id, *hash.as_bytes());
        }
        self.keys.insert(*hash.as_bytes(), Arc::new(entry));
        if let Some(access) = product {
            let org = (!access.org_id.as_uuid().is_nil()).then_some(access.org_id);
            let fact = ProductFact { org, read_at: Instant::now() };
            self.products.insert(access.product_id, fact);
            if let Some(project) = project {
                self.links.insert((project, access.product_id), access.key_project_linked);
            }
        }
        if self.generation() != generation {
            // An invalidation ran while this lookup was reading: what it read may be older.
            self.keys.remove(hash.as_bytes());
            if let Some(access) = product {
                self.products.remove(&access.product_id);
                if let Some(project) = project {
                    self.links.remove(&(project, access.product_id));
                }
            }
        }
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
                let hash = lock(&self.ids).remove(&id);
                if let Some(hash) = hash {
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
            keys: self.keys.len() as u64,
            feed_position: (applied >= 0).then_some(applied),
        }
    }

    /// Empties the cache.
    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        lock(&self.ids).clear();
        self.keys.clear();
        self.unknown.clear();
        self.products.clear();
        self.links.clear();
    }
}

/// A cache that never holds more than `n` entries. quick_cache splits its capacity into
/// shards and rounds each shard's share up (so `Cache::new(250)` may hold 256): the capacity
/// given is `n` rounded down to a multiple of the shard count, which is chosen here the way
/// quick_cache would (8, halved while a shard would hold fewer than 32 items).
fn bounded<K, V>(n: usize) -> Cache<K, V>
where
    K: Eq + std::hash::Hash,
    V: Clone,
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
        .build();
    match options {
        Ok(options) => Cache::with_options(
            options,
            UnitWeighter,
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        ),
        // Every option above is in range; quick_cache's own sizing is the fallback.
        Err(_) => Cache::new(capacity),
    }
}

/// Too many lookups of keys not in the cache are waiting already.
#[derive(Debug, thiserror::Error)]
#[error("too many concurrent lookups of uncached keys (KeyCache::max_concurrent_misses)")]
struct MissQueueFull;
