use std::sync::Arc;
use std::time::Duration;

use apikeys_db::{
    ApiKeyClient, Error, KeyUpdate, NewKey, RateLimit, RateLimitMode, ValidateOptions,
};
use chrono::TimeDelta;
use tokio::sync::Barrier;

use crate::common::{TestClock, TestDb, at, hammer};

async fn key_with(client: &ApiKeyClient, limit: Option<RateLimit>) -> String {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut nk = NewKey::new("k").with_scopes(["read"]);
    if let Some(l) = limit {
        nk = nk.with_rate_limit(l);
    }
    client.create_key(org.id, nk).await.unwrap().key.expose_secret().to_owned()
}

fn quota(r: apikeys_db::Result<apikeys_db::ApiKey>) -> Option<Duration> {
    match r {
        Ok(_) => None,
        Err(Error::Quota { retry_after, .. }) => Some(retry_after),
        Err(e) => panic!("{e:?}"),
    }
}

/// 4 clients (pools) × 8 tasks hammer one key limited to 100 per hour: exactly 100 pass.
pub async fn shared_limit_is_exact_under_concurrency(db: TestDb) {
    let first = db.client().await;
    let key = key_with(&first, Some(RateLimit::per_hour(100).unwrap())).await;
    let barrier = Arc::new(Barrier::new(32));
    let mut handles = Vec::new();
    for c in 0..4 {
        let client = if c == 0 { first.clone() } else { db.client().await };
        for _ in 0..8 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                hammer(&client, &key, 5, Duration::from_secs(3600)).await
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for h in handles {
        let (o, l) = h.await.unwrap();
        ok += o;
        limited += l;
    }
    // 160 attempts in all (shared: counts are in the database, across the four pools).
    assert_eq!((ok, limited), (100, 60));
}

pub async fn window_rollover_with_injected_clock(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:45Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let key = key_with(&client, Some(RateLimit::per_minute(3).unwrap())).await;
    for _ in 0..3 {
        assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    }
    assert_eq!(
        quota(client.validate_key(&key, ValidateOptions::new()).await),
        Some(Duration::from_secs(15))
    );
    // Still over the limit (the local pre-check answers) with the right retry_after.
    clock.set(at("2026-11-23T10:00:59.5Z"));
    assert_eq!(
        quota(client.validate_key(&key, ValidateOptions::new()).await),
        Some(Duration::from_millis(500))
    );
    // The next minute is a new window.
    clock.set(at("2026-11-23T10:01:00Z"));
    for _ in 0..3 {
        assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    }
    assert_eq!(
        quota(client.validate_key(&key, ValidateOptions::new()).await),
        Some(Duration::from_secs(60))
    );
    // Ended windows are purged.
    clock.advance(TimeDelta::hours(1));
    client.purge_rate_limit_windows().await.unwrap();
    assert_eq!(db.count(&client, "rate_limit_windows").await, 0);
}

pub async fn keys_and_calls_are_independent(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let a = key_with(&client, Some(RateLimit::per_second(2).unwrap())).await;
    let b = key_with(&client, Some(RateLimit::per_second(2).unwrap())).await;
    let unlimited = key_with(&client, None).await;
    for _ in 0..2 {
        assert_eq!(quota(client.validate_key(&a, ValidateOptions::new()).await), None);
    }
    assert!(quota(client.validate_key(&a, ValidateOptions::new()).await).is_some());
    // Another key has its own counter.
    assert_eq!(quota(client.validate_key(&b, ValidateOptions::new()).await), None);
    // No rate limit: unlimited.
    for _ in 0..50 {
        assert_eq!(quota(client.validate_key(&unlimited, ValidateOptions::new()).await), None);
    }
    // Disabled per call: admitted and not counted.
    for _ in 0..5 {
        client.validate_key(&a, ValidateOptions::new().check_rate_limit(false)).await.unwrap();
        client.validate_key(&b, ValidateOptions::new().check_rate_limit(false)).await.unwrap();
    }
    assert_eq!(quota(client.validate_key(&b, ValidateOptions::new()).await), None);
    // A request rejected for scopes uses no quota; verify_key never counts.
    let need_admin = ValidateOptions::new().require_scopes(["admin"]);
    for _ in 0..5 {
        assert!(matches!(
            client.validate_key(&b, need_admin.clone()).await,
            Err(Error::InsufficientScope { .. })
        ));
    }
    assert!(quota(client.validate_key(&b, ValidateOptions::new()).await).is_some());
}

pub async fn update_takes_effect_on_next_check(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let key = key_with(&client, Some(RateLimit::per_hour(1).unwrap())).await;
    let id = client
        .verify_key(&key, apikeys_db::VerifyOptions::new().track_usage(false))
        .await
        .unwrap()
        .id;
    assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    assert!(quota(client.validate_key(&key, ValidateOptions::new()).await).is_some());
    client
        .update_key(id, KeyUpdate::new().with_rate_limit(Some(RateLimit::per_hour(5).unwrap())))
        .await
        .unwrap();
    // Two attempts counted so far (one rejected): three more are admitted in this hour.
    for _ in 0..3 {
        assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    }
    assert!(quota(client.validate_key(&key, ValidateOptions::new()).await).is_some());
    client.update_key(id, KeyUpdate::new().with_rate_limit(None)).await.unwrap();
    assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
}

pub async fn local_mode(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client =
        db.client_with(|b| b.clock(clock.as_fn()).rate_limit_mode(RateLimitMode::Local)).await;
    let key = key_with(&client, Some(RateLimit::per_minute(3).unwrap())).await;
    for _ in 0..3 {
        assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    }
    // GCRA: the burst is used up; one request frees every 20 s.
    let wait = quota(client.validate_key(&key, ValidateOptions::new()).await).unwrap();
    assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20), "{wait:?}");
    clock.advance(TimeDelta::seconds(20));
    assert_eq!(quota(client.validate_key(&key, ValidateOptions::new()).await), None);
    assert!(quota(client.validate_key(&key, ValidateOptions::new()).await).is_some());
    // No database counters in local mode.
    assert_eq!(db.count(&client, "rate_limit_windows").await, 0);
}
