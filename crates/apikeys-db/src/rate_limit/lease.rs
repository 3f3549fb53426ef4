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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeys_core::{KeyId, RateLimit, Result};

use super::store::{Ask, Counter, Grant, WindowRef, WindowStore, Windows};
use super::window::{Count, window_ends};
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

/// The largest block for `limit`.
pub(super) fn cap(limit: RateLimit) -> u32 {
    (limit.requests.get() / 16).clamp(1, MAX_BLOCK)
}

/// The units one process holds for one key.
struct Lease {
    /// The windows they were reserved in.
    counter: Counter,
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

/// Where a lease's units were reserved: the windows, the limit, which window.
type Held = (Counter, RateLimit, WindowRef);

/// The leases of one client: the store of its windows, and where background reservations
/// run.
pub(crate) struct Leases {
    store: Windows,
    runtime: tokio::runtime::Handle,
    map: Mutex<HashMap<KeyId, Lease>>,
    /// Reservations waiting for the next batch.
    queue: Mutex<Queue>,
}

/// Reservations asked for while a batch statement runs: they go in the next one.
#[derive(Default)]
struct Queue {
    asks: Vec<Waiting>,
    /// A task is sending batches.
    sending: bool,
}

/// One key's reservation, waiting in the [`Queue`].
struct Waiting {
    ask: Ask,
    reply: tokio::sync::oneshot::Sender<Result<Grant>>,
}

impl Leases {
    pub(crate) fn new(store: Windows, runtime: tokio::runtime::Handle) -> Self {
        Self { store, runtime, map: Mutex::new(HashMap::new()), queue: Mutex::default() }
    }

