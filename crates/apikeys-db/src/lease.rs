//! Leased shared rate limits ([`RateLimitMode::Leased`](crate::RateLimitMode::Leased)): the
//! shared window row of [`rate_limit`](crate::rate_limit), reserved a block of units at a
//! time and spent in memory.
//!
//! # One statement per block, never more than the limit
//! A reservation adds a block of `b` units to the window's count in one conditional upsert,
//! only while the count is below the limit, and grants `min(b, limit - count before)`. The
//! sum of what is granted in a window therefore never exceeds the limit, however many
//! processes reserve; the count itself may pass the limit by less than one block (PostgreSQL
//! and SQLite add `b` and work the grant out from the new count; MySQL adds the grant
//! itself), which every other reader treats as full. A check that does not reserve (the
//! non-leased shared mode) still adds one while below the limit, so the two modes can share
//! a key during a rolling deploy.
//!
//! # Block size
//! A key's next block doubles when its last one was spent within [`FAST`], and halves when
//! it took longer than [`SLOW`]: a key checked once a second reserves one unit per check
//! (one write each, nothing left over), a hot key one block per `FAST` or so. A block is at
//! most `limit / 16` (at least 1) and at most [`MAX_BLOCK`] units.
//!
//! # What may be left unspent
//! Units reserved and not spent when a window ends are gone. Units of the current window are
//! given back on [`ApiKeyClient::shutdown`](crate::ApiKeyClient::shutdown). Meanwhile, one
//! process can be refused while another still holds units: the window may end with at most
//! the sum of the blocks held across processes unspent.
//!
//! # Giving back
//! A lease remembers exactly what its reservations added to the window's count: the units
//! granted to it, and (PostgreSQL and SQLite) what a reservation added past the limit and
//! did not grant. A give-back subtracts the granted units it has not spent and that excess,
//! and nothing else: never an amount worked out from a limit, which may have changed since
//! the lease was taken (a limit raised from 160 to 1 600 between a lease and a shutdown, with
//! the count clamped to the old limit, let a window admit about 3 000). So the count never
//! falls below what was admitted, and a window never admits more than its current limit
//! across processes, whatever happens to the limit in between.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::{KeyId, RateLimit, Result};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

use crate::breaker::Db;
use crate::error::{retry_conflicts, storage};
use crate::lock::lock;
use crate::rate_limit::{
    Count, MY_NOW_MS, PG_NOW_MS, counting_error, host_millis, left_ms, window_ends,
};

/// The largest block a process reserves at once. Blocks only grow while each is spent within
/// [`FAST`], so a block this large means one key checked over 300 000 times a second in one
/// process; for smaller limits `limit / 16` caps it first.
pub(crate) const MAX_BLOCK: u32 = 16_384;
/// A block spent faster than this: the next one doubles.
const FAST: Duration = Duration::from_millis(50);
/// A block that took longer than this to spend: the next one halves.
const SLOW: Duration = Duration::from_secs(1);
/// MySQL packs the outcome of a reservation in `LAST_INSERT_ID`: the milliseconds left in
/// the window in bits 0-26, the units granted in bits 27-46, the window's number (modulo
/// 2^15, to give units back to the right window) in bits 47-61, and bit 62 for a refusal.
const MY_GRANT_SHIFT: u32 = 27;
const MY_INDEX_SHIFT: u32 = 47;
const MY_INDEX_MOD: i64 = 1 << 15;
const MY_REFUSED: u64 = 1 << 62;

/// The largest block for `limit`.
fn cap(limit: RateLimit) -> u32 {
    (limit.requests.get() / 16).clamp(1, MAX_BLOCK)
}

/// Which window a lease's units belong to, as the give-back statement names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowRef {
    /// Its start (Unix ms): PostgreSQL and SQLite.
    Start(i64),
    /// Its number modulo 2^15: MySQL, whose statement cannot return more.
    Index(i64),
}

/// What a reservation got.
#[derive(Debug, Clone, Copy)]
enum Grant {
    /// `granted` units for this lease; the statement added `added` (at least `granted`) to
    /// the window's count.
    Units {
        granted: u32,
        added: u32,
        left: Duration,
        window: WindowRef,
    },
    Refused(Duration),
}

/// The units one process holds for one key.
struct Lease {
    limit: RateLimit,
    window: WindowRef,
    /// When the window ends, at the latest, on this process's monotonic clock.
    until: Instant,
    remaining: u32,
    /// What this lease's reservations added to `window`'s count past what they granted
    /// (PostgreSQL and SQLite add a whole block and grant what fits under the limit): given
    /// back with the unspent units.
    excess: u32,
    /// The size of the next block.
    block: u32,
    /// When the current block was reserved.
    reserved_at: Instant,
    /// One reservation at a time per key in this process.
    reserving: Arc<tokio::sync::Mutex<()>>,
}

