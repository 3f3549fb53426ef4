//! Leased credits ([`CreditMode::Leased`](super::CreditMode::Leased)): blocks of a balance
//! (a key's own, or the one an owner's keys share; "the key" below is either) reserved with
//! the spend statement (so never more than the balance is taken, across every replica) and
//! spent in memory, the next block reserved in the background once half of the current one
//! is spent. Credits a check took and then had to give back (a later step refused it) go
//! back to the lease they came from.
//!
//! # What a block is tied to
//! A block is reserved from the balance of the key's own row (a rolled key's balance lives
//! on its successor: its checks spend exactly, one statement each), in one period of its refill rule, under one version of the key's
//! record. It is spent only while all three hold, as far as this process can tell: the
//! record the check read has the `updated_at` the block was reserved under (a balance set by
//! an admin changes it, and the old balance's block is dropped, counted as spent), and the
//! period has not ended by the database's clock (read in the reservation; the block ends a
//! second early, as the clock is read in whole seconds). A give-back (on shutdown) adds the
//! unspent credits back only to the same row, in the same period, under the same record
//! (`updated_at` unchanged): otherwise they stay spent. So a balance never grows past what
//! it was set or refilled to.
//!
//! # Block size
//! A block covers about [`COVER`] (a second) of the key's rate in this process (credits spent since its
//! first block, over at least a second), at least the call's cost, at most an eighth of the
//! balance the last statement left and at most [`MAX_BLOCK`]. When the balance is smaller
//! than a block, checks spend exactly, one statement each, until it is refilled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::{KeyId, RefillInterval, Result};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use super::{Balance, Row, Spent, backend_index, spend_exact_balance, statement};
use crate::breaker::Db;
use crate::error::{retry_conflicts, storage};
use crate::lock::{lock, release_each};

/// The most credits one block holds.
const MAX_BLOCK: u64 = 16_384;
/// How long a block should last at the key's observed rate.
const COVER: Duration = Duration::from_secs(1);
/// The shortest time a rate is observed over.
const MIN_OBSERVED: Duration = Duration::from_secs(1);
/// A block never takes more than this share of the balance the last statement left.
const SHARE: u64 = 8;

/// What a reservation records beside the balance left, per backend (PostgreSQL, MySQL,
/// SQLite): the refill interval and period, the record's `updated_at`, and the database's
/// clock in whole seconds.
pub(super) const RECORDED: [&str; 3] = [
    "refill_interval, refilled_period, updated_at, \
     floor(extract(epoch FROM statement_timestamp()))::bigint AS now_s",
    "refill_interval, refilled_period, updated_at, UNIX_TIMESTAMP() AS now_s",
    "refill_interval, refilled_period, updated_at, CAST(strftime('%s', 'now') AS INTEGER) AS now_s",
];

/// A block reserved: from which row, under what, until when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    /// The row the credits came from.
    row: Row,
    /// The balance the statement left.
    pub(super) left: u64,
    /// The refill period the balance was in (`None`: it does not refill).
    period: Option<i64>,
    /// The row's `updated_at` when reserved: a give-back requires it unchanged.
    row_updated_at: NaiveDateTime,
    /// When the period ends, at the latest, on this process's monotonic clock.
    until: Option<Instant>,
}

/// What one process holds of one key's balance.
struct Lease {
    /// The `updated_at` of the record the lease's checks read: a check that reads another
    /// drops the lease.
    record_updated_at: DateTime<Utc>,
    held: u64,
    /// What the last reservation recorded (`None`: none yet, or the balance was too small).
    reserved: Option<Reserved>,
    /// The balance the last statement left, as far as this process knows, and whether a
    /// statement has told it yet.
    left: u64,
    left_known: bool,
    /// Credits spent from blocks, and since when: the observed rate.
    spent: u64,
    first_at: Instant,
    /// The size of the last block.
    block: u64,
    refilling: bool,
    reserving: Arc<tokio::sync::Mutex<()>>,
    /// The balance was found spent: refused from memory until then (this process's
    /// monotonic clock), with the refill time the database gave.
    exhausted: Option<(Instant, Option<DateTime<Utc>>)>,
}

impl Lease {
    fn new(record_updated_at: DateTime<Utc>) -> Self {
        Self {
            record_updated_at,
            held: 0,
            reserved: None,
            left: 0,
            left_known: false,
            spent: 0,
            first_at: Instant::now(),
            block: 0,
            refilling: false,
            reserving: Arc::new(tokio::sync::Mutex::new(())),
            exhausted: None,
        }
    }

