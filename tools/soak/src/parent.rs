//! The parent: sets the database up, starts the proxy, the replicas and the admin, runs the
//! fault schedule, stops everything, then checks the invariants from the record.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use apikeys_db::sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use apikeys_db::{ApiKeyClient, Credits, Error, KeyId, NewKey, RateLimit};
use apikeys_soak::check::{self, KeyEnd, KeySetup, Setup, Verdict};
use apikeys_soak::events::{Event, now_us};
use apikeys_testing::proxy::{Accepted, Chaos, Mode, Proxy};
use apikeys_testing::{Backend, TestDb};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, RngExt, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::spec::{DIR_ENV, KEYS_FILE, ROLE_ENV, Record, SETUP_FILE, SPEC_ENV, Spec};

const REPLICAS: u32 = 3;
/// Each replica's clock offset: one behind, one on time, one ahead, by up to 30 s.
const MAX_SKEW_MS: i64 = 30_000;
const STALENESS_MS: i64 = 1_000;
const RECONNECT_MS: i64 = 500;
/// One back-off (the reconnect interval), plus a check's own time on a loaded 2-core
/// machine running debug builds.
const RECOVERY_BOUND_MS: i64 = RECONNECT_MS + 1_500;
/// The longest a check may take: past the client's transaction deadline (2 s acquire + 8 ×
/// 2 s statement + 1 s) plus a statement's (2 + 2 + 1 s), with room for a loaded machine.
const HANG_BOUND_MS: i64 = 30_000;
/// A quiet phase: long enough past the recovery bound to tell a late failure apart.
const QUIET: Duration = Duration::from_secs(5);

/// The soak's arguments.
#[derive(Debug, Clone)]
pub struct Args {
    pub seconds: u64,
    pub backend: Backend,
    pub seed: u64,
    pub keys: usize,
    /// Checks per second per replica.
    pub rate: f64,
    pub dir: Option<PathBuf>,
}

impl Args {
    /// Parses `--seconds N | --minutes N`, `--backend B`, `--seed S`, `--keys N`,
    /// `--rate N`, `--dir D`.
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args {
            seconds: 600,
            backend: Backend::Sqlite,
            seed: 1,
            keys: 2_000,
            rate: 400.0,
            dir: None,
        };
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            let number =
                |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v}"));
            match flag.as_str() {
                "--seconds" => a.seconds = number(value()?)?,
                "--minutes" => a.seconds = number(value()?)? * 60,
                "--seed" => a.seed = number(value()?)?,
                "--keys" => a.keys = usize::try_from(number(value()?)?).unwrap_or(usize::MAX),
                "--rate" => a.rate = number(value()?)? as f64,
                "--dir" => a.dir = Some(PathBuf::from(value()?)),
                "--backend" => {
                    a.backend = match value()?.as_str() {
                        "sqlite" => Backend::Sqlite,
                        "postgres" => Backend::Postgres,
                        "mysql" | "mariadb" => Backend::MySql,
                        other => {
                            return Err(format!(
                                "--backend: sqlite, postgres or mysql, not {other}"
                            ));
                        }
                    }
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if a.seconds < 30 || a.keys < 100 || a.rate < 1.0 {
            return Err("at least 30 seconds, 100 keys and 1 check a second".into());
        }
        Ok(a)
    }
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
        Backend::MySql => "mysql",
    }
}

/// The server to run on, and the command that stops (`{}` = `stop`) and starts it.
fn server(backend: Backend) -> Result<(String, String), String> {
    let name = match backend {
        Backend::Postgres => "POSTGRES",
        Backend::MySql => "MYSQL",
        Backend::Sqlite => return Err("SQLite has no server".into()),
    };
    let var = |kind: &str| {
        std::env::var(format!("APIKEYS_SOAK_{name}_{kind}"))
            .or_else(|_| std::env::var(format!("APIKEYS_OUTAGE_{name}_{kind}")))
            .map_err(|_| {
                format!(
                    "APIKEYS_SOAK_{name}_{kind} (or APIKEYS_OUTAGE_{name}_{kind}) is unset: \
                     run through scripts/soak, which starts a server the soak may restart"
                )
            })
    };
    Ok((var("URL")?, var("CTL")?))
}

