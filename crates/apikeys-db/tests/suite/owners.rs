//! Owners as identities (issue 26, item 2): an owner's plan (limits and credits) is shared by
//! every key of the owner, across rolls, and checked in the same all-or-nothing step as the
//! key's own limits and credits.

use std::sync::Arc;
use std::time::Duration;

use apikeys_db::{
    ApiKeyClient, CreditMode, Credits, Error, KeyCache, NewKey, OrgId, OwnerPlan, Page, RateLimit,
    RateLimitMode, RateLimits, RecordId, Refill, Result, ValidateOptions, Window,
};
use tokio::sync::Barrier;

use apikeys_testing::{TestDb, leave_room};

use crate::keys::org;

const MODES: [RateLimitMode; 2] = [RateLimitMode::Shared, RateLimitMode::Leased];

fn limits(named: &[(&str, RateLimit)]) -> RateLimits {
    named.iter().fold(RateLimits::new(), |l, (name, limit)| l.with(*name, *limit).unwrap())
}

fn costing(cost: u32) -> ValidateOptions {
    ValidateOptions::new().track_usage(false).cost(cost)
}

/// `ok`, `credits`, or the name of the limit that refused (`main` for a key's main limit).
fn outcome(r: Result<apikeys_db::ApiKey>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(Error::Quota { name, .. }) => name.unwrap_or_else(|| "main".to_owned()),
        Err(Error::UsageExhausted { .. }) => "credits".to_owned(),
        Err(e) => panic!("{e:?}"),
    }
}

async fn owned_key(admin: &ApiKeyClient, org: OrgId, owner: &str, new: NewKey) -> String {
    let issued = admin.create_key(org, new.with_owner(owner)).await.unwrap();
    issued.key.expose_secret().to_owned()
}

/// The balance an owner's plan has left.
async fn shared_left(admin: &ApiKeyClient, org: OrgId, owner: &str) -> u64 {
    admin.get_owner(org, owner).await.unwrap().credits.unwrap().remaining
}

/// Two keys of one owner and the successor of a rolled one share the owner's limit of 6 a
/// day: checks spread over all of them, from fresh clients in the shared and leased modes,
/// pass exactly 6 times before `owner.daily` refuses. A key of another owner, and a key
/// of the same owner id in another organization, are untouched by it.
pub async fn owner_limits_are_shared_by_its_keys_and_rolls(db: TestDb) {
    let admin = db.client().await;
    for (i, mode) in MODES.into_iter().enumerate() {
        let acme = org(&admin, "acme").await;
        let owner = format!("team-{i}");
        let plan =
            OwnerPlan::new().with_rate_limits(limits(&[("daily", RateLimit::per_day(6).unwrap())]));
        admin.set_owner(acme, &owner, plan.clone()).await.unwrap();
        let a = owned_key(&admin, acme, &owner, NewKey::new("a")).await;
        let b = admin.create_key(acme, NewKey::new("b").with_owner(&owner)).await.unwrap();
        let rolled = admin.roll_key(b.record.id, Duration::from_secs(600)).await.unwrap();
        let keys = [a, b.key.expose_secret().to_owned(), rolled.key.expose_secret().to_owned()];
        let other = owned_key(&admin, acme, "someone-else", NewKey::new("c")).await;
        let globex = org(&admin, "globex").await;
        admin.set_owner(globex, &owner, plan).await.unwrap();
        let same_id_elsewhere = owned_key(&admin, globex, &owner, NewKey::new("d")).await;
        leave_room(&admin, Window::Day, Duration::from_secs(120)).await;
        let c = db.client_with(|b| b.rate_limit_mode(mode)).await;
        let mut seen = Vec::new();
        for n in 0..9 {
            seen.push(outcome(c.validate_key(&keys[n % 3], &costing(1)).await));
        }
        c.shutdown().await.unwrap();
        let mut want = vec!["ok"; 6];
        want.extend(["owner.daily"; 3]);
        assert_eq!(seen, want, "{mode:?}");
        let c = db.client_with(|b| b.rate_limit_mode(mode)).await;
        assert_eq!(outcome(c.validate_key(&keys[0], &costing(1)).await), "owner.daily");
        assert_eq!(outcome(c.validate_key(&other, &costing(1)).await), "ok");
        assert_eq!(outcome(c.validate_key(&same_id_elsewhere, &costing(1)).await), "ok");
        c.shutdown().await.unwrap();
    }
}