/// The leases of one client.
#[derive(Default)]
pub(crate) struct Leases {
    map: Mutex<HashMap<KeyId, Lease>>,
}

impl Leases {
    /// Takes one unit of `key`'s lease if it holds one for `limit` in a window not ended.
    pub(crate) fn take(&self, key: KeyId, limit: RateLimit, now: Instant) -> bool {
        let mut map = lock(&self.map);
        match map.get_mut(&key) {
            Some(l) if l.limit == limit && l.until > now && l.remaining > 0 => {
                l.remaining -= 1;
                true
            }
            _ => false,
        }
    }

    /// Counts one request of `key` against `limit` by reserving a block (one statement), for
    /// a caller whose [`take`](Self::take) found no unit.
    pub(crate) async fn check(&self, db: &Db, key: KeyId, limit: RateLimit) -> Result<Count> {
        let reserving = {
            let mut map = lock(&self.map);
            let entry = map.entry(key).or_insert_with(|| Lease::empty(limit));
            Arc::clone(&entry.reserving)
        };
        let _turn = reserving.lock().await;
        // Another task may have reserved while this one waited.
        let asked = Instant::now();
        if self.take(key, limit, asked) {
            return Ok(Count::Admitted);
        }
        let block = {
            let mut map = lock(&self.map);
            let lease = map.entry(key).or_insert_with(|| Lease::empty(limit));
            lease.next_block(limit, asked)
        };
        match reserve(db, key, limit, block).await? {
            Grant::Refused(left) => Ok(Count::Refused(left)),
            Grant::Units { granted, added, left, window } => {
                let mut map = lock(&self.map);
                let lease = map.entry(key).or_insert_with(|| Lease::empty(limit));
                if lease.window != window {
                    lease.excess = 0;
                }
                lease.excess = lease.excess.saturating_add(added.saturating_sub(granted));
                lease.limit = limit;
                lease.window = window;
                // Units of this window are not spent after it ends.
                lease.until = window_ends(asked, left);
                lease.remaining = granted - 1;
                lease.block = block;
                lease.reserved_at = asked;
                Ok(Count::Admitted)
            }
        }
    }

    /// Forgets `key`'s lease (its limit or its existence changed); its units are not used.
    pub(crate) fn forget(&self, key: KeyId) {
        lock(&self.map).remove(&key);
    }

    /// Drops leases whose window has ended.
    pub(crate) fn sweep(&self, now: Instant) {
        lock(&self.map).retain(|_, l| l.until > now || Arc::strong_count(&l.reserving) > 1);
    }

    /// Gives back to the database what this process's leases added to current windows and
    /// did not admit: the granted units not spent, and the excess of a reservation past the
    /// limit. Returns how many granted units went back.
    pub(crate) async fn release(&self, db: &Db) -> Result<u64> {
        let now = Instant::now();
        let held: Vec<(KeyId, RateLimit, WindowRef, u32, u32)> = {
            let mut map = lock(&self.map);
            let held = map
                .iter_mut()
                .filter(|(_, l)| (l.remaining > 0 || l.excess > 0) && l.until > now)
                .map(|(k, l)| {
                    let units = std::mem::take(&mut l.remaining);
                    (*k, l.limit, l.window, units, std::mem::take(&mut l.excess))
                })
                .collect();
            map.clear();
            held
        };
        let mut released = 0;
        for (key, limit, window, units, excess) in held {
            give_back(db, key, limit.window, window, units.saturating_add(excess)).await?;
            released += u64::from(units);
        }
        Ok(released)
    }
}

