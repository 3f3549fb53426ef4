//! The key lifecycle: roll with a grace period, renew and extend, usage credits, owners,
//! keys about to expire, and the audit trail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeys_db::{
    Credits, Error, KeyAction, KeyUpdate, NewKey, Page, RateLimit, Refill, StatusFilter,
    ValidateOptions, VerifyOptions,
};
use chrono::{TimeDelta, Utc};
use serde_json::json;
use tokio::sync::Barrier;

use crate::cache::{cache, refused_within_bound, warm};
use crate::keys::org;
use apikeys_testing::{TestClock, TestDb};

fn plain() -> ValidateOptions {
    ValidateOptions::new()
}

fn actions(events: &[apikeys_db::KeyEvent]) -> Vec<KeyAction> {
    events.iter().map(|e| e.action).collect()
}

/// A roll: the new key copies the old one's settings and takes over its credits; the old
/// key works (spending the new key's credits) until its grace ends, then is expired; the
/// two link to each other; a revoked, expired or already rolled key is refused and nothing
/// is written.
pub async fn roll_keeps_the_old_key_for_its_grace(db: TestDb) {
    let clock = TestClock::at(Utc::now());
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let ops = client.acting_as("admin:bob").unwrap();
    let org = org(&client, "acme").await;
    let (project, _) = client.get_or_create_project(org, "web").await.unwrap();
    let new = NewKey::new("ci")
        .with_project(project.id)
        .with_scopes(["read", "write"])
        .with_rate_limit(RateLimit::per_minute(50).unwrap())
        .with_custom(json!({"plan": "pro"}))
        .with_owner("user-1")
        .with_credits(Credits::new(10))
        .expires_at(clock.now() + TimeDelta::days(30));
    let old = ops.create_key(org, new).await.unwrap();
    let rolled = ops.roll_key(old.record.id, Duration::from_secs(3600)).await.unwrap();
    let (o, n) = (client.get_key(old.record.id).await.unwrap(), rolled.record.clone());
    assert_ne!(n.id, o.id);
    assert_ne!(rolled.key.expose_secret(), old.key.expose_secret());
    assert_eq!(
        (n.org_id, n.project_id, n.product_id, &n.name, &n.scopes, n.rate_limit, &n.custom),
        (o.org_id, o.project_id, o.product_id, &o.name, &o.scopes, o.rate_limit, &o.custom)
    );
    assert_eq!((&n.owner_id, n.expires_at), (&o.owner_id, old.record.expires_at));
    assert_eq!((n.credits, o.credits), (Some(Credits::new(10)), Some(Credits::new(0))));
    assert_eq!((o.rolled_to, n.rolled_from, n.rolled_to), (Some(n.id), Some(o.id), None));
    assert!(o.expires_at.unwrap() <= clock.now() + TimeDelta::hours(1));
    assert_eq!(n, client.get_key(n.id).await.unwrap());

    // In the grace period both work, and spend one balance.
    let spent = client.validate_key(old.key.expose_secret(), &plain()).await.unwrap();
    assert_eq!(spent.credits.unwrap().remaining, 9);
    let spent = client.validate_key(rolled.key.expose_secret(), &plain()).await.unwrap();
    assert_eq!(spent.credits.unwrap().remaining, 8);
    assert_eq!(client.get_key(n.id).await.unwrap().credits.unwrap().remaining, 8);
    assert_eq!(client.get_key(o.id).await.unwrap().credits.unwrap().remaining, 0);

    clock.advance(TimeDelta::hours(1));
    let check = client.validate_key(old.key.expose_secret(), &plain()).await;
    assert!(matches!(check, Err(Error::Expired { .. })), "{check:?}");
    client.validate_key(rolled.key.expose_secret(), &plain()).await.unwrap();

    let keys_before = db.count(&client, "api_keys").await;
    match client.roll_key(o.id, Duration::ZERO).await {
        Err(Error::AlreadyExists { existing }) => assert_eq!(existing, n.id.into()),
        other => panic!("{other:?}"),
    }
    let too_long = client.roll_key(n.id, apikeys_db::MAX_GRACE + Duration::from_secs(1)).await;
    assert!(matches!(too_long, Err(Error::InvalidInput { field: "grace", .. })), "{too_long:?}");
    client.revoke_key(n.id).await.unwrap();
    assert!(matches!(client.roll_key(n.id, Duration::ZERO).await, Err(Error::Revoked { .. })));
    let short = client
        .create_key(org, NewKey::new("short").expires_after(Duration::from_secs(60)))
        .await
        .unwrap();
    clock.advance(TimeDelta::minutes(2));
    let expired = client.roll_key(short.record.id, Duration::ZERO).await;
    assert!(matches!(expired, Err(Error::Expired { .. })), "{expired:?}");
    assert_eq!(db.count(&client, "api_keys").await, keys_before + 1);
    let missing = client.roll_key(apikeys_db::KeyId::new(), Duration::ZERO).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");

    let old_events = client.list_key_events(o.id).await.unwrap();
    assert_eq!(actions(&old_events), [KeyAction::Created, KeyAction::Rolled]);
    assert_eq!(old_events[1].related_key_id, Some(n.id));
    assert!(old_events.iter().all(|e| e.actor.as_deref() == Some("admin:bob")));
    let new_events = client.list_key_events(n.id).await.unwrap();
    assert_eq!(actions(&new_events), [KeyAction::Created, KeyAction::Revoked]);
    assert_eq!(new_events[0].related_key_id, Some(o.id));
    assert_eq!(new_events[1].actor, None);
}