pub async fn run(args: Args) -> ExitCode {
    match soak(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the parent runs.
struct Run {
    args: Args,
    dir: PathBuf,
    db: TestDb,
    ctl: Option<String>,
    proxy: Option<Proxy>,
    /// The URL replicas use (through the proxy on the servers).
    replica_url: String,
    secrets: Vec<(u32, String)>,
    offsets_ms: Vec<i64>,
    admin_offset_ms: i64,
    record: Record,
    rng: Xoshiro256PlusPlus,
}

fn random_secret(rng: &mut impl Rng, version: u32) -> String {
    let body: String = (0..40)
        .map(|_| {
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    [rng.random_range(0..62)],
            )
        })
        .collect();
    format!("soak-secret-v{version}-{body}")
}

async fn soak(args: Args) -> Result<bool, String> {
    let name = backend_name(args.backend);
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            PathBuf::from(format!("target/soak/{name}-seed{}-{}", args.seed, now_us() / 1_000_000))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    println!(
        "== soak on {name}: {} s, seed {}, {} keys, record in {}",
        args.seconds,
        args.seed,
        args.keys,
        dir.display()
    );
    let (db, ctl) = match args.backend {
        Backend::Sqlite => (TestDb::new(Backend::Sqlite, "soak").await, None),
        b => {
            let (url, ctl) = server(b)?;
            (TestDb::on_server(b, url, "soak").await, Some(ctl))
        }
    };
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(args.seed);
    let secrets = vec![(1, random_secret(&mut rng, 1))];
    let offsets_ms: Vec<i64> = (0..REPLICAS)
        .map(|r| match r {
            0 => -rng.random_range(MAX_SKEW_MS / 2..=MAX_SKEW_MS),
            1 => rng.random_range(-1_000..=1_000),
            _ => rng.random_range(MAX_SKEW_MS / 2..=MAX_SKEW_MS),
        })
        .collect();
    let admin_offset_ms = -rng.random_range(5_000..=MAX_SKEW_MS);
    let record = Record::append(&dir.join("parent.jsonl")).map_err(|e| e.to_string())?;
    let (proxy, replica_url) = match args.backend {
        Backend::Sqlite => (None, db.url.clone()),
        _ => {
            let mut url = url::Url::parse(&db.url).map_err(|e| e.to_string())?;
            let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
            let port = url.port().unwrap_or(5432);
            let upstream = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| e.to_string())?
                .next()
                .ok_or("no address for the database host")?;
            let proxy = Proxy::start(upstream, Mode::Pass, Chaos::default(), args.seed)
                .await
                .map_err(|e| e.to_string())?;
            let _ = url.set_host(Some("127.0.0.1"));
            let _ = url.set_port(Some(proxy.addr().port()));
            (Some(proxy), url.to_string())
        }
    };
    let mut run = Run {
        args,
        dir,
        db,
        ctl,
        proxy,
        replica_url,
        secrets,
        offsets_ms,
        admin_offset_ms,
        record,
        rng,
    };
    let setup = run.set_up().await?;
    let passed = run.soak(&setup).await;
    run.db.clone().cleanup().await;
    passed
}

impl Run {
    fn admin_client(&self) -> apikeys_db::ClientBuilder {
        self.spec(REPLICAS, 0, self.db.url.clone(), self.admin_offset_ms).builder()
    }

    fn spec(&self, r: u32, generation: u32, url: String, offset_ms: i64) -> Spec {
        Spec {
            r,
            generation,
            url,
            dir: self.dir.clone(),
            seed: self.args.seed,
            offset_ms,
            secrets: self.secrets.clone(),
            tasks: 4,
            rate: if r == REPLICAS { 4.0 } else { self.args.rate },
            staleness_ms: STALENESS_MS,
            reconnect_ms: RECONNECT_MS,
            zipf: 1.1,
        }
    }

