//! Usage credits: the atomic spend on the hot path, with the lazy refill.
//!
//! One conditional `UPDATE` spends `cost` credits of a key, after refilling its balance if a
//! new period (UTC day or month) has begun since the last refill: the refill and the spend
//! are one statement, so concurrent checks on every replica spend exactly the balance and
//! refill exactly once per period.
//!
//! # One clock for the period
//! The period is the shared decision of every replica, so it comes from the database's
//! clock, read inside the statement (PostgreSQL `statement_timestamp()`, MySQL/MariaDB
//! `UTC_TIMESTAMP()`, each fixed for the statement; SQLite `'now'`, the clock of the host
//! the file is on), never from a client's: the stored period is at most the database's
//! current one, so a replica whose clock runs a day ahead neither refills early nor pushes
//! the next refill out for everyone, and one whose clock is behind refills on time. The
//! same clock stamps the period a balance was set in (a key created or given credits), and
//! tells when a spent balance refills.
//!
//! # Leased
//! With [`CreditMode::Leased`] the same statement reserves blocks of a balance, which a
//! process then spends in memory (see [`lease`]).

mod lease;

use apikeys_core::{ApiKey, Error, KeyId, RefillInterval, Result};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use std::sync::Arc;

use crate::breaker::Db;
use crate::error::storage;

/// How many rolled keys a spend follows to find the balance (old → new → newer …).
const MAX_HOPS: usize = 8;

/// A row that holds a balance: a key's own, or the one an owner's keys share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Row {
    Key(KeyId),
    Owner(uuid::Uuid),
}

impl Row {
    /// The table the row is in: both have the same credit columns.
    fn table(self) -> &'static str {
        match self {
            Row::Key(_) => "api_keys",
            Row::Owner(_) => "owners",
        }
    }

    fn id(self) -> uuid::Uuid {
        match self {
            Row::Key(id) => id.as_uuid(),
            Row::Owner(id) => id,
        }
    }
}

/// A balance a check spends from: a key's own, or the one its owner's keys share.
#[derive(Debug, Clone)]
pub(crate) struct Balance {
    /// The row that holds it.
    pub(crate) row: Row,
    /// The `updated_at` of the record the check read: leased blocks are tied to it.
    pub(crate) version: DateTime<Utc>,
    /// A rolled key's: its balance lives on its successor, spent exactly, following the roll.
    pub(crate) rolled: bool,
}

impl Balance {
    /// The balance of `key` (which has credits).
    pub(crate) fn of_key(key: &ApiKey) -> Self {
        Self { row: Row::Key(key.id), version: key.updated_at, rolled: key.rolled_to.is_some() }
    }

    /// The balance an owner's keys share.
    pub(crate) fn of_owner(owner: &crate::owner::OwnerShare) -> Self {
        Self { row: Row::Owner(owner.row), version: owner.updated_at, rolled: false }
    }

    /// Its id among the leases (a key's id, or an owner plan's: no key has such an id).
    fn id(&self) -> KeyId {
        KeyId::from_uuid(self.row.id())
    }
}

/// Where the credits a spend took came from, for a give-back.
#[derive(Debug)]
pub(crate) enum Spent {
    /// Nowhere a give-back can reach (a key's own exact spend, or nothing spent).
    Nothing,
    /// A block of the process's lease of the balance.
    Held(lease::Block),
    /// The row, by the statement that recorded this.
    Row(lease::Reserved),
}

/// The outcome of one spend statement on one row.
enum Spend {
    /// Spent; the balance left.
    Spent(u64),
    /// Not enough credits; when the balance refills, if ever.
    Exhausted(Option<DateTime<Utc>>),
    /// The row has no credits (unlimited).
    Unlimited,
    /// The row's balance moved to the key it was rolled to.
    Moved(KeyId),
    /// No such key any more.
    Gone,
}

