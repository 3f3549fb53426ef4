//! Shared mode: one conditional upsert per check, the window from the database's clock.

use std::sync::LazyLock;

use apikeys_core::{KeyId, RateLimit, Result};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

use super::lease_sql::MY_INDEX_MOD;
use super::store::{WindowRef, in_table};
use super::window::{Count, MY_NOW_MS, PG_NOW_MS, counting_error, host_millis, left_ms};
use crate::breaker::Db;
use crate::error::retry_conflicts;

/// A MySQL counting statement that refused reports `REFUSED_TAG + milliseconds left`.
const REFUSED_TAG: u64 = 1 << 40;

/// MySQL's counting statement. No RETURNING and no data-modifying CTE: LAST_INSERT_ID(expr)
/// hands the outcome back in the OK packet of the same statement: the window's number
/// (modulo [`MY_INDEX_MOD`], as the give-back names it) plus one when it counted, or
/// [`REFUSED_TAG`] + the milliseconds left in the window. Parameters: key, window length
/// (three times), cost, window length (twice), cost, limit, cost, window length. Rendered
/// once.
static MY_COUNT: LazyLock<String> = LazyLock::new(|| {
    let now = MY_NOW_MS;
    format!(
        "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
         VALUES (?, {now} - MOD({now}, ?), \
           LAST_INSERT_ID(MOD(FLOOR({now} / ?), {MY_INDEX_MOD}) + 1) * 0 + ?, \
           {now} - MOD({now}, ?) + ?) \
         ON DUPLICATE KEY UPDATE count = IF(count + ? <= ?, \
           count + ? + LAST_INSERT_ID(MOD(FLOOR(window_start / ?), {MY_INDEX_MOD}) + 1) * 0, \
           IF(LAST_INSERT_ID({REFUSED_TAG} + expires_at - {now}) > 0, count, count))"
    )
});

/// PostgreSQL's counting statement: `$1` key, `$2` window length, `$3` limit, `$4` cost.
/// `clock_timestamp()` is read once, in the first CTE; the data-modifying CTE runs whether
/// or not the outer query reads it, and returns no row when it refused. Rendered once.
static PG_COUNT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (SELECT {PG_NOW_MS} AS now_ms), \
         w AS (SELECT now_ms, now_ms - mod(now_ms, $2) AS start FROM t), \
         up AS (INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
           SELECT $1, start, $4, start + $2 FROM w \
           ON CONFLICT (key_id, window_start) DO UPDATE SET count = rate_limit_windows.count + $4 \
           WHERE rate_limit_windows.count + $4 <= $3 RETURNING 1 AS admitted) \
         SELECT w.start AS start, w.start + $2 - w.now_ms AS left_ms, \
           (SELECT count(*) FROM up) AS admitted FROM w"
    )
});

/// The conditional upsert: one statement, the window from the database's clock. Adds `cost`
/// units only if the window's count stays within the limit (the caller refuses a cost above
/// the limit before asking).
pub(super) async fn count(
    db: &Db,
    key: KeyId,
    limit: RateLimit,
    cost: u32,
    named: bool,
) -> Result<Count> {
    let backend = db.get_database_backend();
    let len = limit.window.seconds() * 1_000;
    let max = i64::from(limit.requests.get());
    let cost = i64::from(cost);
    let id = Value::from(key.as_uuid());
    let result = match backend {
        DbBackend::Postgres => {
            let values = [id, len.into(), max.into(), cost.into()];
            let stmt = Statement::from_sql_and_values(backend, in_table(&PG_COUNT, named), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let row = row.ok_or_else(|| DbErr::RecordNotFound("rate limit row".into()))?;
                let admitted: i64 = row.try_get("", "admitted")?;
                let left: i64 = row.try_get("", "left_ms")?;
                let start: i64 = row.try_get("", "start")?;
                Ok(if admitted > 0 {
                    Count::Admitted(WindowRef::Start(start))
                } else {
                    Count::Refused(left_ms(left))
                })
            })
        }
        DbBackend::MySql => {
            let mut values = vec![id, len.into(), len.into(), cost.into(), len.into()];
            values.extend([len.into(), cost.into(), max.into(), cost.into(), len.into()]);
            let stmt = Statement::from_sql_and_values(backend, in_table(&MY_COUNT, named), values);
            retry_conflicts(|| db.execute_raw(stmt.clone())).await.map(|res| {
                match res.last_insert_id() {
                    v if v >= REFUSED_TAG => {
                        Count::Refused(left_ms(i64::try_from(v - REFUSED_TAG).unwrap_or(0)))
                    }
                    v => Count::Admitted(WindowRef::Index(
                        i64::try_from(v).unwrap_or(0).saturating_sub(1),
                    )),
                }
            })
        }
        _ => {
            let now = host_millis();
            let start = now - now.rem_euclid(len);
            let sql = "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (key_id, window_start) \
                 DO UPDATE SET count = count + ? WHERE count + ? <= ? RETURNING count";
            let values =
                [id, start.into(), cost.into(), (start + len).into(), cost.into(), cost.into()];
            let mut values = values.to_vec();
            values.push(max.into());
            let stmt = Statement::from_sql_and_values(backend, in_table(sql, named), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.map(|row| match row {
                Some(_) => Count::Admitted(WindowRef::Start(start)),
                None => Count::Refused(left_ms(start + len - host_millis())),
            })
        }
    };
    result.map_err(counting_error)
}
