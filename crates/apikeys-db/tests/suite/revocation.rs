//! Revocation that cannot be lost: the verified-key cache and its change feed under cache
//! churn, a feed restored or failed over, a writer whose clock is behind followed by a purge,
//! a slow feed, a busy pool, and host transactions holding locks. Each case is written the
//! way the failure it guards against happened.

use std::time::{Duration, Instant};

use apikeys_db::sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use apikeys_db::{ApiKeyClient, Error, KeyCache, KeyId, KeyUpdate, NewKey, ValidateOptions};
use chrono::{TimeDelta, Utc};

use crate::cache::{BOUND, cache, warm};
use crate::keys::org;
use apikeys_testing::TestDb;

fn untracked() -> ValidateOptions {
    ValidateOptions::new().track_usage(false)
}

/// The feed's head, read from the database.
async fn head(client: &ApiKeyClient) -> i64 {
    let db = client.connection();
    let sql = "SELECT seq FROM key_changes_head WHERE id = 1";
    let row = db.query_one_raw(Statement::from_string(db.get_database_backend(), sql)).await;
    row.unwrap().unwrap().try_get::<i64>("", "seq").unwrap()
}

/// Waits until `replica`'s cache has applied the feed up to its head.
async fn caught_up(replica: &ApiKeyClient) {
    let target = head(replica).await;
    for _ in 0..2_000 {
        if replica.cache_stats().unwrap().feed_position == Some(target) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the cache never reached the feed's head {target}: {:?}", replica.cache_stats());
}

/// Checks `key` until it is refused, and returns the refusal. Every check that starts more
/// than `bound` after `changed` must be refused; one still accepted 10 s after `changed`
/// (far past any bound of these tests) fails the test.
async fn refused(replica: &ApiKeyClient, key: &str, changed: Instant, bound: Duration) -> Error {
    loop {
        let started = Instant::now();
        match replica.validate_key(key, &untracked()).await {
            Ok(_) => {
                assert!(
                    started < changed + bound,
                    "a changed key was accepted {:?} after the change (bound {bound:?}): {:?}",
                    started - changed,
                    replica.cache_stats()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return e,
        }
    }
}

/// Runs `sql` (no placeholders) on `conn`.
async fn exec(conn: &impl ConnectionTrait, sql: &str) {
    conn.execute_raw(Statement::from_string(conn.get_database_backend(), sql)).await.unwrap();
}

/// A small cache churned by many tasks checking many keys while half of them are revoked by
/// another client and half by the caching client itself: no check that starts after the
/// bound (for its own revocations: after the call returned) may pass. Every insert evicts an
/// entry here, which is when the id map once lost entries.
pub async fn churn_never_loses_a_revocation(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache().max_keys(8))).await;
    let org = org(&admin, "acme").await;
    let mut keys: Vec<(KeyId, String)> = Vec::new();
    for i in 0..48 {
        let issued = admin.create_key(org, NewKey::new(format!("k{i}"))).await.unwrap();
        keys.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    warm(&replica, &keys[0].1, &untracked()).await;
    let churn = |rounds: usize, seed: usize| {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (replica, keys) = (replica.clone(), keys.clone());
                tokio::spawn(async move {
                    let mut judged = Vec::new();
                    for i in 0..rounds {
                        let n = (i * 7 + t * 13 + seed) % keys.len();
                        let started = Instant::now();
                        let result = replica.validate_key(&keys[n].1, &untracked()).await;
                        judged.push((n, started, result.is_ok()));
                    }
                    judged
                })
            })
            .collect();
        async move {
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.unwrap());
            }
            all
        }
    };
    // Churn first: every key passes.
    assert!(churn(200, 0).await.into_iter().all(|(_, _, ok)| ok));
    // Revoke every key while the churn goes on: even ones by the admin, odd ones by the
    // replica itself.
    let during = tokio::spawn(churn(200, 3));
    let mut revoked_at = vec![None; keys.len()];
    for (n, (id, _)) in keys.iter().enumerate() {
        let by = if n % 2 == 0 { &admin } else { &replica };
        by.revoke_key(*id).await.unwrap();
        // The replica's own revocations hold at once, the admin's within the bound.
        let grace = if n % 2 == 0 { BOUND } else { Duration::ZERO };
        revoked_at[n] = Some(Instant::now() + grace);
    }
    let mut judged = during.await.unwrap();
    judged.extend(churn(400, 5).await);
    let mut checked = 0;
    for (n, started, ok) in judged {
        let Some(deadline) = revoked_at[n] else { continue };
        if started > deadline {
            checked += 1;
            assert!(
                !ok,
                "key {n} passed after its revocation had to hold: {:?}",
                replica.cache_stats()
            );
        }
    }
    assert!(checked > 1_000, "too few checks judged: {checked}");
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{:?}: {checked} checks after revocations judged, none passed", db.backend);
    }
}

