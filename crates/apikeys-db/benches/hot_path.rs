//! The hot path against its floor, on every backend that is configured.
//!
//! `scripts/bench` runs it with PostgreSQL and MariaDB servers; `cargo bench -p apikeys-db
//! --bench hot_path` alone runs SQLite (a file, WAL) plus whatever `APIKEYS_TEST_POSTGRES_URL`
//! and `APIKEYS_TEST_MYSQL_URL` point at (each backend gets a fresh database, dropped after).
//!
//! For each backend: criterion measures every operation (`target/criterion/` has the reports),
//! then one interleaved run measures the operations the ratio targets compare, so that machine
//! noise hits all of them alike, and prints the ratios. `APIKEYS_BENCH_QUICK=1` makes every
//! measurement tiny (100 keys to list, not 100 000): CI uses it to check that the benches run.
//! `APIKEYS_BENCH_ROUNDS=n` sets the interleaved rounds (of 200 calls each; 10 in quick mode).
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

#[path = "hot_path/cached.rs"]
mod cached;

use std::hint::black_box;
use std::time::{Duration, Instant};

use apikeys_db::core::hazmat::KeyHasher;
use apikeys_db::sea_orm::sea_query::{Alias, Asterisk, Expr, ExprTrait, Query};
use apikeys_db::sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use apikeys_db::{
    ApiKeyClient, NewKey, OrgId, Page, ProductId, ProjectId, RateLimit, RateLimitMode,
    SigningSecret, StatusFilter, ValidateOptions, VerifyOptions,
};
use common::{Backend, SECRET, TestDb};
use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use tokio::runtime::Runtime;

/// Tiny sizes: with `APIKEYS_BENCH_QUICK=1`, and under `cargo test` (no `--bench` argument),
/// where criterion runs each benchmark once only to see that it works.
fn quick() -> bool {
    std::env::var("APIKEYS_BENCH_QUICK").as_deref() == Ok("1")
        || !std::env::args().any(|a| a == "--bench")
}

/// Everything one backend's benchmarks use.
struct Fixture {
    db: TestDb,
    client: ApiKeyClient,
    local: ApiKeyClient,
    /// Batched usage tracking, flushed every 100 ms.
    batched: ApiKeyClient,
    hasher: KeyHasher,
    org: OrgId,
    product: ProductId,
    /// Scopes `read` and `write`, of a project linked to `product`, no rate limit.
    key: String,
    /// The same, with a rate limit that is never reached (every check does the full work).
    limited: String,
    /// A project holding `list_size` keys; `pool` holds 10 000 of them (in quick mode 100).
    big_project: ProjectId,
    pool: Vec<String>,
    /// The floor's SELECT by hash, rendered once (the hash is bound per call).
    select_sql: String,
    /// The floor's UPDATE, rendered once.
    update: Statement,
}

async fn fixture(backend: Backend) -> Fixture {
    let db = TestDb::new(backend, "bench").await;
    let client = db.client().await;
    let local = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Local)).await;
    let batched = db.client_with(|b| b.usage_flush_interval(Duration::from_millis(100))).await;
    let hasher = KeyHasher::new(SigningSecret::new(SECRET).unwrap()).unwrap();
    let (org, _) = client.get_or_create_organization("bench").await.unwrap();
    let (project, _) = client.get_or_create_project(org.id, "web").await.unwrap();
    let (product, _) = client.get_or_create_product(org.id, "api").await.unwrap();
    client.add_product_to_project(product.id, project.id).await.unwrap();
    let scoped = || NewKey::new("bench").with_project(project.id).with_scopes(["read", "write"]);
    let issued = client.create_key(org.id, scoped()).await.unwrap();
    let limit = RateLimit::per_second(u32::MAX).unwrap();
    let limited = client.create_key(org.id, scoped().with_rate_limit(limit)).await.unwrap();

    let (big, _) = client.get_or_create_project(org.id, "big").await.unwrap();
    let (list_size, pool_size) = if quick() { (100, 100) } else { (100_000, 10_000) };
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut keys = Vec::new();
                for i in (t..list_size).step_by(16) {
                    let new_key = NewKey::new(format!("k{i}")).with_project(big.id);
                    let issued = client.create_key(org.id, new_key).await.unwrap();
                    keys.push(issued.key.expose_secret().to_owned());
                }
                keys
            })
        })
        .collect();
    let mut pool = Vec::new();
    for t in tasks {
        pool.extend(t.await.unwrap());
    }
    pool.truncate(pool_size);
    println!("{backend:?}: {list_size} keys created in {:.1?}", started.elapsed());
    let sql_backend = client.connection().get_database_backend();
    let select = Query::select()
        .column(Asterisk)
        .from(Alias::new("api_keys"))
        .and_where(Expr::col(Alias::new("key_hash")).eq(Vec::<u8>::new()))
        .to_owned();
    let update = Query::update()
        .table(Alias::new("api_keys"))
        .value(Alias::new("use_count"), Expr::col(Alias::new("use_count")).add(1))
        .and_where(Expr::col(Alias::new("id")).eq(issued.record.id.as_uuid()))
        .to_owned();
    Fixture {
        select_sql: sql_backend.build(&select).sql,
        update: sql_backend.build(&update),
        db,
        client,
        local,
        batched,
        hasher,
        org: org.id,
        product: product.id,
        key: issued.key.expose_secret().to_owned(),
        limited: limited.key.expose_secret().to_owned(),
        big_project: big.id,
        pool,
    }
}

