//! The client's clock: a leaf every part can import.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A source of the current time. The default is [`Utc::now`]; tests inject their own.
///
/// Decisions that span replicas (rate-limit windows, credit periods) never use it: they take
/// the database's clock. It decides what is per call: expiry, and the times the client stamps.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The current time from `clock`, truncated to what every database stores (microseconds).
pub(crate) fn now(clock: &Clock) -> DateTime<Utc> {
    crate::convert::to_micros(clock())
}