/// Another replica, with the cache on and off, refuses a key rolled away with no grace (as
/// revoked), a key revoked with its owner's, and a key whose credits another replica spent.
pub async fn other_replicas_refuse_rolled_revoked_and_spent_keys(db: TestDb) {
    for cached in [false, true] {
        let admin = db.client().await;
        let replica =
            if cached { db.client_with(|b| b.cache(cache())).await } else { db.client().await };
        let org = org(&admin, "acme").await;
        let owner = format!("owner-{cached}");
        let rolled = admin.create_key(org, NewKey::new("r")).await.unwrap();
        let owned =
            admin.create_key(org, NewKey::new("o").with_owner(owner.clone())).await.unwrap();
        let credited =
            admin.create_key(org, NewKey::new("c").with_credits(Credits::new(3))).await.unwrap();
        let free = plain().credit_cost(0);
        for k in [&rolled, &owned, &credited] {
            if cached {
                warm(&replica, k.key.expose_secret(), &free).await;
            } else {
                replica.validate_key(k.key.expose_secret(), &free).await.unwrap();
            }
        }
        admin.roll_key(rolled.record.id, Duration::ZERO).await.unwrap();
        let (e, _) =
            refused_within_bound(&replica, rolled.key.expose_secret(), &free, Instant::now()).await;
        assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
        assert_eq!(admin.revoke_owner_keys(org, &owner).await.unwrap(), vec![owned.record.id]);
        let (e, _) =
            refused_within_bound(&replica, owned.key.expose_secret(), &free, Instant::now()).await;
        assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
        for left in [2, 1, 0] {
            let k = admin.validate_key(credited.key.expose_secret(), &plain()).await.unwrap();
            assert_eq!(k.credits.unwrap().remaining, left);
        }
        // The balance is in the database: refused at once, cache or not.
        let spent = replica.validate_key(credited.key.expose_secret(), &plain()).await;
        assert!(matches!(spent, Err(Error::UsageExhausted { refill_at: None })), "{spent:?}");
    }
}

/// Credits: spent one (or the cost) per validation, refused when spent with the next
/// refill's time, refilled once per period even by concurrent checks, never early by a
/// replica whose clock is behind; `verify_key` and cost 0 spend nothing; `update_key` sets
/// and clears them. Periods follow the database's clock, so a new period is made by moving
/// the key's stored period back (what the passing of a day does).
pub async fn credits_are_spent_and_refilled_once_per_period(db: TestDb) {
    // The test reasons about "today": run it again if the UTC day changed meanwhile.
    for _ in 0..2 {
        let today = Utc::now().date_naive();
        credits_case(&db).await;
        if Utc::now().date_naive() == today {
            return;
        }
    }
    panic!("the UTC day changed twice during the test");
}

/// Moves key `id`'s stored refill period `periods` back: the database's clock now says a
/// new period has begun since the last refill.
async fn age_refill(client: &apikeys_db::ApiKeyClient, id: apikeys_db::KeyId, periods: i64) {
    use apikeys_db::sea_orm::{ConnectionTrait, DbBackend, Statement};
    let conn = client.connection();
    let backend = conn.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "UPDATE api_keys SET refilled_period = refilled_period - $1 WHERE id = $2"
        }
        _ => "UPDATE api_keys SET refilled_period = refilled_period - ? WHERE id = ?",
    };
    let values = [periods.into(), id.as_uuid().into()];
    conn.execute_raw(Statement::from_sql_and_values(backend, sql, values)).await.unwrap();
}

/// The first instant of the UTC month after `t`'s.
fn next_month(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    use chrono::Datelike;
    let (y, m) = if t.month() == 12 { (t.year() + 1, 1) } else { (t.year(), t.month() + 1) };
    chrono::NaiveDate::from_ymd_opt(y, m, 1).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc()
}

async fn credits_case(db: &TestDb) {
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let tomorrow = next_day(Utc::now());
    let credits = Credits::new(2).with_refill(Refill::daily(5));
    let issued = client.create_key(org, NewKey::new("trial").with_credits(credits)).await.unwrap();
    let (id, key) = (issued.record.id, issued.key.expose_secret().to_owned());
    assert_eq!(issued.record.credits, Some(credits));
    for left in [1, 0] {
        let k = client.validate_key(&key, &plain()).await.unwrap();
        assert_eq!(k.credits.unwrap().remaining, left);
    }
    match client.validate_key(&key, &plain()).await {
        Err(Error::UsageExhausted { refill_at }) => assert_eq!(refill_at, Some(tomorrow)),
        other => panic!("{other:?}"),
    }
    client.verify_key(&key, &VerifyOptions::new()).await.unwrap();
    client.validate_key(&key, &plain().credit_cost(0)).await.unwrap();
    assert_eq!(client.get_key(id).await.unwrap().credits.unwrap().remaining, 0);

    // A new day: 16 concurrent checks, one refill to 5, exactly 5 admitted.
    age_refill(&client, id, 1).await;
    let barrier = Arc::new(Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                client.validate_key(&key, &plain()).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::UsageExhausted { refill_at }) => assert_eq!(refill_at, Some(tomorrow)),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok, 5);
    // A replica whose clock still says yesterday finds the balance refilled already.
    let behind = db.client_with(|b| b.clock(|| Utc::now() - TimeDelta::days(1))).await;
    let late = behind.validate_key(&key, &plain()).await;
    assert!(matches!(late, Err(Error::UsageExhausted { .. })), "{late:?}");

    // A cost above one; a cost above the balance spends nothing.
    age_refill(&client, id, 1).await;
    let k = client.validate_key(&key, &plain().credit_cost(3)).await.unwrap();
    assert_eq!(k.credits.unwrap().remaining, 2);
    let over = client.validate_key(&key, &plain().credit_cost(3)).await;
    assert!(matches!(over, Err(Error::UsageExhausted { .. })), "{over:?}");
    assert_eq!(client.get_key(id).await.unwrap().credits.unwrap().remaining, 2);

    // Set, then cleared: unlimited.
    let k =
        client.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(1)))).await.unwrap();
    assert_eq!(k.credits, Some(Credits::new(1)));
    client.validate_key(&key, &plain()).await.unwrap();
    let none = client.validate_key(&key, &plain()).await;
    assert!(matches!(none, Err(Error::UsageExhausted { refill_at: None })), "{none:?}");
    let k = client.update_key(id, KeyUpdate::new().with_credits(None)).await.unwrap();
    assert_eq!(k.credits, None);
    for _ in 0..3 {
        assert_eq!(client.validate_key(&key, &plain()).await.unwrap().credits, None);
    }
    // Monthly: the first of next month.
    let m = Credits::new(0).with_refill(Refill::monthly(7));
    client.update_key(id, KeyUpdate::new().with_credits(Some(m))).await.unwrap();
    match client.validate_key(&key, &plain()).await {
        Err(Error::UsageExhausted { refill_at }) => {
            assert_eq!(refill_at, Some(next_month(Utc::now())));
        }
        other => panic!("{other:?}"),
    }
    age_refill(&client, id, 1).await;
    let k = client.validate_key(&key, &plain()).await.unwrap();
    assert_eq!(k.credits.unwrap().remaining, 6);
    // Bad input changes nothing.
    let bad = client
        .update_key(
            id,
            KeyUpdate::new().with_credits(Some(Credits::new(1).with_refill(Refill::daily(0)))),
        )
        .await;
    assert!(matches!(bad, Err(Error::InvalidInput { field: "credits", .. })), "{bad:?}");
    let bad = client.create_key(org, NewKey::new("x").with_credits(Credits::new(u64::MAX))).await;
    assert!(matches!(bad, Err(Error::InvalidInput { field: "credits", .. })), "{bad:?}");
    assert_eq!(client.get_key(id).await.unwrap().credits.unwrap().remaining, 6);
}

