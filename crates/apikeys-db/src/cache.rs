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

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use apikeys_core::hazmat::{KeyHash, ProductAccess};
use apikeys_core::{ApiKey, Error, OrgId, ProductId, ProjectId, Result};
use chrono::Utc;
use quick_cache::sync::Cache;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::breaker::Db;
use crate::convert::naive;
use crate::feed::{self, Change};
use crate::lock::lock;

/// Feed rows read per statement while catching up.
const FEED_PAGE: u64 = 500;
/// How many polls run per `max_staleness`.
const POLLS_PER_BOUND: u32 = 4;
/// The longest time between two polls, whatever the bound (a failed first poll, before the
/// tables exist, is retried that soon).
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest `max_staleness` accepted.
const MIN_STALENESS: Duration = Duration::from_millis(20);
/// The shortest feed retention accepted.
const MIN_RETENTION: Duration = Duration::from_secs(60);
/// How often a client deletes feed rows older than the retention.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The metric counting cache lookups, labelled `result`: `hit`, `miss`, `unknown` (a key
/// known not to exist), `bypass` (the cache is not serving: its last successful poll is too
/// old).
pub(crate) const CACHE_METRIC: &str = "apikeys_cache_lookups_total";
/// The gauge of the feed's lag (seconds): how long ago the last successful poll started.
pub(crate) const FEED_LAG_METRIC: &str = "apikeys_cache_feed_lag_seconds";
/// The counter of feed rows applied.
pub(crate) const FEED_CHANGES_METRIC: &str = "apikeys_cache_feed_changes_total";

/// The verified-key cache's settings, for [`ClientBuilder::cache`](crate::ClientBuilder::cache).
///
/// ```
/// use std::time::Duration;
/// use apikeys_db::KeyCache;
///
/// let cache = KeyCache::new().max_keys(100_000).max_staleness(Duration::from_secs(1));
/// assert_eq!(cache.staleness(), Duration::from_secs(1));
/// ```
///
/// A key revoked, updated or deleted through any client (any replica) is refused (or seen
/// changed) by every other client within `max_staleness`; through the same client, at once.
/// While the database cannot be read, the cache stops serving `max_staleness` after the last
/// successful poll, unless [`stale_if_error`](Self::stale_if_error) allows longer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCache {
    max_keys: usize,
    max_staleness: Duration,
    stale_if_error: Option<Duration>,
    feed_retention: Duration,
    max_concurrent_misses: usize,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_staleness: Duration::from_secs(1),
            stale_if_error: None,
            feed_retention: Duration::from_secs(3_600),
            max_concurrent_misses: 4,
        }
    }
}

impl KeyCache {
    /// 100 000 keys, 1 s staleness, no stale-if-error, 1 h feed retention, 4 concurrent
    /// lookups of keys not in the cache.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The most keys held (default 100 000); the least recently useful go first. Keys not
    /// found and product facts have bounds of their own, the same number.
    #[must_use]
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The longest a change made through another client may go unseen (default 1 s, at
    /// least 20 ms). The client polls the change feed four times per period, and at least
    /// once a second: one indexed read each.
    #[must_use]
    pub fn max_staleness(mut self, bound: Duration) -> Self {
        self.max_staleness = bound;
        self
    }

    /// The configured `max_staleness`.
    #[must_use]
    pub fn staleness(&self) -> Duration {
        self.max_staleness
    }

    /// Keep serving cached keys while polls of the change feed *fail*, for up to `bound`
    /// after the last successful one (at least `max_staleness`). Off by default: a failing
    /// poll stops the cache after `max_staleness`, so that a partitioned replica never
    /// serves a revoked key for longer than the bound. With it on, that is the bound during
    /// an outage: a key revoked meanwhile may pass for up to `bound`.
    #[must_use]
    pub fn stale_if_error(mut self, bound: Duration) -> Self {
        self.stale_if_error = Some(bound);
        self
    }

    /// How long change-feed rows are kept (default 1 h, at least 1 min). Every client
    /// deletes older rows once a minute. A client that falls further behind than this (a
    /// paused process) notices the rows it missed and empties its cache.
    #[must_use]
    pub fn feed_retention(mut self, retention: Duration) -> Self {
        self.feed_retention = retention;
        self
    }

    /// How many database lookups of keys that are not in the cache may run at once (default
    /// 4). Keys presented for the first time, and keys that do not exist, wait for one of
    /// these; keys in the cache never do. This is what keeps a flood of made-up keys from
    /// taking every pooled connection (SECURITY.md). A lookup that cannot start within the
    /// pool's acquire timeout fails with [`Error::Unavailable`].
    #[must_use]
    pub fn max_concurrent_misses(mut self, n: usize) -> Self {
        self.max_concurrent_misses = n;
        self
    }

    /// Checks the settings.
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::configuration(format!("key cache: {why}")));
        if self.max_keys == 0 {
            return bad("max_keys must be positive");
        }
        if self.max_staleness < MIN_STALENESS {
            return bad("max_staleness must be at least 20 ms");
        }
        if self.stale_if_error.is_some_and(|b| b < self.max_staleness) {
            return bad("stale_if_error must be at least max_staleness");
        }
        if self.feed_retention < MIN_RETENTION.max(self.max_staleness) {
            return bad("feed_retention must be at least 1 minute and at least max_staleness");
        }
        if self.max_concurrent_misses == 0 || self.max_concurrent_misses > Semaphore::MAX_PERMITS {
            return bad("max_concurrent_misses must be positive");
        }
        Ok(())
    }

    fn poll_interval(&self) -> Duration {
        (self.max_staleness / POLLS_PER_BOUND).min(MAX_POLL_INTERVAL)
    }
}

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

