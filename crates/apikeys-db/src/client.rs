//! [`ApiKeyClient`]: what it holds, and the calls that are about the client itself
//! (schema, transactions, shutdown). The verbs live beside their concern: `validate`
//! (the hot path), `key_admin`, `bootstrap`, `transaction`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apikeys_core::hazmat::KeyHasher;
use apikeys_core::{Error, KeyFormat, Result};
use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, SqliteTransactionMode,
    TransactionOptions,
};
use uuid::Uuid;

use crate::breaker::Db;
use crate::cache::{CacheStats, CachedLookup};
use crate::clock::Clock;
use crate::credits::CreditSpender;
use crate::error::storage;
use crate::feed::{Change, ChangeFeed};
use crate::id::IdMinter;
use crate::observe::CheckMetrics;
use crate::rate_limit::RateLimiter;
use crate::secret_version::SecretRegistry;
use crate::usage::UsageRecorder;

/// The client a backend holds: issues, checks and manages API keys in one database.
///
/// Cheap to clone (all clones share one connection pool, hasher and rate limiter). Build it
/// with [`ApiKeyClient::builder`].
///
/// ```
/// use apikeys_db::{ApiKeyClient, NewKey, ValidateOptions};
///
/// # #[tokio::main]
/// # async fn main() -> apikeys_db::Result<()> {
/// let client = ApiKeyClient::builder()
///     .database_url("sqlite::memory:")
///     .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
///     .build()
///     .await?;
/// client.create_tables().await?;
/// let (org, _) = client.get_or_create_organization("acme").await?;
/// let issued = client.create_key(org.id, NewKey::new("ci").with_scopes(["read"])).await?;
///
/// let read = ValidateOptions::new().require_scopes(["read"])?; // parsed once, reused
/// let key = client.validate_key(issued.key.expose_secret(), &read).await?;
/// assert_eq!(key.name, "ci");
/// # Ok(())
/// # }
/// ```
///
/// Besides the errors each method lists, every call that reaches the database fails with
/// [`Error::Unavailable`] when the database cannot be reached, after at most the builder's
/// connect timeout plus acquire timeout (5 s each by default) for the first such call and at
/// once for the later ones (see
/// [`ClientBuilder::reconnect_interval`](crate::ClientBuilder::reconnect_interval)), or when
/// a statement runs past the statement timeout (5 s); the client reconnects by itself once
/// the database is back.
/// A call the database aborts for a deadlock or a serialization failure (after the client's
/// own retries, where it has any) fails with [`Error::Conflict`], which is retryable.
///
/// The client is a composition of parts, each with its own connection handle: the key
/// lookup (format, HMAC, one indexed read), the optional verified-key cache in front of it
/// (with its change-feed poller), the rate limiter (database clock, one conditional upsert
/// per check or per leased block) and the usage recorder (immediate or batched); all their
/// connections share one breaker that fails calls fast while the database is unreachable. Call
/// [`shutdown`](Self::shutdown) before the process exits when usage is batched.
#[derive(Clone)]
pub struct ApiKeyClient {
    pub(crate) inner: Arc<Inner>,
    /// Who the audit trail names for this handle's changes (see [`acting_as`](Self::acting_as)).
    pub(crate) actor: Option<Arc<str>>,
}

pub(crate) struct Inner {
    /// The pool reads go through (behind the breaker, as is the writer).
    pub(crate) db: Db,
    /// The pool writes go through: the same pool on PostgreSQL and MySQL; on a SQLite file,
    /// one connection of its own, so writers queue in the pool instead of sleeping in
    /// SQLite's busy handler.
    pub(crate) writer: Db,
    pub(crate) hasher: Arc<KeyHasher>,
    pub(crate) format: KeyFormat,
    pub(crate) default_lifetime: Option<Duration>,
    pub(crate) clock: Clock,
    pub(crate) ids: IdMinter,
    /// The hot path's parts, in the order a check runs them.
    pub(crate) keys: CachedLookup,
    pub(crate) limiter: RateLimiter,
    pub(crate) credits: CreditSpender,
    pub(crate) usage: UsageRecorder,
    /// The change feed: recorded with every change, heard by the cache.
    pub(crate) feed: Arc<ChangeFeed>,
    /// The signing secrets' versions, checked against the database's registry.
    pub(crate) secrets: Arc<SecretRegistry>,
    /// The hot path's metric handles.
    pub(crate) metrics: CheckMetrics,
}