/// 4 clients (two with the cache) × 8 tasks × 5 attempts on a key with 100 credits:
/// exactly 100 pass, and every other attempt is the usage-exhausted error, not `Quota`.
pub async fn credits_are_exact_under_concurrency(db: TestDb) {
    let first = db.client().await;
    let org = org(&first, "acme").await;
    let issued =
        first.create_key(org, NewKey::new("k").with_credits(Credits::new(100))).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    let barrier = Arc::new(Barrier::new(32));
    let mut handles = Vec::new();
    for c in 0..4 {
        let client = match c {
            0 => first.clone(),
            1 | 2 => db.client_with(|b| b.cache(cache())).await,
            _ => db.client().await,
        };
        for _ in 0..8 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                let (mut ok, mut spent) = (0, 0);
                for _ in 0..5 {
                    match client.validate_key(&key, &plain()).await {
                        Ok(_) => ok += 1,
                        Err(Error::UsageExhausted { .. }) => spent += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
                (ok, spent)
            }));
        }
    }
    let (mut ok, mut spent) = (0, 0);
    for h in handles {
        let (o, s) = h.await.unwrap();
        ok += o;
        spent += s;
    }
    assert_eq!((ok, spent), (100, 60));
    assert_eq!(first.get_key(issued.record.id).await.unwrap().credits, Some(Credits::new(0)));
}

/// Owner ids are exact (case and all) on every backend; an owner's keys are listed and
/// revoked together; `list_expiring_keys` finds active keys expiring within the horizon.
pub async fn owners_and_expiring_keys(db: TestDb) {
    let clock = TestClock::at(Utc::now());
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let day = Duration::from_secs(86_400);
    let mk = |name: &str, owner: Option<&str>, life: Option<Duration>| {
        let mut k = NewKey::new(name);
        if let Some(o) = owner {
            k = k.with_owner(o);
        }
        if let Some(l) = life {
            k = k.expires_after(l);
        }
        k
    };
    let a1 = client.create_key(org, mk("a1", Some("Alice"), None)).await.unwrap().record.id;
    let a2 =
        client.create_key(org, mk("a2", Some("Alice"), Some(2 * day))).await.unwrap().record.id;
    let b = client.create_key(org, mk("b", Some("alice"), None)).await.unwrap().record.id;
    let c = client.create_key(org, mk("c", None, Some(2 * day))).await.unwrap().record.id;
    let d = client.create_key(org, mk("d", None, Some(10 * day))).await.unwrap().record.id;
    let ids = |p: apikeys_db::KeyPage<apikeys_db::ApiKey>| {
        p.items.iter().map(|k| k.id).collect::<Vec<_>>()
    };
    let page = Page::first(10).unwrap();
    assert_eq!(
        ids(client.list_owner_keys(org, "Alice", StatusFilter::All, page).await.unwrap()),
        [a1, a2]
    );
    assert_eq!(
        ids(client.list_owner_keys(org, "alice", StatusFilter::All, page).await.unwrap()),
        [b]
    );
    for bad in [" Alice", "Alice ", "", "a\0b"] {
        let r = client.list_owner_keys(org, bad, StatusFilter::All, page).await;
        assert!(matches!(r, Err(Error::InvalidInput { field: "owner_id", .. })), "{r:?}");
        let r = client.create_key(org, mk("x", Some(bad), None)).await;
        assert!(matches!(r, Err(Error::InvalidInput { field: "owner_id", .. })), "{r:?}");
    }
    assert_eq!(ids(client.list_expiring_keys(3 * day, page).await.unwrap()), [a2, c]);
    assert_eq!(ids(client.list_expiring_keys(11 * day, page).await.unwrap()), [a2, c, d]);

    let mut revoked = client.revoke_owner_keys(org, "Alice").await.unwrap();
    revoked.sort();
    assert_eq!(revoked, [a1, a2]);
    assert!(client.revoke_owner_keys(org, "Alice").await.unwrap().is_empty());
    assert!(client.get_key(b).await.unwrap().revoked_at.is_none());
    assert_eq!(ids(client.list_expiring_keys(3 * day, page).await.unwrap()), [c]);
    let k = client.update_key(b, KeyUpdate::new().with_owner(Some("Alice".into()))).await.unwrap();
    assert_eq!(k.owner_id.as_deref(), Some("Alice"));
    assert_eq!(
        ids(client.list_owner_keys(org, "Alice", StatusFilter::Active, page).await.unwrap()),
        [b]
    );
    let k = client.update_key(b, KeyUpdate::new().with_owner(None)).await.unwrap();
    assert_eq!(k.owner_id, None);
    clock.advance(TimeDelta::days(3));
    assert!(ids(client.list_expiring_keys(3 * day, page).await.unwrap()).is_empty());
}

