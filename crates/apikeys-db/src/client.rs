//! [`ApiKeyClient`] and its [`ClientBuilder`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apikeys_core::{Error, KeyFormat, KeyHasher, Result, SigningSecret};
use chrono::{DateTime, Utc};
use migration::MigratorTrait;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};

use crate::error::storage;
use crate::lookup::LookupSql;
use crate::rate_limit::{RateLimitMode, RateLimiter};
use crate::usage::UsageRecorder;

/// Key of the PostgreSQL advisory lock that serializes [`ApiKeyClient::create_tables`]
/// (the ASCII bytes of "apikeys\0" as a big-endian integer).
const MIGRATION_LOCK_ID: i64 = 0x6170_696b_6579_7300;
/// Name of the MySQL lock that serializes [`ApiKeyClient::create_tables`].
const MIGRATION_LOCK_NAME: &str = "apikeys_migrations";

/// Another process held the migration lock for longer than we wait.
#[derive(Debug, thiserror::Error)]
#[error("timed out waiting for the apikeys migration lock held by another process")]
struct MigrationLockTimeout;

/// A source of the current time. The default is [`Utc::now`]; tests inject their own.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The client a backend holds: issues, checks and manages API keys in one database.
///
/// Cheap to clone (all clones share one connection pool, hasher and rate limiter). Build it
/// with [`ApiKeyClient::builder`].
///
/// Besides the errors each method lists, every call that reaches the database fails with
/// [`Error::Unavailable`] when the database cannot be reached, after at most the builder's
/// connect timeout plus acquire timeout (5 s each by default), or when a statement runs past
/// the statement timeout (5 s); the client reconnects by itself once the database is back.
///
/// The client is a composition of parts, each with its own connection handle: the key
/// lookup (format, HMAC, one indexed read), the rate limiter (database clock, one conditional
/// upsert per check) and the usage recorder (immediate or batched). Call
/// [`shutdown`](Self::shutdown) before the process exits when usage is batched.
#[derive(Clone)]
pub struct ApiKeyClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The pool reads go through.
    pub(crate) db: DatabaseConnection,
    /// The pool writes go through: the same pool on PostgreSQL and MySQL; on a SQLite file,
    /// one connection of its own, so writers queue in the pool instead of sleeping in
    /// SQLite's busy handler.
    pub(crate) writer: DatabaseConnection,
    pub(crate) hasher: KeyHasher,
    pub(crate) format: KeyFormat,
    pub(crate) default_lifetime: Option<Duration>,
    pub(crate) clock: Clock,
    pub(crate) limiter: RateLimiter,
    /// The key lookup's SQL, rendered once.
    pub(crate) lookup: LookupSql,
    pub(crate) usage: UsageRecorder,
}

impl fmt::Debug for ApiKeyClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyClient")
            .field("backend", &self.inner.db.get_database_backend())
            .field("format", &self.inner.format)
            .field("hasher", &self.inner.hasher)
            .field("default_lifetime", &self.inner.default_lifetime)
            .field("rate_limit_mode", &self.inner.limiter.mode())
            .field("batched_usage", &self.inner.usage.is_batched())
            .finish_non_exhaustive()
    }
}

impl ApiKeyClient {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The underlying SeaORM connection (shared pool), for the host application's own queries.
    #[must_use]
    pub fn connection(&self) -> &DatabaseConnection {
        &self.inner.db
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
    /// # Errors
    /// [`Error::Storage`] if a migration fails or the lock cannot be taken.
    pub async fn create_tables(&self) -> Result<()> {
        let txn = self.begin_write().await?;
        let backend = txn.get_database_backend();
        match backend {
            DbBackend::Postgres => {
                txn.execute_unprepared(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"
                ))
                .await
                .map_err(storage)?;
            }
            DbBackend::MySql => {
                // MySQL commits DDL implicitly, so the transaction only pins one connection;
                // the named lock belongs to that session until released (or disconnected).
                let sql = format!("SELECT GET_LOCK('{MIGRATION_LOCK_NAME}', 60) AS got");
                let row = txn
                    .query_one_raw(Statement::from_string(backend, sql))
                    .await
                    .map_err(storage)?;
                let got = row.and_then(|r| r.try_get::<Option<i64>>("", "got").ok()).flatten();
                if got != Some(1) {
                    return Err(Error::storage(MigrationLockTimeout));
                }
            }
            // BEGIN IMMEDIATE already holds the database's write lock.
            _ => {}
        }
        let result = migration::Migrator::up(&txn, None).await.map_err(storage);
        if backend == DbBackend::MySql {
            let sql = format!("SELECT RELEASE_LOCK('{MIGRATION_LOCK_NAME}')");
            txn.execute_unprepared(&sql).await.map_err(storage)?;
        }
        result?;
        txn.commit().await.map_err(storage)
    }

