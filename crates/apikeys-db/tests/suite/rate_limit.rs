use std::sync::Arc;
use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, DbBackend, Statement};
use apikeys_db::{
    ApiKeyClient, Error, KeyUpdate, NewKey, RateLimit, RateLimitMode, ValidateOptions, Window,
};
use chrono::TimeDelta;
use tokio::sync::Barrier;

use apikeys_testing::{TestClock, TestDb, at, db_now_ms, hammer, leave_room, window_rows};

async fn key_with(client: &ApiKeyClient, limit: Option<RateLimit>) -> String {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut nk = NewKey::new("k").with_scopes(["read"]);
    if let Some(l) = limit {
        nk = nk.with_rate_limit(l);
    }
    client.create_key(org.id, nk).await.unwrap().key.expose_secret().to_owned()
}

fn quota(r: apikeys_db::Result<apikeys_db::ApiKey>) -> Option<Duration> {
    match r {
        Ok(_) => None,
        Err(Error::Quota { retry_after, .. }) => Some(retry_after),
        Err(e) => panic!("{e:?}"),
    }
}

/// 4 clients (pools) × 8 tasks hammer one key limited to 100 per hour: exactly 100 pass.
pub async fn shared_limit_is_exact_under_concurrency(db: TestDb) {
    let first = db.client().await;
    let key = key_with(&first, Some(RateLimit::per_hour(100).unwrap())).await;
    // All 160 in one hour (a new hour would admit 100 more): of the database's clock, or
    // of Redis's in the Redis run (a server on this host, whose clock SQLite's is).
    leave_room(&first, Window::Hour, Duration::from_secs(60)).await;
    let barrier = Arc::new(Barrier::new(32));
    let mut handles = Vec::new();
    for c in 0..4 {
        let client = if c == 0 { first.clone() } else { db.client().await };
        for _ in 0..8 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                hammer(&client, &key, 5, Duration::from_secs(3600)).await
            }));
        }
    }
    let (mut ok, mut limited) = (0, 0);
    for h in handles {
        let (o, l) = h.await.unwrap();
        ok += o;
        limited += l;
    }
    // 160 attempts in all (shared: counts are in the database, across the four pools).
    assert_eq!((ok, limited), (100, 60));
}

/// Second windows, hammered until four of them have each seen at least four checks: every
/// such window admits exactly the limit, refused requests use nothing (no row ever goes past
/// the limit), and a refusal's `retry_after` runs to the end of its window, not short of it.
pub async fn window_rollover_by_database_clock(db: TestDb) {
    use std::collections::BTreeMap;
    let client = db.client().await;
    let key = key_with(&client, Some(RateLimit::per_second(3).unwrap())).await;
    let (mut ok, mut limited) = (0, 0);
    // Checks per window of the database's clock, counted only for a check whose readings of
    // that clock before and after fell in the same second: it was cut in that window. (A
    // stall under load can leave a window with few checks, or none; such windows are not
    // asserted exact.)
    let mut checks: BTreeMap<i64, u32> = BTreeMap::new();
    let mut trail = Vec::new();
    let mut before = db_now_ms(&client).await;
    for _ in 0..50_000 {
        let outcome = quota(client.validate_key(&key, &ValidateOptions::new()).await);
        let after = db_now_ms(&client).await;
        trail.push((before, after, outcome));
        let window = before - before % 1000;
        if after - after % 1000 == window {
            *checks.entry(window).or_default() += 1;
            if let Some(retry) = outcome {
                // Not short of the window's end (clocks are read in whole milliseconds: 1 ms
                // of slack), and within the window (a round trip late at most).
                let (end, retry) = (window + 1000, i64::try_from(retry.as_micros()).unwrap());
                assert!(retry >= (end - after - 1) * 1000, "{:?}", trail.last());
                assert!(retry <= 1_000_000, "{:?}", trail.last());
            }
        }
        match outcome {
            None => ok += 1,
            Some(_) => limited += 1,
        }
        before = after;
        if checks.values().filter(|n| **n >= 4).count() >= 4 {
            break;
        }
    }
    let full: Vec<i64> = checks.iter().filter(|(_, n)| **n >= 4).map(|(w, _)| *w).collect();
    assert!(full.len() >= 4, "too few windows saw four checks: {checks:?}");
    let rows = window_rows(&client).await;
    assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), ok as i64, "{rows:?}");
    // Windows are cut by the database clock at whole seconds and none ever holds more than
    // the limit; each that saw four checks admitted exactly 3 (a refusal remembered from the
    // window before must not outlive it).
    for (start, count) in &rows {
        assert_eq!(start % 1000, 0);
        assert!(*count <= 3, "{rows:?}");
    }
    for w in &full {
        let count = rows.iter().find(|r| r.0 == *w).map(|r| r.1);
        let last = &trail[trail.len().saturating_sub(40)..];
        assert_eq!(count, Some(3), "{w}: {rows:?}; the last checks: {last:?}");
    }
    assert!(limited > 0);
}