    /// Whether the held credits may still be spent at `now`.
    fn spendable(&self, now: Instant) -> bool {
        self.reserved.is_some_and(|r| r.until.is_none_or(|until| now < until))
    }

    /// The next block for a call costing `cost`: about [`COVER`] at the observed rate,
    /// at least `cost`, at most [`MAX_BLOCK`] and an eighth of the balance last seen.
    fn next_block(&self, cost: u64, now: Instant) -> u64 {
        let observed = now.saturating_duration_since(self.first_at).max(MIN_OBSERVED);
        let per_cover = self.spent as f64 * COVER.as_secs_f64() / observed.as_secs_f64();
        // Saturating float-to-int conversion; the bounds below apply anyway.
        let rate = (per_cover.ceil() as u64).min(MAX_BLOCK).min(self.left / SHARE);
        rate.max(cost)
    }
}

/// The credit leases of one client.
pub(crate) struct CreditLeases {
    db: Db,
    runtime: tokio::runtime::Handle,
    map: Mutex<HashMap<KeyId, Lease>>,
    /// Spends so far (every [`SWEEP_EVERY`] the map is swept).
    spends: std::sync::atomic::AtomicU64,
}

/// Every this many spends, leases holding nothing are dropped.
const SWEEP_EVERY: u64 = 4_096;

/// Which block credits were taken from: a give-back returns them only to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    period: Option<i64>,
    row_updated_at: NaiveDateTime,
}

impl Reserved {
    fn block(&self) -> Block {
        Block { period: self.period, row_updated_at: self.row_updated_at }
    }
}

/// What a call got from the lease.
enum Taken {
    /// Spent from held credits of a block; the balance as this process sees it.
    Spent(u64, Option<Block>),
    /// Nothing held (or not for this record): reserve.
    Empty,
    /// The balance was found spent a moment ago (see [`EXHAUSTED_MEMO`]).
    Exhausted(Option<DateTime<Utc>>),
}

impl Taken {
    /// The check's answer, if memory gave one: the balance left (and where it came from),
    /// or a refusal.
    fn answer(self) -> Option<Result<(u64, Spent)>> {
        match self {
            Taken::Spent(left, from) => Some(Ok((left, from.map_or(Spent::Nothing, Spent::Held)))),
            Taken::Exhausted(refill_at) => {
                Some(Err(apikeys_core::Error::UsageExhausted { refill_at }))
            }
            Taken::Empty => None,
        }
    }
}

/// How long a process refuses a key whose balance it found spent without asking the
/// database again (while the key's record stays the same).
pub(crate) const EXHAUSTED_MEMO: Duration = Duration::from_secs(1);

impl CreditLeases {
    pub(crate) fn new(db: Db, runtime: tokio::runtime::Handle) -> Self {
        Self { db, runtime, map: Mutex::new(HashMap::new()), spends: Default::default() }
    }

    /// Spends `cost` credits of `key` from the credits held, when they suffice: the balance
    /// as this process sees it. `None`: [`spend`](Self::spend) must reserve (or spend
    /// exactly). Every spend passes here once, and counts toward the sweep.
    ///
    /// # Errors
    /// [`Error::UsageExhausted`](apikeys_core::Error::UsageExhausted) for a balance this
    /// process found spent less than [`EXHAUSTED_MEMO`] ago, the record unchanged since.
    pub(crate) fn spend_in_memory(
        self: &Arc<Self>,
        b: &Balance,
        cost: u32,
    ) -> Option<Result<(u64, Spent)>> {
        self.count_and_sweep();
        // A rolled key's balance lives on its successor: spent exactly, as without leases.
        if b.rolled {
            return None;
        }
        self.take(b, u64::from(cost)).answer()
    }

