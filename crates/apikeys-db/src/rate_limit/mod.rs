//! Per-key rate limits: exact shared counters in the database (or in Redis, with the
//! feature `redis`: see [`ClientBuilder::redis`](crate::ClientBuilder::redis)), or
//! in-process `governor`.
//!
//! # Layout
//! One file per mode, each with only its own state: `shared` (one unit per check), `lease`
//! (blocks reserved ahead, the same for every store) with `lease_sql` (its SQL statements),
//! `local` (governor), and `redis` (the Redis store); `store` is the seam between the modes
//! and the stores (the `WindowStore` trait: count a unit, reserve blocks, give back,
//! purge), so Redis keeps SQL's invariants by running the same lease code.
//!
//! # One clock for every replica
//! In shared mode the window a request falls in is decided by the database's clock, inside
//! the counting statement (PostgreSQL `clock_timestamp()`, MySQL/MariaDB `NOW(3)`). Replicas
//! whose own clocks differ by seconds or minutes therefore count in the same row. SQLite is a
//! file on one host, so its clock is that host's system clock (read by the process, never the
//! client's injected [`Clock`]), which every process opening the file shares.
//!
//! # Check and count in one statement
//! The counting statement is a conditional upsert: it creates the window's row at 1, or adds
//! one only while the count is below the key's *current* limit. A refused request changes
//! nothing, a limit raised mid-window admits up to the new limit at once, and a lowered one
//! refuses at once.
//!
//! # One budget per lineage
//! A rolled key keeps working for its grace period beside the key it was rolled to; the two
//! (and any later successor) share one budget. A key's requests count in the windows of its
//! lineage's newest key: its own for a key never rolled; for a rolled key, the key stored
//! in its `lineage_head_id` (read with one more indexed read per check, in the shared and
//! leased modes). A roll copies the old key's window counts to the new key, in the roll's
//! transaction, so the lineage's window goes on from where it was; the delete of a lineage's
//! newest key hands its counts and its place to the newest key left. So whoever holds a
//! leaked key after a roll shares the new key's budget, never gets one of its own. Bounds:
//! checks of the old key in flight during the roll (and, with the verified-key cache, those
//! a replica makes before its cache learns of the roll, within the cache's staleness bound)
//! count in the old key's own window. [`RateLimitMode::Local`] does no I/O, so there a
//! rolled key counts in the limiter of the key it was rolled to.

mod lease;
mod lease_sql;
mod lineage;
mod local;
#[cfg(feature = "redis")]
mod redis;
mod shared;
mod store;
mod window;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use apikeys_core::{ApiKey, Error, KeyId, OrgId, RateLimit, RateLimits, Result, Window};
use sea_orm::{EntityTrait, QuerySelect};

use crate::breaker::Db;
use crate::clock::Clock;
use crate::entity::api_key;
use crate::error::storage;
use crate::lock::lock;
use lease::Leases;
pub(crate) use lineage::{hand_over_lineage, merge_windows};
use local::LocalLimiters;
#[cfg(feature = "redis")]
pub(crate) use redis::RedisWindows;
pub(crate) use store::{Counter, SqlWindows, WindowRef, WindowStore, Windows};
use window::{Count, window_ends};

/// How per-key rate limits are counted.
///
/// `Shared` and `Leased` count in the SQL database by default, or in Redis/Valkey with
/// `ClientBuilder::redis` (cargo feature `redis`) (the same guarantees, by Redis's clock; what a
/// Redis restart or failover can lose is said there and in the guide, "Many replicas").
///
/// | mode | exact across replicas | cost per check | algorithm |
/// |---|---|---|---|
/// | `Shared` | yes, whatever the replicas' clocks say | one atomic upsert | fixed window, database clock |
/// | `Leased` | yes (never more than the limit; see below) | one upsert per block of units | fixed window, database clock |
/// | `Local` | no: each process counts alone | no I/O | GCRA (`governor`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RateLimitMode {
    /// Counters in the database (`rate_limit_windows`): one conditional upsert per check,
    /// exact however many tasks, processes and replicas share the database and however far
    /// apart their clocks are. Windows are fixed, aligned to the Unix epoch (UTC) by the
    /// database's clock.
    #[default]
    Shared,
    /// `Shared`, with units reserved ahead in blocks: one conditional upsert reserves a
    /// block of the window's units, which this process then admits from memory, and the
    /// next block is reserved in the background once half of the current one is spent.
    /// Across all processes no window ever admits more than the limit. A block covers the
    /// rest of the window at the key's observed rate (at most `limit / 16` units, and at
    /// most 16 384); only a key's first check after it was idle waits for the database.
    /// Reservations asked for together (many keys' first checks) share a statement.
    ///
    /// The trade-off: one process may refuse while another still holds units, so a window
    /// can end with the units held by all processes unspent (each at most a block and a
    /// half, `1.5 × limit / 16`: with 11 processes or more that can be the whole limit).
    /// Units held for the current window are given back by
    /// [`ApiKeyClient::shutdown`](crate::ApiKeyClient::shutdown); those of a process that
    /// dies are lost with it, until its window ends.
    Leased,
    /// Counters in this process (`governor`, GCRA, on the client's clock): no database
    /// write, but N replicas admit up to N times the limit, and a burst of `requests` is
    /// followed by an even refill of one request every `window / requests`.
    Local,
}

