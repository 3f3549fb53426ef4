//! What the hot path reports: a `tracing` span per check, and counters and timings through
//! the `metrics` facade (a no-op until the host installs a recorder).
//!
//! The metric keys of the hot path are built once: the `metrics` macros build a key (and
//! allocate its labels) on every call unless every part is a literal, and a cache hit costs
//! under a microsecond, so that would show. For the same reason the cache's own lookups are
//! counted in the cache and handed to the metrics by its poller.

use std::future::Future;
use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

use apikeys_core::{ApiKey, Error, Result};
use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use tracing::Instrument;

/// The metric counting checks, labelled `op` (`verify`, `validate`) and `outcome` (one of
/// [`OUTCOMES`]: `storage` is a real database failure only).
pub(crate) const CHECKS_METRIC: &str = "apikeys_checks_total";
/// The metric timing checks (seconds), labelled `op`.
pub(crate) const DURATION_METRIC: &str = "apikeys_check_duration_seconds";
/// The metric counting cache lookups, labelled `result`: `hit`, `miss`, `unknown` (a key
/// known not to exist), `bypass` (the cache is not serving: its last successful poll is too
/// old).
pub(crate) const CACHE_METRIC: &str = "apikeys_cache_lookups_total";
/// The gauge of the feed's lag (seconds): how long ago the last successful poll started.
pub(crate) const FEED_LAG_METRIC: &str = "apikeys_cache_feed_lag_seconds";
/// The counter of feed rows applied.
pub(crate) const FEED_CHANGES_METRIC: &str = "apikeys_cache_feed_changes_total";

/// A hot-path operation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Verify,
    Validate,
}

const OPS: [&str; 2] = ["verify", "validate"];
/// The outcomes of a check, one per kind of answer a host may want to tell apart on a
/// dashboard. `usage_exhausted` (credits spent) is the caller's, like `quota`; `storage` is
/// [`Error::Storage`] alone, a database failure; `other` is any error that is none of these
/// (an invalid argument, a configuration error, a failed random number generator, a kind of
/// error added later), so that it never passes for a database failure.
const OUTCOMES: [&str; 14] = [
    "ok",
    "invalid",
    "expired",
    "revoked",
    "product",
    "scope",
    "quota",
    "usage_exhausted",
    "unavailable",
    "conflict",
    "storage",
    "other",
    "disabled",
    "ip_not_allowed",
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The counter keys of every (op, outcome), op-major.
static CHECK_KEYS: LazyLock<Vec<Key>> = LazyLock::new(|| {
    OPS.iter()
        .flat_map(|op| {
            OUTCOMES.iter().map(move |outcome| {
                let labels = vec![
                    Label::from_static_parts("op", op),
                    Label::from_static_parts("outcome", outcome),
                ];
                Key::from_parts(CHECKS_METRIC, labels)
            })
        })
        .collect()
});

static DURATION_KEYS: LazyLock<Vec<Key>> = LazyLock::new(|| {
    let key = |op| Key::from_parts(DURATION_METRIC, vec![Label::from_static_parts("op", op)]);
    OPS.iter().map(|op| key(op)).collect()
});

/// The hot path's metric handles, registered once with the recorder in use at a client's
/// first check and used for as long as that recorder stays the one in use (the usual case:
/// the host installs its global recorder at start-up). A registration costs a lookup in the
/// recorder's registry, a handle an atomic operation. Under any other recorder (one
/// installed later, or a thread's local one) every check registers as the macros do.
#[derive(Default)]
pub(crate) struct CheckMetrics {
    handles: OnceLock<Handles>,
}

struct Handles {
    /// The address of the recorder the handles belong to.
    recorder: usize,
    checks: Vec<Counter>,
    durations: Vec<Histogram>,
}

fn address(recorder: &dyn Recorder) -> usize {
    std::ptr::from_ref(recorder).cast::<()>() as usize
}

impl CheckMetrics {
    /// Counts one check of `op` with outcome number `outcome`, which took `seconds`.
    fn record(&self, op: Op, outcome: usize, seconds: f64) {
        let counter = op as usize * OUTCOMES.len() + outcome;
        metrics::with_recorder(|r| {
            let here = address(r);
            let handles = self.handles.get_or_init(|| Handles {
                recorder: here,
                checks: CHECK_KEYS.iter().map(|k| r.register_counter(k, &METADATA)).collect(),
                durations: DURATION_KEYS
                    .iter()
                    .map(|k| r.register_histogram(k, &METADATA))
                    .collect(),
            });
            if handles.recorder == here {
                handles.checks[counter].increment(1);
                handles.durations[op as usize].record(seconds);
            } else {
                r.register_counter(&CHECK_KEYS[counter], &METADATA).increment(1);
                r.register_histogram(&DURATION_KEYS[op as usize], &METADATA).record(seconds);
            }
        });
    }
}

/// Runs one check in a `tracing` span (`apikeys.check`, with `op` and, once the key is found,
/// `key_id` and `org_id`: never key material), then counts its outcome and records its
/// duration. The span is at DEBUG level, as tower-http's per-request spans are: a host
/// logging at INFO pays nothing for it on a check answered from memory.
pub(crate) async fn observe(
    metrics: &CheckMetrics,
    op: Op,
    check: impl Future<Output = Result<ApiKey>>,
) -> Result<ApiKey> {
    let span = tracing::debug_span!(
        "apikeys.check",
        op = OPS[op as usize],
        key_id = tracing::field::Empty,
        org_id = tracing::field::Empty
    );
    let started = Instant::now();
    let result = check.instrument(span).await;
    metrics.record(op, outcome(&result), started.elapsed().as_secs_f64());
    result
}

/// A check's outcome: its index in [`OUTCOMES`].
fn outcome(result: &Result<ApiKey>) -> usize {
    match result {
        Ok(_) => 0,
        Err(Error::InvalidKey) => 1,
        Err(Error::Expired { .. }) => 2,
        Err(Error::Revoked { .. }) => 3,
        Err(Error::ProductNotAllowed { .. }) => 4,
        Err(Error::InsufficientScope { .. }) => 5,
        Err(Error::Quota { .. }) => 6,
        Err(Error::UsageExhausted { .. }) => 7,
        Err(Error::Unavailable { .. }) => 8,
        Err(Error::Conflict { .. }) => 9,
        Err(Error::Storage { .. }) => 10,
        Err(Error::Disabled { .. }) => 12,
        Err(Error::IpNotAllowed { .. }) => 13,
        Err(_) => 11,
    }
}

/// Adds cache lookups to their counter, by result (`hit`, `miss`, `unknown`, `bypass`). The
/// cache counts its lookups itself and its poller hands the counts on, so that a cache hit
/// makes no metrics call for them.
pub(crate) fn cache_lookups(result: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(CACHE_METRIC, "result" => result).increment(n);
    }
}

