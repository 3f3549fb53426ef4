//! Leased shared rate limits ([`RateLimitMode::Leased`](crate::RateLimitMode::Leased)): the
//! shared window row of [`rate_limit`](crate::rate_limit), reserved a block of units at a
//! time and spent in memory, with the next block reserved in the background before the
//! current one runs out.
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
//! # Many keys per statement
//! The reservations a process asks for while one batch is with the database (first checks
//! of many keys, background refills, next windows' first blocks) go together in the next
//! batch, up to [`MAX_BATCH`] keys: on PostgreSQL and SQLite one statement, the same upsert
//! row by row; on MySQL, which cannot return per-row results, the rows created at 0 where
//! missing, then one transaction that locks them, works out each grant and adds it. No
//! reservation waits for more than the batch before it, and under load one statement serves
//! many keys. A batch that fails (a key deleted meanwhile fails the whole statement) is
//! done again key by key, so each key gets an answer of its own.
//!
//! # Off the request path
//! A check takes a unit of the block this process holds, in memory. When that leaves half
//! of the block or less, the next block is reserved in the background (one reservation in
//! flight per key and process) and added to what is held, so a key checked steadily never
//! waits for the database. A key that used two units or more of a window gets its first
//! block of the next window reserved in the background as soon as that window has surely
//! begun by the database's clock. So only a key's first check after it was idle (or one that
//! outran its refill) waits for a reservation.
//!
//! # Block size
//! A block covers the rest of the window at the key's rate observed in this process and
//! window (units taken over the time since its first, at least a second), and at least
//! [`COVER`] of it; the next window's first block covers that whole window at the last
//! one's rate. At least 1, at most `limit / 16` and at most [`MAX_BLOCK`]: so a key checked
//! a few times a window reserves about once per window, and a hot key one capped block at a
//! time.
//!
//! # What may be left unspent
//! Units reserved and not spent when a window ends are gone; a process holds at most one
//! block and a half of a key's window at any time (the half it had left when it reserved
//! the next block, and that block). Units of the current window are given back on
//! [`ApiKeyClient::shutdown`](crate::ApiKeyClient::shutdown), after any reservation in flight
//! has landed. Meanwhile, one process can be refused while another still holds units: a
//! window may end with at most the units held across processes unspent, each process at most
//! `1.5 × limit / 16` (see `leased_shortfall_is_bounded` in the test suite).
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

use super::window::{
    Count, MY_NOW_MS, PG_NOW_MS, counting_error, host_millis, left_ms, window_ends,
};
use crate::breaker::Db;
use crate::error::{retry_conflicts, storage};
use crate::lock::{lock, release_each};

/// The most keys one batch statement reserves for.
const MAX_BATCH: usize = 256;

/// The batch a reservation waited in was dropped (the client's runtime is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the rate-limit reservation was dropped before it ran")]
struct BatchDropped;

/// The largest block a process reserves at once: one key checked over 65 000 times a
/// second in one process; for smaller limits `limit / 16` caps it first.
pub(crate) const MAX_BLOCK: u32 = 16_384;
/// How long a block should last at the key's observed rate.
const COVER: Duration = Duration::from_millis(250);
/// The shortest time a rate is observed over (a key's first units say little about it).
const MIN_OBSERVED: Duration = Duration::from_secs(1);
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
    /// When the window ends, at the latest, on this process's monotonic clock: its units
    /// are not spent after this.
    until: Instant,
    /// When the window has surely ended (and the next begun) by the database's clock, on
    /// this process's monotonic clock.
    over_by: Instant,
    remaining: u32,
    /// What this lease's reservations added to `window`'s count past what they granted
    /// (PostgreSQL and SQLite add a whole block and grant what fits under the limit): given
    /// back with the unspent units.
    excess: u32,
    /// The size of the last block reserved.
    block: u32,
    /// Units taken in this window, and when the first was reserved: the observed rate.
    taken: u32,
    first_at: Instant,
    /// A background refill of this window is under way.
    refilling: bool,
    /// The next window's first block is scheduled to be reserved.
    next_scheduled: bool,
    /// One reservation at a time per key in this process.
    reserving: Arc<tokio::sync::Mutex<()>>,
}