/// Every this many checks, a limiter sweeps: ended window rows in the database (in the
/// background) and entries of its in-process maps that no longer change any answer.
const SWEEP_EVERY: u64 = 4_096;

/// How long a refusal is repeated from memory at most (never past its window's end): a
/// window's count can fall back, when checks that another limit or the credits refused give
/// their units back, so a full window is asked again after this long.
const REFUSAL_MEMO: std::time::Duration = std::time::Duration::from_secs(1);

/// A key known to be over its limit: a check of `cost` units or more is refused without a
/// round trip until `until` (this process's monotonic clock, never after the window's end),
/// as long as its limit is still `limit`; such a refusal's `retry_after` runs to `retry_at`
/// (never before the end).
#[derive(Debug, Clone, Copy)]
struct Refusal {
    limit: RateLimit,
    cost: u32,
    until: Instant,
    retry_at: Instant,
}

/// What a check took from a limit, for a give-back if a later step refuses the check (its
/// credits ran out): a refused check spends nothing.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub(crate) enum Taken {
    /// Nothing to give back: no limit counted, or the local mode (whose GCRA state cannot
    /// take units back).
    Nothing,
    /// Units of this process's lease of `key`'s window.
    Lease { key: KeyId, limit: RateLimit, window: WindowRef, units: u32 },
    /// Units counted in the shared store's window.
    Window { counter: Counter, limit: RateLimit, window: WindowRef, units: u32 },
}