impl Fixture {
    fn conn(&self) -> &DatabaseConnection {
        self.client.connection()
    }

    /// The floor's read: the row of one hash by its unique index, every column, no SDK code.
    /// Like the SDK's lookup, the SQL is rendered once and only the hash is bound per call.
    async fn raw_select(&self, hash: &[u8]) {
        let statement = Statement::from_sql_and_values(
            self.conn().get_database_backend(),
            self.select_sql.clone(),
            [hash.to_vec().into()],
        );
        let row = self.conn().query_one_raw(statement).await.unwrap();
        assert!(row.is_some());
    }

    /// The floor of usage tracking: one single-row UPDATE by primary key (rendered once).
    async fn raw_update(&self) {
        self.conn().execute_raw(self.update.clone()).await.unwrap();
    }

    async fn floor(&self) {
        let hash = self.hasher.hash(black_box(&self.key));
        self.raw_select(hash.as_bytes()).await;
    }

    async fn verify(&self, track: bool) {
        let options = VerifyOptions::new().track_usage(track);
        self.client.verify_key(&self.key, &options).await.unwrap();
    }

    async fn verify_batched(&self) {
        self.batched.verify_key(&self.key, &VerifyOptions::new()).await.unwrap();
    }

    fn full(&self) -> ValidateOptions {
        ValidateOptions::new()
            .for_product(self.product)
            .require_scopes(["read"])
            .unwrap()
            .track_usage(false)
    }

    async fn validate_local(&self) {
        let options = ValidateOptions::new().track_usage(false);
        self.local.validate_key(&self.limited, &options).await.unwrap();
    }
}

fn bench_backend(c: &mut Criterion, rt: &Runtime, name: &str, f: &Fixture, cc: &cached::Cached) {
    let mut g = c.benchmark_group(name);
    g.bench_function("floor: HMAC-SHA256", |b| b.iter(|| f.hasher.hash(black_box(&f.key))));
    let hash = f.hasher.hash(&f.key);
    g.bench_function("floor: raw SELECT by hash", |b| {
        b.to_async(rt).iter(|| f.raw_select(hash.as_bytes()))
    });
    g.bench_function("floor: HMAC + raw SELECT", |b| b.to_async(rt).iter(|| f.floor()));
    g.bench_function("floor: raw UPDATE by id", |b| b.to_async(rt).iter(|| f.raw_update()));
    g.bench_function("verify_key, tracking off", |b| b.to_async(rt).iter(|| f.verify(false)));
    g.bench_function("verify_key, tracking on", |b| b.to_async(rt).iter(|| f.verify(true)));
    g.bench_function("verify_key, tracking batched", |b| {
        b.to_async(rt).iter(|| f.verify_batched())
    });
    g.bench_function("validate_key, scopes + product", |b| {
        b.to_async(rt).iter(|| async { f.client.validate_key(&f.key, &f.full()).await.unwrap() })
    });
    g.bench_function("validate_key, shared limit", |b| {
        let options = || ValidateOptions::new().track_usage(false);
        b.to_async(rt)
            .iter(|| async { f.client.validate_key(&f.limited, &options()).await.unwrap() })
    });
    g.bench_function("validate_key, local limit", |b| b.to_async(rt).iter(|| f.validate_local()));
    g.bench_function("create_key", |b| {
        b.to_async(rt)
            .iter(|| async { f.client.create_key(f.org, NewKey::new("c")).await.unwrap() })
    });
    g.bench_function("get_or_create_organization, existing", |b| {
        b.to_async(rt)
            .iter(|| async { f.client.get_or_create_organization("bench").await.unwrap() })
    });
    g.bench_function("list_project_keys, page of 100", |b| {
        b.to_async(rt).iter(|| async {
            let page = f
                .client
                .list_project_keys(f.big_project, StatusFilter::All, Page::first(100).unwrap())
                .await
                .unwrap();
            assert_eq!(page.items.len(), 100);
        })
    });
    throughput(&mut g, rt, f);
    cached::bench(&mut g, rt, f, cc);
    g.finish();
}

