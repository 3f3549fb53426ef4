//! The verified-key cache across two OS processes, as two replicas run it.
//!
//! This binary is its own worker. The parent (replica A, no cache) prepares a database per
//! backend and starts one copy of itself with `APIKEYS_CACHE_WORKER=1` (replica B, with the
//! cache). B checks a set of keys in a loop; once it shows that it answers them from memory
//! (no database lookup in 50 rounds), A revokes one, removes a scope from one, deletes one
//! and unlinks the product of one, then creates a key. The two talk through files in a
//! temporary directory.
//!
//! Asserted: every check B *starts* more than `max_staleness` after A's call returned is
//! refused with the right error (the cache's guarantee, whatever the machine's load; 50 ms
//! are allowed for the host's wall clock, which both processes read, against B's monotonic
//! one); the key A created works in B at its first check. Reported: how long after each
//! change B refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, KeyCache, KeyUpdate, NewKey, ProductId, ValidateOptions};
use apikeys_testing::{SECRET, TestDb};

/// B's staleness bound.
const BOUND: Duration = Duration::from_millis(500);
/// Allowed between the host's wall clock and B's monotonic clock over a test.
const CLOCK_MARGIN_MS: i64 = 50;
/// The keys B checks, by the change A makes to each.
const CHANGES: [&str; 4] = ["revoke", "scope", "delete", "unlink"];

