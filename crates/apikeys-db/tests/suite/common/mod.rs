//! Test context: one fresh database per test on each backend.

use std::sync::{Arc, Mutex};

use apikeys_db::sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use apikeys_db::{ApiKeyClient, ClientBuilder, Window};
use chrono::{DateTime, TimeDelta, Utc};

/// The signing secret every test client uses (unless a test sets its own).
pub const SECRET: &str = "test-signing-secret-0123456789-abcdefghijkl";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    /// The backends this test binary was compiled with (one cargo feature each).
    #[allow(dead_code)] // the multi-process test's and the benchmark's loop
    pub fn compiled_in() -> Vec<Backend> {
        let all = [
            (Backend::Sqlite, cfg!(feature = "sqlite")),
            (Backend::Postgres, cfg!(feature = "postgres")),
            (Backend::MySql, cfg!(feature = "mysql")),
        ];
        all.into_iter().filter(|(_, on)| *on).map(|(b, _)| b).collect()
    }

    /// The cargo feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
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

/// A database of its own for one test.
#[derive(Clone)]
pub struct TestDb {
    pub backend: Backend,
    /// URL of this test's database.
    pub url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<Arc<tempfile::TempDir>>,
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl TestDb {
    /// A fresh database. A backend's tests are compiled only with its cargo feature, so an
    /// unset URL for a compiled-in backend fails the test: nothing is skipped silently.
    pub async fn new(backend: Backend, test: &str) -> Self {
        let name = format!("apikeys_{}_{}", &test[..test.len().min(30)], random_suffix());
        if backend == Backend::Sqlite {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("test.db").display());
            return Self { backend, url, admin_url: None, name, _dir: Some(Arc::new(dir)) };
        }
        let var = backend.env_var();
        let Ok(admin_url) = std::env::var(var) else {
            panic!(
                "{var} is unset, but the {backend:?} tests are compiled in (cargo feature \
                 `{}`): set it (scripts/test-all does), or test without that feature",
                backend.feature()
            );
        };
        let admin = Database::connect(&admin_url).await.expect("connect to admin url");
        let sql = match backend {
            Backend::Postgres => format!("CREATE DATABASE \"{name}\""),
            _ => format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        };
        admin.execute_unprepared(&sql).await.expect("create test database");
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Self { backend, url, admin_url: Some(admin_url), name, _dir: None }
    }

    /// A builder for this database with the test secret.
    pub fn builder(&self) -> ClientBuilder {
        ApiKeyClient::builder().database_url(&self.url).signing_secret(SECRET)
    }

    /// A client with the tables created.
    pub async fn client(&self) -> ApiKeyClient {
        self.client_with(|b| b).await
    }

    /// A client from a customised builder, with the tables created.
    pub async fn client_with(
        &self,
        f: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> ApiKeyClient {
        let client = f(self.builder()).build().await.expect("build client");
        client.create_tables().await.expect("create tables");
        client
    }

    /// Number of rows in `table`.
    pub async fn count(&self, client: &ApiKeyClient, table: &str) -> i64 {
        let db = client.connection();
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get::<i64>("", "n").expect("n")
    }

    /// Row counts of every apikeys table.
    pub async fn counts(&self, client: &ApiKeyClient) -> Vec<i64> {
        let mut out = Vec::new();
        for t in [
            "organizations",
            "projects",
            "products",
            "project_products",
            "api_keys",
            "rate_limit_windows",
        ] {
            out.push(self.count(client, t).await);
        }
        out
    }

    pub async fn cleanup(self) {
        let Some(admin_url) = self.admin_url else { return };
        if let Ok(admin) = Database::connect(&admin_url).await {
            let sql = match self.backend {
                Backend::Postgres => {
                    format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)
                }
                _ => format!("DROP DATABASE IF EXISTS `{}`", self.name),
            };
            let _ = admin.execute_unprepared(&sql).await;
            admin.close().await.ok();
        }
    }
}

