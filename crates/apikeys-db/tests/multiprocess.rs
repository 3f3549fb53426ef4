//! Several OS processes share one database, as replicas of one service do during a deploy.
//!
//! This binary is its own worker: run without `APIKEYS_WORKER`, it prepares a database per
//! backend and spawns `PROCESSES` copies of itself with `APIKEYS_WORKER=<scenario>`; each copy
//! runs its tasks and prints one result line per task, which the parent checks.
//!
//! - `bootstrap`: 4 processes × 16 tasks run the whole deploy bootstrap at the same moment on
//!   a database with no tables yet: `create_tables`, one organization, two projects, two
//!   products and three links. Exactly one row of each must exist afterwards, every caller must
//!   see the same ids, `created` must be true for exactly one caller per row, and no call may
//!   fail.
//! - `rate_limit`: 4 processes whose clocks are 60 s behind, 2 s behind, 2 s ahead and 60 s
//!   ahead of the database's × 8 tasks × 6 attempts on one key limited to 100 per minute,
//!   inside one minute of the database's clock: exactly 100 are admitted.
//! - `rate_limit_seconds`: 4 processes whose clocks are 2 s and 1 s behind and ahead × 4
//!   tasks hammer a key limited to 5 per second for 1.5 s, across window boundaries: no
//!   window of the database's clock admits more than 5, and every admitted request is in one.
//! - `leased`: the same 4 skewed processes × 8 tasks × 60 attempts on one key limited to
//!   1000 per minute, with leased limits (`RateLimitMode::Leased`): never more than 1000
//!   admitted, and at least 1000 minus the documented bound (what the 4 processes may hold
//!   with refill-ahead: half a block left when the next block was reserved, plus that block,
//!   `4 × 1.5 × 1000 / 16`).
//! - `redis_rate_limit`, `redis_leased` (with the cargo feature `redis`, on the first backend
//!   compiled in): `rate_limit` and `leased` with the limits counted in the Redis of
//!   `APIKEYS_TEST_REDIS_URL`, by Redis's clock. Exactly 100 admitted in shared mode; in leased
//!   mode 15 attempts per task (480, all admitted), and once every worker has shut down
//!   (giving back what it held), a new client is admitted exactly the other 520.
//! - `credits`: 4 processes (two caching keys) × 8 tasks × 5 attempts on one key with 100
//!   usage credits: exactly 100 pass.
//! - `leased_credits`: 4 processes with skewed clocks (two caching keys), each with leased
//!   credits and leased limits, × 8 tasks: on a key with 300 credits each task checks until
//!   `UsageExhausted`, and exactly 300 pass; on a key with 1 000 credits each task checks 5
//!   times (160 pass); every worker then shuts down, giving back what it holds, and the stored
//!   balances end at exactly 0 and 840.
//! - `costs`: 4 processes with skewed clocks (two caching keys), leased limits and leased
//!   credits, × 8 tasks, each checking at a cost of 3 until refused 3 times in a row: a key
//!   limited to 1 000 units an hour with 90 credits, a key limited to 300 units an hour, and a
//!   key with two named limits, `a` (600 units an hour) and `b` (300). Once every worker has
//!   shut down (giving back what it held): passed × 3 + the balance left is exactly 90 on the
//!   first key; every check refused for its credits or by `b` gave its units back and none
//!   was admitted past a limit, so a new client then passes exactly the rest of each limit
//!   (333, 100 and 100 checks in all), and with `b` removed exactly the rest of `a` (200).
//!   Two keys of one owner too, whose plan shares 450 units an hour and 120 credits (the
//!   second key also limited to 60 units of its own): passed × 3 + the shared balance left
//!   is exactly 120, and after a top-up exactly the rest of the shared limit passes.
//! - `races`: 4 processes × 6 tasks check 60 keys (tracked, untracked, shared limit) while
//!   each process also deletes, revokes and updates its quarter of them: every outcome is
//!   `Ok`, `InvalidKey`, `Revoked` or `NotFound`, never `Storage`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use apikeys_db::{ApiKeyClient, NewKey, RateLimit};
use apikeys_testing::{SECRET, TestDb};

