//! The SQL statements of leased shared limits: a block of a window's units reserved in one
//! conditional upsert (many keys' blocks in one statement, or on MySQL one transaction), and
//! what a lease did not spend given back. See [`lease`](super::lease) for the design.

/// MySQL packs the outcome of a reservation in `LAST_INSERT_ID`: the milliseconds left in
/// the window in bits 0-26, the units granted in bits 27-46, the window's number (modulo
/// 2^15, to give units back to the right window) in bits 47-61, and bit 62 for a refusal.
const MY_GRANT_SHIFT: u32 = 27;
const MY_INDEX_SHIFT: u32 = 47;
pub(super) const MY_INDEX_MOD: i64 = 1 << 15;
const MY_REFUSED: u64 = 1 << 62;

use std::collections::HashMap;
use std::sync::LazyLock;

use apikeys_core::{KeyId, RateLimit, Result};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

use super::store::{Ask, Grant, WindowRef, in_table};
use super::window::{MY_NOW_MS, PG_NOW_MS, counting_error, host_millis, left_ms};
use crate::breaker::Db;
use crate::error::{retry_conflicts, storage};

/// Reserves for each key of `asks`: one statement for them all (see [`reserve_many`]; on
/// MySQL a batch of one key is one statement alone, its batch taking five round trips). A
/// batch that fails (a key deleted meanwhile fails the whole statement, as does a database
/// failure) is done again key by key, so each key gets an answer of its own.
pub(super) async fn reserve_batch(db: &Db, asks: &[Ask]) -> Vec<Result<Grant>> {
    // The main limits' windows and the named limits' are two tables: a statement each.
    let mut grants: Vec<Option<Result<Grant>>> = asks.iter().map(|_| None).collect();
    for named in [false, true] {
        let picked: Vec<usize> = (0..asks.len()).filter(|&i| asks[i].0.named == named).collect();
        if picked.is_empty() {
            continue;
        }
        let wanted: Vec<_> =
            picked.iter().map(|&i| (asks[i].0.key, asks[i].1, asks[i].2)).collect();
        for (i, grant) in picked.into_iter().zip(reserve_table(db, &wanted, named).await) {
            grants[i] = Some(grant);
        }
    }
    grants.into_iter().map(|g| g.unwrap_or(Ok(Grant::Refused(left_ms(1))))).collect()
}

/// [`reserve_batch`] in one table's windows.
async fn reserve_table(
    db: &Db,
    wanted: &[(KeyId, RateLimit, u32)],
    named: bool,
) -> Vec<Result<Grant>> {
    if let [(key, limit, block)] = wanted[..]
        && db.get_database_backend() == DbBackend::MySql
    {
        return vec![reserve(db, key, limit, block, named).await];
    }
    match reserve_many(db, wanted, named).await {
        Ok(grants) => grants.into_iter().map(Ok).collect(),
        Err(e) => {
            tracing::debug!(keys = wanted.len(), error = %counting_error(e), "a batch of rate-limit reservations failed; reserving key by key");
            let mut grants = Vec::with_capacity(wanted.len());
            for &(key, limit, block) in wanted {
                grants.push(reserve(db, key, limit, block, named).await);
            }
            grants
        }
    }
}

/// PostgreSQL's reservation: `$1` key, `$2` window length, `$3` limit, `$4` block.
static PG_RESERVE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (SELECT {PG_NOW_MS} AS now_ms), \
         w AS (SELECT now_ms, now_ms - mod(now_ms, $2) AS start FROM t), \
         up AS (INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
           SELECT $1, start, $4, start + $2 FROM w \
           ON CONFLICT (key_id, window_start) DO UPDATE SET count = rate_limit_windows.count + $4 \
           WHERE rate_limit_windows.count < $3 RETURNING count) \
         SELECT w.start AS start, w.start + $2 - w.now_ms AS left_ms, \
           (SELECT count FROM up) AS new_count FROM w"
    )
});

