//! `warm_cache`: the live keys loaded into the verified-key cache ahead of their first check,
//! kept fresh like any cached key, never a revoked key served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeys_db::{ApiKeyClient, CacheStats, Error, KeyCache, KeyUpdate, NewKey, ValidateOptions};
use chrono::TimeDelta;

use crate::cache::{cache, refused_within_bound};
use crate::keys::org;
use apikeys_testing::{TestClock, TestDb};

const V1: &str = "warm-signing-secret-version-one-0123456789";
const V2: &str = "warm-signing-secret-version-two-0123456789";

fn stats(client: &ApiKeyClient) -> CacheStats {
    client.cache_stats().expect("a client with a cache")
}

fn untracked() -> ValidateOptions {
    ValidateOptions::new().track_usage(false)
}

/// Waits until the cache serves: a check of `key` (a warmed key) is a hit.
async fn serving(client: &ApiKeyClient, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = stats(client).hits;
        client.validate_key(key, &untracked()).await.unwrap();
        if stats(client).hits > before {
            return;
        }
        assert!(Instant::now() < deadline, "the cache never served: {:?}", stats(client));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Creates `n` keys named `{prefix}{i}` with scope `read`; returns (id, plaintext) of each.
async fn keys(
    client: &ApiKeyClient,
    org: apikeys_db::OrgId,
    prefix: &str,
    n: usize,
    expiring: Option<chrono::DateTime<chrono::Utc>>,
) -> Vec<(apikeys_db::KeyId, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut new = NewKey::new(format!("{prefix}{i}")).with_scopes(["read"]);
        if let Some(at) = expiring {
            new = new.expires_at(at);
        }
        let issued = client.create_key(org, new).await.unwrap();
        out.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    out
}

pub async fn warming_loads_the_live_keys_and_no_other(db: TestDb) {
    let clock = TestClock::at(chrono::Utc::now());
    let admin = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&admin, "acme").await;
    let live = keys(&admin, org, "live", 25, None).await;
    let revoked = keys(&admin, org, "revoked", 3, None).await;
    for (id, _) in &revoked {
        admin.revoke_key(*id).await.unwrap();
    }
    let expiring =
        keys(&admin, org, "expiring", 2, Some(clock.now() + TimeDelta::seconds(60))).await;
    clock.advance(TimeDelta::seconds(61));

    // A long bound: a loaded machine never makes this cache stop serving mid-test.
    let replica = db
        .client_with(|b| {
            b.clock(clock.as_fn()).cache(KeyCache::new().max_staleness(Duration::from_secs(30)))
        })
        .await;
    assert_eq!(replica.warm_cache().await.unwrap(), live.len());
    assert_eq!(stats(&replica).keys, live.len() as u64);
    serving(&replica, &live[0].1).await;

    // Every live key answered from memory: no lookup, no read of any kind.
    let before = stats(&replica);
    for (_, key) in &live {
        replica.validate_key(key, &untracked()).await.unwrap();
    }
    let after = stats(&replica);
    assert_eq!(after.hits, before.hits + live.len() as u64, "{before:?} {after:?}");
    assert_eq!(
        (after.misses, after.lookups, after.bypassed),
        (before.misses, before.lookups, before.bypassed)
    );

    // Left out, and refused as before (after a read of their own).
    for (_, key) in &revoked {
        let e = replica.validate_key(key, &untracked()).await.unwrap_err();
        assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
    }
    for (_, key) in &expiring {
        let e = replica.validate_key(key, &untracked()).await.unwrap_err();
        assert!(matches!(e, Error::Expired { .. }), "{e:?}");
    }
    assert_eq!(stats(&replica).lookups, after.lookups + 5);
    // Again: idempotent.
    assert_eq!(replica.warm_cache().await.unwrap(), live.len());
}

pub async fn warmed_keys_follow_changes_made_elsewhere(db: TestDb) {
    let admin = db.client().await;
    let org = org(&admin, "acme").await;
    let issued = keys(&admin, org, "k", 3, None).await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    assert_eq!(replica.warm_cache().await.unwrap(), 3);
    serving(&replica, &issued[0].1).await;
    let route = untracked().require_scopes(["read"]).unwrap();
    let before = stats(&replica);
    for (_, key) in &issued {
        replica.validate_key(key, &route).await.unwrap();
    }
    // Answered by what warming loaded.
    assert_eq!(stats(&replica).lookups, before.lookups);

    admin.revoke_key(issued[0].0).await.unwrap();
    let (e, _) = refused_within_bound(&replica, &issued[0].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
    admin.update_key(issued[1].0, KeyUpdate::new().with_scopes(["write"])).await.unwrap();
    let (e, _) = refused_within_bound(&replica, &issued[1].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::InsufficientScope { .. }), "{e:?}");
    admin.delete_key(issued[2].0).await.unwrap();
    let (e, _) = refused_within_bound(&replica, &issued[2].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::InvalidKey), "{e:?}");
}