/// The database's clock in Unix milliseconds: what shared rate-limit windows are cut by
/// (a SQLite file's clock is the host's).
pub async fn db_now_ms(client: &ApiKeyClient) -> i64 {
    let db = client.connection();
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS n"
        }
        DbBackend::MySql => "SELECT CAST(FLOOR(UNIX_TIMESTAMP(NOW(3)) * 1000) AS SIGNED) AS n",
        _ => return Utc::now().timestamp_millis(),
    };
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// Waits (at most one `window`) until the database's current window has at least `room`
/// left, so a test that must stay in one window does.
pub async fn leave_room(client: &ApiKeyClient, window: Window, room: std::time::Duration) {
    let len = window.seconds() * 1000;
    let now = db_now_ms(client).await;
    let left = len - now.rem_euclid(len);
    let room = i64::try_from(room.as_millis()).unwrap();
    if left < room {
        tokio::time::sleep(std::time::Duration::from_millis((left + 20) as u64)).await;
    }
}

/// Every rate-limit window row: (window_start, count), oldest first.
pub async fn window_rows(client: &ApiKeyClient) -> Vec<(i64, i64)> {
    let db = client.connection();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT window_start, count FROM rate_limit_windows ORDER BY window_start",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (r.try_get::<i64>("", "window_start").unwrap(), r.try_get::<i64>("", "count").unwrap())
        })
        .collect()
}

/// Validates `key` `attempts` times; returns (admitted, rate-limited). Every quota error must
/// carry a `retry_after` within the key's window; any other error fails the test.
pub async fn hammer(
    client: &ApiKeyClient,
    key: &str,
    attempts: usize,
    window: std::time::Duration,
) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..attempts {
        match client.validate_key(key, &apikeys_db::ValidateOptions::new()).await {
            Ok(_) => ok += 1,
            Err(apikeys_db::Error::Quota { retry_after, .. }) => {
                assert!(retry_after > std::time::Duration::ZERO && retry_after <= window);
                limited += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    (ok, limited)
}

/// A clock tests move by hand.
#[derive(Clone)]
pub struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    pub fn at(t: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }
    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t;
    }
    pub fn advance(&self, d: TimeDelta) {
        *self.0.lock().unwrap() += d;
    }
    pub fn as_fn(&self) -> impl Fn() -> DateTime<Utc> + Send + Sync + 'static {
        let c = self.clone();
        move || c.now()
    }
}

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Stamps out one module per backend, each test running the same `async fn(TestDb)` case.
macro_rules! backend_tests {
    ($($module:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $crate::common::stamp!(sqlite, Sqlite, "sqlite", $($module: [$($case),*]),*);
        $crate::common::stamp!(postgres, Postgres, "postgres", $($module: [$($case),*]),*);
        $crate::common::stamp!(mysql, MySql, "mysql", $($module: [$($case),*]),*);
    };
}

macro_rules! stamp {
    ($backend:ident, $variant:ident, $feature:literal, $($module:ident: [$($case:ident),*]),*) => {
        #[cfg(feature = $feature)]
        mod $backend {
            $(
                mod $module {
                    $(
                        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                        async fn $case() {
                            let backend = $crate::common::Backend::$variant;
                            let db = $crate::common::TestDb::new(backend, stringify!($case)).await;
                            $crate::$module::$case(db.clone()).await;
                            db.cleanup().await;
                        }
                    )*
                }
            )*
        }
    };
}

pub(crate) use {backend_tests, stamp};

/// Another connection, holding a lock on every key row (on SQLite: the database's write
/// lock) until the returned transaction ends: what a stuck writer elsewhere looks like.
pub async fn hold_key_rows(
    db: &TestDb,
) -> (apikeys_db::sea_orm::DatabaseConnection, apikeys_db::sea_orm::DatabaseTransaction) {
    use apikeys_db::sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    let other = Database::connect(&db.url).await.unwrap();
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    let txn = other.begin_with_options(options).await.unwrap();
    txn.execute_unprepared("UPDATE api_keys SET name = 'held'").await.unwrap();
    (other, txn)
}

/// Outcomes seen by the hot path while admins act on the same keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub ok: usize,
    pub invalid_key: usize,
    pub revoked: usize,
    /// Anything else: each one is a failure of the race tests.
    pub other: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, r: &apikeys_db::Result<apikeys_db::ApiKey>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(apikeys_db::Error::InvalidKey) => self.invalid_key += 1,
            Err(apikeys_db::Error::Revoked { .. }) => self.revoked += 1,
            Err(e) => self.other.push(format!("{e:?}")),
        }
    }
    pub fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.invalid_key += o.invalid_key;
        self.revoked += o.revoked;
        self.other.extend(o.other);
    }
}

