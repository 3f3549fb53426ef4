//! Redis restarts under load while shared rate limits are counted in it: checks fail with
//! `Error::Unavailable` (none admitted, none a `Storage` error, none hangs); once Redis is
//! back, the same client answers again by itself; and across the restart the window never
//! admits more than its limit, in shared and in leased mode.
//!
//! Needs a Redis of its own that it may stop, persisting its data (append-only file), so that
//! a restart keeps the windows' counts: `APIKEYS_OUTAGE_REDIS_URL`, and a command
//! (`APIKEYS_OUTAGE_REDIS_CTL`) in which `{}` is replaced by `stop` or `start`.
//! `scripts/test-all` starts such a Redis and sets both. (A Redis without persistence loses
//! the counts on a restart: the guide, "Many replicas", "What Redis can lose".)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]
// Redis counts; the keys live in a SQLite file.
#![cfg(all(feature = "redis", feature = "sqlite"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apikeys_db::{ApiKeyClient, Error, NewKey, RateLimit, RateLimitMode, ValidateOptions};
use apikeys_testing::{Backend, TestDb};

/// How often the client probes Redis while it is out of reach.
const RECONNECT: Duration = Duration::from_millis(200);
const TASKS: usize = 8;
const LIMIT: u32 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_under_load() {
    let (Ok(url), Ok(command)) =
        (std::env::var("APIKEYS_OUTAGE_REDIS_URL"), std::env::var("APIKEYS_OUTAGE_REDIS_CTL"))
    else {
        assert!(
            std::env::var("APIKEYS_SKIP_OUTAGE").as_deref() == Ok("1"),
            "APIKEYS_OUTAGE_REDIS_URL/_CTL are unset: run scripts/test-all, or set \
             APIKEYS_SKIP_OUTAGE=1 to skip the outage tests"
        );
        return;
    };
    for mode in [RateLimitMode::Shared, RateLimitMode::Leased] {
        restart(&url, &command, mode).await;
    }
    a_redis_that_may_evict_is_refused(&url).await;
}

/// A Redis whose `maxmemory-policy` may evict keys is refused at build: an evicted window
/// would start again at 0. (Here, on the test's own Redis, as the policy is server-wide.)
async fn a_redis_that_may_evict_is_refused(url: &str) {
    let redis = redis::Client::open(url).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let set = |policy: &'static str| {
        redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg(policy).clone()
    };
    let db = TestDb::new(Backend::Sqlite, "redis_evict").await;
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let _: () = set(policy).query_async(&mut conn).await.unwrap();
        let built = ApiKeyClient::builder()
            .database_url(&db.url)
            .signing_secret(apikeys_testing::SECRET)
            .redis(url)
            .build()
            .await;
        let _: () = set("noeviction").query_async(&mut conn).await.unwrap();
        match built {
            Err(Error::Configuration { reason }) => {
                assert!(reason.contains("noeviction"), "{reason}")
            }
            other => panic!("{policy}: {other:?}"),
        }
    }
    db.cleanup().await;
}

/// What the load saw, by phase: 0 until the stop command returned (Redis shutting down
/// included), 1 while Redis was down, 2 from its start command on (a check spanning two
/// phases counts in the last).
#[derive(Default)]
struct Seen {
    admitted: [AtomicU64; 3],
    refused: AtomicU64,
    unavailable: [AtomicU64; 3],
}