/// Purging deletes only rows whose window ended at least five minutes ago by the database's
/// clock: never one that a check in flight could still count in.
pub async fn purge_keeps_windows_that_can_still_be_counted(db: TestDb) {
    let client = db.client().await;
    let key = key_with(&client, Some(RateLimit::per_minute(5).unwrap())).await;
    client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
    let id = client
        .verify_key(&key, &apikeys_db::VerifyOptions::new().track_usage(false))
        .await
        .unwrap()
        .id;
    let now = db_now_ms(&client).await;
    let conn = client.connection();
    for (start, end) in [(now - 400_000, now - 340_000), (now - 120_000, now - 60_000)] {
        conn.execute_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            match conn.get_database_backend() {
                DbBackend::Postgres => "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) VALUES ($1, $2, 5, $3)",
                _ => "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) VALUES (?, ?, 5, ?)",
            },
            [id.as_uuid().into(), start.into(), end.into()],
        ))
        .await
        .unwrap();
    }
    assert_eq!(db.count(&client, "rate_limit_windows").await, 3);
    assert_eq!(client.purge_rate_limit_windows().await.unwrap(), 1);
    let rows = window_rows(&client).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|(start, _)| *start > now - 400_000));
}

/// Clients whose clocks are 2 s and a minute ahead of and behind the database, all
/// hammering one key at once: the admitted total never exceeds the limit per window of the
/// database's clock, and every counted window is one the database's clock was in.
pub async fn skewed_clocks_share_one_window(db: TestDb) {
    let skews = [-60_000i64, -2_000, 0, 2_000, 60_000];
    for (limit, window) in [
        (RateLimit::per_minute(20).unwrap(), Window::Minute),
        (RateLimit::per_second(5).unwrap(), Window::Second),
    ] {
        let first = db.client().await;
        // A fresh key per case.
        let (org, _) = first.get_or_create_organization("acme").await.unwrap();
        let key = first
            .create_key(org.id, NewKey::new(window.as_str()).with_rate_limit(limit))
            .await
            .unwrap()
            .key
            .expose_secret()
            .to_owned();
        if window == Window::Minute {
            leave_room(&first, window, Duration::from_secs(15)).await;
        }
        let len = window.seconds() * 1000;
        let before = db_now_ms(&first).await;
        let barrier = Arc::new(Barrier::new(skews.len() * 4));
        let mut handles = Vec::new();
        for skew in skews {
            let client = db
                .client_with(|b| {
                    b.clock(move || chrono::Utc::now() + TimeDelta::milliseconds(skew))
                })
                .await;
            for _ in 0..4 {
                let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
                handles.push(tokio::spawn(async move {
                    barrier.wait().await;
                    // Second windows: keep going for 1.5 s so a boundary passes meanwhile.
                    let until = std::time::Instant::now() + Duration::from_millis(1_500);
                    let mut ok = 0;
                    let mut n = 0;
                    while n < 30 || (window == Window::Second && std::time::Instant::now() < until)
                    {
                        n += 1;
                        if quota(client.validate_key(&key, &ValidateOptions::new()).await).is_none()
                        {
                            ok += 1;
                        }
                    }
                    ok
                }));
            }
        }
        let mut admitted = 0i64;
        for h in handles {
            admitted += h.await.unwrap();
        }
        let after = db_now_ms(&first).await;
        let spanned = (after - after.rem_euclid(len) - (before - before.rem_euclid(len))) / len + 1;
        let requests = i64::from(limit.requests.get());
        assert!(
            admitted <= requests * spanned,
            "{window}: {admitted} admitted over {spanned} windows"
        );
        if window == Window::Minute {
            assert_eq!(spanned, 1);
            assert_eq!(admitted, requests, "one minute window, 5 skewed clients");
        } else {
            assert!(spanned >= 2, "the test must cross a second boundary");
        }
        let rows = window_rows(&first).await;
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|(start, _)| start % len == 0 && (*start >= before - before.rem_euclid(len)))
            .collect();
        assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), admitted, "{rows:?}");
        for (start, count) in &rows {
            assert!(*count <= requests, "{rows:?}");
            assert!(
                *start >= before - before.rem_euclid(len) && *start <= after,
                "{start} not in [{before}, {after}]"
            );
        }
        first.connection().execute_unprepared("DELETE FROM rate_limit_windows").await.unwrap();
    }
}

