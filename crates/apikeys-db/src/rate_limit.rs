//! Per-key rate limits: exact shared counters in the database, or in-process `governor`.
//!
//! # One clock for every replica
//! In shared mode the window a request falls in is decided by the database's clock, inside
//! the counting statement (PostgreSQL `clock_timestamp()`, MySQL/MariaDB `NOW(3)`). Replicas
//! whose own clocks differ by seconds or minutes therefore count in the same row. SQLite is a
//! file on one host, so its clock is that host's system clock (read by the process, never the
//! client's injected [`Clock`]), which every process opening the file shares.
//!
//! # Check and count in one statement
//! The counting statement is a conditional upsert: it creates the window's row at 1, or adds
//! one only while the count is below the key's *current* limit. A refused request changes
//! nothing, a limit raised mid-window admits up to the new limit at once, and a lowered one
//! refuses at once.
//!
//! # One budget per lineage
//! A rolled key keeps working for its grace period beside the key it was rolled to; the two
//! (and any later successor) share one budget. A key's requests count in the windows of its
//! lineage's newest key: its own for a key never rolled; for a rolled key, the key stored
//! in its `lineage_head_id` (read with one more indexed read per check, in the shared and
//! leased modes). A roll copies the old key's window counts to the new key, in the roll's
//! transaction, so the lineage's window goes on from where it was; the delete of a lineage's
//! newest key hands its counts and its place to the newest key left. So whoever holds a
//! leaked key after a roll shares the new key's budget, never gets one of its own. Bounds:
//! checks of the old key in flight during the roll (and, with the verified-key cache, those
//! a replica makes before its cache learns of the roll, within the cache's staleness bound)
//! count in the old key's own window. [`RateLimitMode::Local`] does no I/O, so there a
//! rolled key counts in the limiter of the key it was rolled to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::{ApiKey, Error, KeyId, RateLimit, Result};
use chrono::{DateTime, Utc};
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, Value,
};

use crate::breaker::Db;
use crate::client::Clock;
use crate::entity::api_key;
use crate::error::{is_missing_parent, retry_conflicts, storage};
use crate::lease::Leases;
use crate::lock::lock;

/// How per-key rate limits are counted.
///
/// | mode | exact across replicas | cost per check | algorithm |
/// |---|---|---|---|
/// | `Shared` | yes, whatever the replicas' clocks say | one atomic upsert | fixed window, database clock |
/// | `Leased` | yes (never more than the limit; see below) | one upsert per block of units | fixed window, database clock |
/// | `Local` | no: each process counts alone | no I/O | GCRA (`governor`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RateLimitMode {
    /// Counters in the database (`rate_limit_windows`): one conditional upsert per check,
    /// exact however many tasks, processes and replicas share the database and however far
    /// apart their clocks are. Windows are fixed, aligned to the Unix epoch (UTC) by the
    /// database's clock.
    #[default]
    Shared,
    /// `Shared`, with units reserved ahead in blocks: one conditional upsert reserves a
    /// block of the window's units, which this process then admits from memory. Across all
    /// processes no window ever admits more than the limit. The block adapts to the key's
    /// rate: a key checked about once a second still costs one write per check and leaves
    /// nothing unspent; a hot key costs one write per block (at most `limit / 16` units,
    /// and at most 16 384).
    ///
    /// The trade-off: one process may refuse while another still holds units, so a window
    /// can end with up to the sum of the blocks held by all processes unspent (each at most
    /// `limit / 16`). Units held for the current window are given back by
    /// [`ApiKeyClient::shutdown`](crate::ApiKeyClient::shutdown); those of a process that
    /// dies are lost with it, until its window ends.
    Leased,
    /// Counters in this process (`governor`, GCRA, on the client's clock): no database
    /// write, but N replicas admit up to N times the limit, and a burst of `requests` is
    /// followed by an even refill of one request every `window / requests`.
    Local,
}

/// Every this many checks, a limiter sweeps: ended window rows in the database (in the
/// background) and entries of its in-process maps that no longer change any answer.
const SWEEP_EVERY: u64 = 4_096;