/// Renew moves the expiry to a future time, extend by a duration; both refuse revoked keys
/// and the past, and an expired key renewed works again.
pub async fn renew_and_extend(db: TestDb) {
    let clock = TestClock::at(Utc::now());
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let issued = client
        .create_key(org, NewKey::new("k").expires_after(Duration::from_secs(86_400)))
        .await
        .unwrap();
    let (id, key) = (issued.record.id, issued.key.expose_secret().to_owned());
    let later = clock.now() + TimeDelta::days(30);
    let k = client.renew_key(id, later).await.unwrap();
    assert_eq!(k.expires_at.unwrap().timestamp_micros(), later.timestamp_micros());
    let k = client.extend_key(id, Duration::from_secs(86_400)).await.unwrap();
    assert_eq!(
        k.expires_at.unwrap().timestamp_micros(),
        (later + TimeDelta::days(1)).timestamp_micros()
    );
    for bad in [clock.now(), clock.now() - TimeDelta::days(1)] {
        let r = client.renew_key(id, bad).await;
        assert!(matches!(r, Err(Error::InvalidInput { field: "expires_at", .. })), "{r:?}");
    }
    let r = client.extend_key(id, Duration::ZERO).await;
    assert!(matches!(r, Err(Error::InvalidInput { field: "expires_at", .. })), "{r:?}");
    let forever = client.create_key(org, NewKey::new("f").never_expires()).await.unwrap().record.id;
    let r = client.extend_key(forever, Duration::from_secs(60)).await;
    assert!(matches!(r, Err(Error::InvalidInput { field: "expires_at", .. })), "{r:?}");

    clock.advance(TimeDelta::days(40));
    assert!(matches!(client.validate_key(&key, &plain()).await, Err(Error::Expired { .. })));
    // Extending by a day from an expiry nine days ago is still the past.
    let r = client.extend_key(id, Duration::from_secs(86_400)).await;
    assert!(matches!(r, Err(Error::InvalidInput { field: "expires_at", .. })), "{r:?}");
    client.renew_key(id, clock.now() + TimeDelta::days(1)).await.unwrap();
    client.validate_key(&key, &plain()).await.unwrap();
    client.revoke_key(id).await.unwrap();
    let before = client.get_key(id).await.unwrap().expires_at;
    let r = client.renew_key(id, clock.now() + TimeDelta::days(5)).await;
    assert!(matches!(r, Err(Error::Revoked { .. })), "{r:?}");
    let r = client.extend_key(id, Duration::from_secs(60)).await;
    assert!(matches!(r, Err(Error::Revoked { .. })), "{r:?}");
    assert_eq!(client.get_key(id).await.unwrap().expires_at, before);
    let missing =
        client.renew_key(apikeys_db::KeyId::new(), clock.now() + TimeDelta::days(1)).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    assert_eq!(
        actions(&client.list_key_events(id).await.unwrap()),
        [
            KeyAction::Created,
            KeyAction::Renewed,
            KeyAction::Renewed,
            KeyAction::Renewed,
            KeyAction::Revoked
        ]
    );
}

/// Every change writes its event in its own transaction, with the actor; failed changes and
/// rolled-back host transactions leave none; a deleted key's events stay.
pub async fn audit_trail(db: TestDb) {
    let client = db.client().await;
    let ops = client.acting_as("ops").unwrap();
    let bad = client.acting_as(" ops");
    assert!(matches!(bad, Err(Error::InvalidInput { field: "actor", .. })), "{bad:?}");
    let (org, created) = ops.get_or_create_organization("audited").await.unwrap();
    assert!(created);
    ops.get_or_create_organization("audited").await.unwrap();
    let (project, _) = ops.get_or_create_project(org.id, "web").await.unwrap();
    let product = ops.create_product(org.id, "api").await.unwrap();
    let issued = ops.create_key(org.id, NewKey::new("k")).await.unwrap();
    let id = issued.record.id;
    ops.update_key(id, KeyUpdate::new().with_name("renamed")).await.unwrap();
    let bad = ops.update_key(id, KeyUpdate::new().with_name("")).await;
    assert!(bad.is_err());
    ops.revoke_key(id).await.unwrap();
    ops.revoke_key(id).await.unwrap(); // already revoked: no second event
    ops.delete_key(id).await.unwrap();
    assert!(matches!(ops.delete_key(id).await, Err(Error::NotFound { .. })));
    let events = client.list_key_events(id).await.unwrap();
    assert_eq!(
        actions(&events),
        [KeyAction::Created, KeyAction::Updated, KeyAction::Revoked, KeyAction::Deleted]
    );
    assert!(events.iter().all(|e| e.key_id == Some(id) && e.org_id == Some(org.id)));
    assert!(events.iter().all(|e| e.actor.as_deref() == Some("ops")));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at && w[0].id < w[1].id));
    let org_events = client.list_org_events(org.id).await.unwrap();
    assert_eq!(
        actions(&org_events[..3]),
        [KeyAction::OrganizationCreated, KeyAction::ProjectCreated, KeyAction::ProductCreated]
    );
    assert_eq!(org_events[1].project_id, Some(project.id));
    assert_eq!(org_events[2].product_id, Some(product.id));
    assert_eq!(org_events.len(), 7);

    // A host transaction rolled back leaves no key and no event.
    let txn = client.begin().await.unwrap();
    let gone = client.with(&txn).create_key(org.id, NewKey::new("gone")).await.unwrap();
    txn.rollback().await.unwrap();
    assert!(client.list_key_events(gone.record.id).await.unwrap().is_empty());
    assert_eq!(client.list_org_events(org.id).await.unwrap().len(), 7);
}