impl Lease {
    fn empty(limit: RateLimit) -> Self {
        let now = Instant::now();
        Self {
            limit,
            window: WindowRef::Start(0),
            until: now,
            remaining: 0,
            excess: 0,
            block: 0,
            reserved_at: now,
            reserving: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The size of the next block: doubled when the last one went fast, halved when slow.
    fn next_block(&self, limit: RateLimit, now: Instant) -> u32 {
        let cap = cap(limit);
        if self.block == 0 || self.limit != limit {
            return 1;
        }
        let spent_in = now.saturating_duration_since(self.reserved_at);
        let next = if spent_in < FAST {
            self.block.saturating_mul(2)
        } else if spent_in > SLOW {
            self.block / 2
        } else {
            self.block
        };
        next.clamp(1, cap)
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

/// Reserves up to `block` units of `key`'s current window, by the database's clock.
async fn reserve(db: &Db, key: KeyId, limit: RateLimit, block: u32) -> Result<Grant> {
    let backend = db.get_database_backend();
    let len = limit.window.seconds() * 1_000;
    let max = i64::from(limit.requests.get());
    let b = i64::from(block);
    let id = Value::from(key.as_uuid());
    let grant_from_count = |new: i64| {
        // PostgreSQL and SQLite added the whole block: the grant is what fits under the limit.
        let over = (new - max).max(0);
        u32::try_from((b - over).max(0)).unwrap_or(0)
    };
    let result = match backend {
        DbBackend::Postgres => {
            let values = [id, len.into(), max.into(), b.into()];
            let stmt = Statement::from_sql_and_values(backend, PG_RESERVE.as_str(), values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let row = row.ok_or_else(|| DbErr::RecordNotFound("rate limit row".into()))?;
                let start: i64 = row.try_get("", "start")?;
                let left: i64 = row.try_get("", "left_ms")?;
                let new: Option<i64> = row.try_get("", "new_count")?;
                Ok(match new.map(grant_from_count) {
                    Some(granted) if granted > 0 => Grant::Units {
                        granted,
                        added: block,
                        left: left_ms(left),
                        window: WindowRef::Start(start),
                    },
                    _ => Grant::Refused(left_ms(left)),
                })
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
            let stmt = Statement::from_sql_and_values(backend, MY_RESERVE.as_str(), values);
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
            let stmt = Statement::from_sql_and_values(backend, sql, values);
            retry_conflicts(|| db.query_one_raw(stmt.clone())).await.and_then(|row| {
                let left = left_ms(start + len - host_millis());
                let new = match row {
                    Some(row) => Some(row.try_get::<i64>("", "count")?),
                    None => None,
                };
                Ok(match new.map(grant_from_count) {
                    Some(granted) if granted > 0 => Grant::Units {
                        granted,
                        added: block,
                        left,
                        window: WindowRef::Start(start),
                    },
                    _ => Grant::Refused(left),
                })
            })
        }
    };
    result.map_err(counting_error)
}

/// Takes `units` that this process added to `key`'s window (and did not admit) off the
/// window's count. Only what the lease itself added is subtracted, so the count never falls
/// below what was admitted; no limit is involved (the key's may have changed since). A
/// window that has ended (or whose row is gone) is left alone.
async fn give_back(
    db: &Db,
    key: KeyId,
    length: apikeys_core::Window,
    window: WindowRef,
    units: u32,
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
            "UPDATE rate_limit_windows SET count = count - $3 \
             WHERE key_id = $1 AND window_start = $2 AND count >= $3",
            [id, start.into(), n.into()],
        ),
        (DbBackend::MySql, WindowRef::Index(index)) => Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE rate_limit_windows SET count = count - ? \
                 WHERE key_id = ? AND expires_at > {MY_NOW_MS} AND expires_at - window_start = ? \
                 AND MOD(FLOOR(window_start / ?), {MY_INDEX_MOD}) = ? AND count >= ?"
            ),
            [n.into(), id, len.into(), len.into(), index.into(), n.into()],
        ),
        (_, WindowRef::Start(start)) => Statement::from_sql_and_values(
            backend,
            "UPDATE rate_limit_windows SET count = count - ? \
             WHERE key_id = ? AND window_start = ? AND count >= ?",
            [n.into(), id, start.into(), n.into()],
        ),
        _ => return Ok(()),
    };
    db.execute_raw(stmt).await.map_err(storage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limit(n: u32) -> RateLimit {
        RateLimit {
            requests: NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN),
            window: apikeys_core::Window::Minute,
        }
    }

    #[test]
    fn blocks_grow_when_spent_fast_and_shrink_when_slow() {
        let l = limit(1_000);
        let mut lease = Lease::empty(l);
        let t0 = Instant::now();
        assert_eq!(lease.next_block(l, t0), 1, "a new lease starts at one unit");
        lease.block = 1;
        lease.reserved_at = t0;
        assert_eq!(lease.next_block(l, t0 + Duration::from_millis(1)), 2);
        lease.block = 32;
        assert_eq!(lease.next_block(l, t0 + Duration::from_millis(1)), 62, "capped at limit/16");
        assert_eq!(lease.next_block(l, t0 + Duration::from_millis(500)), 32);
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(2)), 16);
        lease.block = 1;
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(2)), 1, "at least one");
        // A key checked once a second: one unit per reservation, so one write per check and
        // nothing left over.
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(1)), 1);
        assert_eq!(lease.next_block(limit(10), t0), 1, "a new limit starts again");
        assert_eq!(cap(limit(1 << 30)), MAX_BLOCK);
    }
}
