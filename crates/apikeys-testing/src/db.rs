//! One fresh database per test on each backend, dropped afterwards: by
//! [`TestDb::cleanup`] after a test that passed, by its drop guard after one that panicked.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use apikeys_db::sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use apikeys_db::{ApiKeyClient, ClientBuilder, NewKey, OrgId};

/// The signing secret every test client uses (unless a test sets its own).
pub const SECRET: &str = "test-signing-secret-0123456789-abcdefghijkl";

/// A database the tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: a file in a temporary directory (WAL, several connections).
    Sqlite,
    /// PostgreSQL, at `APIKEYS_TEST_POSTGRES_URL`.
    Postgres,
    /// MySQL or MariaDB, at `APIKEYS_TEST_MYSQL_URL`.
    MySql,
}

impl Backend {
    /// The backends whose flag is set, in the order SQLite, PostgreSQL, MySQL: what
    /// [`compiled_backends!`](crate::compiled_backends) gives from the invoking crate's
    /// cargo features.
    #[must_use]
    pub fn of_features(sqlite: bool, postgres: bool, mysql: bool) -> Vec<Backend> {
        let all =
            [(Backend::Sqlite, sqlite), (Backend::Postgres, postgres), (Backend::MySql, mysql)];
        all.into_iter().filter(|(_, on)| *on).map(|(b, _)| b).collect()
    }

    /// The cargo feature that compiles this backend in.
    #[must_use]
    pub fn feature(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::MySql => "mysql",
        }
    }

    /// The environment variable with the URL of the server the tests may create databases
    /// on (none for SQLite).
    #[must_use]
    pub fn env_var(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some("APIKEYS_TEST_POSTGRES_URL"),
            Backend::MySql => Some("APIKEYS_TEST_MYSQL_URL"),
        }
    }
}

/// A database of its own for one test.
///
/// Clones share the database. It is dropped by [`cleanup`](Self::cleanup), or else when the
/// last clone goes away, also while a panic unwinds: see the crate's docs.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// The backend it is on.
    pub backend: Backend,
    /// URL of this test's database.
    pub url: String,
    /// The Redis that its clients count shared rate limits in (`with_redis`).
    pub redis: Option<String>,
    guard: Arc<DropGuard>,
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

impl TestDb {
    /// A fresh database for the test named `test`.
    ///
    /// # Panics
    /// If the database cannot be created; and if the server URL of a backend other than
    /// SQLite is unset: a backend's tests are compiled only with its cargo feature, so an
    /// unset URL for a compiled-in backend fails the test, nothing is skipped silently.
    pub async fn new(backend: Backend, test: &str) -> Self {
        let name = format!("apikeys_{}_{}", &test[..test.len().min(30)], random_suffix());
        let Some(var) = backend.env_var() else {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("test.db");
            let url = format!("sqlite://{}", path.display());
            let location = DatabaseLocation { backend, name, admin_url: None, path: Some(path) };
            return Self { backend, url, redis: None, guard: DropGuard::new(location, Some(dir)) };
        };
        let Ok(admin_url) = std::env::var(var) else {
            panic!(
                "{var} is unset, but the {backend:?} tests are compiled in (cargo feature \
                 `{}`): set it (scripts/test-all does), or test without that feature",
                backend.feature()
            );
        };
        Self::on_server(backend, admin_url, test).await
    }

    /// A fresh database for `test` on the PostgreSQL or MySQL server of `admin_url` (a user
    /// that may create databases), whatever the environment says.
    ///
    /// # Panics
    /// If the database cannot be created, or `backend` is SQLite.
    pub async fn on_server(backend: Backend, admin_url: String, test: &str) -> Self {
        assert!(backend != Backend::Sqlite, "SQLite has no server");
        let name = format!("apikeys_{}_{}", &test[..test.len().min(30)], random_suffix());
        let admin = Database::connect(&admin_url).await.expect("connect to admin url");
        let sql = match backend {
            Backend::Postgres => format!("CREATE DATABASE \"{name}\""),
            _ => format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        };
        admin.execute_unprepared(&sql).await.expect("create test database");
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        let location = DatabaseLocation { backend, name, admin_url: Some(admin_url), path: None };
        Self { backend, url, redis: None, guard: DropGuard::new(location, None) }
    }

    /// The same database, its clients counting shared rate limits in the Redis (or Valkey)
    /// of `APIKEYS_TEST_REDIS_URL` ([`ClientBuilder::redis`]).
    ///
    /// # Panics
    /// If `APIKEYS_TEST_REDIS_URL` is unset: the Redis tests are compiled in only with the
    /// cargo feature `redis`, and then they need it (scripts/test-all sets it).
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn with_redis(mut self) -> Self {
        let Ok(url) = std::env::var("APIKEYS_TEST_REDIS_URL") else {
            panic!(
                "APIKEYS_TEST_REDIS_URL is unset, but the Redis tests are compiled in (cargo \
                 feature `redis`): set it (scripts/test-all does), or test without that feature"
            );
        };
        self.redis = Some(url);
        self
    }

    /// Where this database is, to ask later (after this `TestDb` is gone) whether it still
    /// exists.
    #[must_use]
    pub fn location(&self) -> DatabaseLocation {
        self.guard.location.clone()
    }