    /// The current time from the client's clock, truncated to what every database stores.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        crate::convert::to_micros((self.inner.clock)())
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// The connection writes go through (see [`Inner::writer`]).
    pub(crate) fn writer(&self) -> &DatabaseConnection {
        &self.inner.writer
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

    /// Graceful shutdown: stops the background usage flusher and writes the use counts held
    /// in memory (batched usage tracking). Call it before the process exits; dropping the
    /// last clone writes nothing (it only logs a warning with what was lost). The client
    /// stays usable afterwards, writing every later use at once. Returns the number of keys
    /// whose counts were written (0 without batching).
    ///
    /// # Errors
    /// [`Error::Unavailable`] or [`Error::Storage`]; the counts are then kept, and a later
    /// `shutdown` or [`flush_usage`](Self::flush_usage) tries again.
    pub async fn shutdown(&self) -> Result<usize> {
        self.inner.usage.shutdown().await
    }

    /// Writes the use counts that batched usage tracking
    /// ([`ClientBuilder::usage_flush_interval`]) holds in memory now, without stopping the
    /// background flusher. Returns the number of keys written (0 without batching).
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

/// Builds an [`ApiKeyClient`]: a database (URL or existing connection) and a signing secret are
/// required; everything else has a default.
#[must_use = "call .build().await to get a client"]
pub struct ClientBuilder {
    url: Option<String>,
    connection: Option<DatabaseConnection>,
    secret: Option<Result<SigningSecret>>,
    secret_version: Option<u32>,
    previous: Vec<Result<SigningSecret>>,
    prefix: String,
    environment: Option<String>,
    default_lifetime: Option<Duration>,
    max_connections: Option<u32>,
    connect_timeout: Duration,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    clock: Option<Clock>,
    rate_limit_mode: RateLimitMode,
    log_statements: bool,
    usage_flush_interval: Option<Duration>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            url: None,
            connection: None,
            secret: None,
            secret_version: None,
            previous: Vec::new(),
            prefix: "sk".to_owned(),
            environment: None,
            default_lifetime: None,
            max_connections: None,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            clock: None,
            rate_limit_mode: RateLimitMode::default(),
            log_statements: false,
            usage_flush_interval: None,
        }
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url.as_ref().map(|_| "[set]"))
            .field("connection", &self.connection.is_some())
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("previous_secrets", &self.previous.len())
            .field("prefix", &self.prefix)
            .field("environment", &self.environment)
            .field("default_lifetime", &self.default_lifetime)
            .field("rate_limit_mode", &self.rate_limit_mode)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Connect to this database URL: `sqlite://apikeys.db` (created if missing),
    /// `sqlite::memory:`, `postgres://user:pass@host/db` or `mysql://user:pass@host/db`.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Use an existing SeaORM connection (the host application's pool) instead of a URL.
    pub fn connection(mut self, db: DatabaseConnection) -> Self {
        self.connection = Some(db);
        self
    }

