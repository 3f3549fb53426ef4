//! Admin calls racing the hot path: every interleaving ends in a documented typed outcome
//! (`Ok`, `InvalidKey`, `Revoked`, `NotFound`), never `Storage`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apikeys_db::{NewKey, RateLimit, VerifyOptions};

use apikeys_testing::{Tally, TestDb, admin_races, hot_path_until};

/// 3 clients (immediate tracking, batched tracking, another pool) × 4 hot tasks check 45
/// keys with a shared rate limit while two admin clients delete, revoke and update them.
pub async fn admin_calls_racing_the_hot_path(db: TestDb) {
    let admin = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for i in 0..45 {
        let nk = NewKey::new(format!("k{i}"))
            .with_scopes(["read"])
            .with_rate_limit(RateLimit::per_hour(10_000).unwrap());
        let issued = admin.create_key(org.id, nk).await.unwrap();
        keys.push(issued.key.expose_secret().to_owned());
        ids.push(issued.record.id);
    }
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let batched = db.client_with(|b| b.usage_flush_interval(Duration::from_millis(5))).await;
    let hot = [db.client().await, batched.clone(), db.client().await];
    let mut tasks = Vec::new();
    for (c, client) in hot.iter().enumerate() {
        for t in 0..4 {
            let (client, keys, stop) = (client.clone(), Arc::clone(&keys), Arc::clone(&stop));
            tasks.push(tokio::spawn(hot_path_until(client, keys, stop, c * 11 + t * 3)));
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other_admin = db.client().await;
    let (left, right) = ids.split_at(ids.len() / 2);
    let (a, b) = tokio::join!(admin_races(&admin, left), admin_races(&other_admin, right));
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.unwrap());
    }
    batched.shutdown().await.unwrap();
    assert!(a.is_empty() && b.is_empty(), "admin outcomes: {a:?} {b:?}");
    assert!(tally.other.is_empty(), "hot-path outcomes: {:?}", tally.other);
    assert!(tally.ok > 0 && tally.invalid_key > 0, "{tally:?}");
    // Every key is gone.
    for k in keys.iter() {
        assert!(matches!(
            admin.verify_key(k, &VerifyOptions::new()).await,
            Err(apikeys_db::Error::InvalidKey)
        ));
    }
    assert_eq!(db.count(&admin, "api_keys").await, 0);
    assert_eq!(db.count(&admin, "rate_limit_windows").await, 0);
}