const PROCESSES: usize = 4;
const BOOTSTRAP_TASKS: usize = 16;
const RATE_TASKS: usize = 8;
const ATTEMPTS: usize = 6;
const LIMIT: u32 = 100;
/// Each worker's clock offset from real time, by worker index (milliseconds).
const SKEWS_MS: [i64; PROCESSES] = [-60_000, -2_000, 2_000, 60_000];
/// The same for the per-second scenario.
const SECOND_SKEWS_MS: [i64; PROCESSES] = [-2_000, -1_000, 1_000, 2_000];
const PER_SECOND: u32 = 5;
const RACE_KEYS: usize = 60;
const RACE_TASKS: usize = 6;

#[tokio::main]
async fn main() {
    match std::env::var("APIKEYS_WORKER").as_deref() {
        Ok("bootstrap") => return bootstrap_worker().await,
        Ok("rate_limit") => return rate_limit_worker().await,
        Ok("races") => return races_worker().await,
        Ok("rate_limit_seconds") => return rate_limit_seconds_worker().await,
        Ok("credits") => return credits_worker().await,
        Ok("leased_credits") => return leased_credits_worker().await,
        Ok("costs") => return costs_worker().await,
        _ => {}
    }
    let cases = [
        ("bootstrap_across_processes", Scenario::Bootstrap),
        ("rate_limit_across_skewed_processes", Scenario::RateLimit),
        ("second_windows_across_skewed_processes", Scenario::RateLimitSeconds),
        ("leased_limit_across_skewed_processes", Scenario::Leased),
        ("races_across_processes", Scenario::Races),
        ("credits_across_processes", Scenario::Credits),
        ("leased_credits_across_skewed_processes", Scenario::LeasedCredits),
        ("costs_across_skewed_processes", Scenario::Costs),
    ];
    apikeys_testing::run_cases(
        &apikeys_testing::compiled_backends!(),
        "multiprocess",
        &cases,
        Scenario::run,
    )
    .await;
    #[cfg(feature = "redis")]
    {
        let cases = [
            ("redis_rate_limit_across_skewed_processes", Scenario::RedisRateLimit),
            ("redis_leased_limit_across_skewed_processes", Scenario::RedisLeased),
        ];
        // Redis counts; the keys live in SQL: the first backend compiled in.
        let first = apikeys_testing::compiled_backends!()[..1].to_vec();
        apikeys_testing::run_cases(&first, "multiprocess", &cases, Scenario::run).await;
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    Bootstrap,
    RateLimit,
    RateLimitSeconds,
    Leased,
    Races,
    Credits,
    LeasedCredits,
    Costs,
    #[cfg(feature = "redis")]
    RedisRateLimit,
    #[cfg(feature = "redis")]
    RedisLeased,
}

impl Scenario {
    async fn run(self, db: TestDb) {
        match self {
            Scenario::Bootstrap => bootstrap_across_processes(db).await,
            Scenario::RateLimit => rate_limit_across_processes(db).await,
            Scenario::Races => races_across_processes(db).await,
            Scenario::RateLimitSeconds => second_windows_across_processes(db).await,
            Scenario::Leased => leased_across_processes(db).await,
            Scenario::Credits => credits_across_processes(db).await,
            Scenario::LeasedCredits => leased_credits_across_processes(db).await,
            Scenario::Costs => costs_across_processes(db).await,
            #[cfg(feature = "redis")]
            Scenario::RedisRateLimit => {
                let (admitted, _, _) =
                    hammer_across_processes(&db.with_redis(), "shared", LIMIT, ATTEMPTS).await;
                assert_eq!(admitted, LIMIT as usize, "exactly the limit, counted in Redis");
            }
            #[cfg(feature = "redis")]
            Scenario::RedisLeased => redis_leased_across_processes(db.with_redis()).await,
        }
    }
}

/// Runs `PROCESSES` workers of `scenario` against `db`, all starting at the same instant, and
/// returns the result lines (those starting with `result `) of all of them.
async fn run_workers(scenario: &str, db: &TestDb, extra: &[(&str, String)]) -> Vec<String> {
    // All workers start at the same instant, after they had time to start and connect. This
    // is a start barrier only; nothing asserts on time.
    let start_at = chrono::Utc::now().timestamp_millis() + 2_000;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            let mut cmd = Command::new(&exe);
            cmd.env("APIKEYS_WORKER", scenario)
                .env("APIKEYS_WORKER_INDEX", i.to_string())
                .env("APIKEYS_WORKER_URL", &db.url)
                .env("APIKEYS_WORKER_START", start_at.to_string());
            for (k, v) in extra {
                cmd.env(k, v);
            }
            tokio::task::spawn_blocking(move || cmd.output().expect("spawn worker"))
        })
        .collect();
    let mut lines = Vec::new();
    for child in children {
        let out: Output = child.await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "worker failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines.extend(text.lines().filter_map(|l| l.strip_prefix("result ")).map(str::to_owned));
    }
    lines
}

