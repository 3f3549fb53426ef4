//! Shared mode: one conditional upsert per check, the window from the database's clock.

use std::sync::LazyLock;

use apikeys_core::{KeyId, RateLimit, Result};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

use super::window::{Count, MY_NOW_MS, PG_NOW_MS, counting_error, host_millis, left_ms};
use crate::breaker::Db;
use crate::error::retry_conflicts;

/// A MySQL counting statement that refused reports `REFUSED_TAG + milliseconds left`.
const REFUSED_TAG: u64 = 1 << 40;

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

/// The conditional upsert: one statement, the window from the database's clock.
pub(super) async fn count(db: &Db, key: KeyId, limit: RateLimit) -> Result<Count> {
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