pub async fn keys_and_calls_are_independent(db: TestDb) {
    let client = db.client().await;
    let a = key_with(&client, Some(RateLimit::per_minute(2).unwrap())).await;
    let b = key_with(&client, Some(RateLimit::per_minute(2).unwrap())).await;
    leave_room(&client, Window::Minute, Duration::from_secs(20)).await;
    let unlimited = key_with(&client, None).await;
    for _ in 0..2 {
        assert_eq!(quota(client.validate_key(&a, &ValidateOptions::new()).await), None);
    }
    assert!(quota(client.validate_key(&a, &ValidateOptions::new()).await).is_some());
    // Another key has its own counter.
    assert_eq!(quota(client.validate_key(&b, &ValidateOptions::new()).await), None);
    // No rate limit: unlimited.
    for _ in 0..50 {
        assert_eq!(quota(client.validate_key(&unlimited, &ValidateOptions::new()).await), None);
    }
    // Disabled per call: admitted and not counted.
    for _ in 0..5 {
        client.validate_key(&a, &ValidateOptions::new().check_rate_limit(false)).await.unwrap();
        client.validate_key(&b, &ValidateOptions::new().check_rate_limit(false)).await.unwrap();
    }
    assert_eq!(quota(client.validate_key(&b, &ValidateOptions::new()).await), None);
    // A request rejected for scopes uses no quota; verify_key never counts.
    let need_admin = ValidateOptions::new().require_scopes(["admin"]).unwrap();
    for _ in 0..5 {
        assert!(matches!(
            client.validate_key(&b, &need_admin.clone()).await,
            Err(Error::InsufficientScope { .. })
        ));
    }
    assert!(quota(client.validate_key(&b, &ValidateOptions::new()).await).is_some());
}