/// How long after its end a window row is kept. A counting statement reads the database
/// clock before it takes the row's lock, so it may write to a window that ended a moment ago;
/// deleting only rows that ended this long ago (far more than any statement may run: see
/// `ClientBuilder::statement_timeout`) means a purge never deletes a row that a statement in
/// flight can still count in, which would restart that window at 1.
pub(crate) const PURGE_GRACE: Duration = Duration::from_secs(300);

/// A MySQL counting statement that refused reports `REFUSED_TAG + milliseconds left`.
const REFUSED_TAG: u64 = 1 << 40;

/// The database's clock in Unix milliseconds, as PostgreSQL computes it.
pub(crate) const PG_NOW_MS: &str = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint";
/// The same for MySQL/MariaDB (`NOW(3)` is fixed for the whole statement).
pub(crate) const MY_NOW_MS: &str = "FLOOR(UNIX_TIMESTAMP(NOW(3)) * 1000)";

/// MySQL's counting statement. No RETURNING and no data-modifying CTE: LAST_INSERT_ID(expr)
/// hands the outcome back in the OK packet of the same statement: 1 for a new window, the new
/// count, or [`REFUSED_TAG`] + the milliseconds left in the window. Rendered once.
static MY_COUNT: LazyLock<String> = LazyLock::new(|| {
    let now = MY_NOW_MS;
    format!(
        "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
         VALUES (?, {now} - MOD({now}, ?), LAST_INSERT_ID(1), {now} - MOD({now}, ?) + ?) \
         ON DUPLICATE KEY UPDATE count = IF(count < ?, LAST_INSERT_ID(count + 1), \
           IF(LAST_INSERT_ID({REFUSED_TAG} + expires_at - {now}) > 0, count, count))"
    )
});

/// PostgreSQL's counting statement. `clock_timestamp()` is read once, in the first CTE; the
/// data-modifying CTE runs whether or not the outer query reads it, and returns no row when
/// it refused. Rendered once.
static PG_COUNT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (SELECT {PG_NOW_MS} AS now_ms), \
         w AS (SELECT now_ms, now_ms - mod(now_ms, $2) AS start FROM t), \
         up AS (INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
           SELECT $1, start, 1, start + $2 FROM w \
           ON CONFLICT (key_id, window_start) DO UPDATE SET count = rate_limit_windows.count + 1 \
           WHERE rate_limit_windows.count < $3 RETURNING 1 AS admitted) \
         SELECT w.start + $2 - w.now_ms AS left_ms, (SELECT count(*) FROM up) AS admitted FROM w"
    )
});

/// What the counting statement decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    /// Counted in the window.
    Admitted,
    /// Not counted: the window is full; this long until it ends (database clock).
    Refused(Duration),
}

/// A key known to be over its limit: refused without a round trip until `until` (this
/// process's monotonic clock, never after the window's end), as long as its limit is still
/// `limit`; such a refusal's `retry_after` runs to `retry_at` (never before the end).
#[derive(Debug, Clone, Copy)]
struct Refusal {
    limit: RateLimit,
    until: Instant,
    retry_at: Instant,
}

