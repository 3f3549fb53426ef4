//! Several OS processes share one database: the shared rate limit must admit exactly its limit.
//!
//! This binary is its own worker: run without `APIKEYS_WORKER`, it prepares a database per
//! backend and spawns `PROCESSES` copies of itself with `APIKEYS_WORKER=rate_limit`; each copy
//! runs `TASKS` tasks hammering one key and prints what it saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

#[path = "suite/common/mod.rs"]
#[allow(dead_code, unused_imports, unused_macros)]
mod common;

use std::process::Command;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, NewKey, RateLimit};
use common::{Backend, SECRET, TestDb};

const PROCESSES: usize = 4;
const TASKS: usize = 8;
const ATTEMPTS: usize = 6;
const LIMIT: u32 = 100;

#[tokio::main]
async fn main() {
    if std::env::var("APIKEYS_WORKER").as_deref() == Ok("rate_limit") {
        worker().await;
        return;
    }
    let (mut passed, mut failed) = (0, 0);
    for backend in [Backend::Sqlite, Backend::Postgres, Backend::MySql] {
        let Some(db) = TestDb::new(backend, "multiprocess").await else { continue };
        let result = tokio::spawn(rate_limit_across_processes(db.clone())).await;
        db.cleanup().await;
        match result {
            Ok(()) => {
                println!("test {backend:?}::rate_limit_across_processes ... ok");
                passed += 1;
            }
            Err(e) => {
                println!("test {backend:?}::rate_limit_across_processes ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}

async fn rate_limit_across_processes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client
        .create_key(
            org.id,
            NewKey::new("hammered").with_rate_limit(RateLimit::per_hour(LIMIT).unwrap()),
        )
        .await
        .unwrap();
    // All workers start at the same instant, after they had time to connect.
    let start_at = chrono::Utc::now().timestamp_millis() + 2_000;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .env("APIKEYS_WORKER", "rate_limit")
                .env("APIKEYS_WORKER_URL", &db.url)
                .env("APIKEYS_WORKER_KEY", issued.key.expose_secret())
                .env("APIKEYS_WORKER_START", start_at.to_string())
                .output_async()
        })
        .collect();
    let (mut admitted, mut limited) = (0usize, 0usize);
    for child in children {
        let out = child.await.unwrap();
        assert!(out.status.success(), "worker failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.starts_with("admitted=")).expect("worker result");
        let nums: Vec<usize> =
            line.split(' ').map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
        admitted += nums[0];
        limited += nums[1];
    }
    assert_eq!(admitted, LIMIT as usize, "exactly the limit is admitted across processes");
    assert_eq!(admitted + limited, PROCESSES * TASKS * ATTEMPTS);
}

/// `Command::output` on a blocking thread, so the children run concurrently.
trait OutputAsync {
    fn output_async(self) -> tokio::task::JoinHandle<std::process::Output>;
}

impl OutputAsync for &mut Command {
    fn output_async(self) -> tokio::task::JoinHandle<std::process::Output> {
        let mut cmd = std::mem::replace(self, Command::new("true"));
        tokio::task::spawn_blocking(move || cmd.output().expect("spawn worker"))
    }
}

async fn worker() {
    let url = std::env::var("APIKEYS_WORKER_URL").unwrap();
    let key = std::env::var("APIKEYS_WORKER_KEY").unwrap();
    let start: i64 = std::env::var("APIKEYS_WORKER_START").unwrap().parse().unwrap();
    let client =
        ApiKeyClient::builder().database_url(url).signing_secret(SECRET).build().await.unwrap();
    let wait = start - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, key) = (client.clone(), key.clone());
            tokio::spawn(async move {
                common::hammer(&client, &key, ATTEMPTS, Duration::from_secs(3600)).await
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    println!("admitted={ok} limited={limited}");
}
