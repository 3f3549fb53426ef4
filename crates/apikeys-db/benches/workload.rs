//! The workload benchmark (issue 24, item 5): many keys, skewed traffic, several processes on
//! one database, the client configured as the README recommends.
//!
//! ```sh
//! cargo bench -p apikeys-db --bench workload                       # SQLite, full size
//! cargo bench -p apikeys-db --features postgres,mysql --bench workload -- --backend postgres
//! cargo bench -p apikeys-db --bench workload -- --duration 5 --warmup 2
//! ```
//!
//! Per backend (SQLite as a WAL file in a temporary directory; PostgreSQL and MariaDB in a
//! database of its own, created on the server of `APIKEYS_TEST_POSTGRES_URL` /
//! `APIKEYS_TEST_MYSQL_URL` or `--database-url`, dropped afterwards):
//!
//! - **Setup** (timed apart, never in the figures): `--keys` keys (100 000) in one
//!   organization, scopes `read` and `write`, each limited to `--limit` per minute (600);
//!   the keys whose Zipf rank is a multiple of 10 (one in ten, the hottest among them) also
//!   have `--credits` usage credits (100), never refilled. Created through the public API,
//!   500 per host transaction (`client.with(&txn).create_key`), 8 transactions at a time on
//!   the servers and one at a time on SQLite (one writer).
//! - **Load**: `--processes` (2) copies of this binary, each with one `ApiKeyClient` on a
//!   `DatabaseConnection` the bench opens itself (so that sea-orm's metric callback counts
//!   every statement the client sends), configured as the README recommends: the
//!   verified-key cache (`max_keys` a quarter above 100 000 or the key count, `max_staleness` 1 s), batched
//!   usage (`usage_flush_interval` 1 s), `RateLimitMode::Leased`, `CreditMode::Leased`, and
//!   the cache warmed (`warm_cache`) before the load starts. On SQLite that connection
//!   is one pool of 2 connections for reads and writes, where a client connecting by URL has
//!   8 readers and 1 writer; `--by-url` runs the latter, without the client-side count. Each
//!   process runs `--tasks` (8) tasks; each task draws keys by Zipf(`--zipf`, 1.1) over the
//!   keys (`apikeys_testing::ZipfTable`, seeded by `--seed`, the process and the task) and calls
//!   `validate_key` with `require_scopes(["read"])`. A `--warmup` phase (10 s) is not
//!   measured; the `--duration` phase (20 s) is.
//! - **Report**: checks/s (the processes' sum); p50/p99/p99.9 per check (an `hdrhistogram`
//!   per process, merged exactly in the parent), and the same split by whether the key had
//!   been checked by the same process in the second before (the check started); outcomes;
//!   statements per 1 000 checks (the metric callback, measured phase; plus what the server
//!   counted over the workers' whole run); admitted against the limit per key; a cache-hit
//!   `verify_key` against its floor (HMAC + map lookup + decide), measured in the same run.
//!   One table per backend and one `workload-json {...}` line with every figure.
//!
//! **Fails** (exit code 1) when a check ends in anything but `Ok`, `Quota` or
//! `UsageExhausted`; when a worker fails; when a key was admitted more than its limit: in one
//! minute window (counting the checks that ran entirely inside it by the host's clock, at
//! least `--window-margin-ms` (50) plus the database's measured clock offset and a round trip
//! away from its ends, so that they were surely counted in that window of the database's
//! clock), or over the run (all its admitted checks against the limit times the windows of
//! the database's clock the run touched); or when a key with credits passed more checks than
//! its balance. Targets are printed with a verdict
//! but do not fail the run.
//!
//! A check refused with `UsageExhausted` gives its rate-limit unit back (`validate_key` is all
//! or nothing), so admitted = `Ok`.
//!
//! `APIKEYS_BENCH_QUICK=1`, `--quick`, or running under `cargo test` (no `--bench` argument)
//! makes it tiny (2 000 keys, 1 s + 2 s): only that it runs and holds its invariants.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::cast_precision_loss,
    missing_docs
)]

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeys_db::core::hazmat::{KeyHasher, Requirements, decide};
use apikeys_db::sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use apikeys_db::{
    ApiKey, ApiKeyClient, Credits, Error, KeyCache, KeyId, NewKey, RateLimit, RateLimitMode,
    SigningSecret, ValidateOptions, VerifyOptions,
};
use apikeys_testing::ZipfTable;
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use serde_json::{Value, json};

const SECRET: &str = "workload-signing-secret-0123456789-abcdefgh";
/// Set in a worker's environment: its index. Its spec is in [`SPEC_ENV`].
const WORKER_ENV: &str = "APIKEYS_WORKLOAD_WORKER";
const SPEC_ENV: &str = "APIKEYS_WORKLOAD_SPEC";
/// Keys created per host transaction during setup.
const SETUP_BATCH: usize = 500;
/// One key in this many has credits: those whose rank is a multiple of it.
const CREDITS_EVERY: usize = 10;
/// The limits' window: a minute.
const WINDOW_MS: i64 = 60_000;
/// "Active": checked by the same process within this long before.
const ACTIVE_MS: u32 = 1_000;
/// Histogram range: 1 ns to 100 s, 3 significant digits.
const HIST_MAX_NS: u64 = 100_000_000_000;

// ------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    fn parse(s: &str) -> Backend {
        match s {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres,
            "mysql" | "mariadb" => Backend::MySql,
            other => panic!("unknown backend `{other}` (sqlite, postgres, mysql)"),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }
    fn compiled_in(self) -> bool {
        match self {
            Backend::Sqlite => cfg!(feature = "sqlite"),
            Backend::Postgres => cfg!(feature = "postgres"),
            Backend::MySql => cfg!(feature = "mysql"),
        }
    }
    fn env_var(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => "APIKEYS_TEST_POSTGRES_URL",
            Backend::MySql => "APIKEYS_TEST_MYSQL_URL",
        }
    }
}

#[derive(Debug, Clone)]
struct Config {
    backends: Vec<Backend>,
    /// A server URL given with `--database-url` (its backend's admin URL).
    database_url: Option<String>,
    keys: usize,
    processes: usize,
    tasks: usize,
    warmup: Duration,
    duration: Duration,
    limit: u32,
    credits: u64,
    zipf: f64,
    seed: u64,
    window_margin_ms: i64,
    /// Interleaved rounds of the floor-vs-hit measurement (1 000 keys each).
    rounds: usize,
    /// Workers connect by URL (the client's own pools) instead of through a connection the
    /// bench opens: no statement count on the client side then.
    by_url: bool,
    /// Count the rate limits in Redis at this URL (`ClientBuilder::redis`).
    redis: Option<String>,
    quick: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: workload [--backend sqlite,postgres,mysql] [--database-url URL] [--keys N] \
         [--processes N] [--tasks N] [--warmup SECS] [--duration SECS] [--limit PER_MINUTE] \
         [--credits N] [--zipf S] [--seed N] [--window-margin-ms MS] [--rounds N] [--by-url] [--redis URL] [--quick]"
    );
    std::process::exit(2);
}