fn worker_index() -> usize {
    std::env::var("APIKEYS_WORKER_INDEX").unwrap().parse().unwrap()
}

/// In a worker: a client on the parent's database, then a wait for the common start instant.
async fn worker_client() -> ApiKeyClient {
    worker_client_with(|b| b).await
}

async fn worker_client_with(
    f: impl FnOnce(apikeys_db::ClientBuilder) -> apikeys_db::ClientBuilder,
) -> ApiKeyClient {
    let url = std::env::var("APIKEYS_WORKER_URL").unwrap();
    let start: i64 = std::env::var("APIKEYS_WORKER_START").unwrap().parse().unwrap();
    let mut builder = ApiKeyClient::builder().database_url(url).signing_secret(SECRET);
    if let Ok(redis) = std::env::var("APIKEYS_WORKER_REDIS") {
        builder = with_redis(builder, &redis);
    }
    let client = f(builder).build().await.unwrap();
    let wait = start - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }
    client
}

/// Runs `tasks` copies of `f` on `client` and prints one `result` line per task.
async fn run_tasks<F, Fut>(client: ApiKeyClient, tasks: usize, f: F)
where
    F: Fn(ApiKeyClient) -> Fut,
    Fut: Future<Output = String> + Send + 'static,
{
    let handles: Vec<_> = (0..tasks).map(|_| tokio::spawn(f(client.clone()))).collect();
    for h in handles {
        println!("result {}", h.await.unwrap());
    }
}

async fn bootstrap_across_processes(db: TestDb) {
    let lines = run_workers("bootstrap", &db, &[]).await;
    assert_eq!(lines.len(), PROCESSES * BOOTSTRAP_TASKS, "{lines:?}");
    // Every line is "ids=<org>,<project>x2,<product>x2 created=<0/1 per row and link>".
    let ids: BTreeSet<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(ids.len(), 1, "every caller sees the same ids: {ids:?}");
    let flags: Vec<Vec<u32>> = lines
        .iter()
        .map(|l| {
            let created = l.split(' ').nth(1).unwrap().strip_prefix("created=").unwrap();
            created.chars().map(|c| c.to_digit(2).unwrap()).collect()
        })
        .collect();
    for i in 0..flags[0].len() {
        let creators = flags.iter().filter(|f| f[i] == 1).count();
        assert_eq!(creators, 1, "row/link #{i} reported created by exactly one caller");
    }
    let client = db.client().await;
    assert_eq!(db.counts(&client).await, [1, 2, 2, 3, 0, 0, 0]);
    let org = client.find_organization("acme").await.unwrap().unwrap();
    assert_eq!(
        ids.first().unwrap().strip_prefix("ids=").unwrap().split(',').next().unwrap(),
        org.id.to_string()
    );
}

async fn bootstrap_worker() {
    let client = worker_client().await;
    run_tasks(client, BOOTSTRAP_TASKS, |client| async move {
        client.create_tables().await.unwrap();
        let (org, o) = client.get_or_create_organization("acme").await.unwrap();
        let (web, p1) = client.get_or_create_project(org.id, "web").await.unwrap();
        let (mobile, p2) = client.get_or_create_project(org.id, "mobile").await.unwrap();
        let (api, q1) = client.get_or_create_product(org.id, "api").await.unwrap();
        let (billing, q2) = client.get_or_create_product(org.id, "billing").await.unwrap();
        let l1 = client.add_product_to_project(api.id, web.id).await.unwrap();
        let l2 = client.add_product_to_project(billing.id, web.id).await.unwrap();
        let l3 = client.add_product_to_project(api.id, mobile.id).await.unwrap();
        let created: String =
            [o, p1, p2, q1, q2, l1, l2, l3].iter().map(|&b| if b { '1' } else { '0' }).collect();
        format!(
            "ids={},{},{},{},{} created={created}",
            org.id, web.id, mobile.id, api.id, billing.id
        )
    })
    .await;
}