async fn restart(url: &str, command: &str, mode: RateLimitMode) {
    let db = TestDb::new(Backend::Sqlite, "redis_restart").await;
    let client = ApiKeyClient::builder()
        .database_url(&db.url)
        .signing_secret(apikeys_testing::SECRET)
        .rate_limit_mode(mode)
        .redis(url)
        .statement_timeout(Duration::from_secs(1))
        .reconnect_interval(RECONNECT)
        .build()
        .await
        .unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("restart").with_rate_limit(RateLimit::per_hour(LIMIT).unwrap());
    let key = client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned();
    apikeys_testing::leave_room(&client, apikeys_db::Window::Hour, Duration::from_secs(120)).await;
    let seen = Arc::new(Seen::default());
    let phase = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (client, key, seen, phase, stop) =
            (client.clone(), key.clone(), Arc::clone(&seen), Arc::clone(&phase), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                // The phase the whole check fell in: read before and after.
                let before = phase.load(Ordering::Acquire);
                let options = ValidateOptions::new();
                let call = client.validate_key(&key, &options);
                let outcome = tokio::time::timeout(Duration::from_secs(30), call)
                    .await
                    .unwrap_or_else(|_| panic!("{mode:?}: a check hung with Redis restarting"));
                let after = phase.load(Ordering::Acquire);
                let at = usize::try_from(if before == after { before } else { 2 }).unwrap();
                match outcome {
                    Ok(_) => {
                        seen.admitted[at].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::Quota { .. }) => {
                        seen.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::Unavailable { .. }) => {
                        seen.unavailable[at].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("{mode:?}: {e:?}"),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Under load, then stopped: checks run into the stopped server (phase 1 starts once the
    // stop command has finished: no check that began after it may be admitted from Redis).
    tokio::time::sleep(Duration::from_millis(500)).await;
    apikeys_testing::server_ctl(command, "stop").await;
    phase.store(1, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase.store(2, Ordering::Release);
    apikeys_testing::server_ctl(command, "start").await;
    let back = Instant::now();
    // Answered again, by the same client, without a restart.
    let mut recovered = None;
    for _ in 0..600 {
        if seen.admitted[2].load(Ordering::Acquire) > 0 {
            recovered = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered =
        recovered.unwrap_or_else(|| panic!("{mode:?}: no check admitted after Redis came back"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await.unwrap();
    }
    let load = |a: &[AtomicU64; 3]| a.each_ref().map(|n| n.load(Ordering::Acquire));
    let (admitted, unavailable) = (load(&seen.admitted), load(&seen.unavailable));
    println!(
        "{mode:?}: admitted {admitted:?}, unavailable {unavailable:?} (before / down / after), \
         refused {}, first admitted {recovered:?} after the start command returned",
        seen.refused.load(Ordering::Acquire)
    );
    assert!(admitted[0] > 0, "{mode:?}: the load ran before the stop");
    assert!(unavailable[1] > 0, "{mode:?}: the load ran into the stopped Redis");
    // Leased mode may admit from units it reserved before the stop (they were counted in
    // Redis then); shared mode has nothing to admit from while Redis is down.
    if mode == RateLimitMode::Shared {
        assert_eq!(admitted[1], 0, "{mode:?}: admitted while Redis was down");
    }
    // The counts survived the restart (append-only file): what is left of the window is the
    // limit minus everything admitted, once this client gives back what it holds, less only
    // what Redis counted in the calls whose answers the stop cut off (one unit per task in
    // shared mode; one block in leased mode, a key having one reservation in flight per
    // process): a restart never hands out more.
    client.shutdown().await.unwrap();
    let total: u64 = admitted.iter().sum();
    let fresh = ApiKeyClient::builder()
        .database_url(&db.url)
        .signing_secret(apikeys_testing::SECRET)
        .redis(url)
        .build()
        .await
        .unwrap();
    let mut rest = 0;
    while fresh.validate_key(&key, &ValidateOptions::new()).await.is_ok() {
        rest += 1;
    }
    let in_doubt = if mode == RateLimitMode::Shared { TASKS as u64 } else { u64::from(LIMIT / 16) };
    println!("{mode:?}: {total} admitted, {rest} left after the give-back, of {LIMIT}");
    assert!(total + rest <= u64::from(LIMIT), "{mode:?}: {total} + {rest} of {LIMIT}");
    assert!(
        total + rest >= u64::from(LIMIT) - in_doubt,
        "{mode:?}: {total} + {rest} of {LIMIT}: more lost than the calls in doubt"
    );
    db.cleanup().await;
}