/// A database on the schema before the lifecycle step, with data in it, upgrades with
/// `create_tables` (the Migrator `sea-orm-cli migrate up` runs): its keys keep working and
/// take every lifecycle feature.
pub async fn upgrade_to_the_lifecycle_schema(db: TestDb) {
    use apikeys_db::sea_orm::{ConnectionTrait, DbBackend, Statement};
    use migration::MigratorTrait;
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let issued = client
        .create_key(org, NewKey::new("old").with_scopes(["read"]).with_custom(json!({"a": 1})))
        .await
        .unwrap();
    let steps = steps_from("m20261126_000001_key_lifecycle");
    migration::Migrator::down(client.connection(), Some(steps)).await.unwrap();
    assert_eq!(
        migration::Migrator::get_pending_migrations(client.connection()).await.unwrap().len(),
        steps as usize
    );
    // Written on the old schema.
    let conn = client.connection();
    let sql = match conn.get_database_backend() {
        DbBackend::Postgres => "UPDATE api_keys SET name = $1 WHERE id = $2",
        _ => "UPDATE api_keys SET name = ? WHERE id = ?",
    };
    let values = ["written-before".into(), issued.record.id.as_uuid().into()];
    conn.execute_raw(Statement::from_sql_and_values(conn.get_database_backend(), sql, values))
        .await
        .unwrap();
    client.create_tables().await.unwrap();
    assert!(
        migration::Migrator::get_pending_migrations(client.connection()).await.unwrap().is_empty()
    );
    let key = issued.key.expose_secret();
    let k = client.validate_key(key, &plain()).await.unwrap();
    assert_eq!(
        (k.name.as_str(), k.credits, k.owner_id, k.rolled_to),
        ("written-before", None, None, None)
    );
    assert_eq!(k.custom, issued.record.custom);
    let id = issued.record.id;
    client
        .update_key(
            id,
            KeyUpdate::new().with_credits(Some(Credits::new(1))).with_owner(Some("u".into())),
        )
        .await
        .unwrap();
    client.validate_key(key, &plain()).await.unwrap();
    assert!(matches!(client.validate_key(key, &plain()).await, Err(Error::UsageExhausted { .. })));
    let rolled = client.roll_key(id, Duration::ZERO).await.unwrap();
    assert_eq!(rolled.record.owner_id.as_deref(), Some("u"));
    assert_eq!(
        actions(&client.list_key_events(id).await.unwrap()),
        [KeyAction::Updated, KeyAction::Rolled, KeyAction::Revoked]
    );
}

/// How many migration steps there are from `name` (included) to the last: what
/// `Migrator::down` takes to bring a database back to before `name`.
pub fn steps_from(name: &str) -> u32 {
    use migration::MigratorTrait;
    let all = migration::Migrator::migrations();
    let at = all.iter().position(|m| m.name() == name).unwrap();
    u32::try_from(all.len() - at).unwrap()
}

/// Validates `key` once on `client`: true if admitted, false if refused by the rate limit;
/// any other outcome fails the test.
async fn admitted(client: &apikeys_db::ApiKeyClient, key: &str) -> bool {
    match client.validate_key(key, &plain().track_usage(false)).await {
        Ok(_) => true,
        Err(Error::Quota { .. }) => false,
        Err(e) => panic!("{e:?}"),
    }
}

/// A rolled key and its successors count against one rate limit (issue 23): whoever holds
/// the old key during its grace gets no budget of its own. A key limited to 10 an hour is
/// used 4 times, rolled, and the old and new keys are hammered together from two replicas;
/// rolled again, all three are hammered: the lineage admits at most 10 in the window
/// (exactly 10 in shared mode). With its newest key deleted, the others still share what
/// is left (refused, never `InvalidKey`).
pub async fn rolled_keys_share_one_rate_limit_budget(db: TestDb) {
    use apikeys_db::{RateLimitMode, Window};
    for mode in [RateLimitMode::Shared, RateLimitMode::Leased] {
        let admin = db.client_with(|b| b.rate_limit_mode(mode)).await;
        let replica = db.client_with(|b| b.rate_limit_mode(mode)).await;
        let org = org(&admin, &format!("acme-{mode:?}")).await;
        let limit = RateLimit::per_hour(10).unwrap();
        let a = admin.create_key(org, NewKey::new("a").with_rate_limit(limit)).await.unwrap();
        apikeys_testing::leave_room(&admin, Window::Hour, Duration::from_secs(120)).await;
        let mut ok = 0;
        for c in [&admin, &replica, &admin, &replica] {
            assert!(admitted(c, a.key.expose_secret()).await);
            ok += 1;
        }
        let hammer = async |keys: Vec<String>| {
            let mut tasks = Vec::new();
            for client in [&admin, &replica] {
                for key in &keys {
                    let (client, key) = (client.clone(), key.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut ok = 0;
                        for _ in 0..10 {
                            ok += usize::from(admitted(&client, &key).await);
                        }
                        ok
                    }));
                }
            }
            let mut ok = 0;
            for t in tasks {
                ok += t.await.unwrap();
            }
            ok
        };
        let hour = Duration::from_secs(3600);
        let b = admin.roll_key(a.record.id, hour).await.unwrap();
        let keys = [&a, &b].map(|k| k.key.expose_secret().to_owned());
        ok += hammer(keys.to_vec()).await;
        let c = admin.roll_key(b.record.id, hour).await.unwrap();
        let keys = [&a, &b, &c].map(|k| k.key.expose_secret().to_owned());
        ok += hammer(keys.to_vec()).await;
        assert!(ok <= 10, "{mode:?}: {ok} admitted in one window of a limit of 10");
        if mode == RateLimitMode::Shared {
            assert_eq!(ok, 10, "shared mode is exact");
        }
        admin.delete_key(c.record.id).await.unwrap();
        for k in [&a, &b] {
            for client in [&admin, &replica] {
                assert!(!admitted(client, k.key.expose_secret()).await, "{mode:?}");
            }
        }
    }
}