/// Counts requests against per-key limits. Owns its connection handle, store and clock; the
/// client composes it.
pub(crate) struct RateLimiter {
    /// Reads a rolled key's lineage.
    db: Db,
    /// Where shared windows are counted (shared and leased modes).
    store: Windows,
    mode: RateLimitMode,
    /// Shared mode: keys whose window is full. An entry only repeats what the database
    /// answered, for a second at most ([`REFUSAL_MEMO`]) and never past that window's end; a
    /// different limit (the key was updated) or a larger cost bypasses it.
    over_limit: Mutex<HashMap<KeyId, Refusal>>,
    checks: AtomicU64,
    /// Local mode: counters in this process, on the client's clock (shared and leased
    /// modes use the database's).
    local: LocalLimiters,
    /// Leased mode: the units this process holds.
    leases: Arc<Leases>,
    /// Where background purges run: the runtime the client was built on.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("mode", &self.mode)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub(crate) fn new(
        db: Db,
        store: Windows,
        mode: RateLimitMode,
        clock: Clock,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            leases: Arc::new(Leases::new(store.clone(), runtime.clone())),
            runtime,
            db,
            store,
            mode,
            over_limit: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            local: LocalLimiters::new(clock),
        }
    }

    pub(crate) fn mode(&self) -> RateLimitMode {
        self.mode
    }

    /// Counts a check; true once every [`SWEEP_EVERY`] checks.
    fn sweep_due(&self) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1
    }

    /// Forgets what this process knows about `key` (its limit or its existence changed).
    pub(crate) fn forget(&self, key: KeyId) {
        lock(&self.over_limit).remove(&key);
        self.local.forget(key);
        self.leases.forget(key);
    }

    /// After a roll (`from` rolled to `to`) or the delete of a lineage's newest key `from`
    /// (its budget handed to `to`), made by this client: with Redis, `to` takes `from`'s
    /// current windows over now (SQL did so in the change's transaction). A check takes a
    /// key's direct predecessor's windows over by itself too, so this matters for a chain
    /// of rolls, or a delete, before any check; a failure is logged and the change stands.
    pub(crate) async fn take_over(&self, org: OrgId, from: KeyId, to: KeyId, limits: &RateLimits) {
        #[cfg(feature = "redis")]
        if let Windows::Redis(redis) = &self.store {
            let named = limits
                .iter()
                .map(|(n, l)| (named_counter(from, n, l.window), named_counter(to, n, l.window)));
            for (from, to) in std::iter::once((from, to)).chain(named) {
                if let Err(e) = redis.take_over(org, from, to).await {
                    tracing::warn!(
                        error = %e,
                        from = %from,
                        to = %to,
                        "Redis was out of reach: the windows of a rolled or deleted key were not handed on"
                    );
                    return;
                }
            }
        }
        #[cfg(not(feature = "redis"))]
        let _ = (org, from, to, limits);
    }

    /// Gives the units leased for current windows back (leased mode); returns how many.
    pub(crate) async fn release(&self) -> Result<u64> {
        self.leases.release().await
    }

    /// Counts a request of `cost` units (at least one) of `key` against `limit` when that
    /// needs no database: the local mode, units of a lease this process holds, a window
    /// known to be full. `None`: it needs the database, through [`check`](Self::check).
    /// Every check passes here once, and counts toward the limiter's sweep.
    ///
    /// A synchronous step of its own so that a check answered from memory awaits nothing
    /// (its future stays small: no database future to build, move and drop).
    ///
    /// # Errors
    /// [`Error::Quota`] when the window has fewer than `cost` units left, or `cost` is above
    /// the limit (nothing is counted then).
    pub(crate) fn check_in_memory(
        &self,
        key: &ApiKey,
        limit: RateLimit,
        cost: NonZeroU32,
        name: Option<&str>,
    ) -> Option<Result<Taken>> {
        let sweep = self.sweep_due();
        if cost > limit.requests {
            // Never admitted, in any window.
            let retry_after = limit.window.duration();
            return Some(Err(Error::Quota { retry_after, limit, name: None }));
        }
        match self.mode {
            RateLimitMode::Local => {
                let key = counter_id(key.rolled_to.unwrap_or(key.id), name, limit);
                Some(self.local.check(key, limit, cost, sweep).map(|()| Taken::Nothing))
            }
            RateLimitMode::Shared | RateLimitMode::Leased => {
                let now = Instant::now();
                if sweep {
                    self.sweep_in_background(now);
                }
                // A rolled key counts in its lineage's windows: found with a read.
                if key.rolled_to.is_some() {
                    return None;
                }
                self.shared_in_memory(counter_id(key.id, name, limit), limit, cost.get(), now)
            }
        }
    }

    /// [`check_in_memory`](Self::check_in_memory) of the limit named `name` of an owner's
    /// plan (row `row`), which every key of the owner shares: counted under its own counter
    /// id, with no lineage (a roll keeps the owner).
    pub(crate) fn owner_in_memory(
        &self,
        row: uuid::Uuid,
        name: &str,
        limit: RateLimit,
        cost: NonZeroU32,
    ) -> Option<Result<Taken>> {
        let sweep = self.sweep_due();
        if cost > limit.requests {
            let retry_after = limit.window.duration();
            return Some(Err(Error::Quota { retry_after, limit, name: None }));
        }
        let id = named_counter(KeyId::from_uuid(row), name, limit.window);
        match self.mode {
            RateLimitMode::Local => {
                Some(self.local.check(id, limit, cost, sweep).map(|()| Taken::Nothing))
            }
            RateLimitMode::Shared | RateLimitMode::Leased => {
                let now = Instant::now();
                if sweep {
                    self.sweep_in_background(now);
                }
                self.shared_in_memory(id, limit, cost.get(), now)
            }
        }
    }

    /// [`check`](Self::check) of an owner's limit, for a check that
    /// [`owner_in_memory`](Self::owner_in_memory) could not answer.
    ///
    /// # Errors
    /// [`Error::Quota`]; [`Error::Unavailable`] or [`Error::Storage`].
    pub(crate) async fn check_owner(
        &self,
        org: OrgId,
        row: uuid::Uuid,
        name: &str,
        limit: RateLimit,
        cost: NonZeroU32,
    ) -> Result<Taken> {
        let id = named_counter(KeyId::from_uuid(row), name, limit.window);
        match self.mode {
            RateLimitMode::Local => {
                self.local.check(id, limit, cost, false).map(|()| Taken::Nothing)
            }
            RateLimitMode::Shared | RateLimitMode::Leased => {
                let counter = Counter { key: id, org, take_over: [None, None], named: true };
                self.check_shared(counter, limit, cost.get()).await
            }
        }
    }

    /// Counts a request of `cost` units of `key` against `limit`, in the windows of its
    /// lineage (see the module docs: a rolled key shares its successors' budget), for a
    /// check that [`check_in_memory`](Self::check_in_memory) could not answer.
    ///
    /// # Errors
    /// [`Error::Quota`] when the window has fewer than `cost` units left (nothing is counted
    /// then); [`Error::InvalidKey`] when the key was deleted meanwhile;
    /// [`Error::Unavailable`] or [`Error::Storage`] when the database fails.
    pub(crate) async fn check(
        &self,
        key: &ApiKey,
        limit: RateLimit,
        cost: NonZeroU32,
        name: Option<&str>,
    ) -> Result<Taken> {
        match self.mode {
            RateLimitMode::Shared | RateLimitMode::Leased => {
                let head = self.lineage_head(key).await?;
                match self.check_shared(counter(key, head, name, limit), limit, cost.get()).await {
                    // The lineage's newest key was deleted after it was read (its keys were
                    // handed to another in the same transaction): count this one alone.
                    Err(Error::InvalidKey) if head != key.id => {
                        let alone = counter(key, key.id, name, limit);
                        self.check_shared(alone, limit, cost.get()).await
                    }
                    other => other,
                }
            }
            // Answered in memory, always.
            RateLimitMode::Local => {
                let key = counter_id(key.rolled_to.unwrap_or(key.id), name, limit);
                self.local.check(key, limit, cost, false).map(|()| Taken::Nothing)
            }
        }
    }

    /// [`give_back`](Self::give_back) of each.
    pub(crate) async fn give_back_all(&self, taken: &[Taken]) {
        for t in taken {
            self.give_back(*t).await;
        }
    }

    /// Gives back what a check took (its credits ran out after it was counted), so that a
    /// refused check spends nothing: units of a lease go back to it in memory, units counted
    /// in the shared store are taken off their window there, if it has not ended. A failed
    /// give-back is logged: the units stay counted (the limit admits less, never more).
    pub(crate) async fn give_back(&self, taken: Taken) {
        match taken {
            Taken::Nothing => {}
            Taken::Lease { key, limit, window, units } => {
                self.leases.untake(key, limit, window, units);
            }
            Taken::Window { counter, limit, window, units } => {
                // The window is no longer known to be full, if it was.
                lock(&self.over_limit).remove(&counter.key);
                if let Err(e) = self.store.give_back(&counter, limit.window, window, units).await {
                    tracing::warn!(
                        key_id = %counter.key,
                        error = %e,
                        "giving rate-limit units of a refused check back failed; they stay counted"
                    );
                }
            }
        }
    }

    /// The key whose windows `key`'s requests count in: its own id, or for a rolled key the
    /// newest key of its lineage (one indexed read; a key rolled by a version before the
    /// lineage was stored counts in the key it was rolled to).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when the key was deleted meanwhile; [`Error::Unavailable`] or
    /// [`Error::Storage`] when the database fails.
    async fn lineage_head(&self, key: &ApiKey) -> Result<KeyId> {
        let Some(next) = key.rolled_to else {
            return Ok(key.id);
        };
        let head: Option<Option<uuid::Uuid>> = api_key::Entity::find_by_id(key.id.as_uuid())
            .select_only()
            .column(api_key::Column::LineageHeadId)
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(storage)?;
        match head {
            None => Err(Error::InvalidKey),
            Some(head) => Ok(head.map_or(next, KeyId::from_uuid)),
        }
    }

    /// What memory says about a request of `cost` units of `key` (the lineage's head)
    /// against `limit`: units of a lease this process holds, or a refusal of a window known
    /// to have fewer left.
    fn shared_in_memory(
        &self,
        key: KeyId,
        limit: RateLimit,
        cost: u32,
        now: Instant,
    ) -> Option<Result<Taken>> {
        if self.mode == RateLimitMode::Leased
            && let Some(window) = self.leases.take(key, limit, cost, now)
        {
            return Some(Ok(Taken::Lease { key, limit, window, units: cost }));
        }
        if let Some(r) = lock(&self.over_limit).get(&key).copied()
            && r.limit == limit
            && cost >= r.cost
            && r.until > now
        {
            let retry_after = r.retry_at.saturating_duration_since(now);
            return Some(Err(Error::Quota { retry_after, limit, name: None }));
        }
        None
    }

    async fn check_shared(&self, counter: Counter, limit: RateLimit, cost: u32) -> Result<Taken> {
        let key = counter.key;
        let asked = Instant::now();
        // Again: a reservation may have landed since, or this is the lineage's head.
        if let Some(answer) = self.shared_in_memory(key, limit, cost, asked) {
            return answer;
        }
        // A check that costs more than a block is counted all or nothing in the store, not
        // leased: a lease would keep what a short grant gave (up to the whole window) while
        // refusing the check, past the bound on what a process holds.
        let leased = self.mode == RateLimitMode::Leased && cost <= lease::cap(limit);
        let counted = if leased {
            Box::pin(self.leases.check(counter, limit, cost)).await
        } else {
            Box::pin(self.store.count(&counter, limit, cost)).await
        };
        match counted? {
            Count::Admitted(window) if leased => {
                Ok(Taken::Lease { key, limit, window, units: cost })
            }
            Count::Admitted(window) => Ok(Taken::Window { counter, limit, window, units: cost }),
            Count::Refused(left) => {
                // The database read its clock between `asked` and now.
                let until = window_ends(asked, left).min(asked + REFUSAL_MEMO);
                let refusal = Refusal { limit, cost, until, retry_at: Instant::now() + left };
                lock(&self.over_limit).insert(key, refusal);
                Err(Error::Quota { retry_after: left, limit, name: None })
            }
        }
    }

    /// Drops refusals whose window has ended and deletes ended window rows off the caller's
    /// path, in a task on the client's runtime.
    fn sweep_in_background(&self, now: Instant) {
        lock(&self.over_limit).retain(|_, r| r.until > now);
        self.leases.sweep(now);
        let store = self.store.clone();
        let purge = async move {
            if let Err(e) = store.purge().await {
                tracing::warn!(error = %e, "rate-limit window purge failed");
            }
        };
        self.runtime.spawn(purge);
    }

    /// Deletes the window rows that ended at least [`PURGE_GRACE`] ago by the database's
    /// clock. Returns the number of rows deleted.
    pub(crate) async fn purge(&self) -> Result<u64> {
        self.store.purge().await
    }
}

