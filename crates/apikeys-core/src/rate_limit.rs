//! Rate-limit rules and fixed-window arithmetic.
//!
//! Windows are fixed and aligned to the Unix epoch (UTC): a minute window runs from second 0 to
//! second 60 of each minute, a day window from midnight UTC to midnight UTC.

use std::collections::BTreeMap;
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

/// At most `requests` requests per `window`, per key: a key's main limit
/// (`NewKey::with_rate_limit`), or one of its named ones ([`RateLimits`]).
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
        Error::Quota { retry_after: self.window.reset_after(now), limit: *self, name: None }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}", self.requests, self.window)
    }
}

/// The most named limits a key has ([`RateLimits`]), beside its main one.
pub const MAX_NAMED_LIMITS: usize = 8;

/// A key's named rate limits, beside its main one ([`RateLimit`]): a plan's
/// "10 a second and 10 000 a day". Each is counted on its own (as exactly as the main one,
/// in the same [`RateLimitMode`](https://docs.rs/apikeys-db)), and a check is admitted only
/// if every limit has room for it: a check one of them refuses takes nothing from the others.
///
/// Names are 1 to 32 characters of `a-z`, `0-9`, `_` and `-`, starting with a letter, and
/// name the limit in errors and in the `RateLimit` headers; `key` is the main limit's name
/// there, so no named limit may take it. At most [`MAX_NAMED_LIMITS`].
///
/// ```
/// use apikeys_core::{RateLimit, RateLimits};
///
/// let plan = RateLimits::new()
///     .with("burst", RateLimit::per_second(10)?)?
///     .with("daily", RateLimit::per_day(10_000)?)?;
/// assert_eq!(plan.get("daily"), Some(RateLimit::per_day(10_000)?));
/// assert!(RateLimits::new().with("Daily", RateLimit::per_day(1)?).is_err());
/// assert!(RateLimits::new().with("key", RateLimit::per_day(1)?).is_err());
/// # Ok::<(), apikeys_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, RateLimit>", into = "BTreeMap<String, RateLimit>")]
pub struct RateLimits(BTreeMap<String, RateLimit>);

impl RateLimits {
    /// No named limits.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// These limits and `limit` named `name` (replacing a limit of that name).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `rate_limits`) for a malformed or reserved name, or a
    /// limit past [`MAX_NAMED_LIMITS`].
    pub fn with(mut self, name: impl Into<String>, limit: RateLimit) -> Result<Self> {
        let name = name.into();
        check_limit_name(&name)?;
        self.0.insert(name, limit);
        if self.0.len() > MAX_NAMED_LIMITS {
            return Err(Error::invalid_input("rate_limits", "at most 8 named limits"));
        }
        Ok(self)
    }

    /// The limit named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<RateLimit> {
        self.0.get(name).copied()
    }

    /// The limits, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, RateLimit)> {
        self.0.iter().map(|(name, limit)| (name.as_str(), *limit))
    }

    /// How many.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A named limit's name: see [`RateLimits`].
fn check_limit_name(name: &str) -> Result<()> {
    let shaped = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !shaped {
        return Err(Error::invalid_input(
            "rate_limits",
            "a limit's name is 1 to 32 of a-z, 0-9, _ and -, starting with a letter",
        ));
    }
    if name == "key" {
        return Err(Error::invalid_input(
            "rate_limits",
            "`key` names the key's main limit; choose another name",
        ));
    }
    Ok(())
}

impl TryFrom<BTreeMap<String, RateLimit>> for RateLimits {
    type Error = Error;

    fn try_from(map: BTreeMap<String, RateLimit>) -> Result<Self> {
        map.into_iter().try_fold(Self::new(), |limits, (name, limit)| limits.with(name, limit))
    }
}

impl From<RateLimits> for BTreeMap<String, RateLimit> {
    fn from(limits: RateLimits) -> Self {
        limits.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_limits() {
        let l = RateLimit::per_minute(1).unwrap();
        for bad in ["", "Daily", "1st", "a b", "key", &"x".repeat(33), "é"] {
            assert!(RateLimits::new().with(bad, l).is_err(), "{bad:?}");
        }
        let mut many = RateLimits::new();
        for i in 0..MAX_NAMED_LIMITS {
            many = many.with(format!("l{i}"), l).unwrap();
        }
        assert!(many.clone().with("one-more", l).is_err());
        assert_eq!(many.clone().with("l0", RateLimit::per_day(5).unwrap()).unwrap().len(), 8);
        let json = serde_json::json!({"daily": {"requests": 5, "window": "day"}});
        let parsed: RateLimits = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json);
        let bad = serde_json::json!({"Daily": {"requests": 5, "window": "day"}});
        assert!(serde_json::from_value::<RateLimits>(bad).is_err());
    }

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
            Error::Quota { retry_after, limit, .. } => {
                assert_eq!(retry_after, Duration::from_secs(15));
                assert_eq!(limit, l);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!("hour".parse::<Window>().unwrap(), Window::Hour);
        assert!("week".parse::<Window>().is_err());
    }
}
