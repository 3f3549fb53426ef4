//! The admin: one process making changes to keys under traffic, each recorded with the time
//! its first attempt started and the time the call that settled it returned.

use std::collections::HashSet;
use std::io::Write as _;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, KeyId, KeyUpdate, RateLimit, Window};
use apikeys_soak::check::Setup;
use apikeys_soak::events::{Change, Event, now_us};
use apikeys_testing::ZipfTable;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::spec::{Record, SETUP_FILE, Spec, stop_on_stdin_eof, trace_to};

/// Attempts per change before the admin gives up on it (recorded as not done).
const ATTEMPTS: u32 = 120;

pub async fn run(spec: Spec) -> ExitCode {
    let Ok(record) = Record::append(&spec.dir.join("admin.jsonl")) else {
        eprintln!("admin: cannot open its record");
        return ExitCode::FAILURE;
    };
    trace_to(&spec.dir.join("admin.trace.log"));
    let setup: Setup = match std::fs::read(spec.dir.join(SETUP_FILE))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("admin: cannot read the setup: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match spec.builder().build().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("admin: build failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready");
    let stop = stop_on_stdin_eof();
    let n = setup.keys.len();
    let zipf = ZipfTable::new(n, spec.zipf);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(spec.seed ^ 0x00ad_3117);
    let mut finished: HashSet<usize> = HashSet::new();
    let mut read = vec![true; n];
    while !stop.load(Ordering::SeqCst) {
        let pause = rng.random_range(0.5..1.5) / spec.rate;
        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        // Updates go to the hot keys (under traffic); the final changes to keys drawn
        // uniformly, so that traffic goes on for the run.
        let x: f64 = rng.random();
        let (k, change) = if x < 0.35 {
            let k = zipf.sample(&mut rng);
            (k, Change::Scopes { read: !read[k] })
        } else if x < 0.65 {
            let k = zipf.sample(&mut rng);
            let base = setup.keys[k].limit;
            let n = (f64::from(base) * rng.random_range(0.5..2.0)).round().max(1.0);
            (k, Change::Limit { n: n as u32 })
        } else {
            let k = rng.random_range(0..n);
            let change = match rng.random_range(0..4) {
                0 => Change::Revoke,
                1 => Change::RollRevoke,
                2 => Change::RollGrace { grace_ms: rng.random_range(1_000..5_000) },
                _ => Change::Delete,
            };
            (k, change)
        };
        if finished.contains(&k) {
            continue;
        }
        let Ok(id) = setup.keys[k].id.parse::<KeyId>() else {
            continue;
        };
        let window = if setup.keys[k].window_s == 1 { Window::Second } else { Window::Minute };
        let t0 = now_us();
        let (done, attempts, error) = apply(&client, &record, id, change, window).await;
        let t1 = now_us();
        let k32 = u32::try_from(k).unwrap_or(u32::MAX);
        record.write(&Event::Admin { k: k32, t0, t1, change, done, attempts, error });
        record.flush();
        if done {
            match change {
                Change::Scopes { read: r } => read[k] = r,
                Change::Limit { .. } => {}
                _ => {
                    finished.insert(k);
                }
            }
        }
    }
    record.flush();
    ExitCode::SUCCESS
}

/// Makes `change`, trying again after `Unavailable`, `Storage` and `Conflict`. A refusal
/// after such a retry may be the first attempt's success (its answer lost to a fault): the
/// record then says what the database holds.
async fn apply(
    client: &ApiKeyClient,
    record: &Record,
    id: KeyId,
    change: Change,
    window: Window,
) -> (bool, u32, Option<String>) {
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        let result = match change {
            Change::Revoke => client.revoke_key(id).await.map(drop),
            Change::Delete => client.delete_key(id).await,
            Change::RollRevoke | Change::RollGrace { .. } => {
                let grace = match change {
                    Change::RollGrace { grace_ms } => {
                        Duration::from_millis(grace_ms.unsigned_abs())
                    }
                    _ => Duration::ZERO,
                };
                client.roll_key(id, grace).await.map(|issued| remember(&issued))
            }
            Change::Scopes { read } => {
                let scopes: &[&str] = if read { &["read", "write"] } else { &["write"] };
                client
                    .update_key(id, KeyUpdate::new().with_scopes(scopes.iter().copied()))
                    .await
                    .map(drop)
            }
            Change::Limit { n } => {
                let limit = RateLimit::new(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN), window);
                client.update_key(id, KeyUpdate::new().with_rate_limit(Some(limit))).await.map(drop)
            }
        };
        let e = match result {
            Ok(()) => return (true, attempt, last),
            Err(e) => e,
        };
        let kind = match &e {
            Error::Unavailable { .. } => "unavailable",
            Error::Storage { .. } => "storage",
            Error::Conflict { .. } => "conflict",
            _ if attempt == 1 => return (false, attempt, Some(e.to_string())),
            _ => return (settled(client, id, change).await, attempt, Some(e.to_string())),
        };
        let detail = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
        let error = format!("{kind}: {e}: {detail}");
        record.write(&Event::AdminError { t: now_us(), error: error.clone() });
        last = Some(error);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (false, ATTEMPTS, last)
}

/// Keeps a rolled key's plaintext beside the others (the run's one file of key material,
/// which the scan looks for everywhere else).
fn remember(issued: &apikeys_db::IssuedKey) {
    if let Ok(dir) = std::env::var(crate::spec::DIR_ENV) {
        let path = std::path::Path::new(&dir).join(crate::spec::ROLLED_FILE);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{}", issued.key.expose_secret());
        }
    }
}

/// Whether a change refused on a later attempt was made by an earlier one.
async fn settled(client: &ApiKeyClient, id: KeyId, change: Change) -> bool {
    match (change, client.get_key(id).await) {
        (Change::Delete, Err(Error::NotFound { .. })) => true,
        (Change::RollRevoke | Change::RollGrace { .. }, Ok(key)) => key.rolled_to.is_some(),
        _ => false,
    }
}