    /// Creates the keys: one in four with a per-second limit (5–20), the others per minute
    /// (30–300); one in five with 100–1 000 credits, never refilled.
    async fn set_up(&mut self) -> Result<Setup, String> {
        let client = self.admin_client().build().await.map_err(|e| e.to_string())?;
        client.create_tables().await.map_err(|e| e.to_string())?;
        let (org, _) =
            client.get_or_create_organization("soak").await.map_err(|e| e.to_string())?;
        let mut keys = Vec::with_capacity(self.args.keys);
        let mut plaintexts = String::new();
        for i in 0..self.args.keys {
            let (limit, window_s) = if i % 4 == 3 {
                (self.rng.random_range(5..=20), 1)
            } else {
                (self.rng.random_range(30..=300), 60)
            };
            let rate = if window_s == 1 {
                RateLimit::per_second(limit)
            } else {
                RateLimit::per_minute(limit)
            }
            .map_err(|e| e.to_string())?;
            let credits = (i % 5 == 0).then(|| self.rng.random_range(100..=1_000u64));
            let mut new = NewKey::new(format!("soak-{i}"))
                .with_scopes(["read", "write"])
                .with_rate_limit(rate);
            if let Some(c) = credits {
                new = new.with_credits(Credits::new(c));
            }
            let issued = client.create_key(org.id, new).await.map_err(|e| e.to_string())?;
            plaintexts.push_str(issued.key.expose_secret());
            plaintexts.push('\n');
            keys.push(KeySetup { id: issued.record.id.to_string(), limit, window_s, credits });
        }
        client.shutdown().await.map_err(|e| e.to_string())?;
        std::fs::write(self.dir.join(KEYS_FILE), plaintexts).map_err(|e| e.to_string())?;
        let setup = Setup {
            backend: backend_name(self.args.backend).into(),
            seed: self.args.seed,
            keys,
            offsets_ms: self.offsets_ms.clone(),
            admin_offset_ms: self.admin_offset_ms,
            staleness_ms: STALENESS_MS,
            reconnect_ms: RECONNECT_MS,
            recovery_bound_ms: RECOVERY_BOUND_MS,
            hang_bound_ms: HANG_BOUND_MS,
        };
        let json = serde_json::to_vec_pretty(&setup).map_err(|e| e.to_string())?;
        std::fs::write(self.dir.join(SETUP_FILE), json).map_err(|e| e.to_string())?;
        Ok(setup)
    }