/// Why a reservation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A check found no unit: it waits for this one.
    Check,
    /// Half the block is spent: the next one, in the background.
    Refill,
    /// The key was active in the window that has just ended: the new window's first block.
    NextWindow(WindowRef),
}

/// What to reserve ahead after a unit was taken.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    /// Half the block is spent: the next one now.
    refill: bool,
    /// The key is active in this window: its next window's first block, once it has begun.
    next_window: Option<(WindowRef, Instant)>,
}

/// The leases of one client: its connection handle, and where background reservations run.
pub(crate) struct Leases {
    db: Db,
    runtime: tokio::runtime::Handle,
    map: Mutex<HashMap<KeyId, Lease>>,
    /// Reservations waiting for the next batch.
    queue: Mutex<Queue>,
}

/// Reservations asked for while a batch statement runs: they go in the next one.
#[derive(Default)]
struct Queue {
    asks: Vec<Ask>,
    /// A task is sending batches.
    sending: bool,
}

/// One key's reservation, waiting in the [`Queue`].
struct Ask {
    key: KeyId,
    limit: RateLimit,
    block: u32,
    reply: tokio::sync::oneshot::Sender<Result<Grant>>,
}

impl Leases {
    pub(crate) fn new(db: Db, runtime: tokio::runtime::Handle) -> Self {
        Self { db, runtime, map: Mutex::new(HashMap::new()), queue: Mutex::default() }
    }

