//! The hot path with the verified-key cache on: cache hits against their floor (HMAC + map
//! lookup + decide), leased limits, metrics and spans on and off, throughput, and memory per
//! cached key. Part of `hot_path`, so its figures come from the same run as the rest.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeys_db::core::hazmat::{KeyHasher, Requirements, decide};
use apikeys_db::{
    ApiKey, ApiKeyClient, CreditMode, Credits, KeyCache, NewKey, OwnerPlan, RateLimit,
    RateLimitMode, RateLimits, SigningSecret, VerifyOptions,
};
use criterion::{BenchmarkGroup, Throughput, measurement::WallTime};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use tokio::runtime::Runtime;

use super::{Fixture, common::SECRET, quick};

/// The clients of the cached benchmarks.
pub struct Cached {
    /// Cache on, usage batched: every check answered from memory.
    client: ApiKeyClient,
    /// The same, with leased shared limits.
    leased: ApiKeyClient,
    /// The same, with leased credits too: a plan's check.
    plan_client: ApiKeyClient,
    /// A key with a plan: a main limit and two named limits (never reached) and credits
    /// (never spent out).
    plan: String,
    /// A key of an owner whose plan has two shared limits and shared credits (never reached,
    /// never spent out); the key has a main limit of its own.
    owned: String,
    /// A hot key (scopes `read`, `write`; org-wide) limited to 10^9 per hour: every check
    /// counts against the shared limit, which is never reached.
    hot: String,
    /// The floor: the hasher and one key in a map of the same crate the cache uses.
    hasher: KeyHasher,
    map: quick_cache::sync::Cache<[u8; 32], Arc<ApiKey>>,
}

fn cache() -> KeyCache {
    KeyCache::new().max_staleness(Duration::from_secs(1))
}