/// What the cache has done, counted per client (see [`CacheStats`]).
#[derive(Debug, Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    unknown: AtomicU64,
    bypassed: AtomicU64,
    lookups: AtomicU64,
    failed_polls: AtomicU64,
}

/// What a client's verified-key cache has done since the client was built, from
/// [`ApiKeyClient::cache_stats`](crate::ApiKeyClient::cache_stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Checks answered from the cache.
    pub hits: u64,
    /// Checks of keys the cache did not hold (read from the database, then cached).
    pub misses: u64,
    /// Checks of keys the cache knew not to exist (refused without reading the database).
    pub unknown: u64,
    /// Checks that did not use the cache because its last successful poll of the change
    /// feed was too long ago.
    pub bypassed: u64,
    /// Key lookups the cache sent to the database (misses and bypasses).
    pub lookups: u64,
    /// Polls of the change feed that failed (the database could not be read).
    pub failed_polls: u64,
    /// Keys held now.
    pub keys: u64,
    /// The last change-feed row applied (`None` before the first poll).
    pub feed_position: Option<i64>,
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
            keys: Cache::new(n),
            ids: Mutex::new(HashMap::new()),
            unknown: Cache::new(n),
            products: Cache::new(n),
            links: Cache::new(n),
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

    /// Whether entries may be served now: the last poll that caught up started less than
    /// `max_staleness` ago (or, while polls fail, less than `stale_if_error`).
    pub(crate) fn serving(&self) -> bool {
        let ok = self.last_ok.load(Ordering::Acquire);
        if ok == 0 {
            return false;
        }
        let age = Duration::from_nanos(self.since_epoch().saturating_sub(ok - 1));
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
        if !self.serving() {
            self.counts.bypassed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(CACHE_METRIC, "result" => "bypass").increment(1);
            return Lookup::Miss;
        }
        let result = self.lookup_inner(hash, product);
        let (count, label) = match &result {
            Lookup::Hit(..) => (&self.counts.hits, "hit"),
            Lookup::Unknown => (&self.counts.unknown, "unknown"),
            Lookup::Miss => (&self.counts.misses, "miss"),
        };
        count.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(CACHE_METRIC, "result" => label).increment(1);
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

    /// Reads the feed rows after the last one applied and applies them, until none is left.
    async fn catch_up(&self, db: &Db) -> Result<(), sea_orm::DbErr> {
        let mut applied = self.applied.load(Ordering::Acquire);
        if applied < 0 {
            // First poll: whatever was cached before the head was read may be older than it.
            let head = feed::head(db).await?;
            self.clear();
            self.applied.store(head, Ordering::Release);
            return Ok(());
        }
        loop {
            let rows = feed::after(db, applied, FEED_PAGE).await?;
            let Some(first) = rows.first() else { return Ok(()) };
            if first.seq != applied + 1 {
                // Rows after ours were purged before we read them: start afresh.
                tracing::warn!(
                    applied,
                    next = first.seq,
                    "key cache fell behind the change feed's retention; emptying it"
                );
                self.clear();
            }
            for row in &rows {
                if let Some(change) = Change::from_row(row) {
                    self.forget(change);
                }
                applied = row.seq;
            }
            metrics::counter!(FEED_CHANGES_METRIC).increment(rows.len() as u64);
            self.applied.store(applied, Ordering::Release);
            self.resolve_pending(applied);
            if (rows.len() as u64) < FEED_PAGE {
                return Ok(());
            }
        }
    }

    /// Forgets the pending marks the poller has now seen past.
    fn resolve_pending(&self, applied: i64) {
        let mut pending = lock(&self.pending);
        if !pending.is_empty() {
            pending.retain(|p| p.seq > applied);
            self.pending_len.store(pending.len(), Ordering::Release);
        }
    }

    /// One poll: catch up with the feed, then record when it started as the last success.
    async fn poll(&self, db: &Db) {
        let started = self.since_epoch().saturating_add(1);
        match self.catch_up(db).await {
            Ok(()) => {
                self.last_ok.store(started, Ordering::Release);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("key cache: change feed readable again");
                }
            }
            Err(e) => {
                self.counts.failed_polls.fetch_add(1, Ordering::Relaxed);
                let first = self.last_ok.load(Ordering::Acquire) == 0;
                if first {
                    // Before the first success: most likely the tables are not created yet.
                    tracing::debug!(error = %e, "key cache: the change feed is not readable yet");
                } else if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "key cache: reading the change feed failed; the cache stops serving once its bound has passed");
                }
            }
        }
        let ok = self.last_ok.load(Ordering::Acquire);
        if ok > 0 {
            let lag = Duration::from_nanos(self.since_epoch().saturating_sub(ok - 1));
            metrics::gauge!(FEED_LAG_METRIC).set(lag.as_secs_f64());
        }
    }
}

/// Too many lookups of keys not in the cache are waiting already.
#[derive(Debug, thiserror::Error)]
#[error("too many concurrent lookups of uncached keys (KeyCache::max_concurrent_misses)")]
struct MissQueueFull;

/// Polls the change feed every `max_staleness / 4` and purges old feed rows once a minute,
/// on `runtime`, until the cache is dropped.
pub(crate) fn spawn_poller(
    runtime: &tokio::runtime::Handle,
    state: Weak<CacheState>,
    db: Db,
    writer: Db,
) {
    let Some(config) = state.upgrade().map(|s| s.config.clone()) else { return };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(config.poll_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = Instant::now();
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            state.poll(&db).await;
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = Instant::now();
                let before = Utc::now() - config.feed_retention;
                if let Err(e) = feed::purge(&writer, naive(before)).await {
                    tracing::warn!(error = %e, "purging old change-feed rows failed");
                }
            }
        }
    });
}