/// Counts requests against per-key limits. Owns its connection handle and clock; the client
/// composes it.
pub(crate) struct RateLimiter {
    db: Db,
    mode: RateLimitMode,
    /// The client's clock: used by local mode only (shared mode uses the database's).
    clock: Clock,
    /// Shared mode: keys whose window is full. An entry only repeats what the database
    /// answered, until the moment that window ends; a different limit (the key was updated)
    /// bypasses it.
    over_limit: Mutex<HashMap<KeyId, Refusal>>,
    checks: AtomicU64,
    /// Local mode: one GCRA limiter per key, rebuilt when the key's limit changes, with the
    /// time (Unix ms) it was last used.
    local: Mutex<HashMap<KeyId, LocalEntry>>,
    /// Leased mode: the units this process holds.
    leases: Leases,
    /// Where background purges run: the runtime the client was built on.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("mode", &self.mode).finish_non_exhaustive()
    }
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
    pub(crate) fn new(
        db: Db,
        mode: RateLimitMode,
        clock: Clock,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            runtime,
            db,
            mode,
            clock,
            over_limit: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            local: Mutex::new(HashMap::new()),
            leases: Leases::default(),
        }
    }

    pub(crate) fn mode(&self) -> RateLimitMode {
        self.mode
    }

    /// Counts a check; true once every [`SWEEP_EVERY`] checks.
    fn sweep_due(&self) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1
    }

    /// Forgets what this process knows about `key` (its limit or its existence changed).
    pub(crate) fn forget(&self, key: KeyId) {
        lock(&self.over_limit).remove(&key);
        lock(&self.local).remove(&key);
        self.leases.forget(key);
    }

    /// Gives the units leased for current windows back (leased mode); returns how many.
    pub(crate) async fn release(&self) -> Result<u64> {
        self.leases.release(&self.db).await
    }

    /// Counts one request of `key` against `limit`, in the windows of its lineage (see the
    /// module docs: a rolled key shares its successors' budget).
    ///
    /// # Errors
    /// [`Error::Quota`] when the window is full (nothing is counted then);
    /// [`Error::InvalidKey`] when the key was deleted meanwhile; [`Error::Unavailable`] or
    /// [`Error::Storage`] when the database fails.
    pub(crate) async fn check(&self, key: &ApiKey, limit: RateLimit) -> Result<()> {
        match self.mode {
            RateLimitMode::Shared | RateLimitMode::Leased => {
                let head = self.lineage_head(key).await?;
                match self.check_shared(head, limit).await {
                    // The lineage's newest key was deleted after it was read (its keys were
                    // handed to another in the same transaction): count this one alone.
                    Err(Error::InvalidKey) if head != key.id => {
                        self.check_shared(key.id, limit).await
                    }
                    other => other,
                }
            }
            RateLimitMode::Local => self.check_local(key.rolled_to.unwrap_or(key.id), limit),
        }
    }

    /// The key whose windows `key`'s requests count in: its own id, or for a rolled key the
    /// newest key of its lineage (one indexed read; a key rolled by a version before the
    /// lineage was stored counts in the key it was rolled to).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when the key was deleted meanwhile; [`Error::Unavailable`] or
    /// [`Error::Storage`] when the database fails.
    async fn lineage_head(&self, key: &ApiKey) -> Result<KeyId> {
        let Some(next) = key.rolled_to else {
            return Ok(key.id);
        };
        let head: Option<Option<uuid::Uuid>> = api_key::Entity::find_by_id(key.id.as_uuid())
            .select_only()
            .column(api_key::Column::LineageHeadId)
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(storage)?;
        match head {
            None => Err(Error::InvalidKey),
            Some(head) => Ok(head.map_or(next, KeyId::from_uuid)),
        }
    }

    async fn check_shared(&self, key: KeyId, limit: RateLimit) -> Result<()> {
        let asked = Instant::now();
        let leased = self.mode == RateLimitMode::Leased;
        if leased && self.leases.take(key, limit, asked) {
            return Ok(());
        }
        if let Some(r) = lock(&self.over_limit).get(&key).copied()
            && r.limit == limit
            && r.until > asked
        {
            let retry_after = r.retry_at.saturating_duration_since(asked);
            return Err(Error::Quota { retry_after, limit });
        }
        let counted = if leased {
            self.leases.check(&self.db, key, limit).await
        } else {
            count(&self.db, key, limit).await
        };
        if self.sweep_due() {
            self.sweep_in_background(asked);
        }
        match counted? {
            Count::Admitted => Ok(()),
            Count::Refused(left) => {
                // The database read its clock between `asked` and now.
                let until = window_ends(asked, left);
                let refusal = Refusal { limit, until, retry_at: Instant::now() + left };
                lock(&self.over_limit).insert(key, refusal);
                Err(Error::Quota { retry_after: left, limit })
            }
        }
    }

    /// Drops refusals whose window has ended and deletes ended window rows off the caller's
    /// path, in a task on the client's runtime.
    fn sweep_in_background(&self, now: Instant) {
        lock(&self.over_limit).retain(|_, r| r.until > now);
        self.leases.sweep(now);
        let db = self.db.clone();
        let purge = async move {
            if let Err(e) = purge(&db).await {
                tracing::warn!(error = %e, "rate-limit window purge failed");
            }
        };
        self.runtime.spawn(purge);
    }

    fn check_local(&self, key: KeyId, limit: RateLimit) -> Result<()> {
        let now = (self.clock)();
        let limiter = {
            let mut map = lock(&self.local);
            let now_ms = now.timestamp_millis();
            if self.sweep_due() {
                // A limiter left alone for a whole window is back to a full burst, the same
                // state a new one starts in, so dropping it changes no answer.
                map.retain(|_, e| e.last_used_ms + e.limit.window.seconds() * 1_000 > now_ms);
            }
            match map.get_mut(&key) {
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
                        ClientClock(Arc::clone(&self.clock)),
                    ));
                    map.insert(
                        key,
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

    /// Deletes the window rows that ended at least [`PURGE_GRACE`] ago by the database's
    /// clock. Returns the number of rows deleted.
    pub(crate) async fn purge(&self) -> Result<u64> {
        purge(&self.db).await.map_err(storage)
    }
}

/// Milliseconds since the Unix epoch on this host's system clock: the clock of a SQLite file.
pub(crate) fn host_millis() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When, on this process's monotonic clock, a window whose time left a counting statement
/// reported as `left` has surely ended, for a statement issued at `asked`.
///
/// The clocks read (`clock_timestamp()`, `NOW(3)`, the host's) are floored to whole
/// milliseconds, so `left` may exceed the true time left by up to a millisecond: right for
/// a `retry_after` (a caller waiting that long finds the window over), but a memo of the
/// refusal or a lease of the window's units must end no later than the window. The clock was
/// read after `asked`, so `asked + left - 1 ms` is never after the window's end.
pub(crate) fn window_ends(asked: Instant, left: Duration) -> Instant {
    asked + left.saturating_sub(Duration::from_millis(1))
}

pub(crate) fn left_ms(ms: i64) -> Duration {
    // A window always has time left when it is counted in; at least 1 ms for the caller.
    Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1))
}