    /// A builder for this database with the test secret.
    pub fn builder(&self) -> ClientBuilder {
        let builder = ApiKeyClient::builder().database_url(&self.url).signing_secret(SECRET);
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return builder.redis(redis);
        }
        builder
    }

    /// A client with the tables created.
    ///
    /// # Panics
    /// If the client cannot be built or the tables created.
    pub async fn client(&self) -> ApiKeyClient {
        self.client_with(|b| b).await
    }

    /// A client with the tables created, and the organization `acme` in it.
    ///
    /// # Panics
    /// If the client cannot be built, the tables created or the organization made.
    pub async fn client_and_org(&self) -> (ApiKeyClient, OrgId) {
        let client = self.client().await;
        let (org, _) = client.get_or_create_organization("acme").await.expect("organization acme");
        (client, org.id)
    }

    /// A client from a customised builder, with the tables created.
    ///
    /// # Panics
    /// If the client cannot be built or the tables created.
    pub async fn client_with(
        &self,
        f: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> ApiKeyClient {
        let client = f(self.builder()).build().await.expect("build client");
        client.create_tables().await.expect("create tables");
        client
    }

    /// Number of rows in `table`.
    ///
    /// # Panics
    /// If the table cannot be counted.
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
    ///
    /// # Panics
    /// If a table cannot be counted.
    pub async fn counts(&self, client: &ApiKeyClient) -> Vec<i64> {
        let mut out = Vec::new();
        for t in [
            "organizations",
            "projects",
            "products",
            "project_products",
            "api_keys",
            "rate_limit_windows",
            "owners",
        ] {
            out.push(self.count(client, t).await);
        }
        out
    }

    /// Drops the database now (a server database; a SQLite file goes with the last clone).
    /// Best effort: a failure to drop is ignored. The drop guard has nothing left to do.
    pub async fn cleanup(self) {
        if !self.guard.dropped.swap(true, Ordering::SeqCst) {
            self.guard.location.drop_database().await;
        }
    }
}

/// Where a test database is: enough to ask whether it still exists, or to drop it.
#[derive(Debug, Clone)]
pub struct DatabaseLocation {
    backend: Backend,
    name: String,
    /// The server URL it was created from (PostgreSQL and MySQL).
    admin_url: Option<String>,
    /// The database file (SQLite).
    path: Option<PathBuf>,
}

impl DatabaseLocation {
    /// Whether the database still exists: its file (SQLite), or a database of its name on
    /// the server.
    ///
    /// # Panics
    /// If the server cannot be asked.
    pub async fn exists(&self) -> bool {
        if let Some(path) = &self.path {
            return path.exists();
        }
        let admin = self.admin().await.expect("connect to admin url");
        let backend = admin.get_database_backend();
        let sql = match self.backend {
            Backend::Postgres => "SELECT COUNT(*) AS n FROM pg_database WHERE datname = $1",
            _ => "SELECT COUNT(*) AS n FROM information_schema.schemata WHERE schema_name = ?",
        };
        let statement = Statement::from_sql_and_values(backend, sql, [self.name.clone().into()]);
        let row = admin.query_one_raw(statement).await.expect("ask the server").expect("a row");
        admin.close().await.ok();
        row.try_get::<i64>("", "n").expect("n") > 0
    }

    async fn admin(&self) -> Option<DatabaseConnection> {
        Database::connect(self.admin_url.as_deref()?).await.ok()
    }

    /// Drops a server database; best effort. Nothing to do for SQLite (the file is in the
    /// temporary directory, which its owner removes).
    async fn drop_database(&self) {
        let Some(admin) = self.admin().await else { return };
        let sql = match self.backend {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS `{}`", self.name),
        };
        let _ = admin.execute_unprepared(&sql).await;
        admin.close().await.ok();
    }
}

/// Drops the database when the last clone of its [`TestDb`] goes away without
/// [`TestDb::cleanup`]: a test that panicked, or one that never called it.
#[derive(Debug)]
struct DropGuard {
    location: DatabaseLocation,
    /// Set by `cleanup`, which dropped the database already.
    dropped: AtomicBool,
    /// The SQLite file's directory, removed when the guard is dropped.
    _dir: Option<tempfile::TempDir>,
}

impl DropGuard {
    fn new(location: DatabaseLocation, dir: Option<tempfile::TempDir>) -> Arc<Self> {
        Arc::new(Self { location, dropped: AtomicBool::new(false), _dir: dir })
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if *self.dropped.get_mut() || self.location.admin_url.is_none() {
            return;
        }
        // Drop runs in sync code, often on a worker of the test's runtime and maybe while a
        // panic unwinds: the statement runs on a thread of its own with a runtime of its own,
        // and this thread waits for it. A failure is ignored (and a panic there stays there).
        let location = self.location.clone();
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build()
            else {
                return;
            };
            runtime.block_on(location.drop_database());
        });
        let _ = dropper.join();
    }
}

/// The plaintext of a new key of `org`.
///
/// # Panics
/// If the key cannot be created.
pub async fn plaintext_key(client: &ApiKeyClient, org: OrgId, new: NewKey) -> String {
    client.create_key(org, new).await.expect("a new key").key.expose_secret().to_owned()
}

/// `key` with its last character changed: a forgery that differs from `key` whatever
/// `key` ends with (replacing it with a fixed character would give `key` back when `key`
/// already ends with that character).
///
/// ```
/// for key in ["sk_live_abcA", "sk_live_abcB", "sk_live_abcx"] {
///     let forged = apikeys_testing::forged(key);
///     assert_ne!(forged, key);
///     assert_eq!(forged.len(), key.len());
///     assert_eq!(forged[..key.len() - 1], key[..key.len() - 1]);
/// }
/// ```
#[must_use]
pub fn forged(key: &str) -> String {
    let mut forged = key.to_owned();
    let last = forged.pop();
    forged.push(if last == Some('A') { 'B' } else { 'A' });
    forged
}