impl fmt::Debug for ApiKeyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyClient")
            .field("backend", &self.inner.db.get_database_backend())
            .field("format", &self.inner.format)
            .field("hasher", &self.inner.hasher)
            .field("default_lifetime", &self.inner.default_lifetime)
            .field("rate_limit_mode", &self.inner.limiter.mode())
            .field("credit_mode", &self.inner.credits.mode())
            .field("batched_usage", &self.inner.usage.is_batched())
            .field("cache", &self.inner.keys.cache())
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl ApiKeyClient {
    /// Starts building a client.
    pub fn builder() -> crate::ClientBuilder {
        crate::ClientBuilder::default()
    }

    /// The underlying SeaORM connection (shared pool), for the host application's own queries.
    #[must_use]
    pub fn connection(&self) -> &DatabaseConnection {
        self.inner.db.raw()
    }

    /// The key format this client issues and accepts.
    #[must_use]
    pub fn key_format(&self) -> &KeyFormat {
        &self.inner.format
    }

    /// Creates or upgrades the apikeys tables by running the same migrations as the
    /// `apikeys-migration` crate. Safe to call on every start, from every replica at once:
    /// applied steps are skipped, and concurrent callers (tasks or processes) take turns under
    /// a database lock: a PostgreSQL transaction-scoped advisory lock, a MySQL named lock
    /// (`GET_LOCK`, waited for up to 60 s), SQLite's write lock (`BEGIN IMMEDIATE`).
    ///
    /// It then registers the version of each signing secret the client holds with a
    /// fingerprint of the secret (the first deploy to use a version registers it) and checks
    /// each against the one registered: a secret labelled with another secret's version is
    /// refused here, and before the client first stores a key's hash (creating, rolling or
    /// re-hashing a key) or lists keys by version.
    ///
    /// # Errors
    /// [`Error::Storage`] if a migration fails or the lock cannot be taken;
    /// [`Error::Configuration`] for a signing secret whose version is registered with another
    /// secret.
    pub async fn create_tables(&self) -> Result<()> {
        let txn = self.begin_write().await?;
        crate::schema::migrate_locked(txn).await?;
        self.inner.secrets.reset();
        self.inner.secrets.check().await
    }

    /// The current time from the client's clock, truncated to what every database stores.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        crate::clock::now(&self.inner.clock)
    }

    /// A new time-ordered id stamped with `now` (the client's clock), so that ids and
    /// creation times agree even under an injected clock.
    pub(crate) fn new_id(&self, now: DateTime<Utc>) -> Uuid {
        self.inner.ids.mint(now)
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Begins a read-write transaction on the writer. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`), so writers of other processes wait for each other instead of
    /// failing to upgrade a read lock.
    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction> {
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        self.inner.writer.begin_with_options(options).await.map_err(storage)
    }

    /// Runs `op` in a write transaction of the client's own: committed when it succeeds,
    /// rolled back when it fails.
    pub(crate) async fn in_transaction<T>(
        &self,
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<T> {
        let whole = async {
            let txn = self.begin_write().await?;
            let result = op(&txn).await;
            finish(txn, result).await
        };
        self.inner.writer.bounded(whole, storage).await
    }

    /// Runs `op`, which makes `change`, in a write transaction of the client's own that also
    /// appends the change to the feed (first, see [`feed::record`]); once it has ended, the
    /// client's own cache forgets what the change touched.
    pub(crate) async fn change<T>(
        &self,
        change: Change,
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<T> {
        self.change_all(&[change], op).await
    }

    /// [`change`](Self::change) for several changes at once: all appended to the feed
    /// first (see [`feed::record`]), then `op`, in one transaction; once it has ended, the
    /// client's own cache forgets what each touched.
    ///
    /// A change to a key the database does not have (`op` fails with
    /// [`Error::NotFound`]) is still appended to the feed, in a transaction of its own: a
    /// cache may hold that key from rows the database has since lost (a point-in-time restore
    /// or a failover that lost its creation, which writes no feed row), and revoking or
    /// deleting it by id is then the way to make every replica drop it.
    pub(crate) async fn change_all<T>(
        &self,
        changes: &[Change],
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<T> {
        let feed = &self.inner.feed;
        let record_all = async |txn: &DatabaseTransaction| {
            for change in changes {
                feed.record(txn, *change).await?;
            }
            Ok(())
        };
        let result = self
            .in_transaction(async |txn| {
                record_all(txn).await?;
                op(txn).await
            })
            .await;
        if matches!(result, Err(Error::NotFound { .. }))
            && let Err(e) = self.in_transaction(record_all).await
        {
            tracing::warn!(error = %e, "appending the change of a key not found to the change feed failed");
        }
        for change in changes {
            feed.after_commit(*change);
        }
        result
    }

    /// Appends `change` to the feed on `txn`, before anything `op` does there (see
    /// [`feed::record`](crate::feed::record)), then runs `op`; returns the change's number and
    /// `op`'s result.
    pub(crate) async fn recorded<T>(
        &self,
        txn: &DatabaseTransaction,
        change: Change,
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<(i64, T)> {
        let seq = self.inner.feed.record(txn, change).await?;
        Ok((seq, op(txn).await?))
    }

    /// Deletes the change-feed rows older than the retention (by this client's clock; see
    /// [`KeyCache::feed_retention`](crate::KeyCache::feed_retention), an hour by default),
    /// oldest first and never the newest, which tells a caching client whether it missed rows.
    /// Only a prefix of the feed is ever deleted: a row stamped early by a writer whose clock
    /// is behind stays while any row before it does, so no caching client misses a change
    /// without noticing (one that had not yet read a purged row empties its cache). Every client
    /// does this in the background once every 256 changes it makes; call it from a
    /// maintenance job for a guaranteed bound. Returns the number of rows deleted.
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Storage`] if the database fails.
    pub async fn purge_change_feed(&self) -> Result<u64> {
        self.inner.feed.purge().await
    }

    /// What the verified-key cache has done so far (`None`: the client has no cache; see
    /// [`ClientBuilder::cache`](crate::ClientBuilder::cache)).
    #[must_use]
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.inner.keys.cache().map(|c| c.stats())
    }

    /// Loads the keys that can pass a check (neither revoked nor expired) into the
    /// verified-key cache, in id order, 1 000 per statement; returns how many keys it
    /// loaded. It stops when the cache's room
    /// ([`KeyCache::max_keys`](crate::KeyCache::max_keys)) is taken or an insert evicts a
    /// key, so it never swaps out keys in use: size the cache a quarter above the live keys (the
    /// default room is 100 000) to have them all. Call it after
    /// [`build`](crate::ClientBuilder::build) and before the service takes traffic: then
    /// the first check of a loaded key after a deploy waits for no lookup. A key stored
    /// under a previous signing secret only is left out (a tracked check reads and
    /// re-hashes it). Product facts are not loaded: the first check that asks for a product
    /// reads them.
    ///
    /// What is loaded is kept fresh like any cached key: a change heard while a page is
    /// read keeps that page's keys out (the page is read again, up to three times), and
    /// later changes reach them through the change feed within
    /// [`max_staleness`](crate::KeyCache::max_staleness).
    ///
    /// It first waits for the cache's first read of the change feed (which empties the
    /// cache): at most twice the longer of `max_staleness` and the wait for a database
    /// connection ([`ClientBuilder::acquire_timeout`](crate::ClientBuilder::acquire_timeout), 5 s
    /// by default).
    ///
    /// # Errors
    /// [`Error::Configuration`] when the client has no cache; [`Error::Unavailable`] (also
    /// when the first read of the feed has not happened in time); [`Error::Storage`].
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, KeyCache, NewKey, VerifyOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// let client = ApiKeyClient::builder()
    ///     .database_url("sqlite::memory:")
    ///     .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
    ///     .cache(KeyCache::new())
    ///     .build()
    ///     .await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// # client.create_key(org.id, NewKey::new("ci")).await?;
    /// let loaded = client.warm_cache().await?;
    /// assert_eq!(loaded, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn warm_cache(&self) -> Result<usize> {
        self.inner.keys.warm(self.now()).await
    }

    /// Begins a transaction for the host application to own: run its own statements on it,
    /// the client's writes through [`with`](Self::with), then commit or roll back. It is a
    /// plain SeaORM `DatabaseTransaction` on the connection the client writes through; on
    /// SQLite it holds the database's write lock from the start (`BEGIN IMMEDIATE`), which
    /// is what lets it write after reading without failing on a busy database.
    ///
    /// Any other transaction on the same database works with [`with`](Self::with) too (for
    /// instance one of the host's own pool); on SQLite begin it as `IMMEDIATE`.
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn begin(&self) -> Result<DatabaseTransaction> {
        self.begin_write().await
    }

    /// Graceful shutdown: gives the units of current windows that
    /// [`RateLimitMode::Leased`](crate::RateLimitMode::Leased) holds back to the database,
    /// stops the background usage flusher and writes the use counts held in memory (batched
    /// usage tracking). Call it before the process exits; dropping the
    /// last clone writes nothing (it only logs a warning with what was lost). The client
    /// stays usable afterwards, writing every later use at once. Returns the number of keys
    /// whose counts were written (0 without batching).
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Storage`]; the counts are then kept, and a later
    /// `shutdown` or [`flush_usage`](Self::flush_usage) tries again.
    pub async fn shutdown(&self) -> Result<usize> {
        // Leased units and credits first; failing to give them back only leaves them unspent.
        match self.inner.limiter.release().await {
            Ok(0) => {}
            Ok(units) => tracing::debug!(units, "leased rate-limit units given back"),
            Err(e) => tracing::warn!(error = %e, "giving leased rate-limit units back failed"),
        }
        match self.inner.credits.release().await {
            Ok(0) => {}
            Ok(credits) => tracing::debug!(credits, "leased credits given back"),
            Err(e) => tracing::warn!(error = %e, "giving leased credits back failed"),
        }
        self.inner.usage.shutdown().await
    }

    /// Writes the use counts that batched usage tracking
    /// ([`ClientBuilder::usage_flush_interval`](crate::ClientBuilder::usage_flush_interval))
    /// holds in memory now, without stopping the background flusher. Returns the number of
    /// keys written (0 without batching).
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Storage`]; the counts are then kept for the next
    /// flush.
    pub async fn flush_usage(&self) -> Result<usize> {
        self.inner.usage.flush().await
    }

    /// Deletes the rate-limit window rows that ended at least five minutes ago by the
    /// database's clock (a row is kept that long after its window so that a check already
    /// in flight never finds its window gone). The client already does this in the
    /// background every few thousand checks; call it from a maintenance job for a
    /// guaranteed bound. Returns the number of rows deleted.
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Storage`] if the database fails.
    pub async fn purge_rate_limit_windows(&self) -> Result<u64> {
        self.inner.limiter.purge().await
    }
}

/// Ends a transaction the client began (or a savepoint in the host's): commits on success,
/// rolls back on failure and returns the failure.
pub(crate) async fn finish<T>(txn: DatabaseTransaction, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => {
            txn.commit().await.map_err(storage)?;
            Ok(value)
        }
        Err(e) => {
            if let Err(rollback) = txn.rollback().await {
                tracing::warn!(error = %rollback, "rolling back after a failed call failed");
            }
            Err(e)
        }
    }
}