/// A roll with no grace is a revocation (issue 23): a replica whose clock is 30 s behind
/// the one that rolled refuses the old key at once with `Revoked` (an expiry set to the
/// roller's `now` would still be 30 s away for it), with the cache on and off.
pub async fn zero_grace_roll_is_a_revocation(db: TestDb) {
    for cached in [false, true] {
        let admin = db.client().await;
        let lagging = db
            .client_with(|b| {
                let b = b.clock(|| Utc::now() - TimeDelta::seconds(30));
                if cached { b.cache(cache()) } else { b }
            })
            .await;
        let org = org(&admin, "acme").await;
        let old = admin.create_key(org, NewKey::new("leaked")).await.unwrap();
        let key = old.key.expose_secret();
        if cached {
            warm(&lagging, key, &plain()).await;
        } else {
            lagging.validate_key(key, &plain()).await.unwrap();
        }
        let new = admin.roll_key(old.record.id, Duration::ZERO).await.unwrap();
        let (e, _) = refused_within_bound(&lagging, key, &plain(), Instant::now()).await;
        assert!(matches!(e, Error::Revoked { .. }), "{e:?}");
        let v = lagging.verify_key(key, &VerifyOptions::new()).await;
        assert!(matches!(v, Err(Error::Revoked { .. })), "{v:?}");
        let o = admin.get_key(old.record.id).await.unwrap();
        assert!(o.revoked_at.is_some() && o.rolled_to == Some(new.record.id), "{o:?}");
        lagging.validate_key(new.key.expose_secret(), &plain()).await.unwrap();
        assert_eq!(
            actions(&admin.list_key_events(old.record.id).await.unwrap()),
            [KeyAction::Created, KeyAction::Rolled, KeyAction::Revoked]
        );
    }
}

/// Owners are per organization (issue 23): two tenants use the same owner string; revoking
/// one tenant's owner leaves the other's keys working, and listing shows one tenant's keys.
pub async fn owners_are_per_organization(db: TestDb) {
    let client = db.client().await;
    let (one, two) = (org(&client, "tenant-one").await, org(&client, "tenant-two").await);
    let mk = |name: &str| NewKey::new(name).with_owner("user-1");
    let k1 = client.create_key(one, mk("k1")).await.unwrap();
    let k2 = client.create_key(two, mk("k2")).await.unwrap();
    let k3 = client.create_key(two, mk("k3")).await.unwrap();
    let page = Page::first(10).unwrap();
    let ids = |p: apikeys_db::KeyPage<apikeys_db::ApiKey>| {
        p.items.iter().map(|k| k.id).collect::<Vec<_>>()
    };
    let list =
        async |org, status| ids(client.list_owner_keys(org, "user-1", status, page).await.unwrap());
    assert_eq!(list(one, StatusFilter::All).await, [k1.record.id]);
    assert_eq!(list(two, StatusFilter::All).await, [k2.record.id, k3.record.id]);
    assert_eq!(client.revoke_owner_keys(one, "user-1").await.unwrap(), [k1.record.id]);
    assert!(client.revoke_owner_keys(one, "user-1").await.unwrap().is_empty());
    for k in [&k2, &k3] {
        client.validate_key(k.key.expose_secret(), &plain()).await.unwrap();
    }
    let r = client.validate_key(k1.key.expose_secret(), &plain()).await;
    assert!(matches!(r, Err(Error::Revoked { .. })), "{r:?}");
    assert_eq!(list(two, StatusFilter::Active).await, [k2.record.id, k3.record.id]);
    assert!(list(one, StatusFilter::Active).await.is_empty());
    // An organization that does not exist has no keys, and revokes none.
    let nowhere = apikeys_db::OrgId::new();
    assert!(list(nowhere, StatusFilter::All).await.is_empty());
    assert!(client.revoke_owner_keys(nowhere, "user-1").await.unwrap().is_empty());
    // Bad input is refused before anything is read or written.
    let r = client.revoke_owner_keys(two, " user-1").await;
    assert!(matches!(r, Err(Error::InvalidInput { field: "owner_id", .. })), "{r:?}");
    let r = client.list_owner_keys(two, "", StatusFilter::All, page).await;
    assert!(matches!(r, Err(Error::InvalidInput { field: "owner_id", .. })), "{r:?}");
    assert_eq!(client.revoke_owner_keys(two, "user-1").await.unwrap().len(), 2);
}