    /// Reserves up to `block` units of `counter`'s current window. The reservations asked
    /// for while one batch runs go together in the next (see
    /// [`WindowStore::reserve_many`]): under load, one statement (on MySQL, one transaction)
    /// serves many keys, and no reservation waits for more than the batch before it.
    async fn reserve(
        self: &Arc<Self>,
        counter: Counter,
        limit: RateLimit,
        block: u32,
    ) -> Result<Grant> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = lock(&self.queue);
            queue.asks.push(Waiting { ask: (counter, limit, block), reply });
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
                for waiting in queue.asks.drain(..) {
                    if batch.len() < MAX_BATCH && seen.insert(waiting.ask.0.key) {
                        batch.push(waiting);
                    } else {
                        rest.push(waiting);
                    }
                }
                queue.asks = rest;
                batch
            };
            let asks: Vec<Ask> = batch.iter().map(|w| w.ask).collect();
            let grants = self.store.reserve_many(&asks).await;
            for (waiting, grant) in batch.into_iter().zip(grants) {
                waiting.reply.send(grant).ok();
            }
        }
    }

    /// Takes `cost` units of `key`'s lease if it holds that many for `limit` in a window not
    /// ended, and names that window; starts a background reservation when the lease runs
    /// low, and schedules the next window's first block for a key active in this one.
    pub(crate) fn take(
        self: &Arc<Self>,
        key: KeyId,
        limit: RateLimit,
        cost: u32,
        now: Instant,
    ) -> Option<WindowRef> {
        let (counter, window, ahead) = {
            let mut map = lock(&self.map);
            let l = map.get_mut(&key)?;
            if l.limit != limit || l.until <= now || l.remaining < cost {
                return None;
            }
            l.remaining -= cost;
            (l.counter, l.window, l.took(cost))
        };
        self.reserve_ahead(counter, limit, ahead);
        Some(window)
    }

    /// Puts `units` taken from `key`'s lease in `window` back, for a check refused after it
    /// took them (its credits ran out): if the lease still holds that window and limit. Units
    /// of a window that has ended are gone with it.
    pub(crate) fn untake(&self, key: KeyId, limit: RateLimit, window: WindowRef, units: u32) {
        let now = Instant::now();
        if let Some(l) = lock(&self.map).get_mut(&key)
            && l.limit == limit
            && l.window == window
            && l.until > now
        {
            l.remaining = l.remaining.saturating_add(units);
            l.taken = l.taken.saturating_sub(units);
        }
    }

    /// Counts a request of `cost` units against `limit` in `counter`'s windows by reserving
    /// a block (one round trip), for a caller whose [`take`](Self::take) found too few units.
    /// Waits for a reservation of this key already under way in this process first (a
    /// background refill), then takes from it. Refused when the lease, with what the store
    /// granted, still holds fewer than `cost` units (those it holds stay for cheaper checks).
    pub(crate) async fn check(
        self: &Arc<Self>,
        counter: Counter,
        limit: RateLimit,
        cost: u32,
    ) -> Result<Count> {
        let key = counter.key;
        let reserving = {
            let mut map = lock(&self.map);
            let entry = map.entry(key).or_insert_with(|| Lease::empty(counter, limit));
            Arc::clone(&entry.reserving)
        };
        let _turn = reserving.lock().await;
        if let Some(window) = self.take(key, limit, cost, Instant::now()) {
            return Ok(Count::Admitted(window));
        }
        let asked = Instant::now();
        let block = {
            let mut map = lock(&self.map);
            let lease = map.entry(key).or_insert_with(|| Lease::empty(counter, limit));
            // Enough for this check with what is held (held units of an ended window or
            // another limit are dropped when the grant lands).
            let held =
                if lease.limit == limit && lease.until > asked { lease.remaining } else { 0 };
            lease.next_block(limit, asked, Purpose::Check).max(cost.saturating_sub(held))
        };
        // In a task of its own: a caller that gives up (a timeout, a client gone) must not
        // drop a reservation the database may already have committed before its grant is
        // recorded, or those units would be neither spent nor given back.
        let leases = Arc::clone(self);
        let reservation = self
            .runtime
            .spawn(async move { leases.reserve_block(counter, limit, block, asked, cost).await });
        match reservation.await {
            Ok(Ok((Grant::Refused(left), _))) => Ok(Count::Refused(left)),
            Ok(Ok((Grant::Units { window, .. }, true))) => Ok(Count::Admitted(window)),
            Ok(Ok((Grant::Units { left, .. }, false))) => Ok(Count::Refused(left)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(apikeys_core::Error::unavailable(e)),
        }
    }

    /// Starts what [`Lease::took`] asked for.
    fn reserve_ahead(self: &Arc<Self>, counter: Counter, limit: RateLimit, ahead: Ahead) {
        if ahead.refill {
            self.spawn_reservation(counter, limit, Purpose::Refill, None);
        }
        if let Some((window, over_by)) = ahead.next_window {
            self.spawn_reservation(counter, limit, Purpose::NextWindow(window), Some(over_by));
        }
    }

    /// Reserves `block` units (the caller holds the key's reservation lock), asked at
    /// `asked`, and adds the grant to the lease; then `take` units of it (none: 0) are taken
    /// for the caller if the lease holds that many. Answers the grant and whether they were.
    async fn reserve_block(
        self: &Arc<Self>,
        counter: Counter,
        limit: RateLimit,
        block: u32,
        asked: Instant,
        take: u32,
    ) -> Result<(Grant, bool)> {
        let grant = self.reserve(counter, limit, block).await?;
        let answered = Instant::now();
        if let Grant::Units { granted, added, left, window } = grant {
            let ahead = {
                let mut map = lock(&self.map);
                let lease = map.entry(counter.key).or_insert_with(|| Lease::empty(counter, limit));
                lease.counter = counter;
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
                if take > 0 && lease.remaining >= take {
                    lease.remaining -= take;
                    Some(lease.took(take))
                } else {
                    None
                }
            };
            let taken = ahead.is_some();
            if let Some(ahead) = ahead {
                self.reserve_ahead(counter, limit, ahead);
            }
            return Ok((grant, taken));
        }
        Ok((grant, false))
    }

    /// Runs a background reservation of `counter`'s next block, after `at` if given.
    fn spawn_reservation(
        self: &Arc<Self>,
        counter: Counter,
        limit: RateLimit,
        purpose: Purpose,
        at: Option<Instant>,
    ) {
        let key = counter.key;
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
                Some(block) => {
                    leases.reserve_block(counter, limit, block, asked, 0).await.map(drop)
                }
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

    /// Forgets `key`'s lease (its limit or its existence changed): what it added to its
    /// window and did not admit is given back in the background, as on shutdown (a key
    /// updated mid-window, its limit unchanged, loses none of its units).
    pub(crate) fn forget(&self, key: KeyId) {
        let Some(l) = lock(&self.map).remove(&key) else { return };
        let added = l.remaining.saturating_add(l.excess);
        if added == 0 || l.until <= Instant::now() {
            return;
        }
        let store = self.store.clone();
        self.runtime.spawn(async move {
            if let Err(e) = store.give_back(&l.counter, l.limit.window, l.window, added).await {
                tracing::debug!(key_id = %key, error = %e, "giving a forgotten lease back failed");
            }
        });
    }

    /// Drops leases whose window has ended.
    pub(crate) fn sweep(&self, now: Instant) {
        lock(&self.map).retain(|_, l| l.until > now || Arc::strong_count(&l.reserving) > 1);
    }

    /// Gives back to the store what this process's leases added to current windows and
    /// did not admit: the granted units not spent, and the excess of a reservation past the
    /// limit. Reservations under way land first (see [`release_each`]). Returns
    /// how many granted units went back.
    pub(crate) async fn release(&self) -> Result<u64> {
        let now = Instant::now();
        let take = |l: Lease| {
            ((l.remaining > 0 || l.excess > 0) && l.until > now).then_some((
                (l.counter, l.limit, l.window),
                l.remaining,
                l.excess,
            ))
        };
        let give = |_, ((counter, limit, window), units, excess): (Held, u32, u32)| async move {
            let added = units.saturating_add(excess);
            self.store.give_back(&counter, limit.window, window, added).await?;
            Ok(u64::from(units))
        };
        release_each(&self.map, |l| &l.reserving, take, give).await
    }
}

impl Lease {
    fn empty(counter: Counter, limit: RateLimit) -> Self {
        let now = Instant::now();
        Self {
            counter,
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

    /// Counts `units` just taken; says what to reserve ahead.
    fn took(&mut self, units: u32) -> Ahead {
        self.taken = self.taken.saturating_add(units);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn counter() -> Counter {
        let nil = uuid::Uuid::nil();
        Counter::alone(KeyId::from_uuid(nil), apikeys_core::OrgId::from_uuid(nil))
    }

    fn limit(n: u32) -> RateLimit {
        RateLimit {
            requests: NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN),
            window: apikeys_core::Window::Minute,
        }
    }

    #[test]
    fn blocks_cover_the_observed_rate() {
        let l = limit(100_000);
        let mut lease = Lease::empty(counter(), l);
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
        let mut hot = Lease::empty(counter(), huge);
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
