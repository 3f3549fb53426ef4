//! A check's cost (`ValidateOptions::cost`) and all-or-nothing checks (issue 26, item 1): a
//! check takes `cost` units of the key's rate limit and spends `cost` credits, and a check
//! refused by either spends nothing anywhere, in every mode that can give units back.

use std::sync::Arc;
use std::time::Duration;

use apikeys_db::{
    ApiKeyClient, CreditMode, Credits, Error, KeyId, KeyUpdate, NewKey, RateLimit, RateLimitMode,
    Result, ValidateOptions, Window,
};
use tokio::sync::Barrier;

use apikeys_testing::{TestDb, leave_room, window_rows};

/// The modes that can give units back, each with its credit mode.
const MODES: [(RateLimitMode, CreditMode); 2] =
    [(RateLimitMode::Shared, CreditMode::Exact), (RateLimitMode::Leased, CreditMode::Leased)];

async fn client(db: &TestDb, (limits, credits): (RateLimitMode, CreditMode)) -> ApiKeyClient {
    db.client_with(|b| b.rate_limit_mode(limits).credit_mode(credits)).await
}

async fn plan_key(
    client: &ApiKeyClient,
    name: &str,
    limit: RateLimit,
    credits: Option<u64>,
) -> (KeyId, String) {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut new = NewKey::new(name).with_rate_limit(limit);
    if let Some(c) = credits {
        new = new.with_credits(Credits::new(c));
    }
    let issued = client.create_key(org.id, new).await.unwrap();
    (issued.record.id, issued.key.expose_secret().to_owned())
}

fn costing(cost: u32) -> ValidateOptions {
    ValidateOptions::new().track_usage(false).cost(cost)
}

/// `ok`, `quota` or `credits`; anything else fails the test.
fn outcome(r: Result<apikeys_db::ApiKey>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Error::Quota { .. }) => "quota",
        Err(Error::UsageExhausted { .. }) => "credits",
        Err(e) => panic!("{e:?}"),
    }
}

/// A key limited to 10 an hour: checks costing 4, 4, 4, 2, 1 are admitted, admitted,
/// refused (2 left, nothing taken), admitted, refused; a check costing more than the limit
/// is never admitted and takes nothing; a cost of zero counts nothing. In shared mode the
/// window's count is exactly what was admitted.
pub async fn costs_take_units_all_or_nothing(db: TestDb) {
    for mode in MODES {
        let client = client(&db, mode).await;
        let name = format!("{:?}", mode.0);
        let (_, key) = plan_key(&client, &name, RateLimit::per_hour(10).unwrap(), None).await;
        leave_room(&client, Window::Hour, Duration::from_secs(120)).await;
        let mut seen = Vec::new();
        for cost in [4, 4, 4, 2, 1, 0] {
            seen.push(outcome(client.validate_key(&key, &costing(cost)).await));
        }
        assert_eq!(seen, ["ok", "ok", "quota", "ok", "quota", "ok"], "{mode:?}");
        // (Counted in SQL unless in Redis; leases add ahead.)
        let exact_rows = mode.0 == RateLimitMode::Shared && db.redis.is_none();
        if exact_rows {
            let counts: Vec<i64> = window_rows(&client).await.iter().map(|r| r.1).collect();
            assert_eq!(counts.iter().sum::<i64>(), 10, "{mode:?}: {counts:?}");
        }

        let (_, big) = plan_key(&client, "big", RateLimit::per_hour(3).unwrap(), None).await;
        let before = window_rows(&client).await;
        assert_eq!(outcome(client.validate_key(&big, &costing(4)).await), "quota");
        if exact_rows {
            assert_eq!(window_rows(&client).await, before, "a cost above the limit");
        }
        for _ in 0..3 {
            assert_eq!(outcome(client.validate_key(&big, &costing(1)).await), "ok", "{mode:?}");
        }
        client.shutdown().await.unwrap();
    }
}

/// A key limited to 5 an hour with 3 credits: 3 checks pass, then every check is refused for
/// its credits and never for its limit (each gives its unit back); once the credits are
/// raised, exactly the 2 units left of the limit are admitted (on a fresh client, after the
/// first gave back what its leases held).
pub async fn a_check_refused_for_credits_spends_no_rate_limit_unit(db: TestDb) {
    for mode in MODES {
        let client = client(&db, mode).await;
        let name = format!("{:?}", mode.0);
        let (id, key) = plan_key(&client, &name, RateLimit::per_hour(5).unwrap(), Some(3)).await;
        leave_room(&client, Window::Hour, Duration::from_secs(120)).await;
        let mut seen = Vec::new();
        for _ in 0..12 {
            seen.push(outcome(client.validate_key(&key, &costing(1)).await));
        }
        let mut expected = vec!["ok"; 3];
        expected.extend(["credits"; 9]);
        assert_eq!(seen, expected, "{mode:?}");
        // What leases hold goes back (awaited), then the credits are raised and a fresh
        // client checks.
        client.shutdown().await.unwrap();
        let admin = db.client().await;
        admin.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(100)))).await.unwrap();
        let client = self::client(&db, mode).await;
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(outcome(client.validate_key(&key, &costing(1)).await));
        }
        assert_eq!(seen, ["ok", "ok", "quota", "quota"], "{mode:?}");
        client.shutdown().await.unwrap();
    }
}

