//! Rate-limit rules and fixed-window arithmetic.
//!
//! Windows are fixed and aligned to the Unix epoch (UTC): a minute window runs from second 0 to
//! second 60 of each minute, a day window from midnight UTC to midnight UTC.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The length of a rate-limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum Window {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day (UTC).
    Day,
}

impl Window {
    /// The window's length in whole seconds.
    #[must_use]
    pub const fn seconds(self) -> i64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    /// The window's length.
    #[must_use]
    pub const fn duration(self) -> Duration {
        Duration::from_secs(self.seconds().unsigned_abs())
    }

    /// The lowercase name: `second`, `minute`, `hour` or `day`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// The start of the window that contains `now`, in Unix milliseconds.
    #[must_use]
    pub fn start_millis(self, now: DateTime<Utc>) -> i64 {
        let len = self.seconds() * 1_000;
        now.timestamp_millis().div_euclid(len) * len
    }

    /// The start of the window that contains `now`.
    #[must_use]
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.start_millis(now)).unwrap_or(now)
    }

    /// The end (exclusive) of the window that contains `now`: the start of the next one.
    #[must_use]
    pub fn end(self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.start(now) + TimeDelta::seconds(self.seconds())
    }

    /// Time from `now` until the window that contains it ends: more than zero and at most the
    /// window's length.
    #[must_use]
    pub fn reset_after(self, now: DateTime<Utc>) -> Duration {
        (self.end(now) - now)
            .to_std()
            .unwrap_or(Duration::from_millis(1))
            .max(Duration::from_nanos(1))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Window {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "second" => Ok(Window::Second),
            "minute" => Ok(Window::Minute),
            "hour" => Ok(Window::Hour),
            "day" => Ok(Window::Day),
            _ => Err(Error::invalid_input(
                "rate_limit.window",
                "must be second, minute, hour or day",
            )),
        }
    }
}

/// At most `requests` requests per `window`, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct RateLimit {
    /// Requests admitted per window (at least 1).
    #[cfg_attr(feature = "utoipa", schema(value_type = u32, minimum = 1))]
    pub requests: NonZeroU32,
    /// The window length.
    pub window: Window,
}

impl RateLimit {
    /// `requests` per `window`.
    #[must_use]
    pub const fn new(requests: NonZeroU32, window: Window) -> Self {
        Self { requests, window }
    }

    /// `requests` per `window`, from a plain integer (as it arrives from a form or JSON).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `rate_limit.requests`) unless `1 ≤ requests ≤ u32::MAX`.
    pub fn try_new(requests: i64, window: Window) -> Result<Self> {
        let requests = u32::try_from(requests).ok().and_then(NonZeroU32::new).ok_or_else(|| {
            Error::invalid_input("rate_limit.requests", "must be between 1 and 4294967295")
        })?;
        Ok(Self { requests, window })
    }

    /// `n` per second.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `n` is zero.
    pub fn per_second(n: u32) -> Result<Self> {
        Self::try_new(n.into(), Window::Second)
    }

    /// `n` per minute.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `n` is zero.
    pub fn per_minute(n: u32) -> Result<Self> {
        Self::try_new(n.into(), Window::Minute)
    }

    /// `n` per hour.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `n` is zero.
    pub fn per_hour(n: u32) -> Result<Self> {
        Self::try_new(n.into(), Window::Hour)
    }

    /// `n` per day.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `n` is zero.
    pub fn per_day(n: u32) -> Result<Self> {
        Self::try_new(n.into(), Window::Day)
    }

    /// Whether the `count`-th request of a window (1-based) is admitted.
    #[must_use]
    pub fn admits(&self, count: u64) -> bool {
        count <= u64::from(self.requests.get())
    }

    /// The quota error for a request rejected at `now`.
    #[must_use]
    pub fn exceeded(&self, now: DateTime<Utc>) -> Error {
        Error::Quota { retry_after: self.window.reset_after(now), limit: *self }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}", self.requests, self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn window_edges() {
        let t = at("2026-11-23T10:59:59.999Z");
        assert_eq!(Window::Second.start(t), at("2026-11-23T10:59:59Z"));
        assert_eq!(Window::Minute.start(t), at("2026-11-23T10:59:00Z"));
        assert_eq!(Window::Hour.start(t), at("2026-11-23T10:00:00Z"));
        assert_eq!(Window::Day.start(t), at("2026-11-23T00:00:00Z"));
        assert_eq!(Window::Hour.end(t), at("2026-11-23T11:00:00Z"));
        assert_eq!(Window::Hour.reset_after(t), Duration::from_millis(1));
        // Exactly on a boundary, a new window starts and lasts the full length.
        let edge = at("2026-11-23T11:00:00Z");
        assert_eq!(Window::Hour.start(edge), edge);
        assert_eq!(Window::Hour.reset_after(edge), Duration::from_secs(3_600));
        assert_eq!(Window::Day.reset_after(at("2026-11-23T23:59:30Z")), Duration::from_secs(30));
        assert_eq!(Window::Minute.start_millis(edge), edge.timestamp_millis());
    }

    #[test]
    fn windows_before_the_epoch_floor_downwards() {
        let t = at("1969-12-31T23:59:59.500Z");
        assert_eq!(Window::Second.start(t), at("1969-12-31T23:59:59Z"));
        assert_eq!(Window::Day.start(t), at("1969-12-31T00:00:00Z"));
    }

    #[test]
    fn reset_after_is_within_the_window() {
        let base = at("2026-01-01T00:00:00Z");
        for w in [Window::Second, Window::Minute, Window::Hour, Window::Day] {
            for ms in [0, 1, 499, 999, 59_999, 3_599_999, 86_399_999] {
                let now = base + TimeDelta::milliseconds(ms);
                let r = w.reset_after(now);
                assert!(r > Duration::ZERO && r <= w.duration(), "{w} {ms} {r:?}");
            }
        }
    }

    #[test]
    fn limits_and_quota_error() {
        assert!(matches!(
            RateLimit::try_new(0, Window::Minute),
            Err(Error::InvalidInput { field: "rate_limit.requests", .. })
        ));
        assert!(RateLimit::try_new(-5, Window::Minute).is_err());
        assert!(RateLimit::try_new(i64::from(u32::MAX) + 1, Window::Minute).is_err());
        let l = RateLimit::per_minute(3).unwrap();
        assert!(l.admits(3) && !l.admits(4));
        assert_eq!(l.to_string(), "3 per minute");
        match l.exceeded(at("2026-01-01T00:00:45Z")) {
            Error::Quota { retry_after, limit } => {
                assert_eq!(retry_after, Duration::from_secs(15));
                assert_eq!(limit, l);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!("hour".parse::<Window>().unwrap(), Window::Hour);
        assert!("week".parse::<Window>().is_err());
    }
}