/// MySQL's reservation: key, then the window length (five times), the limit, the block, the
/// limit (four times), the window length (three times): see [`MY_GRANT_SHIFT`].
static MY_RESERVE: LazyLock<String> = LazyLock::new(|| {
    let now = MY_NOW_MS;
    let start = format!("({now} - MOD({now}, ?))");
    let left = format!("({start} + ? - {now})");
    let index = format!("MOD(FLOOR({now} / ?), {MY_INDEX_MOD})");
    let pack = |grant: &str| {
        format!(
            "LAST_INSERT_ID({index} * {} + ({grant}) * {} + {left})",
            1_u64 << MY_INDEX_SHIFT,
            1_u64 << MY_GRANT_SHIFT
        )
    };
    let unpack = |packed: String| {
        format!("FLOOR({packed} / {}) MOD {}", 1_u64 << MY_GRANT_SHIFT, 1_u64 << 20)
    };
    format!(
        "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
         VALUES (?, {start}, {new}, {start} + ?) \
         ON DUPLICATE KEY UPDATE count = IF(count < ?, count + {grant}, \
           IF(LAST_INSERT_ID({MY_REFUSED} + expires_at - {now}) > 0, count, count))",
        new = unpack(pack("LEAST(?, ?)")),
        grant = unpack(pack("LEAST(?, ? - count)")),
    )
});

/// What a reservation that added a whole `block` to a window got (PostgreSQL and SQLite):
/// the part of it that fits under the limit, given the window's count after it (`None`: the
/// window was full, nothing added), the window's start and its time left in ms.
fn whole_block_grant(
    new: Option<i64>,
    block: u32,
    limit: RateLimit,
    start: i64,
    left: i64,
) -> Grant {
    let over = |new: i64| (new - i64::from(limit.requests.get())).max(0);
    let granted =
        new.map_or(0, |new| u32::try_from((i64::from(block) - over(new)).max(0)).unwrap_or(0));
    if granted > 0 {
        Grant::Units { granted, added: block, left: left_ms(left), window: WindowRef::Start(start) }
    } else {
        Grant::Refused(left_ms(left))
    }
}

/// Reserves up to `block` units of `key`'s current window, by the database's clock.
pub(super) async fn reserve(
    db: &Db,
    key: KeyId,
    limit: RateLimit,
    block: u32,
    named: bool,
) -> Result<Grant> {
    let backend = db.get_database_backend();
    let len = limit.window.seconds() * 1_000;
    let max = i64::from(limit.requests.get());
    let b = i64::from(block);
    let id = Value::from(key.as_uuid());
    let result = match backend {
        DbBackend::Postgres => {
            let values = [id, len.into(), max.into(), b.into()];
            let stmt =
                Statement::from_sql_and_values(backend, in_table(&PG_RESERVE, named), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let row = row.ok_or_else(|| DbErr::RecordNotFound("rate limit row".into()))?;
                let start: i64 = row.try_get("", "start")?;
                let left: i64 = row.try_get("", "left_ms")?;
                let new: Option<i64> = row.try_get("", "new_count")?;
                Ok(whole_block_grant(new, block, limit, start, left))
            })
        }
        DbBackend::MySql => {
            let mut values: Vec<Value> = vec![id];
            // VALUES: start (len), new = pack(index (len), LEAST(block, limit), left (len, len)),
            // expires_at = start (len) + len.
            values.extend([len.into(), len.into(), b.into(), max.into(), len.into(), len.into()]);
            values.extend([len.into(), len.into()]);
            // UPDATE: count < limit, grant = pack(index (len), LEAST(block, limit - count),
            // left (len, len)).
            values.extend([max.into(), len.into(), b.into(), max.into(), len.into(), len.into()]);
            let stmt =
                Statement::from_sql_and_values(backend, in_table(&MY_RESERVE, named), values);
            retry_conflicts(|| db.execute_raw(stmt.clone())).await.map(|res| {
                let v = res.last_insert_id();
                let left =
                    |v: u64| left_ms(i64::try_from(v & ((1 << MY_GRANT_SHIFT) - 1)).unwrap_or(0));
                if v >= MY_REFUSED {
                    return Grant::Refused(left(v - MY_REFUSED));
                }
                let granted = u32::try_from((v >> MY_GRANT_SHIFT) & ((1 << 20) - 1)).unwrap_or(0);
                let index = i64::try_from(v >> MY_INDEX_SHIFT).unwrap_or(0);
                match granted {
                    0 => Grant::Refused(left(v)),
                    // MySQL adds the grant itself.
                    granted => Grant::Units {
                        granted,
                        added: granted,
                        left: left(v),
                        window: WindowRef::Index(index),
                    },
                }
            })
        }
        _ => {
            let now = host_millis();
            let start = now - now.rem_euclid(len);
            let sql = "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (key_id, window_start) \
                 DO UPDATE SET count = count + ? WHERE count < ? RETURNING count";
            let values = [id, start.into(), b.into(), (start + len).into(), b.into(), max.into()];
            let stmt = Statement::from_sql_and_values(backend, in_table(sql, named), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let left = start + len - host_millis();
                let new = match row {
                    Some(row) => Some(row.try_get::<i64>("", "count")?),
                    None => None,
                };
                Ok(whole_block_grant(new, block, limit, start, left))
            })
        }
    };
    result.map_err(counting_error)
}