/// The conditional upsert: one statement, the window from the database's clock.
async fn count(db: &Db, key: KeyId, limit: RateLimit) -> Result<Count> {
    let backend = db.get_database_backend();
    let len = limit.window.seconds() * 1_000;
    let max = i64::from(limit.requests.get());
    let id = Value::from(key.as_uuid());
    let result = match backend {
        DbBackend::Postgres => {
            let values = [id, len.into(), max.into()];
            let stmt = Statement::from_sql_and_values(backend, PG_COUNT.as_str(), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let row = row.ok_or_else(|| DbErr::RecordNotFound("rate limit row".into()))?;
                let admitted: i64 = row.try_get("", "admitted")?;
                let left: i64 = row.try_get("", "left_ms")?;
                Ok(if admitted > 0 { Count::Admitted } else { Count::Refused(left_ms(left)) })
            })
        }
        DbBackend::MySql => {
            let values = [id, len.into(), len.into(), len.into(), max.into()];
            let stmt = Statement::from_sql_and_values(backend, MY_COUNT.as_str(), values);
            retry_conflicts(|| db.execute_raw(stmt.clone())).await.map(|res| {
                match res.last_insert_id() {
                    v if v >= REFUSED_TAG => {
                        Count::Refused(left_ms(i64::try_from(v - REFUSED_TAG).unwrap_or(0)))
                    }
                    _ => Count::Admitted,
                }
            })
        }
        _ => {
            let now = host_millis();
            let start = now - now.rem_euclid(len);
            let sql = "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
                 VALUES (?, ?, 1, ?) ON CONFLICT (key_id, window_start) \
                 DO UPDATE SET count = count + 1 WHERE count < ? RETURNING count";
            let values = [id, start.into(), (start + len).into(), max.into()];
            let stmt = Statement::from_sql_and_values(backend, sql, values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.map(|row| match row {
                Some(_) => Count::Admitted,
                None => Count::Refused(left_ms(start + len - host_millis())),
            })
        }
    };
    result.map_err(counting_error)
}

