//! Redis or Valkey as the store of shared windows ([`ClientBuilder::redis`]).
//!
//! # One script per check or per block, by Redis's clock
//! A key's windows are one Redis hash, `apikeys:{<organization>}:k:<key>`: per window length
//! `len` (ms), the field `w<len>` holds the current window's start and `c<len>` its count.
//! One Lua script, run atomically by the server, reads the server's clock (`TIME`, one clock
//! for every replica), works out the window, and grants `min(wanted, limit - count)` units
//! while the count is below the limit, adding exactly what it grants: one unit for a check
//! (the shared mode), a block for a lease (the leased mode, with the same refill-ahead and
//! give-back as SQL). So across all replicas a window never grants more than its limit,
//! whatever their clocks say, as in SQL.
//!
//! # One primary, keys ready for a cluster
//! The client speaks to one primary (no Cluster or Sentinel client yet). The hash tag is the
//! organization: every key of an organization (so a key and the keys it was rolled from,
//! and later an owner's) would live in one slot of a Redis Cluster, and a script touching
//! several of them would stay in that slot.
//!
//! # Lineage
//! A roll, or the delete of a lineage's newest key, made by a client that counts in Redis
//! hands the windows on at once ([`RedisWindows::take_over`], once per key, marked in the
//! receiving hash), as SQL does in the change's transaction. A check also takes over its
//! key's direct predecessor's windows (and those of a successor deleted since) when it first
//! meets them, so a roll made by a client without Redis is followed one step.
//!
//! # A window never goes back
//! A hash already counting in a later window than Redis's clock says (the clock stepped
//! back; a failover to a host whose clock is behind) goes on counting in that window.
//!
//! # No eviction
//! An evicted hash would start its windows again at 0: [`RedisWindows::connect`] refuses a
//! Redis whose `maxmemory-policy` is not `noeviction`.
//!
//! # Fails closed
//! Every call has the client's statement timeout. A call that cannot reach Redis fails with
//! [`Error::Unavailable`] and opens a breaker: until a background `PING` on a connection of
//! its own answers (every reconnect interval), every check that needs Redis fails at once
//! with `Unavailable`; none is admitted. A call unanswered in time also fails with
//! `Unavailable`; the connection it used is replaced, and the breaker opens if such a
//! `PING` gets no answer either. A script that timed out may have counted: that can only
//! refuse early, never admit more.
//!
//! # What Redis can lose
//! Redis persists asynchronously and replicates asynchronously. A restart without
//! persistence, or a failover to a replica that had not yet received the last writes, loses
//! the counts of the current windows (all of them, or those of the last replication lag):
//! each key may then admit up to one more limit in that window. SQL's windows do not have
//! this bound; it is the price of taking the primary off the path.
//!
//! [`ClientBuilder::redis`]: crate::ClientBuilder::redis
//! [`Error::Unavailable`]: apikeys_core::Error::Unavailable

use std::fmt;
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use apikeys_core::{Error, KeyId, OrgId, RateLimit, Result, Window};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};

use super::store::{Ask, Counter, Grant, WindowRef, WindowStore};
use super::window::{Count, left_ms};
use crate::breaker::{Breaker, Reach};
use crate::redis_conn::{self, NoAnswer};

/// How long a key's hash outlives the end of the window last counted in it: a rolled key's
/// windows are taken over by its successor until then.
const KEEP_MS: i64 = 60_000;

/// What [`TAKE`] and [`MERGE`] share: Redis's clock, the window a length is in, and the
/// take-over of another hash's current windows, once (marked `m<name>` in `dest`).
///
/// A window never goes back: if the hash already counts in a window that starts later than
/// the clock says (Redis's clock stepped back, or a failover moved to a host whose clock is
/// behind), requests count in that later window, never in an earlier one started afresh.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function window(h, len)
  local start = now - (now % len)
  local stored = tonumber(redis.call('HGET', h, 'w' .. len))
  if stored and stored > start then return stored end
  return start
end
local function current(h, len, start)
  if tonumber(redis.call('HGET', h, 'w' .. len)) == start then
    return tonumber(redis.call('HGET', h, 'c' .. len)) or 0
  end
  return 0
