//! Per-key rate limits: exact shared counters in the database, or in-process `governor`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apikeys_core::{ApiKey, Error, KeyId, RateLimit, Result};
use chrono::{DateTime, Utc};
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};

use crate::client::{ApiKeyClient, Clock};
use crate::error::storage;

/// How per-key rate limits are counted.
///
/// | mode | exact across replicas | cost per check | algorithm |
/// |---|---|---|---|
/// | `Shared` | yes (PostgreSQL, MySQL, SQLite file) | one atomic upsert | fixed window |
/// | `Local` | no: each process counts alone | no I/O | GCRA (`governor`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RateLimitMode {
    /// Counters in the database (`rate_limit_windows`): one atomic increment per check, exact
    /// however many tasks, processes and replicas share the database. Windows are fixed and
    /// aligned to the epoch (UTC).
    #[default]
    Shared,
    /// Counters in this process (`governor`, GCRA): no database write, but N replicas admit up
    /// to N times the limit, and a burst of `requests` is followed by an even refill of one
    /// request every `window / requests`.
    Local,
}

/// Every this many shared checks, one process sweeps expired window rows in the background.
const SWEEP_EVERY: u64 = 4_096;

pub(crate) struct RateLimiter {
    mode: RateLimitMode,
    backend: DbBackend,
    /// Shared mode: keys known to be over their limit in a window, to reject them without a
    /// database round-trip. Only ever rejects what the database already rejected.
    over_limit: Mutex<HashMap<KeyId, (i64, RateLimit)>>,
    checks: AtomicU64,
    /// Local mode: one GCRA limiter per key, rebuilt when the key's limit changes.
    local: Mutex<HashMap<KeyId, (RateLimit, Arc<LocalLimiter>)>>,
}

type LocalLimiter = Gcra<NotKeyed, InMemoryState, ClientClock, NoOpMiddleware<Duration>>;

/// Adapts the client's clock to governor: time since the Unix epoch.
#[derive(Clone)]
struct ClientClock(Clock);

impl GovernorClock for ClientClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        since_epoch((self.0)())
    }
}