    /// The signing secret keys are hashed with (required, at least 32 bytes; version 1 unless
    /// [`signing_secret_version`](Self::signing_secret_version) says otherwise). Pass an owned
    /// `String` or `Vec<u8>` so no copy is left behind; it is zeroed when the client drops.
    pub fn signing_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(SigningSecret::new(secret));
        self
    }

    /// The version number of the current signing secret (default 1).
    pub fn signing_secret_version(mut self, version: u32) -> Self {
        self.secret_version = Some(version);
        self
    }

    /// An older signing secret, for a rotation (README, "Secret rotation"): keys hashed
    /// under it still verify, and move to the current secret on their next successful check
    /// that tracks usage. While it is configured, every key this client creates or moves
    /// also keeps its hash under the first previous secret, so replicas still running with
    /// that secret alone find every key, and rolling this deploy back loses none.
    pub fn previous_signing_secret(mut self, version: u32, secret: impl Into<Vec<u8>>) -> Self {
        self.previous.push(SigningSecret::new(secret).map(|s| s.with_version(version)));
        self
    }

    /// The key prefix (default `sk`): 1 to 16 lowercase letters or digits, starting with a
    /// letter.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The environment segment (for instance `live` or `test`); none by default.
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = Some(environment.into());
        self
    }

    /// The lifetime of keys created without an explicit expiry (default: they never expire).
    pub fn default_key_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = Some(lifetime);
        self
    }

    /// The pool size when connecting by URL (default: sea-orm's for PostgreSQL and MySQL, 8
    /// for a SQLite file, 1 for in-memory SQLite).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// How long to wait for a new database connection (default 5 s) before failing with
    /// [`Error::Unavailable`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a call waits for a pooled connection before failing with
    /// [`Error::Unavailable`] (default 5 s). Bounds how long calls hang while the database is
    /// down.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The longest a statement may run on the server (default 5 s) before the call fails
    /// with [`Error::Unavailable`]: PostgreSQL `statement_timeout`, MariaDB
    /// `max_statement_time` (MySQL: `max_execution_time`, which covers reads only), SQLite's
    /// busy timeout (how long a write waits for another process's write lock). Applies when
    /// connecting by URL; a connection passed with [`connection`](Self::connection) keeps its
    /// own settings.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether every SQL statement is logged (`tracing`, target `sqlx::query`, level DEBUG)
    /// when connecting by URL; off by default. Statements carry key hashes, never a plaintext
    /// key or the signing secret.
    pub fn log_statements(mut self, on: bool) -> Self {
        self.log_statements = on;
        self
    }

    /// Where the client reads the time (default [`Utc::now`]): expiry, `created_at`,
    /// `last_used_at`, and [`RateLimitMode::Local`] windows. Shared rate-limit windows never
    /// use it: they come from the database's clock, so that replicas whose clocks differ
    /// still count in the same window.
    pub fn clock(mut self, clock: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// How per-key rate limits are counted (default [`RateLimitMode::Shared`]).
    pub fn rate_limit_mode(mut self, mode: RateLimitMode) -> Self {
        self.rate_limit_mode = mode;
        self
    }

    /// Batched usage tracking: successful checks add to counts held in memory, and every
    /// `interval` one statement per 500 keys writes them (`use_count`, `last_used_at`),
    /// instead of one `UPDATE` per check. A busy key then costs one write per interval.
    ///
    /// The price: stored counts lag by up to `interval` (the record a check returns includes
    /// its own use), and counts not yet written are lost if the process dies. A failed flush
    /// keeps its counts for the next one; call [`ApiKeyClient::shutdown`] on graceful
    /// shutdown (dropping the client writes nothing). Off by default (every check writes at
    /// once). Needs a tokio runtime when [`build`](Self::build) runs.
    pub fn usage_flush_interval(mut self, interval: Duration) -> Self {
        self.usage_flush_interval = Some(interval);
        self
    }

    /// Validates the configuration and connects.
    ///
    /// # Errors
    /// [`Error::Configuration`] if the signing secret is missing or shorter than 32 bytes, a
    /// secret version is used twice or does not fit the database's column (at most
    /// 2147483647), the prefix or environment is invalid, the URL does not parse or names a
    /// database other than `sqlite:`, `postgres:`/`postgresql:` or `mysql:`, neither (or
    /// both) of a URL and a connection is given, or a duration is zero;
    /// [`Error::Unavailable`] or [`Error::Storage`] if connecting fails. No error contains
    /// the URL's password.
    pub async fn build(self) -> Result<ApiKeyClient> {
        let secret = self.secret.ok_or_else(|| {
            Error::configuration("a signing secret is required (ClientBuilder::signing_secret)")
        })??;
        let secret = match self.secret_version {
            Some(v) => secret.with_version(v),
            None => secret,
        };
        let mut hasher = KeyHasher::new(secret)?;
        for previous in self.previous {
            hasher = hasher.with_previous(previous?)?;
        }
        if hasher.versions().any(|v| i32::try_from(v).is_err()) {
            return Err(Error::configuration("signing secret versions must be at most 2147483647"));
        }
        let format = KeyFormat::new(&self.prefix, self.environment.as_deref())
            .map_err(|e| Error::configuration(e.to_string()))?;
        if self.default_lifetime.is_some_and(|d| d.is_zero()) {
            return Err(Error::configuration("the default key lifetime must be positive"));
        }
        if self.usage_flush_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::configuration("the usage flush interval must be positive"));
        }
        if self.usage_flush_interval.is_some() && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::configuration(
                "batched usage tracking needs a tokio runtime to flush from",
            ));
        }
        if self.statement_timeout.is_zero() {
            return Err(Error::configuration("the statement timeout must be positive"));
        }
        let (db, writer) = match (self.url, self.connection) {
            (Some(url), None) => {
                let settings = Settings {
                    max_connections: self.max_connections,
                    connect_timeout: self.connect_timeout,
                    acquire_timeout: self.acquire_timeout,
                    statement_timeout: self.statement_timeout,
                    log_statements: self.log_statements,
                };
                crate::connect::open(&url, &settings).await?
            }
            (None, Some(db)) => (db.clone(), db),
            _ => {
                return Err(Error::configuration(
                    "give exactly one of a database url and a connection",
                ));
            }
        };
        let clock: Clock = self.clock.unwrap_or_else(|| Arc::new(Utc::now));
        let limiter = RateLimiter::new(writer.clone(), self.rate_limit_mode, Arc::clone(&clock));
        let usage = match self.usage_flush_interval {
            Some(interval) => UsageRecorder::batched(writer.clone(), interval),
            None => UsageRecorder::immediate(writer.clone()),
        };
        let lookup = LookupSql::new(db.get_database_backend(), hasher.versions().count())?;
        let inner = Arc::new(Inner {
            lookup,
            db,
            writer,
            hasher,
            format,
            default_lifetime: self.default_lifetime,
            clock,
            limiter,
            usage,
        });
        Ok(ApiKeyClient { inner })
    }
}

/// How to open the pools when connecting by URL.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) max_connections: Option<u32>,
    pub(crate) connect_timeout: Duration,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) log_statements: bool,
}