/// The owner's credits and the key's own are spent together or not at all, and a check a
/// limit refuses spends neither: key `a` has 3 credits of its own under an owner balance of
/// 10, key `b` none of its own, key `c` a main limit of 1 an hour (exact credits: every
/// balance read is the one the checks left).
pub async fn owner_credits_are_all_or_nothing(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let plan = OwnerPlan::new().with_credits(Credits::new(10));
    admin.set_owner(acme, "payer", plan).await.unwrap();
    let a = owned_key(&admin, acme, "payer", NewKey::new("a").with_credits(Credits::new(3))).await;
    let b = owned_key(&admin, acme, "payer", NewKey::new("b")).await;
    let limited = NewKey::new("c").with_rate_limit(RateLimit::per_hour(1).unwrap());
    let c = owned_key(&admin, acme, "payer", limited).await;
    leave_room(&admin, Window::Hour, Duration::from_secs(60)).await;
    let client = db.client_with(|b| b.credit_mode(CreditMode::Exact)).await;
    let check = async |key: &str, cost| outcome(client.validate_key(key, &costing(cost)).await);
    for _ in 0..3 {
        assert_eq!(check(&a, 1).await, "ok");
    }
    // `a`'s own balance is spent: refused, and the owner's credit it took goes back.
    assert_eq!(check(&a, 1).await, "credits");
    assert_eq!(shared_left(&admin, acme, "payer").await, 7);
    // `c`'s limit refuses its second check before any credit is spent.
    assert_eq!(check(&c, 1).await, "ok");
    assert_eq!(check(&c, 1).await, "main");
    assert_eq!(shared_left(&admin, acme, "payer").await, 6);
    assert_eq!(check(&b, 7).await, "credits", "more than the owner has");
    assert_eq!(check(&b, 6).await, "ok");
    assert_eq!(check(&b, 1).await, "credits");
    assert_eq!(shared_left(&admin, acme, "payer").await, 0);
    // A top-up is seen at once by the next check.
    admin.add_owner_credits(acme, "payer", 2).await.unwrap();
    assert_eq!(check(&b, 2).await, "ok");
}

/// With leased credits, the owner's balance is leased like a key's (blocks reserved ahead,
/// spent in memory) and still all or nothing: key `a`, with 5 credits of its own under an
/// owner balance of 1 000, is checked 20 times from a leased client: exactly 5 pass, and once
/// the client has shut down (giving back what it held) the owner has spent exactly 5 (the
/// 15 refused checks gave theirs back to the lease). A second key's checks keep passing
/// from memory meanwhile.
pub async fn leased_owner_credits_are_all_or_nothing(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let plan = OwnerPlan::new().with_credits(Credits::new(1_000));
    admin.set_owner(acme, "payer", plan).await.unwrap();
    let a = owned_key(&admin, acme, "payer", NewKey::new("a").with_credits(Credits::new(5))).await;
    let b = owned_key(&admin, acme, "payer", NewKey::new("b")).await;
    let client = db.client_with(|b| b.credit_mode(CreditMode::Leased)).await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(outcome(client.validate_key(&a, &costing(1)).await));
        assert_eq!(outcome(client.validate_key(&b, &costing(1)).await), "ok");
    }
    // Leased: the stored balance is below what was spent, by the block the client holds.
    let stored = shared_left(&admin, acme, "payer").await;
    assert!(stored < 1_000 - 5 - 20, "no block held: {stored}");
    client.shutdown().await.unwrap();
    let mut want = vec!["ok"; 5];
    want.extend(["credits"; 15]);
    assert_eq!(seen, want);
    assert_eq!(shared_left(&admin, acme, "payer").await, 1_000 - 5 - 20);
}

