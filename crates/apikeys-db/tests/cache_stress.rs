//! A stress test of the verified-key cache's one promise: a change committed at T is never
//! served after T + `max_staleness`, by any replica. Not a benchmark: bounded by a number of
//! operations, and it asserts no timing of its own.
//!
//! This binary is its own worker. The parent creates a set of keys per backend and starts
//! [`WORKERS`] copies of itself, each a replica with a small cache (so entries are evicted
//! all the time) and a client clock skewed its own way (one minutes behind, one minutes
//! ahead, one on time). Each replica runs [`TASKS`] tasks that each do [`OPS`] operations:
//! mostly validations of a random key, and now and then a change that makes a key refused
//! for good (revoke, delete, a zero-grace roll, its scope taken away), a harmless change (a
//! rename, which the feed carries too), or a purge of the feed (by the skewed clock, with the
//! shortest retention, so the clock ahead purges almost everything). Every replica logs when
//! each of its changes returned and when each of its checks started, by the host's wall clock,
//! which all processes share.
//!
//! Judged: every check that started more than the bound (plus a margin for the wall clock
//! against each process's monotonic one) after the first change that refused its key for good
//! returned, on any replica, must be refused. Reported: how many checks were judged, and the
//! worst delay between such a change and the last check that still passed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, KeyCache, KeyId, KeyUpdate, NewKey, ValidateOptions};
use apikeys_testing::{SECRET, TestDb};
use chrono::{TimeDelta, Utc};

/// The replicas' staleness bound.
const BOUND: Duration = Duration::from_millis(500);
/// Allowed between the host's wall clock and a process's monotonic clock.
const CLOCK_MARGIN_MS: i64 = 50;
/// Replica processes, and the skew of each one's client clock.
const WORKERS: usize = 3;
const SKEW_SECONDS: [i64; WORKERS] = [-150, 0, 150];
/// Tasks per replica, and operations per task.
const TASKS: usize = 4;
const OPS: usize = 1_500;
/// Keys in play, and the most a replica's cache holds.
const KEYS: usize = 96;
const MAX_KEYS: usize = 12;

#[tokio::main]
async fn main() {
    if std::env::var("APIKEYS_STRESS_WORKER").is_ok() {
        return worker().await;
    }
    let cases = [("cache_invariant_under_churn_and_changes", ())];
    apikeys_testing::run_cases(
        &apikeys_testing::compiled_backends!(),
        "cache_stress",
        &cases,
        |(), db| stress(db),
    )
    .await;
}

fn wall_ms() -> i64 {
    Utc::now().timestamp_millis()
}

async fn stress(db: TestDb) {
    let admin = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let new = NewKey::new(format!("k{i}")).with_scopes(["read"]);
        let issued = admin.create_key(org.id, new).await.unwrap();
        keys.push(format!("{} {}", issued.record.id, issued.key.expose_secret()));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys"), keys.join("\n")).unwrap();
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .env("APIKEYS_STRESS_WORKER", w.to_string())
                .env("APIKEYS_WORKER_URL", &db.url)
                .env("APIKEYS_WORKER_DIR", dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            tokio::task::spawn_blocking(move || child.wait_with_output())
        })
        .collect();
    // The first change that refuses each key for good, and every check, from every replica.
    let mut killed: HashMap<usize, (i64, String)> = HashMap::new();
    let mut checks: Vec<(usize, i64, bool)> = Vec::new();
    let (mut changes, mut purges, mut restarts) = (0, 0, 0);
    for child in children {
        let out = child.await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "a replica failed: {}\n{}",
            text.lines().filter(|l| !l.starts_with("check ")).collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields.as_slice() {
                ["check", key, started, ok] => {
                    checks.push((key.parse().unwrap(), started.parse().unwrap(), *ok == "1"));
                }
                ["kill", key, at, how] => {
                    let (key, at): (usize, i64) = (key.parse().unwrap(), at.parse().unwrap());
                    let first = killed.entry(key).or_insert((at, (*how).to_owned()));
                    if at < first.0 {
                        *first = (at, (*how).to_owned());
                    }
                    changes += 1;
                }
                ["rename", ..] => changes += 1,
                ["purge", _] => purges += 1,
                ["restarts", n] => restarts += n.parse::<u64>().unwrap(),
                _ => {}
            }
        }
    }
    let bound = i64::try_from(BOUND.as_millis()).unwrap() + CLOCK_MARGIN_MS;
    let (mut judged, mut worst) = (0_u64, i64::MIN);
    for (key, started, ok) in &checks {
        let Some((at, how)) = killed.get(key) else { continue };
        if *ok && started >= at {
            worst = worst.max(started - at);
        }
        if *started > at + bound {
            judged += 1;
            assert!(
                !ok,
                "key {key} passed a check started {} ms after a change ({how}: replica n was \
                 skewed by SKEW_SECONDS[n]) refused it for good (bound {BOUND:?})",
                started - at
            );
        }
    }
    assert!(killed.len() > KEYS / 4, "too few keys changed: {}", killed.len());
    assert!(judged > 1_000, "too few checks judged: {judged}");
    println!(
        "{:?}: {} checks, {changes} changes ({} keys refused for good), {purges} purges, \
         {restarts} cache restarts; {judged} checks judged after the bound, none passed; \
         worst delay of a passing check after its key's change: {} ms (bound {BOUND:?})",
        db.backend,
        checks.len(),
        killed.len(),
        if worst == i64::MIN { "none".into() } else { worst.to_string() }
    );
}