end
local function add(dest, len, start, n)
  local wf = 'w' .. len
  if tonumber(redis.call('HGET', dest, wf)) ~= start then
    redis.call('HSET', dest, wf, string.format('%d', start), 'c' .. len, 0)
  end
  redis.call('HINCRBY', dest, 'c' .. len, n)
end
local function take_over(dest, src, marker)
  if redis.call('HSETNX', dest, 'm' .. marker, 1) == 0 then return end
  local fields = redis.call('HGETALL', src)
  for j = 1, #fields, 2 do
    local name = fields[j]
    local len = string.sub(name, 1, 1) == 'w' and tonumber(string.sub(name, 2))
    if len and len > 0 then
      local start = window(dest, len)
      local n = current(src, len, start)
      if n > 0 then add(dest, len, start, n) end
    end
  end
  local ttl = redis.call('PTTL', src)
  if ttl > 0 and redis.call('PTTL', dest) < ttl then redis.call('PEXPIRE', dest, ttl) end
end
";

/// Takes up to `ARGV[3]` units of the window of length `ARGV[1]` ms of the hash `KEYS[1]`,
/// while its count is below `ARGV[2]` (with `ARGV[5]` = 1, all of them or none: only if the
/// count stays within `ARGV[2]`), after taking over (once each, marked `m<ARGV[i+4]>`) the
/// current windows of the hashes `KEYS[i]`, i >= 2. `ARGV[4]`: how long the hash is kept
/// past the window's end. Answers the units granted, the ms left in the window and its start.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PRELUDE}{}",
        r"
local dest = KEYS[1]
for i = 2, #KEYS do take_over(dest, KEYS[i], ARGV[i + 4]) end
local len, limit, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local start = window(dest, len)
local count = current(dest, len, start)
local granted = 0
if count < limit and (ARGV[5] ~= '1' or count + wanted <= limit) then
  granted = math.min(wanted, limit - count)
  add(dest, len, start, granted)
end
local left = start + len - now
local keep = left + tonumber(ARGV[4])
if redis.call('PTTL', dest) < keep then redis.call('PEXPIRE', dest, keep) end
return {granted, left, string.format('%d', start)}
"
    ))
});

/// Takes the current windows of the hash `KEYS[2]` over into `KEYS[1]` (once, marked
/// `m<ARGV[1]>`): a roll, or the delete of a lineage's newest key.
static MERGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!("{PRELUDE}{}", "take_over(KEYS[1], KEYS[2], ARGV[1])\nreturn 1\n"))
});

/// Takes `ARGV[3]` units off the window of length `ARGV[1]` starting at `ARGV[2]` of the
/// hash `KEYS[1]`, if that window is still the hash's and counts that many. Answers 1 if it
/// did.
static GIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local c = 'c' .. ARGV[1]
local n = tonumber(ARGV[3])
if tonumber(redis.call('HGET', KEYS[1], 'w' .. ARGV[1])) == tonumber(ARGV[2])
  and (tonumber(redis.call('HGET', KEYS[1], c)) or 0) >= n then
  redis.call('HINCRBY', KEYS[1], c, -n)
  return 1
end
return 0
",
    )
});

/// The error of a call refused while the breaker is open.
#[derive(Debug, thiserror::Error)]
#[error(
    "Redis was unreachable at the last attempt; failing fast until a background probe reconnects"
)]
struct FailFast;

/// Redis as the store of shared windows. Cheap to clone: one multiplexed connection
/// (reconnected by the `ConnectionManager` when it breaks, replaced when it goes silent),
/// one breaker.
#[derive(Clone)]
pub(crate) struct RedisWindows {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection calls go through; replaced by a new one (connecting on first use) when
    /// it gave no answer in time or answered as a replica: a partition that sends no reset,
    /// or a failover that moved the address, leaves the old one waiting for TCP to give up.
    conn: RwLock<ConnectionManager>,
    breaker: Arc<Breaker>,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for RedisWindows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisWindows")
            .field("breaker", &self.shared.breaker)
            .finish_non_exhaustive()
    }
}

/// What the breaker probes: a `PING` on a new connection of its own (not the one calls go
/// through, which may be the silent one).
#[derive(Clone)]
struct Ping(redis::Client);