/// 4 clients (two caching; one with leased limits, one with leased credits) × 8 tasks, each
/// check costing 2, over three keys of one owner whose plan has a limit `a` of 60 a day and
/// 40 credits. Each task checks until the credits refuse it (a refusal by `a` can be
/// momentary, while units of checks the credits refused are on their way back, or last
/// while another client holds them; one by the credits too, while another client holds a
/// block): once every client has shut down (giving back what it held), passed × 2 + the
/// balance left is exactly 40, and at most 20 passed. After a top-up of 100, the same until
/// `a` refuses, then one client alone until `a` refuses: exactly 30 checks passed in all
/// (the 60 units of `a`), and every credit spent is accounted for.
pub async fn owner_plans_are_exact_under_concurrency(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let plan = OwnerPlan::new()
        .with_rate_limits(limits(&[("a", RateLimit::per_day(60).unwrap())]))
        .with_credits(Credits::new(40));
    admin.set_owner(acme, "busy", plan).await.unwrap();
    let mut keys = Vec::new();
    for name in ["k1", "k2", "k3"] {
        keys.push(owned_key(&admin, acme, "busy", NewKey::new(name)).await);
    }
    let keys = Arc::new(keys);
    leave_room(&admin, Window::Day, Duration::from_secs(300)).await;
    let run = async |until: &'static str| {
        let mut clients = Vec::new();
        for i in 0..4 {
            let mode = if i == 1 { RateLimitMode::Leased } else { RateLimitMode::Shared };
            let credits = if i == 3 { CreditMode::Leased } else { CreditMode::Exact };
            let cache = (i >= 2).then(|| KeyCache::new().max_staleness(Duration::from_secs(30)));
            let client = db.client_with(|b| {
                let b = b.rate_limit_mode(mode).credit_mode(credits);
                match cache {
                    Some(c) => b.cache(c),
                    None => b,
                }
            });
            clients.push(client.await);
        }
        let barrier = Arc::new(Barrier::new(32));
        let mut tasks = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            for t in 0..8 {
                let (client, keys, barrier) = (client.clone(), keys.clone(), barrier.clone());
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    // Until refused by `until`, or by the other one 50 times in a row (what
                    // another client holds, until it shuts down).
                    let (mut passed, mut refused) = (0, 0);
                    for n in 0..10_000 {
                        let key = &keys[(i + t + n) % 3];
                        match outcome(client.validate_key(key, &costing(2)).await) {
                            o if o == "ok" => (passed, refused) = (passed + 1, 0),
                            o if o == until => return passed,
                            o if o == "owner.a" || o == "credits" => {
                                refused += 1;
                                if refused == 50 {
                                    return passed;
                                }
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            o => panic!("{o}"),
                        }
                    }
                    passed
                }));
            }
        }
        let mut passed = 0;
        for task in tasks {
            passed += task.await.unwrap();
        }
        for client in clients {
            client.shutdown().await.unwrap();
        }
        passed
    };
    let first = run("credits").await;
    let left = shared_left(&admin, acme, "busy").await;
    assert!(first <= 20, "{first}");
    assert_eq!(first * 2 + left, 40, "every credit spent once or given back");
    admin.add_owner_credits(acme, "busy", 100).await.unwrap();
    let second = run("owner.a").await;
    let mut third = 0;
    while outcome(admin.validate_key(&keys[0], &costing(2)).await) == "ok" {
        third += 1;
    }
    assert_eq!(first + second + third, 30, "exactly the limit, refused checks gave units back");
    let spent = (second + third) * 2;
    assert_eq!(shared_left(&admin, acme, "busy").await, left + 100 - spent);
}