impl Config {
    fn from_args() -> Config {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes `--bench`; `cargo test` runs this binary without it.
        let quick = std::env::var("APIKEYS_BENCH_QUICK").as_deref() == Ok("1")
            || args.iter().any(|a| a == "--quick")
            || !args.iter().any(|a| a == "--bench");
        let mut c = Config {
            backends: [Backend::Sqlite, Backend::Postgres, Backend::MySql]
                .into_iter()
                .filter(|b| b.compiled_in())
                .collect(),
            database_url: None,
            keys: if quick { 2_000 } else { 100_000 },
            processes: 2,
            tasks: 8,
            warmup: Duration::from_secs(if quick { 1 } else { 10 }),
            duration: Duration::from_secs(if quick { 2 } else { 20 }),
            limit: 600,
            credits: 100,
            zipf: 1.1,
            seed: 24,
            window_margin_ms: 50,
            rounds: if quick { 3 } else { 30 },
            by_url: false,
            redis: None,
            quick,
        };
        let mut backend_given = false;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| usage());
            let secs = |v: String| Duration::from_secs_f64(v.parse().unwrap_or_else(|_| usage()));
            match arg.as_str() {
                "--bench" | "--quick" => {}
                "--backend" => {
                    c.backends = value().split(',').map(Backend::parse).collect();
                    backend_given = true;
                }
                "--database-url" => c.database_url = Some(value()),
                "--keys" => c.keys = value().parse().unwrap_or_else(|_| usage()),
                "--processes" => c.processes = value().parse().unwrap_or_else(|_| usage()),
                "--tasks" => c.tasks = value().parse().unwrap_or_else(|_| usage()),
                "--warmup" => c.warmup = secs(value()),
                "--duration" => c.duration = secs(value()),
                "--limit" => c.limit = value().parse().unwrap_or_else(|_| usage()),
                "--credits" => c.credits = value().parse().unwrap_or_else(|_| usage()),
                "--zipf" => c.zipf = value().parse().unwrap_or_else(|_| usage()),
                "--seed" => c.seed = value().parse().unwrap_or_else(|_| usage()),
                "--window-margin-ms" => {
                    c.window_margin_ms = value().parse().unwrap_or_else(|_| usage());
                }
                "--rounds" => c.rounds = value().parse().unwrap_or_else(|_| usage()),
                "--by-url" => c.by_url = true,
                "--redis" => c.redis = Some(value()),
                "--help" | "-h" => usage(),
                // Anything else cargo may pass (a filter): ignored.
                _ => {}
            }
        }
        if let Some(url) = &c.database_url
            && !backend_given
        {
            let scheme = url.split(':').next().unwrap_or_default();
            c.backends = vec![Backend::parse(scheme)];
        }
        for b in &c.backends {
            assert!(
                b.compiled_in(),
                "backend {} is not compiled in: add `--features {}`",
                b.name(),
                b.name()
            );
        }
        assert!(
            c.keys >= CREDITS_EVERY && c.processes > 0 && c.tasks > 0,
            "sizes must be positive"
        );
        c
    }

    fn admin_url(&self, backend: Backend) -> Option<String> {
        if backend == Backend::Sqlite {
            return None;
        }
        if let Some(url) = &self.database_url
            && self.backends.len() == 1
        {
            return Some(url.clone());
        }
        let var = backend.env_var();
        Some(std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is unset: set it (scripts/test-all does), or pass --database-url")
        }))
    }

    fn rate_limit(&self) -> RateLimit {
        RateLimit::per_minute(self.limit).unwrap()
    }

    fn has_credits(rank: usize) -> bool {
        rank.is_multiple_of(CREDITS_EVERY)
    }

    /// The client every worker (and the floor measurement) runs: as the README recommends.
    fn recommended(&self, builder: apikeys_db::ClientBuilder) -> apikeys_db::ClientBuilder {
        let builder = builder
            .signing_secret(SECRET)
            .cache(
                // Room for every key, and a quarter more: the cache's shards fill unevenly.
                KeyCache::new()
                    .max_keys(self.keys.max(100_000) * 5 / 4)
                    .max_staleness(Duration::from_secs(1)),
            )
            .usage_flush_interval(Duration::from_secs(1))
            .rate_limit_mode(RateLimitMode::Leased)
            .credit_mode(apikeys_db::CreditMode::Leased);
        match &self.redis {
            #[cfg(feature = "redis")]
            Some(url) => builder.redis(url),
            #[cfg(not(feature = "redis"))]
            Some(_) => panic!("--redis needs `--features redis`"),
            None => builder,
        }
    }
}

// ------------------------------------------------------------------------------------------
// A database of the bench's own

struct BenchDb {
    backend: Backend,
    url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl BenchDb {
    async fn create(backend: Backend, admin_url: Option<String>) -> BenchDb {
        let name = format!("apikeys_workload_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let Some(admin_url) = admin_url else {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("workload.db").display());
            return BenchDb { backend, url, admin_url: None, name, _dir: Some(dir) };
        };
        let admin = Database::connect(&admin_url).await.expect("connect to the admin url");
        let sql = match backend {
            Backend::Postgres => format!("CREATE DATABASE \"{name}\""),
            _ => format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        };
        admin.execute_unprepared(&sql).await.expect("create the bench database");
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        BenchDb { backend, url, admin_url: Some(admin_url), name, _dir: None }
    }

    async fn drop_db(self) {
        let Some(admin_url) = &self.admin_url else { return };
        if let Ok(admin) = Database::connect(admin_url).await {
            let sql = match self.backend {
                Backend::Postgres => {
                    format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)
                }
                _ => format!("DROP DATABASE IF EXISTS `{}`", self.name),
            };
            if let Err(e) = admin.execute_unprepared(&sql).await {
                eprintln!("could not drop the bench database {}: {e}", self.name);
            }
            admin.close().await.ok();
        }
    }
}

fn host_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The database's clock minus the host's (ms, at the middle of the round trip), and the
/// round trip.
async fn clock_offset(db: &DatabaseConnection) -> (i64, i64) {
    let mut best = (0, i64::MAX);
    for _ in 0..5 {
        let before = host_ms();
        let at = apikeys_testing::db_now_ms_on(db).await;
        let after = host_ms();
        if after - before < best.1 {
            best = (at - (before + after) / 2, after - before);
        }
    }
    best
}

/// What the server counted (over every session of the bench's database on PostgreSQL, every
/// client of the server on MariaDB; nothing on SQLite).
async fn server_counters(url: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let db = Database::connect(url).await.unwrap();
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let sql = "SELECT xact_commit + xact_rollback AS transactions, tup_returned, \
                       tup_fetched, tup_inserted, tup_updated, tup_deleted \
                       FROM pg_stat_database WHERE datname = current_database()";
            let row = db
                .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
                .unwrap()
                .unwrap();
            for c in [
                "transactions",
                "tup_returned",
                "tup_fetched",
                "tup_inserted",
                "tup_updated",
                "tup_deleted",
            ] {
                out.insert(c.to_owned(), row.try_get::<i64>("", c).unwrap());
            }
        }
        DbBackend::MySql => {
            let sql = "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_select', \
                       'Com_insert', 'Com_update', 'Com_delete', 'Com_stmt_execute', 'Com_commit')";
            let rows =
                db.query_all_raw(Statement::from_string(DbBackend::MySql, sql)).await.unwrap();
            for row in rows {
                let name: String = row.try_get("", "Variable_name").unwrap();
                let value: String = row.try_get("", "Value").unwrap();
                out.insert(name, value.parse().unwrap());
            }
        }
        _ => {}
    }
    db.close().await.ok();
    if let Some(ms) = server_cpu_ms(db_backend_of(url)) {
        out.insert("cpu_ms".to_owned(), ms);
    }
    out
}

fn db_backend_of(url: &str) -> Backend {
    Backend::parse(url.split(':').next().unwrap_or_default())
}

