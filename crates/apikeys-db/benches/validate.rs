//! The hot path: `verify_key` against `validate_key` with a shared and a local rate limit.
//!
//! `cargo bench -p apikeys-db --bench validate` (SQLite file, WAL); set `DATABASE_URL` for
//! PostgreSQL or MySQL. After criterion's report it prints the ratios measured in this run,
//! interleaved so that machine noise hits every variant alike.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::time::{Duration, Instant};

use apikeys_db::{ApiKeyClient, NewKey, RateLimit, RateLimitMode, ValidateOptions, VerifyOptions};
use criterion::Criterion;

struct Setup {
    shared: ApiKeyClient,
    local: ApiKeyClient,
    key: String,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let build = |mode| {
        ApiKeyClient::builder()
            .database_url(url.clone())
            .signing_secret("benchmark-signing-secret-0123456789-abcdef")
            .rate_limit_mode(mode)
            .build()
    };
    let shared = build(RateLimitMode::Shared).await.unwrap();
    shared.create_tables().await.unwrap();
    let local = build(RateLimitMode::Local).await.unwrap();
    let (org, _) = shared.get_or_create_organization("bench").await.unwrap();
    // A limit that is never reached, so every call does the full counting work.
    let limit = RateLimit::per_second(u32::MAX).unwrap();
    let key = shared
        .create_key(org.id, NewKey::new("bench").with_rate_limit(limit))
        .await
        .unwrap()
        .key
        .expose_secret()
        .to_owned();
    Setup { shared, local, key, _dir: dir }
}

fn no_track() -> ValidateOptions {
    ValidateOptions::new().track_usage(false)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(setup());
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("hot_path");
    g.bench_function("verify_key (tracking off)", |b| {
        b.to_async(&rt)
            .iter(|| s.shared.verify_key(&s.key, VerifyOptions::new().track_usage(false)))
    });
    g.bench_function("validate_key, local limit", |b| {
        b.to_async(&rt).iter(|| s.local.validate_key(&s.key, no_track()))
    });
    g.bench_function("validate_key, shared limit", |b| {
        b.to_async(&rt).iter(|| s.shared.validate_key(&s.key, no_track()))
    });
    g.finish();
    c.final_summary();

    // Ratios from one interleaved run (only when benchmarking, not under `cargo test`).
    if std::env::args().any(|a| a == "--bench") {
        let rounds = 20;
        let per_round = 200;
        let mut totals = [Duration::ZERO; 3];
        rt.block_on(async {
            for _ in 0..rounds {
                let t = Instant::now();
                for _ in 0..per_round {
                    s.shared
                        .verify_key(&s.key, VerifyOptions::new().track_usage(false))
                        .await
                        .unwrap();
                }
                totals[0] += t.elapsed();
                let t = Instant::now();
                for _ in 0..per_round {
                    s.local.validate_key(&s.key, no_track()).await.unwrap();
                }
                totals[1] += t.elapsed();
                let t = Instant::now();
                for _ in 0..per_round {
                    s.shared.validate_key(&s.key, no_track()).await.unwrap();
                }
                totals[2] += t.elapsed();
            }
        });
        let n = f64::from(rounds * per_round);
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
        println!("\nratios (same run, interleaved, {} calls each):", rounds * per_round);
        println!("  verify_key (tracking off)   {:8.1} µs  1.00×", us(totals[0]));
        println!(
            "  validate_key, local limit   {:8.1} µs  {:.2}× verify",
            us(totals[1]),
            us(totals[1]) / us(totals[0])
        );
        println!(
            "  validate_key, shared limit  {:8.1} µs  {:.2}× verify",
            us(totals[2]),
            us(totals[2]) / us(totals[0])
        );
    }
}