/// Reserves up to `block` units of each key's current window: on PostgreSQL and SQLite in
/// one statement, the same conditional upsert as [`reserve`] row by row, so each key gets
/// what it would have got alone; on MySQL in one transaction (see [`reserve_many_mysql`]).
/// The rows are written in key order, so two processes' batches never wait for each other's
/// row locks in a cycle. Keys must be distinct. The grants come back in the order of `asks`.
async fn reserve_many(
    db: &Db,
    asks: &[(KeyId, RateLimit, u32)],
    named: bool,
) -> std::result::Result<Vec<Grant>, DbErr> {
    let backend = db.get_database_backend();
    let mut order: Vec<usize> = (0..asks.len()).collect();
    order.sort_by_key(|&i| asks[i].0.as_uuid());
    let mut values: Vec<Value> = Vec::with_capacity(asks.len() * 5);
    let mut rows = Vec::with_capacity(asks.len());
    // The rows' new counts by key, and (PostgreSQL) each window's start and time left.
    let mut found: HashMap<uuid::Uuid, (Option<i64>, i64, i64)> = HashMap::new();
    if backend == DbBackend::MySql {
        let batch = || db.bounded(reserve_many_mysql(db, asks, &order, named), |e| e);
        return retry_conflicts(batch).await;
    }
    if backend == DbBackend::Postgres {
        for (n, &i) in order.iter().enumerate() {
            let (key, limit, block) = asks[i];
            let p = n * 4;
            rows.push(format!(
                "(${}::uuid, ${}::bigint, ${}::bigint, ${}::bigint)",
                p + 1,
                p + 2,
                p + 3,
                p + 4
            ));
            values.extend([
                Value::from(key.as_uuid()),
                (limit.window.seconds() * 1_000).into(),
                i64::from(limit.requests.get()).into(),
                i64::from(block).into(),
            ]);
        }
        let sql = format!(
            "WITH input(key_id, len, lim, block) AS (VALUES {}), \
             t AS (SELECT {PG_NOW_MS} AS now_ms), \
             w AS (SELECT input.*, t.now_ms, t.now_ms - mod(t.now_ms, input.len) AS start \
               FROM input, t), \
             up AS (INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
               SELECT key_id, start, block, start + len FROM w ORDER BY key_id \
               ON CONFLICT (key_id, window_start) DO UPDATE \
               SET count = rate_limit_windows.count + excluded.count \
               WHERE rate_limit_windows.count < \
                 (SELECT w.lim FROM w WHERE w.key_id = rate_limit_windows.key_id) \
               RETURNING key_id, count) \
             SELECT w.key_id AS key_id, w.start AS start, w.start + w.len - w.now_ms AS left_ms, \
               up.count AS new_count FROM w LEFT JOIN up ON up.key_id = w.key_id",
            rows.join(", ")
        );
        let stmt = Statement::from_sql_and_values(backend, in_table(&sql, named), values);
        for row in retry_conflicts(|| db.query_all_raw(stmt.clone())).await? {
            let key: uuid::Uuid = row.try_get("", "key_id")?;
            let new: Option<i64> = row.try_get("", "new_count")?;
            found.insert(key, (new, row.try_get("", "start")?, row.try_get("", "left_ms")?));
        }
    } else {
        let now = host_millis();
        for &i in &order {
            let (key, limit, block) = asks[i];
            let len = limit.window.seconds() * 1_000;
            let start = now - now.rem_euclid(len);
            rows.push("(?, ?, ?, ?, ?)".to_owned());
            values.extend([
                Value::from(key.as_uuid()),
                start.into(),
                i64::from(block).into(),
                (start + len).into(),
                i64::from(limit.requests.get()).into(),
            ]);
            found.insert(key.as_uuid(), (None, start, start + len));
        }
        let sql = format!(
            "WITH input(key_id, start, block, expires_at, lim) AS (VALUES {}) \
             INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT key_id, start, block, expires_at FROM input WHERE true ORDER BY key_id \
             ON CONFLICT (key_id, window_start) DO UPDATE SET count = count + excluded.count \
             WHERE count < (SELECT lim FROM input WHERE input.key_id = rate_limit_windows.key_id) \
             RETURNING key_id, count",
            rows.join(", ")
        );
        let stmt = Statement::from_sql_and_values(backend, in_table(&sql, named), values);
        let returned = retry_conflicts(|| db.query_all_raw(stmt.clone())).await?;
        let now = host_millis();
        for f in found.values_mut() {
            // The window's end, now its time left.
            f.2 -= now;
        }
        for row in returned {
            let key: uuid::Uuid = row.try_get("", "key_id")?;
            let count: i64 = row.try_get("", "count")?;
            if let Some(f) = found.get_mut(&key) {
                f.0 = Some(count);
            }
        }
    }
    Ok(asks
        .iter()
        .map(|&(key, limit, block)| {
            let (new, start, left) = found.get(&key.as_uuid()).copied().unwrap_or((None, 0, 1));
            whole_block_grant(new, block, limit, start, left)
        })
        .collect())
}

