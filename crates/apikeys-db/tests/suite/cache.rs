//! The verified-key cache: checks answered from memory, changes seen at once by the client
//! that made them and within `max_staleness` by every other, unknown keys bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apikeys_db::sea_orm::{ConnectionTrait, Statement};
use apikeys_db::{
    ApiKeyClient, CacheStats, Error, KeyCache, KeyUpdate, NewKey, ValidateOptions, VerifyOptions,
};
use chrono::TimeDelta;

use crate::keys::org;
use apikeys_testing::{TestClock, TestDb};

/// The staleness bound of these tests.
pub const BOUND: Duration = Duration::from_millis(300);

pub fn cache() -> KeyCache {
    KeyCache::new().max_staleness(BOUND)
}

/// A cache for tests that count what it answers: a bound long enough that a poller delayed
/// by a loaded machine never makes it stop serving mid-test.
fn counting_cache() -> KeyCache {
    KeyCache::new().max_staleness(Duration::from_secs(30))
}

fn stats(client: &ApiKeyClient) -> CacheStats {
    client.cache_stats().expect("a client with a cache")
}

/// Checks `key` until the cache answers it (its first poll has run and the key is cached).
pub async fn warm(client: &ApiKeyClient, key: &str, options: &ValidateOptions) {
    for _ in 0..1_000 {
        let before = stats(client).hits;
        client.validate_key(key, options).await.expect("a valid key");
        if stats(client).hits > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the cache never answered: {:?}", stats(client));
}

fn untracked() -> ValidateOptions {
    ValidateOptions::new().track_usage(false)
}

pub async fn checks_are_served_from_memory(db: TestDb) {
    let clock = TestClock::at(chrono::Utc::now());
    let client = db.client_with(|b| b.cache(counting_cache()).clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let (project, _) = client.get_or_create_project(org, "web").await.unwrap();
    let (api, _) = client.get_or_create_product(org, "api").await.unwrap();
    client.add_product_to_project(api.id, project.id).await.unwrap();
    let new = NewKey::new("k")
        .with_scopes(["read"])
        .with_project(project.id)
        .expires_at(clock.now() + TimeDelta::seconds(60));
    let key = client.create_key(org, new).await.unwrap().key.expose_secret().to_owned();
    let route = untracked().for_product(api.id).require_scopes(["read"]).unwrap();
    warm(&client, &key, &route).await;

    let before = stats(&client);
    for _ in 0..50 {
        client.validate_key(&key, &route).await.unwrap();
        client.verify_key(&key, &VerifyOptions::new().track_usage(false)).await.unwrap();
    }
    // Still refused from memory: the wrong scope, and (decided against the clock on every
    // call) expiry.
    let write = untracked().for_product(api.id).require_scopes(["write"]).unwrap();
    assert!(matches!(
        client.validate_key(&key, &write).await,
        Err(Error::InsufficientScope { .. })
    ));
    clock.advance(TimeDelta::seconds(61));
    assert!(matches!(client.validate_key(&key, &route).await, Err(Error::Expired { .. })));
    let after = stats(&client);
    assert_eq!(after.lookups, before.lookups, "no database lookup: {before:?} {after:?}");
    assert_eq!(after.hits, before.hits + 102);
    assert_eq!(after.keys, 1);
}

pub async fn the_same_client_sees_its_changes_at_once(db: TestDb) {
    let client = db.client_with(|b| b.cache(counting_cache())).await;
    let org = org(&client, "acme").await;
    let (project, _) = client.get_or_create_project(org, "web").await.unwrap();
    let (api, _) = client.get_or_create_product(org, "api").await.unwrap();
    client.add_product_to_project(api.id, project.id).await.unwrap();
    let route = untracked().for_product(api.id).require_scopes(["read"]).unwrap();
    let mut keys = Vec::new();
    for i in 0..6 {
        let new = NewKey::new(format!("k{i}")).with_scopes(["read"]).with_project(project.id);
        let issued = client.create_key(org, new).await.unwrap();
        warm(&client, issued.key.expose_secret(), &route).await;
        keys.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    let check = |i: usize| client.validate_key(&keys[i].1, &route);

    client.revoke_key(keys[0].0).await.unwrap();
    assert!(matches!(check(0).await, Err(Error::Revoked { .. })));
    client.update_key(keys[1].0, KeyUpdate::new().with_scopes(["write"])).await.unwrap();
    assert!(matches!(check(1).await, Err(Error::InsufficientScope { .. })));
    client.delete_key(keys[2].0).await.unwrap();
    assert!(matches!(check(2).await, Err(Error::InvalidKey)));
    client.remove_product_from_project(api.id, project.id).await.unwrap();
    assert!(matches!(check(3).await, Err(Error::ProductNotAllowed { .. })));
    client.add_product_to_project(api.id, project.id).await.unwrap();
    check(3).await.unwrap();

    // In the host's transaction: the old state until it commits, the new one at once after.
    let txn = client.begin().await.unwrap();
    client.with(&txn).revoke_key(keys[4].0).await.unwrap();
    check(4).await.unwrap();
    txn.commit().await.unwrap();
    assert!(matches!(check(4).await, Err(Error::Revoked { .. })));
    // Rolled back: nothing changed, and the key is still answered.
    let txn = client.begin().await.unwrap();
    client.with(&txn).update_key(keys[5].0, KeyUpdate::new().with_scopes(["x"])).await.unwrap();
    txn.rollback().await.unwrap();
    check(5).await.unwrap();
    // Once any later change has taken the rolled-back change's place in the feed, the key is
    // served from memory again.
    client.update_key(keys[3].0, KeyUpdate::new().with_name("renamed")).await.unwrap();
    warm(&client, &keys[5].1, &route).await;
}

/// Checks `key` until it is refused; every check that starts after `changed + BOUND` must be
/// refused (the cache's guarantee, whatever the machine's load). Returns the refusal and how
/// long after `changed` it came.
pub async fn refused_within_bound(
    client: &ApiKeyClient,
    key: &str,
    options: &ValidateOptions,
    changed: Instant,
) -> (Error, Duration) {
    loop {
        let started = Instant::now();
        match client.validate_key(key, options).await {
            Ok(_) => assert!(
                started < changed + BOUND,
                "served {:?} after the change, bound {BOUND:?}",
                started - changed
            ),
            Err(e) => return (e, changed.elapsed()),
        }
    }
}

pub async fn other_clients_see_changes_within_the_bound(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let (project, _) = admin.get_or_create_project(org, "web").await.unwrap();
    let (api, _) = admin.get_or_create_product(org, "api").await.unwrap();
    admin.add_product_to_project(api.id, project.id).await.unwrap();
    let route = untracked().for_product(api.id).require_scopes(["read"]).unwrap();
    let mut keys = Vec::new();
    for i in 0..4 {
        let new = NewKey::new(format!("k{i}")).with_scopes(["read"]).with_project(project.id);
        let issued = admin.create_key(org, new).await.unwrap();
        // Created elsewhere, usable here at once.
        replica.validate_key(issued.key.expose_secret(), &route).await.unwrap();
        warm(&replica, issued.key.expose_secret(), &route).await;
        keys.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    let mut delays = Vec::new();
    admin.revoke_key(keys[0].0).await.unwrap();
    let (e, d) = refused_within_bound(&replica, &keys[0].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
    delays.push(d);
    admin.update_key(keys[1].0, KeyUpdate::new().with_scopes(["write"])).await.unwrap();
    let (e, d) = refused_within_bound(&replica, &keys[1].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::InsufficientScope { .. }), "{e:?}");
    delays.push(d);
    admin.delete_key(keys[2].0).await.unwrap();
    let (e, d) = refused_within_bound(&replica, &keys[2].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::InvalidKey), "{e:?}");
    delays.push(d);
    admin.remove_product_from_project(api.id, project.id).await.unwrap();
    let (e, d) = refused_within_bound(&replica, &keys[3].1, &route, Instant::now()).await;
    assert!(matches!(e, Error::ProductNotAllowed { .. }), "{e:?}");
    delays.push(d);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{:?}: refused after {delays:?} (bound {BOUND:?})", db.backend);
    }
}

pub async fn unknown_keys_are_remembered_but_never_as_valid(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(counting_cache())).await;
    let org = org(&admin, "acme").await;
    let known = admin.create_key(org, NewKey::new("known")).await.unwrap();
    warm(&replica, known.key.expose_secret(), &untracked()).await;
    // A well-formed key that does not exist: read once, then refused from memory.
    let made_up = replica.key_format().generate().unwrap();
    let before = stats(&replica);
    for _ in 0..3 {
        let r = replica.validate_key(made_up.expose_secret(), &untracked()).await;
        assert!(matches!(r, Err(Error::InvalidKey)), "{r:?}");
    }
    let after = stats(&replica);
    assert_eq!(
        (after.unknown - before.unknown, after.lookups - before.lookups),
        (2, 1),
        "{before:?} {after:?}"
    );
    // A key created elsewhere is usable here at once, never remembered as unknown.
    for i in 0..5 {
        let issued = admin.create_key(org, NewKey::new(format!("new{i}"))).await.unwrap();
        replica.validate_key(issued.key.expose_secret(), &untracked()).await.unwrap();
    }
}

pub async fn a_flood_of_unknown_keys_leaves_real_keys_working(db: TestDb) {
    // Few pooled connections, two of which at most may serve lookups of uncached keys.
    let client = db
        .client_with(|b| {
            b.cache(counting_cache().max_concurrent_misses(2))
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
        })
        .await;
    let org = org(&client, "acme").await;
    let real = client.create_key(org, NewKey::new("real")).await.unwrap();
    let real = real.key.expose_secret().to_owned();
    warm(&client, &real, &untracked()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..32)
        .map(|_| {
            let (client, stop, flooded) = (client.clone(), stop.clone(), flooded.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let made_up = client.key_format().generate().unwrap();
                    match client.validate_key(made_up.expose_secret(), &untracked()).await {
                        Err(Error::InvalidKey | Error::Unavailable { .. }) => {}
                        other => panic!("a made-up key: {other:?}"),
                    }
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    while flooded.load(Ordering::Relaxed) < 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // While it runs: the real key, with usage written at once (a pooled connection per
    // check), keeps succeeding; so do admin calls, and a new key's first check.
    for i in 0..30 {
        client.validate_key(&real, &ValidateOptions::new()).await.unwrap();
        if i % 10 == 0 {
            let issued = client.create_key(org, NewKey::new(format!("during {i}"))).await.unwrap();
            client.validate_key(issued.key.expose_secret(), &untracked()).await.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    let s = stats(&client);
    assert!(s.lookups >= 50 && s.hits >= 30, "{s:?}");
}

pub async fn a_failing_feed_stops_the_cache(db: TestDb) {
    let strict = db.client_with(|b| b.cache(cache())).await;
    let lenient =
        db.client_with(|b| b.cache(cache().stale_if_error(Duration::from_secs(600)))).await;
    let org = org(&strict, "acme").await;
    let issued = strict.create_key(org, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    warm(&strict, &key, &untracked()).await;
    warm(&lenient, &key, &untracked()).await;
    // The feed becomes unreadable, and the key is revoked behind the clients' backs.
    let db_conn = strict.connection();
    let backend = db_conn.get_database_backend();
    let exec = |sql: String| db_conn.execute_raw(Statement::from_string(backend, sql));
    exec("DROP TABLE key_changes".into()).await.unwrap();
    let broken = Instant::now();
    exec("UPDATE api_keys SET revoked_at = '2020-01-01 00:00:00'".into()).await.unwrap();
    // Past the bound, the strict cache no longer answers: the database says revoked.
    tokio::time::sleep(BOUND.saturating_sub(broken.elapsed()) + Duration::from_millis(10)).await;
    while stats(&lenient).failed_polls == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = strict.validate_key(&key, &untracked()).await;
    assert!(matches!(r, Err(Error::Revoked { .. })), "{r:?}");
    assert!(stats(&strict).bypassed > 0);
    // With stale-if-error, the cached entry is still served, as configured.
    lenient.validate_key(&key, &untracked()).await.unwrap();
}

pub async fn rehash_refreshes_the_cached_entry(db: TestDb) {
    const V1: &str = "first-signing-secret-0123456789-abcdefgh";
    const V2: &str = "second-signing-secret-0123456789-abcdefg";
    let old = db.client_with(|b| b.signing_secret(V1)).await;
    let rotating = db
        .client_with(|b| {
            b.signing_secret(V2)
                .signing_secret_version(2)
                .previous_signing_secret(1, V1)
                .cache(counting_cache())
        })
        .await;
    let org = org(&old, "acme").await;
    let key = old.create_key(org, NewKey::new("k")).await.unwrap().key.expose_secret().to_owned();
    warm(&rotating, &key, &untracked()).await;
    assert_eq!(rotating.keys_per_secret_version().await.unwrap(), vec![(1, 1)]);
    // A tracked check moves the key to v2 and drops the entry that said a move was due;
    // the next check reads the moved row, and later ones are answered from memory again.
    rotating.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    // (The v1 hash stays as the alternate, for replicas on v1 alone.)
    assert_eq!(rotating.keys_per_secret_version().await.unwrap(), vec![(1, 1), (2, 1)]);
    let lookups = stats(&rotating).lookups;
    rotating.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    assert_eq!(stats(&rotating).lookups, lookups + 1);
    warm(&rotating, &key, &untracked()).await;
    old.verify_key(&key, &VerifyOptions::new().track_usage(false)).await.unwrap();
}

pub async fn the_cache_holds_at_most_max_keys(db: TestDb) {
    let client = db.client_with(|b| b.cache(counting_cache().max_keys(8))).await;
    let org = org(&client, "acme").await;
    let mut keys = Vec::new();
    for i in 0..40 {
        let issued = client.create_key(org, NewKey::new(format!("k{i}"))).await.unwrap();
        keys.push(issued.key.expose_secret().to_owned());
    }
    warm(&client, &keys[0], &untracked()).await;
    for _ in 0..3 {
        for k in &keys {
            client.validate_key(k, &untracked()).await.unwrap();
            assert!(stats(&client).keys <= 8, "{:?}", stats(&client));
        }
    }
}

pub async fn a_client_behind_the_purged_feed_empties_its_cache(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(counting_cache())).await;
    let org = org(&admin, "acme").await;
    let k1 = admin.create_key(org, NewKey::new("k1")).await.unwrap();
    let k2 = admin.create_key(org, NewKey::new("k2")).await.unwrap();
    warm(&replica, k1.key.expose_secret(), &untracked()).await;
    // Two changes whose feed rows are purged before the replica reads them, as when it was
    // paused for longer than the retention: it finds only the newest row, after a gap.
    let txn = admin.begin().await.unwrap();
    admin.with(&txn).revoke_key(k1.record.id).await.unwrap();
    admin.with(&txn).update_key(k2.record.id, KeyUpdate::new().with_name("b")).await.unwrap();
    let purge =
        "DELETE FROM key_changes WHERE seq < (SELECT seq FROM key_changes_head WHERE id = 1)";
    txn.execute_unprepared(purge).await.unwrap();
    txn.commit().await.unwrap();
    // The replica notices the gap and empties its cache: the revoked key is read again.
    for _ in 0..2_000 {
        match replica.validate_key(k1.key.expose_secret(), &untracked()).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(Error::Revoked { .. }) => return,
            Err(e) => panic!("{e:?}"),
        }
    }
    panic!("the replica kept serving a key revoked behind a gap: {:?}", stats(&replica));
}

pub async fn purge_change_feed_keeps_the_newest_row(db: TestDb) {
    let clock = TestClock::at(chrono::Utc::now());
    let admin = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&admin, "acme").await;
    let id = admin.create_key(org, NewKey::new("k")).await.unwrap().record.id;
    for name in ["a", "b", "c"] {
        admin.update_key(id, KeyUpdate::new().with_name(name)).await.unwrap();
    }
    assert_eq!(db.count(&admin, "key_changes").await, 3);
    assert_eq!(admin.purge_change_feed().await.unwrap(), 0, "nothing an hour old yet");
    clock.advance(TimeDelta::hours(2));
    assert_eq!(admin.purge_change_feed().await.unwrap(), 2);
    assert_eq!(db.count(&admin, "key_changes").await, 1, "the newest row stays");
}