/// The number of the database's current period of `interval`, as an SQL expression of
/// `backend` (a `BIGINT`): as [`RefillInterval::period`] computes it, days or months since
/// the Unix epoch in UTC, on the database's clock (see the module docs).
pub(crate) fn period_sql(backend: DbBackend, interval: RefillInterval) -> &'static str {
    match (backend, interval) {
        (DbBackend::Postgres, RefillInterval::Day) => {
            "floor(extract(epoch FROM statement_timestamp()) / 86400)::bigint"
        }
        (DbBackend::Postgres, RefillInterval::Month) => {
            "((extract(year FROM statement_timestamp() AT TIME ZONE 'UTC') - 1970) * 12 \
             + extract(month FROM statement_timestamp() AT TIME ZONE 'UTC') - 1)::bigint"
        }
        (DbBackend::MySql, RefillInterval::Day) => {
            "CAST(DATEDIFF(UTC_TIMESTAMP(), '1970-01-01') AS SIGNED)"
        }
        (DbBackend::MySql, RefillInterval::Month) => {
            "CAST((YEAR(UTC_TIMESTAMP()) - 1970) * 12 + MONTH(UTC_TIMESTAMP()) - 1 AS SIGNED)"
        }
        (_, RefillInterval::Day) => "(CAST(strftime('%s', 'now') AS INTEGER) / 86400)",
        (_, RefillInterval::Month) => {
            "((CAST(strftime('%Y', 'now') AS INTEGER) - 1970) * 12 \
             + CAST(strftime('%m', 'now') AS INTEGER) - 1)"
        }
    }
}

/// A statement's parameters, numbered as its backend wants them.
struct Params {
    backend: DbBackend,
    values: Vec<Value>,
}

impl Params {
    fn p(&mut self, v: impl Into<Value>) -> String {
        self.values.push(v.into());
        match self.backend {
            DbBackend::Postgres => format!("${}", self.values.len()),
            _ => "?".to_owned(),
        }
    }

    /// The database's current period of the row's refill interval.
    fn cur(&self) -> String {
        let m = period_sql(self.backend, RefillInterval::Month);
        let d = period_sql(self.backend, RefillInterval::Day);
        format!("(CASE refill_interval WHEN 'month' THEN {m} ELSE {d} END)")
    }

    /// Whether the row is due a refill: a rule, and a period after the last refill's.
    fn due(&mut self) -> String {
        let c = self.cur();
        format!(
            "(refill_amount IS NOT NULL AND (refilled_period IS NULL OR refilled_period < {c}))"
        )
    }

    /// The balance the spend sees: the refill amount when due, else what is left.
    fn available(&mut self) -> String {
        format!("(CASE WHEN {} THEN refill_amount ELSE remaining END)", self.due())
    }
}

/// The spend statement for `backend`: `cost` credits, or (a leased block) `cost` reserved;
/// with `extra`, PostgreSQL and SQLite also return what a reservation records (see
/// [`lease`]).
fn statement(backend: DbBackend, row: Row, cost: i64, extra: bool) -> Statement {
    let mut p = Params { backend, values: Vec::new() };
    // MySQL assigns left to right, each assignment seeing those before it: `remaining`
    // comes first, so that it reads the old `refilled_period`.
    let spent = format!("{} - {}", p.available(), p.p(cost));
    let spent =
        if backend == DbBackend::MySql { format!("LAST_INSERT_ID({spent})") } else { spent };
    let (due, cur) = (p.due(), p.cur());
    let id = p.p(row.id());
    let (available, at_least) = (p.available(), p.p(cost));
    let returning = match (backend, extra) {
        (DbBackend::MySql, _) => String::new(),
        (_, false) => " RETURNING remaining".to_owned(),
        (_, true) => format!(" RETURNING remaining, {}", lease::RECORDED[backend_index(backend)]),
    };
    let sql = format!(
        "UPDATE {} SET remaining = {spent}, \
         refilled_period = CASE WHEN {due} THEN {cur} ELSE refilled_period END \
         WHERE id = {id} AND remaining IS NOT NULL AND {available} >= {at_least}{returning}",
        row.table()
    );
    Statement::from_sql_and_values(backend, sql, p.values)
}

