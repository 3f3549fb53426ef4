//! A replica: one client as the guide ("Many replicas") recommends for many replicas, and the
//! driver's tasks checking Zipf-drawn keys through it until the parent closes its stdin.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use apikeys_db::{ApiKeyClient, CreditMode, KeyCache, RateLimitMode, ValidateOptions};
use apikeys_soak::events::{Event, Outcome, now_us};
use apikeys_testing::ZipfTable;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;

use crate::spec::{Record, Spec, read_keys, stop_on_stdin_eof, trace_to};

/// How often batched usage is written.
const USAGE_FLUSH: Duration = Duration::from_secs(1);

pub async fn run(spec: Spec) -> ExitCode {
    let record = match Record::append(&spec.dir.join(format!("replica-{}.jsonl", spec.r))) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("replica {}: cannot open its record: {e}", spec.r);
            return ExitCode::FAILURE;
        }
    };
    trace_to(&spec.dir.join(format!("replica-{}.trace.log", spec.r)));
    let Ok(keys) = read_keys(&spec.dir) else {
        eprintln!("replica {}: cannot read the keys", spec.r);
        return ExitCode::FAILURE;
    };
    let keys = Arc::new(keys);
    let cache = KeyCache::new()
        .max_keys(keys.len() * 2)
        .max_staleness(Duration::from_millis(spec.staleness_ms.unsigned_abs()));
    // Started in a quiet phase; the proxy's cut that opened it may still be felt.
    let build = || {
        spec.builder()
            .cache(cache.clone())
            .usage_flush_interval(USAGE_FLUSH)
            .rate_limit_mode(RateLimitMode::Leased)
            .credit_mode(CreditMode::Leased)
            .build()
    };
    let client = match again(spec.r, "build", build).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("replica {}: build failed: {e}", spec.r);
            return ExitCode::FAILURE;
        }
    };
    let warmed = again(spec.r, "warm_cache", || client.warm_cache()).await.unwrap_or(0);
    let secret_version = spec.secrets.first().map_or(0, |s| s.0);
    record.write(&Event::Ready { r: spec.r, t: now_us(), secret_version, warmed });
    record.flush();
    println!("ready");

    let stop = stop_on_stdin_eof();
    let zipf = Arc::new(ZipfTable::new(keys.len(), spec.zipf));
    let tasks: Vec<_> = (0..spec.tasks)
        .map(|t| {
            let d = Driver {
                client: client.clone(),
                record: Arc::clone(&record),
                keys: Arc::clone(&keys),
                zipf: Arc::clone(&zipf),
                stop: Arc::clone(&stop),
            };
            tokio::spawn(d.run(spec.clone(), t))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // Shutdown gives leased units and credits back and writes the batched counts; a fault
    // may fail it, so it is tried again (what it holds is kept between attempts).
    let error = again(spec.r, "shutdown", || client.shutdown()).await.err();
    record.write(&Event::Stopped { r: spec.r, t: now_us(), error });
    record.flush();
    ExitCode::SUCCESS
}

/// Runs `op` until it succeeds, up to 40 times 250 ms apart (a fault may be under way); the
/// last error, as displayed, if it never did.
async fn again<T, F>(r: u32, what: &str, mut op: impl FnMut() -> F) -> Result<T, String>
where
    F: Future<Output = apikeys_db::Result<T>>,
{
    let mut last = String::new();
    for _ in 0..40 {
        match op().await {
            Ok(t) => return Ok(t),
            Err(e) => {
                eprintln!("replica {r}: {what} failed ({e}), again");
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(last)
}

struct Driver {
    client: ApiKeyClient,
    record: Arc<Record>,
    keys: Arc<Vec<String>>,
    zipf: Arc<ZipfTable>,
    stop: Arc<AtomicBool>,
}

impl Driver {
    async fn run(self, spec: Spec, task: u32) {
        let seed = spec.seed
            ^ (u64::from(spec.r) << 48)
            ^ (u64::from(spec.generation) << 32)
            ^ u64::from(task);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let period = Duration::from_secs_f64(f64::from(spec.tasks) / spec.rate);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Ok(opts) = ValidateOptions::new().require_scopes(["read"]) else {
            return;
        };
        while !self.stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let k = self.zipf.sample(&mut rng);
            let t0 = now_us();
            let result = self.client.validate_key(&self.keys[k], &opts).await;
            let t1 = now_us();
            let k = u32::try_from(k).unwrap_or(u32::MAX);
            let o = Outcome::of(&result);
            let detail = match (&result, o) {
                (Err(e), Outcome::Storage | Outcome::Conflict | Outcome::Other) => {
                    let source = std::error::Error::source(e).map(ToString::to_string);
                    Some(format!("{e}: {}", source.unwrap_or_default()))
                }
                _ => None,
            };
            self.record.write(&Event::Check { r: spec.r, k, t0, t1, o, detail });
        }
    }
}
