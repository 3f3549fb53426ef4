//! A clock tests move by hand, and instants written as text.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, TimeDelta, Utc};

/// A clock tests move by hand; clones share it. Give a client
/// [`as_fn`](Self::as_fn) (`ClientBuilder::clock`).
#[derive(Debug, Clone)]
pub struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    /// A clock that reads `t` until moved.
    #[must_use]
    pub fn at(t: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }

    /// The time it reads.
    #[must_use]
    pub fn now(&self) -> DateTime<Utc> {
        *self.time()
    }

    /// Sets it to `t` (backwards too).
    pub fn set(&self, t: DateTime<Utc>) {
        *self.time() = t;
    }

    /// Moves it by `d`.
    pub fn advance(&self, d: TimeDelta) {
        *self.time() += d;
    }

    /// The time, whether or not a panicking test poisoned the lock.
    fn time(&self) -> MutexGuard<'_, DateTime<Utc>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The clock as the function `ClientBuilder::clock` takes.
    pub fn as_fn(&self) -> impl Fn() -> DateTime<Utc> + Send + Sync + 'static {
        let c = self.clone();
        move || c.now()
    }
}

/// The instant of an RFC 3339 string, such as `2026-11-24T10:00:00Z`.
///
/// # Panics
/// If `s` does not parse.
#[must_use]
pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}