    /// Spends `cost` credits of `key`, for a spend that
    /// [`spend_in_memory`](Self::spend_in_memory) could not answer: after a reservation (or,
    /// for a balance smaller than a block and for a rolled key, an exact spend).
    pub(crate) async fn spend(
        self: &Arc<Self>,
        b: &Balance,
        cost: u32,
    ) -> Result<(Option<u64>, Spent)> {
        let cost = u64::from(cost);
        let cost_sql = i64::try_from(cost).unwrap_or(i64::MAX);
        if b.rolled {
            return Box::pin(spend_exact_balance(&self.db, b, cost_sql)).await;
        }
        let reserving = {
            let mut map = lock(&self.map);
            let lease = map.entry(b.id()).or_insert_with(|| Lease::new(b.version));
            Arc::clone(&lease.reserving)
        };
        let turn = reserving.lock().await;
        // A reservation may have landed while this call waited, or another call found the
        // balance spent.
        if let Some(answer) = self.take(b, cost).answer() {
            return answer.map(|(left, spent)| (Some(left), spent));
        }
        let block = {
            let map = lock(&self.map);
            map.get(&b.id())
                .map(|l| (l, l.next_block(cost, Instant::now())))
                .filter(|(l, block)| !l.left_known || l.left >= *block)
                .map(|(_, block)| block)
        };
        if let Some(block) = block {
            // In a task of its own: a caller that gives up must not drop a reservation the
            // database may already have committed before its block is recorded.
            let (leases, owned) = (Arc::clone(self), b.clone());
            let reservation =
                self.runtime.spawn(async move { leases.reserve(&owned, block, cost).await });
            match reservation.await {
                Ok(Ok(Some((left, spent)))) => return Ok((Some(left), spent)),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(apikeys_core::Error::unavailable(e)),
            }
        }
        // A balance smaller than the block (known from the last statement, or just refused):
        // spend exactly, without holding the key's turn, and remember what is left.
        drop(turn);
        let (left, spent) = match Box::pin(spend_exact_balance(&self.db, b, cost_sql)).await {
            Err(apikeys_core::Error::UsageExhausted { refill_at }) => {
                // Remembered for a moment, for this record: a key found spent is refused
                // without a statement per check (a hot key's checks would otherwise be two
                // statements each).
                if let Some(lease) = lock(&self.map).get_mut(&b.id())
                    && lease.record_updated_at == b.version
                {
                    lease.exhausted = Some((Instant::now() + EXHAUSTED_MEMO, refill_at));
                }
                return Err(apikeys_core::Error::UsageExhausted { refill_at });
            }
            other => other?,
        };
        if let Some(lease) = lock(&self.map).get_mut(&b.id()) {
            lease.spent = lease.spent.saturating_add(cost);
            lease.left = left.unwrap_or(0);
            lease.left_known = true;
        }
        Ok((left, spent))
    }

    /// Puts `cost` credits taken from `block` of what is held for `b` back, for a check a
    /// later step refused: if the lease still holds that block of that record and it is
    /// spendable (else they count as spent, as everything a lease drops does).
    pub(crate) fn untake(&self, b: &Balance, block: Block, cost: u32) {
        let cost = u64::from(cost);
        if let Some(lease) = lock(&self.map).get_mut(&b.id())
            && lease.record_updated_at == b.version
            && lease.reserved.map(|r| r.block()) == Some(block)
            && lease.spendable(Instant::now())
        {
            lease.held = lease.held.saturating_add(cost);
            lease.spent = lease.spent.saturating_sub(cost);
        }
    }