/// One key limited to `limit` per minute, hammered by the skewed workers (`attempts` each
/// per task, in `mode`) inside one minute of the database's clock: (admitted, refused).
async fn hammer_across_processes(
    db: &TestDb,
    mode: &str,
    limit: u32,
    attempts: usize,
) -> (usize, usize, String) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("hammered").with_rate_limit(RateLimit::per_minute(limit).unwrap());
    let key = client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned();
    // Workers start 2 s from now and take a few seconds at most: leave them 25 s of the
    // database's current minute, so exactly one window is in play.
    apikeys_testing::leave_room(&client, apikeys_db::Window::Minute, Duration::from_secs(25)).await;
    let env = [
        ("APIKEYS_WORKER_KEY", key.clone()),
        ("APIKEYS_WORKER_MODE", mode.to_owned()),
        ("APIKEYS_WORKER_ATTEMPTS", attempts.to_string()),
    ];
    let mut env = env.to_vec();
    if let Some(redis) = &db.redis {
        env.push(("APIKEYS_WORKER_REDIS", redis.clone()));
    }
    let lines = run_workers("rate_limit", db, &env).await;
    let (mut admitted, mut limited) = (0usize, 0usize);
    for line in &lines {
        let nums: Vec<usize> =
            line.split(' ').map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
        admitted += nums[0];
        limited += nums[1];
    }
    if db.redis.is_none() {
        assert_eq!(
            apikeys_testing::window_rows(&client).await.len(),
            1,
            "one window, by the database's clock"
        );
    }
    assert_eq!(admitted + limited, PROCESSES * RATE_TASKS * attempts);
    (admitted, limited, key)
}

async fn rate_limit_across_processes(db: TestDb) {
    let (admitted, _, _) = hammer_across_processes(&db, "shared", LIMIT, ATTEMPTS).await;
    assert_eq!(admitted, LIMIT as usize, "exactly the limit is admitted across skewed processes");
}

const LEASED_LIMIT: u32 = 1_000;
const LEASED_ATTEMPTS: usize = 60;

async fn leased_across_processes(db: TestDb) {
    let (admitted, _, _) =
        hammer_across_processes(&db, "leased", LEASED_LIMIT, LEASED_ATTEMPTS).await;
    let bound = PROCESSES * (LEASED_LIMIT as usize / 16) * 3 / 2;
    println!("leased across processes: {admitted} admitted of {LEASED_LIMIT}, bound {bound}");
    assert!(admitted <= LEASED_LIMIT as usize, "never more than the limit: {admitted}");
    assert!(admitted >= LEASED_LIMIT as usize - bound, "at most the bound unspent: {admitted}");
}

/// A worker of `hammer_across_processes`: its clock skewed, its tasks hammering the key.
async fn rate_limit_worker() {
    let key = std::env::var("APIKEYS_WORKER_KEY").unwrap();
    let attempts: usize = std::env::var("APIKEYS_WORKER_ATTEMPTS").unwrap().parse().unwrap();
    let mode = match std::env::var("APIKEYS_WORKER_MODE").as_deref() {
        Ok("leased") => apikeys_db::RateLimitMode::Leased,
        _ => apikeys_db::RateLimitMode::Shared,
    };
    let skew = chrono::TimeDelta::milliseconds(SKEWS_MS[worker_index()]);
    let client =
        worker_client_with(|b| b.clock(move || chrono::Utc::now() + skew).rate_limit_mode(mode))
            .await;
    run_tasks(client.clone(), RATE_TASKS, move |client| {
        let key = key.clone();
        async move {
            let (ok, limited) =
                apikeys_testing::hammer(&client, &key, attempts, Duration::from_secs(60)).await;
            format!("admitted={ok} limited={limited}")
        }
    })
    .await;
    // Leased: what this process holds of the window goes back.
    client.shutdown().await.unwrap();
}

#[cfg(feature = "redis")]
fn with_redis(builder: apikeys_db::ClientBuilder, url: &str) -> apikeys_db::ClientBuilder {
    builder.redis(url)
}

#[cfg(not(feature = "redis"))]
fn with_redis(_: apikeys_db::ClientBuilder, _: &str) -> apikeys_db::ClientBuilder {
    panic!("APIKEYS_WORKER_REDIS is set, but this test was built without the `redis` feature")
}