impl Reach for Ping {
    async fn reach(&self, patience: Duration) -> std::result::Result<(), String> {
        let ping = async {
            let mut conn = self.0.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(patience, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {patience:?}")),
        }
    }
}

impl RedisWindows {
    /// Connects to `url` (`redis://`): each connection attempt and each call gets `timeout`;
    /// while Redis is unreachable, a probe tries every `interval`.
    ///
    /// Refuses a Redis that may evict keys (`maxmemory-policy` other than `noeviction`): an
    /// evicted window would start again at 0, and a limit would no longer hold. Where the
    /// policy cannot be read (`CONFIG` disabled, as on some managed services), it says so in
    /// a warning and goes on.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a URL that is not a Redis URL (the URL is not repeated:
    /// it may hold a password), a password Redis refuses, or a Redis that may evict;
    /// [`Error::Unavailable`] when Redis cannot be reached.
    pub(crate) async fn connect(
        url: &str,
        timeout: Duration,
        interval: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self> {
        // Calls get the timeout from `run`, which also replaces a silent connection.
        let (client, config) = redis_conn::client(url, timeout, None, interval)?;
        let mut conn = redis_conn::connect(&client, &config, timeout).await?;
        let mut policy = redis::cmd("CONFIG");
        policy.arg("GET").arg("maxmemory-policy");
        match tokio::time::timeout(timeout, policy.query_async::<Vec<String>>(&mut conn)).await {
            Ok(Ok(answer)) => match answer.get(1).map(String::as_str) {
                Some("noeviction") => {}
                Some(policy) => {
                    return Err(Error::configuration(format!(
                        "Redis's maxmemory-policy is {policy}: it may evict rate-limit \
                         windows, which would then start again at 0; set it to noeviction"
                    )));
                }
                None => tracing::warn!(
                    "Redis did not say its maxmemory-policy; make sure it is noeviction"
                ),
            },
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "cannot read Redis's maxmemory-policy; make sure it is noeviction, or an evicted \
                 rate-limit window starts again at 0"
            ),
            Err(_) => return Err(Error::unavailable(NoAnswer(timeout))),
        }
        let breaker = Breaker::guarding("Redis", interval, timeout, runtime.clone());
        let shared = Shared { client, config, conn: RwLock::new(conn), breaker, timeout, runtime };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The name of `key`'s hash: tagged by organization, so one organization's keys share a
    /// cluster slot.
    fn hash(org: impl fmt::Display, key: impl fmt::Display) -> String {
        format!("apikeys:{{{org}}}:k:{key}")
    }

    fn conn(&self) -> ConnectionManager {
        self.shared.conn.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the connection calls go through with a new one, connecting on first use.
    fn renew(&self) {
        let fresh = ConnectionManager::new_lazy_with_config(
            self.shared.client.clone(),
            self.shared.config.clone(),
        );
        match fresh {
            Ok(fresh) => {
                *self.shared.conn.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    fresh;
            }
            Err(e) => tracing::debug!(error = %e, "could not renew the Redis connection"),
        }
    }

    /// Runs `invocation` through the breaker, within the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let shared = &self.shared;
        if shared.breaker.is_open() {
            return Err(Error::unavailable(FailFast));
        }
        let mut conn = self.conn();
        match tokio::time::timeout(shared.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => {
                shared.breaker.close();
                Ok(value)
            }
            Ok(Err(e)) if e.is_timeout() => Err(self.no_answer(e)),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.no_answer(NoAnswer(shared.timeout))),
        }
    }

    /// A call Redis did not answer in time. The connection may be silent for good (a
    /// partition without a reset, a dead host): the next calls go through a new one. Whether
    /// Redis is down or only busy, a `PING` on a connection of the breaker's own tells, off
    /// the caller's path.
    fn no_answer(&self, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        let shared = &self.shared;
        self.renew();
        let (breaker, ping) = (Arc::clone(&shared.breaker), Ping(shared.client.clone()));
        let what = e.to_string();
        shared.runtime.spawn(async move { breaker.check_exhausted(&ping, &what).await });
        Error::unavailable(e)
    }