/// `tasks` tasks validating random keys of the pool (tracking on): time per validation.
fn throughput(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, f: &Fixture) {
    g.throughput(Throughput::Elements(1));
    for tasks in [1usize, 8, 64] {
        g.bench_function(format!("throughput, {tasks} tasks"), |b| {
            b.to_async(rt).iter_custom(|n| async move {
                let per_task = (n as usize).div_ceil(tasks);
                let started = Instant::now();
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let client = f.client.clone();
                        let keys: Vec<String> = (0..per_task)
                            .map(|i| f.pool[(t * 7919 + i * 104_729) % f.pool.len()].clone())
                            .collect();
                        tokio::spawn(async move {
                            for key in keys {
                                client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.unwrap();
                }
                // Scaled to exactly n validations.
                started.elapsed().mul_f64(n as f64 / (per_task * tasks) as f64)
            })
        });
    }
}

/// Interleaved rounds of every compared operation; returns µs per call of each.
fn rounds() -> (usize, usize) {
    let default = if quick() { 2 } else { 30 };
    let rounds = std::env::var("APIKEYS_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok());
    (rounds.unwrap_or(default), if quick() { 10 } else { 200 })
}

fn interleaved(rt: &Runtime, f: &Fixture) -> [f64; 8] {
    let (rounds, per_round) = rounds();
    let mut totals = [Duration::ZERO; 8];
    rt.block_on(async {
        let hash = f.hasher.hash(&f.key);
        for _ in 0..rounds {
            macro_rules! timed {
                ($i:expr, $op:expr) => {{
                    let t = Instant::now();
                    for _ in 0..per_round {
                        $op;
                    }
                    totals[$i] += t.elapsed();
                }};
            }
            timed!(0, black_box(f.hasher.hash(black_box(&f.key))));
            timed!(1, f.raw_select(hash.as_bytes()).await);
            timed!(2, f.floor().await);
            timed!(3, f.raw_update().await);
            timed!(4, f.verify(false).await);
            timed!(5, f.verify(true).await);
            timed!(6, f.validate_local().await);
            timed!(7, f.verify_batched().await);
        }
    });
    let n = (rounds * per_round) as f64;
    totals.map(|d| d.as_secs_f64() * 1e6 / n)
}

fn report(name: &str, us: [f64; 8], cc: &cached::Figures) {
    let [hmac, select, floor, update, verify_off, verify_on, local, batched] = us;
    println!("\n{name}: interleaved, same run (µs per call)");
    println!("  HMAC-SHA256                      {hmac:9.2}");
    println!("  raw SELECT by hash               {select:9.2}");
    println!("  floor = HMAC + raw SELECT        {floor:9.2}");
    println!("  raw UPDATE by id                 {update:9.2}");
    println!("  verify_key, tracking off         {verify_off:9.2}");
    println!("  verify_key, tracking on          {verify_on:9.2}");
    println!("  validate_key, local limit        {local:9.2}");
    println!("  verify_key, tracking batched     {batched:9.2}");
    // A verdict needs a full run of an optimized build: quick mode's samples are too few,
    // and a debug build measures something else.
    let judged = !quick() && !cfg!(debug_assertions);
    let check = |label: &str, ratio: f64, target: f64| {
        if judged {
            let verdict = if ratio <= target { "ok" } else { "MISSED" };
            println!("  {label:<52} {ratio:5.2}×  (target ≤ {target}×: {verdict})");
        } else {
            println!(
                "  {label:<52} {ratio:5.2}×  (target ≤ {target}×; no verdict: quick or debug run)"
            );
        }
    };
    check("verify_key (tracking off) / floor", verify_off / floor, 1.5);
    check("validate_key (local limit) / verify_key", local / verify_off, 1.2);
    check("verify_key (tracking on) / (floor + raw UPDATE)", verify_on / (floor + update), 1.5);
    println!(
        "  batched tracking: {:.2}× verify_key (tracking off), {:.2}× tracking on",
        batched / verify_off,
        batched / verify_on
    );
    cached::report(cc, verify_off);
}

fn main() {
    cached::install_recorder();
    let rt = Runtime::new().unwrap();
    let mut c = Criterion::default();
    if quick() {
        c = c
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200))
            .sample_size(10);
    }
    let mut c = c.configure_from_args();
    let mut ratios = Vec::new();
    for backend in apikeys_testing::compiled_backends!() {
        let f = rt.block_on(fixture(backend));
        let cc = rt.block_on(cached::cached(&f));
        let name = format!("{backend:?}").to_lowercase();
        bench_backend(&mut c, &rt, &name, &f, &cc);
        let (rounds, per) = rounds();
        let figures = cached::interleaved(&rt, &f, &cc, rounds, per);
        ratios.push((name, interleaved(&rt, &f), figures));
        rt.block_on(f.db.cleanup());
    }
    c.final_summary();
    for (name, us, cc) in ratios {
        report(&name, us, &cc);
    }
}