    /// Counts a spend; every [`SWEEP_EVERY`] of them, drops the leases that hold nothing and
    /// that no reservation is using.
    fn count_and_sweep(&self) {
        let n = self.spends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let now = Instant::now();
            lock(&self.map).retain(|_, l| {
                (l.held > 0 && l.spendable(now)) || Arc::strong_count(&l.reserving) > 1
            });
        }
    }

    /// Takes `cost` from what is held for `key`, if the lease is for this record, its
    /// period has not ended and it holds enough; starts the next block in the background
    /// when half of this one is spent.
    fn take(self: &Arc<Self>, b: &Balance, cost: u64) -> Taken {
        let now = Instant::now();
        let (seen, from, refill) = {
            let mut map = lock(&self.map);
            let Some(lease) = map.get_mut(&b.id()) else { return Taken::Empty };
            if lease.record_updated_at != b.version {
                // The record changed (a balance set, a roll): what is held is of the old one.
                *lease = Lease::new(b.version);
                return Taken::Empty;
            }
            if let Some((until, refill_at)) = lease.exhausted {
                if until > now {
                    return Taken::Exhausted(refill_at);
                }
                lease.exhausted = None;
            }
            if !lease.spendable(now) {
                lease.held = 0;
            }
            if lease.held < cost || lease.held == 0 {
                return Taken::Empty;
            }
            lease.held -= cost;
            lease.spent = lease.spent.saturating_add(cost);
            let refill = !lease.refilling && lease.held <= lease.block / 2;
            lease.refilling |= refill;
            let seen = lease.left.saturating_add(lease.held);
            (seen, lease.reserved.map(|r| r.block()), refill.then(|| lease.next_block(cost, now)))
        };
        if let Some(block) = refill {
            self.refill_in_background(b.clone(), block);
        }
        Taken::Spent(seen, from)
    }

    /// Reserves the next `block` of `key`'s balance off the request path.
    fn refill_in_background(self: &Arc<Self>, b: Balance, block: u64) {
        let leases = Arc::clone(self);
        self.runtime.spawn(async move {
            let reserving = match lock(&leases.map).get(&b.id()) {
                Some(lease) => Arc::clone(&lease.reserving),
                None => return,
            };
            let _turn = reserving.lock().await;
            let still_low = lock(&leases.map)
                .get(&b.id())
                .is_some_and(|l| l.record_updated_at == b.version && l.held <= l.block / 2);
            if still_low && let Err(e) = leases.reserve(&b, block, 0).await {
                tracing::debug!(balance = %b.id(), error = %e, "reserving credits ahead failed");
            }
            if let Some(lease) = lock(&leases.map).get_mut(&b.id()) {
                lease.refilling = false;
            }
        });
    }

    /// Reserves `block` credits of `key`'s balance (the caller holds the key's reservation
    /// lock) and takes `cost` of them: the balance as this process sees it, and where the
    /// `cost` came from. `None`: the balance is smaller than the block.
    async fn reserve(
        self: &Arc<Self>,
        b: &Balance,
        block: u64,
        cost: u64,
    ) -> Result<Option<(u64, Spent)>> {
        let asked = Instant::now();
        let amount = i64::try_from(block).unwrap_or(i64::MAX);
        // On the key's own row: a rolled key's balance lives on its successor, where the
        // exact spend finds it.
        let Some(reserved) = reserve_on(&self.db, b.row, amount, asked).await? else {
            return Ok(None);
        };
        let landed = {
            let mut map = lock(&self.map);
            let lease = map.entry(b.id()).or_insert_with(|| Lease::new(b.version));
            if lease.record_updated_at > b.version {
                // Landed late, for a record older than the lease's: not mixed in (nor does it
                // replace the newer lease); it goes back below, into its own balance if that
                // is still the row's.
                None
            } else {
                if lease.record_updated_at != b.version {
                    *lease = Lease::new(b.version);
                }
                // Credits of another balance (set again since), of another period, or no
                // longer spendable are not carried over: what is held is always of one
                // balance, the one a give-back names.
                if !lease.spendable(asked)
                    || lease.reserved.is_some_and(|r| {
                        r.period != reserved.period || r.row_updated_at != reserved.row_updated_at
                    })
                {
                    lease.held = 0;
                }
                lease.held = lease.held.saturating_add(block).saturating_sub(cost);
                lease.spent = lease.spent.saturating_add(cost);
                lease.left = reserved.left;
                lease.block = block;
                lease.reserved = Some(reserved);
                // A check that had to wait for this block starts the next one at once when it
                // took half or more of it (a background refill never does: it runs once).
                lease.left_known = true;
                let refill = cost > 0 && !lease.refilling && lease.held <= lease.block / 2;
                lease.refilling |= refill;
                let next = refill.then(|| lease.next_block(cost, Instant::now()));
                Some((reserved.left.saturating_add(lease.held), next))
            }
        };
        let Some((seen, refill)) = landed else {
            // The cost was taken from the row, and stays there: a give-back goes to it.
            give_back(&self.db, block.saturating_sub(cost), &reserved).await?;
            return Ok(Some((reserved.left, Spent::Row(reserved))));
        };
        if let Some(next) = refill {
            self.refill_in_background(b.clone(), next);
        }
        Ok(Some((seen, Spent::Held(reserved.block()))))
    }

    /// Forgets what is held for `key`: not spent, not given back.
    pub(crate) fn forget(&self, key: KeyId) {
        lock(&self.map).remove(&key);
    }

    /// Gives back what is held unspent, once reservations under way have landed: to the
    /// row it came from, only while that row's record and period are those of the
    /// reservation. Returns how many credits went back.
    pub(crate) async fn release(&self) -> Result<u64> {
        let now = Instant::now();
        let take = |l: Lease| {
            if l.held > 0 && l.spendable(now) { l.reserved.map(|r| (l.held, r)) } else { None }
        };
        let give = |_, (credits, reserved): (u64, Reserved)| async move {
            Ok(if give_back(&self.db, credits, &reserved).await? { credits } else { 0 })
        };
        release_each(&self.map, |l| &l.reserving, take, give).await
    }
}

