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

use apikeys_core::{ApiKey, Error, KeyId, RefillInterval, Result};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
    Value,
};

use crate::client::ApiKeyClient;
use crate::entity::api_key;
use crate::error::storage;

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

/// What a refused spend reads: remaining, rolled_to, refill_amount, refill_interval,
/// refilled_period, and the database's current month and day.
type WhyRow = (Option<i64>, Option<uuid::Uuid>, Option<i64>, Option<String>, Option<i64>, i64, i64);

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

/// The spend statement for `backend`.
fn statement(backend: DbBackend, key: KeyId, cost: u32) -> Statement {
    let mut p = Params { backend, values: Vec::new() };
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
        let mut target = key.id;
        for _ in 0..MAX_HOPS {
            match self.spend_on(target, cost).await? {
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

    async fn spend_on(&self, key: KeyId, cost: u32) -> Result<Spend> {
        let db = self.writer();
        let backend = db.get_database_backend();
        let stmt = statement(backend, key, cost);
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
        // Refused, or nothing to spend from: read why, and the database's current period.
        use api_key::Column as C;
        let month = Expr::cust(period_sql(backend, RefillInterval::Month));
        let day = Expr::cust(period_sql(backend, RefillInterval::Day));
        let row: Option<WhyRow> = api_key::Entity::find_by_id(key.as_uuid())
            .select_only()
            .columns([C::Remaining, C::RolledTo, C::RefillAmount, C::RefillInterval])
            .column(C::RefilledPeriod)
            .column_as(month, "cur_month")
            .column_as(day, "cur_day")
            .into_tuple()
            .one(db)
            .await
            .map_err(storage)?;
        let Some((remaining, rolled_to, refill_amount, interval, refilled, month, day)) = row
        else {
            return Ok(Spend::Gone);
        };
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
}

/// Sets the period key `id`'s balance was last set in to the database's current period of
/// `interval` (a refill starts with the next one), on `conn`: for a key created with a
/// refill rule.
pub(crate) async fn stamp_refill_period<C: ConnectionTrait>(
    conn: &C,
    id: KeyId,
    interval: RefillInterval,
) -> Result<()> {
    let period = Expr::cust(period_sql(conn.get_database_backend(), interval));
    api_key::Entity::update_many()
        .col_expr(api_key::Column::RefilledPeriod, period)
        .filter(api_key::Column::Id.eq(id.as_uuid()))
        .exec(conn)
        .await
        .map_err(storage)?;
    Ok(())
}