/// The limit in force is the key's current one: raised mid-window it admits up to the new
/// limit at once (a refused request used nothing), lowered it refuses at once.
pub async fn update_takes_effect_on_next_check(db: TestDb) {
    let client = db.client().await;
    let other = db.client().await;
    let key = key_with(&client, Some(RateLimit::per_hour(1).unwrap())).await;
    leave_room(&client, Window::Hour, Duration::from_secs(30)).await;
    let id = client
        .verify_key(&key, &apikeys_db::VerifyOptions::new().track_usage(false))
        .await
        .unwrap()
        .id;
    assert_eq!(quota(client.validate_key(&key, &ValidateOptions::new()).await), None);
    for _ in 0..3 {
        assert!(quota(client.validate_key(&key, &ValidateOptions::new()).await).is_some());
        assert!(quota(other.validate_key(&key, &ValidateOptions::new()).await).is_some());
    }
    // Raised through another replica: both admit up to the new limit at once, although
    // this client had the key in its over-limit shortcut.
    other
        .update_key(id, KeyUpdate::new().with_rate_limit(Some(RateLimit::per_hour(5).unwrap())))
        .await
        .unwrap();
    for c in [&client, &other, &client, &other] {
        assert_eq!(quota(c.validate_key(&key, &ValidateOptions::new()).await), None);
    }
    assert!(quota(client.validate_key(&key, &ValidateOptions::new()).await).is_some());
    // Counted in SQL's rows; with Redis, in Redis, and not one row in SQL.
    let counted = if db.redis.is_none() { 5 } else { 0 };
    assert_eq!(window_rows(&client).await.iter().map(|r| r.1).sum::<i64>(), counted);
    // Lowered: refused at once, on both.
    client
        .update_key(id, KeyUpdate::new().with_rate_limit(Some(RateLimit::per_hour(2).unwrap())))
        .await
        .unwrap();
    assert!(quota(client.validate_key(&key, &ValidateOptions::new()).await).is_some());
    assert!(quota(other.validate_key(&key, &ValidateOptions::new()).await).is_some());
    client.update_key(id, KeyUpdate::new().with_rate_limit(None)).await.unwrap();
    assert_eq!(quota(client.validate_key(&key, &ValidateOptions::new()).await), None);
}

pub async fn local_mode(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client =
        db.client_with(|b| b.clock(clock.as_fn()).rate_limit_mode(RateLimitMode::Local)).await;
    let key = key_with(&client, Some(RateLimit::per_minute(3).unwrap())).await;
    for _ in 0..3 {
        assert_eq!(quota(client.validate_key(&key, &ValidateOptions::new()).await), None);
    }
    // GCRA: the burst is used up; one request frees every 20 s.
    let wait = quota(client.validate_key(&key, &ValidateOptions::new()).await).unwrap();
    assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20), "{wait:?}");
    clock.advance(TimeDelta::seconds(20));
    assert_eq!(quota(client.validate_key(&key, &ValidateOptions::new()).await), None);
    assert!(quota(client.validate_key(&key, &ValidateOptions::new()).await).is_some());
    // No database counters in local mode.
    assert_eq!(db.count(&client, "rate_limit_windows").await, 0);
}

/// Checks `key` until the first refusal (at most 1 000 times); returns how many passed.
async fn hammer_until_refused(client: &ApiKeyClient, key: &str) -> usize {
    for ok in 0..1_000 {
        if quota(client.validate_key(key, &ValidateOptions::new()).await).is_some() {
            return ok;
        }
    }
    panic!("1 000 checks passed on a key limited to 100");
}

/// Leased limits, mixed with plain shared checks on the same key (a rolling deploy): 2
/// leased clients × 8 tasks and 1 shared client × 8 tasks hammer one key limited to 100 per
/// hour, each task until it is refused: exactly 100 pass.
///
/// Each task stops at its first refusal, not after a fixed count: a leased client is refused
/// only when it holds no unit and the window is full, so once every client has been refused
/// no unit is left unspent anywhere. (With a fixed count per task, one lucky leased client
/// could finish all its checks admitted while still holding part of a block, which the
/// module docs allow: the window then ends that many short.)
pub async fn leased_limit_is_exact_under_concurrency(db: TestDb) {
    let first = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = key_with(&first, Some(RateLimit::per_hour(100).unwrap())).await;
    leave_room(&first, Window::Hour, Duration::from_secs(60)).await;
    let clients = [
        first.clone(),
        db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await,
        db.client().await,
    ];
    let clients_again = clients.clone();
    let barrier = Arc::new(Barrier::new(24));
    let mut handles = Vec::new();
    for client in clients {
        for _ in 0..8 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                hammer_until_refused(&client, &key).await
            }));
        }
    }
    let mut ok = 0;
    for h in handles {
        ok += h.await.unwrap();
    }
    assert_eq!(ok, 100);
    // Every client has been refused, so none holds a unit: a later check is refused too.
    for client in clients_again {
        assert!(quota(client.validate_key(&key, &ValidateOptions::new()).await).is_some());
    }
}