/// MySQL's batch: the database's clock read once, the keys' window rows created at 0 where
/// missing, then in one transaction the rows locked (`FOR UPDATE`, in key order), each key
/// granted `min(block, limit - count)` of what is left, and the grants added in one upsert.
/// The row locks make it exact against every other writer of those rows, as the single
/// statement of [`reserve`] is.
async fn reserve_many_mysql(
    db: &Db,
    asks: &[(KeyId, RateLimit, u32)],
    order: &[usize],
    named: bool,
) -> std::result::Result<Vec<Grant>, DbErr> {
    let backend = DbBackend::MySql;
    let sql = format!("SELECT CAST({MY_NOW_MS} AS SIGNED) AS now_ms");
    let now: i64 = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the database clock".into()))?
        .try_get("", "now_ms")?;
    let window = |limit: RateLimit| {
        let len = limit.window.seconds() * 1_000;
        let start = now - now.rem_euclid(len);
        (start, start + len, len)
    };
    // The rows first, at 0 where missing, in a statement of their own (key order): the
    // transaction then locks rows that exist. Locking a missing row takes a gap lock, which
    // two processes can both hold and then both wait on to insert: a deadlock.
    let mut rows = Vec::with_capacity(order.len());
    let mut values: Vec<Value> = Vec::with_capacity(order.len() * 3);
    for &i in order {
        let (key, limit, _) = asks[i];
        let (start, end, _) = window(limit);
        rows.push("(?, ?, 0, ?)");
        values.extend([Value::from(key.as_uuid()), start.into(), end.into()]);
    }
    let sql = format!(
        "INSERT IGNORE INTO rate_limit_windows (key_id, window_start, count, expires_at) \
         VALUES {}",
        rows.join(", ")
    );
    db.execute_raw(Statement::from_sql_and_values(backend, in_table(&sql, named), values)).await?;
    let txn = db.begin_with_options(sea_orm::TransactionOptions::default()).await?;
    let mut pairs = Vec::with_capacity(order.len());
    let mut values: Vec<Value> = Vec::with_capacity(order.len() * 2);
    for &i in order {
        let (key, limit, _) = asks[i];
        pairs.push("(?, ?)");
        values.extend([Value::from(key.as_uuid()), window(limit).0.into()]);
    }
    let sql = format!(
        "SELECT key_id, count FROM rate_limit_windows WHERE (key_id, window_start) IN ({}) \
         ORDER BY key_id FOR UPDATE",
        pairs.join(", ")
    );
    let mut counts: HashMap<uuid::Uuid, i64> = HashMap::new();
    let select = Statement::from_sql_and_values(backend, in_table(&sql, named), values);
    for row in txn.query_all_raw(select).await? {
        counts.insert(row.try_get("", "key_id")?, row.try_get("", "count")?);
    }
    let grants: Vec<Grant> = asks
        .iter()
        .map(|&(key, limit, block)| {
            let (start, end, len) = window(limit);
            let count = counts.get(&key.as_uuid()).copied().unwrap_or(0);
            let room = (i64::from(limit.requests.get()) - count).max(0);
            let granted = u32::try_from(room.min(i64::from(block))).unwrap_or(0);
            let left = left_ms(end - now);
            // Named as MySQL's single statement names windows (see `MY_GRANT_SHIFT`).
            let window = WindowRef::Index((start / len).rem_euclid(MY_INDEX_MOD));
            if granted > 0 {
                Grant::Units { granted, added: granted, left, window }
            } else {
                Grant::Refused(left)
            }
        })
        .collect();
    let mut rows = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    for &i in order {
        if let Grant::Units { granted, .. } = grants[i] {
            let (key, limit, _) = asks[i];
            let (start, end, _) = window(limit);
            rows.push("(?, ?, ?, ?)");
            values.extend([
                Value::from(key.as_uuid()),
                start.into(),
                i64::from(granted).into(),
                end.into(),
            ]);
        }
    }
    if !rows.is_empty() {
        let sql = format!(
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             VALUES {} ON DUPLICATE KEY UPDATE count = count + VALUES(count)",
            rows.join(", ")
        );
        txn.execute_raw(Statement::from_sql_and_values(backend, in_table(&sql, named), values))
            .await?;
    }
    txn.commit().await?;
    Ok(grants)
}