/// Adds `amount` credits to `row`'s balance, on `conn`, after the refill that is due (as
/// a spend sees it: a top-up in a new period adds to the refilled balance, and is not
/// overwritten by the refill at the next check), only while the result stays within
/// [`MAX_CREDITS`](apikeys_core::MAX_CREDITS). Returns whether it did: `false` for a key with
/// no balance, or one the amount would take past the maximum.
///
/// The record's `updated_at` stays: leased credit blocks are tied to it (a new balance set
/// ends them), and a top-up leaves every block valid.
pub(crate) async fn add<C: ConnectionTrait>(conn: &C, row: Row, amount: u64) -> Result<bool> {
    let backend = conn.get_database_backend();
    let amount = i64::try_from(amount).unwrap_or(i64::MAX);
    let mut p = Params { backend, values: Vec::new() };
    // `remaining` first: MySQL's later assignments see the earlier ones.
    let added = format!("{} + {}", p.available(), p.p(amount));
    let (due, cur) = (p.due(), p.cur());
    let id = p.p(row.id());
    let (available, room) = (p.available(), p.p(i64::MAX - amount));
    let sql = format!(
        "UPDATE {} SET remaining = {added}, \
         refilled_period = CASE WHEN {due} THEN {cur} ELSE refilled_period END \
         WHERE id = {id} AND remaining IS NOT NULL AND {available} <= {room}",
        row.table()
    );
    let stmt = Statement::from_sql_and_values(backend, sql, p.values);
    Ok(conn.execute_raw(stmt).await.map_err(storage)?.rows_affected() == 1)
}

/// The index of `backend` in per-backend tables: PostgreSQL, MySQL, SQLite.
fn backend_index(backend: DbBackend) -> usize {
    match backend {
        DbBackend::Postgres => 0,
        DbBackend::MySql => 1,
        _ => 2,
    }
}

/// How usage credits are spent.
///
/// | mode | never more than the balance | cost per check | a key with none left |
/// |---|---|---|---|
/// | `Exact` | yes | one conditional `UPDATE` | refused at once, on every replica |
/// | `Leased` | yes | one `UPDATE` per block, reserved ahead in the background | refused once the blocks held are spent |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CreditMode {
    /// One atomic conditional `UPDATE` per check that spends credits: every replica sees
    /// the same balance at once.
    #[default]
    Exact,
    /// Blocks of a key's balance (and of the balance an owner's keys share: see
    /// [`ApiKeyClient::set_owner`](crate::ApiKeyClient::set_owner)) are reserved ahead (one
    /// `UPDATE` each, in the background once a key is being checked) and spent in memory. Never more than the balance is
    /// spent across replicas: a block is taken off the stored balance before any of it is
    /// spent. A replica holds at most about a block and a half per key (a block covers about
    /// a second of the key's rate in that replica, at most an eighth of the balance it saw
    /// left, at most 16 384 credits); near exhaustion (a balance smaller than a block) checks
    /// spend exactly, one `UPDATE` each. What a replica holds unspent is given back by
    /// [`ApiKeyClient::shutdown`](crate::ApiKeyClient::shutdown) (unless the key was changed
    /// or its balance refilled meanwhile); a replica that dies strands at most its blocks,
    /// which count as spent. Held credits of a balance that refills are not spent past the
    /// end of their period (by the database's clock), nor after the replica sees that the
    /// key was changed (a new balance set, for instance): within the verified-key cache's
    /// staleness bound when it has one, at once otherwise. The balance on the returned
    /// record is what the replica last read plus what it holds. A replica that finds a
    /// balance spent refuses the key from memory for a second (until the key's record
    /// changes, if sooner): a refill that falls due meanwhile is seen up to a second late.
    Leased,
}

/// Spends usage credits: a part with its own connection handle (the writer), and in leased
/// mode the blocks it holds.
pub(crate) struct CreditSpender {
    writer: Db,
    leases: Option<Arc<lease::CreditLeases>>,
    /// Where give-backs run: a caller that gives up does not cancel them.
    runtime: tokio::runtime::Handle,
}

impl CreditSpender {
    pub(crate) fn new(writer: Db, mode: CreditMode, runtime: tokio::runtime::Handle) -> Self {
        let leases = (mode == CreditMode::Leased)
            .then(|| Arc::new(lease::CreditLeases::new(writer.clone(), runtime.clone())));
        Self { writer, leases, runtime }
    }

    /// The mode credits are spent in.
    pub(crate) fn mode(&self) -> CreditMode {
        if self.leases.is_some() { CreditMode::Leased } else { CreditMode::Exact }
    }

    /// Spends `cost` credits of balance `b` (which has credits) from what this process
    /// holds, when that needs no database (leased mode): the balance left as this process
    /// sees it. `None`: call [`spend`](Self::spend).
    pub(crate) fn spend_in_memory(&self, b: &Balance, cost: u32) -> Option<Result<(u64, Spent)>> {
        self.leases.as_ref().and_then(|leases| leases.spend_in_memory(b, cost))
    }