/// One reservation statement on `row` (`amount` taken off its balance, with what the
/// reservation records); `None`: refused.
pub(crate) async fn reserve_on(
    db: &Db,
    row: Row,
    amount: i64,
    asked: Instant,
) -> Result<Option<Reserved>> {
    let backend = db.get_database_backend();
    let stmt = statement(backend, row, amount, true);
    let read = if backend == DbBackend::MySql {
        // No RETURNING: the update and a read of what it recorded, in one transaction.
        let stmt = &stmt;
        let whole = move || async move {
            let txn = db.begin_with_options(sea_orm::TransactionOptions::default()).await?;
            let res = txn.execute_raw(stmt.clone()).await?;
            let read = if res.rows_affected() == 1 {
                let sql = format!(
                    "SELECT remaining, {} FROM {} WHERE id = ?",
                    RECORDED[backend_index(backend)],
                    row.table()
                );
                let values: [Value; 1] = [row.id().into()];
                txn.query_one_raw(Statement::from_sql_and_values(backend, sql, values)).await?
            } else {
                None
            };
            txn.commit().await?;
            Ok(read)
        };
        // A deadlock with another replica's reservation is run again.
        retry_conflicts(|| db.bounded(whole(), |e| e)).await.map_err(storage)?
    } else {
        db.query_one_raw(stmt).await.map_err(storage)?
    };
    let Some(read) = read else { return Ok(None) };
    let get = |e| storage(e);
    let left: i64 = read.try_get("", "remaining").map_err(get)?;
    let interval: Option<String> = read.try_get("", "refill_interval").map_err(get)?;
    let period: Option<i64> = read.try_get("", "refilled_period").map_err(get)?;
    let row_updated_at: NaiveDateTime = read.try_get("", "updated_at").map_err(get)?;
    let now_s: i64 = read.try_get("", "now_s").map_err(get)?;
    let interval = interval.as_deref().and_then(RefillInterval::from_name);
    let until = match (interval, period) {
        (Some(interval), Some(period)) => {
            let end = interval.start(period.saturating_add(1));
            let now = Utc.timestamp_opt(now_s, 0).single();
            // The clock was read in whole seconds after `asked`: end a second early.
            let left = end.zip(now).map(|(end, now)| end - now - chrono::Duration::seconds(1));
            let left = left.and_then(|l| l.to_std().ok()).unwrap_or_default();
            Some(asked + left)
        }
        _ => None,
    };
    Ok(Some(Reserved {
        row,
        left: u64::try_from(left).unwrap_or(0),
        period: interval.and(period),
        row_updated_at,
        until,
    }))
}

/// Adds `credits` back to the row they were reserved from, if its record (`updated_at`) and
/// refill period are still those of the reservation. Returns whether they went back.
pub(crate) async fn give_back(db: &Db, credits: u64, reserved: &Reserved) -> Result<bool> {
    let backend = db.get_database_backend();
    let mut p = super::Params { backend, values: Vec::new() };
    let n = p.p(i64::try_from(credits).unwrap_or(i64::MAX));
    let id = p.p(reserved.row.id());
    let updated = p.p(reserved.row_updated_at);
    let period = match reserved.period {
        // The same period, and none due since (`due()` reads the database's clock).
        Some(period) => format!("refilled_period = {} AND NOT {}", p.p(period), p.due()),
        None => "refill_amount IS NULL".to_owned(),
    };
    let sql = format!(
        "UPDATE {} SET remaining = remaining + {n} \
         WHERE id = {id} AND remaining IS NOT NULL AND updated_at = {updated} AND {period}",
        reserved.row.table()
    );
    let stmt = Statement::from_sql_and_values(backend, sql, p.values);
    // A deadlock with a change of the row (MySQL) is run again: giving up would leave the
    // credits spent.
    let res = retry_conflicts(|| db.execute_raw(stmt.clone())).await;
    Ok(res.map_err(storage)?.rows_affected() == 1)
}