/// Warming races revocations made by another client: once the bound has passed after the
/// last revocation, every revoked key is refused and every other key passes, however the
/// pages and the revocations interleaved.
pub async fn warming_racing_revocations_never_serves_a_revoked_key(db: TestDb) {
    let admin = db.client().await;
    let org = org(&admin, "acme").await;
    let issued = Arc::new(keys(&admin, org, "k", 300, None).await);
    // The shortest bound: the poller applies changes every few milliseconds, often while a
    // page is between its read and its insert.
    let bound = Duration::from_millis(20);
    let replica = db.client_with(|b| b.cache(KeyCache::new().max_staleness(bound))).await;

    // Every other key, revoked by another client while the replica warms again and again.
    let revoking = {
        let issued = Arc::clone(&issued);
        tokio::spawn(async move {
            for (id, _) in issued.iter().step_by(2) {
                admin.revoke_key(*id).await.unwrap();
            }
        })
    };
    let mut warmed = 0;
    while !revoking.is_finished() {
        replica.warm_cache().await.unwrap();
        warmed += 1;
    }
    revoking.await.unwrap();
    assert!(warmed > 1, "warmed {warmed} times");
    let revoked_by = Instant::now();
    // Checked until the bound has surely passed since the last revocation: from then on no
    // revoked key may pass.
    let route = untracked();
    loop {
        let late = revoked_by.elapsed() >= bound;
        for (i, (_, key)) in issued.iter().enumerate() {
            let result = replica.validate_key(key, &route).await;
            match (i % 2 == 0, result) {
                (true, Err(Error::Revoked { .. })) | (false, Ok(_)) => {}
                (true, Ok(_)) if !late => {}
                (revoked, other) => panic!("key {i} (revoked: {revoked}): {other:?}"),
            }
        }
        if late {
            break;
        }
        tokio::time::sleep(bound).await;
    }
}

/// A cache with room for exactly as many keys as there are (its shards fill unevenly): the
/// count returned is what the cache holds (warming stops at the first eviction rather than
/// swap keys out), and the keys it counts are answered from memory.
pub async fn warming_counts_what_the_cache_holds(db: TestDb) {
    let admin = db.client().await;
    let org = org(&admin, "acme").await;
    let issued = keys(&admin, org, "k", 400, None).await;
    let replica = db
        .client_with(|b| {
            b.cache(KeyCache::new().max_keys(400).max_staleness(Duration::from_secs(30)))
        })
        .await;
    let loaded = replica.warm_cache().await.unwrap();
    assert!(loaded > 0);
    assert_eq!(stats(&replica).keys, loaded as u64, "{:?}", stats(&replica));
    // The hits over every key are the keys loaded (the others miss, and are cached then).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = stats(&replica);
    assert!(before.feed_position.is_some());
    for (_, key) in &issued {
        replica.validate_key(key, &untracked()).await.unwrap();
    }
    let after = stats(&replica);
    let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
    assert_eq!(hits + misses, issued.len() as u64, "{before:?} {after:?}");
    // A miss caches its key, which may evict one loaded key before that key's check.
    assert!(hits >= (loaded as u64).saturating_sub(misses), "{loaded}: {before:?} {after:?}");
}

pub async fn warming_stops_at_the_cache_room(db: TestDb) {
    let admin = db.client().await;
    let org = org(&admin, "acme").await;
    let issued = keys(&admin, org, "k", 30, None).await;
    let replica = db.client_with(|b| b.cache(KeyCache::new().max_keys(10))).await;
    assert_eq!(replica.warm_cache().await.unwrap(), 10);
    assert!(stats(&replica).keys <= 10, "{:?}", stats(&replica));
    // The rest are found as before.
    for (_, key) in &issued {
        replica.validate_key(key, &untracked()).await.unwrap();
    }
}

pub async fn warming_needs_a_cache(db: TestDb) {
    let client = db.client().await;
    let e = client.warm_cache().await.unwrap_err();
    assert!(matches!(e, Error::Configuration { .. }), "{e:?}");
    assert!(e.to_string().contains("cache"), "{e}");
}

/// Keys stored under a previous signing secret only cannot be keyed by the current one
/// without their plaintext: left out, and re-hashed by their first check as before.
pub async fn warming_leaves_out_keys_under_a_previous_secret(db: TestDb) {
    let old = db.client_with(|b| b.signing_secret(V1)).await;
    let org = org(&old, "acme").await;
    let under_v1 = keys(&old, org, "v1-", 4, None).await;
    let rotating = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    let under_v2 = keys(&rotating, org, "v2-", 3, None).await;
    let replica = db
        .client_with(|b| {
            b.signing_secret(V2)
                .signing_secret_version(2)
                .previous_signing_secret(1, V1)
                .cache(KeyCache::new().max_staleness(Duration::from_secs(30)))
        })
        .await;
    assert_eq!(replica.warm_cache().await.unwrap(), under_v2.len());
    serving(&replica, &under_v2[0].1).await;
    // A replica still on v1 alone finds the v2 keys by their alternate (v1) hash.
    let behind = db
        .client_with(|b| {
            b.signing_secret(V1).cache(KeyCache::new().max_staleness(Duration::from_secs(30)))
        })
        .await;
    assert_eq!(behind.warm_cache().await.unwrap(), under_v1.len() + under_v2.len());
    serving(&behind, &under_v2[0].1).await;
    let before = stats(&behind);
    for (_, key) in under_v1.iter().chain(&under_v2) {
        behind.validate_key(key, &untracked()).await.unwrap();
    }
    assert_eq!(stats(&behind).lookups, before.lookups);
    // A tracked check re-hashes a v1 key; warming again then finds it under v2.
    for (_, key) in &under_v1 {
        replica.validate_key(key, &ValidateOptions::new()).await.unwrap();
    }
    assert_eq!(replica.warm_cache().await.unwrap(), under_v1.len() + under_v2.len());
}