    /// What a failed call is. `Unavailable` (fail closed) for a Redis out of reach (the
    /// breaker opens), and for one that cannot count now: starting (`LOADING`), a replica
    /// (`READONLY`, `MASTERDOWN`: the connection is renewed, in case a failover moved the
    /// primary), busy with a script (`BUSY`), short of replicas or disk (`NOREPLICAS`,
    /// `MISCONF`), out of memory (`OOM`), or a cluster's (`MOVED`, `ASK`, `TRYAGAIN`,
    /// `CLUSTERDOWN`: this client speaks to one primary). `Storage` for anything else.
    fn failed(&self, e: RedisError) -> Error {
        let unreachable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error();
        if unreachable {
            self.shared.breaker.trip(&Ping(self.shared.client.clone()), &e);
            return Error::unavailable(e);
        }
        if matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        ) {
            self.renew();
        }
        let transient =
            matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
            ) || e.code().is_some_and(|c| matches!(c, "OOM" | "BUSY" | "NOREPLICAS" | "MISCONF"));
        if transient { Error::unavailable(e) } else { Error::storage(e) }
    }

    /// Takes up to `wanted` units of `counter`'s current window (`whole`: all of them or
    /// none): (granted, time left, start).
    async fn take(
        &self,
        counter: &Counter,
        limit: RateLimit,
        wanted: u32,
        whole: bool,
    ) -> Result<(u32, Duration, i64)> {
        let len = limit.window.seconds() * 1_000;
        let mut invocation = TAKE.key(Self::hash(counter.org, counter.key));
        for from in counter.take_over.iter().flatten() {
            invocation.key(Self::hash(counter.org, from));
        }
        invocation.arg(len).arg(limit.requests.get()).arg(wanted).arg(KEEP_MS).arg(u8::from(whole));
        for from in counter.take_over.iter().flatten() {
            invocation.arg(from.to_string());
        }
        let (granted, left, start): (u32, i64, i64) = self.run(invocation).await?;
        Ok((granted, left_ms(left), start))
    }

    /// Takes `from`'s current windows over into `to`'s (once): a roll, or the delete of a
    /// lineage's newest key, made by this client.
    pub(crate) async fn take_over(&self, org: OrgId, from: KeyId, to: KeyId) -> Result<()> {
        let mut invocation = MERGE.key(Self::hash(org, to));
        invocation.key(Self::hash(org, from)).arg(from.to_string());
        self.run::<i64>(invocation).await.map(drop)
    }
}

impl WindowStore for RedisWindows {
    async fn count(&self, counter: &Counter, limit: RateLimit, cost: u32) -> Result<Count> {
        let (granted, left, start) = self.take(counter, limit, cost, true).await?;
        Ok(if granted > 0 {
            Count::Admitted(WindowRef::Start(start))
        } else {
            Count::Refused(left)
        })
    }

    /// One script per key; the calls share the multiplexed connection, so they go out
    /// together (pipelined) and stay within each key's slot on a cluster.
    async fn reserve_many(&self, asks: &[Ask]) -> Vec<Result<Grant>> {
        let each = asks.iter().map(|(counter, limit, block)| async move {
            let (granted, left, start) = self.take(counter, *limit, *block, false).await?;
            Ok(match granted {
                0 => Grant::Refused(left),
                granted => {
                    Grant::Units { granted, added: granted, left, window: WindowRef::Start(start) }
                }
            })
        });
        futures_util::future::join_all(each).await
    }

    async fn give_back(
        &self,
        counter: &Counter,
        length: Window,
        window: WindowRef,
        units: u32,
    ) -> Result<()> {
        let WindowRef::Start(start) = window else { return Ok(()) };
        if units == 0 {
            return Ok(());
        }
        let mut invocation = GIVE.key(Self::hash(counter.org, counter.key));
        invocation.arg(length.seconds() * 1_000).arg(start).arg(units);
        self.run::<i64>(invocation).await.map(drop)
    }

    /// Nothing to do: each hash expires a minute after the last window counted in it.
    async fn purge(&self) -> Result<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The organization is the hash tag (the first `{...}`): one organization's keys share a
    /// cluster slot, and a script over a key and the keys it was rolled from stays in it.
    #[test]
    fn keys_are_tagged_by_organization() {
        let name = RedisWindows::hash("0193-org", "0193-key");
        assert_eq!(name, "apikeys:{0193-org}:k:0193-key");
        let tag = &name[name.find('{').unwrap_or(0) + 1..name.find('}').unwrap_or(0)];
        assert_eq!(tag, "0193-org");
    }
}
