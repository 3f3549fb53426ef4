//! How long a revocation made on one replica takes to be refused on another (issue 25,
//! item 3): by the change feed's polls alone, and with invalidation through Redis.
//!
//! ```sh
//! scripts/test-all --exec cargo bench -p apikeys-db --features postgres,mysql,redis --bench propagation
//! ```
//!
//! Per backend compiled in (SQLite as a file; PostgreSQL and MariaDB in a database of their
//! own on the servers of `APIKEYS_TEST_POSTGRES_URL` / `APIKEYS_TEST_MYSQL_URL`) and per mode,
//! two clients on one database, as two replicas: A with no cache, B with the verified-key
//! cache (`max_staleness` 1 s, so it polls every 250 ms); in the Redis mode both with
//! `invalidation_through_redis` (Redis at `APIKEYS_TEST_REDIS_URL`, a channel of the run's
//! own). For each of `--keys` keys (200): B caches the key, then, at a random moment
//! relative to B's polls, A revokes it; the delay is from the moment `revoke_key` returned
//! to the first check on B that refuses the key (B checks it from the cache in a loop,
//! yielding between checks). Reported: p50, p90, p99 and the largest delay.
//!
//! **Fails** when a revoked key is still accepted 10 s after its revocation.
//! Under `cargo test` (no `--bench` argument) it runs 5 keys: only that it works.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::cast_precision_loss,
    missing_docs
)]

use std::time::{Duration, Instant};

use apikeys_db::{ApiKeyClient, ClientBuilder, Error, KeyCache, NewKey, VerifyOptions};
use apikeys_testing::{Backend, TestDb};
use rand::{RngExt, SeedableRng};

/// One mode's delays, sorted.
fn report(backend: Backend, mode: &str, mut delays: Vec<Duration>) -> String {
    delays.sort();
    let at = |q: f64| {
        let i = ((delays.len() as f64 - 1.0) * q).round() as usize;
        delays[i].as_secs_f64() * 1e3
    };
    let line = format!(
        "{backend:?} {mode}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} revocations)",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        delays.len()
    );
    println!("{line}");
    line
}

/// The delay of each of `keys` revocations made through `a` until `b` refuses the key.
async fn delays(a: &ApiKeyClient, b: &ApiKeyClient, keys: usize, seed: u64) -> Vec<Duration> {
    let (org, _) = a.get_or_create_organization("propagation").await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(keys);
    for i in 0..keys {
        let issued = a.create_key(org.id, NewKey::new(format!("k{i}"))).await.unwrap();
        let key = issued.key.expose_secret();
        b.verify_key(key, &VerifyOptions::new()).await.unwrap();
        // Somewhere in B's poll interval.
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..250_000))).await;
        a.revoke_key(issued.record.id).await.unwrap();
        let revoked = Instant::now();
        loop {
            match b.verify_key(key, &VerifyOptions::new()).await {
                Ok(_) => {
                    assert!(
                        revoked.elapsed() < Duration::from_secs(10),
                        "key {i} still accepted 10 s after its revocation"
                    );
                    tokio::task::yield_now().await;
                }
                Err(Error::Revoked { .. }) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        out.push(revoked.elapsed());
    }
    out
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let keys = if bench { 200 } else { 5 };
    let redis = std::env::var("APIKEYS_TEST_REDIS_URL")
        .expect("APIKEYS_TEST_REDIS_URL: the Redis of invalidation_through_redis");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let backends = apikeys_testing::compiled_backends!();
    let mut lines = Vec::new();
    runtime.block_on(async {
        for backend in backends {
            let db = TestDb::new(backend, "propagation").await;
            db.client().await;
            let channel = format!("apikeys:bench:{}", uuid::Uuid::new_v4().simple());
            let cache = || KeyCache::new().max_staleness(Duration::from_secs(1));
            let notices = |b: ClientBuilder| {
                b.invalidation_through_redis(&redis).change_notice_channel(&channel)
            };
            let plain = |b: ClientBuilder| b;
            for (mode, with) in [
                ("feed polls only", &plain as &dyn Fn(ClientBuilder) -> ClientBuilder),
                ("with invalidation through Redis", &notices),
            ] {
                let a = with(db.builder()).build().await.unwrap();
                let b = with(db.builder()).cache(cache()).build().await.unwrap();
                let d = delays(&a, &b, keys, 7).await;
                lines.push(report(backend, mode, d));
                a.shutdown().await.unwrap();
                b.shutdown().await.unwrap();
            }
            db.cleanup().await;
        }
    });
    println!("\npropagation of a revocation to another replica (max_staleness 1 s):");
    for line in lines {
        println!("  {line}");
    }
}