/// A replica that caches an owned key sees its owner's plan set, changed and deleted within
/// the cache's staleness bound: the plan is read with the key, and a change to it is a
/// change of each of the owner's keys in the feed.
pub async fn owner_plan_changes_reach_cached_replicas(db: TestDb) {
    let admin = db.client().await;
    let bound = Duration::from_millis(300);
    let cached = db.client_with(|b| b.cache(KeyCache::new().max_staleness(bound))).await;
    let acme = org(&admin, "acme").await;
    let key = owned_key(&admin, acme, "late", NewKey::new("k")).await;
    leave_room(&admin, Window::Day, Duration::from_secs(120)).await;
    crate::cache::warm(&cached, &key, &costing(1)).await;
    let one_a_day = limits(&[("daily", RateLimit::per_day(1).unwrap())]);
    // Set by another client: seen within the bound.
    admin.set_owner_limits(acme, "late", one_a_day).await.unwrap();
    tokio::time::sleep(bound * 2).await;
    assert_eq!(outcome(cached.validate_key(&key, &costing(1)).await), "ok");
    assert_eq!(outcome(cached.validate_key(&key, &costing(1)).await), "owner.daily");
    admin.delete_owner(acme, "late").await.unwrap();
    tokio::time::sleep(bound * 2).await;
    assert_eq!(outcome(cached.validate_key(&key, &costing(1)).await), "ok");
    // Set by the caching client itself: seen at once.
    let plan = OwnerPlan::new().with_credits(Credits::new(0));
    cached.set_owner(acme, "late", plan).await.unwrap();
    assert_eq!(outcome(cached.validate_key(&key, &costing(1)).await), "credits");
}

/// The plan's management: bad input is refused with a typed error and changes nothing;
/// `get_or_create_owner` is idempotent; listing pages through one organization's plans;
/// a refill rule starts with the next period.
pub async fn owner_plans_are_managed(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let bad = |r: Result<_>, field: &str| match r {
        Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
        other => panic!("{other:?}"),
    };
    bad(admin.set_owner(acme, "", OwnerPlan::new()).await.map(|_| ()), "owner_id");
    bad(admin.get_owner(acme, "a\nb").await.map(|_| ()), "owner_id");
    let too_much = OwnerPlan::new().with_credits(Credits::new(u64::MAX));
    bad(admin.set_owner(acme, "x", too_much).await.map(|_| ()), "credits");
    assert!(matches!(
        admin.get_owner(acme, "x").await,
        Err(Error::NotFound { id: RecordId::Owner(_) })
    ));
    let nowhere = OrgId::new();
    assert!(matches!(
        admin.set_owner(nowhere, "x", OwnerPlan::new()).await,
        Err(Error::NotFound { id: RecordId::Organization(o) }) if o == nowhere
    ));
    assert!(admin.list_owners_page(acme, Page::first(10).unwrap()).await.unwrap().items.is_empty());
    let monthly = OwnerPlan::new().with_credits(Credits::new(5).with_refill(Refill::monthly(50)));
    let (first, created) = admin.get_or_create_owner(acme, "x", monthly.clone()).await.unwrap();
    assert!(created);
    assert_eq!(first.credits, monthly.credits);
    admin.add_owner_credits(acme, "x", 1).await.unwrap();
    let (again, created) = admin.get_or_create_owner(acme, "x", monthly).await.unwrap();
    assert!(!created);
    assert_eq!(again.credits.unwrap().remaining, 6, "left as it was");
    // A limits change keeps the balance (and `updated_at`, as a top-up does); set_owner
    // sets it anew and moves `updated_at`.
    let daily = limits(&[("daily", RateLimit::per_day(9).unwrap())]);
    let changed = admin.set_owner_limits(acme, "x", daily.clone()).await.unwrap();
    assert_eq!((changed.rate_limits, changed.credits.unwrap().remaining), (daily, 6));
    assert_eq!(changed.updated_at, first.updated_at, "neither the top-up nor the limits moved it");
    let reset = admin.set_owner(acme, "x", OwnerPlan::new()).await.unwrap();
    assert_eq!((reset.rate_limits.len(), reset.credits), (0, None));
    assert!(reset.updated_at > first.updated_at);
    bad(admin.add_owner_credits(acme, "x", 5).await.map(|_| ()), "credits");
    bad(admin.add_owner_credits(acme, "x", 0).await.map(|_| ()), "credits");
    for i in 0..5 {
        admin.set_owner(acme, &format!("o{i}"), OwnerPlan::new()).await.unwrap();
    }
    let globex = org(&admin, "globex").await;
    admin.set_owner(globex, "o1", OwnerPlan::new()).await.unwrap();
    let mut seen = Vec::new();
    let mut page = Page::first(4).unwrap();
    loop {
        let listed = admin.list_owners_page(acme, page).await.unwrap();
        seen.extend(listed.items.iter().map(|o| (o.org_id, o.owner_id.clone())));
        match listed.next {
            Some(next) => page = Page::first(4).unwrap().after(next),
            None => break,
        }
    }
    seen.sort();
    let mut want: Vec<_> = ["o0", "o1", "o2", "o3", "o4", "x"].map(|o| (acme, o.to_owned())).into();
    want.sort();
    assert_eq!(seen, want);
    admin.delete_owner(acme, "x").await.unwrap();
    assert!(matches!(admin.delete_owner(acme, "x").await, Err(Error::NotFound { .. })));
    assert!(admin.get_owner(globex, "o1").await.is_ok(), "another organization's plan stays");
}

