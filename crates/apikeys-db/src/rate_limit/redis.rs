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
//! # A cluster
//! The hash tag is the organization: every key of an organization (so a key and the keys it
//! was rolled from, and later an owner's) lives in one slot of a Redis Cluster, and a script
//! touching several of them stays in that slot.
//!
//! # Lineage
//! A roll does not touch Redis (the roll's transaction is SQL's). Instead a key takes over
//! the current windows of the key it was rolled from (and of a successor deleted since)
//! when the script first meets it, once per key, marked in its hash: so the lineage shares
//! one budget, as in SQL, whichever client made the roll.
//!
//! # Fails closed
//! Every call has the client's statement timeout. A call that cannot reach Redis fails with
//! [`Error::Unavailable`] and opens a breaker: until a background `PING` answers (every
//! reconnect interval), every check that needs Redis fails at once with `Unavailable`;
//! none is admitted. A script that timed out may have counted: that can only refuse early,
//! never admit more.
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
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use apikeys_core::{Error, RateLimit, Result, Window};
use redis::aio::ConnectionManager;
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};

use super::store::{Ask, Counter, Grant, WindowRef, WindowStore};
use super::window::{Count, left_ms};
use crate::breaker::{Breaker, Reach};

/// How long a key's hash outlives the end of the window last counted in it: a rolled key's
/// windows are taken over by its successor until then.
const KEEP_MS: i64 = 60_000;

/// Takes up to `ARGV[3]` units of the window of length `ARGV[1]` ms of the hash `KEYS[1]`,
/// while its count is below `ARGV[2]`, after taking over (once each, marked `m<ARGV[i+3]>`)
/// the current windows of the hashes `KEYS[i]`, i >= 2. `ARGV[4]`: how long the hash is kept
/// past the window's end. Answers the units granted, the ms left in the window and its start.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dest = KEYS[1]
local function start_of(len) return now - (now % len) end
local function current(h, len, start)
  if tonumber(redis.call('HGET', h, 'w' .. len)) == start then
    return tonumber(redis.call('HGET', h, 'c' .. len)) or 0
  end
  return 0
end
local function add(len, start, n)
  local wf = 'w' .. len
  if tonumber(redis.call('HGET', dest, wf)) ~= start then
    redis.call('HSET', dest, wf, string.format('%d', start), 'c' .. len, 0)
  end
  redis.call('HINCRBY', dest, 'c' .. len, n)
end
for i = 2, #KEYS do
  if redis.call('HSETNX', dest, 'm' .. ARGV[i + 3], 1) == 1 then
    local fields = redis.call('HGETALL', KEYS[i])
    for j = 1, #fields, 2 do
      local name = fields[j]
      local len = string.sub(name, 1, 1) == 'w' and tonumber(string.sub(name, 2))
      if len and len > 0 then
        local start = start_of(len)
        local n = current(KEYS[i], len, start)
        if n > 0 then add(len, start, n) end
      end
    end
  end
end
local len, limit, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local start = start_of(len)
local count = current(dest, len, start)
local granted = 0
if count < limit then
  granted = math.min(wanted, limit - count)
  add(len, start, granted)
end
local left = start + len - now
local keep = left + tonumber(ARGV[4])
if redis.call('PTTL', dest) < keep then redis.call('PEXPIRE', dest, keep) end
return {granted, left, string.format('%d', start)}
",
    )
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

/// A call Redis did not answer within the client's statement timeout.
#[derive(Debug, thiserror::Error)]
#[error("no answer from Redis within {0:?}")]
struct NoAnswer(Duration);

/// Redis as the store of shared windows. Cheap to clone: one multiplexed connection
/// (reconnected by the `ConnectionManager`), one breaker.
#[derive(Clone)]
pub(crate) struct RedisWindows {
    conn: ConnectionManager,
    breaker: Arc<Breaker>,
    timeout: Duration,
}

impl fmt::Debug for RedisWindows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisWindows").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

/// What the breaker probes: a `PING` through the connection manager (which reconnects it).
#[derive(Clone)]
struct Ping(ConnectionManager);

