//! Disable and enable (a reversible switch, unlike revoke) and IP allowlists, on every
//! backend: what a check answers, what it spends, what other replicas see, and the schema
//! step that brought them.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apikeys_db::{
    Credits, Error, IpAllowlist, KeyAction, KeyStatus, KeyUpdate, NewKey, Page, RateLimit,
    StatusFilter, ValidateOptions, VerifyOptions, Window,
};
use chrono::Utc;

use crate::cache::{cache, refused_within_bound, warm};
use crate::keys::org;
use apikeys_testing::{TestDb, leave_room};

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

fn list(nets: &[&str]) -> IpAllowlist {
    IpAllowlist::parse(nets).unwrap()
}

/// A disabled key is refused everywhere with `Disabled` until enabled; while disabled it
/// spends no rate limit and no credit; disabling twice keeps the first time and records one
/// event; a revoked key can be neither disabled nor enabled (nothing written); a roll of a
/// disabled key hands on a disabled key; listings tell disabled keys apart.
pub async fn a_disabled_key_is_refused_until_enabled(db: TestDb) {
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let new = NewKey::new("k")
        .with_rate_limit(RateLimit::per_hour(3).unwrap())
        .with_credits(Credits::new(5));
    let issued = client.create_key(org, new).await.unwrap();
    let (key, id) = (issued.key.expose_secret().to_owned(), issued.record.id);
    // Every check in one hour of the database's clock (a new hour would admit 3 more).
    leave_room(&client, Window::Hour, Duration::from_secs(60)).await;
    client.validate_key(&key, &ValidateOptions::new()).await.unwrap();

    let disabled = client.disable_key(id).await.unwrap();
    let since = disabled.disabled_at.expect("disabled_at is set");
    assert_eq!(disabled.status(Utc::now()), KeyStatus::Disabled);
    for _ in 0..5 {
        match client.validate_key(&key, &ValidateOptions::new()).await {
            Err(Error::Disabled { disabled_at }) => assert_eq!(disabled_at, since),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        client.verify_key(&key, &VerifyOptions::new()).await,
        Err(Error::Disabled { .. })
    ));
    let again = client.disable_key(id).await.unwrap();
    assert_eq!(again.disabled_at, Some(since), "a second disable keeps the first time");
    let page = Page::first(10).unwrap();
    let count = async |status| client.list_org_keys(org, status, page).await.unwrap().items.len();
    assert_eq!((count(StatusFilter::Disabled).await, count(StatusFilter::Active).await), (1, 0));

    let enabled = client.enable_key(id).await.unwrap();
    assert_eq!((enabled.disabled_at, enabled.status(Utc::now())), (None, KeyStatus::Active));
    client.enable_key(id).await.unwrap();
    assert_eq!((count(StatusFilter::Disabled).await, count(StatusFilter::Active).await), (0, 1));
    // The refused checks spent nothing: two more are admitted (3 an hour), one credit each.
    let after = client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    assert_eq!(after.credits.unwrap().remaining, 3);
    client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    assert!(matches!(
        client.validate_key(&key, &ValidateOptions::new()).await,
        Err(Error::Quota { .. })
    ));
    let events = client.list_key_events(id).await.unwrap();
    let count_of = |a| events.iter().filter(|e| e.action == a).count();
    assert_eq!((count_of(KeyAction::Disabled), count_of(KeyAction::Enabled)), (1, 1));

    // A roll of a disabled key hands on a disabled key.
    client.disable_key(id).await.unwrap();
    let rolled = client.roll_key(id, Duration::from_secs(60)).await.unwrap();
    assert!(rolled.record.disabled_at.is_some());
    assert!(matches!(
        client.verify_key(rolled.key.expose_secret(), &VerifyOptions::new()).await,
        Err(Error::Disabled { .. })
    ));

    // A revocation is final.
    let other = client.create_key(org, NewKey::new("r")).await.unwrap().record.id;
    client.revoke_key(other).await.unwrap();
    let before = db.counts(&client).await;
    assert!(matches!(client.disable_key(other).await, Err(Error::Revoked { .. })));
    assert!(matches!(client.enable_key(other).await, Err(Error::Revoked { .. })));
    assert_eq!(db.counts(&client).await, before, "nothing was written");
    assert!(client.get_key(other).await.unwrap().disabled_at.is_none());
    let gone = apikeys_db::KeyId::new();
    assert!(matches!(client.disable_key(gone).await, Err(Error::NotFound { .. })));
    assert!(matches!(client.enable_key(gone).await, Err(Error::NotFound { .. })));
}

