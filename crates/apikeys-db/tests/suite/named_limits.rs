//! Several named limits per key (issue 26, item 1): a check must fit in the main limit and
//! in every named one, all or nothing, and a refusal names the limit that refused.

use std::sync::Arc;
use std::time::Duration;

use apikeys_db::{
    ApiKeyClient, CreditMode, Error, KeyId, KeyUpdate, NewKey, RateLimit, RateLimitMode,
    RateLimits, Result, ValidateOptions, Window,
};
use tokio::sync::Barrier;

use apikeys_testing::{TestDb, leave_room};

const MODES: [RateLimitMode; 2] = [RateLimitMode::Shared, RateLimitMode::Leased];

async fn client(db: &TestDb, mode: RateLimitMode) -> ApiKeyClient {
    db.client_with(|b| b.rate_limit_mode(mode).credit_mode(CreditMode::Exact)).await
}

fn limits(named: &[(&str, RateLimit)]) -> RateLimits {
    named.iter().fold(RateLimits::new(), |l, (name, limit)| l.with(*name, *limit).unwrap())
}

async fn plan_key(
    admin: &ApiKeyClient,
    main: Option<RateLimit>,
    named: &[(&str, RateLimit)],
) -> (KeyId, String) {
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let mut new = NewKey::new("plan").with_rate_limits(limits(named));
    if let Some(main) = main {
        new = new.with_rate_limit(main);
    }
    let issued = admin.create_key(org.id, new).await.unwrap();
    (issued.record.id, issued.key.expose_secret().to_owned())
}

fn costing(cost: u32) -> ValidateOptions {
    ValidateOptions::new().track_usage(false).cost(cost)
}

/// `ok`, or the name of the limit that refused (`main` for the main one).
fn outcome(r: Result<apikeys_db::ApiKey>) -> String {
    match r {
        Ok(_) => "ok".to_owned(),
        Err(Error::Quota { name, .. }) => name.unwrap_or_else(|| "main".to_owned()),
        Err(e) => panic!("{e:?}"),
    }
}

/// A key with a main limit of 10 an hour and named limits `burst` (3 a minute) and `daily`
/// (5 a day), checked in phases on fresh clients (each shut down after its phase, so what
/// leases hold goes back): 3 pass and `burst` refuses; with `burst` removed, 2 pass and
/// `daily` refuses; with no named limit left, exactly 5 pass before the main limit refuses.
/// So the refused checks took nothing from the limits that admitted them (the main limit
/// ends at exactly 10), and each refusal named its limit.
pub async fn named_limits_are_all_or_nothing(db: TestDb) {
    let admin = db.client().await;
    for mode in MODES {
        let named = [
            ("burst", RateLimit::per_minute(3).unwrap()),
            ("daily", RateLimit::per_day(5).unwrap()),
        ];
        let (id, key) = plan_key(&admin, RateLimit::per_hour(10).ok(), &named).await;
        leave_room(&admin, Window::Minute, Duration::from_secs(20)).await;
        leave_room(&admin, Window::Day, Duration::from_secs(120)).await;
        let phase = async |n: usize| {
            let c = client(&db, mode).await;
            let mut seen = Vec::new();
            for _ in 0..n {
                seen.push(outcome(c.validate_key(&key, &costing(1)).await));
            }
            c.shutdown().await.unwrap();
            seen
        };
        assert_eq!(phase(5).await, ["ok", "ok", "ok", "burst", "burst"], "{mode:?}");
        let daily_only = limits(&named[1..]);
        admin.update_key(id, KeyUpdate::new().with_rate_limits(daily_only)).await.unwrap();
        assert_eq!(phase(4).await, ["ok", "ok", "daily", "daily"], "{mode:?}");
        admin.update_key(id, KeyUpdate::new().with_rate_limits(RateLimits::new())).await.unwrap();
        let mut expected = vec!["ok"; 5];
        expected.extend(["main"; 2]);
        assert_eq!(phase(7).await, expected, "{mode:?}");
        let record = admin.get_key(id).await.unwrap();
        assert!(record.rate_limits.is_empty() && record.rate_limit.is_some());
    }
}