/// One hot-path task: checks `keys` round-robin (tracked and untracked verify, validate
/// with and without the shared rate limit) until `stop` is set.
pub async fn hot_path_until(
    client: ApiKeyClient,
    keys: Arc<Vec<String>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: usize,
) -> Tally {
    use apikeys_db::{ValidateOptions, VerifyOptions};
    let mut tally = Tally::default();
    let mut i = seed;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = &keys[i % keys.len()];
        let r = match i % 4 {
            0 => client.validate_key(key, &ValidateOptions::new()).await,
            1 => client.verify_key(key, &VerifyOptions::new()).await,
            2 => client.validate_key(key, &ValidateOptions::new().track_usage(false)).await,
            _ => client.verify_key(key, &VerifyOptions::new().track_usage(false)).await,
        };
        tally.add(&r);
        i += 1;
    }
    tally
}

/// The admin side of the race tests on the keys `ids` (in order): key i is deleted (i % 3
/// == 0), revoked then deleted (1), or updated and deleted at the same moment (2). Every
/// call must end in its documented outcome; returns the other ones.
pub async fn admin_races(client: &ApiKeyClient, ids: &[apikeys_db::KeyId]) -> Vec<String> {
    use apikeys_db::{Error, KeyUpdate, RateLimit};
    let mut wrong = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        match i % 3 {
            0 => {
                if let Err(e) = client.delete_key(*id).await {
                    wrong.push(format!("delete: {e:?}"));
                }
            }
            1 => {
                let (revoke, delete) = tokio::join!(client.revoke_key(*id), client.delete_key(*id));
                match revoke {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => wrong.push(format!("revoke racing delete: {e:?}")),
                }
                if let Err(e) = delete {
                    wrong.push(format!("delete racing revoke: {e:?}"));
                }
            }
            _ => {
                let update = KeyUpdate::new()
                    .with_name("renamed")
                    .with_rate_limit(Some(RateLimit::per_hour(5_000).unwrap()));
                let (update, delete) =
                    tokio::join!(client.update_key(*id, update), client.delete_key(*id));
                match update {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => wrong.push(format!("update racing delete: {e:?}")),
                }
                if let Err(e) = delete {
                    wrong.push(format!("delete racing update: {e:?}"));
                }
            }
        }
    }
    wrong
}

/// For the test binaries that are their own harness (they spawn copies of themselves as
/// worker processes): runs every case on a fresh database of each compiled-in backend,
/// prints libtest-style lines, and exits with 1 if any case failed (or none ran).
#[allow(clippy::print_stdout, dead_code)] // dead in the suite, which has libtest
pub async fn run_cases<C, F, Fut>(test: &str, cases: &[(&str, C)], run: F)
where
    C: Copy,
    F: Fn(C, TestDb) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut passed, mut failed) = (0, 0);
    for backend in Backend::compiled_in() {
        for (name, case) in cases {
            let db = TestDb::new(backend, test).await;
            let result = tokio::spawn(run(*case, db.clone())).await;
            db.cleanup().await;
            match result {
                Ok(()) => {
                    println!("test {backend:?}::{name} ... ok");
                    passed += 1;
                }
                Err(e) => {
                    println!("test {backend:?}::{name} ... FAILED: {e}");
                    failed += 1;
                }
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