/// 4 clients × 8 tasks check one key (limited to 1 000 units an hour, with 60 credits) at a
/// cost of 3 until each is refused 3 times in a row: exactly 20 checks pass (the credits;
/// with leased credits, a client may be left holding fewer than 3 credits, given back when it
/// shuts down: then passed × 3 + the balance left is exactly 60), and every check refused for
/// its credits gave its units back: once the credits are raised, exactly the rest of the
/// limit's 999 affordable units pass (333 checks in all), on 4 new clients in shared mode, on
/// one in leased mode (where several would each hold units of the last blocks).
pub async fn costs_and_credits_are_exact_under_concurrency(db: TestDb) {
    for mode in MODES {
        let first = client(&db, mode).await;
        let name = format!("{:?}", mode.0);
        let limit = RateLimit::per_hour(1_000).unwrap();
        let (id, key) = plan_key(&first, &name, limit, Some(60)).await;
        leave_room(&first, Window::Hour, Duration::from_secs(300)).await;
        let mut clients = vec![first.clone()];
        for _ in 1..4 {
            clients.push(client(&db, mode).await);
        }
        let run = |clients: Vec<ApiKeyClient>| {
            let key = key.clone();
            async move {
                let barrier = Arc::new(Barrier::new(clients.len() * 8));
                let mut tasks = Vec::new();
                for client in clients {
                    for _ in 0..8 {
                        let (client, key, barrier) =
                            (client.clone(), key.clone(), Arc::clone(&barrier));
                        tasks.push(tokio::spawn(async move {
                            barrier.wait().await;
                            let (mut ok, mut refused_in_a_row) = (0_u64, 0);
                            while refused_in_a_row < 3 {
                                match outcome(client.validate_key(&key, &costing(3)).await) {
                                    "ok" => (ok, refused_in_a_row) = (ok + 1, 0),
                                    _ => refused_in_a_row += 1,
                                }
                            }
                            ok
                        }));
                    }
                }
                let mut ok = 0_u64;
                for t in tasks {
                    ok += t.await.unwrap();
                }
                ok
            }
        };
        let passed = run(clients.clone()).await;
        // What leases hold goes back, so that the credits and the limit's units are all in
        // the database.
        for c in &clients {
            c.shutdown().await.unwrap();
        }
        let admin = db.client().await;
        let left = admin.get_key(id).await.unwrap().credits.unwrap().remaining;
        assert_eq!(passed * 3 + left, 60, "{mode:?}: every credit spent once or left");
        if mode.1 == CreditMode::Exact {
            assert_eq!(passed, 20, "{mode:?}: the credits");
        }
        let credits = Some(Credits::new(1_000));
        admin.update_key(id, KeyUpdate::new().with_credits(credits)).await.unwrap();
        let mut clients = Vec::new();
        let fresh = if mode.0 == RateLimitMode::Leased { 1 } else { 4 };
        for _ in 0..fresh {
            clients.push(client(&db, mode).await);
        }
        assert_eq!(run(clients.clone()).await, 333 - passed, "{mode:?}: the limit's units left");
        for c in &clients {
            c.shutdown().await.unwrap();
        }
    }
}

/// A leased check that costs more than a block is counted all or nothing in the store, never
/// leased: a client whose window has 990 units left, refused a check that costs 995, holds
/// none of them, so another client (the first still holding its small block) can spend 850.
pub async fn an_expensive_refused_check_holds_no_units(db: TestDb) {
    let mode = (RateLimitMode::Leased, CreditMode::Leased);
    let (a, b) = (client(&db, mode).await, client(&db, mode).await);
    let (_, key) = plan_key(&a, "big", RateLimit::per_hour(1_000).unwrap(), None).await;
    leave_room(&a, Window::Hour, Duration::from_secs(120)).await;
    for _ in 0..10 {
        a.validate_key(&key, &costing(1)).await.unwrap();
    }
    assert_eq!(outcome(a.validate_key(&key, &costing(995)).await), "quota");
    assert_eq!(outcome(b.validate_key(&key, &costing(850)).await), "ok");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