/// A rolled (superseded) key is not renewed or extended, and is not listed as expiring
/// (issue 23): its successor is the key to renew. The refusal is typed, names the successor
/// and changes nothing.
pub async fn rolled_keys_are_not_renewed_or_listed_as_expiring(db: TestDb) {
    let clock = TestClock::at(Utc::now());
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let day = Duration::from_secs(86_400);
    let old = client.create_key(org, NewKey::new("k").expires_after(2 * day)).await.unwrap();
    let new = client.roll_key(old.record.id, Duration::from_secs(3600)).await.unwrap();
    let before = client.get_key(old.record.id).await.unwrap();
    let later = clock.now() + TimeDelta::days(30);
    let r = client.renew_key(old.record.id, later).await;
    assert!(
        matches!(r, Err(Error::AlreadyExists { existing }) if existing == new.record.id.into()),
        "{r:?}"
    );
    let r = client.extend_key(old.record.id, day).await;
    assert!(
        matches!(r, Err(Error::AlreadyExists { existing }) if existing == new.record.id.into()),
        "{r:?}"
    );
    assert_eq!(client.get_key(old.record.id).await.unwrap(), before, "nothing changed");
    let page = Page::first(10).unwrap();
    let expiring = client.list_expiring_keys(3 * day, page).await.unwrap();
    assert_eq!(expiring.items.iter().map(|k| k.id).collect::<Vec<_>>(), [new.record.id]);
    client.validate_key(old.key.expose_secret(), &plain()).await.unwrap();
    client.renew_key(new.record.id, later).await.unwrap();
}

/// The start of the UTC day after `t`.
fn next_day(t: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    t.date_naive().succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc()
}

/// A replica whose clock is a day ahead (or behind) cannot move the shared refill period
/// (issue 23): spending, creating and updating credits from it neither refills early nor
/// pushes the next refill out for the replicas with the right time.
pub async fn a_skewed_clock_cannot_move_the_credit_period(db: TestDb) {
    // The test reasons about "today": run it again if the UTC day changed meanwhile.
    for _ in 0..2 {
        let today = Utc::now().date_naive();
        skewed_credit_case(&db).await;
        if Utc::now().date_naive() == today {
            return;
        }
    }
    panic!("the UTC day changed twice during the test");
}

async fn skewed_credit_case(db: &TestDb) {
    let normal = db.client().await;
    let ahead = db.client_with(|b| b.clock(|| Utc::now() + TimeDelta::days(1))).await;
    let behind = db.client_with(|b| b.clock(|| Utc::now() - TimeDelta::days(1))).await;
    let org = org(&normal, "acme").await;
    let tomorrow = next_day(Utc::now());
    let daily = Credits::new(2).with_refill(Refill::daily(5));
    let exhausted = |r: apikeys_db::Result<apikeys_db::ApiKey>| match r {
        Err(Error::UsageExhausted { refill_at }) => refill_at,
        other => panic!("{other:?}"),
    };
    let spend_all = async |client: &apikeys_db::ApiKeyClient, key: &str| {
        let mut ok = 0;
        loop {
            match client.validate_key(key, &plain()).await {
                Ok(_) => ok += 1,
                Err(Error::UsageExhausted { .. }) => return ok,
                Err(e) => panic!("{e:?}"),
            }
            assert!(ok <= 10, "never exhausted");
        }
    };

    // Spent from a replica a day ahead: today's balance only, no early refill.
    let k = normal.create_key(org, NewKey::new("spent-ahead").with_credits(daily)).await.unwrap();
    let key = k.key.expose_secret();
    assert_eq!(spend_all(&ahead, key).await, 2, "a clock ahead refilled early");
    assert_eq!(exhausted(normal.validate_key(key, &plain()).await), Some(tomorrow));
    assert_eq!(exhausted(ahead.validate_key(key, &plain()).await), Some(tomorrow));

    // Created from a replica a day ahead: the first refill is still tomorrow.
    let new =
        NewKey::new("created-ahead").with_credits(Credits::new(1).with_refill(Refill::daily(5)));
    let k = ahead.create_key(org, new).await.unwrap();
    assert_eq!(spend_all(&normal, k.key.expose_secret()).await, 1);
    assert_eq!(
        exhausted(normal.validate_key(k.key.expose_secret(), &plain()).await),
        Some(tomorrow)
    );

    // Created from a replica a day behind: no refill today on top of the balance.
    let new =
        NewKey::new("created-behind").with_credits(Credits::new(1).with_refill(Refill::daily(5)));
    let k = behind.create_key(org, new).await.unwrap();
    assert_eq!(spend_all(&normal, k.key.expose_secret()).await, 1, "a clock behind refilled");

    // Credits set from a replica a day ahead: the next refill is still tomorrow.
    let k = normal.create_key(org, NewKey::new("updated-ahead")).await.unwrap();
    let credits = Credits::new(1).with_refill(Refill::daily(5));
    ahead.update_key(k.record.id, KeyUpdate::new().with_credits(Some(credits))).await.unwrap();
    assert_eq!(spend_all(&normal, k.key.expose_secret()).await, 1);
    assert_eq!(
        exhausted(normal.validate_key(k.key.expose_secret(), &plain()).await),
        Some(tomorrow)
    );
}