/// A leased client that shuts down gives the units it holds back: another client can then
/// admit exactly what is left of the limit.
pub async fn leased_units_are_given_back_on_shutdown(db: TestDb) {
    let leased = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = key_with(&leased, Some(RateLimit::per_hour(100).unwrap())).await;
    leave_room(&leased, Window::Hour, Duration::from_secs(60)).await;
    // Checks in quick succession grow the blocks (1, 2, 4, ... units): check until the
    // client holds units it has not spent.
    let mut admitted = 0;
    while window_rows(&leased).await.first().is_none_or(|w| w.1 == admitted) {
        assert!(admitted < 60, "blocks never grew");
        leased.validate_key(&key, &ValidateOptions::new()).await.unwrap();
        admitted += 1;
    }
    leased.shutdown().await.unwrap();
    assert_eq!(window_rows(&leased).await[0].1, admitted, "the unspent units went back");
    let shared = db.client().await;
    let left = 100 - admitted as usize;
    assert_eq!(hammer(&shared, &key, 100, Duration::from_secs(3600)).await, (left, 100 - left));
    assert!(quota(leased.validate_key(&key, &ValidateOptions::new()).await).is_some());
}

/// A limit raised between a lease and a shutdown (issue 23): a leased client holds units of
/// a key limited to 160 an hour, the limit goes to 1 600, other clients use the window up,
/// then the leased client shuts down and gives its units back, and more clients hammer the
/// key. Across every client the window admits at most the new limit, and once every client
/// has shut down its count is exactly what was admitted (never below it).
pub async fn leased_give_back_after_a_limit_raise_never_over_admits(db: TestDb) {
    let leased = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = key_with(&leased, Some(RateLimit::per_hour(160).unwrap())).await;
    let id = leased.verify_key(&key, &apikeys_db::VerifyOptions::new()).await.unwrap().id;
    leave_room(&leased, Window::Hour, Duration::from_secs(120)).await;
    // Quick checks grow the blocks: check until the client holds units it has not spent.
    let mut admitted = 0;
    while window_rows(&leased).await.first().is_none_or(|w| w.1 == admitted as i64) {
        assert!(admitted < 100, "blocks never grew");
        leased.validate_key(&key, &ValidateOptions::new()).await.unwrap();
        admitted += 1;
    }
    // Raised on another replica: the leased client still holds its units.
    let admin = db.client().await;
    let raised = KeyUpdate::new().with_rate_limit(Some(RateLimit::per_hour(1_600).unwrap()));
    admin.update_key(id, raised).await.unwrap();
    // Other replicas (leased and shared) use the raised window up, concurrently.
    let hammer_all = async |clients: Vec<ApiKeyClient>| {
        let mut handles = Vec::new();
        for client in clients {
            for _ in 0..4 {
                let (client, key) = (client.clone(), key.clone());
                handles.push(tokio::spawn(async move {
                    hammer(&client, &key, 450, Duration::from_secs(3600)).await.0
                }));
            }
        }
        let mut ok = 0;
        for h in handles {
            ok += h.await.unwrap();
        }
        ok
    };
    let others =
        vec![db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await, db.client().await];
    admitted += hammer_all(others.clone()).await;
    for c in &others {
        c.shutdown().await.unwrap();
    }
    leased.shutdown().await.unwrap();
    let later =
        vec![db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await, db.client().await];
    admitted += hammer_all(later.clone()).await;
    for c in &later {
        c.shutdown().await.unwrap();
    }
    assert!(admitted <= 1_600, "{admitted} admitted in one window of a limit of 1 600");
    // Every client has shut down and given back what it held: the count is exact.
    let count = window_rows(&leased).await[0].1;
    assert_eq!(count, admitted as i64, "the window's count against what was admitted");
}
