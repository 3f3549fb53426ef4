//! Memory per cached key: the bytes a caching client keeps (allocated minus freed, counted by
//! an instrumented allocator) while it caches every key of a SQLite database, over the number
//! of keys; then the same with `max_keys` at half the keys, to show the bound holds.
//!
//! `cargo bench -p apikeys-db --bench cache_memory` (10 000 keys; `APIKEYS_BENCH_QUICK=1` or
//! `cargo test`: 500).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::cast_precision_loss,
    missing_docs
)]

// The shared test support (a fresh database per backend, dropped afterwards).
use apikeys_testing as common;

use std::alloc::System;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, KeyCache, NewKey, VerifyOptions};
use common::{Backend, TestDb};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn quick() -> bool {
    std::env::var("APIKEYS_BENCH_QUICK").as_deref() == Ok("1")
        || !std::env::args().any(|a| a == "--bench")
}

/// Caches every key through a fresh client with `max_keys`; returns (bytes kept, keys held).
async fn cache_all(db: &TestDb, keys: &[String], max_keys: usize) -> (i64, u64) {
    let client = db.client_with(|b| b.cache(KeyCache::new().max_keys(max_keys))).await;
    while client.cache_stats().unwrap().feed_position.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let untracked = VerifyOptions::new().track_usage(false);
    // One check first, so that one-time allocations (statement cache, buffers) are not
    // counted against the keys.
    client.verify_key(&keys[0], &untracked).await.unwrap();
    let region = Region::new(GLOBAL);
    for key in &keys[1..] {
        client.verify_key(key, &untracked).await.unwrap();
    }
    let change = region.change();
    let kept = change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64;
    let held = client.cache_stats().unwrap().keys;
    drop(client);
    (kept, held)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let n = if quick() { 500 } else { 10_000 };
        let db = TestDb::new(Backend::Sqlite, "cache_memory").await;
        let admin: ApiKeyClient = db.client().await;
        let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
        let (mut rich, mut plain) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let new = NewKey::new(format!("customer key {i}"))
                .with_scopes(["read", "write"])
                .with_custom(serde_json::json!({ "plan": "pro" }));
            rich.push(admin.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned());
            let new = NewKey::new(format!("key {i}"));
            plain.push(admin.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned());
        }
        for (what, keys) in [
            ("named \"customer key N\", scopes read + write, custom {\"plan\": \"pro\"}", &rich),
            ("named \"key N\", no scopes, no custom metadata", &plain),
        ] {
            let (kept, held) = cache_all(&db, keys, n).await;
            let per_key = kept as f64 / held.saturating_sub(1).max(1) as f64;
            println!("cache memory: {per_key:.0} bytes per key ({held} of {n} held; keys {what})");
        }
        let (kept_half, held_half) = cache_all(&db, &rich, n / 2).await;
        println!(
            "cache memory: max_keys {}: {held_half} held, {:.1} MiB kept after checking {n} keys",
            n / 2,
            kept_half as f64 / f64::from(1 << 20)
        );
        assert!(held_half <= (n / 2) as u64, "max_keys bounds the cache: {held_half}");
        db.cleanup().await;
    });
}