pub async fn cached(f: &Fixture) -> Cached {
    let batched = |b: apikeys_db::ClientBuilder| {
        b.cache(cache()).usage_flush_interval(Duration::from_millis(100))
    };
    let client = f.db.client_with(batched).await;
    let leased = f.db.client_with(|b| batched(b).rate_limit_mode(RateLimitMode::Leased)).await;
    let hasher = KeyHasher::new(SigningSecret::new(SECRET).unwrap()).unwrap();
    let record = f.client.verify_key(&f.key, &VerifyOptions::new().track_usage(false)).await;
    let map = quick_cache::sync::Cache::new(100_000);
    map.insert(*hasher.hash(&f.key).as_bytes(), Arc::new(record.unwrap()));
    let new = NewKey::new("hot")
        .with_scopes(["read", "write"])
        .with_rate_limit(RateLimit::per_hour(1_000_000_000).unwrap());
    let hot = f.client.create_key(f.org, new).await.unwrap().key.expose_secret().to_owned();
    let plan_client =
        f.db.client_with(|b| {
            batched(b).rate_limit_mode(RateLimitMode::Leased).credit_mode(CreditMode::Leased)
        })
        .await;
    let named = RateLimits::new()
        .with("burst", RateLimit::per_minute(1_000_000_000).unwrap())
        .and_then(|l| l.with("daily", RateLimit::per_day(1_000_000_000).unwrap()))
        .unwrap();
    let new = NewKey::new("plan")
        .with_scopes(["read", "write"])
        .with_rate_limit(RateLimit::per_hour(1_000_000_000).unwrap())
        .with_rate_limits(named)
        .with_credits(Credits::new(1_000_000_000_000));
    let plan = f.client.create_key(f.org, new).await.unwrap().key.expose_secret().to_owned();
    let shared = RateLimits::new()
        .with("burst", RateLimit::per_minute(1_000_000_000).unwrap())
        .and_then(|l| l.with("daily", RateLimit::per_day(1_000_000_000).unwrap()))
        .unwrap();
    let team =
        OwnerPlan::new().with_rate_limits(shared).with_credits(Credits::new(1_000_000_000_000));
    f.client.set_owner(f.org, "bench-team", team).await.unwrap();
    let new = NewKey::new("owned")
        .with_scopes(["read", "write"])
        .with_owner("bench-team")
        .with_rate_limit(RateLimit::per_hour(1_000_000_000).unwrap());
    let owned = f.client.create_key(f.org, new).await.unwrap().key.expose_secret().to_owned();
    let c = Cached { client, leased, plan_client, plan, owned, hot, hasher, map };
    // Warm: the first poll has run and every key the benchmarks use is cached.
    for _ in 0..1_000 {
        c.verify(f).await;
        c.validate(f).await;
        c.leased_validate(f).await;
        if c.client.cache_stats().unwrap().hits > 10 && c.leased.cache_stats().unwrap().hits > 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for key in &f.pool {
        c.client.verify_key(key, &VerifyOptions::new()).await.unwrap();
    }
    // The hot key is hot: its blocks have grown to their cap (1, 2, 4, ... 1024 units).
    for _ in 0..5_000 {
        c.leased_validate(f).await;
        c.plan_validate(f).await;
        c.owned_validate(f).await;
    }
    c
}

impl Cached {
    /// The floor of a cache hit: HMAC, one map lookup, the decision.
    fn floor(&self, f: &Fixture) {
        let hash = self.hasher.hash(black_box(&f.key));
        let key = self.map.get(hash.as_bytes()).unwrap();
        decide(&key, &Requirements::default(), chrono::Utc::now()).unwrap();
    }

    async fn verify(&self, f: &Fixture) {
        let options = VerifyOptions::new().track_usage(false);
        self.client.verify_key(&f.key, &options).await.unwrap();
    }

    async fn verify_batched(&self, f: &Fixture) {
        self.client.verify_key(&f.key, &VerifyOptions::new()).await.unwrap();
    }

    async fn validate(&self, f: &Fixture) {
        self.client.validate_key(&f.key, &f.full()).await.unwrap();
    }

    /// Scopes + product + a leased shared limit + batched usage, on a hot key.
    async fn leased_validate(&self, f: &Fixture) {
        let options = f.full().track_usage(true);
        self.leased.validate_key(&self.hot, &options).await.unwrap();
    }

    /// A plan's check: scopes + product + three leased limits (main and two named) + leased
    /// credits + batched usage, on a hot key.
    async fn plan_validate(&self, f: &Fixture) {
        let options = f.full().track_usage(true);
        self.plan_client.validate_key(&self.plan, &options).await.unwrap();
    }

    /// An owner's plan: scopes + product + the key's leased limit, the owner's two leased
    /// limits and its leased credits + batched usage, on a hot key.
    async fn owned_validate(&self, f: &Fixture) {
        let options = f.full().track_usage(true);
        self.plan_client.validate_key(&self.owned, &options).await.unwrap();
    }
}

pub fn bench(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, f: &Fixture, c: &Cached) {
    g.bench_function("cached: floor (HMAC + map lookup + decide)", |b| b.iter(|| c.floor(f)));
    g.bench_function("cached: verify_key hit, tracking off", |b| {
        b.to_async(rt).iter(|| c.verify(f))
    });
    g.bench_function("cached: verify_key hit, tracking batched", |b| {
        b.to_async(rt).iter(|| c.verify_batched(f))
    });
    g.bench_function("cached: validate_key hit, scopes + product", |b| {
        b.to_async(rt).iter(|| c.validate(f))
    });
    g.bench_function("cached: validate_key hit, leased limit + batched usage", |b| {
        b.to_async(rt).iter(|| c.leased_validate(f))
    });
    g.bench_function("cached: validate_key hit, plan: main + 2 named limits + credits", |b| {
        b.to_async(rt).iter(|| c.plan_validate(f))
    });
    g.bench_function(
        "cached: validate_key hit, owner plan: 2 shared limits + shared credits",
        |b| b.to_async(rt).iter(|| c.owned_validate(f)),
    );
    g.throughput(Throughput::Elements(1));
    for tasks in [1usize, 8, 64] {
        g.bench_function(format!("cached: throughput, {tasks} tasks"), |b| {
            b.to_async(rt).iter_custom(|n| throughput(c, f, tasks, n))
        });
    }
    g.throughput(Throughput::Elements(1));
}

/// `tasks` tasks verifying keys of the pool (tracking batched, all cached): the time of `n`.
async fn throughput(c: &Cached, f: &Fixture, tasks: usize, n: u64) -> Duration {
    let per_task = (n as usize).div_ceil(tasks);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let client = c.client.clone();
            let keys: Vec<String> = (0..per_task.min(f.pool.len()))
                .map(|i| f.pool[(t * 7919 + i * 104_729) % f.pool.len()].clone())
                .collect();
            tokio::spawn(async move {
                let options = VerifyOptions::new();
                for i in 0..per_task {
                    client.verify_key(&keys[i % keys.len()], &options).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    started.elapsed().mul_f64(n as f64 / (per_task * tasks) as f64)
}

/// A recorder that keeps its metrics as `metrics-exporter-prometheus` does: a
/// `metrics_util` registry of atomics (a sharded map read on every registration).
struct RegistryRecorder(Registry<Key, AtomicStorage>);

/// Installs the recorder for the whole run, as a host does at start-up, before any client is
/// built: every benchmark pays for its metrics.
pub fn install_recorder() {
    metrics::set_global_recorder(RegistryRecorder(Registry::atomic())).ok();
}

impl Recorder for RegistryRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0.get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0.get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0.get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// The interleaved figures of the cached path (µs per call, except where named).
pub struct Figures {
    pub floor: f64,
    pub verify: f64,
    pub verify_batched: f64,
    pub validate: f64,
    pub leased: f64,
    /// A cache hit on a current-thread runtime, metrics and spans off, then on.
    pub plain: f64,
    pub observed: f64,
    /// Verifies per second with 8 tasks.
    pub per_second_8: f64,
    /// The same cache hit with metrics on and spans enabled too (DEBUG).
    pub debug: f64,
    /// What the two caching clients did during the run.
    pub stats: [apikeys_db::CacheStats; 2],
}

pub fn interleaved(rt: &Runtime, f: &Fixture, c: &Cached, rounds: usize, per: usize) -> Figures {
    let mut t = [Duration::ZERO; 8];
    let local = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let noop = metrics::NoopRecorder;
    // A host as production runs it: an exporter's recorder, and logs at INFO.
    let subscriber = |level| {
        let fmt = tracing_subscriber::fmt().with_writer(std::io::sink).with_max_level(level);
        tracing::Dispatch::new(fmt.finish())
    };
    let (info, debug) = (subscriber(tracing::Level::INFO), subscriber(tracing::Level::DEBUG));
    let mut per_second = 0.0;
    for _ in 0..rounds {
        macro_rules! timed {
            ($i:expr, $op:expr) => {{
                let s = Instant::now();
                for _ in 0..per {
                    $op;
                }
                t[$i] += s.elapsed();
            }};
        }
        timed!(0, c.floor(f));
        rt.block_on(async {
            timed!(1, c.verify(f).await);
            timed!(2, c.verify_batched(f).await);
            timed!(3, c.validate(f).await);
            timed!(4, c.leased_validate(f).await);
        });
        // Off: no recorder (this thread's is a no-op), no subscriber. On: the global
        // recorder, and a subscriber at INFO (production) or DEBUG (the check's span too).
        metrics::with_local_recorder(&noop, || {
            local.block_on(async { timed!(5, c.verify(f).await) });
        });
        tracing::dispatcher::with_default(&info, || {
            local.block_on(async { timed!(6, c.verify(f).await) });
        });
        tracing::dispatcher::with_default(&debug, || {
            local.block_on(async { timed!(7, c.verify(f).await) });
        });
        let n = (per * 40) as u64;
        let took = rt.block_on(throughput(c, f, 8, n));
        per_second += n as f64 / took.as_secs_f64();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / (rounds * per) as f64;
    Figures {
        floor: us(t[0]),
        verify: us(t[1]),
        verify_batched: us(t[2]),
        validate: us(t[3]),
        leased: us(t[4]),
        plain: us(t[5]),
        observed: us(t[6]),
        per_second_8: per_second / rounds as f64,
        debug: us(t[7]),
        stats: [c.client.cache_stats().unwrap(), c.leased.cache_stats().unwrap()],
    }
}

pub fn report(c: &Figures, verify_off_uncached: f64) {
    let judged = !quick() && !cfg!(debug_assertions);
    let check = |label: &str, value: f64, target: f64, unit: &str| {
        let verdict = match (judged, value <= target) {
            (false, _) => "no verdict: quick or debug run",
            (true, true) => "ok",
            (true, false) => "MISSED",
        };
        println!("  {label:<52} {value:8.2}{unit}  (target ≤ {target}{unit}: {verdict})");
    };
    println!("  cached: floor = HMAC + map lookup + decide     {:9.2}", c.floor);
    println!("  cached: verify_key hit, tracking off           {:9.2}", c.verify);
    println!("  cached: verify_key hit, tracking batched       {:9.2}", c.verify_batched);
    println!("  cached: validate_key hit, scopes + product     {:9.2}", c.validate);
    println!("  cached: validate_key hit, leased + batched     {:9.2}", c.leased);
    check("cached: verify_key hit", c.verify, 5.0, " µs");
    println!("  {:<52} {:8.2}×", "cached: verify_key hit / its floor", c.verify / c.floor);
    println!(
        "  {:<52} {:8.1}×",
        "cached: verify_key hit speed-up over uncached",
        verify_off_uncached / c.verify
    );
    check("cached: leased validate_key / cached verify_key", c.leased / c.verify, 2.0, "×");
    check("cached: metrics on, logs at INFO / off (1 thread)", c.observed / c.plain, 1.1, "×");
    println!(
        "  {:<52} {:8.2}×",
        "cached: metrics on, DEBUG spans on / off (1 thread)",
        c.debug / c.plain
    );
    let k = c.per_second_8 / 1_000.0;
    let verdict = match (judged, k >= 200.0) {
        (false, _) => "no verdict: quick or debug run",
        (true, true) => "ok",
        (true, false) => "MISSED",
    };
    println!("  {:<52} {k:8.0}k/s (target ≥ 200k/s: {verdict})", "cached: verifies, 8 tasks");
    println!("  cached client: {:?}", c.stats[0]);
    println!("  leased client: {:?}", c.stats[1]);
}
