//! The cache's settings ([`KeyCache`]) and what it reports ([`CacheStats`]).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use apikeys_core::{Error, Result};
use tokio::sync::Semaphore;

/// How many polls run per `max_staleness`.
const POLLS_PER_BOUND: u32 = 4;
/// The longest time between two polls, whatever the bound (a failed first poll, before the
/// tables exist, is retried that soon).
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest `max_staleness` accepted.
const MIN_STALENESS: Duration = Duration::from_millis(20);
/// The shortest feed retention accepted.
const MIN_RETENTION: Duration = Duration::from_secs(60);

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
    pub(super) max_keys: usize,
    pub(super) max_staleness: Duration,
    pub(super) stale_if_error: Option<Duration>,
    pub(crate) feed_retention: Duration,
    pub(super) max_concurrent_misses: usize,
}

/// How long change-feed rows are kept, unless a cache says otherwise.
pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(3_600);

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_staleness: Duration::from_secs(1),
            stale_if_error: None,
            feed_retention: DEFAULT_RETENTION,
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

    /// The room for keys (default 100 000): as many keys whose records take up to 1 KiB
    /// each, so the keys held take at most about `n` KiB; a key with a larger record (long
    /// custom metadata) takes the room of one key per KiB. The least recently useful go
    /// first. Keys not found and product facts have bounds of their own, the same number.
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

    /// Keep serving cached keys while polls of the change feed *fail* (or one has been under
    /// way for longer than `max_staleness`: a database that became slow), for up to `bound`
    /// after the last successful one (at least `max_staleness`). Off by default: a failing
    /// poll stops the cache after `max_staleness`, so that a partitioned replica never
    /// serves a revoked key for longer than the bound. With it on, that is the bound during
    /// an outage: a key revoked meanwhile may pass for up to `bound`.
    #[must_use]
    pub fn stale_if_error(mut self, bound: Duration) -> Self {
        self.stale_if_error = Some(bound);
        self
    }

    /// How long change-feed rows are kept (default 1 h, at least 1 min): every client
    /// deletes older rows (by its clock) in the background once every 256 changes it makes,
    /// and [`ApiKeyClient::purge_change_feed`](crate::ApiKeyClient::purge_change_feed) on
    /// demand. A client that falls further behind than this (a paused process) notices the
    /// rows it missed and empties its cache.
    #[must_use]
    pub fn feed_retention(mut self, retention: Duration) -> Self {
        self.feed_retention = retention;
        self
    }

    /// How many database lookups of keys that are not in the cache may run at once (default
    /// 4). Keys presented for the first time, and keys that do not exist, wait for one of
    /// these; keys in the cache never do (while the cache is not serving, they are read from
    /// the database at once, bounded by the pool). This is what keeps a flood of made-up keys from
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

    pub(super) fn poll_interval(&self) -> Duration {
        (self.max_staleness / POLLS_PER_BOUND).min(MAX_POLL_INTERVAL)
    }
}

/// What the cache has done, counted per client (see [`CacheStats`]).
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) unknown: AtomicU64,
    pub(super) bypassed: AtomicU64,
    pub(super) lookups: AtomicU64,
    pub(super) failed_polls: AtomicU64,
    pub(super) woken_polls: AtomicU64,
    pub(super) restarts: AtomicU64,
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
    /// Polls of the change feed started early by a change notice from another client
    /// (`ClientBuilder::invalidation_through_redis`, with the cargo feature `redis`),
    /// rather than by the timer.
    pub woken_polls: u64,
    /// Times the cache emptied itself because the change feed did not follow on from what it
    /// had applied: rows purged while it was behind, or the database restored, failed over
    /// or created afresh (its head went back, or a row it applied changed).
    pub feed_restarts: u64,
    /// Keys held now.
    pub keys: u64,
    /// The last change-feed row applied (`None` before the first poll).
    pub feed_position: Option<i64>,
}