/// Upgrading from the schema before owners' plans: the table appears, and existing keys
/// work as before.
pub async fn upgrade_to_owner_plans(db: TestDb) {
    use migration::MigratorTrait;
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let old = owned_key(&admin, acme, "legacy", NewKey::new("old")).await;
    let steps = crate::lifecycle::steps_from("m20261206_000002_owner_plans");
    migration::Migrator::down(admin.connection(), Some(steps)).await.unwrap();
    let manager = migration::SchemaManager::new(admin.connection());
    assert!(!manager.has_table("owners").await.unwrap());
    admin.create_tables().await.unwrap();
    let manager = migration::SchemaManager::new(admin.connection());
    assert!(manager.has_table("owners").await.unwrap());
    assert_eq!(outcome(admin.validate_key(&old, &costing(1)).await), "ok");
    let plan = OwnerPlan::new().with_credits(Credits::new(1));
    admin.set_owner(acme, "legacy", plan).await.unwrap();
    assert_eq!(outcome(admin.validate_key(&old, &costing(1)).await), "ok");
    assert_eq!(outcome(admin.validate_key(&old, &costing(1)).await), "credits");
}

/// Admin calls racing each other and the hot path never fail for the race: 8 clients
/// bootstrapping one owner's plan at once all get it, exactly one creating it; `set_owner`
/// racing `delete_owner` is `Ok` (or, for the delete, `NotFound` of the owner), while the
/// owner's key is checked; never `Storage`.
pub async fn owner_plan_writes_race_cleanly(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let plan = OwnerPlan::new().with_credits(Credits::new(10));
    let barrier = Arc::new(Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, plan, barrier) = (db.client().await, plan.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            client.get_or_create_owner(acme, "boot", plan).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        let (found, new) = task.await.unwrap().unwrap();
        assert_eq!(found.credits, plan.credits);
        created += usize::from(new);
    }
    assert_eq!(created, 1);
    let key = owned_key(&admin, acme, "flappy", NewKey::new("k")).await;
    let (setter, deleter) = (db.client().await, db.client().await);
    let sets = tokio::spawn(async move {
        for i in 0..20 {
            let plan = OwnerPlan::new().with_credits(Credits::new(100 + i));
            setter.set_owner(acme, "flappy", plan).await.unwrap();
        }
    });
    let deletes = tokio::spawn(async move {
        for _ in 0..20 {
            match deleter.delete_owner(acme, "flappy").await {
                Ok(()) | Err(Error::NotFound { id: RecordId::Owner(_) }) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
    });
    for _ in 0..40 {
        match admin.validate_key(&key, &costing(1)).await {
            Ok(_) | Err(Error::UsageExhausted { .. }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    sets.await.unwrap();
    deletes.await.unwrap();
}

/// Keys created for an owner while its plan is set, each checked at once by a caching
/// replica, all see the plan within the cache's bound: a key created and cached (without
/// a plan) while the change was under way is announced once the change has committed. In
/// 5 rounds, one per owner: keys are created and checked without pause until the plan
/// (no credits left) has been set, and then every one of them is refused.
pub async fn keys_created_during_a_plan_change_see_it(db: TestDb) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let admin = db.client().await;
    let bound = Duration::from_millis(300);
    let cached = db.client_with(|b| b.cache(KeyCache::new().max_staleness(bound))).await;
    let acme = org(&admin, "acme").await;
    for round in 0..5 {
        let owner = format!("churn-{round}");
        let done = Arc::new(AtomicBool::new(false));
        let (creator, checker, stop) = (db.client().await, cached.clone(), done.clone());
        let owner_of_keys = owner.clone();
        let making = tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut after_done = 0;
            while after_done < 3 {
                after_done += usize::from(stop.load(Ordering::SeqCst));
                let key = owned_key(&creator, acme, &owner_of_keys, NewKey::new("k")).await;
                checker.validate_key(&key, &costing(0)).await.unwrap();
                keys.push(key);
            }
            keys
        });
        // Some keys first, so the change has feed rows to write while keys keep coming.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let plan = OwnerPlan::new().with_credits(Credits::new(0));
        admin.set_owner(acme, &owner, plan).await.unwrap();
        done.store(true, Ordering::SeqCst);
        let keys = making.await.unwrap();
        tokio::time::sleep(bound * 3).await;
        for key in &keys {
            assert_eq!(outcome(cached.validate_key(key, &costing(1)).await), "credits");
        }
    }
}

/// A change of the limits alone keeps the balance and lets a refused check give its
/// owner's credit back: a key whose own balance is spent is checked while the owner's
/// limits change, and the owner's balance never goes down.
pub async fn a_change_of_limits_keeps_give_backs(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    admin.set_owner(acme, "lim", OwnerPlan::new().with_credits(Credits::new(50))).await.unwrap();
    let spent =
        owned_key(&admin, acme, "lim", NewKey::new("k").with_credits(Credits::new(0))).await;
    let changer = db.client().await;
    let changes = tokio::spawn(async move {
        for i in 1..=20 {
            let limits = limits(&[("daily", RateLimit::per_day(1_000 + i).unwrap())]);
            changer.set_owner_limits(acme, "lim", limits).await.unwrap();
        }
    });
    for _ in 0..40 {
        assert_eq!(outcome(admin.validate_key(&spent, &costing(1)).await), "credits");
    }
    changes.await.unwrap();
    assert_eq!(shared_left(&admin, acme, "lim").await, 50);
}

/// A cache warmed with `warm_cache` holds each key with its owner's plan (read in the same
/// statement), so the first checks it answers from memory already count against the plan;
/// and in `RateLimitMode::Local` the owner's limits are shared by its keys in the process.
pub async fn warmed_caches_and_local_mode_hold_owner_plans(db: TestDb) {
    let admin = db.client().await;
    let acme = org(&admin, "acme").await;
    let two = limits(&[("daily", RateLimit::per_day(2).unwrap())]);
    admin.set_owner_limits(acme, "warm", two).await.unwrap();
    let a = owned_key(&admin, acme, "warm", NewKey::new("a")).await;
    let b = owned_key(&admin, acme, "warm", NewKey::new("b")).await;
    leave_room(&admin, Window::Day, Duration::from_secs(120)).await;
    let cache = KeyCache::new().max_staleness(Duration::from_secs(30));
    let warmed = db.client_with(|b| b.cache(cache)).await;
    assert!(warmed.warm_cache().await.unwrap() >= 2);
    let hits = warmed.cache_stats().unwrap().hits;
    let seen = [
        outcome(warmed.validate_key(&a, &costing(1)).await),
        outcome(warmed.validate_key(&b, &costing(1)).await),
        outcome(warmed.validate_key(&a, &costing(1)).await),
    ];
    assert_eq!(seen, ["ok", "ok", "owner.daily"]);
    assert_eq!(warmed.cache_stats().unwrap().hits, hits + 3, "answered from the warmed cache");
    let local = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Local)).await;
    let seen = [
        outcome(local.validate_key(&b, &costing(1)).await),
        outcome(local.validate_key(&a, &costing(1)).await),
        outcome(local.validate_key(&b, &costing(1)).await),
    ];
    assert_eq!(seen, ["ok", "ok", "owner.daily"]);
}