impl Reach for Ping {
    async fn reach(&self, patience: Duration) -> std::result::Result<(), String> {
        let mut conn = self.0.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(patience, ping.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {patience:?}")),
        }
    }
}

impl RedisWindows {
    /// Connects to `url` (`redis://`): each connection
    /// attempt and each call gets `timeout`; while Redis is unreachable, a probe tries every
    /// `interval`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a URL that is not a Redis URL (the URL is not repeated:
    /// it may hold a password); [`Error::Unavailable`] when Redis cannot be reached.
    pub(crate) async fn connect(
        url: &str,
        timeout: Duration,
        interval: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::configuration(format!("invalid Redis url: {}", e.category())))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(interval);
        let connect = ConnectionManager::new_with_config(client, config);
        let conn = match tokio::time::timeout(timeout, connect).await {
            Ok(conn) => conn.map_err(Error::unavailable)?,
            Err(_) => return Err(Error::unavailable(NoAnswer(timeout))),
        };
        let breaker = Breaker::guarding("Redis", interval, timeout, runtime);
        Ok(Self { conn, breaker, timeout })
    }

    /// The name of `key`'s hash: tagged by organization, so one organization's keys share a
    /// cluster slot.
    fn hash(org: impl fmt::Display, key: impl fmt::Display) -> String {
        format!("apikeys:{{{org}}}:k:{key}")
    }

    /// Runs `script` through the breaker, within the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        if self.breaker.is_open() {
            return Err(Error::unavailable(FailFast));
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => {
                self.breaker.close();
                Ok(value)
            }
            Ok(Err(e)) => Err(self.failed(e).await),
            Err(_) => {
                let e = NoAnswer(self.timeout);
                // Busy or gone: the breaker opens only if a PING gets no answer either.
                self.breaker.check_exhausted(&Ping(self.conn.clone()), &e).await;
                Err(Error::unavailable(e))
            }
        }
    }

    /// What a failed call is: `Unavailable` (fail closed) for a Redis out of reach, starting,
    /// read-only (a replica after a failover), out of memory or in a cluster's reshuffle;
    /// the breaker opens for the first of these. `Storage` for anything else.
    async fn failed(&self, e: RedisError) -> Error {
        let unreachable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error();
        if unreachable {
            self.breaker.trip(&Ping(self.conn.clone()), &e);
            return Error::unavailable(e);
        }
        let transient = matches!(
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
        ) || e.code() == Some("OOM");
        if transient { Error::unavailable(e) } else { Error::storage(e) }
    }

    /// Takes up to `wanted` units of `counter`'s current window: (granted, time left, start).
    async fn take(
        &self,
        counter: &Counter,
        limit: RateLimit,
        wanted: u32,
    ) -> Result<(u32, Duration, i64)> {
        let len = limit.window.seconds() * 1_000;
        let mut invocation = TAKE.key(Self::hash(counter.org, counter.key));
        for from in counter.take_over.iter().flatten() {
            invocation.key(Self::hash(counter.org, from));
        }
        invocation.arg(len).arg(limit.requests.get()).arg(wanted).arg(KEEP_MS);
        for from in counter.take_over.iter().flatten() {
            invocation.arg(from.to_string());
        }
        let (granted, left, start): (u32, i64, i64) = self.run(invocation).await?;
        Ok((granted, left_ms(left), start))
    }
}

impl WindowStore for RedisWindows {
    async fn count(&self, counter: &Counter, limit: RateLimit) -> Result<Count> {
        let (granted, left, _) = self.take(counter, limit, 1).await?;
        Ok(if granted > 0 { Count::Admitted } else { Count::Refused(left) })
    }

    /// One script per key; the calls share the multiplexed connection, so they go out
    /// together (pipelined) and stay within each key's slot on a cluster.
    async fn reserve_many(&self, asks: &[Ask]) -> Vec<Result<Grant>> {
        let each = asks.iter().map(|(counter, limit, block)| async move {
            let (granted, left, start) = self.take(counter, *limit, *block).await?;
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