#[cfg(feature = "redis")]
/// `leased`, counted in Redis, with 15 attempts per task (480 in all: with the most the
/// processes may hold unspent, 372, still short of the limit, so every attempt is admitted);
/// then, every worker having shut down (giving back what it held), a new client is admitted
/// exactly the other 520: nothing is lost with the give-back, nothing admitted twice.
async fn redis_leased_across_processes(db: TestDb) {
    const ATTEMPTS: usize = 15;
    let (admitted, _, key) = hammer_across_processes(&db, "leased", LEASED_LIMIT, ATTEMPTS).await;
    assert_eq!(admitted, PROCESSES * RATE_TASKS * ATTEMPTS, "every attempt admitted");
    let client = db.client().await;
    let mut rest = 0;
    while client.validate_key(&key, &apikeys_db::ValidateOptions::new()).await.is_ok() {
        rest += 1;
    }
    println!("leased across processes on Redis: {admitted} admitted, then {rest} after give-back");
    assert_eq!(admitted + rest, LEASED_LIMIT as usize, "the window ends at exactly the limit");
}

/// 4 processes (two with the verified-key cache) × 8 tasks × 5 attempts on one key with 100
/// usage credits: exactly 100 pass, the other 60 are `UsageExhausted`, and none is `Quota`.
async fn credits_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let nk = NewKey::new("trial").with_credits(apikeys_db::Credits::new(100));
    let issued = client.create_key(org.id, nk).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    let lines = run_workers("credits", &db, &[("APIKEYS_WORKER_KEY", key)]).await;
    let (mut ok, mut spent) = (0, 0);
    for line in &lines {
        let (o, s) = line.split_once(' ').unwrap();
        ok += o.parse::<usize>().unwrap();
        spent += s.parse::<usize>().unwrap();
    }
    assert_eq!((ok, spent), (100, PROCESSES * RATE_TASKS * 5 - 100));
    let left = client.get_key(issued.record.id).await.unwrap().credits.unwrap().remaining;
    assert_eq!(left, 0);
}

async fn credits_worker() {
    let key = std::env::var("APIKEYS_WORKER_KEY").unwrap();
    let cached = worker_index() % 2 == 1;
    let client =
        worker_client_with(|b| if cached { b.cache(apikeys_db::KeyCache::new()) } else { b }).await;
    run_tasks(client, RATE_TASKS, move |client| {
        let key = key.clone();
        async move {
            let (mut ok, mut spent) = (0, 0);
            for _ in 0..5 {
                match client.validate_key(&key, &apikeys_db::ValidateOptions::new()).await {
                    Ok(_) => ok += 1,
                    Err(apikeys_db::Error::UsageExhausted { .. }) => spent += 1,
                    Err(e) => panic!("{e:?}"),
                }
            }
            format!("{ok} {spent}")
        }
    })
    .await;
}

/// See `leased_credits` in the module docs.
async fn leased_credits_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for credits in [300, 1_000] {
        let nk = NewKey::new("plan")
            .with_credits(apikeys_db::Credits::new(credits))
            .with_rate_limit(RateLimit::per_hour(100_000).unwrap());
        keys.push(client.create_key(org.id, nk).await.unwrap());
    }
    let plain: Vec<String> = keys.iter().map(|k| k.key.expose_secret().to_owned()).collect();
    let lines =
        run_workers("leased_credits", &db, &[("APIKEYS_WORKER_KEYS", plain.join(","))]).await;
    let (mut until_out, mut five_each) = (0, 0);
    for line in &lines {
        let (a, b) = line.split_once(' ').unwrap();
        until_out += a.parse::<u64>().unwrap();
        five_each += b.parse::<u64>().unwrap();
    }
    let left = |i: usize| {
        let id = keys[i].record.id;
        let client = client.clone();
        async move { client.get_key(id).await.unwrap().credits.unwrap().remaining }
    };
    println!("leased credits across processes: {until_out} of 300, {five_each} of 1000 spent");
    assert_eq!(until_out, 300, "every credit spent, none twice");
    assert_eq!(left(0).await, 0);
    assert_eq!(five_each, (PROCESSES * RATE_TASKS * 5) as u64);
    assert_eq!(left(1).await, 1_000 - five_each, "what the workers held went back");
}