#[tokio::main]
async fn main() {
    if std::env::var("APIKEYS_CACHE_WORKER").is_ok() {
        return worker().await;
    }
    let cases = [("cache_staleness_across_processes", ())];
    apikeys_testing::run_cases(
        &apikeys_testing::compiled_backends!(),
        "cache_processes",
        &cases,
        |(), db| across_processes(db),
    )
    .await;
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Writes `text` to `dir/name` at once (written aside, then renamed).
fn publish(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

async fn wait_for(path: &Path, what: &str) {
    for _ in 0..6_000 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn across_processes(db: TestDb) {
    let a = db.client().await;
    let (org, _) = a.get_or_create_organization("acme").await.unwrap();
    let (project, _) = a.get_or_create_project(org.id, "web").await.unwrap();
    // The key whose product is unlinked has a project of its own.
    let (mobile, _) = a.get_or_create_project(org.id, "mobile").await.unwrap();
    let (api, _) = a.get_or_create_product(org.id, "api").await.unwrap();
    a.add_product_to_project(api.id, project.id).await.unwrap();
    a.add_product_to_project(api.id, mobile.id).await.unwrap();
    let mut keys = BTreeMap::new();
    for change in CHANGES {
        let p = if change == "unlink" { mobile.id } else { project.id };
        let new = NewKey::new(change).with_scopes(["read"]).with_project(p);
        let issued = a.create_key(org.id, new).await.unwrap();
        keys.insert(change, (issued.record.id, issued.key.expose_secret().to_owned()));
    }
    let dir = tempfile::tempdir().unwrap();
    let listed: Vec<String> = keys.iter().map(|(c, (_, k))| format!("{c} {k}")).collect();
    publish(dir.path(), "keys", &listed.join("\n"));
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("APIKEYS_CACHE_WORKER", "1")
        .env("APIKEYS_WORKER_URL", &db.url)
        .env("APIKEYS_WORKER_DIR", dir.path())
        .env("APIKEYS_WORKER_PRODUCT", api.id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = tokio::task::spawn_blocking(move || child.wait_with_output());
    wait_for(&dir.path().join("ready"), "B to warm its cache").await;

    // A's changes, each timed when its call has returned (the change committed before).
    let mut changed = BTreeMap::new();
    let id = |c: &str| keys[c].0;
    a.revoke_key(id("revoke")).await.unwrap();
    changed.insert("revoke", wall_ms());
    a.update_key(id("scope"), KeyUpdate::new().with_scopes(["write"])).await.unwrap();
    changed.insert("scope", wall_ms());
    a.delete_key(id("delete")).await.unwrap();
    changed.insert("delete", wall_ms());
    a.remove_product_from_project(api.id, mobile.id).await.unwrap();
    changed.insert("unlink", wall_ms());
    let fresh = a.create_key(org.id, NewKey::new("fresh").with_scopes(["read"])).await.unwrap();
    publish(dir.path(), "fresh", fresh.key.expose_secret());
    tokio::time::sleep(BOUND + Duration::from_secs(1)).await;
    publish(dir.path(), "done", "");

    let out = child.await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "B failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let results: BTreeMap<String, BTreeMap<String, String>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("result "))
        .map(|l| {
            let mut fields = l.split(' ');
            let name = fields.next().unwrap().to_owned();
            let kv = fields.filter_map(|f| f.split_once('=')).map(|(k, v)| (k.into(), v.into()));
            (name, kv.collect())
        })
        .collect();
    let field = |name: &str, k: &str| -> String {
        results.get(name).and_then(|r| r.get(k)).cloned().unwrap_or_else(|| panic!("{text}"))
    };
    assert_eq!(field("warm", "lookups"), "0", "B answered from memory before the changes");
    assert_eq!(field("warm", "hits"), field("warm", "checks"), "every check a cache hit");
    let mut delays = Vec::new();
    for (change, expected) in
        [("revoke", "revoked"), ("scope", "scope"), ("delete", "invalid"), ("unlink", "product")]
    {
        let at = changed[change];
        let last_ok: i64 = field(change, "last_ok_start").parse().unwrap();
        assert!(
            last_ok <= at + BOUND.as_millis() as i64 + CLOCK_MARGIN_MS,
            "{change}: B served the key {} ms after the change (bound {BOUND:?})",
            last_ok - at
        );
        assert_eq!(field(change, "refused"), expected, "{change}");
        assert_eq!(field(change, "refused_again"), "yes", "{change}: refused for good");
        let refused_at: i64 = field(change, "first_refused").parse().unwrap();
        delays.push((change, refused_at - at));
    }
    assert_eq!(field("fresh", "first"), "ok", "a key created in A works in B at once");
    println!("{:?}: B refused after (ms) {delays:?}, bound {BOUND:?}", db.backend);
}

/// What B saw of one key.
#[derive(Default)]
struct Seen {
    last_ok_start: i64,
    first_refused: Option<(i64, &'static str)>,
    refused_again: bool,
}

fn outcome(e: &Error) -> &'static str {
    match e {
        Error::Revoked { .. } => "revoked",
        Error::InsufficientScope { .. } => "scope",
        Error::InvalidKey => "invalid",
        Error::ProductNotAllowed { .. } => "product",
        other => panic!("unexpected error in B: {other:?}"),
    }
}

async fn worker() {
    let dir = PathBuf::from(std::env::var("APIKEYS_WORKER_DIR").unwrap());
    let product: ProductId = std::env::var("APIKEYS_WORKER_PRODUCT").unwrap().parse().unwrap();
    let b = ApiKeyClient::builder()
        .database_url(std::env::var("APIKEYS_WORKER_URL").unwrap())
        .signing_secret(SECRET)
        .cache(KeyCache::new().max_staleness(BOUND))
        .build()
        .await
        .unwrap();
    let keys: Vec<(String, String)> = std::fs::read_to_string(dir.join("keys"))
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').map(|(c, k)| (c.to_owned(), k.to_owned())).unwrap())
        .collect();
    let route = ValidateOptions::new()
        .track_usage(false)
        .for_product(product)
        .require_scopes(["read"])
        .unwrap();
    // Warm: B serves the keys from memory: a block of 50 rounds without a database lookup
    // (the first poll empties what was cached before it, so a few blocks may be needed).
    let stats = || b.cache_stats().unwrap();
    let mut block = (u64::MAX, 0, 0);
    for _ in 0..100 {
        let before = stats();
        for _ in 0..50 {
            for (_, k) in &keys {
                b.validate_key(k, &route).await.unwrap();
            }
        }
        let after = stats();
        block = (after.lookups - before.lookups, after.hits - before.hits, 50 * keys.len());
        if block.0 == 0 {
            break;
        }
    }
    println!("result warm lookups={} hits={} checks={}", block.0, block.1, block.2);
    publish(&dir, "ready", "");

    let mut seen: BTreeMap<&str, Seen> = BTreeMap::new();
    let mut fresh_done = false;
    while !dir.join("done").exists() {
        for (change, k) in &keys {
            let started = wall_ms();
            let result = b.validate_key(k, &route).await;
            let s = seen.entry(change.as_str()).or_default();
            match result {
                Ok(_) => s.last_ok_start = started,
                Err(e) => match s.first_refused {
                    None => s.first_refused = Some((wall_ms(), outcome(&e))),
                    Some((_, first)) => s.refused_again = outcome(&e) == first,
                },
            }
        }
        if !fresh_done && dir.join("fresh").exists() {
            let fresh = std::fs::read_to_string(dir.join("fresh")).unwrap();
            let first = b.validate_key(&fresh, &ValidateOptions::new().track_usage(false)).await;
            println!("result fresh first={}", if first.is_ok() { "ok" } else { "refused" });
            fresh_done = true;
        }
        tokio::task::yield_now().await;
    }
    for (change, s) in seen {
        let (at, refused) = s.first_refused.unwrap_or((0, "never"));
        println!(
            "result {change} last_ok_start={} refused={refused} first_refused={at} refused_again={}",
            s.last_ok_start,
            if s.refused_again { "yes" } else { "no" }
        );
    }
}
