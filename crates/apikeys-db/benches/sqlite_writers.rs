//! Tracked `validate_key` on a SQLite file with 1, 8 and 64 concurrent tasks, without and with
//! a shared per-key rate limit (no cache): throughput and the latency distribution (p50, p99,
//! max) of each call, all measured in one run.
//!
//! `cargo bench -p apikeys-db --bench sqlite_writers` (add `-- --quick` for a short run).
//! What it checks is relative: with more tasks, throughput must not fall below the
//! one-task figure and p99 should stay within 10x p50 (see BENCHMARKS.md). It prints
//! figures; it asserts nothing, since timings belong in benchmarks, not tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeys_db::{ApiKeyClient, NewKey, RateLimit, ValidateOptions};

const SECRET: &str = "bench-signing-secret-0123456789-abcdefghijkl";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(
    what: &str,
    client: &ApiKeyClient,
    keys: &Arc<Vec<String>>,
    tasks: usize,
    calls: usize,
) {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (client, keys) = (client.clone(), Arc::clone(keys));
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(calls);
            for i in 0..calls {
                let key = &keys[(t * 7 + i) % keys.len()];
                let t0 = Instant::now();
                client.validate_key(key, &ValidateOptions::new()).await.unwrap();
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let wall = start.elapsed();
    all.sort();
    println!(
        "sqlite {what}, {tasks:>2} tasks: {:>6.0} calls/s  p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  (p99/p50 {:.1})",
        all.len() as f64 / wall.as_secs_f64(),
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all[all.len() - 1].as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() / percentile(&all, 0.50).as_secs_f64(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total = if quick { 256 } else { 8_192 };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let client =
        ApiKeyClient::builder().database_url(&url).signing_secret(SECRET).build().await.unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("bench").await.unwrap();
    let mut keys = Vec::new();
    let mut limited = Vec::new();
    for i in 0..64 {
        let issued = client.create_key(org.id, NewKey::new(format!("k{i}"))).await.unwrap();
        keys.push(issued.key.expose_secret().to_owned());
        // A shared per-key limit never reached: one conditional upsert per check besides.
        let new =
            NewKey::new(format!("l{i}")).with_rate_limit(RateLimit::per_hour(1 << 30).unwrap());
        limited.push(client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned());
    }
    let (keys, limited) = (Arc::new(keys), Arc::new(limited));
    run("tracked validate", &client, &keys, 1, total / 8).await; // warm-up
    for tasks in [1, 8, 64] {
        run("tracked validate", &client, &keys, tasks, total / tasks).await;
    }
    for tasks in [1, 8, 64] {
        run("tracked validate, shared limit", &client, &limited, tasks, total / tasks).await;
    }
}