/// In a worker: the keys of `APIKEYS_WORKER_KEYS`, and a client with this worker's clock
/// skew ([`SKEWS_MS`]), leased limits and leased credits, caching keys in every other
/// worker.
async fn leased_skewed_worker() -> (Vec<String>, ApiKeyClient) {
    let keys: Vec<String> =
        std::env::var("APIKEYS_WORKER_KEYS").unwrap().split(',').map(str::to_owned).collect();
    let skew = chrono::TimeDelta::milliseconds(SKEWS_MS[worker_index()]);
    let cached = worker_index() % 2 == 1;
    let client = worker_client_with(|b| {
        let b = b
            .clock(move || chrono::Utc::now() + skew)
            .credit_mode(apikeys_db::CreditMode::Leased)
            .rate_limit_mode(apikeys_db::RateLimitMode::Leased);
        if cached { b.cache(apikeys_db::KeyCache::new()) } else { b }
    })
    .await;
    (keys, client)
}

/// Waits for `tasks`, shuts `client` down (what it holds goes back), then prints each
/// task's `result` line: the parent reads the database once every worker has exited.
async fn report_after_shutdown(client: ApiKeyClient, tasks: Vec<tokio::task::JoinHandle<String>>) {
    let mut lines = Vec::new();
    for t in tasks {
        lines.push(t.await.unwrap());
    }
    client.shutdown().await.unwrap();
    for line in lines {
        println!("result {line}");
    }
}

async fn leased_credits_worker() {
    let (keys, client) = leased_skewed_worker().await;
    let tasks: Vec<_> = (0..RATE_TASKS)
        .map(|_| {
            let (client, keys) = (client.clone(), keys.clone());
            tokio::spawn(async move {
                let opts = apikeys_db::ValidateOptions::new();
                let mut until_out = 0;
                for _ in 0..1_000 {
                    match client.validate_key(&keys[0], &opts).await {
                        Ok(_) => until_out += 1,
                        Err(apikeys_db::Error::UsageExhausted { .. }) => break,
                        Err(e) => panic!("{e:?}"),
                    }
                }
                for _ in 0..5 {
                    client.validate_key(&keys[1], &opts).await.unwrap();
                }
                format!("{until_out} 5")
            })
        })
        .collect();
    report_after_shutdown(client, tasks).await;
}

/// The cost of every check of the `costs` scenario.
const COST: u32 = 3;