    /// Starts a child and waits for its "ready" line.
    async fn start(&self, role: &str, spec: &Spec) -> Result<Child, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{role}-{}.stderr", spec.r)))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .env(ROLE_ENV, role)
            .env(SPEC_ENV, serde_json::to_string(spec).map_err(|e| e.to_string())?)
            .env(DIR_ENV, &self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => Ok(child),
            other => Err(format!("{role} {} did not start: {other:?}", spec.r)),
        }
    }

    async fn start_replica(&self, r: u32, generation: u32) -> Result<Child, String> {
        let spec = self.spec(r, generation, self.replica_url.clone(), self.offsets_ms[r as usize]);
        self.start("replica", &spec).await
    }

    fn phase(&self, kind: &str, t0: i64) {
        self.record.write(&Event::Phase { kind: kind.into(), t0, t1: now_us() });
        self.record.flush();
    }

    async fn sleep_rand(&mut self, lo_ms: u64, hi_ms: u64) {
        let ms = self.rng.random_range(lo_ms..=hi_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn server_ctl(&self, action: &str) -> Result<(), String> {
        let Some(ctl) = &self.ctl else { return Ok(()) };
        let status = Command::new("sh")
            .arg("-c")
            .arg(ctl.replace("{}", action))
            .stdout(Stdio::null())
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if status.success() { Ok(()) } else { Err(format!("server {action} failed: {status}")) }
    }

    /// A SQLite connection of its own holding the write lock for `hold` (a writer that
    /// keeps a transaction open).
    async fn hold_sqlite_lock(&self, hold: Duration) -> Result<(), String> {
        let mut opts = ConnectOptions::new(self.db.url.clone());
        opts.max_connections(1).min_connections(1).sqlx_logging(false);
        let conn: DatabaseConnection = Database::connect(opts).await.map_err(|e| e.to_string())?;
        conn.execute_unprepared("BEGIN IMMEDIATE").await.map_err(|e| e.to_string())?;
        tokio::time::sleep(hold).await;
        conn.execute_unprepared("COMMIT").await.map_err(|e| e.to_string())?;
        conn.close().await.map_err(|e| e.to_string())
    }

    /// The proxy's per-connection faults, every connection cut every 1–3 s (servers), or
    /// short write-lock holds (SQLite).
    async fn chaos(&mut self, length: Duration) -> Result<(), String> {
        let end = tokio::time::Instant::now() + length;
        if self.proxy.is_some() {
            // Pools keep their connections: each cut makes them open new ones, which get
            // the schedule's faults.
            while tokio::time::Instant::now() < end {
                if let Some(p) = &self.proxy {
                    p.set_mode(Mode::Chaos);
                    p.cut();
                }
                self.sleep_rand(1_000, 3_000).await;
            }
            return Ok(());
        }
        while tokio::time::Instant::now() < end {
            self.sleep_rand(500, 2_000).await;
            let hold = Duration::from_millis(self.rng.random_range(50..=600));
            self.hold_sqlite_lock(hold).await?;
        }
        Ok(())
    }

    /// One global fault, chosen by the seed; returns its kind.
    async fn fault(&mut self) -> Result<&'static str, String> {
        let Some(p) = &self.proxy else {
            let hold = Duration::from_millis(self.rng.random_range(1_000..=3_000));
            self.hold_sqlite_lock(hold).await?;
            return Ok("lock");
        };
        match self.rng.random_range(0..3) {
            0 => {
                self.server_ctl("stop").await?;
                self.sleep_rand(1_000, 3_000).await;
                self.server_ctl("start").await?;
                Ok("restart")
            }
            1 => {
                p.set_mode(Mode::Down);
                p.cut();
                self.sleep_rand(2_000, 4_000).await;
                Ok("down")
            }
            _ => {
                // Longer than a statement's deadline (2 + 2 + 1 s), so that statements in
                // flight reach it.
                p.set_mode(Mode::BlackHole);
                p.freeze();
                self.sleep_rand(6_000, 8_000).await;
                Ok("black_hole")
            }
        }
    }

    /// Every connection cut, then nothing injected for [`QUIET`].
    async fn quiet(&self) {
        let t0 = now_us();
        if let Some(p) = &self.proxy {
            p.set_mode(Mode::Pass);
            p.cut();
        }
        tokio::time::sleep(QUIET).await;
        self.phase("pass", t0);
    }

    async fn soak(&mut self, setup: &Setup) -> Result<bool, String> {
        let mut replicas = Vec::new();
        for r in 0..REPLICAS {
            replicas.push(Some(self.start_replica(r, 0).await?));
        }
        let admin_spec = self.spec(REPLICAS, 0, self.db.url.clone(), self.admin_offset_ms);
        let admin = self.start("admin", &admin_spec).await?;
        let started = tokio::time::Instant::now();
        let length = Duration::from_secs(self.args.seconds);
        let rotate_at = length * 2 / 5;
        let (mut rotated, mut generation) = (false, 0);
        let mut exits = Vec::new();
        self.quiet().await;
        while started.elapsed() + Duration::from_secs(20) < length {
            let t0 = now_us();
            let chaos = Duration::from_millis(self.rng.random_range(6_000..=12_000));
            self.chaos(chaos).await?;
            self.phase("chaos", t0);
            let t0 = now_us();
            if !rotated && started.elapsed() >= rotate_at {
                // A rolling restart onto a new signing secret, the old one kept as previous.
                rotated = true;
                generation += 1;
                let new = random_secret(&mut self.rng, 2);
                self.secrets.insert(0, (2, new));
                if let Some(p) = &self.proxy {
                    p.set_mode(Mode::Pass);
                }
                for r in 0..REPLICAS {
                    if let Some(child) = replicas[r as usize].take() {
                        exits.push((
                            format!("replica {r} generation {}", generation - 1),
                            stop(child).await,
                        ));
                    }
                    replicas[r as usize] = Some(self.start_replica(r, generation).await?);
                }
                self.phase("rotate", t0);
            } else {
                let kind = self.fault().await?;
                self.phase(kind, t0);
            }
            self.quiet().await;
        }
        // The end: quiet, so that shutdown can give back and write what it holds.
        if let Some(p) = &self.proxy {
            p.set_mode(Mode::Pass);
        }
        let t0 = now_us();
        exits.push(("admin".into(), stop(admin).await));
        for (r, child) in replicas.into_iter().enumerate() {
            if let Some(child) = child {
                exits.push((format!("replica {r} generation {generation}"), stop(child).await));
            }
        }
        self.phase("pass", t0);
        let accepted = self.proxy.as_ref().map(Proxy::accepted).unwrap_or_default();
        drop(self.proxy.take());
        self.report(setup, &exits, &accepted).await
    }

    /// The keys' state in the database at the end.
    async fn end_state(&self, setup: &Setup) -> Result<Vec<Option<KeyEnd>>, String> {
        let client: ApiKeyClient = self.admin_client().build().await.map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(setup.keys.len());
        for key in &setup.keys {
            let id: KeyId = key.id.parse().map_err(|_| "bad id")?;
            let record = match client.get_key(id).await {
                Ok(r) => r,
                Err(Error::NotFound { .. }) => {
                    out.push(None);
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let mut head = record.clone();
            while let Some(next) = head.rolled_to {
                head = client.get_key(next).await.map_err(|e| e.to_string())?;
            }
            let remaining = head.credits.map(|c| c.remaining);
            out.push(Some(KeyEnd { use_count: record.use_count, remaining }));
        }
        Ok(out)
    }

    async fn report(
        &self,
        setup: &Setup,
        exits: &[(String, Result<(), String>)],
        accepted: &[Accepted],
    ) -> Result<bool, String> {
        let (events, unreadable) = read_events(&self.dir)?;
        let end = self.end_state(setup).await?;
        let mut verdicts = check::check(setup, &events, &end);
        verdicts.push(self.scan());
        let mut clean = Verdict {
            name: "every process ran to the end and stopped cleanly",
            figure: String::new(),
            breaches: 0,
            examples: Vec::new(),
        };
        for (who, exit) in exits {
            if let Err(e) = exit {
                clean.breaches += 1;
                clean.examples.push(format!("{who}: {e}"));
            }
        }
        for e in &events {
            if let Event::Stopped { r, error: Some(error), .. } = e {
                clean.breaches += 1;
                clean.examples.push(format!("replica {r}: shutdown failed: {error}"));
            }
        }
        if unreadable > 0 {
            clean.breaches += 1;
            clean.examples.push(format!("{unreadable} record lines did not parse"));
        }
        clean.figure = format!("{} processes stopped", exits.len());
        verdicts.push(clean);

        // Operations.
        let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
        let mut changes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut phases: BTreeMap<String, u64> = BTreeMap::new();
        let mut admin_errors = 0u64;
        for e in &events {
            match e {
                Event::Check { o, .. } => *outcomes.entry(format!("{o:?}")).or_default() += 1,
                Event::Admin { change, done, .. } => {
                    let name = serde_json::to_value(change)
                        .ok()
                        .and_then(|v| v.get("change").and_then(|c| c.as_str()).map(str::to_owned))
                        .unwrap_or_default();
                    let entry = changes.entry(name).or_default();
                    entry.0 += 1;
                    entry.1 += u64::from(*done);
                }
                Event::AdminError { .. } => admin_errors += 1,
                Event::Phase { kind, .. } => *phases.entry(kind.clone()).or_default() += 1,
                _ => {}
            }
        }
        let mut connections: BTreeMap<&str, u64> = BTreeMap::new();
        for a in accepted {
            *connections.entry(a.fault.kind()).or_default() += 1;
        }
        let checks: u64 = outcomes.values().sum();
        println!(
            "\n== soak on {}: seed {}, {} keys, {} s",
            setup.backend,
            setup.seed,
            setup.keys.len(),
            self.args.seconds
        );
        println!("clocks: replicas {:?} ms, admin {} ms", setup.offsets_ms, setup.admin_offset_ms);
        println!("checks: {checks} ({})", fmt_map(&outcomes));
        let changes_fmt: Vec<String> =
            changes.iter().map(|(k, (n, done))| format!("{k} {done}/{n}")).collect();
        println!(
            "admin changes (done/tried): {}; retried errors: {admin_errors}",
            changes_fmt.join(", ")
        );
        println!("phases: {}", fmt_map(&phases));
        if !connections.is_empty() {
            let total: u64 = connections.values().sum();
            println!("proxy connections: {total} ({})", fmt_map(&connections));
        }
        println!("\n| invariant | figure | breaches |\n|---|---|---|");
        for v in &verdicts {
            println!("| {} | {} | {} |", v.name, v.figure, v.breaches);
        }
        for v in verdicts.iter().filter(|v| v.breaches > 0) {
            println!("\nBREACHED: {}", v.name);
            for e in &v.examples {
                println!("  {e}");
            }
        }
        let passed = verdicts.iter().all(|v| v.breaches == 0);
        let summary = serde_json::json!({
            "backend": setup.backend, "seed": setup.seed, "seconds": self.args.seconds,
            "checks": outcomes, "changes": changes, "phases": phases,
            "proxy_connections": connections, "verdicts": verdicts, "passed": passed,
        });
        let _ = std::fs::write(self.dir.join("report.json"), summary.to_string());
        println!("soak-json {summary}");
        println!("\nsoak on {}: {}", setup.backend, if passed { "PASSED" } else { "FAILED" });
        Ok(passed)
    }

    /// No key material (a plaintext key, a signing secret) in any file of the run but the
    /// two that hold the keys.
    fn scan(&self) -> Verdict {
        let mut v = Verdict {
            name: "no key material in any log line",
            figure: String::new(),
            breaches: 0,
            examples: Vec::new(),
        };
        let mut secrets: HashSet<String> = HashSet::new();
        let mut words = |text: &str| {
            for w in text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| w.len() >= 16) {
                secrets.insert(w.to_owned());
            }
        };
        for file in [KEYS_FILE, crate::spec::ROLLED_FILE] {
            words(&std::fs::read_to_string(self.dir.join(file)).unwrap_or_default());
        }
        for (_, s) in &self.secrets {
            words(s);
        }
        let (mut files, mut lines) = (0u64, 0u64);
        for path in files_in(&self.dir) {
            if path.extension().is_some_and(|e| e == "secret") {
                continue;
            }
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            files += 1;
            lines += text.lines().count() as u64;
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for hit in check::find_secrets(&name, &text, &secrets) {
                v.breaches += 1;
                if v.examples.len() < 10 {
                    v.examples.push(hit);
                }
            }
        }
        v.figure = format!("{} secrets looked for in {files} files, {lines} lines", secrets.len());
        v
    }
}

fn fmt_map<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    m.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Every event of the run's record files, and the count of lines that did not parse.
fn read_events(dir: &Path) -> Result<(Vec<Event>, u64), String> {
    let mut events = Vec::new();
    let mut bad = 0;
    for path in files_in(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jsonl")) {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        for line in text.lines() {
            match serde_json::from_str(line) {
                Ok(e) => events.push(e),
                Err(_) => bad += 1,
            }
        }
    }
    Ok((events, bad))
}

/// Closes the child's stdin (its signal to stop), and waits for it to exit.
async fn stop(mut child: Child) -> Result<(), String> {
    drop(child.stdin.take());
    match tokio::time::timeout(Duration::from_secs(90), child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("exited with {status}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            Err("did not stop within 90 s".into())
        }
    }
}