    /// Spends `cost` credits of balance `b` (which has credits), following a roll to the key
    /// that holds a rolled key's balance, for a spend that
    /// [`spend_in_memory`](Self::spend_in_memory) could not answer. Returns the balance left
    /// (`None`: it turned out to have no credits, so nothing was spent), and how to give the
    /// credits back if a later step refuses the check.
    ///
    /// # Errors
    /// [`Error::UsageExhausted`] (with the next refill, if any); [`Error::InvalidKey`] for a
    /// key deleted meanwhile; [`Error::Unavailable`] or [`Error::Storage`].
    pub(crate) async fn spend(&self, b: &Balance, cost: u32) -> Result<(Option<u64>, Spent)> {
        match &self.leases {
            Some(leases) => leases.spend(b, cost).await,
            None => Box::pin(spend_exact_balance(&self.writer, b, i64::from(cost))).await,
        }
    }

    /// Gives back `cost` credits a spend of `b` took (`spent` says from where), for a check
    /// a later step refused: to the lease they came from, or with one statement to the same
    /// balance (the record unchanged, in the same refill period), in a task of its own so
    /// that a caller that gives up meanwhile does not leave them spent. A failure is logged:
    /// the credits stay spent.
    pub(crate) async fn give_back(&self, b: &Balance, spent: Spent, cost: u32) {
        match spent {
            Spent::Nothing => {}
            Spent::Held(block) => {
                if let Some(leases) = &self.leases {
                    leases.untake(b, block, cost);
                }
            }
            Spent::Row(reserved) => {
                let writer = self.writer.clone();
                let give = self.runtime.spawn(async move {
                    if let Err(e) = lease::give_back(&writer, u64::from(cost), &reserved).await {
                        tracing::warn!(error = %e, "giving the credits of a refused check back failed; they stay spent");
                    }
                });
                let _ = give.await;
            }
        }
    }

    /// Forgets what this process holds of `key`'s balance (the key changed): not spent,
    /// not given back.
    pub(crate) fn forget(&self, key: KeyId) {
        if let Some(leases) = &self.leases {
            leases.forget(key);
        }
    }

    /// Gives back what this process holds unspent (leased mode); returns how many credits.
    pub(crate) async fn release(&self) -> Result<u64> {
        match &self.leases {
            Some(leases) => leases.release().await,
            None => Ok(0),
        }
    }
}

/// Spends `cost` credits of balance `b` in one statement: a key's with
/// [`spend_exact`] (nothing to give back: a key's own credits are spent last); an owner's
/// with the statement that records what a give-back needs.
pub(crate) async fn spend_exact_balance(
    db: &Db,
    b: &Balance,
    cost: i64,
) -> Result<(Option<u64>, Spent)> {
    let row = match b.row {
        Row::Key(key) => return Ok((spend_exact(db, key, cost).await?, Spent::Nothing)),
        Row::Owner(row) => row,
    };
    let owner = Row::Owner(row);
    if let Some(reserved) = lease::reserve_on(db, owner, cost, std::time::Instant::now()).await? {
        return Ok((Some(reserved.left), Spent::Row(reserved)));
    }
    match refused(db, owner).await? {
        // The plan lost its credits, or the owner its plan, since the key was read.
        Spend::Unlimited | Spend::Gone => Ok((None, Spent::Nothing)),
        Spend::Exhausted(refill_at) => Err(Error::UsageExhausted { refill_at }),
        Spend::Spent(_) | Spend::Moved(_) => Err(Error::UsageExhausted { refill_at: None }),
    }
}

/// Spends `cost` credits of `key` (which has credits) in one statement, following a roll to
/// the key that holds the balance. Returns the balance left (`None`: the key turned out to
/// have no credits, so nothing was spent).
async fn spend_exact(db: &Db, key: KeyId, cost: i64) -> Result<Option<u64>> {
    let mut target = key;
    for _ in 0..MAX_HOPS {
        match spend_on(db, target, cost).await? {
            Spend::Spent(left) => return Ok(Some(left)),
            Spend::Unlimited => return Ok(None),
            Spend::Exhausted(refill_at) => return Err(Error::UsageExhausted { refill_at }),
            Spend::Moved(next) => target = next,
            // The key itself: deleted while this check ran. A successor: the balance went
            // with it.
            Spend::Gone if target == key => return Err(Error::InvalidKey),
            Spend::Gone => return Err(Error::UsageExhausted { refill_at: None }),
        }
    }
    Err(Error::UsageExhausted { refill_at: None })
}

