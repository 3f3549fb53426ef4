//! [`ClientBuilder`]: what a client is configured with, checked when it is built.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use apikeys_core::hazmat::KeyHasher;
use apikeys_core::{Error, KeyFormat, Result, SigningSecret};
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;

use crate::breaker::{Breaker, Db};
use crate::cache::{CacheState, CachedLookup, DEFAULT_RETENTION, KeyCache, spawn_poller};
use crate::client::{ApiKeyClient, Inner};
use crate::clock::Clock;
use crate::connect::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT, Settings,
};
use crate::credits::{CreditMode, CreditSpender};
use crate::feed::{ChangeFeed, ChangeListener};
use crate::id::IdMinter;
use crate::lookup::KeyLookup;
use crate::observe::CheckMetrics;
use crate::rate_limit::{RateLimitMode, RateLimiter, SqlWindows, Windows};
use crate::secret_version::SecretRegistry;
use crate::usage::UsageRecorder;

/// How often a client whose database is unreachable tries it again, by default.
const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Settings of the pool the client opens from a URL; `None` until set, so that
    /// [`connection`](ClientBuilder::connection) can refuse them.
    max_connections: Option<u32>,
    connect_timeout: Option<Duration>,
    acquire_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    log_statements: Option<bool>,
    clock: Option<Clock>,
    rate_limit_mode: RateLimitMode,
    credit_mode: CreditMode,
    usage_flush_interval: Option<Duration>,
    cache: Option<KeyCache>,
    reconnect_interval: Option<Duration>,
    /// Redis's URL (it may hold a password: never printed).
    #[cfg(feature = "redis")]
    redis: Option<String>,
    /// The URL of the Redis change notices go through (as `redis`: never printed).
    #[cfg(feature = "redis")]
    notices: Option<String>,
    #[cfg(feature = "redis")]
    notice_channel: Option<String>,
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
            connect_timeout: None,
            acquire_timeout: None,
            statement_timeout: None,
            log_statements: None,
            clock: None,
            rate_limit_mode: RateLimitMode::default(),
            credit_mode: CreditMode::default(),
            usage_flush_interval: None,
            cache: None,
            reconnect_interval: None,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "redis")]
            notices: None,
            #[cfg(feature = "redis")]
            notice_channel: None,
        }
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("ClientBuilder");
        f.field("url", &self.url.as_ref().map(|_| "[set]"))
            .field("connection", &self.connection.is_some())
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("previous_secrets", &self.previous.len())
            .field("prefix", &self.prefix)
            .field("environment", &self.environment)
            .field("default_lifetime", &self.default_lifetime)
            .field("rate_limit_mode", &self.rate_limit_mode)
            .field("cache", &self.cache);
        #[cfg(feature = "redis")]
        f.field("redis", &self.redis.as_ref().map(|_| "[set]"));
        #[cfg(feature = "redis")]
        f.field("invalidation_through_redis", &self.notices.as_ref().map(|_| "[set]"));
        #[cfg(feature = "redis")]
        f.field("change_notice_channel", &self.notice_channel);
        f.finish_non_exhaustive()
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
    ///
    /// The pool is the host's, configured by the host: combining this with a pool setting
    /// ([`max_connections`](Self::max_connections), the three timeouts,
    /// [`log_statements`](Self::log_statements)) is refused by [`build`](Self::build) rather
    /// than silently ignored. On a SQLite file, give the pool at least two connections and
    /// foreign keys on (`PRAGMA foreign_keys = ON`), as a URL would get.
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

    /// An older signing secret, for a rotation (the guide, "Operations", "Secret rotation"): keys
    /// hashed under it still verify, and move to the current secret on their next successful check
    /// that tracks usage. While it is configured, every key this client creates or moves also keeps
    /// its hash under the first previous secret, so replicas still running with that secret alone
    /// find every key, and rolling this deploy back loses none.
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
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long a call waits for a pooled connection before failing with
    /// [`Error::Unavailable`] (default 5 s). Bounds how long calls hang while the database is
    /// down.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = Some(timeout);
        self
    }

    /// The longest a statement may run on the server (default 5 s) before the call fails
    /// with [`Error::Unavailable`]: PostgreSQL `statement_timeout`, MariaDB
    /// `max_statement_time` (MySQL: `max_execution_time`, which covers reads only), SQLite's
    /// busy timeout (how long a write waits for another process's write lock). Applies when
    /// connecting by URL (refused with [`connection`](Self::connection), whose pool keeps the
    /// host's settings).
    ///
    /// On PostgreSQL and MySQL it also sets a deadline on the client's side: a statement
    /// still unanswered after the acquire timeout plus this plus a second, and a transaction
    /// of the client's own after the acquire timeout plus eight times this plus a second,
    /// fails with [`Error::Unavailable`]; the breaker opens if a connection of the client's
    /// own cannot reach the database either (see
    /// [`reconnect_interval`](Self::reconnect_interval)). A network that lost the answer (a
    /// partition, a black-holed connection) would otherwise make the call wait until TCP
    /// gives up, hours later (`tests/partition.rs`). Not bounded: [`create_tables`]
    /// (migrations), the host's own transactions ([`ApiKeyClient::begin`]), and a pool
    /// passed with [`connection`](Self::connection), which keeps the host's timeouts.
    ///
    /// [`create_tables`]: ApiKeyClient::create_tables
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Whether every SQL statement is logged (`tracing`, target `sqlx::query`, level DEBUG)
    /// when connecting by URL; off by default (refused with
    /// [`connection`](Self::connection)). Statements carry key hashes, never a plaintext
    /// key or the signing secret.
    pub fn log_statements(mut self, on: bool) -> Self {
        self.log_statements = Some(on);
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

    /// Counts shared rate limits ([`RateLimitMode::Shared`] and [`RateLimitMode::Leased`]) in
    /// Redis or Valkey at `url` (`redis://[user:password@]host:port/db`, one primary, Redis 5
    /// or later, `maxmemory-policy noeviction`) instead of the SQL database, which then
    /// serves no rate-limit write (a rolled key's check still reads its lineage there):
    ///
    /// ```no_run
    /// # async fn f() -> apikeys_core::Result<()> {
    /// let client = apikeys_db::ApiKeyClient::builder()
    ///     .database_url("postgres://app:secret@db/app")
    ///     .signing_secret(std::env::var("APIKEYS_SECRET").unwrap_or_default())
    ///     .rate_limit_mode(apikeys_db::RateLimitMode::Leased)
    ///     .redis("redis://cache:6379/0")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The same guarantees as SQL: windows by Redis's clock (`TIME`), never more than the limit
    /// across replicas, a rolled key sharing its successor's budget (give the client that rolls and
    /// deletes keys the same Redis: it hands windows on at once). It fails closed: a check that
    /// cannot reach Redis is refused with [`Error::Unavailable`], and a breaker then refuses at
    /// once until Redis answers again (probed every
    /// [`reconnect_interval`](Self::reconnect_interval)); each call gets the
    /// [`statement_timeout`](Self::statement_timeout). `build()` fails with
    /// [`Error::Configuration`] for a Redis that may evict keys, and with [`Error::Unavailable`]
    /// for one it cannot reach. What a Redis restart or failover can lose is in the guide ("Many
    /// replicas", "What Redis can lose"): a restart without persistence, or a failover to a replica
    /// behind its primary, loses the current windows' counts, so each key may admit up to one more
    /// limit in that window.
    ///
    /// [`Error::Configuration`]: apikeys_core::Error::Configuration
    /// [`Error::Unavailable`]: apikeys_core::Error::Unavailable
    #[cfg(feature = "redis")]
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// Tells other clients of each change through Redis or Valkey at `url` (a `PUBLISH` on
    /// `apikeys:changes` once the change's transaction has ended) and, with a
    /// [`cache`](Self::cache), polls the change feed as soon as another client's notice
    /// arrives, instead of at its next tick: a key revoked on one replica is refused on the
    /// others about a millisecond later rather than up to a poll interval later.
    ///
    /// ```no_run
    /// # async fn f() -> apikeys_core::Result<()> {
    /// let client = apikeys_db::ApiKeyClient::builder()
    ///     .database_url("postgres://app:secret@db/app")
    ///     .signing_secret(std::env::var("APIKEYS_SECRET").unwrap_or_default())
    ///     .cache(apikeys_db::KeyCache::new())
    ///     .invalidation_through_redis("redis://cache:6379/0")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The change feed stays the guarantee: a notice carries no change, only a reason to
    /// poll now, so a notice lost (Redis down or restarting, a publish that timed out) costs
    /// the head start and nothing else, and [`KeyCache::max_staleness`] holds with or without
    /// Redis. No check waits for Redis, and `build()` does not need it reachable. Polls that
    /// notices start are at least 10 ms apart per client. Changes made in a transaction the
    /// host owns (the `_on` variants) are not announced (the client cannot tell when the host
    /// commits); they arrive at the next poll. Independent of [`redis`](Self::redis): rate
    /// limits may stay in SQL. Deployments that share a Redis (staging and production) should
    /// each have a [`change_notice_channel`](Self::change_notice_channel) of their own: a
    /// notice from another deployment costs a needless poll.
    ///
    /// # Errors
    /// `build()` fails with [`Error::Configuration`] for a URL that is not a Redis URL or a
    /// password Redis refuses.
    ///
    /// [`Error::Configuration`]: apikeys_core::Error::Configuration
    #[cfg(feature = "redis")]
    pub fn invalidation_through_redis(mut self, url: impl Into<String>) -> Self {
        self.notices = Some(url.into());
        self
    }

    /// The Redis channel of [`invalidation_through_redis`](Self::invalidation_through_redis)
    /// (default `apikeys:changes`; Redis's channels span its numbered databases). Every
    /// client of one deployment must use the same.
    ///
    /// # Errors
    /// `build()` fails with [`Error::Configuration`] for an empty name, or one given without
    /// `invalidation_through_redis`.
    ///
    /// [`Error::Configuration`]: apikeys_core::Error::Configuration
    #[cfg(feature = "redis")]
    pub fn change_notice_channel(mut self, name: impl Into<String>) -> Self {
        self.notice_channel = Some(name.into());
        self
    }

    /// How usage credits are spent (default [`CreditMode::Exact`]: one conditional `UPDATE`
    /// per check). [`CreditMode::Leased`] reserves blocks of a balance ahead and spends
    /// them in memory, never more than the balance across replicas; call
    /// [`ApiKeyClient::shutdown`] before the process exits to give back what it holds.
    pub fn credit_mode(mut self, mode: CreditMode) -> Self {
        self.credit_mode = mode;
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
    /// once).
    ///
    /// Counts are written at least once: a flush whose answer a lost connection took (the
    /// server may have committed it) is written again, so a stored count can exceed the
    /// checks that passed, by what such flushes carried; it is never below them after a
    /// graceful shutdown. (The soak, `scripts/soak`, measures both.) The same holds for a
    /// check's own write without batching: the write may have committed when the check
    /// fails with [`Error::Unavailable`].
    pub fn usage_flush_interval(mut self, interval: Duration) -> Self {
        self.usage_flush_interval = Some(interval);
        self
    }

    /// How long calls fail at once after the database was found unreachable (default 1 s),
    /// and so how often a background probe tries it again.
    ///
    /// Once a statement fails to reach the database (a refused or lost connection, a server
    /// shutting down, or no pooled connection within the acquire timeout *and* no connection
    /// of the client's own, outside the pool, within the connect timeout), every call that
    /// needs the database fails at once with [`Error::Unavailable`] instead of waiting for the
    /// acquire timeout itself, while one probe (a connection of its own, pinged) runs every
    /// `interval`. The probe's first success ends it: the client recovers within one interval
    /// of the database coming back. A pool that is merely busy (every connection in use, say
    /// by a long host transaction on SQLite) fails only the calls that waited for it, and a
    /// statement that merely runs past its time limit does not start it. Checks the
    /// [verified-key cache](Self::cache) answers keep working meanwhile, within its bound.
    pub fn reconnect_interval(mut self, interval: Duration) -> Self {
        self.reconnect_interval = Some(interval);
        self
    }

    /// Turns on the verified-key cache (off by default): `verify_key` and `validate_key`
    /// answer keys they have seen from memory, and every change made through any client
    /// reaches this one within [`KeyCache::max_staleness`] (through this client: at once).
    /// See the guide, "The verified-key cache".
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use apikeys_db::{ApiKeyClient, KeyCache};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// let client = ApiKeyClient::builder()
    ///     .database_url("sqlite::memory:")
    ///     .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
    ///     .cache(KeyCache::new().max_keys(100_000).max_staleness(Duration::from_secs(1)))
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// What a check returned from the cache does not show: `use_count` and `last_used_at`
    /// of the returned record are those read when the key was cached (plus the check's own
    /// use). Usage tracking and rate limits work as without the cache; for checks that
    /// never wait for the database, batch usage
    /// ([`usage_flush_interval`](Self::usage_flush_interval)) and lease rate limits.
    pub fn cache(mut self, cache: KeyCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Validates the configuration and connects.
    ///
    /// The client runs its background work (batched usage flushes, purges of ended
    /// rate-limit windows) on the tokio runtime `build` is called on.
    ///
    /// # Errors
    /// [`Error::Configuration`] if the signing secret is missing or shorter than 32 bytes, a
    /// secret version is used twice or does not fit the database's column (at most
    /// 2147483647), the prefix or environment is invalid, the URL does not parse or names a
    /// database other than `sqlite:`, `postgres:`/`postgresql:` or `mysql:` (or one whose
    /// cargo feature is not enabled), neither (or both) of a URL and a connection is given,
    /// the [`KeyCache`] settings are out of range,
    /// a pool setting is combined with [`connection`](Self::connection), a duration is zero,
    /// or `build` runs outside a tokio runtime; [`Error::Unavailable`] or [`Error::Storage`]
    /// if connecting fails. No error contains the URL's password.
    pub async fn build(self) -> Result<ApiKeyClient> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::configuration("ApiKeyClient needs a tokio runtime: build it inside one")
        })?;
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
        let positive = [
            ("the default key lifetime", self.default_lifetime),
            ("the usage flush interval", self.usage_flush_interval),
            ("the statement timeout", self.statement_timeout),
            ("the connect timeout", self.connect_timeout),
            ("the acquire timeout", self.acquire_timeout),
            ("the reconnect interval", self.reconnect_interval),
        ];
        if let Some((what, _)) = positive.iter().find(|(_, d)| d.is_some_and(|d| d.is_zero())) {
            return Err(Error::configuration(format!("{what} must be positive")));
        }
        if let Some(cache) = &self.cache {
            cache.check()?;
        }
        if self.max_connections == Some(0) {
            return Err(Error::configuration("max_connections must be positive"));
        }
        #[cfg(feature = "redis")]
        match (&self.notices, &self.notice_channel) {
            (_, Some(name)) if name.is_empty() => {
                return Err(Error::configuration("change_notice_channel must not be empty"));
            }
            (None, Some(_)) => {
                return Err(Error::configuration(
                    "change_notice_channel needs invalidation_through_redis",
                ));
            }
            _ => {}
        }
        let acquire_timeout = self.acquire_timeout.unwrap_or(DEFAULT_ACQUIRE_TIMEOUT);
        let by_url = self.url.is_some();
        let (db, writer) = match (self.url, self.connection) {
            (Some(url), None) => {
                let settings = Settings {
                    max_connections: self.max_connections,
                    connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                    acquire_timeout,
                    statement_timeout: self.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
                    log_statements: self.log_statements.unwrap_or(false),
                };
                crate::connect::open(&url, &settings).await?
            }
            (None, Some(db)) => {
                let pool_settings = [
                    ("max_connections", self.max_connections.is_some()),
                    ("connect_timeout", self.connect_timeout.is_some()),
                    ("acquire_timeout", self.acquire_timeout.is_some()),
                    ("statement_timeout", self.statement_timeout.is_some()),
                    ("log_statements", self.log_statements.is_some()),
                ];
                if let Some((name, _)) = pool_settings.iter().find(|(_, set)| *set) {
                    return Err(Error::configuration(format!(
                        "{name} applies to a pool the client opens from a database url; \
                         configure it on the connection you pass instead"
                    )));
                }
                crate::connect::check_compiled_in(db.get_database_backend())?;
                (db.clone(), db)
            }
            _ => {
                return Err(Error::configuration(
                    "give exactly one of a database url and a connection",
                ));
            }
        };
        let breaker = Breaker::new(
            self.reconnect_interval.unwrap_or(DEFAULT_RECONNECT_INTERVAL),
            self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            runtime.clone(),
        );
        let (mut db, mut writer) = (Db::new(db, Arc::clone(&breaker)), Db::new(writer, breaker));
        if by_url {
            let statement = self.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT);
            db = db.with_deadlines(acquire_timeout, statement);
            writer = writer.with_deadlines(acquire_timeout, statement);
        }
        #[cfg(feature = "redis")]
        let redis = self.redis.as_deref();
        #[cfg(not(feature = "redis"))]
        let redis = None;
        let windows = windows(
            redis,
            self.rate_limit_mode,
            self.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
            self.reconnect_interval.unwrap_or(DEFAULT_RECONNECT_INTERVAL),
            &writer,
            &runtime,
        )
        .await?;
        let clock: Clock = self.clock.unwrap_or_else(|| Arc::new(Utc::now));
        let limiter = RateLimiter::new(
            writer.clone(),
            windows,
            self.rate_limit_mode,
            Arc::clone(&clock),
            runtime.clone(),
        );
        let usage = match self.usage_flush_interval {
            Some(interval) => UsageRecorder::batched(writer.clone(), interval, &runtime),
            None => UsageRecorder::immediate(writer.clone()),
        };
        let hasher = Arc::new(hasher);
        let secrets =
            Arc::new(SecretRegistry::new(writer.clone(), Arc::clone(&hasher), Arc::clone(&clock)));
        let lookup = KeyLookup::new(
            db.clone(),
            writer.clone(),
            Arc::clone(&hasher),
            format.clone(),
            Arc::clone(&secrets),
        )?;
        let feed_retention = self.cache.as_ref().map_or(DEFAULT_RETENTION, |c| c.feed_retention);
        let cache = match self.cache {
            Some(c) => Some(Arc::new(CacheState::new(c, acquire_timeout)?)),
            None => None,
        };
        if let Some(cache) = &cache {
            spawn_poller(&runtime, Arc::downgrade(cache), db.clone());
        }
        let listener = cache.clone().map(|c| c as Arc<dyn ChangeListener>);
        let feed = ChangeFeed::new(
            writer.clone(),
            Arc::clone(&clock),
            listener,
            feed_retention,
            runtime.clone(),
        );
        #[cfg(feature = "redis")]
        let feed = feed.with_notices(match &self.notices {
            Some(url) => Some(
                crate::cache::notices::Notices::start(
                    url,
                    self.notice_channel
                        .clone()
                        .unwrap_or_else(|| crate::cache::notices::CHANNEL.to_owned()),
                    self.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
                    self.reconnect_interval.unwrap_or(DEFAULT_RECONNECT_INTERVAL),
                    &runtime,
                    cache.as_ref().map(Arc::downgrade),
                )
                .await?,
            ),
            None => None,
        });
        let feed = Arc::new(feed);
        let inner = Arc::new(Inner {
            keys: CachedLookup::new(lookup, cache),
            credits: CreditSpender::new(writer.clone(), self.credit_mode, runtime.clone()),
            db,
            writer,
            hasher,
            format,
            default_lifetime: self.default_lifetime,
            clock,
            ids: IdMinter::default(),
            limiter,
            usage,
            feed,
            secrets,
            metrics: CheckMetrics::default(),
        });
        Ok(ApiKeyClient { inner, actor: None })
    }
}

