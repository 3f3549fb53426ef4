//! What the guard adds to a check: a request through a router with `RequireKeyLayer` and a
//! `ValidKey` handler, against `validate_key` called directly with the same options, and
//! against the same router without the guard (axum's own cost), all with the verified-key
//! cache on (the deployment where the guard's own cost matters most). Criterion measures each;
//! then interleaved rounds give the ratios from one run.
//!
//! `cargo bench -p apikeys-axum --bench guard`; `APIKEYS_BENCH_QUICK=1` for a smoke run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use apikeys_axum::{ApiKeyAuth, ValidKey};
use apikeys_db::{ApiKeyClient, KeyCache, NewKey, ValidateOptions};
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use criterion::Criterion;
use http::Request;
use tokio::runtime::Runtime;
use tower::ServiceExt;

fn quick() -> bool {
    std::env::var("APIKEYS_BENCH_QUICK").as_deref() == Ok("1")
}

struct Setup {
    client: ApiKeyClient,
    key: String,
    options: ValidateOptions,
    guarded: Router,
    bare: Router,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let client = ApiKeyClient::builder()
        .database_url(format!("sqlite://{}", dir.path().join("bench.db").display()))
        .signing_secret("bench-signing-secret-0123456789-abcdefghijkl")
        .cache(KeyCache::new())
        .usage_flush_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("bench").with_scopes(["read", "write"]);
    let key = client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned();
    let options = ValidateOptions::new().require_scopes(["read"]).unwrap();
    let auth = ApiKeyAuth::new(client.clone());
    let handler = |key: ValidKey| async move {
        black_box(key.id);
        "ok"
    };
    let guarded = Router::new().route("/", get(handler).route_layer(auth.require(options.clone())));
    let bare = Router::new().route("/", get(|| async { black_box("ok") }));
    let s = Setup { client, key, options, guarded, bare, _dir: dir };
    // Warm: the cache's first poll has run and the key is answered from memory.
    for _ in 0..1_000 {
        s.direct().await;
        s.through(&s.guarded).await;
        if s.client.cache_stats().unwrap().hits > 10 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the key is never answered from the cache");
}

impl Setup {
    async fn direct(&self) {
        black_box(self.client.validate_key(&self.key, &self.options).await.unwrap());
    }

    async fn through(&self, router: &Router) {
        let request = Request::get("/").header("x-api-key", &self.key).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert!(response.status().is_success());
        black_box(response);
    }
}

fn main() {
    let rt = Runtime::new().unwrap();
    let s = rt.block_on(setup());
    let mut c = if quick() {
        Criterion::default().measurement_time(Duration::from_millis(200)).sample_size(10)
    } else {
        Criterion::default()
    }
    .warm_up_time(Duration::from_millis(if quick() { 50 } else { 1_000 }))
    .configure_from_args();
    let mut group = c.benchmark_group("guard");
    group.bench_function("validate_key (cache hit)", |b| b.to_async(&rt).iter(|| s.direct()));
    group.bench_function("request through the guard", |b| {
        b.to_async(&rt).iter(|| s.through(&s.guarded))
    });
    group
        .bench_function("request without a guard", |b| b.to_async(&rt).iter(|| s.through(&s.bare)));
    group.finish();

    // Interleaved rounds: each round times a batch of each, so that noise hits all alike.
    let (rounds, calls) = if quick() { (3, 10) } else { (30, 2_000) };
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    rt.block_on(async {
        for _ in 0..rounds {
            for (i, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                for _ in 0..calls {
                    match i {
                        0 => s.direct().await,
                        1 => s.through(&s.guarded).await,
                        _ => s.through(&s.bare).await,
                    }
                }
                t.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(calls));
            }
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [direct, guarded, bare] = times.map(|mut v| median(&mut v));
    println!("\nguard, interleaved medians ({rounds} rounds of {calls} calls):");
    println!("  validate_key, cache hit          {direct:8.0} ns");
    println!("  request through the guard        {guarded:8.0} ns");
    println!("  request without a guard          {bare:8.0} ns");
    println!("  guarded request / validate_key   {:8.2}×", guarded / direct);
    println!("  (guarded − bare) / validate_key  {:8.2}×", (guarded - bare) / direct);
    rt.block_on(s.client.shutdown()).unwrap();
}
