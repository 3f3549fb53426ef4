//! Every `verify_key` / `validate_key` outcome is counted (`apikeys_checks_total`, labelled
//! `op` and `outcome`) and timed (`apikeys_check_duration_seconds`, labelled `op`) through the
//! `metrics` facade, on every compiled-in backend.
//!
//! The recorder is global, so this binary is one test that goes through the backends in turn;
//! each snapshot of the debugging recorder resets its counters, so each backend's counts are
//! its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "suite/common/mod.rs"]
#[allow(dead_code, unused_imports, unused_macros)]
mod common;

use std::collections::BTreeMap;

use apikeys_db::{KeyUpdate, NewKey, RateLimit, ValidateOptions, VerifyOptions};
use chrono::TimeDelta;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use common::{Backend, TestClock, TestDb, at};

/// Counter values by (op, outcome), and histogram sample counts by op.
type Counts = (BTreeMap<(String, String), u64>, BTreeMap<String, usize>);

fn take(snapshotter: &Snapshotter) -> Counts {
    let (mut counters, mut timings) = (BTreeMap::new(), BTreeMap::new());
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels().find(|l| l.key() == name).map(|l| l.value().to_owned()).unwrap_or_default()
        };
        match (key.name(), value) {
            ("apikeys_checks_total", DebugValue::Counter(n)) => {
                *counters.entry((label("op"), label("outcome"))).or_default() += n;
            }
            ("apikeys_check_duration_seconds", DebugValue::Histogram(samples)) => {
                assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
                *timings.entry(label("op")).or_default() += samples.len();
            }
            (name, value) => panic!("unexpected metric {name}: {value:?}"),
        }
    }
    (counters, timings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_counted_and_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder of this binary");
    for backend in Backend::compiled_in() {
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
        client.revoke_key(revoked.record.id).await.unwrap();
        clock.advance(TimeDelta::seconds(2));
        take(&snapshotter); // from here on, only the checks below

        let verify = VerifyOptions::new();
        let plain = ValidateOptions::new();
        let k = key.key.expose_secret();
        client.verify_key(k, &verify).await.unwrap();
        client.verify_key(k, &verify.track_usage(false)).await.unwrap();
        client.verify_key("sk_nope", &verify).await.unwrap_err();
        client.verify_key(expiring.key.expose_secret(), &verify).await.unwrap_err();
        client.verify_key(revoked.key.expose_secret(), &verify).await.unwrap_err();
        client.validate_key(k, &plain.clone().for_product(api.id)).await.unwrap();
        client.validate_key(k, &plain.clone().for_product(other.id)).await.unwrap_err();
        let admin = plain.clone().require_scopes(["admin"]).unwrap();
        client.validate_key(k, &admin).await.unwrap_err();
        client.validate_key(limited.key.expose_secret(), &plain).await.unwrap();
        client.validate_key(limited.key.expose_secret(), &plain).await.unwrap_err();
        client.update_key(key.record.id, KeyUpdate::new().with_name("renamed")).await.unwrap();

        let (counters, timings) = take(&snapshotter);
        let expected: BTreeMap<(String, String), u64> = [
            ("verify", "ok", 2),
            ("verify", "invalid", 1),
            ("verify", "expired", 1),
            ("verify", "revoked", 1),
            ("validate", "ok", 2),
            ("validate", "product", 1),
            ("validate", "scope", 1),
            ("validate", "quota", 1),
        ]
        .into_iter()
        .map(|(op, outcome, n)| ((op.to_owned(), outcome.to_owned()), n))
        .collect();
        assert_eq!(counters, expected, "{backend:?}");
        let expected_timings: BTreeMap<String, usize> =
            [("verify".to_owned(), 5), ("validate".to_owned(), 5)].into_iter().collect();
        assert_eq!(timings, expected_timings, "{backend:?}: one duration per check");
        db.cleanup().await;
    }
}