/// Where shared rate-limit windows are counted: Redis at `redis` when given (each call
/// within `timeout`, probed every `interval` while out of reach), else the SQL database
/// (`writer`).
async fn windows(
    redis: Option<&str>,
    mode: RateLimitMode,
    timeout: Duration,
    interval: Duration,
    writer: &Db,
    runtime: &tokio::runtime::Handle,
) -> Result<Windows> {
    let Some(url) = redis else {
        return Ok(Windows::Sql(SqlWindows { db: writer.clone() }));
    };
    if mode == RateLimitMode::Local {
        return Err(Error::configuration(
            "redis counts shared rate limits; RateLimitMode::Local counts in the process",
        ));
    }
    #[cfg(feature = "redis")]
    {
        let redis =
            crate::rate_limit::RedisWindows::connect(url, timeout, interval, runtime.clone())
                .await?;
        Ok(Windows::Redis(redis))
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = (url, timeout, interval, runtime);
        Err(Error::configuration("redis needs the `redis` feature of apikeys-db"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn build_outside_a_runtime_is_a_configuration_error() {
        let build = ApiKeyClient::builder()
            .database_url("sqlite::memory:")
            .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
            .build();
        let mut build = std::pin::pin!(build);
        // The first poll refuses before any I/O, so no runtime is needed to see it.
        match build.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Err(Error::Configuration { reason })) => {
                assert!(reason.contains("tokio runtime"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