/// The feed numbers given out again, as after a point-in-time restore or a failover to a
/// replica that lost the last commits: first with the head below what the cache applied,
/// then with the head climbed back past it before the cache polled (the row it applied last
/// is another row now). Either way the cache empties itself and the revocations that took
/// the reused numbers hold.
pub async fn a_feed_that_went_back_is_noticed(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let mut keys = Vec::new();
    for i in 0..3 {
        let issued = admin.create_key(org, NewKey::new(format!("k{i}"))).await.unwrap();
        keys.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    let other = keys[2].0;
    for (_, key) in &keys[..2] {
        warm(&replica, key, &untracked()).await;
    }
    for name in ["a", "b", "c", "d", "e"] {
        admin.update_key(other, KeyUpdate::new().with_name(name)).await.unwrap();
    }
    caught_up(&replica).await;
    let position = head(&admin).await;
    assert!(position >= 5);

    // Restored to when the head was 2: the rows after it are gone, and the next change
    // (a revocation) takes number 3 again, below what the replica applied.
    let restored = position - 3;
    let conn = admin.connection();
    exec(conn, &format!("DELETE FROM key_changes WHERE seq > {restored}")).await;
    exec(conn, &format!("UPDATE key_changes_head SET seq = {restored} WHERE id = 1")).await;
    admin.revoke_key(keys[0].0).await.unwrap();
    let e = refused(&replica, &keys[0].1, Instant::now(), BOUND).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
    caught_up(&replica).await;
    let restarts = replica.cache_stats().unwrap().feed_restarts;
    assert!(restarts >= 1);
    warm(&replica, &keys[1].1, &untracked()).await;
    caught_up(&replica).await;

    // Failed over to a replica that lost the last two commits; before the cache polls, new
    // changes (a revocation first) climb past its position again, all in one transaction.
    let position = head(&admin).await;
    let lost = position - 2;
    let txn = admin.begin().await.unwrap();
    exec(&txn, &format!("DELETE FROM key_changes WHERE seq > {lost}")).await;
    exec(&txn, &format!("UPDATE key_changes_head SET seq = {lost} WHERE id = 1")).await;
    admin.with(&txn).revoke_key(keys[1].0).await.unwrap();
    for name in ["f", "g", "h"] {
        admin.with(&txn).update_key(other, KeyUpdate::new().with_name(name)).await.unwrap();
    }
    txn.commit().await.unwrap();
    assert!(head(&admin).await > position, "the head climbed back past the replica's position");
    let e = refused(&replica, &keys[1].1, Instant::now(), BOUND).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
    assert!(replica.cache_stats().unwrap().feed_restarts > restarts);
}

/// A writer whose clock is two minutes behind revokes a key between two changes of a writer
/// on time, and the latter purges the feed (one-minute retention) before the caching client
/// has read the revocation: the purge deletes only a prefix of the feed, so the revocation's
/// row stays (or, were it purged, the reader would see a number missing). The revocation
/// holds.
pub async fn a_writer_behind_and_a_purge_leave_no_hole(db: TestDb) {
    let retention = KeyCache::new().feed_retention(Duration::from_secs(60));
    let on_time = db.client_with(|b| b.cache(retention)).await;
    let behind = db.client_with(|b| b.clock(|| Utc::now() - TimeDelta::minutes(2))).await;
    // Polls once a second: the three changes and the purge land between two of its polls.
    let replica =
        db.client_with(|b| b.cache(KeyCache::new().max_staleness(Duration::from_secs(30)))).await;
    let org = org(&on_time, "acme").await;
    let issued = on_time.create_key(org, NewKey::new("k")).await.unwrap();
    let other = on_time.create_key(org, NewKey::new("other")).await.unwrap().record.id;
    let key = issued.key.expose_secret().to_owned();
    warm(&replica, &key, &untracked()).await;
    on_time.update_key(other, KeyUpdate::new().with_name("a")).await.unwrap();
    caught_up(&replica).await;

    let txn = on_time.begin().await.unwrap();
    on_time.with(&txn).update_key(other, KeyUpdate::new().with_name("b")).await.unwrap();
    behind.with(&txn).revoke_key(issued.record.id).await.unwrap();
    on_time.with(&txn).update_key(other, KeyUpdate::new().with_name("c")).await.unwrap();
    txn.commit().await.unwrap();
    let changed = Instant::now();
    on_time.purge_change_feed().await.unwrap();
    assert_eq!(db.count(&on_time, "key_changes").await, 4, "a row after a fresh one was purged");
    let e = refused(&replica, &key, changed, Duration::from_secs(30)).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
}

/// The feed's read hangs (every pooled connection held) for longer than the bound: with
/// `stale_if_error`, a poll in flight past the bound counts as failing, so cached keys keep
/// being answered from memory instead of all funnelling into database lookups that cannot
/// get a connection.
pub async fn a_slow_feed_with_stale_if_error_keeps_serving(db: TestDb) {
    let admin = db.client().await;
    let replica = db
        .client_with(|b| {
            b.cache(cache().stale_if_error(Duration::from_secs(60)))
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
        })
        .await;
    let org = org(&admin, "acme").await;
    let key = admin.create_key(org, NewKey::new("k")).await.unwrap().key;
    let key = key.expose_secret().to_owned();
    warm(&replica, &key, &untracked()).await;
    // The pool's one connection (the one the poller reads through) held by the host.
    let held = replica.connection().begin().await.unwrap();
    tokio::time::sleep(BOUND * 3).await;
    let hits = replica.cache_stats().unwrap().hits;
    for _ in 0..20 {
        replica.validate_key(&key, &untracked()).await.unwrap();
    }
    assert_eq!(replica.cache_stats().unwrap().hits, hits + 20, "{:?}", replica.cache_stats());
    held.rollback().await.unwrap();
}

/// Every pooled connection busy (held by host transactions) past the acquire timeout: the
/// calls that waited fail with `Unavailable`, but the database is up, so the breaker stays
/// closed and the next call, once a connection is free, succeeds at once instead of failing
/// fast until a probe.
pub async fn a_busy_pool_is_not_an_outage(db: TestDb) {
    let client = db
        .client_with(|b| {
            b.max_connections(2)
                .acquire_timeout(Duration::from_millis(500))
                .reconnect_interval(Duration::from_secs(60))
        })
        .await;
    let org = org(&client, "acme").await;
    let key = client.create_key(org, NewKey::new("k")).await.unwrap().key;
    let key = key.expose_secret().to_owned();
    // On SQLite writes go through one connection of their own: one host transaction holds it.
    // On the servers both pooled connections are held.
    let mut held = vec![client.begin().await.unwrap()];
    if db.backend != apikeys_testing::Backend::Sqlite {
        held.push(client.begin().await.unwrap());
    }
    let r = client.validate_key(&key, &ValidateOptions::new()).await;
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    for txn in held {
        txn.rollback().await.unwrap();
    }
    client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    client.validate_key(&key, &untracked()).await.unwrap();
}

/// What a host transaction holds, as documented on `InTransaction`: one that only creates
/// (a sign-up) holds up no revocation on PostgreSQL and MySQL (on SQLite every write
/// transaction holds the database's write lock); one that changed a key holds the feed's
/// head until it ends, and a revocation elsewhere waits, then fails with `Unavailable` past
/// the statement timeout, and succeeds once the host has committed.
pub async fn host_transactions_hold_what_is_documented(db: TestDb) {
    let host = db.client().await;
    let other = db
        .client_with(|b| {
            b.statement_timeout(Duration::from_secs(1)).acquire_timeout(Duration::from_secs(2))
        })
        .await;
    let tenant_a = org(&host, "tenant-a").await;
    let tenant_b = org(&host, "tenant-b").await;
    let in_b: Vec<KeyId> = {
        let mut ids = Vec::new();
        for i in 0..2 {
            ids.push(
                host.create_key(tenant_b, NewKey::new(format!("b{i}"))).await.unwrap().record.id,
            );
        }
        ids
    };

    // A sign-up: an organization, a project, a product and a key, still open.
    let txn = host.begin().await.unwrap();
    let (new_org, _) = host.with(&txn).get_or_create_organization("new-customer").await.unwrap();
    host.with(&txn).get_or_create_project(new_org.id, "web").await.unwrap();
    host.with(&txn).create_key(new_org.id, NewKey::new("first")).await.unwrap();
    let revoked = other.revoke_key(in_b[0]).await;
    match db.backend {
        apikeys_testing::Backend::Sqlite => {
            assert!(matches!(revoked, Err(Error::Unavailable { .. })), "{revoked:?}");
        }
        _ => assert!(revoked.is_ok(), "{revoked:?}"),
    }
    txn.commit().await.unwrap();
    other.revoke_key(in_b[0]).await.unwrap();

    // A host transaction that changed a key in tenant A holds the feed's head.
    let a_key = host.create_key(tenant_a, NewKey::new("a")).await.unwrap().record.id;
    let txn = host.begin().await.unwrap();
    host.with(&txn).update_key(a_key, KeyUpdate::new().with_name("renamed")).await.unwrap();
    let waited = other.revoke_key(in_b[1]).await;
    assert!(matches!(waited, Err(Error::Unavailable { .. })), "{waited:?}");
    txn.commit().await.unwrap();
    let key = other.revoke_key(in_b[1]).await.unwrap();
    assert!(key.revoked_at.is_some());
}

/// A feed row of a kind this version does not know (written by a newer version during a
/// rolling deploy) may touch any cached entry: the cache empties itself instead of skipping
/// it. Here the row stands for a revocation this version cannot read: the key is revoked in
/// SQL and only such a row announces it.
pub async fn a_feed_row_of_an_unknown_kind_empties_the_cache(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let issued = admin.create_key(org, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    warm(&replica, &key, &untracked()).await;
    caught_up(&replica).await;
    let next = head(&admin).await + 1;
    let txn = admin.begin().await.unwrap();
    exec(&txn, "UPDATE api_keys SET revoked_at = '2020-01-01 00:00:00'").await;
    exec(&txn, &format!("UPDATE key_changes_head SET seq = {next} WHERE id = 1")).await;
    exec(
        &txn,
        &format!(
            "INSERT INTO key_changes (seq, created_at, token) \
             VALUES ({next}, '2026-01-01 00:00:00', 7)"
        ),
    )
    .await;
    txn.commit().await.unwrap();
    let e = refused(&replica, &key, Instant::now(), BOUND).await;
    assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
}

/// A key cached from rows a restore then lost (its creation writes no feed row, so the feed
/// shows nothing): revoking or deleting it by id finds no row, and still tells every cache
/// to drop it, so the operator can end a key the database no longer knows.
pub async fn a_key_the_database_lost_can_still_be_revoked(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let mut lost = Vec::new();
    for name in ["revoked", "deleted"] {
        let issued = admin.create_key(org, NewKey::new(name)).await.unwrap();
        warm(&replica, issued.key.expose_secret(), &untracked()).await;
        lost.push((issued.record.id, issued.key.expose_secret().to_owned()));
    }
    // The restore: the keys' rows are gone, and no feed row says so.
    exec(admin.connection(), "DELETE FROM api_keys").await;
    replica.validate_key(&lost[0].1, &untracked()).await.unwrap();
    let r = admin.revoke_key(lost[0].0).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    let r = admin.delete_key(lost[1].0).await;
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
    for (_, key) in &lost {
        let e = refused(&replica, key, Instant::now(), BOUND).await;
        assert!(matches!(e, Error::InvalidKey), "{e:?}");
    }
}

/// After a quiet spell longer than the feed's retention, a change and the purge right after
/// it (the client purges in the background after its changes) keep the row every up-to-date
/// reader sits on: none of them finds its row gone and empties its cache for nothing.
pub async fn a_purge_after_a_quiet_spell_keeps_readers_in_place(db: TestDb) {
    let clock = apikeys_testing::TestClock::at(Utc::now());
    let admin = db.client_with(|b| b.clock(clock.as_fn())).await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let id = admin.create_key(org, NewKey::new("k")).await.unwrap().record.id;
    admin.update_key(id, KeyUpdate::new().with_name("a")).await.unwrap();
    caught_up(&replica).await;
    let restarts = replica.cache_stats().unwrap().feed_restarts;
    clock.advance(TimeDelta::hours(2));
    admin.update_key(id, KeyUpdate::new().with_name("b")).await.unwrap();
    admin.purge_change_feed().await.unwrap();
    caught_up(&replica).await;
    assert_eq!(
        replica.cache_stats().unwrap().feed_restarts,
        restarts,
        "{:?}",
        replica.cache_stats()
    );
    assert_eq!(db.count(&admin, "key_changes").await, 2, "the row before the fresh one stays");
}