/// CPU time (user + system, ms) of the database server's processes on this machine, from
/// /proc: every process named `postgres`, or `mariadbd` / `mysqld` (none for SQLite, which
/// runs in the workers).
fn server_cpu_ms(backend: Backend) -> Option<i64> {
    let names: &[&str] = match backend {
        Backend::Postgres => &["postgres"],
        Backend::MySql => &["mariadbd", "mysqld"],
        Backend::Sqlite => return None,
    };
    let mut ticks = 0_i64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ... utime(14) stime(15)
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !names.contains(&&stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<i64>().ok()).unwrap_or(0);
        ticks += field(11) + field(12);
    }
    // USER_HZ is 100 on Linux.
    Some(ticks * 10)
}

#[cfg(feature = "redis")]
/// What Redis counted: scripts run (`EVALSHA` + `EVAL`), commands, and its CPU time (ms).
async fn redis_counters(url: &str) -> BTreeMap<String, i64> {
    let client = ::redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = ::redis::cmd("INFO").arg("everything").query_async(&mut conn).await.unwrap();
    let mut out = BTreeMap::new();
    let (mut scripts, mut cpu) = (0_i64, 0.0_f64);
    for line in info.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name {
            "cmdstat_evalsha" | "cmdstat_eval" => {
                scripts += value
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.parse::<i64>().ok())
                    .unwrap_or(0);
            }
            "total_commands_processed" => {
                out.insert("redis_commands".to_owned(), value.trim().parse().unwrap_or(0));
            }
            "used_cpu_sys" | "used_cpu_user" => cpu += value.trim().parse::<f64>().unwrap_or(0.0),
            _ => {}
        }
    }
    out.insert("redis_scripts".to_owned(), scripts);
    out.insert("redis_cpu_ms".to_owned(), (cpu * 1000.0) as i64);
    out
}

// ------------------------------------------------------------------------------------------
// Statement counting (in the workers)

/// What the client sent, counted by sea-orm's metric callback, by phase (warm-up, measured,
/// after), with the measured phase's statements by kind ("VERB table").
#[derive(Default)]
struct Statements {
    phase: AtomicUsize,
    count: [AtomicU64; 3],
    failed: [AtomicU64; 3],
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl Statements {
    fn record(&self, info: &apikeys_db::sea_orm::metric::Info<'_>) {
        let phase = self.phase.load(Ordering::Relaxed).min(2);
        self.count[phase].fetch_add(1, Ordering::Relaxed);
        if info.failed {
            self.failed[phase].fetch_add(1, Ordering::Relaxed);
        }
        if phase == 1 {
            *self.kinds.lock().unwrap().entry(kind(&info.statement.sql)).or_default() += 1;
        }
    }
}

/// "VERB table" of a statement (for an `UPDATE`, with the first column it sets): its verb
/// (for a `WITH`, the first data-modifying one inside) and the table it reads or writes.
fn kind(sql: &str) -> String {
    let sql = sql.trim_start();
    let upper = sql.to_ascii_uppercase();
    // Where `word` starts as a whole word, from `from` on.
    let find = |word: &str, from: usize| {
        let mut at = from;
        while let Some(i) = upper[at..].find(word) {
            let i = at + i;
            let word_char = |c: char| c.is_alphanumeric() || c == '_';
            let before = upper[..i].chars().next_back().is_none_or(|c| !word_char(c));
            let after = upper[i + word.len()..].chars().next().is_none_or(|c| !word_char(c));
            if before && after {
                return Some(i);
            }
            at = i + word.len();
        }
        None
    };
    // The identifier after `at` (skipping blanks), unquoted, and whether a `(` follows it.
    let ident = |at: usize| {
        let rest = sql[at..].trim_start();
        let end = rest.find(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ')');
        let end = end.unwrap_or(rest.len());
        let call = rest[end..].starts_with('(');
        (rest[..end].trim_matches(|c| c == '"' || c == '`').to_owned(), call)
    };
    let verb = if upper.starts_with("WITH") {
        ["INSERT", "UPDATE", "DELETE"]
            .into_iter()
            .filter_map(|v| find(v, 0).map(|i| (i, v)))
            .min()
            .map_or(("SELECT", 0), |(i, v)| (v, i))
    } else {
        (upper.split_whitespace().next().unwrap_or_default(), 0)
    };
    let (verb, from) = match verb {
        ("INSERT", i) => ("INSERT", find("INTO", i)),
        ("UPDATE", i) => ("UPDATE", Some(i)),
        ("DELETE", i) => ("DELETE", find("FROM", i)),
        (v, i) => (v, find("FROM", i)),
    };
    let Some(mut at) = from else { return verb.to_owned() };
    // The first FROM (INTO, UPDATE) followed by a table, not a function (`extract(x FROM f())`).
    loop {
        let word = upper[at..].split_whitespace().next().unwrap_or_default().len();
        let (table, call) = ident(at + word);
        if !call {
            let set = if verb == "UPDATE" {
                find("SET", at).map(|i| format!(" SET {}", ident(i + 3).0)).unwrap_or_default()
            } else {
                String::new()
            };
            return format!("{verb} {table}{set}");
        }
        match find(&upper[at..at + word], at + word) {
            Some(next) => at = next,
            None => return verb.to_owned(),
        }
    }
}

/// A connection the bench owns, with the metric callback on it. On a SQLite file: what the
/// client's own URL connection would set (WAL, foreign keys, a 5 s busy timeout), in one pool
/// of 2 connections (the minimum `ClientBuilder::connection` asks for) for reads and writes.
/// By URL the client has 8 readers and one writer of its own; a shared pool of 8 lets 8
/// writers of one process contend for the file's lock, which measured 2× slower than by URL
/// (and than this pool of 2) on this workload. `--by-url` runs the client's own pools.
async fn counted_connection(url: &str, statements: Arc<Statements>) -> DatabaseConnection {
    let mut options = ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false);
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        use apikeys_db::sea_orm::sqlx::sqlite::SqliteJournalMode;
        options.max_connections(2).map_sqlx_sqlite_opts(|o| {
            o.foreign_keys(true)
                .busy_timeout(Duration::from_secs(5))
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
        });
    }
    let mut db = Database::connect(options).await.unwrap();
    db.set_metric_callback(move |info| statements.record(info));
    db
}

// ------------------------------------------------------------------------------------------
// The worker

/// What a worker is told (JSON in its environment).
struct Spec {
    url: String,
    keys_file: String,
    tasks: usize,
    zipf: f64,
    seed: u64,
    start_ms: i64,
    warm_end_ms: i64,
    end_ms: i64,
    margin_ms: i64,
    config: Config,
}

impl Spec {
    fn to_json(&self) -> Value {
        json!({
            "url": self.url, "keys_file": self.keys_file, "tasks": self.tasks,
            "zipf": self.zipf, "seed": self.seed, "start_ms": self.start_ms,
            "warm_end_ms": self.warm_end_ms, "end_ms": self.end_ms, "margin_ms": self.margin_ms,
            "keys": self.config.keys, "limit": self.config.limit, "by_url": self.config.by_url,
            "redis": self.config.redis,
        })
    }