/// A refusal names its limit and, with a cost, all of a check's units come from every
/// limit or none: a key limited to 20 an hour with a named `search` limit of 6 a minute,
/// checked at a cost of 4, passes once (4 of 6), is refused by `search` (8 > 6), and the
/// refused check left the main limit at 4: 16 more units pass at a cost of 1 once `search`
/// is gone.
pub async fn a_named_refusal_takes_nothing_from_the_main_limit(db: TestDb) {
    let admin = db.client().await;
    for mode in MODES {
        let named = [("search", RateLimit::per_minute(6).unwrap())];
        let (id, key) = plan_key(&admin, RateLimit::per_hour(20).ok(), &named).await;
        leave_room(&admin, Window::Minute, Duration::from_secs(20)).await;
        let c = client(&db, mode).await;
        assert_eq!(outcome(c.validate_key(&key, &costing(4)).await), "ok");
        match c.validate_key(&key, &costing(4)).await {
            Err(Error::Quota { name, limit, retry_after }) => {
                assert_eq!((name.as_deref(), limit), (Some("search"), named[0].1));
                assert!(retry_after <= Duration::from_secs(60));
            }
            other => panic!("{mode:?}: {other:?}"),
        }
        c.shutdown().await.unwrap();
        admin.update_key(id, KeyUpdate::new().with_rate_limits(RateLimits::new())).await.unwrap();
        let c = client(&db, mode).await;
        let mut passed = 0;
        while outcome(c.validate_key(&key, &costing(1)).await) == "ok" {
            passed += 1;
        }
        assert_eq!(passed, 16, "{mode:?}");
        c.shutdown().await.unwrap();
    }
}

/// 4 clients × 8 tasks check one key with named limits `a` (60 units an hour) and `b` (40),
/// at a cost of 2, until `b` refuses each 3 times in a row: `b` admits 20 checks (exactly,
/// in shared mode; in leased mode a client may be refused while another holds the last
/// units). Every check `b` refused gave back what `a` had counted: once `b` is removed, a
/// fresh client passes exactly the rest of `a` (30 checks in all).
pub async fn named_limits_are_exact_under_concurrency(db: TestDb) {
    let admin = db.client().await;
    for mode in MODES {
        let named =
            [("a", RateLimit::per_hour(60).unwrap()), ("b", RateLimit::per_hour(40).unwrap())];
        let (id, key) = plan_key(&admin, None, &named).await;
        leave_room(&admin, Window::Hour, Duration::from_secs(300)).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(client(&db, mode).await);
        }
        let barrier = Arc::new(Barrier::new(32));
        let mut tasks = Vec::new();
        for c in &clients {
            for _ in 0..8 {
                let (c, key, barrier) = (c.clone(), key.clone(), Arc::clone(&barrier));
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    // Until refused 3 times in a row: by `b` in shared mode, where `a` can
                    // refuse only for a moment (full of units that checks `b` is refusing
                    // hold until they give them back); by either in leased mode, where the
                    // units a client lacks may be held by the others.
                    let (mut ok, mut refused) = (0_u32, 0);
                    for _ in 0..5_000 {
                        match outcome(c.validate_key(&key, &costing(2)).await).as_str() {
                            "ok" => (ok, refused) = (ok + 1, 0),
                            "b" => refused += 1,
                            "a" if mode == RateLimitMode::Leased => refused += 1,
                            "a" => tokio::time::sleep(Duration::from_millis(20)).await,
                            other => panic!("refused by {other}"),
                        }
                        if refused == 3 {
                            return ok;
                        }
                    }
                    panic!("never refused 3 times in a row ({mode:?}, {ok} passed)")
                }));
            }
        }
        let mut passed = 0;
        for t in tasks {
            passed += t.await.unwrap();
        }
        for c in &clients {
            c.shutdown().await.unwrap();
        }
        assert!(passed <= 20, "{mode:?}: {passed}");
        if mode == RateLimitMode::Shared {
            assert_eq!(passed, 20, "{mode:?}");
        }
        let only_a = limits(&named[..1]);
        admin.update_key(id, KeyUpdate::new().with_rate_limits(only_a)).await.unwrap();
        let c = client(&db, mode).await;
        let mut more = 0;
        while outcome(c.validate_key(&key, &costing(2)).await) == "ok" {
            more += 1;
        }
        c.shutdown().await.unwrap();
        assert_eq!(passed + more, 30, "{mode:?}: {passed} then {more}");
    }
}

