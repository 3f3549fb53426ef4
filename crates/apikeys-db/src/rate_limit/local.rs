//! Local mode: counters in this process (`governor`, GCRA, on the client's clock).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apikeys_core::{Error, KeyId, RateLimit, Result};
use chrono::{DateTime, Utc};
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};

use crate::clock::Clock;
use crate::lock::lock;

/// One GCRA limiter per key, rebuilt when the key's limit changes, with the time (Unix ms)
/// it was last used.
pub(super) struct LocalLimiters {
    clock: Clock,
    map: Mutex<HashMap<KeyId, LocalEntry>>,
}

type LocalLimiter = Gcra<NotKeyed, InMemoryState, ClientClock, NoOpMiddleware<Duration>>;

struct LocalEntry {
    limit: RateLimit,
    gcra: Arc<LocalLimiter>,
    last_used_ms: i64,
}

/// Adapts the client's clock to governor: time since the Unix epoch.
#[derive(Clone)]
struct ClientClock(Clock);

impl GovernorClock for ClientClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        since_epoch((self.0)())
    }
}

fn since_epoch(t: DateTime<Utc>) -> Duration {
    let nanos = t.timestamp_nanos_opt().unwrap_or(0);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

impl LocalLimiters {
    pub(super) fn new(clock: Clock) -> Self {
        Self { clock, map: Mutex::new(HashMap::new()) }
    }

    /// Forgets `key`'s limiter.
    pub(super) fn forget(&self, key: KeyId) {
        lock(&self.map).remove(&key);
    }

    /// Counts a request of `cost` units (all or none) of `key`; `sweep`: drop the limiters
    /// that no longer change any answer first.
    pub(super) fn check(
        &self,
        key: KeyId,
        limit: RateLimit,
        cost: NonZeroU32,
        sweep: bool,
    ) -> Result<()> {
        let now = (self.clock)();
        let limiter = {
            let mut map = lock(&self.map);
            let now_ms = now.timestamp_millis();
            if sweep {
                // A limiter left alone for a whole window is back to a full burst, the same
                // state a new one starts in, so dropping it changes no answer.
                map.retain(|_, e| e.last_used_ms + e.limit.window.seconds() * 1_000 > now_ms);
            }
            match map.get_mut(&key) {
                Some(entry) if entry.limit == limit => {
                    entry.last_used_ms = now_ms;
                    Arc::clone(&entry.gcra)
                }
                _ => {
                    let quota = Quota::with_period(limit.window.duration() / limit.requests.get())
                        .map(|q| q.allow_burst(limit.requests))
                        .unwrap_or_else(|| Quota::per_second(limit.requests));
                    let gcra = Arc::new(Gcra::direct_with_clock(
                        quota,
                        ClientClock(Arc::clone(&self.clock)),
                    ));
                    map.insert(
                        key,
                        LocalEntry { limit, gcra: Arc::clone(&gcra), last_used_ms: now_ms },
                    );
                    gcra
                }
            }
        };
        match limiter.check_n(cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(since_epoch(now)).max(Duration::from_millis(1));
                Err(Error::Quota {
                    retry_after: wait.min(limit.window.duration()),
                    limit,
                    name: None,
                })
            }
            // More than the limit: never admitted (the caller refuses it before asking).
            Err(_) => Err(Error::Quota { retry_after: limit.window.duration(), limit, name: None }),
        }
    }
}