    fn from_json(v: &Value) -> Spec {
        let s = |k: &str| v[k].as_str().unwrap().to_owned();
        let i = |k: &str| v[k].as_i64().unwrap();
        let mut config = Config::from_args();
        config.keys = usize::try_from(i("keys")).unwrap();
        config.limit = u32::try_from(i("limit")).unwrap();
        config.by_url = v["by_url"].as_bool().unwrap();
        config.redis = v["redis"].as_str().map(str::to_owned);
        Spec {
            url: s("url"),
            keys_file: s("keys_file"),
            tasks: usize::try_from(i("tasks")).unwrap(),
            zipf: v["zipf"].as_f64().unwrap(),
            seed: v["seed"].as_u64().unwrap(),
            start_ms: i("start_ms"),
            warm_end_ms: i("warm_end_ms"),
            end_ms: i("end_ms"),
            margin_ms: i("margin_ms"),
            config,
        }
    }
}

/// A worker's clock: `Instant`s and Unix milliseconds, tied at one moment.
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
    base_ms: i64,
}

impl Clock {
    fn now() -> Clock {
        Clock { base: Instant::now(), base_ms: host_ms() }
    }
    fn instant(self, unix_ms: i64) -> Instant {
        let d = unix_ms - self.base_ms;
        let abs = Duration::from_millis(d.unsigned_abs());
        if d >= 0 { self.base + abs } else { self.base.checked_sub(abs).unwrap_or(self.base) }
    }
    fn unix_ms(self, t: Instant) -> i64 {
        self.base_ms + i64::try_from(t.duration_since(self.base).as_millis()).unwrap()
    }
    /// Milliseconds since `base`, plus one (0 means never).
    fn tick(self, t: Instant) -> u32 {
        u32::try_from(t.duration_since(self.base).as_millis()).unwrap_or(u32::MAX - 1) + 1
    }
}

struct Shared {
    client: ApiKeyClient,
    keys: Vec<String>,
    /// Per key: when this process last checked it ([`Clock::tick`]; 0: never).
    last_seen: Vec<AtomicU32>,
    clock: Clock,
    warm_end: Instant,
    end: Instant,
    margin_ms: i64,
    zipf: ZipfTable,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).unwrap()
}

/// What one task (and then one process) saw.
struct Tally {
    /// Measured phase: all checks, checks of keys active in the last second, the others.
    all: Histogram<u64>,
    active: Histogram<u64>,
    idle: Histogram<u64>,
    /// Outcomes: ok, Quota, UsageExhausted, other; measured phase and whole run.
    measured: [u64; 4],
    total: [u64; 4],
    other: Vec<String>,
    /// Per key, whole run: admitted by the rate limit (Ok), Ok, refused.
    admitted: Vec<u32>,
    ok: Vec<u32>,
    refused: Vec<u32>,
    /// Per window of the clock (its number) and key: admitted checks that ran entirely
    /// inside the window, `margin_ms` away from its ends.
    inside: Vec<(i64, Vec<u32>)>,
    /// The end of the last measured check.
    last_end: Option<Instant>,
}

impl Tally {
    fn new(keys: usize) -> Tally {
        Tally {
            all: histogram(),
            active: histogram(),
            idle: histogram(),
            measured: [0; 4],
            total: [0; 4],
            other: Vec::new(),
            admitted: vec![0; keys],
            ok: vec![0; keys],
            refused: vec![0; keys],
            inside: Vec::new(),
            last_end: None,
        }
    }

    fn merge(&mut self, o: Tally) {
        self.all.add(&o.all).unwrap();
        self.active.add(&o.active).unwrap();
        self.idle.add(&o.idle).unwrap();
        for i in 0..4 {
            self.measured[i] += o.measured[i];
            self.total[i] += o.total[i];
        }
        self.other.extend(o.other);
        self.other.truncate(20);
        for (a, b) in [(&mut self.admitted, &o.admitted), (&mut self.ok, &o.ok)] {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        self.refused.iter_mut().zip(&o.refused).for_each(|(a, b)| *a += b);
        for (w, counts) in o.inside {
            match self.inside.iter_mut().find(|(x, _)| *x == w) {
                Some((_, mine)) => mine.iter_mut().zip(&counts).for_each(|(a, b)| *a += b),
                None => self.inside.push((w, counts)),
            }
        }
        self.last_end = self.last_end.max(o.last_end);
    }

    fn count_inside(&mut self, window: i64, rank: usize, keys: usize) {
        let slot = match self.inside.iter().position(|(w, _)| *w == window) {
            Some(i) => i,
            None => {
                self.inside.push((window, vec![0; keys]));
                self.inside.len() - 1
            }
        };
        self.inside[slot].1[rank] += 1;
    }
}

async fn run_task(shared: Arc<Shared>, seed: u64) -> Tally {
    let n = shared.keys.len();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let options = ValidateOptions::new().require_scopes(["read"]).unwrap();
    let mut t = Tally::new(n);
    loop {
        let rank = shared.zipf.sample(&mut rng);
        let key = &shared.keys[rank];
        let start = Instant::now();
        if start >= shared.end {
            break;
        }
        let tick = shared.clock.tick(start);
        let last = shared.last_seen[rank].load(Ordering::Relaxed);
        let active = last != 0 && tick - last.min(tick) <= ACTIVE_MS;
        if last != tick {
            shared.last_seen[rank].store(tick, Ordering::Relaxed);
        }
        let result = shared.client.validate_key(key, &options).await;
        let end = Instant::now();
        let measured = start >= shared.warm_end;
        let outcome = match &result {
            Ok(_) => 0,
            Err(Error::Quota { .. }) => 1,
            Err(Error::UsageExhausted { .. }) => 2,
            Err(e) => {
                if t.other.len() < 20 {
                    t.other.push(format!("{e:?}"));
                }
                3
            }
        };
        t.total[outcome] += 1;
        if measured {
            let ns = u64::try_from(end.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
            t.all.saturating_record(ns.max(1));
            let split = if active { &mut t.active } else { &mut t.idle };
            split.saturating_record(ns.max(1));
            t.measured[outcome] += 1;
            t.last_end = Some(end);
        }
        match outcome {
            0 => {
                t.admitted[rank] += 1;
                t.ok[rank] += 1;
                let (s, e) = (shared.clock.unix_ms(start), shared.clock.unix_ms(end));
                let window = s.div_euclid(WINDOW_MS);
                if e.div_euclid(WINDOW_MS) == window
                    && s - window * WINDOW_MS >= shared.margin_ms
                    && (window + 1) * WINDOW_MS - e >= shared.margin_ms
                {
                    t.count_inside(window, rank, n);
                }
            }
            1 => t.refused[rank] += 1,
            _ => {}
        }
    }
    t
}

fn sparse(v: &[u32]) -> Value {
    Value::Array(
        v.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| json!([i, c])).collect(),
    )
}

fn hist_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded().map(|v| json!([v.value_iterated_to(), v.count_at_value()])).collect(),
    )
}

