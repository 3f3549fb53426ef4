//! Every `verify_key` / `validate_key` outcome is counted (`apikeys_checks_total`, labelled
//! `op` and `outcome`) and timed (`apikeys_check_duration_seconds`, labelled `op`) through the
//! `metrics` facade, on every compiled-in backend; with the cache on, its lookups are counted
//! (`apikeys_cache_lookups_total`, labelled `result`) and its feed lag is a gauge.
//!
//! The recorder is global, so this binary is one test that goes through the backends in turn;
//! each snapshot of the debugging recorder resets its counters, so each backend's counts are
//! its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use apikeys_db::{
    Credits, Error, KeyCache, KeyUpdate, NewKey, RateLimit, ValidateOptions, VerifyOptions,
};
use chrono::TimeDelta;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use apikeys_testing::{TestClock, TestDb, at};

/// What one snapshot holds.
#[derive(Default)]
struct Counts {
    /// Check counters by (op, outcome).
    checks: BTreeMap<(String, String), u64>,
    /// Timing samples by op.
    timings: BTreeMap<String, usize>,
    /// Cache lookups by result.
    cache: BTreeMap<String, u64>,
    /// The feed-lag gauge, if set.
    lag: Option<f64>,
}

fn take(snapshotter: &Snapshotter) -> Counts {
    let mut counts = Counts::default();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels().find(|l| l.key() == name).map(|l| l.value().to_owned()).unwrap_or_default()
        };
        match (key.name(), value) {
            // The client registers every series at its first check; only those that moved
            // since the last snapshot are counted here.
            ("apikeys_checks_total", DebugValue::Counter(0)) => {}
            ("apikeys_checks_total", DebugValue::Counter(n)) => {
                *counts.checks.entry((label("op"), label("outcome"))).or_default() += n;
            }
            ("apikeys_check_duration_seconds", DebugValue::Histogram(samples)) => {
                assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
                if !samples.is_empty() {
                    *counts.timings.entry(label("op")).or_default() += samples.len();
                }
            }
            ("apikeys_cache_lookups_total", DebugValue::Counter(n)) => {
                *counts.cache.entry(label("result")).or_default() += n;
            }
            ("apikeys_cache_feed_lag_seconds", DebugValue::Gauge(v)) => {
                counts.lag = Some(v.into_inner());
            }
            ("apikeys_cache_feed_changes_total", DebugValue::Counter(_)) => {}
            (name, value) => panic!("unexpected metric {name}: {value:?}"),
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_counted_and_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder of this binary");
    for backend in apikeys_testing::compiled_backends!() {
        let db = TestDb::new(backend, "metrics").await;
        let clock = TestClock::at(at("2026-11-24T10:00:00Z"));
        let client = db.client_with(|b| b.clock(clock.as_fn())).await;
        let (org, _) = client.get_or_create_organization("acme").await.unwrap();
        let (api, _) = client.get_or_create_product(org.id, "api").await.unwrap();
        let (other, _) = client.get_or_create_product(org.id, "other").await.unwrap();
        let new = NewKey::new("k").with_product(api.id).with_scopes(["read"]);
        let key = client.create_key(org.id, new).await.unwrap();
        let limited = NewKey::new("l").with_rate_limit(RateLimit::per_hour(1).unwrap());
        let limited = client.create_key(org.id, limited).await.unwrap();
        let expiring = NewKey::new("e").expires_at(clock.now() + TimeDelta::seconds(1));
        let expiring = client.create_key(org.id, expiring).await.unwrap();
        let revoked = client.create_key(org.id, NewKey::new("r")).await.unwrap();
        let one_credit = NewKey::new("c").with_credits(Credits::new(1));
        let one_credit = client.create_key(org.id, one_credit).await.unwrap();
        client.revoke_key(revoked.record.id).await.unwrap();
        let disabled = client.create_key(org.id, NewKey::new("d")).await.unwrap();
        client.disable_key(disabled.record.id).await.unwrap();
        let office = apikeys_db::IpAllowlist::parse(["192.0.2.0/24"]).unwrap();
        let fenced = client.create_key(org.id, NewKey::new("f").with_allowed_ips(office)).await;
        let fenced = fenced.unwrap();
        clock.advance(TimeDelta::seconds(2));
        // The limited key's two checks in one hour of the database's clock.
        apikeys_testing::leave_room(&client, apikeys_db::Window::Hour, Duration::from_secs(60))
            .await;
        take(&snapshotter); // from here on, only the checks below

        let verify = VerifyOptions::new();
        let plain = ValidateOptions::new();
        let k = key.key.expose_secret();
        client.verify_key(k, &verify).await.unwrap();
        client.verify_key(k, &verify.track_usage(false)).await.unwrap();
        client.verify_key("sk_nope", &verify).await.unwrap_err();
        client.verify_key(expiring.key.expose_secret(), &verify).await.unwrap_err();
        client.verify_key(revoked.key.expose_secret(), &verify).await.unwrap_err();
        client.verify_key(disabled.key.expose_secret(), &verify).await.unwrap_err();
        let outside = Some("198.51.100.1".parse().unwrap());
        client.validate_key_from(fenced.key.expose_secret(), outside, &plain).await.unwrap_err();
        client.validate_key(k, &plain.clone().for_product(api.id)).await.unwrap();
        client.validate_key(k, &plain.clone().for_product(other.id)).await.unwrap_err();
        let admin = plain.clone().require_scopes(["admin"]).unwrap();
        client.validate_key(k, &admin).await.unwrap_err();
        client.validate_key(limited.key.expose_secret(), &plain).await.unwrap();
        client.validate_key(limited.key.expose_secret(), &plain).await.unwrap_err();
        // Credits spent: a caller's outcome of its own (429), not a storage failure.
        client.validate_key(one_credit.key.expose_secret(), &plain).await.unwrap();
        let exhausted = client.validate_key(one_credit.key.expose_secret(), &plain).await;
        assert!(matches!(exhausted, Err(Error::UsageExhausted { .. })), "{exhausted:?}");
        client.update_key(key.record.id, KeyUpdate::new().with_name("renamed")).await.unwrap();

        let Counts { checks: counters, timings, .. } = take(&snapshotter);
        let expected: BTreeMap<(String, String), u64> = [
            ("verify", "ok", 2),
            ("verify", "invalid", 1),
            ("verify", "expired", 1),
            ("verify", "revoked", 1),
            ("verify", "disabled", 1),
            ("validate", "ip_not_allowed", 1),
            ("validate", "ok", 3),
            ("validate", "product", 1),
            ("validate", "scope", 1),
            ("validate", "quota", 1),
            ("validate", "usage_exhausted", 1),
        ]
        .into_iter()
        .map(|(op, outcome, n)| ((op.to_owned(), outcome.to_owned()), n))
        .collect();
        assert_eq!(counters, expected, "{backend:?}");
        let expected_timings: BTreeMap<String, usize> =
            [("verify".to_owned(), 6), ("validate".to_owned(), 8)].into_iter().collect();
        assert_eq!(timings, expected_timings, "{backend:?}: one duration per check");

        // The cache: hits, a miss, a key known not to exist; the feed's lag. The poller hands
        // the cache's own counts to the metrics (at least once a second): every lookup the
        // cache counted reaches the metric, under its result.
        take(&snapshotter);
        let cache = KeyCache::new().max_staleness(Duration::from_secs(30));
        let cached = db.client_with(|b| b.cache(cache)).await;
        let untracked = VerifyOptions::new().track_usage(false);
        for _ in 0..1_000 {
            cached.verify_key(k, &untracked).await.unwrap();
            if cached.cache_stats().unwrap().hits > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cached.verify_key(k, &untracked).await.unwrap();
        let made_up = cached.key_format().generate().unwrap();
        cached.verify_key(made_up.expose_secret(), &untracked).await.unwrap_err();
        cached.verify_key(made_up.expose_secret(), &untracked).await.unwrap_err();
        let stats = cached.cache_stats().unwrap();
        assert!(stats.hits >= 2 && stats.misses >= 1 && stats.unknown == 1, "{stats:?}");
        let expected: BTreeMap<String, u64> = [
            ("hit", stats.hits),
            ("miss", stats.misses),
            ("unknown", stats.unknown),
            ("bypass", stats.bypassed),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.to_owned(), n))
        .collect();
        let (mut cache_counts, mut lag) = (BTreeMap::new(), None);
        for _ in 0..100 {
            let counts = take(&snapshotter);
            for (result, n) in counts.cache {
                *cache_counts.entry(result).or_default() += n;
            }
            cache_counts.retain(|_, n| *n > 0);
            lag = counts.lag.or(lag);
            if cache_counts == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(cache_counts, expected, "{backend:?}");
        let lag = lag.expect("the feed-lag gauge is set by every poll");
        assert!((0.0..30.0).contains(&lag), "{backend:?}: lag {lag}");
        db.cleanup().await;
    }
}