/// A small deterministic generator, seeded per task (no shared state, no dependency).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap()
    }
}

async fn worker() {
    let w: usize = std::env::var("APIKEYS_STRESS_WORKER").unwrap().parse().unwrap();
    let dir = PathBuf::from(std::env::var("APIKEYS_WORKER_DIR").unwrap());
    let skew = TimeDelta::seconds(SKEW_SECONDS[w]);
    let cache = KeyCache::new()
        .max_keys(MAX_KEYS)
        .max_staleness(BOUND)
        .feed_retention(Duration::from_secs(60));
    let client = ApiKeyClient::builder()
        .database_url(std::env::var("APIKEYS_WORKER_URL").unwrap())
        .signing_secret(SECRET)
        .clock(move || Utc::now() + skew)
        .cache(cache)
        .build()
        .await
        .unwrap();
    let keys: Vec<(KeyId, String)> = std::fs::read_to_string(dir.join("keys"))
        .unwrap()
        .lines()
        .map(|l| {
            let (id, key) = l.split_once(' ').unwrap();
            (id.parse().unwrap(), key.to_owned())
        })
        .collect();
    let route = ValidateOptions::new().track_usage(false).require_scopes(["read"]).unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (client, keys, route) = (client.clone(), keys.clone(), route.clone());
            tokio::spawn(async move {
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ ((w * TASKS + t + 1) as u64 * 0x1234_5678));
                let mut log = Vec::with_capacity(OPS);
                for _ in 0..OPS {
                    let n = rng.below(keys.len());
                    let (id, key) = (keys[n].0, &keys[n].1);
                    match rng.below(1_000) {
                        0..=5 => {
                            let kind = ["revoke", "delete", "roll", "scope"][rng.below(4)];
                            let kill = match kind {
                                "revoke" => client.revoke_key(id).await.map(drop),
                                "delete" => client.delete_key(id).await,
                                "roll" => client.roll_key(id, Duration::ZERO).await.map(drop),
                                _ => client
                                    .update_key(id, KeyUpdate::new().with_scopes(["write"]))
                                    .await
                                    .map(drop),
                            };
                            match kill {
                                Ok(()) => log.push(format!("kill {n} {} {kind}-by-{w}", wall_ms())),
                                // Already deleted, revoked, or rolled (its successor
                                // exists): it is refused for good already.
                                Err(
                                    Error::NotFound { .. }
                                    | Error::Revoked { .. }
                                    | Error::AlreadyExists { .. },
                                ) => {}
                                Err(e) => log.push(format!("kill-failed {n} {e}")),
                            }
                        }
                        6..=9 => {
                            let renamed = KeyUpdate::new().with_name(format!("r{}", rng.below(99)));
                            if client.update_key(id, renamed).await.is_ok() {
                                log.push(format!("rename {n}"));
                            }
                        }
                        10..=12 => {
                            if let Ok(n) = client.purge_change_feed().await {
                                log.push(format!("purge {n}"));
                            }
                        }
                        _ => {
                            let started = wall_ms();
                            let result = client.validate_key(key, &route).await;
                            match result {
                                Ok(_) => log.push(format!("check {n} {started} 1")),
                                Err(
                                    Error::Revoked { .. }
                                    | Error::Expired { .. }
                                    | Error::InvalidKey
                                    | Error::InsufficientScope { .. },
                                ) => log.push(format!("check {n} {started} 0")),
                                Err(e) => panic!("replica {w}: a check failed: {e:?}"),
                            }
                        }
                    }
                }
                log
            })
        })
        .collect();
    let mut failed_changes = Vec::new();
    for task in tasks {
        for line in task.await.unwrap() {
            if line.starts_with("kill-failed") {
                failed_changes.push(line.clone());
            }
            println!("{line}");
        }
    }
    println!("restarts {}", client.cache_stats().unwrap().feed_restarts);
    assert!(failed_changes.is_empty(), "changes failed: {failed_changes:?}");
}
