//! Where the windows of shared limits are counted: the seam between the limiter's modes
//! (one unit per check, or leased blocks) and the store that every replica shares (the SQL
//! database, or Redis/Valkey).
//!
//! A store does what must be atomic across replicas, by its own clock: count a unit, reserve
//! a block, give unspent units back. What a process remembers (leases, refill-ahead, known
//! refusals) lives above it, the same for every store, so every store keeps the same
//! invariants: never more units granted in a window than its limit, whatever the replicas'
//! clocks say.

use std::future::Future;
use std::time::Duration;

use apikeys_core::{KeyId, OrgId, RateLimit, Result, Window};

use super::window::Count;
use crate::breaker::Db;

/// Which window a lease's units belong to, as the give-back names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowRef {
    /// Its start (Unix ms): PostgreSQL, SQLite and Redis.
    Start(i64),
    /// Its number modulo 2^15: MySQL, whose statement cannot return more.
    Index(i64),
}

/// What a reservation got.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Grant {
    /// `granted` units for this lease; the store added `added` (at least `granted`) to the
    /// window's count.
    Units { granted: u32, added: u32, left: Duration, window: WindowRef },
    /// The window is full; this long until it ends (the store's clock).
    Refused(Duration),
}

/// The windows a request counts in: those of `key` (the newest key of its lineage), in
/// `org`, after the windows of the keys in `take_over` were added to them (once per key:
/// Redis adds a rolled key's windows to its successor's when it first meets them; SQL did
/// that in the roll's transaction and ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counter {
    pub(crate) key: KeyId,
    pub(crate) org: OrgId,
    pub(crate) take_over: [Option<KeyId>; 2],
    /// A named limit's windows ([`NAMED_TABLE`]; `key` is then the counter id
    /// [`named_counter`](super::named_counter) derives), not the main limit's.
    pub(crate) named: bool,
}

/// The main limits' windows, whose `key_id` is the key's id (its rows go with the key).
pub(crate) const MAIN_TABLE: &str = "rate_limit_windows";
/// The named limits' windows: the same columns, `key_id` holding a counter id derived from
/// the key's id and the limit's name (no foreign key: purged by their end, like the others).
pub(crate) const NAMED_TABLE: &str = "rate_limit_named_windows";

/// `sql`, written for [`MAIN_TABLE`], for [`NAMED_TABLE`] when `named`.
pub(crate) fn in_table(sql: &str, named: bool) -> String {
    if named { sql.replace(MAIN_TABLE, NAMED_TABLE) } else { sql.to_owned() }
}

impl Counter {
    /// The windows of `key` alone.
    #[cfg(test)]
    pub(crate) fn alone(key: KeyId, org: OrgId) -> Self {
        Self { key, org, take_over: [None, None], named: false }
    }
}

/// One key's reservation in a batch: up to `block` units of its current window.
pub(crate) type Ask = (Counter, RateLimit, u32);

/// A store of shared windows, counted by the store's own clock (one clock for every
/// replica). Windows are fixed, aligned to the Unix epoch.
pub(crate) trait WindowStore: Send + Sync {
    /// Counts `cost` units of `counter`'s current window, all or none: only if the count
    /// stays within `limit`.
    fn count(
        &self,
        counter: &Counter,
        limit: RateLimit,
        cost: u32,
    ) -> impl Future<Output = Result<Count>> + Send;

    /// Reserves up to `block` units of each key's current window (none once it is full),
    /// for many keys at once (distinct keys); each gets what it would have got alone, and an
    /// answer of its own, in the order of `asks`.
    fn reserve_many(&self, asks: &[Ask]) -> impl Future<Output = Vec<Result<Grant>>> + Send;

    /// Takes `units` that a lease added to `counter`'s `window` (of length `length`) and did
    /// not admit off its count; a window that has ended is left alone.
    fn give_back(
        &self,
        counter: &Counter,
        length: Window,
        window: WindowRef,
        units: u32,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes what ended windows left behind; returns how many windows.
    fn purge(&self) -> impl Future<Output = Result<u64>> + Send;
}

/// The store a client counts in.
#[derive(Clone)]
pub(crate) enum Windows {
    /// The SQL database (`rate_limit_windows`).
    Sql(SqlWindows),
    /// Redis or Valkey.
    #[cfg(feature = "redis")]
    Redis(super::redis::RedisWindows),
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Windows::Sql(_) => "Sql",
            #[cfg(feature = "redis")]
            Windows::Redis(_) => "Redis",
        })
    }
}

/// Calls the same method on whichever store it is.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Windows::Sql($s) => $call,
            #[cfg(feature = "redis")]
            Windows::Redis($s) => $call,
        }
    };
}

impl WindowStore for Windows {
    async fn count(&self, counter: &Counter, limit: RateLimit, cost: u32) -> Result<Count> {
        each!(self, s => s.count(counter, limit, cost).await)
    }

    async fn reserve_many(&self, asks: &[Ask]) -> Vec<Result<Grant>> {
        each!(self, s => s.reserve_many(asks).await)
    }

    async fn give_back(
        &self,
        counter: &Counter,
        length: Window,
        window: WindowRef,
        units: u32,
    ) -> Result<()> {
        each!(self, s => s.give_back(counter, length, window, units).await)
    }

    async fn purge(&self) -> Result<u64> {
        each!(self, s => s.purge().await)
    }
}

/// The SQL database's windows: `rate_limit_windows`, by the database's clock.
#[derive(Clone)]
pub(crate) struct SqlWindows {
    pub(crate) db: Db,
}

impl WindowStore for SqlWindows {
    async fn count(&self, counter: &Counter, limit: RateLimit, cost: u32) -> Result<Count> {
        super::shared::count(&self.db, counter.key, limit, cost, counter.named).await
    }

    async fn reserve_many(&self, asks: &[Ask]) -> Vec<Result<Grant>> {
        super::lease_sql::reserve_batch(&self.db, asks).await
    }

    async fn give_back(
        &self,
        counter: &Counter,
        length: Window,
        window: WindowRef,
        units: u32,
    ) -> Result<()> {
        super::lease_sql::give_back(&self.db, counter.key, length, window, units, counter.named)
            .await
    }

    async fn purge(&self) -> Result<u64> {
        super::window::purge(&self.db).await.map_err(crate::error::storage)
    }
}