/// Checks `key` at [`COST`] until refused 3 times in a row; returns how many passed.
async fn check_until_refused(client: &ApiKeyClient, key: &str) -> u64 {
    let options = apikeys_db::ValidateOptions::new().track_usage(false).cost(COST);
    let (mut passed, mut refused) = (0, 0);
    while refused < 3 {
        match client.validate_key(key, &options).await {
            Ok(_) => (passed, refused) = (passed + 1, 0),
            Err(apikeys_db::Error::Quota { .. } | apikeys_db::Error::UsageExhausted { .. }) => {
                refused += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    passed
}

/// See `costs` in the module docs.
async fn costs_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let plans = [(1_000, Some(90)), (300, None)];
    let mut keys = Vec::new();
    for (units, credits) in plans {
        let mut nk = NewKey::new("plan").with_rate_limit(RateLimit::per_hour(units).unwrap());
        if let Some(c) = credits {
            nk = nk.with_credits(apikeys_db::Credits::new(c));
        }
        keys.push(client.create_key(org.id, nk).await.unwrap());
    }
    let named = |b: bool| {
        let a = apikeys_db::RateLimits::new().with("a", RateLimit::per_hour(600).unwrap());
        if b { a.and_then(|l| l.with("b", RateLimit::per_hour(300).unwrap())) } else { a }
    };
    let nk = NewKey::new("named").with_rate_limits(named(true).unwrap());
    keys.push(client.create_key(org.id, nk).await.unwrap());
    // Two keys of one owner whose plan shares a limit of 450 units an hour and 120 credits;
    // the second has a main limit of its own too.
    let team = apikeys_db::RateLimits::new().with("hourly", RateLimit::per_hour(450).unwrap());
    let plan = apikeys_db::OwnerPlan::new()
        .with_rate_limits(team.unwrap())
        .with_credits(apikeys_db::Credits::new(120));
    client.set_owner(org.id, "team", plan).await.unwrap();
    keys.push(client.create_key(org.id, NewKey::new("t1").with_owner("team")).await.unwrap());
    let own_limit =
        NewKey::new("t2").with_owner("team").with_rate_limit(RateLimit::per_hour(60).unwrap());
    keys.push(client.create_key(org.id, own_limit).await.unwrap());
    apikeys_testing::leave_room(&client, apikeys_db::Window::Hour, Duration::from_secs(300)).await;
    let plain: Vec<String> = keys.iter().map(|k| k.key.expose_secret().to_owned()).collect();
    let lines = run_workers("costs", &db, &[("APIKEYS_WORKER_KEYS", plain.join(","))]).await;
    let (mut first, mut second, mut third, mut fourth, mut fifth) = (0, 0, 0, 0, 0);
    for line in &lines {
        let n: Vec<u64> = line.split(' ').map(|n| n.parse().unwrap()).collect();
        (first, second, third) = (first + n[0], second + n[1], third + n[2]);
        (fourth, fifth) = (fourth + n[3], fifth + n[4]);
    }
    let left = client.get_key(keys[0].record.id).await.unwrap().credits.unwrap().remaining;
    println!(
        "costs across processes: {first} checks of 30 on credits ({left} left), {second} of 100, \
         {third} of 100 on named limits"
    );
    assert_eq!(first * u64::from(COST) + left, 90, "every credit spent once or given back");
    let shared = client.get_owner(org.id, "team").await.unwrap().credits.unwrap().remaining;
    println!(
        "owner plan across processes: {fourth} + {fifth} checks of the owner's 40 on credits \
         ({shared} left), the second key at most 20 of its own"
    );
    assert!(fifth <= 20, "never past the key's own limit: {fifth}");
    let team_checks = fourth + fifth;
    assert_eq!(
        team_checks * u64::from(COST) + shared,
        120,
        "every shared credit spent once or given back"
    );
    let credits = Some(apikeys_db::Credits::new(10_000));
    let update = apikeys_db::KeyUpdate::new().with_credits(credits);
    client.update_key(keys[0].record.id, update).await.unwrap();
    assert_eq!(check_until_refused(&client, &plain[0]).await, 333 - first, "units given back");
    assert_eq!(check_until_refused(&client, &plain[1]).await, 100 - second, "never past a limit");
    assert_eq!(check_until_refused(&client, &plain[2]).await, 100 - third, "never past `b`");
    let only_a = apikeys_db::KeyUpdate::new().with_rate_limits(named(false).unwrap());
    client.update_key(keys[2].record.id, only_a).await.unwrap();
    assert_eq!(check_until_refused(&client, &plain[2]).await, 100, "`a` took nothing refused");
    // With credits to spare, the owner's keys pass exactly the rest of the shared limit.
    client.add_owner_credits(org.id, "team", 10_000).await.unwrap();
    let rest = check_until_refused(&client, &plain[3]).await;
    assert_eq!(rest, 150 - team_checks, "never past the owner's limit, refused checks gave back");
}

async fn costs_worker() {
    let (keys, client) = leased_skewed_worker().await;
    let tasks: Vec<_> = (0..RATE_TASKS)
        .map(|t| {
            let (client, keys) = (client.clone(), keys.clone());
            tokio::spawn(async move {
                let first = check_until_refused(&client, &keys[0]).await;
                let second = check_until_refused(&client, &keys[1]).await;
                let third = check_until_refused(&client, &keys[2]).await;
                // Half the tasks start on each of the owner's keys.
                let (fourth, fifth) = if t % 2 == 0 {
                    let fourth = check_until_refused(&client, &keys[3]).await;
                    (fourth, check_until_refused(&client, &keys[4]).await)
                } else {
                    let fifth = check_until_refused(&client, &keys[4]).await;
                    (check_until_refused(&client, &keys[3]).await, fifth)
                };
                format!("{first} {second} {third} {fourth} {fifth}")
            })
        })
        .collect();
    report_after_shutdown(client, tasks).await;
}

async fn races_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for i in 0..RACE_KEYS {
        let nk =
            NewKey::new(format!("k{i}")).with_rate_limit(RateLimit::per_hour(100_000).unwrap());
        keys.push(client.create_key(org.id, nk).await.unwrap().key.expose_secret().to_owned());
    }
    let lines = run_workers("races", &db, &[("APIKEYS_WORKER_KEYS", keys.join(","))]).await;
    let mut tally = apikeys_testing::Tally::default();
    for line in &lines {
        let (counts, wrong) = line.split_once(" wrong=").unwrap();
        assert_eq!(wrong, "[]", "an undocumented outcome: {line}");
        let n: Vec<usize> =
            counts.split(' ').map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
        tally.merge(apikeys_testing::Tally {
            ok: n[0],
            invalid_key: n[1],
            revoked: n[2],
            other: vec![],
        });
    }
    println!("races across processes: {tally:?}");
    assert!(tally.ok > 0 && tally.invalid_key > 0, "{tally:?}");
    assert_eq!(db.count(&client, "api_keys").await, 0);
    assert_eq!(db.count(&client, "rate_limit_windows").await, 0);
}

/// Hot-path tasks on every key, and the admin side on this worker's quarter of them.
async fn races_worker() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let keys: Arc<Vec<String>> = Arc::new(
        std::env::var("APIKEYS_WORKER_KEYS").unwrap().split(',').map(str::to_owned).collect(),
    );
    let client = worker_client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let index = worker_index();
    let hot: Vec<_> = (0..RACE_TASKS)
        .map(|t| {
            let (client, keys, stop) = (client.clone(), Arc::clone(&keys), Arc::clone(&stop));
            tokio::spawn(apikeys_testing::hot_path_until(client, keys, stop, index * 13 + t * 5))
        })
        .collect();
    let mut mine = Vec::new();
    for k in keys.iter().skip(index).step_by(PROCESSES) {
        let untracked = apikeys_db::VerifyOptions::new().track_usage(false);
        mine.push(client.verify_key(k, &untracked).await.unwrap().id);
    }
    let mut wrong = apikeys_testing::admin_races(&client, &mine).await;
    // Let the other workers finish their deletions while this one keeps checking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut tally = apikeys_testing::Tally::default();
    for h in hot {
        tally.merge(h.await.unwrap());
    }
    wrong.append(&mut tally.other);
    println!(
        "result ok={} invalid={} revoked={} wrong={wrong:?}",
        tally.ok, tally.invalid_key, tally.revoked
    );
}

