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
use sea_orm::sea_query::{Expr, ExprTrait, Func, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryTrait,
};

use crate::client::{ApiKeyClient, Clock};
use crate::entity::rate_limit_window;
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

/// Every this many checks, a process sweeps: ended window rows in the database (in the
/// background) and entries of the in-process maps that no longer change any answer.
const SWEEP_EVERY: u64 = 4_096;

pub(crate) struct RateLimiter {
    mode: RateLimitMode,
    /// Shared mode: keys known to be over their limit in a window, to reject them without a
    /// database round-trip. Only ever rejects what the database already rejected.
    over_limit: Mutex<HashMap<KeyId, (i64, RateLimit)>>,
    checks: AtomicU64,
    /// Local mode: one GCRA limiter per key, rebuilt when the key's limit changes, with the
    /// time (Unix ms) it was last used.
    local: Mutex<HashMap<KeyId, LocalEntry>>,
}

type LocalLimiter = Gcra<NotKeyed, InMemoryState, ClientClock, NoOpMiddleware<Duration>>;

struct LocalEntry {
    limit: RateLimit,
    gcra: Arc<LocalLimiter>,
    last_used_ms: i64,
}

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
    pub(crate) fn new(mode: RateLimitMode) -> Self {
        Self {
            mode,
            over_limit: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            local: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn mode(&self) -> RateLimitMode {
        self.mode
    }

    /// Counts a check; true once every [`SWEEP_EVERY`] checks.
    fn sweep_due(&self) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1
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
        let (count, new_window) = increment(self.db(), id, start, expires).await?;
        if new_window {
            self.spawn_cleanup(Some((id, start)), now);
        }
        let sweep = limiter.sweep_due();
        if sweep {
            self.spawn_cleanup(None, now);
        }
        let admitted = limit.admits(count);
        if (sweep || !admitted)
            && let Ok(mut cache) = limiter.over_limit.lock()
        {
            if sweep {
                // Entries of ended windows can never match again.
                let now_ms = now.timestamp_millis();
                cache.retain(|_, (s, l)| *s + l.window.seconds() * 1_000 > now_ms);
            }
            if !admitted {
                cache.insert(id, (start, limit));
            }
        }
        if admitted {
            return Ok(());
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
            let now_ms = now.timestamp_millis();
            if self.inner.limiter.sweep_due() {
                // A limiter left alone for a whole window is back to a full burst, the same
                // state a new one starts in, so dropping it changes no answer.
                map.retain(|_, e| e.last_used_ms + e.limit.window.seconds() * 1_000 > now_ms);
            }
            match map.get_mut(&id) {
                Some(entry) if entry.limit == limit => {
                    entry.last_used_ms = now_ms;
                    Arc::clone(&entry.gcra)
                }
                _ => {
                    let quota = Quota::with_period(limit.window.duration() / limit.requests.get())
                        .map(|q| q.allow_burst(limit.requests))
                        .unwrap_or_else(|| Quota::per_second(limit.requests));
                    let gcra = Arc::new(Gcra::direct_with_clock(
                        quota,
                        ClientClock(Arc::clone(&self.inner.clock)),
                    ));
                    map.insert(
                        id,
                        LocalEntry { limit, gcra: Arc::clone(&gcra), last_used_ms: now_ms },
                    );
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
        handle.spawn(async move {
            let result = match key {
                Some((id, start)) => rate_limit_window::Entity::delete_many()
                    .filter(rate_limit_window::Column::KeyId.eq(id.as_uuid()))
                    .filter(rate_limit_window::Column::WindowStart.lt(start))
                    .exec(&db)
                    .await
                    .map(|_| ()),
                None => delete_ended_windows(&db, now).await.map(|_| ()),
            };
            if let Err(e) = result {
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
        delete_ended_windows(self.db(), self.now()).await.map_err(storage)
    }
}

async fn delete_ended_windows(db: &DatabaseConnection, now: DateTime<Utc>) -> Result<u64, DbErr> {
    let res = rate_limit_window::Entity::delete_many()
        .filter(rate_limit_window::Column::ExpiresAt.lte(now.timestamp_millis()))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Atomically adds one to the counter of (`id`, `start`), creating it at 1; returns the new
/// count and whether this call created the row. One statement on every backend.
async fn increment(
    db: &DatabaseConnection,
    id: KeyId,
    start: i64,
    expires: i64,
) -> Result<(u64, bool)> {
    use rate_limit_window::{ActiveModel, Column, Entity};
    let row = ActiveModel {
        key_id: Set(id.as_uuid()),
        window_start: Set(start),
        count: Set(1),
        expires_at: Set(expires),
    };
    let bump = Expr::col((Entity, Column::Count)).add(1);
    let backend = db.get_database_backend();
    let count = if backend == DbBackend::MySql {
        // No RETURNING on MySQL: LAST_INSERT_ID(expr) hands the new count back in the OK
        // packet of the same statement. One row affected = inserted, two = updated.
        let on_dup = OnConflict::new()
            .value(Column::Count, Func::cust("LAST_INSERT_ID").arg(bump))
            .to_owned();
        let stmt = Entity::insert(row).on_conflict(on_dup).build(backend);
        let res = db.execute_raw(stmt).await.map_err(storage)?;
        if res.rows_affected() == 1 { 1 } else { res.last_insert_id() }
    } else {
        let on_conflict = OnConflict::columns([Column::KeyId, Column::WindowStart])
            .value(Column::Count, bump)
            .to_owned();
        let model = Entity::insert(row)
            .on_conflict(on_conflict)
            .exec_with_returning(db)
            .await
            .map_err(storage)?;
        u64::try_from(model.count).unwrap_or(0)
    };
    Ok((count, count == 1))
}