/// Takes `units` that this process added to `key`'s window (and did not admit) off the
/// window's count. Only what the lease itself added is subtracted, so the count never falls
/// below what was admitted; no limit is involved (the key's may have changed since). A
/// window that has ended (or whose row is gone) is left alone.
pub(super) async fn give_back(
    db: &Db,
    key: KeyId,
    length: apikeys_core::Window,
    window: WindowRef,
    units: u32,
    named: bool,
) -> Result<()> {
    if units == 0 {
        return Ok(());
    }
    let backend = db.get_database_backend();
    let len = length.seconds() * 1_000;
    let n = i64::from(units);
    let id = Value::from(key.as_uuid());
    let stmt = match (backend, window) {
        (DbBackend::Postgres, WindowRef::Start(start)) => Statement::from_sql_and_values(
            backend,
            in_table(
                "UPDATE rate_limit_windows SET count = count - $3 \
                 WHERE key_id = $1 AND window_start = $2 AND count >= $3",
                named,
            ),
            [id, start.into(), n.into()],
        ),
        (DbBackend::MySql, WindowRef::Index(index)) => Statement::from_sql_and_values(
            backend,
            in_table(
                &format!(
                    "UPDATE rate_limit_windows SET count = count - ? \
                     WHERE key_id = ? AND expires_at > {MY_NOW_MS} \
                     AND expires_at - window_start = ? \
                     AND MOD(FLOOR(window_start / ?), {MY_INDEX_MOD}) = ? AND count >= ?"
                ),
                named,
            ),
            [n.into(), id, len.into(), len.into(), index.into(), n.into()],
        ),
        (_, WindowRef::Start(start)) => Statement::from_sql_and_values(
            backend,
            in_table(
                "UPDATE rate_limit_windows SET count = count - ? \
                 WHERE key_id = ? AND window_start = ? AND count >= ?",
                named,
            ),
            [n.into(), id, start.into(), n.into()],
        ),
        _ => return Ok(()),
    };
    db.execute_raw(stmt).await.map_err(storage)?;
    Ok(())
}