async fn second_windows_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_second(PER_SECOND).unwrap();
    let issued =
        client.create_key(org.id, NewKey::new("per-second").with_rate_limit(limit)).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    let before = apikeys_testing::db_now_ms(&client).await;
    let lines = run_workers("rate_limit_seconds", &db, &[("APIKEYS_WORKER_KEY", key)]).await;
    let after = apikeys_testing::db_now_ms(&client).await;
    let admitted: i64 = lines.iter().map(|l| l.parse::<i64>().unwrap()).sum();
    let rows = apikeys_testing::window_rows(&client).await;
    let spanned = after / 1000 - before / 1000 + 1;
    println!(
        "second windows across skewed processes: {admitted} admitted in {} windows: {rows:?}",
        rows.len()
    );
    assert!(rows.len() >= 2, "the run crossed a second boundary: {rows:?}");
    assert!(admitted <= i64::from(PER_SECOND) * spanned);
    assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), admitted);
    for (start, count) in &rows {
        assert!(*count <= i64::from(PER_SECOND), "{rows:?}");
        assert!(
            *start % 1000 == 0 && *start >= before - before % 1000 && *start <= after,
            "{rows:?}"
        );
    }
}

async fn rate_limit_seconds_worker() {
    let key = std::env::var("APIKEYS_WORKER_KEY").unwrap();
    let skew = chrono::TimeDelta::milliseconds(SECOND_SKEWS_MS[worker_index()]);
    let client = worker_client_with(|b| b.clock(move || chrono::Utc::now() + skew)).await;
    run_tasks(client, 4, move |client| {
        let key = key.clone();
        async move {
            let until = std::time::Instant::now() + Duration::from_millis(1_500);
            let mut ok = 0;
            while std::time::Instant::now() < until {
                match client.validate_key(&key, &apikeys_db::ValidateOptions::new()).await {
                    Ok(_) => ok += 1,
                    Err(apikeys_db::Error::Quota { retry_after, .. }) => {
                        assert!(
                            retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1)
                        );
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            ok.to_string()
        }
    })
    .await;
}