fn since_epoch(t: DateTime<Utc>) -> Duration {
    let nanos = t.timestamp_nanos_opt().unwrap_or(0);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

impl RateLimiter {
    pub(crate) fn new(mode: RateLimitMode, backend: DbBackend) -> Self {
        Self {
            mode,
            backend,
            over_limit: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            local: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn mode(&self) -> RateLimitMode {
        self.mode
    }
}

impl ApiKeyClient {
    /// Counts one request against `key`'s rate limit (if it has one) at `now`.
    pub(crate) async fn check_rate_limit(&self, key: &ApiKey, now: DateTime<Utc>) -> Result<()> {
        let Some(limit) = key.rate_limit else { return Ok(()) };
        match self.inner.limiter.mode {
            RateLimitMode::Shared => self.check_shared(key.id, limit, now).await,
            RateLimitMode::Local => self.check_local(key.id, limit, now),
        }
    }

    async fn check_shared(&self, id: KeyId, limit: RateLimit, now: DateTime<Utc>) -> Result<()> {
        let limiter = &self.inner.limiter;
        let start = limit.window.start_millis(now);
        if let Ok(cache) = limiter.over_limit.lock()
            && cache.get(&id) == Some(&(start, limit))
        {
            return Err(limit.exceeded(now));
        }
        let expires = start + limit.window.seconds() * 1_000;
        let (count, new_window) = increment(self.db(), limiter.backend, id, start, expires).await?;
        if new_window {
            self.spawn_cleanup(Some((id, start)), now);
        }
        if limiter.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.spawn_cleanup(None, now);
        }
        if limit.admits(count) {
            return Ok(());
        }
        if let Ok(mut cache) = limiter.over_limit.lock() {
            // Drop entries of windows that are over, so the map stays as small as the set of
            // keys currently over their limit.
            if cache.len() > 10_000 {
                cache.retain(|_, (s, l)| *s + l.window.seconds() * 1_000 > now.timestamp_millis());
            }
            cache.insert(id, (start, limit));
        }
        Err(limit.exceeded(now))
    }

    fn check_local(&self, id: KeyId, limit: RateLimit, now: DateTime<Utc>) -> Result<()> {
        let limiter = {
            let mut map = self
                .inner
                .limiter
                .local
                .lock()
                .map_err(|_| Error::configuration("local rate limiter state poisoned"))?;
            match map.get(&id) {
                Some((l, gcra)) if *l == limit => Arc::clone(gcra),
                _ => {
                    let quota = Quota::with_period(limit.window.duration() / limit.requests.get())
                        .map(|q| q.allow_burst(limit.requests))
                        .unwrap_or_else(|| Quota::per_second(limit.requests));
                    let gcra = Arc::new(Gcra::direct_with_clock(
                        quota,
                        ClientClock(Arc::clone(&self.inner.clock)),
                    ));
                    map.insert(id, (limit, Arc::clone(&gcra)));
                    gcra
                }
            }
        };
        match limiter.check() {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(since_epoch(now)).max(Duration::from_millis(1));
                Err(Error::Quota { retry_after: wait.min(limit.window.duration()), limit })
            }
        }
    }

    /// Deletes expired window rows in the background: of one key (older than `start`) when
    /// it opens a new window, or of every key in a periodic sweep. Never on the caller's path.
    fn spawn_cleanup(&self, key: Option<(KeyId, i64)>, now: DateTime<Utc>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let db = self.db().clone();
        let backend = self.inner.limiter.backend;
        let now_ms = now.timestamp_millis();
        handle.spawn(async move {
            let stmt = match key {
                Some((id, start)) => Statement::from_sql_and_values(
                    backend,
                    sql(
                        backend,
                        "DELETE FROM rate_limit_windows WHERE key_id = ? AND window_start < ?",
                    ),
                    [Value::from(id.as_uuid()), Value::from(start)],
                ),
                None => Statement::from_sql_and_values(
                    backend,
                    sql(backend, "DELETE FROM rate_limit_windows WHERE expires_at <= ?"),
                    [Value::from(now_ms)],
                ),
            };
            if let Err(e) = db.execute_raw(stmt).await {
                tracing::warn!(error = %e, "rate-limit window cleanup failed");
            }
        });
    }

    /// Deletes every rate-limit window row that has ended. The client already does this in
    /// the background; call it from a maintenance job if you want a guaranteed bound.
    /// Returns the number of rows deleted.
    ///
    /// # Errors
    /// [`Error::Storage`] if the database fails.
    pub async fn purge_rate_limit_windows(&self) -> Result<u64> {
        let backend = self.inner.limiter.backend;
        let stmt = Statement::from_sql_and_values(
            backend,
            sql(backend, "DELETE FROM rate_limit_windows WHERE expires_at <= ?"),
            [Value::from(self.now().timestamp_millis())],
        );
        Ok(self.db().execute_raw(stmt).await.map_err(storage)?.rows_affected())
    }
}

/// Rewrites `?` placeholders as `$1, $2, …` for PostgreSQL.
fn sql(backend: DbBackend, template: &str) -> String {
    if backend != DbBackend::Postgres {
        return template.to_owned();
    }
    let mut out = String::with_capacity(template.len() + 8);
    let mut n = 0;
    for c in template.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Atomically adds one to the counter of (`id`, `start`), creating it at 1; returns the new
/// count and whether this call created the row. One statement on every backend.
async fn increment(
    db: &DatabaseConnection,
    backend: DbBackend,
    id: KeyId,
    start: i64,
    expires: i64,
) -> Result<(u64, bool)> {
    let values = [Value::from(id.as_uuid()), Value::from(start), Value::from(expires)];
    let count = match backend {
        DbBackend::MySql => {
            // No RETURNING on MySQL: LAST_INSERT_ID(expr) hands the new count back in the OK
            // packet of the same statement. One row affected = inserted, two = updated.
            let stmt = Statement::from_sql_and_values(
                backend,
                "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
                 VALUES (?, ?, 1, ?) \
                 ON DUPLICATE KEY UPDATE count = LAST_INSERT_ID(count + 1)",
                values,
            );
            let res = db.execute_raw(stmt).await.map_err(storage)?;
            if res.rows_affected() == 1 { 1 } else { res.last_insert_id() }
        }
        _ => {
            let stmt = Statement::from_sql_and_values(
                backend,
                sql(
                    backend,
                    "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
                     VALUES (?, ?, 1, ?) \
                     ON CONFLICT (key_id, window_start) \
                     DO UPDATE SET count = rate_limit_windows.count + 1 \
                     RETURNING count",
                ),
                values,
            );
            let row = db.query_one_raw(stmt).await.map_err(storage)?;
            let count: i64 = match row {
                Some(r) => r.try_get("", "count").map_err(storage)?,
                None => return Err(Error::storage(sea_orm::DbErr::RecordNotInserted)),
            };
            u64::try_from(count).unwrap_or(0)
        }
    };
    Ok((count, count == 1))
}