/// A rolled key and its successor share each named limit's budget, as they share the main
/// limit's: 2 checks of the old key, a roll, then 2 of the new key use `daily`'s 4; both
/// are refused after, naming `daily`.
pub async fn rolled_keys_share_named_limits(db: TestDb) {
    let admin = db.client().await;
    let named = [("daily", RateLimit::per_day(4).unwrap())];
    let (id, old) = plan_key(&admin, None, &named).await;
    leave_room(&admin, Window::Day, Duration::from_secs(120)).await;
    for _ in 0..2 {
        assert_eq!(outcome(admin.validate_key(&old, &costing(1)).await), "ok");
    }
    let new = admin.roll_key(id, Duration::from_secs(3600)).await.unwrap();
    let new = new.key.expose_secret().to_owned();
    assert_eq!(admin.get_key(id).await.unwrap().rate_limits, limits(&named));
    for _ in 0..2 {
        assert_eq!(outcome(admin.validate_key(&new, &costing(1)).await), "ok");
    }
    assert_eq!(outcome(admin.validate_key(&new, &costing(1)).await), "daily");
    assert_eq!(outcome(admin.validate_key(&old, &costing(1)).await), "daily");
}

/// A database on the schema before named limits, with keys in it, upgrades with
/// `create_tables`: the old keys have none, and new keys get theirs.
pub async fn upgrade_to_named_limits(db: TestDb) {
    use migration::MigratorTrait;
    let admin = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let old = admin.create_key(org.id, NewKey::new("old")).await.unwrap();
    let steps = crate::lifecycle::steps_from("m20261206_000001_named_rate_limits");
    migration::Migrator::down(admin.connection(), Some(steps)).await.unwrap();
    let manager = migration::SchemaManager::new(admin.connection());
    assert!(!manager.has_column("api_keys", "rate_limits").await.unwrap());
    assert!(!manager.has_table("rate_limit_named_windows").await.unwrap());
    admin.create_tables().await.unwrap();
    let manager = migration::SchemaManager::new(admin.connection());
    assert!(manager.has_column("api_keys", "rate_limits").await.unwrap());
    assert!(manager.has_table("rate_limit_named_windows").await.unwrap());
    assert!(admin.get_key(old.record.id).await.unwrap().rate_limits.is_empty());
    admin.validate_key(old.key.expose_secret(), &costing(1)).await.unwrap();
    let (_, key) = plan_key(&admin, None, &[("daily", RateLimit::per_day(1).unwrap())]).await;
    assert_eq!(outcome(admin.validate_key(&key, &costing(1)).await), "ok");
    assert_eq!(outcome(admin.validate_key(&key, &costing(1)).await), "daily");
}

/// In local mode too a named limit refuses by its name; and a limit whose window changes
/// counts afresh, in counters of its own (the windows of the same name and another length
/// are never mixed, in any mode).
pub async fn named_limits_in_local_mode_and_changed_windows(db: TestDb) {
    let admin = db.client().await;
    let local = client(&db, RateLimitMode::Local).await;
    let named = [("burst", RateLimit::per_minute(2).unwrap())];
    let (_, key) = plan_key(&admin, None, &named).await;
    let seen: Vec<String> = [
        local.validate_key(&key, &costing(1)).await,
        local.validate_key(&key, &costing(1)).await,
        local.validate_key(&key, &costing(1)).await,
    ]
    .into_iter()
    .map(outcome)
    .collect();
    assert_eq!(seen, ["ok", "ok", "burst"]);

    for mode in MODES {
        let (id, key) = plan_key(&admin, None, &[("x", RateLimit::per_minute(1).unwrap())]).await;
        leave_room(&admin, Window::Minute, Duration::from_secs(20)).await;
        let c = client(&db, mode).await;
        assert_eq!(outcome(c.validate_key(&key, &costing(1)).await), "ok");
        assert_eq!(outcome(c.validate_key(&key, &costing(1)).await), "x");
        c.shutdown().await.unwrap();
        let hourly = limits(&[("x", RateLimit::per_hour(2).unwrap())]);
        admin.update_key(id, KeyUpdate::new().with_rate_limits(hourly)).await.unwrap();
        let c = client(&db, mode).await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(outcome(c.validate_key(&key, &costing(1)).await));
        }
        assert_eq!(seen, ["ok", "ok", "x"], "{mode:?}: the hour's window starts afresh");
        c.shutdown().await.unwrap();
    }
}