/// A database on the schema before owners were per organization and lineages were stored,
/// with a rolled key and owners in two organizations, upgrades with `create_tables` (the
/// Migrator `sea-orm-cli migrate up` runs): the owner index is per organization, and the
/// rolled key still shares its successor's rate limit.
pub async fn upgrade_to_per_organization_owners_and_lineage(db: TestDb) {
    use apikeys_db::{RateLimitMode, Window};
    use migration::MigratorTrait;
    let client = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Shared)).await;
    let (one, two) = (org(&client, "one").await, org(&client, "two").await);
    let limited = NewKey::new("a").with_owner("u").with_rate_limit(RateLimit::per_hour(4).unwrap());
    let a = client.create_key(one, limited).await.unwrap();
    let b = client.roll_key(a.record.id, Duration::from_secs(3600)).await.unwrap();
    let x = client.create_key(two, NewKey::new("x").with_owner("u")).await.unwrap();
    apikeys_testing::leave_room(&client, Window::Hour, Duration::from_secs(60)).await;
    assert!(admitted(&client, a.key.expose_secret()).await);
    assert!(admitted(&client, b.key.expose_secret()).await);

    let steps = steps_from("m20261205_000002_owners_and_lineage");
    migration::Migrator::down(client.connection(), Some(steps)).await.unwrap();
    let conn = client.connection();
    assert_eq!(
        migration::Migrator::get_pending_migrations(conn).await.unwrap().len(),
        steps as usize
    );
    let manager = migration::SchemaManager::new(conn);
    assert!(manager.has_index("api_keys", "ix_api_keys_owner").await.unwrap());
    assert!(!manager.has_column("api_keys", "lineage_head_id").await.unwrap());
    client.create_tables().await.unwrap();
    assert!(migration::Migrator::get_pending_migrations(conn).await.unwrap().is_empty());
    let manager = migration::SchemaManager::new(conn);
    assert!(manager.has_index("api_keys", "ix_api_keys_org_owner").await.unwrap());
    assert!(!manager.has_index("api_keys", "ix_api_keys_owner").await.unwrap());

    // The rolled key's lineage was filled in: the two keys still share 4 an hour.
    let mut ok = 2;
    for k in [&a, &b, &a, &b, &a, &b] {
        ok += usize::from(admitted(&client, k.key.expose_secret()).await);
    }
    assert_eq!(ok, 4);
    let page = Page::first(10).unwrap();
    let owned = client.list_owner_keys(two, "u", StatusFilter::All, page).await.unwrap();
    assert_eq!(owned.items.iter().map(|k| k.id).collect::<Vec<_>>(), [x.record.id]);
    let mut revoked = client.revoke_owner_keys(one, "u").await.unwrap();
    revoked.sort();
    assert_eq!(revoked, [a.record.id, b.record.id]);
    client.validate_key(x.key.expose_secret(), &plain()).await.unwrap();
}

/// A top-up (`add_credits`): 4 clients × 4 tasks spend (30 attempts each) while another
/// task adds 10 credits 20 times: every credit is spent once or left, none lost or spent
/// twice (passed + left = 50 + 200). A top-up after a refill fell due adds to the refilled
/// balance; a key with no balance, a revoked one, a rolled one, zero and an amount past the
/// maximum are refused and change nothing.
pub async fn adding_credits_is_atomic_and_follows_the_refill(db: TestDb) {
    let first = db.client().await;
    let org = org(&first, "acme").await;
    let issued = first.create_key(org, NewKey::new("topped").with_credits(Credits::new(50))).await;
    let issued = issued.unwrap();
    let (id, key) = (issued.record.id, issued.key.expose_secret().to_owned());
    let mut clients = vec![first.clone()];
    for _ in 1..4 {
        clients.push(db.client().await);
    }
    let barrier = Arc::new(Barrier::new(17));
    let mut spenders = Vec::new();
    for client in &clients {
        for _ in 0..4 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            spenders.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut passed = 0_u64;
                for _ in 0..30 {
                    match client.validate_key(&key, &plain()).await {
                        Ok(_) => passed += 1,
                        Err(Error::UsageExhausted { .. }) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                passed
            }));
        }
    }
    let adder = {
        let (client, barrier) = (clients[3].clone(), Arc::clone(&barrier));
        tokio::spawn(async move {
            barrier.wait().await;
            for _ in 0..20 {
                client.add_credits(id, 10).await.unwrap();
            }
        })
    };
    let mut passed = 0;
    for s in spenders {
        passed += s.await.unwrap();
    }
    adder.await.unwrap();
    let left = first.get_key(id).await.unwrap().credits.unwrap().remaining;
    assert_eq!(passed + left, 250, "passed {passed}, left {left}");

    // A refill fell due: the top-up adds to the refilled balance.
    let refilling = Credits::new(3).with_refill(Refill::daily(100));
    let r = first.create_key(org, NewKey::new("refills").with_credits(refilling)).await.unwrap();
    age_refill(&first, r.record.id, 1).await;
    let topped = first.add_credits(r.record.id, 5).await.unwrap();
    assert_eq!(topped.credits.unwrap().remaining, 105);
    let checked = first.validate_key(r.key.expose_secret(), &plain()).await.unwrap();
    assert_eq!(checked.credits.unwrap().remaining, 104, "the refill is not applied twice");
    let events = first.list_key_events(r.record.id).await.unwrap();
    assert_eq!(actions(&events), [KeyAction::Created, KeyAction::Updated]);

    // Refused, nothing written.
    let unlimited = first.create_key(org, NewKey::new("unlimited")).await.unwrap().record.id;
    let max = apikeys_db::core::limits::MAX_CREDITS;
    let before = first.get_key(r.record.id).await.unwrap();
    for (target, amount) in [(unlimited, 1), (r.record.id, 0), (r.record.id, max)] {
        match first.add_credits(target, amount).await {
            Err(Error::InvalidInput { field: "credits", .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(first.get_key(r.record.id).await.unwrap(), before);
    let rolled = first.roll_key(r.record.id, Duration::from_secs(60)).await.unwrap();
    match first.add_credits(r.record.id, 1).await {
        Err(Error::AlreadyExists { existing }) => assert_eq!(existing, rolled.record.id.into()),
        other => panic!("{other:?}"),
    }
    first.revoke_key(id).await.unwrap();
    assert!(matches!(first.add_credits(id, 1).await, Err(Error::Revoked { .. })));
    assert!(matches!(
        first.add_credits(apikeys_db::KeyId::new(), 1).await,
        Err(Error::NotFound { .. })
    ));
}
