//! Usage credits: the atomic spend on the hot path, with the lazy refill.
//!
//! One conditional `UPDATE` spends `cost` credits of a key, after refilling its balance if a
//! new period (UTC day or month, by the client's clock) has begun since the last refill: the
//! refill and the spend are one statement, so concurrent checks on every replica spend
//! exactly the balance and refill exactly once per period (the stored period only moves
//! forward; a replica whose clock is behind sees it already refilled).

use apikeys_core::{ApiKey, Error, KeyId, RefillInterval, Result};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::client::ApiKeyClient;
use crate::entity::api_key;
use crate::error::storage;
use sea_orm::EntityTrait;

/// How many rolled keys a spend follows to find the balance (old → new → newer …).
const MAX_HOPS: usize = 8;

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

/// A statement's parameters, numbered as its backend wants them.
struct Params {
    backend: DbBackend,
    values: Vec<Value>,
    month: i64,
    day: i64,
}

impl Params {
    fn p(&mut self, v: impl Into<Value>) -> String {
        self.values.push(v.into());
        match self.backend {
            DbBackend::Postgres => format!("${}", self.values.len()),
            _ => "?".to_owned(),
        }
    }

    /// The current period of the row's refill interval.
    fn cur(&mut self) -> String {
        let (m, d) = (self.p(self.month), self.p(self.day));
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

/// The spend statement for `backend`.
fn statement(backend: DbBackend, key: KeyId, cost: u32, now: DateTime<Utc>) -> Statement {
    let mut p = Params {
        backend,
        values: Vec::new(),
        month: RefillInterval::Month.period(now),
        day: RefillInterval::Day.period(now),
    };
    let cost = i64::from(cost);
    // MySQL assigns left to right, each assignment seeing those before it: `remaining`
    // comes first, so that it reads the old `refilled_period`.
    let spent = format!("{} - {}", p.available(), p.p(cost));
    let spent =
        if backend == DbBackend::MySql { format!("LAST_INSERT_ID({spent})") } else { spent };
    let (due, cur) = (p.due(), p.cur());
    let id = p.p(key.as_uuid());
    let (available, at_least) = (p.available(), p.p(cost));
    let returning = if backend == DbBackend::MySql { "" } else { " RETURNING remaining" };
    let sql = format!(
        "UPDATE api_keys SET remaining = {spent}, \
         refilled_period = CASE WHEN {due} THEN {cur} ELSE refilled_period END \
         WHERE id = {id} AND remaining IS NOT NULL AND {available} >= {at_least}{returning}"
    );
    Statement::from_sql_and_values(backend, sql, p.values)
}

impl ApiKeyClient {
    /// Spends `cost` credits of `key` (which has credits), following a roll to the key that
    /// holds the balance. Sets the balance left on the returned record.
    pub(crate) async fn spend_credits(&self, key: &mut ApiKey, cost: u32) -> Result<()> {
        let now = self.now();
        let mut target = key.id;
        for _ in 0..MAX_HOPS {
            match self.spend_on(target, cost, now).await? {
                Spend::Spent(left) => {
                    if let Some(c) = key.credits.as_mut() {
                        c.remaining = left;
                    }
                    return Ok(());
                }
                Spend::Unlimited => return Ok(()),
                Spend::Exhausted(refill_at) => return Err(Error::UsageExhausted { refill_at }),
                Spend::Moved(next) => target = next,
                // The key itself: deleted while this check ran. A successor: the balance
                // went with it.
                Spend::Gone if target == key.id => return Err(Error::InvalidKey),
                Spend::Gone => return Err(Error::UsageExhausted { refill_at: None }),
            }
        }
        Err(Error::UsageExhausted { refill_at: None })
    }

    async fn spend_on(&self, key: KeyId, cost: u32, now: DateTime<Utc>) -> Result<Spend> {
        let db = self.writer();
        let backend = db.get_database_backend();
        let stmt = statement(backend, key, cost, now);
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
        // Refused, or nothing to spend from: read why.
        let Some(row) =
            api_key::Entity::find_by_id(key.as_uuid()).one(db).await.map_err(storage)?
        else {
            return Ok(Spend::Gone);
        };
        Ok(match (row.remaining, row.rolled_to, row.refill_amount) {
            (None, _, _) => Spend::Unlimited,
            (Some(0), Some(next), None) => Spend::Moved(KeyId::from_uuid(next)),
            _ => {
                let interval = row.refill_interval.as_deref().and_then(RefillInterval::from_name);
                let refill_at = interval.and_then(|i| {
                    let last = row.refilled_period.unwrap_or(i64::MIN).max(i.period(now));
                    i.start(last.saturating_add(1))
                });
                Spend::Exhausted(refill_at)
            }
        })
    }
}
