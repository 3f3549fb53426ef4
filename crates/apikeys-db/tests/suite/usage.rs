//! Batched usage tracking (`ClientBuilder::usage_flush_interval`).

use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, KeyId, NewKey, ValidateOptions, VerifyOptions};
use chrono::TimeDelta;

use apikeys_testing::{TestClock, TestDb, at};

/// An interval no test waits for: only explicit flushes (and drops) write.
const NEVER: Duration = Duration::from_secs(3600);

async fn use_count(client: &ApiKeyClient, id: KeyId) -> u64 {
    client.get_key(id).await.unwrap().use_count
}

/// Polls until `id`'s stored count is `want`; fails after a generous bound (a hang guard: the
/// flush is a background task).
async fn eventually_count(client: &ApiKeyClient, id: KeyId, want: u64) {
    for _ in 0..500 {
        if use_count(client, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("use_count of {id} never reached {want}: {}", use_count(client, id).await);
}

pub async fn batched_counts_are_exact(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn()).usage_flush_interval(NEVER)).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(client.create_key(org.id, NewKey::new(format!("k{i}"))).await.unwrap());
    }
    // The record a check returns counts its own use; the database does not have it yet.
    let first =
        client.verify_key(keys[0].key.expose_secret(), &VerifyOptions::new()).await.unwrap();
    assert_eq!((first.use_count, first.last_used_at), (1, Some(clock.now())));
    assert_eq!(use_count(&client, keys[0].record.id).await, 0);

    // 8 tasks × 30 checks over three keys (key i gets (i + 1) of every 6 checks).
    clock.advance(TimeDelta::seconds(5));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let keys: Vec<String> = keys.iter().map(|k| k.key.expose_secret().to_owned()).collect();
            tokio::spawn(async move {
                for i in 0..30 {
                    let key = &keys[[0, 1, 1, 2, 2, 2][i % 6]];
                    client.validate_key(key, &ValidateOptions::new()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Checks with tracking off are not counted at all.
    client
        .verify_key(keys[2].key.expose_secret(), &VerifyOptions::new().track_usage(false))
        .await
        .unwrap();
    assert_eq!(client.flush_usage().await.unwrap(), 3, "three keys written");
    let expected = [1 + 8 * 5, 8 * 10, 8 * 15];
    for (k, want) in keys.iter().zip(expected) {
        let stored = client.get_key(k.record.id).await.unwrap();
        assert_eq!(stored.use_count, want);
        assert_eq!(stored.last_used_at, Some(clock.now()));
    }
    assert_eq!(client.flush_usage().await.unwrap(), 0, "nothing left to write");

    // Rotation still re-hashes at once, while the use waits for the flush.
    const NEW: &str = "a-newer-signing-secret-0123456789-abcdefgh";
    let rotating = db
        .client_with(|b| {
            b.signing_secret(NEW)
                .signing_secret_version(2)
                .previous_signing_secret(1, apikeys_testing::SECRET)
                .usage_flush_interval(NEVER)
        })
        .await;
    let new_only = db.client_with(|b| b.signing_secret(NEW).signing_secret_version(2)).await;
    let key = keys[0].key.expose_secret();
    rotating.verify_key(key, &VerifyOptions::new()).await.unwrap();
    new_only.verify_key(key, &VerifyOptions::new().track_usage(false)).await.unwrap();
    assert_eq!(use_count(&client, keys[0].record.id).await, expected[0]);
    rotating.flush_usage().await.unwrap();
    assert_eq!(use_count(&client, keys[0].record.id).await, expected[0] + 1);
}

pub async fn batched_flushes_on_interval_and_shutdown(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret();

    // A short interval: the background flush writes without being asked.
    let ticking = db.client_with(|b| b.usage_flush_interval(Duration::from_millis(20))).await;
    for _ in 0..3 {
        ticking.verify_key(key, &VerifyOptions::new()).await.unwrap();
    }
    eventually_count(&client, issued.record.id, 3).await;

    // A long interval: shutdown() writes what is held, and later uses are written at once.
    let closing = db.client_with(|b| b.usage_flush_interval(NEVER)).await;
    for _ in 0..4 {
        closing.verify_key(key, &VerifyOptions::new()).await.unwrap();
    }
    assert_eq!(use_count(&client, issued.record.id).await, 3);
    assert_eq!(closing.shutdown().await.unwrap(), 1);
    assert_eq!(use_count(&client, issued.record.id).await, 7);
    closing.verify_key(key, &VerifyOptions::new()).await.unwrap();
    assert_eq!(use_count(&client, issued.record.id).await, 8);

    // Dropping the last clone writes nothing: it cannot wait for the database (it logs what
    // is lost instead of pretending).
    let dropped = db.client_with(|b| b.usage_flush_interval(NEVER)).await;
    dropped.verify_key(key, &VerifyOptions::new()).await.unwrap();
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(use_count(&client, issued.record.id).await, 8);

    assert!(matches!(
        db.builder().usage_flush_interval(Duration::ZERO).build().await,
        Err(Error::Configuration { .. })
    ));
}

/// Two replicas flushing out of order (the later use first): `last_used_at` keeps the later
/// time, immediate and batched alike.
pub async fn last_used_only_moves_forward(db: TestDb) {
    let early = TestClock::at(at("2026-11-23T10:00:00Z"));
    let late = TestClock::at(at("2026-11-23T10:05:00Z"));
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("k")).await.unwrap();
    let (key, id) = (issued.key.expose_secret(), issued.record.id);
    let a = db.client_with(|b| b.clock(late.as_fn()).usage_flush_interval(NEVER)).await;
    let b = db.client_with(|b| b.clock(early.as_fn()).usage_flush_interval(NEVER)).await;
    a.verify_key(key, &VerifyOptions::new()).await.unwrap();
    b.verify_key(key, &VerifyOptions::new()).await.unwrap();
    a.flush_usage().await.unwrap();
    b.flush_usage().await.unwrap();
    let stored = client.get_key(id).await.unwrap();
    assert_eq!((stored.use_count, stored.last_used_at), (2, Some(late.now())));
    // Immediate tracking from a replica whose clock is behind.
    let behind = db.client_with(|b| b.clock(early.as_fn())).await;
    behind.verify_key(key, &VerifyOptions::new()).await.unwrap();
    let stored = client.get_key(id).await.unwrap();
    assert_eq!((stored.use_count, stored.last_used_at), (3, Some(late.now())));
}