async fn worker(index: usize) {
    let spec = Spec::from_json(&serde_json::from_str(&std::env::var(SPEC_ENV).unwrap()).unwrap());
    let keys: Vec<String> =
        std::fs::read_to_string(&spec.keys_file).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(keys.len(), spec.config.keys);
    let statements = Arc::new(Statements::default());
    let builder = if spec.config.by_url {
        ApiKeyClient::builder().database_url(&spec.url)
    } else {
        let db = counted_connection(&spec.url, Arc::clone(&statements)).await;
        ApiKeyClient::builder().connection(db)
    };
    let client = spec.config.recommended(builder).build().await.unwrap();
    // As the README recommends: the keys loaded before the service takes traffic.
    let warm_started = Instant::now();
    let warmed = client.warm_cache().await.unwrap();
    let warm_ms = warm_started.elapsed().as_secs_f64() * 1e3;
    let clock = Clock::now();
    let shared = Arc::new(Shared {
        client: client.clone(),
        last_seen: keys.iter().map(|_| AtomicU32::new(0)).collect(),
        keys,
        clock,
        warm_end: clock.instant(spec.warm_end_ms),
        end: clock.instant(spec.end_ms),
        margin_ms: spec.margin_ms,
        zipf: ZipfTable::new(spec.config.keys, spec.zipf),
    });
    // Ready this long after the common start (then its warm-up was shorter).
    let late_ms = (host_ms() - spec.start_ms).max(0);
    tokio::time::sleep_until(clock.instant(spec.start_ms).into()).await;
    // The statement counter's phase follows the tasks' (which read their own clock).
    let phases = {
        let (s, warm_end, end) = (Arc::clone(&statements), shared.warm_end, shared.end);
        tokio::spawn(async move {
            tokio::time::sleep_until(warm_end.into()).await;
            s.phase.store(1, Ordering::Relaxed);
            tokio::time::sleep_until(end.into()).await;
            s.phase.store(2, Ordering::Relaxed);
        })
    };
    let tasks: Vec<_> = (0..spec.tasks)
        .map(|t| {
            let seed =
                spec.seed ^ ((index as u64) << 32 | t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            tokio::spawn(run_task(Arc::clone(&shared), seed))
        })
        .collect();
    let mut tally = Tally::new(spec.config.keys);
    for task in tasks {
        tally.merge(task.await.unwrap());
    }
    phases.await.unwrap();
    let cache = client.cache_stats().map(|s| format!("{s:?}")).unwrap_or_default();
    // Gives leased units back and writes the batched use counts.
    client.shutdown().await.unwrap();
    let measured_s =
        tally.last_end.map_or(0.0, |e| e.saturating_duration_since(shared.warm_end).as_secs_f64());
    let st = |a: &[AtomicU64; 3]| a.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let kinds = statements.kinds.lock().unwrap().clone();
    let out = json!({
        "process": index,
        "late_ms": late_ms,
        "measured_s": measured_s,
        "measured": tally.measured, "total": tally.total, "other": tally.other,
        "statements": st(&statements.count), "failed_statements": st(&statements.failed),
        "kinds": kinds,
        "hist": { "all": hist_json(&tally.all), "active": hist_json(&tally.active),
                  "idle": hist_json(&tally.idle) },
        "admitted": sparse(&tally.admitted), "ok": sparse(&tally.ok),
        "refused": sparse(&tally.refused),
        "inside": tally.inside.iter().map(|(w, c)| json!([w, sparse(c)])).collect::<Vec<_>>(),
        "cache": cache,
        "warmed": warmed, "warm_ms": warm_ms,
    });
    println!("workload-worker {out}");
}

// ------------------------------------------------------------------------------------------
// The parent

struct Setup {
    keys: Vec<String>,
    ids: Vec<KeyId>,
    took: Duration,
}

async fn setup(db: &BenchDb, config: &Config) -> Setup {
    let client =
        ApiKeyClient::builder().database_url(&db.url).signing_secret(SECRET).build().await.unwrap();
    client.create_tables().await.unwrap();
    let (org, _) = client.get_or_create_organization("workload").await.unwrap();
    let n = config.keys;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    // SQLite has one writer: more transactions at once would only queue.
    let parallel = if db.backend == Backend::Sqlite { 1 } else { 8 };
    let limit = config.rate_limit();
    let credits = config.credits;
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let (client, next) = (client.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                let mut made = Vec::new();
                loop {
                    let from = next.fetch_add(1, Ordering::Relaxed) * SETUP_BATCH;
                    if from >= n {
                        return made;
                    }
                    let txn = client.begin().await.unwrap();
                    for rank in from..(from + SETUP_BATCH).min(n) {
                        let mut new = NewKey::new(format!("w{rank}"))
                            .with_scopes(["read", "write"])
                            .with_rate_limit(limit);
                        if Config::has_credits(rank) {
                            new = new.with_credits(Credits::new(credits));
                        }
                        let issued = client.with(&txn).create_key(org.id, new).await.unwrap();
                        made.push((rank, issued.key.expose_secret().to_owned(), issued.record.id));
                    }
                    txn.commit().await.unwrap();
                }
            })
        })
        .collect();
    let mut keys = vec![String::new(); n];
    let mut ids = vec![None; n];
    for t in tasks {
        for (rank, key, id) in t.await.unwrap() {
            keys[rank] = key;
            ids[rank] = Some(id);
        }
    }
    let took = started.elapsed();
    // Closes the setup's pool, so that its sessions' statistics are in the server's
    // counters before the run's baseline is read.
    client.connection().clone().close().await.ok();
    Setup { keys, ids: ids.into_iter().map(Option::unwrap).collect(), took }
}

/// One worker's report, parsed.
struct WorkerOut {
    v: Value,
}

impl WorkerOut {
    fn u64s(&self, k: &str) -> Vec<u64> {
        self.v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    }
    fn pairs(v: &Value) -> impl Iterator<Item = (usize, u64)> + '_ {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| (usize::try_from(p[0].as_u64().unwrap()).unwrap(), p[1].as_u64().unwrap()))
    }
    fn add_hist(&self, which: &str, into: &mut Histogram<u64>) {
        for p in self.v["hist"][which].as_array().unwrap() {
            into.record_n(p[0].as_u64().unwrap(), p[1].as_u64().unwrap()).unwrap();
        }
    }
}