/// The windows a request of `key` counts in, given its lineage's newest key `head`: the
/// head's, taking over (Redis, once) the windows of the keys whose budget the head carries
/// on: `key` itself when it was rolled to `head`; for a head, the key it was rolled from and
/// a successor deleted since (see the module docs).
fn counter(key: &ApiKey, head: KeyId, name: Option<&str>, limit: RateLimit) -> Counter {
    let take_over =
        if head == key.id { [key.rolled_from, key.rolled_to] } else { [Some(key.id), None] };
    let take_over = take_over.map(|k| k.map(|k| counter_id(k, name, limit)));
    let id = counter_id(head, name, limit);
    Counter { key: id, org: key.org_id, take_over, named: name.is_some() }
}

/// The id a limit of `key` counts under: the key's own for its main limit (`None`), else
/// [`named_counter`].
fn counter_id(key: KeyId, name: Option<&str>, limit: RateLimit) -> KeyId {
    name.map_or(key, |name| named_counter(key, name, limit.window))
}

/// The counter id of `key`'s limit named `name` with windows of `window`: the first 16
/// bytes of SHA-256(`apikeys named limit`, key id, window length, name) as a UUID (version
/// 8). Every replica derives the same one, and no key id is ever one (keys' ids are version
/// 7). The window is part of it so that a limit whose window changes counts afresh in rows
/// of its own: rows are keyed by their start, and a day's window starts where an hour's may.
pub(crate) fn named_counter(key: KeyId, name: &str, window: Window) -> KeyId {
    let (key, window) = (key.as_uuid(), window.seconds().to_be_bytes());
    let parts: [&[u8]; 3] = [key.as_bytes(), &window, name.as_bytes()];
    KeyId::from_uuid(crate::id::derived(b"apikeys named limit\0", &parts))
}