/// Adds the counts of `from`'s rate-limit windows to `to`'s (creating `to`'s rows as
/// needed), on `conn`: a roll hands the old key's windows to the new one, and the delete of a
/// lineage's newest key hands them to the newest key left. `from`'s rows stay (a check that
/// read the key before the change still counts in them).
pub(crate) async fn merge_windows<C: ConnectionTrait>(
    conn: &C,
    from: KeyId,
    to: KeyId,
) -> Result<()> {
    let backend = conn.get_database_backend();
    let (to, from) = (Value::from(to.as_uuid()), Value::from(from.as_uuid()));
    let sql = match backend {
        DbBackend::Postgres => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT $1, window_start, count, expires_at FROM rate_limit_windows \
             WHERE key_id = $2 ON CONFLICT (key_id, window_start) \
             DO UPDATE SET count = rate_limit_windows.count + excluded.count"
        }
        DbBackend::MySql => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT ?, w.window_start, w.count, w.expires_at FROM rate_limit_windows w \
             WHERE w.key_id = ? \
             ON DUPLICATE KEY UPDATE count = rate_limit_windows.count + VALUES(count)"
        }
        _ => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT ?, window_start, count, expires_at FROM rate_limit_windows \
             WHERE key_id = ? ON CONFLICT (key_id, window_start) \
             DO UPDATE SET count = rate_limit_windows.count + excluded.count"
        }
    };
    conn.execute_raw(Statement::from_sql_and_values(backend, sql, [to, from]))
        .await
        .map_err(storage)?;
    Ok(())
}

/// Before `id` is deleted: if it is the newest key of a lineage whose rolled keys are still
/// around, the newest of those becomes the lineage's newest key, and gets `id`'s rate-limit
/// window counts (so the keys left keep sharing one budget, from where it was).
pub(crate) async fn hand_over_lineage<C: ConnectionTrait>(conn: &C, id: KeyId) -> Result<()> {
    use api_key::Column as Col;
    let newest: Option<uuid::Uuid> = api_key::Entity::find()
        .select_only()
        .column(Col::Id)
        .filter(Col::LineageHeadId.eq(id.as_uuid()))
        .filter(Col::Id.ne(id.as_uuid()))
        .order_by_desc(Col::Id)
        .limit(1)
        .into_tuple()
        .one(conn)
        .await
        .map_err(storage)?;
    let Some(newest) = newest else {
        return Ok(());
    };
    merge_windows(conn, id, KeyId::from_uuid(newest)).await?;
    api_key::Entity::update_many()
        .col_expr(Col::LineageHeadId, Expr::value(newest))
        .filter(Col::LineageHeadId.eq(id.as_uuid()))
        .exec(conn)
        .await
        .map_err(storage)?;
    Ok(())
}

/// A counting statement's failure: [`Error::InvalidKey`] when the counter's row could not
/// reference its key (the key was deleted after it was read), else as [`storage`].
pub(crate) fn counting_error(e: DbErr) -> Error {
    if is_missing_parent(&e) { Error::InvalidKey } else { storage(e) }
}

/// Deletes window rows that ended [`PURGE_GRACE`] ago or earlier, by the database's clock.
async fn purge(db: &Db) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let grace = millis(PURGE_GRACE);
    let stmt = match backend {
        DbBackend::Postgres => Statement::from_sql_and_values(
            backend,
            format!("DELETE FROM rate_limit_windows WHERE expires_at <= {PG_NOW_MS} - $1"),
            [grace.into()],
        ),
        DbBackend::MySql => Statement::from_sql_and_values(
            backend,
            format!("DELETE FROM rate_limit_windows WHERE expires_at <= {MY_NOW_MS} - ?"),
            [grace.into()],
        ),
        _ => Statement::from_sql_and_values(
            backend,
            "DELETE FROM rate_limit_windows WHERE expires_at <= ?",
            [(host_millis() - grace).into()],
        ),
    };
    Ok(db.execute_raw(stmt).await?.rows_affected())
}