/// Counts feed rows applied and sets the feed's lag.
pub(crate) fn feed(changes: u64, lag_seconds: Option<f64>) {
    if changes > 0 {
        metrics::counter!(FEED_CHANGES_METRIC).increment(changes);
    }
    if let Some(lag) = lag_seconds {
        metrics::gauge!(FEED_LAG_METRIC).set(lag);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use apikeys_core::{ProductId, RateLimit};
    use chrono::Utc;

    use super::*;

    fn name(error: Error) -> &'static str {
        OUTCOMES[outcome(&Err(error))]
    }

    #[test]
    fn each_error_has_its_outcome_and_only_a_database_failure_is_storage() {
        let io = || std::io::Error::other("x");
        let limit = RateLimit::per_minute(1).unwrap();
        let cases = [
            (Error::InvalidKey, "invalid"),
            (Error::Expired { expired_at: Utc::now() }, "expired"),
            (Error::Revoked { revoked_at: Utc::now() }, "revoked"),
            (Error::Disabled { disabled_at: Utc::now() }, "disabled"),
            (Error::IpNotAllowed { ip: None }, "ip_not_allowed"),
            (Error::ProductNotAllowed { product_id: ProductId::new() }, "product"),
            (Error::InsufficientScope { missing: Vec::new() }, "scope"),
            (Error::Quota { retry_after: Duration::from_secs(1), limit, name: None }, "quota"),
            (Error::UsageExhausted { refill_at: None }, "usage_exhausted"),
            (Error::UsageExhausted { refill_at: Some(Utc::now()) }, "usage_exhausted"),
            (Error::unavailable(io()), "unavailable"),
            (Error::conflict(io()), "conflict"),
            (Error::storage(io()), "storage"),
            (Error::invalid_input("scopes", "bad"), "other"),
            (Error::configuration("no secret"), "other"),
            (Error::Entropy, "other"),
        ];
        for (error, expected) in cases {
            let shown = error.to_string();
            assert_eq!(name(error), expected, "{shown}");
        }
        assert_eq!(CHECK_KEYS.len(), OPS.len() * OUTCOMES.len());
    }
}