    /// Reserves up to `block` units of `key`'s current window. The reservations asked for
    /// while one batch runs go together in the next (see [`reserve_many`]): under load, one
    /// statement (on MySQL, one transaction) serves many keys, and no reservation waits for
    /// more than the batch before it.
    async fn reserve(self: &Arc<Self>, key: KeyId, limit: RateLimit, block: u32) -> Result<Grant> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = lock(&self.queue);
            queue.asks.push(Ask { key, limit, block, reply });
            !std::mem::replace(&mut queue.sending, true)
        };
        if start {
            let leases = Arc::clone(self);
            self.runtime.spawn(async move { leases.send_batches().await });
        }
        answer.await.unwrap_or_else(|_| Err(apikeys_core::Error::unavailable(BatchDropped)))
    }

    /// Sends the queued reservations, [`MAX_BATCH`] keys per statement at most, until none is
    /// left.
    async fn send_batches(&self) {
        loop {
            let batch = {
                let mut queue = lock(&self.queue);
                if queue.asks.is_empty() {
                    queue.sending = false;
                    return;
                }
                // One ask per key in a statement (a key has one reservation in flight per
                // process; a second would wait for the next batch).
                let mut seen = std::collections::HashSet::new();
                let mut batch = Vec::new();
                let mut rest = Vec::new();
                for ask in queue.asks.drain(..) {
                    if batch.len() < MAX_BATCH && seen.insert(ask.key) {
                        batch.push(ask);
                    } else {
                        rest.push(ask);
                    }
                }
                queue.asks = rest;
                batch
            };
            let wanted: Vec<_> = batch.iter().map(|a| (a.key, a.limit, a.block)).collect();
            // MySQL's batch takes five round trips: one key alone takes one statement.
            let alone = wanted.len() == 1 && self.db.get_database_backend() == DbBackend::MySql;
            let reserved = if alone {
                reserve(&self.db, wanted[0].0, wanted[0].1, wanted[0].2).await.map(|g| vec![g])
            } else {
                reserve_many(&self.db, &wanted).await.map_err(counting_error)
            };
            match reserved {
                Ok(grants) => {
                    for (ask, grant) in batch.into_iter().zip(grants) {
                        ask.reply.send(Ok(grant)).ok();
                    }
                }
                // A key deleted meanwhile fails the whole statement (its window row cannot
                // reference it), as does a database failure: each key again on its own, for
                // an answer of its own.
                Err(e) if alone => {
                    if let Some(ask) = batch.into_iter().next() {
                        ask.reply.send(Err(e)).ok();
                    }
                }
                Err(e) => {
                    tracing::debug!(keys = batch.len(), error = %e, "a batch of rate-limit reservations failed; reserving key by key");
                    for ask in batch {
                        let grant = reserve(&self.db, ask.key, ask.limit, ask.block).await;
                        ask.reply.send(grant).ok();
                    }
                }
            }
        }
    }

    /// Takes one unit of `key`'s lease if it holds one for `limit` in a window not ended;
    /// starts a background reservation when the lease runs low, and schedules the next
    /// window's first block for a key active in this one.
    pub(crate) fn take(self: &Arc<Self>, key: KeyId, limit: RateLimit, now: Instant) -> bool {
        let ahead = {
            let mut map = lock(&self.map);
            let Some(l) = map.get_mut(&key) else { return false };
            if l.limit != limit || l.until <= now || l.remaining == 0 {
                return false;
            }
            l.remaining -= 1;
            l.took_one()
        };
        self.reserve_ahead(key, limit, ahead);
        true
    }

    /// Counts one request of `key` against `limit` by reserving a block (one statement), for
    /// a caller whose [`take`](Self::take) found no unit. Waits for a reservation of this key
    /// already under way in this process first (a background refill), then takes from it.
    pub(crate) async fn check(self: &Arc<Self>, key: KeyId, limit: RateLimit) -> Result<Count> {
        let reserving = {
            let mut map = lock(&self.map);
            let entry = map.entry(key).or_insert_with(|| Lease::empty(limit));
            Arc::clone(&entry.reserving)
        };
        let _turn = reserving.lock().await;
        if self.take(key, limit, Instant::now()) {
            return Ok(Count::Admitted);
        }
        let asked = Instant::now();
        let block = {
            let mut map = lock(&self.map);
            let lease = map.entry(key).or_insert_with(|| Lease::empty(limit));
            lease.next_block(limit, asked, Purpose::Check)
        };
        // In a task of its own: a caller that gives up (a timeout, a client gone) must not
        // drop a reservation the database may already have committed before its grant is
        // recorded, or those units would be neither spent nor given back.
        let leases = Arc::clone(self);
        let reservation = self
            .runtime
            .spawn(async move { leases.reserve_block(key, limit, block, asked, true).await });
        match reservation.await {
            Ok(Ok(Grant::Refused(left))) => Ok(Count::Refused(left)),
            Ok(Ok(Grant::Units { .. })) => Ok(Count::Admitted),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(apikeys_core::Error::unavailable(e)),
        }
    }

    /// Starts what [`Lease::took_one`] asked for.
    fn reserve_ahead(self: &Arc<Self>, key: KeyId, limit: RateLimit, ahead: Ahead) {
        if ahead.refill {
            self.spawn_reservation(key, limit, Purpose::Refill, None);
        }
        if let Some((window, over_by)) = ahead.next_window {
            self.spawn_reservation(key, limit, Purpose::NextWindow(window), Some(over_by));
        }
    }

    /// Reserves `block` units (the caller holds the key's reservation lock), asked at
    /// `asked`, and adds the grant to the lease; with `take`, one unit of it is taken for the
    /// caller.
    async fn reserve_block(
        self: &Arc<Self>,
        key: KeyId,
        limit: RateLimit,
        block: u32,
        asked: Instant,
        take: bool,
    ) -> Result<Grant> {
        let grant = self.reserve(key, limit, block).await?;
        let answered = Instant::now();
        if let Grant::Units { granted, added, left, window } = grant {
            let ahead = {
                let mut map = lock(&self.map);
                let lease = map.entry(key).or_insert_with(|| Lease::empty(limit));
                // A new window (or limit), or the lease's window over here: MySQL names
                // windows modulo 2^15, so a window 2^15 windows later looks the same.
                if lease.window != window || lease.limit != limit || lease.until <= asked {
                    // What was held is no longer spendable.
                    lease.window = window;
                    lease.limit = limit;
                    lease.remaining = 0;
                    lease.excess = 0;
                    lease.taken = 0;
                    lease.first_at = asked;
                    lease.next_scheduled = false;
                }
                lease.excess = lease.excess.saturating_add(added.saturating_sub(granted));
                // Units of this window are not spent after it ends.
                lease.until = window_ends(asked, left);
                lease.over_by = answered + left + Duration::from_millis(1);
                lease.remaining = lease.remaining.saturating_add(granted);
                lease.block = block;
                if take {
                    lease.remaining -= 1;
                    Some(lease.took_one())
                } else {
                    None
                }
            };
            if let Some(ahead) = ahead {
                self.reserve_ahead(key, limit, ahead);
            }
        }
        Ok(grant)
    }

    /// Runs a background reservation of `key`'s next block, after `at` if given.
    fn spawn_reservation(
        self: &Arc<Self>,
        key: KeyId,
        limit: RateLimit,
        purpose: Purpose,
        at: Option<Instant>,
    ) {
        let leases = Arc::clone(self);
        self.runtime.spawn(async move {
            if let Some(at) = at {
                tokio::time::sleep_until(at.into()).await;
            }
            let reserving = {
                let map = lock(&leases.map);
                match map.get(&key) {
                    Some(lease) => Arc::clone(&lease.reserving),
                    None => return,
                }
            };
            let _turn = reserving.lock().await;
            let asked = Instant::now();
            let block = {
                let map = lock(&leases.map);
                map.get(&key).and_then(|lease| lease.ahead_block(limit, asked, purpose))
            };
            let result = match block {
                Some(block) => leases.reserve_block(key, limit, block, asked, false).await.map(drop),
                None => Ok(()),
            };
            if purpose == Purpose::Refill
                && let Some(lease) = lock(&leases.map).get_mut(&key)
            {
                lease.refilling = false;
            }
            if let Err(e) = result {
                // The next check that finds no unit reserves (and reports) itself.
                tracing::debug!(key_id = %key, error = %e, "reserving rate-limit units ahead failed");
            }
        });
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
    /// limit. Reservations under way land first (see [`release_each`]). Returns
    /// how many granted units went back.
    pub(crate) async fn release(&self) -> Result<u64> {
        let now = Instant::now();
        let take = |l: Lease| {
            ((l.remaining > 0 || l.excess > 0) && l.until > now).then_some((
                l.limit,
                l.window,
                l.remaining,
                l.excess,
            ))
        };
        let give = |key, (limit, window, units, excess): (RateLimit, WindowRef, u32, u32)| async move {
            give_back(&self.db, key, limit.window, window, units.saturating_add(excess)).await?;
            Ok(u64::from(units))
        };
        release_each(&self.map, |l| &l.reserving, take, give).await
    }
}

