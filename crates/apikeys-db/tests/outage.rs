//! The database stops mid-run and comes back: calls fail with `Error::Unavailable` (no hang,
//! no panic, nothing half-written); after a client's first failure, every later call fails
//! at once (far below the 5 s acquire timeout) instead of waiting for it; and the same client
//! works again within one reconnect interval of the server being back, without a restart.
//!
//! Needs a PostgreSQL and a MariaDB server of its own that it may stop:
//! `APIKEYS_OUTAGE_POSTGRES_URL` / `APIKEYS_OUTAGE_MYSQL_URL`, and a command for each
//! (`APIKEYS_OUTAGE_POSTGRES_CTL` / `APIKEYS_OUTAGE_MYSQL_CTL`) in which `{}` is replaced by
//! `stop` or `start`. `scripts/test-all` starts such servers and sets all four.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Servers only: with neither server feature there is no test here.
#![cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code, unused_imports))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, NewKey, Page, RateLimit, StatusFilter, ValidateOptions};

/// The client's connect and acquire timeouts in this test (the defaults).
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most a client's first failing call may take: both timeouts, plus slack for a loaded
/// machine. A hang guard, not a performance figure.
const BOUND: Duration = Duration::from_secs(5 * 2 + 6);
/// The most any later call may take while the database is down: an order of magnitude
/// below the acquire timeout.
const FAST: Duration = Duration::from_secs(1);
/// How often the client tries the database again (the default).
const RECONNECT: Duration = Duration::from_secs(1);
const LOAD_TASKS: usize = 8;

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage() {
    outage("POSTGRES").await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_outage() {
    outage("MYSQL").await;
}

/// A client of the outage server with the test's short timeouts.
fn builder(url: &str) -> apikeys_db::ClientBuilder {
    ApiKeyClient::builder()
        .database_url(url)
        .signing_secret(apikeys_testing::SECRET)
        .connect_timeout(TIMEOUT)
        .acquire_timeout(TIMEOUT)
        .reconnect_interval(RECONNECT)
}

/// `call` must finish within `BOUND` with `Error::Unavailable`; returns how long it took.
async fn unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<T, Error>>,
) -> Duration {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(BOUND, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after {BOUND:?} with the database down"));
    match result {
        Err(e @ Error::Unavailable { .. }) => assert!(e.is_retryable()),
        other => panic!("{what}: expected Error::Unavailable, got {other:?}"),
    }
    started.elapsed()
}

async fn outage(kind: &str) {
    let (Ok(url), Ok(command)) = (
        std::env::var(format!("APIKEYS_OUTAGE_{kind}_URL")),
        std::env::var(format!("APIKEYS_OUTAGE_{kind}_CTL")),
    ) else {
        // Skipping needs saying so: this test stops servers, so it runs only where
        // scripts/test-all started ones for it.
        assert!(
            std::env::var("APIKEYS_SKIP_OUTAGE").as_deref() == Ok("1"),
            "APIKEYS_OUTAGE_{kind}_URL/_CTL are unset: run scripts/test-all, or set \
             APIKEYS_SKIP_OUTAGE=1 to skip the outage test"
        );
        return;
    };
    let client = builder(&url).build().await.unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client
        .create_key(
            org.id,
            NewKey::new("k").with_rate_limit(RateLimit::per_hour(1_000_000).unwrap()),
        )
        .await
        .unwrap();
    let key = issued.key.expose_secret().to_owned();
    // Batched usage tracking: two uses in memory when the database goes away.
    let batched =
        builder(&url).usage_flush_interval(Duration::from_secs(3600)).build().await.unwrap();
    let counted = client.create_key(org.id, NewKey::new("batched")).await.unwrap();
    for _ in 0..2 {
        batched.verify_key(counted.key.expose_secret(), &Default::default()).await.unwrap();
    }
    let keys_before =
        client.list_org_keys(org.id, StatusFilter::All, Page::default()).await.unwrap();

    // Load: tasks validating (shared rate limit and usage tracking: reads and writes) all the
    // way through the outage. They may only ever see success or Unavailable, and each must
    // succeed again after the restart.
    let back = Arc::new(AtomicBool::new(false));
    let outage_errors = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..LOAD_TASKS)
        .map(|_| {
            let (client, key, back, errors) =
                (client.clone(), key.clone(), back.clone(), outage_errors.clone());
            tokio::spawn(async move {
                loop {
                    let result = tokio::time::timeout(
                        BOUND,
                        client.validate_key(&key, &ValidateOptions::new()),
                    )
                    .await
                    .expect("a call hung during the outage");
                    match result {
                        Ok(_) if back.load(Ordering::SeqCst) => return,
                        Ok(_) => {}
                        Err(Error::Unavailable { .. }) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("unexpected error during the outage: {e:?}"),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await; // the load is running

    apikeys_testing::server_ctl(&command, "stop").await;
    let verify = apikeys_db::VerifyOptions::new();
    // Each client's first failure may wait for the timeouts; every later call must not.
    let first = [
        unavailable("verify_key (first)", client.verify_key(&key, &verify)).await,
        unavailable("flush_usage (first)", batched.flush_usage()).await,
        // A client built while the database is down fails the same way.
        unavailable("build", builder(&url).build()).await,
    ];
    let waits = [
        unavailable("verify_key", client.verify_key(&key, &verify)).await,
        unavailable("validate_key", client.validate_key(&key, &ValidateOptions::new())).await,
        unavailable("create_key", client.create_key(org.id, NewKey::new("during outage"))).await,
        unavailable("get_or_create_organization", client.get_or_create_organization("globex"))
            .await,
        unavailable(
            "list_org_keys",
            client.list_org_keys(org.id, StatusFilter::All, Page::default()),
        )
        .await,
        unavailable("revoke_key", client.revoke_key(issued.record.id)).await,
        unavailable("create_tables", client.create_tables()).await,
        unavailable("flush_usage", batched.flush_usage()).await,
    ];
    let slowest = waits.iter().max().copied().unwrap_or_default();
    assert!(slowest < FAST, "{kind}: a call after the first failure took {slowest:?}: {waits:?}");

    apikeys_testing::server_ctl(&command, "start").await;
    let started = std::time::Instant::now();
    // The same client, no restart: calls succeed again once its probe has reached the
    // server, within one reconnect interval (plus slack for a loaded machine).
    let recovered = loop {
        match client.verify_key(&key, &verify).await {
            Ok(_) => break started.elapsed(),
            Err(Error::Unavailable { .. }) if started.elapsed() < RECONNECT * 5 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("{kind}: not recovered after {:?}: {other:?}", started.elapsed()),
        }
    };
    back.store(true, Ordering::SeqCst);
    // Reported for the record.
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "{kind}: first failures after {first:?}; later calls failed after {waits:?} \
             (slowest {slowest:?}); recovered {recovered:?} after the restart"
        );
    }
    let (again, created) = client.get_or_create_organization("acme").await.unwrap();
    assert_eq!((again.id, created), (org.id, false));
    for task in load {
        tokio::time::timeout(BOUND * 3, task).await.expect("load task finished").unwrap();
    }
    assert!(outage_errors.load(Ordering::Relaxed) > 0, "the load saw the outage");
    // Nothing the failed calls attempted was half-written.
    let keys_after =
        client.list_org_keys(org.id, StatusFilter::All, Page::default()).await.unwrap();
    assert_eq!(keys_after.items.len(), keys_before.items.len());
    assert!(keys_after.items.iter().all(|k| k.revoked_at.is_none()));
    assert!(client.find_organization("globex").await.unwrap().is_none());
    client.create_key(org.id, NewKey::new("after outage")).await.unwrap();
    // The failed flush kept its counts; the next one writes them (once that client, too,
    // has reached the server again).
    let started = std::time::Instant::now();
    let flushed = loop {
        match batched.flush_usage().await {
            Err(Error::Unavailable { .. }) if started.elapsed() < RECONNECT * 5 => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(flushed, 1);
    assert_eq!(client.get_key(counted.record.id).await.unwrap().use_count, 2);
}