/// Another replica's cache learns of a disable, an enable and a new allowlist within its
/// staleness bound, like a revocation.
pub async fn other_replicas_see_disable_enable_and_allowlists(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let issued = admin.create_key(org, NewKey::new("k")).await.unwrap();
    let (key, id) = (issued.key.expose_secret().to_owned(), issued.record.id);
    let options = ValidateOptions::new().track_usage(false);
    warm(&replica, &key, &options).await;

    admin.disable_key(id).await.unwrap();
    let (e, _) = refused_within_bound(&replica, &key, &options, Instant::now()).await;
    assert!(matches!(e, Error::Disabled { .. }), "{e:?}");

    admin.enable_key(id).await.unwrap();
    admitted_within_bound(&replica, &key, &options).await;

    admin
        .update_key(id, KeyUpdate::new().with_allowed_ips(Some(list(&["192.0.2.0/24"]))))
        .await
        .unwrap();
    let changed = Instant::now();
    loop {
        // A stale answer is allowed to a check that started within the bound (the check's
        // own time, or a descheduled task, is not staleness).
        let started = changed.elapsed();
        match replica.validate_key_from(&key, ip("198.51.100.1"), &options).await {
            Ok(_) => assert!(started < crate::cache::BOUND, "served past the bound"),
            Err(Error::IpNotAllowed { ip: got }) => {
                assert_eq!(got, ip("198.51.100.1"));
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    replica.validate_key_from(&key, ip("192.0.2.77"), &options).await.unwrap();
}

/// Checks `key` (from an unknown address) until it is admitted again, refused meanwhile only
/// as disabled or from outside an allowlist, within twice the cache's bound.
async fn admitted_within_bound(
    client: &apikeys_db::ApiKeyClient,
    key: &str,
    options: &ValidateOptions,
) {
    let changed = Instant::now();
    loop {
        match client.validate_key(key, options).await {
            Ok(_) => return,
            Err(Error::Disabled { .. } | Error::IpNotAllowed { .. }) => {
                assert!(changed.elapsed() < crate::cache::BOUND * 2, "still refused");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// A key with an allowlist: admitted from inside it (IPv4, IPv6, IPv4 mapped into IPv6),
/// refused from outside and from an unknown address before its rate limit and credits are
/// counted; a bad list is `InvalidInput` naming `allowed_ips`; removing
/// the list admits any address.
pub async fn ip_allowlists_are_checked_before_any_counter(db: TestDb) {
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let new = NewKey::new("office")
        .with_rate_limit(RateLimit::per_hour(4).unwrap())
        .with_credits(Credits::new(4))
        .with_allowed_ips(list(&["192.0.2.0/24", "2001:db8::/32"]));
    let issued = client.create_key(org, new).await.unwrap();
    let (key, id) = (issued.key.expose_secret().to_owned(), issued.record.id);
    let stored = client.get_key(id).await.unwrap();
    let nets: Vec<String> = stored.allowed_ips.as_ref().unwrap().networks().collect();
    assert_eq!(nets, ["192.0.2.0/24", "2001:db8::/32"]);
    assert_eq!(stored, issued.record, "what create returned is what is stored");

    let options = ValidateOptions::new();
    for outside in ["198.51.100.1", "2001:db9::1", "::192.0.2.1"] {
        for _ in 0..5 {
            match client.validate_key_from(&key, ip(outside), &options).await {
                Err(Error::IpNotAllowed { ip: got }) => assert_eq!(got, ip(outside)),
                other => panic!("{outside}: {other:?}"),
            }
        }
    }
    for _ in 0..3 {
        assert!(matches!(
            client.validate_key(&key, &options).await,
            Err(Error::IpNotAllowed { ip: None })
        ));
    }
    // Nothing was counted: all four of the hour's checks and credits are still there.
    for (i, inside) in
        ["192.0.2.9", "2001:db8::1", "::ffff:192.0.2.200", "192.0.2.1"].iter().enumerate()
    {
        let key = client.validate_key_from(&key, ip(inside), &options).await.unwrap();
        assert_eq!(key.credits.unwrap().remaining, 3 - i as u64, "{inside}");
    }
    assert!(matches!(
        client.validate_key_from(&key, ip("192.0.2.9"), &options).await,
        Err(Error::Quota { .. } | Error::UsageExhausted { .. })
    ));

    // A bad list never becomes an allowlist (the typed API cannot carry one; the input form
    // names the field).
    for bad in [&["10.1.2.3/8"][..], &[], &["nope"]] {
        assert!(IpAllowlist::parse(bad).is_err(), "{bad:?}");
        let body = serde_json::json!({"name": "x", "allowed_ips": bad});
        let input: apikeys_db::NewKeyInput = serde_json::from_value(body).unwrap();
        assert!(matches!(
            input.into_new_key(),
            Err(Error::InvalidInput { field: "allowed_ips", .. })
        ));
    }

    let second = client
        .create_key(org, NewKey::new("k2").with_allowed_ips(list(&["10.0.0.0/8"])))
        .await
        .unwrap();
    let key2 = second.key.expose_secret().to_owned();
    let cleared =
        client.update_key(second.record.id, KeyUpdate::new().with_allowed_ips(None)).await.unwrap();
    assert!(cleared.allowed_ips.is_none());
    client.validate_key(&key2, &options).await.unwrap();
    client.validate_key_from(&key2, ip("203.0.113.1"), &options).await.unwrap();
    client.verify_key_from(&key2, ip("203.0.113.1"), &VerifyOptions::new()).await.unwrap();
}

/// Admin calls racing the hot path: eight tasks check a key while another disables and
/// enables it over and over, on a caching client and on a plain one. Every check ends in
/// `Ok` or `Disabled`, never anything else; once the last enable has committed, the plain
/// client admits at once, and the caching one within its bound.
pub async fn disable_and_enable_racing_checks(db: TestDb) {
    let admin = db.client().await;
    let cached = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let issued = admin.create_key(org, NewKey::new("k")).await.unwrap();
    let key = Arc::new(issued.key.expose_secret().to_owned());
    let id = issued.record.id;
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = if i % 2 == 0 { admin.clone() } else { cached.clone() };
        let (key, stop, refused) = (Arc::clone(&key), Arc::clone(&stop), Arc::clone(&refused));
        tasks.push(tokio::spawn(async move {
            let options = ValidateOptions::new().track_usage(false);
            while !stop.load(Ordering::Relaxed) {
                match client.validate_key(&key, &options).await {
                    Ok(_) => {}
                    Err(Error::Disabled { .. }) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("{e:?}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for _ in 0..15 {
        admin.disable_key(id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        admin.enable_key(id).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(refused.load(Ordering::Relaxed) > 0, "no check ever saw the key disabled");
    let options = ValidateOptions::new().track_usage(false);
    admin.validate_key(&key, &options).await.unwrap();
    admitted_within_bound(&cached, &key, &options).await;
    let events = admin.list_key_events(id).await.unwrap();
    let count_of = |a| events.iter().filter(|e| e.action == a).count();
    assert_eq!((count_of(KeyAction::Disabled), count_of(KeyAction::Enabled)), (15, 15));
}

/// Disable and enable in the host's transaction: the key keeps working until the host
/// commits, and a rollback leaves it as it was.
pub async fn disable_in_a_host_transaction(db: TestDb) {
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let issued = client.create_key(org, NewKey::new("k")).await.unwrap();
    let (key, id) = (issued.key.expose_secret().to_owned(), issued.record.id);
    let options = VerifyOptions::new().track_usage(false);

    let txn = client.begin().await.unwrap();
    client.with(&txn).disable_key(id).await.unwrap();
    txn.rollback().await.unwrap();
    client.verify_key(&key, &options).await.unwrap();

    let txn = client.begin().await.unwrap();
    assert!(client.with(&txn).disable_key(id).await.unwrap().disabled_at.is_some());
    txn.commit().await.unwrap();
    assert!(matches!(client.verify_key(&key, &options).await, Err(Error::Disabled { .. })));
    let txn = client.begin().await.unwrap();
    client.with(&txn).enable_key(id).await.unwrap();
    txn.commit().await.unwrap();
    client.verify_key(&key, &options).await.unwrap();
}

/// A database on the schema before this step, with keys in it, upgrades with
/// `create_tables` (the Migrator `sea-orm-cli migrate up` runs): the old keys stay enabled
/// and usable from any address, and the new columns work.
pub async fn upgrade_to_disable_and_ip_allowlists(db: TestDb) {
    use migration::MigratorTrait;
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let old = client.create_key(org, NewKey::new("old")).await.unwrap();
    // Back before this step (and the steps after it).
    let steps = crate::lifecycle::steps_from("m20261205_000003_disable_and_ip_allowlist");
    migration::Migrator::down(client.connection(), Some(steps)).await.unwrap();
    let manager = migration::SchemaManager::new(client.connection());
    assert!(!manager.has_column("api_keys", "disabled_at").await.unwrap());
    assert!(!manager.has_column("api_keys", "allowed_ips").await.unwrap());
    client.create_tables().await.unwrap();
    let manager = migration::SchemaManager::new(client.connection());
    assert!(manager.has_column("api_keys", "disabled_at").await.unwrap());
    assert!(manager.has_column("api_keys", "allowed_ips").await.unwrap());

    let record = client.get_key(old.record.id).await.unwrap();
    assert_eq!((record.disabled_at, record.allowed_ips.as_ref()), (None, None));
    let options = ValidateOptions::new();
    client.validate_key_from(old.key.expose_secret(), ip("203.0.113.5"), &options).await.unwrap();
    client.disable_key(old.record.id).await.unwrap();
    assert!(matches!(
        client.validate_key(old.key.expose_secret(), &options).await,
        Err(Error::Disabled { .. })
    ));
    let fenced = NewKey::new("new").with_allowed_ips(list(&["203.0.113.0/24"]));
    let new = client.create_key(org, fenced).await.unwrap();
    client.validate_key_from(new.key.expose_secret(), ip("203.0.113.5"), &options).await.unwrap();
}

/// A key rolled with a grace period spends its successor's credits and rate limit, so it
/// follows the successor's disable, enable and allowlist, on the admin's client and on a
/// caching replica within its bound (also when the change is made in a host transaction).
/// Its own disable stays its own: disabling the old key leaves the new one alone.
pub async fn keys_in_grace_follow_their_successor(db: TestDb) {
    let admin = db.client().await;
    let replica = db.client_with(|b| b.cache(cache())).await;
    let org = org(&admin, "acme").await;
    let old =
        admin.create_key(org, NewKey::new("k").with_credits(Credits::new(100))).await.unwrap();
    let new = admin.roll_key(old.record.id, Duration::from_secs(3600)).await.unwrap();
    let (old_key, new_id) = (old.key.expose_secret().to_owned(), new.record.id);
    // The loops below check as fast as they can: they spend no credit.
    let options = ValidateOptions::new().track_usage(false).credit_cost(0);
    warm(&replica, &old_key, &options).await;

    admin.disable_key(new_id).await.unwrap();
    assert!(matches!(admin.validate_key(&old_key, &options).await, Err(Error::Disabled { .. })));
    let (e, _) = refused_within_bound(&replica, &old_key, &options, Instant::now()).await;
    assert!(matches!(e, Error::Disabled { .. }), "{e:?}");
    let balance = admin.get_key(new_id).await.unwrap().credits.unwrap().remaining;

    admin.enable_key(new_id).await.unwrap();
    admitted_within_bound(&replica, &old_key, &options).await;
    admin.validate_key(&old_key, &ValidateOptions::new()).await.unwrap();
    assert!(admin.get_key(new_id).await.unwrap().credits.unwrap().remaining < balance);

    let office = KeyUpdate::new().with_allowed_ips(Some(list(&["192.0.2.0/24"])));
    admin.update_key(new_id, office).await.unwrap();
    assert!(matches!(
        admin.validate_key_from(&old_key, ip("198.51.100.1"), &options).await,
        Err(Error::IpNotAllowed { .. })
    ));
    admin.validate_key_from(&old_key, ip("192.0.2.1"), &options).await.unwrap();
    let changed = Instant::now();
    while replica.validate_key_from(&old_key, ip("198.51.100.1"), &options).await.is_ok() {
        assert!(changed.elapsed() < crate::cache::BOUND * 2, "the replica kept the old list");
    }
    admin.update_key(new_id, KeyUpdate::new().with_allowed_ips(None)).await.unwrap();
    admitted_within_bound(&replica, &old_key, &options).await;

    // In a host transaction: the follower is refused once the host commits.
    let txn = admin.begin().await.unwrap();
    admin.with(&txn).disable_key(new_id).await.unwrap();
    txn.commit().await.unwrap();
    let (e, _) = refused_within_bound(&replica, &old_key, &options, Instant::now()).await;
    assert!(matches!(e, Error::Disabled { .. }), "{e:?}");
    admin.enable_key(new_id).await.unwrap();

    // Disabling the old key is its own affair.
    admin.disable_key(old.record.id).await.unwrap();
    admin.verify_key(new.key.expose_secret(), &VerifyOptions::new()).await.unwrap();
}