impl Lease {
    fn empty(limit: RateLimit) -> Self {
        let now = Instant::now();
        Self {
            limit,
            window: WindowRef::Start(0),
            until: now,
            over_by: now,
            remaining: 0,
            excess: 0,
            block: 0,
            taken: 0,
            first_at: now,
            refilling: false,
            next_scheduled: false,
            reserving: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Counts a unit just taken; says what to reserve ahead.
    fn took_one(&mut self) -> Ahead {
        self.taken = self.taken.saturating_add(1);
        let refill = !self.refilling && self.remaining <= self.block / 2;
        self.refilling |= refill;
        let next_window =
            (!self.next_scheduled && self.taken >= 2).then_some((self.window, self.over_by));
        self.next_scheduled |= next_window.is_some();
        Ahead { refill, next_window }
    }

    /// The block a background reservation for `purpose` should reserve, if it is still
    /// needed: a refill while this window's units run low, the next window's first block
    /// while no one has reserved in it yet.
    fn ahead_block(&self, limit: RateLimit, now: Instant, purpose: Purpose) -> Option<u32> {
        let needed = self.limit == limit
            && match purpose {
                Purpose::Check => true,
                Purpose::Refill => self.until > now && self.remaining <= self.block / 2,
                Purpose::NextWindow(ended) => self.window == ended,
            };
        needed.then(|| self.next_block(limit, now, purpose))
    }

    /// The size of the next block: about [`COVER`] at the rate observed in this window (for
    /// the next window's first block, the rate of the window that ended), capped.
    fn next_block(&self, limit: RateLimit, now: Instant, purpose: Purpose) -> u32 {
        let cap = cap(limit);
        if self.limit != limit || (self.taken == 0 && purpose != Purpose::NextWindow(self.window)) {
            return 1;
        }
        let observed = now.saturating_duration_since(self.first_at).max(MIN_OBSERVED);
        // What the block should last: the rest of the window at the rate seen (a key
        // checked a few times a minute then reserves about once per window, not per check),
        // at least COVER; the next window's first block, that whole window. The cap bounds
        // what a process holds unspent either way.
        let horizon = match purpose {
            Purpose::NextWindow(_) => self.limit.window.duration(),
            _ => self.until.saturating_duration_since(now).max(COVER),
        };
        let units = f64::from(self.taken) * horizon.as_secs_f64() / observed.as_secs_f64();
        // Saturating float-to-int conversion; the clamp bounds it anyway.
        (units.ceil() as u32).clamp(1, cap)
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
async fn reserve(db: &Db, key: KeyId, limit: RateLimit, block: u32) -> Result<Grant> {
    let backend = db.get_database_backend();
    let len = limit.window.seconds() * 1_000;
    let max = i64::from(limit.requests.get());
    let b = i64::from(block);
    let id = Value::from(key.as_uuid());
    let result = match backend {
        DbBackend::Postgres => {
            let values = [id, len.into(), max.into(), b.into()];
            let stmt = Statement::from_sql_and_values(backend, PG_RESERVE.as_str(), values);
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
) -> std::result::Result<Vec<Grant>, DbErr> {
    let backend = db.get_database_backend();
    let mut order: Vec<usize> = (0..asks.len()).collect();
    order.sort_by_key(|&i| asks[i].0.as_uuid());
    let mut values: Vec<Value> = Vec::with_capacity(asks.len() * 5);
    let mut rows = Vec::with_capacity(asks.len());
    // The rows' new counts by key, and (PostgreSQL) each window's start and time left.
    let mut found: HashMap<uuid::Uuid, (Option<i64>, i64, i64)> = HashMap::new();
    if backend == DbBackend::MySql {
        return retry_conflicts(|| db.bounded(reserve_many_mysql(db, asks, &order), |e| e)).await;
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
        let stmt = Statement::from_sql_and_values(backend, sql, values);
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
        let stmt = Statement::from_sql_and_values(backend, sql, values);
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
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values)).await?;
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
    for row in txn.query_all_raw(Statement::from_sql_and_values(backend, sql, values)).await? {
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
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values)).await?;
    }
    txn.commit().await?;
    Ok(grants)
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
    fn blocks_cover_the_observed_rate() {
        let l = limit(100_000);
        let mut lease = Lease::empty(l);
        let t0 = lease.first_at;
        assert_eq!(lease.next_block(l, t0, Purpose::Check), 1, "a new lease starts at one unit");
        // No time left in the window known: COVER of the rate. 4 000 units in 2 s: 2 000 a
        // second, 500 per COVER.
        lease.taken = 4_000;
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(2), Purpose::Refill), 500);
        // Observed over a second at least: 400 units in 10 ms count as 400 a second.
        lease.taken = 400;
        assert_eq!(lease.next_block(l, t0 + Duration::from_millis(10), Purpose::Refill), 100);
        // The rest of the window at the rate seen: 3 units in 3 s with 10 s left: 10.
        lease.taken = 3;
        lease.until = t0 + Duration::from_secs(13);
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(3), Purpose::Refill), 10);
        // Capped at limit / 16 and at MAX_BLOCK.
        lease.taken = 1_000_000;
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(1), Purpose::Refill), 6_250);
        let huge = limit(1 << 30);
        let mut hot = Lease::empty(huge);
        hot.taken = u32::MAX;
        assert_eq!(hot.next_block(huge, hot.first_at, Purpose::Refill), MAX_BLOCK);
        // A new limit starts again.
        assert_eq!(lease.next_block(limit(10), t0, Purpose::Refill), 1);
        // The next window's first block: that whole window (a minute) at the last one's
        // rate: 30 units in 30 s, 60; capped as ever.
        lease.taken = 30;
        let next = Purpose::NextWindow(lease.window);
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(30), next), 60);
        lease.taken = 4_000;
        assert_eq!(lease.next_block(l, t0 + Duration::from_secs(2), next), 6_250);
    }
}