fn spawn_workers(spec: &Spec, processes: usize) -> Vec<std::thread::JoinHandle<(bool, String)>> {
    let exe = std::env::current_exe().unwrap();
    let spec = spec.to_json().to_string();
    (0..processes)
        .map(|i| {
            let mut cmd = Command::new(&exe);
            cmd.env(WORKER_ENV, i.to_string())
                .env(SPEC_ENV, &spec)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            std::thread::spawn(move || {
                let out = cmd.output().expect("spawn a worker");
                (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect()
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": us(h.value_at_quantile(0.5)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
    })
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The floor of a cache hit (HMAC-SHA256 of the key, one lookup in a `quick_cache` map of
/// the same keys, `decide`) against `verify_key` answered by the cache (tracking off), over
/// the same 1 000 Zipf-drawn keys, in interleaved rounds. Returns the median ns per call of
/// each.
async fn floor_and_hit(db: &BenchDb, config: &Config, setup: &Setup) -> (f64, f64) {
    let client =
        config.recommended(ApiKeyClient::builder().database_url(&db.url)).build().await.unwrap();
    let hasher = KeyHasher::new(SigningSecret::new(SECRET).unwrap()).unwrap();
    let zipf = ZipfTable::new(config.keys, config.zipf);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed.wrapping_add(1));
    let sample: Vec<usize> = (0..1_000).map(|_| zipf.sample(&mut rng)).collect();
    let map: quick_cache::sync::Cache<[u8; 32], Arc<ApiKey>> =
        quick_cache::sync::Cache::new(config.keys.max(100_000));
    let untracked = VerifyOptions::new().track_usage(false);
    for &rank in &sample {
        let record = client.get_key(setup.ids[rank]).await.unwrap();
        map.insert(*hasher.hash(&setup.keys[rank]).as_bytes(), Arc::new(record));
        client.verify_key(&setup.keys[rank], &untracked).await.unwrap();
    }
    // Every key of the sample is answered from memory: no lookup in a whole pass.
    for _ in 0..200 {
        let before = client.cache_stats().unwrap().lookups;
        for &rank in &sample {
            client.verify_key(&setup.keys[rank], &untracked).await.unwrap();
        }
        if client.cache_stats().unwrap().lookups == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Interleaved in chunks of 100 calls (the floor's, then the hit's, on the same keys), and
    // the median chunk of each taken: a chunk that the busy machine preempted is an outlier.
    let (mut floor, mut hit) = (Vec::new(), Vec::new());
    let requirements = Requirements::default();
    for _ in 0..config.rounds {
        for chunk in sample.chunks(100) {
            let t = Instant::now();
            for &rank in chunk {
                let hash = hasher.hash(std::hint::black_box(&setup.keys[rank]));
                let key = map.get(hash.as_bytes()).unwrap();
                decide(&key, &requirements, chrono::Utc::now()).unwrap();
            }
            floor.push(t.elapsed().as_secs_f64() * 1e9 / chunk.len() as f64);
            let t = Instant::now();
            for &rank in chunk {
                client.verify_key(&setup.keys[rank], &untracked).await.unwrap();
            }
            hit.push(t.elapsed().as_secs_f64() * 1e9 / chunk.len() as f64);
        }
    }
    client.shutdown().await.ok();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(floor), median(hit))
}

/// What the bench itself does around each check, without the check (ns per check, one
/// thread): the Zipf draw, two clock reads, the activity stamp, a histogram record and the
/// per-key counters. Part of every figure above; reported so it can be taken into account.
fn bench_overhead_ns(config: &Config) -> f64 {
    let n = config.keys;
    let zipf = ZipfTable::new(n, config.zipf);
    zipf.check(n, config.zipf);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let clock = Clock::now();
    let last_seen: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
    let mut t = Tally::new(n);
    let rounds = 1_000_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let rank = zipf.sample(&mut rng);
        let start = Instant::now();
        let tick = clock.tick(start);
        let last = last_seen[rank].load(Ordering::Relaxed);
        let active = last != 0 && tick - last.min(tick) <= ACTIVE_MS;
        if last != tick {
            last_seen[rank].store(tick, Ordering::Relaxed);
        }
        let end = Instant::now();
        let ns = u64::try_from(end.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
        t.all.saturating_record(ns.max(1));
        let split = if active { &mut t.active } else { &mut t.idle };
        split.saturating_record(ns.max(1));
        t.admitted[rank] += 1;
        let (s, e) = (clock.unix_ms(start), clock.unix_ms(end));
        if s.div_euclid(WINDOW_MS) == e.div_euclid(WINDOW_MS) {
            t.count_inside(s.div_euclid(WINDOW_MS), rank, n);
        }
    }
    std::hint::black_box(&t);
    started.elapsed().as_secs_f64() * 1e9 / f64::from(rounds)
}

/// The load phase's raw outcome: every worker's report, and what was read around it.
struct Load {
    outs: Vec<WorkerOut>,
    failures: Vec<String>,
    offset_ms: i64,
    rtt_ms: i64,
    margin_ms: i64,
    /// The windows of the database's clock the run touched, from its clock before the
    /// workers started and after they all ended.
    windows: i64,
    /// The server's counters over the workers' whole run (after − before).
    server: BTreeMap<String, i64>,
}

/// Starts the workers on the keys of `setup`, waits for them, and reads the clocks and the
/// server's counters around them.
async fn load(db: &BenchDb, config: &Config, setup: &Setup) -> Load {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.txt");
    std::fs::write(&keys_file, setup.keys.join("\n")).unwrap();
    let probe = Database::connect(&db.url).await.unwrap();
    let (offset_ms, rtt_ms) = clock_offset(&probe).await;
    let margin_ms = config.window_margin_ms + offset_ms.abs() + rtt_ms;
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut before = server_counters(&db.url).await;
    #[cfg(feature = "redis")]
    if let Some(url) = &config.redis {
        before.extend(redis_counters(url).await);
    }
    let run_start_db = apikeys_testing::db_now_ms_on(&probe).await;
    // Workers start together, 2 s from now (they read the keys and connect meanwhile).
    let start_ms = host_ms() + 2_000;
    let warm_end_ms = start_ms + i64::try_from(config.warmup.as_millis()).unwrap();
    let end_ms = warm_end_ms + i64::try_from(config.duration.as_millis()).unwrap();
    let spec = Spec {
        url: db.url.clone(),
        keys_file: keys_file.display().to_string(),
        tasks: config.tasks,
        zipf: config.zipf,
        seed: config.seed,
        start_ms,
        warm_end_ms,
        end_ms,
        margin_ms,
        config: config.clone(),
    };
    let (mut outs, mut failures) = (Vec::new(), Vec::new());
    for (i, h) in spawn_workers(&spec, config.processes).into_iter().enumerate() {
        let (ok, stdout) = tokio::task::spawn_blocking(move || h.join().unwrap()).await.unwrap();
        let line = stdout.lines().find_map(|l| l.strip_prefix("workload-worker "));
        match (ok, line) {
            (true, Some(line)) => outs.push(WorkerOut { v: serde_json::from_str(line).unwrap() }),
            _ => failures.push(format!("worker {i} failed (exit ok: {ok})")),
        }
    }
    let run_end_db = apikeys_testing::db_now_ms_on(&probe).await;
    probe.close().await.ok();
    // Sessions that ended have flushed their statistics; give the server a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut after = server_counters(&db.url).await;
    #[cfg(feature = "redis")]
    if let Some(url) = &config.redis {
        after.extend(redis_counters(url).await);
    }
    let server =
        after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect();
    let windows = run_end_db.div_euclid(WINDOW_MS) - run_start_db.div_euclid(WINDOW_MS) + 1;
    Load { outs, failures, offset_ms, rtt_ms, margin_ms, windows, server }
}

/// The workers' reports added up.
struct Merged {
    all: Histogram<u64>,
    active: Histogram<u64>,
    idle: Histogram<u64>,
    /// Outcomes (ok, Quota, UsageExhausted, other): measured phase, whole run.
    measured: [u64; 4],
    total: [u64; 4],
    other: Vec<String>,
    /// Statements by phase (warm-up, measured, after), failed ones, and the measured ones by
    /// kind.
    statements: [u64; 3],
    failed_statements: [u64; 3],
    kinds: BTreeMap<String, u64>,
    /// Per key, whole run: admitted (Ok), Ok, refused by the limit.
    admitted: Vec<u64>,
    ok: Vec<u64>,
    refused: Vec<u64>,
    /// Per (window, key): admitted checks that ran well inside the window.
    inside: HashMap<(i64, usize), u64>,
    /// Sum of the processes' checks per second in the measured phase.
    per_second: f64,
    caches: Vec<String>,
}

impl Merged {
    fn new(outs: &[WorkerOut], n: usize) -> Merged {
        let mut m = Merged {
            all: histogram(),
            active: histogram(),
            idle: histogram(),
            measured: [0; 4],
            total: [0; 4],
            other: Vec::new(),
            statements: [0; 3],
            failed_statements: [0; 3],
            kinds: BTreeMap::new(),
            admitted: vec![0; n],
            ok: vec![0; n],
            refused: vec![0; n],
            inside: HashMap::new(),
            per_second: 0.0,
            caches: Vec::new(),
        };
        for o in outs {
            o.add_hist("all", &mut m.all);
            o.add_hist("active", &mut m.active);
            o.add_hist("idle", &mut m.idle);
            let add = |into: &mut [u64], field: &str| {
                into.iter_mut().zip(o.u64s(field)).for_each(|(a, b)| *a += b);
            };
            add(&mut m.measured, "measured");
            add(&mut m.total, "total");
            add(&mut m.statements, "statements");
            add(&mut m.failed_statements, "failed_statements");
            for (k, c) in o.v["kinds"].as_object().unwrap() {
                *m.kinds.entry(k.clone()).or_default() += c.as_u64().unwrap();
            }
            for (field, into) in
                [("admitted", &mut m.admitted), ("ok", &mut m.ok), ("refused", &mut m.refused)]
            {
                for (rank, c) in WorkerOut::pairs(&o.v[field]) {
                    into[rank] += c;
                }
            }
            for w in o.v["inside"].as_array().unwrap() {
                let window = w[0].as_i64().unwrap();
                for (rank, c) in WorkerOut::pairs(&w[1]) {
                    *m.inside.entry((window, rank)).or_default() += c;
                }
            }
            let checks: u64 = o.u64s("measured").iter().sum();
            let secs = o.v["measured_s"].as_f64().unwrap();
            if secs > 0.0 {
                m.per_second += checks as f64 / secs;
            }
            m.other.extend(o.v["other"].as_array().unwrap().iter().map(|e| e.to_string()));
            m.caches.push(o.v["cache"].as_str().unwrap_or_default().to_owned());
        }
        m
    }
}

/// Admitted against the limits and passed against the balances: the largest ratios, and
/// every violation.
struct Limits {
    /// (ratio, key) of the largest admitted / (limit × windows touched) over the run.
    max_run: (f64, usize),
    /// (ratio, key) of the largest admitted / limit within one window.
    max_window: (f64, usize),
    max_credits: f64,
    keys_refused: usize,
    keys_at_limit: usize,
    credit_keys_spent: usize,
    violations: Vec<String>,
}

impl Limits {
    fn check(m: &Merged, config: &Config, windows: i64) -> Limits {
        let limit = u64::from(config.limit);
        let run_cap = limit * u64::try_from(windows).unwrap();
        let mut l = Limits {
            max_run: (0.0, 0),
            max_window: (0.0, 0),
            max_credits: 0.0,
            keys_refused: m.refused.iter().filter(|c| **c > 0).count(),
            keys_at_limit: m.admitted.iter().filter(|a| **a >= limit).count(),
            credit_keys_spent: 0,
            violations: Vec::new(),
        };
        for (rank, &a) in m.admitted.iter().enumerate() {
            let r = a as f64 / run_cap as f64;
            if r > l.max_run.0 {
                l.max_run = (r, rank);
            }
            if a > run_cap {
                l.violations
                    .push(format!("key #{rank}: {a} admitted > {limit} × {windows} windows"));
            }
        }
        for (&(window, rank), &c) in &m.inside {
            let r = c as f64 / limit as f64;
            if r > l.max_window.0 {
                l.max_window = (r, rank);
            }
            if c > limit {
                l.violations
                    .push(format!("key #{rank}: {c} admitted in window {window} > {limit}"));
            }
        }
        for rank in (0..m.ok.len()).filter(|r| Config::has_credits(*r)) {
            let passed = m.ok[rank];
            l.max_credits = l.max_credits.max(passed as f64 / config.credits as f64);
            if passed >= config.credits {
                l.credit_keys_spent += 1;
            }
            if passed > config.credits {
                l.violations
                    .push(format!("key #{rank}: {passed} passed > {} credits", config.credits));
            }
        }
        l
    }
}

/// Runs the workload on one backend's fresh database; returns the failures found.
async fn run_backend(db: &BenchDb, config: &Config) -> Vec<String> {
    let backend = db.backend.name();
    println!(
        "\n== workload on {backend}: {} keys, {} processes × {} tasks, Zipf s = {}, {:?} \
         warm-up + {:?} measured ==",
        config.keys, config.processes, config.tasks, config.zipf, config.warmup, config.duration
    );
    let setup = setup(db, config).await;
    println!(
        "setup (not measured): {} keys created in {:.1?} ({:.0} keys/s)",
        config.keys,
        setup.took,
        config.keys as f64 / setup.took.as_secs_f64()
    );
    let run = load(db, config, &setup).await;
    let mut failures: Vec<String> =
        run.failures.iter().map(|f| format!("{backend}: {f}")).collect();
    if run.outs.len() != config.processes {
        return failures;
    }
    for o in &run.outs {
        let late = o.v["late_ms"].as_i64().unwrap();
        if late > 0 {
            println!("note: process {} was ready {late} ms after the start", o.v["process"]);
        }
    }
    let m = Merged::new(&run.outs, config.keys);
    let limits = Limits::check(&m, config, run.windows);
    failures.extend(limits.violations.iter().take(20).map(|e| format!("{backend}: {e}")));
    if m.total[3] > 0 {
        failures.push(format!("{backend}: {} checks ended in an unexpected error", m.total[3]));
        failures.extend(m.other.iter().take(5).map(|e| format!("{backend}:   {e}")));
    }
    let (floor_ns, hit_ns) = floor_and_hit(db, config, &setup).await;
    let overhead_ns = bench_overhead_ns(config);
    report(db.backend, config, &setup, &run, &m, &limits, (floor_ns, hit_ns, overhead_ns));
    failures
}

/// Prints one backend's table and its `workload-json` line.
fn report(
    backend: Backend,
    config: &Config,
    setup: &Setup,
    run: &Load,
    m: &Merged,
    limits: &Limits,
    (floor_ns, hit_ns, overhead_ns): (f64, f64, f64),
) {
    let name = backend.name();
    let checks_measured: u64 = m.measured.iter().sum();
    let checks_total: u64 = m.total.iter().sum();
    let per_1000 = |s: u64| {
        if checks_measured == 0 { 0.0 } else { s as f64 * 1000.0 / checks_measured as f64 }
    };
    let judged = !config.quick && !cfg!(debug_assertions);
    let verdict = |ok: bool| match (judged, ok) {
        (false, _) => "no verdict: quick or debug run",
        (true, true) => "ok",
        (true, false) => "MISSED",
    };
    let q = |h: &Histogram<u64>, p: f64| us(h.value_at_quantile(p));
    let active_share = m.active.len() as f64 / m.all.len().max(1) as f64;
    println!("| {name} | |");
    println!("|---|---|");
    println!(
        "| checks/s, both processes | {} (target ≥ 500 000: {}) |",
        thousands(m.per_second),
        verdict(m.per_second >= 500_000.0)
    );
    for (label, h) in [
        ("every check", &m.all),
        ("key active in the last second", &m.active),
        ("key idle for a second or more", &m.idle),
    ] {
        println!(
            "| p50 / p99 / p99.9, {label} | {:.2} / {:.2} / {:.2} µs (max {:.0} µs, {} checks) |",
            q(h, 0.5),
            q(h, 0.99),
            q(h, 0.999),
            us(h.max()),
            thousands(h.len() as f64)
        );
    }
    println!(
        "| p99, active keys ({:.1} % of checks) | {:.2} µs (target ≤ 10 µs: {}) |",
        active_share * 100.0,
        q(&m.active, 0.99),
        verdict(q(&m.active, 0.99) <= 10.0)
    );
    let [ok, quota, exhausted, other] = m.measured;
    println!(
        "| outcomes, measured: ok / Quota / UsageExhausted / other | {ok} / {quota} / {exhausted} / {other} |"
    );
    if config.by_url {
        println!("| statements per 1 000 checks, measured (client) | not counted: --by-url |");
    } else {
        println!(
            "| statements per 1 000 checks, measured (client, metric callback) | {:.2} (target ≤ 5: {}) |",
            per_1000(m.statements[1]),
            verdict(per_1000(m.statements[1]) <= 5.0)
        );
        for (k, c) in &m.kinds {
            println!("|   {k} | {:.2} per 1 000 ({c}) |", per_1000(*c));
        }
        let [warmup, measured, after] = m.statements;
        println!(
            "| statements: warm-up / measured / shutdown (failed) | {warmup} / {measured} / {after} ({}) |",
            m.failed_statements.iter().sum::<u64>()
        );
    }
    let per_check = |x: i64| x as f64 * 1000.0 / checks_total.max(1) as f64;
    match backend {
        Backend::Postgres => println!(
            "| server: transactions per 1 000 checks, whole worker run (pg_stat_database) | {:.2} ({} for {checks_total} checks) |",
            per_check(run.server["transactions"]),
            run.server["transactions"]
        ),
        Backend::MySql => println!(
            "| server: Questions per 1 000 checks, whole worker run (global: any other client counts too) | {:.2} ({} for {checks_total} checks) |",
            per_check(run.server["Questions"]),
            run.server["Questions"]
        ),
        Backend::Sqlite => {}
    }
    if let Some(&ms) = run.server.get("cpu_ms") {
        let statements = match backend {
            Backend::Postgres => run.server["transactions"],
            _ => run.server.get("Questions").copied().unwrap_or(0),
        };
        println!(
            "| server CPU, whole worker run: per 1 000 checks; per {} | {:.1} ms; {:.1} µs |",
            if backend == Backend::Postgres { "transaction" } else { "question" },
            per_check(ms),
            ms as f64 * 1000.0 / statements.max(1) as f64
        );
    }
    if let Some(&scripts) = run.server.get("redis_scripts") {
        let cpu = run.server["redis_cpu_ms"];
        println!(
            "| Redis, whole worker run: scripts per 1 000 checks (commands, those inside scripts included); CPU per script | {:.2} ({:.2}); {:.1} µs |",
            per_check(scripts),
            per_check(run.server["redis_commands"]),
            cpu as f64 * 1000.0 / scripts.max(1) as f64
        );
    }
    println!(
        "| admitted / limit, max per key and window (checks ≥ {} ms inside it) | {:.3} (key #{}) |",
        run.margin_ms, limits.max_window.0, limits.max_window.1
    );
    println!(
        "| admitted / (limit × {} windows touched), max per key over the run | {:.3} (key #{}) |",
        run.windows, limits.max_run.0, limits.max_run.1
    );
    println!(
        "| keys refused by their limit / admitted ≥ limit | {} / {} |",
        limits.keys_refused, limits.keys_at_limit
    );
    println!(
        "| credits: max passed / balance; keys that spent theirs | {:.3}; {} |",
        limits.max_credits, limits.credit_keys_spent
    );
    println!(
        "| cache-hit verify_key / its floor (HMAC + map lookup + decide), medians | {hit_ns:.0} ns / {floor_ns:.0} ns = {:.2}× (target ≤ 1.3×: {}) |",
        hit_ns / floor_ns,
        verdict(hit_ns / floor_ns <= 1.3)
    );
    println!(
        "| the bench's own work per check (Zipf draw, clock reads, counters), one thread | {overhead_ns:.0} ns |"
    );
    println!("| setup (not measured) | {:.1?} |", setup.took);
    println!("| db clock − host clock | {} ms (round trip {} ms) |", run.offset_ms, run.rtt_ms);
    for (i, c) in m.caches.iter().enumerate() {
        println!("process {i} cache: {c}");
    }
    for (i, o) in run.outs.iter().enumerate() {
        println!("process {i} warmed {} keys in {:.0} ms", o.v["warmed"], o.v["warm_ms"]);
    }
    if limits.keys_refused == 0 {
        println!("note: no key reached its limit in this run: admitted-vs-limit was not exercised");
    }
    let report = json!({
        "backend": name,
        "keys": config.keys, "processes": config.processes, "tasks": config.tasks,
        "by_url": config.by_url, "zipf": config.zipf,
        "limit_per_minute": config.limit, "credits": config.credits,
        "credits_every": CREDITS_EVERY, "warmup_s": config.warmup.as_secs_f64(),
        "duration_s": config.duration.as_secs_f64(), "quick": config.quick,
        "debug_build": cfg!(debug_assertions),
        "setup_s": setup.took.as_secs_f64(),
        "checks_per_second": m.per_second,
        "checks_measured": checks_measured, "checks_total": checks_total,
        "latency": { "all": quantiles(&m.all), "active": quantiles(&m.active),
                     "idle": quantiles(&m.idle) },
        "active_share": active_share,
        "outcomes_measured": { "ok": ok, "quota": quota, "usage_exhausted": exhausted,
                               "other": other },
        "outcomes_total": { "ok": m.total[0], "quota": m.total[1],
                            "usage_exhausted": m.total[2], "other": m.total[3] },
        "statements": { "warmup": m.statements[0], "measured": m.statements[1],
                        "shutdown": m.statements[2], "failed": m.failed_statements,
                        "per_1000_checks_measured": per_1000(m.statements[1]),
                        "kinds": m.kinds },
        "server_counters_whole_run": run.server,
        "admitted": { "windows_touched": run.windows, "margin_ms": run.margin_ms,
                      "max_ratio_window": limits.max_window.0,
                      "max_ratio_run": limits.max_run.0,
                      "keys_refused": limits.keys_refused,
                      "keys_at_limit": limits.keys_at_limit },
        "credits_max_ratio": limits.max_credits,
        "credit_keys_spent": limits.credit_keys_spent,
        "violations": limits.violations.len(),
        "bench_overhead_ns": overhead_ns,
        "floor_ns": floor_ns, "verify_hit_ns": hit_ns, "hit_over_floor": hit_ns / floor_ns,
        "clock_offset_ms": run.offset_ms,
        "workers_late_ms": run.outs.iter().map(|o| o.v["late_ms"].clone()).collect::<Vec<_>>(),
        "warmed": run.outs.iter().map(|o| json!([o.v["warmed"], o.v["warm_ms"]])).collect::<Vec<_>>(),
    });
    println!("workload-json {report}");
}

#[tokio::main]
async fn main() {
    if let Ok(index) = std::env::var(WORKER_ENV) {
        return worker(index.parse().unwrap()).await;
    }
    let config = Config::from_args();
    let mut failures = Vec::new();
    for &backend in &config.backends {
        let db = BenchDb::create(backend, config.admin_url(backend)).await;
        let db = Arc::new(db);
        let run = {
            let (db, config) = (Arc::clone(&db), config.clone());
            tokio::spawn(async move { run_backend(&db, &config).await })
        };
        match run.await {
            Ok(f) => failures.extend(f),
            Err(e) => failures.push(format!("{}: the run panicked: {e}", backend.name())),
        }
        match Arc::try_unwrap(db) {
            Ok(db) => db.drop_db().await,
            Err(_) => eprintln!("the bench database is still in use; not dropped"),
        }
    }
    if failures.is_empty() {
        println!("\nworkload: ok (no over-admission, no unexpected error)");
    } else {
        println!("\nworkload FAILED:");
        for f in &failures {
            println!("  {f}");
        }
        std::process::exit(1);
    }
}