/// One spend statement on `key`'s own row, and if it refused, why.
async fn spend_on(db: &Db, key: KeyId, cost: i64) -> Result<Spend> {
    let backend = db.get_database_backend();
    let stmt = statement(backend, Row::Key(key), cost, false);
    let spent = if backend == DbBackend::MySql {
        let res = db.execute_raw(stmt).await.map_err(storage)?;
        (res.rows_affected() == 1).then(|| res.last_insert_id())
    } else {
        let row = db.query_one_raw(stmt).await.map_err(storage)?;
        match row {
            Some(row) => {
                let left: i64 = row.try_get("", "remaining").map_err(storage)?;
                Some(u64::try_from(left).unwrap_or(0))
            }
            None => None,
        }
    };
    if let Some(left) = spent {
        return Ok(Spend::Spent(left));
    }
    refused(db, Row::Key(key)).await
}

/// Why a spend on `row` was refused: read with the database's current period.
async fn refused(db: &Db, row: Row) -> Result<Spend> {
    let backend = db.get_database_backend();
    let month = period_sql(backend, RefillInterval::Month);
    let day = period_sql(backend, RefillInterval::Day);
    let rolled_to = match row {
        Row::Key(_) => "rolled_to",
        Row::Owner(_) => "NULL AS rolled_to",
    };
    let mut p = Params { backend, values: Vec::new() };
    let sql = format!(
        "SELECT remaining, {rolled_to}, refill_amount, refill_interval, refilled_period, \
         {month} AS cur_month, {day} AS cur_day FROM {} WHERE id = {}",
        row.table(),
        p.p(row.id())
    );
    let stmt = Statement::from_sql_and_values(backend, sql, p.values);
    let Some(read) = db.query_one_raw(stmt).await.map_err(storage)? else {
        return Ok(Spend::Gone);
    };
    let get = |e| storage(e);
    let remaining: Option<i64> = read.try_get("", "remaining").map_err(get)?;
    let rolled_to: Option<uuid::Uuid> = read.try_get("", "rolled_to").map_err(get)?;
    let refill_amount: Option<i64> = read.try_get("", "refill_amount").map_err(get)?;
    let interval: Option<String> = read.try_get("", "refill_interval").map_err(get)?;
    let refilled: Option<i64> = read.try_get("", "refilled_period").map_err(get)?;
    let month: i64 = read.try_get("", "cur_month").map_err(get)?;
    let day: i64 = read.try_get("", "cur_day").map_err(get)?;
    Ok(match (remaining, rolled_to, refill_amount) {
        (None, _, _) => Spend::Unlimited,
        (Some(0), Some(next), None) => Spend::Moved(KeyId::from_uuid(next)),
        _ => {
            let interval = interval.as_deref().and_then(RefillInterval::from_name);
            let refill_at = interval.and_then(|i| {
                let cur = match i {
                    RefillInterval::Month => month,
                    RefillInterval::Day => day,
                };
                let last = refilled.unwrap_or(i64::MIN).max(cur);
                i.start(last.saturating_add(1))
            });
            Spend::Exhausted(refill_at)
        }
    })
}

/// Sets the period `row`'s balance was last set in to the database's current period of
/// `interval` (a refill starts with the next one), on `conn`: for a balance set with a
/// refill rule.
pub(crate) async fn stamp_refill_period<C: ConnectionTrait>(
    conn: &C,
    row: Row,
    interval: RefillInterval,
) -> Result<()> {
    let backend = conn.get_database_backend();
    let mut p = Params { backend, values: Vec::new() };
    let sql = format!(
        "UPDATE {} SET refilled_period = {} WHERE id = {}",
        row.table(),
        period_sql(backend, interval),
        p.p(row.id())
    );
    let stmt = Statement::from_sql_and_values(backend, sql, p.values);
    conn.execute_raw(stmt).await.map_err(storage)?;
    Ok(())
}
