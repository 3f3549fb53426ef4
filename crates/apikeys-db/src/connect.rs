//! Opening the pools from a URL: scheme and shape checked first, server-side statement
//! timeouts, one writer connection for a SQLite file, and errors that never carry the URL's
//! password.

use std::fmt;
use std::time::Duration;

use apikeys_core::{Error, Result};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbBackend, DbErr};

use crate::error::{is_timed_out, is_unavailable};

/// The defaults of the connection settings that apply when connecting by URL.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to open the pools when connecting by URL.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) max_connections: Option<u32>,
    pub(crate) connect_timeout: Duration,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) log_statements: bool,
}

/// The kind of database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite { in_memory: bool },
    Postgres,
    MySql,
}

impl Kind {
    fn backend(self) -> DbBackend {
        match self {
            Kind::Sqlite { .. } => DbBackend::Sqlite,
            Kind::Postgres => DbBackend::Postgres,
            Kind::MySql => DbBackend::MySql,
        }
    }
}

/// Refuses a database whose cargo feature this build of apikeys-db does not have.
pub(crate) fn check_compiled_in(backend: DbBackend) -> Result<()> {
    let (feature, enabled) = match backend {
        DbBackend::Sqlite => ("sqlite", cfg!(feature = "sqlite")),
        DbBackend::Postgres => ("postgres", cfg!(feature = "postgres")),
        DbBackend::MySql => ("mysql", cfg!(feature = "mysql")),
        _ => return Err(Error::configuration("unsupported database backend")),
    };
    if enabled {
        Ok(())
    } else {
        Err(Error::configuration(format!(
            "this build of apikeys-db has no {feature} support: enable its `{feature}` cargo feature"
        )))
    }
}

/// A connection failure whose message had the URL or its password in it, with those parts
/// replaced by `[redacted]`. The original error is dropped, since its source chain would
/// still hold them.
#[derive(Debug)]
struct ConnectFailed(String);

impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not connect to the database: {}", self.0)
    }
}

impl std::error::Error for ConnectFailed {}

/// A server that refused or never answered a connection, found by a plain TCP connect after
/// the pool gave up ("pool timed out" says neither where nor why). Names the host and port,
/// never the URL (which may hold a user or password).
#[derive(Debug)]
struct Unreachable {
    server: String,
    cause: std::io::Error,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach the database server at {}: {}", self.server, self.cause)
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// After a connection to `server` (host, port) failed with `e`: the cause a plain TCP
/// connect finds (refused, no route, timed out), else `e`.
async fn explain(e: Error, server: Option<&(String, u16)>, patience: Duration) -> Error {
    let Some((host, port)) = server else { return e };
    if !matches!(e, Error::Unavailable { .. }) {
        return e;
    }
    let probe = tokio::net::TcpStream::connect((host.as_str(), *port));
    let cause = match tokio::time::timeout(patience, probe).await {
        Ok(Ok(_)) => return e,
        Ok(Err(cause)) => cause,
        Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"),
    };
    let server =
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Error::unavailable(Unreachable { server, cause })
}

/// The directory a SQLite file URL's file would be created in, if the URL names a file.
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.split_once(':')?.1;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return None;
    }
    let path = std::path::PathBuf::from(percent_decode(path));
    let dir = path.parent()?;
    Some(if dir.as_os_str().is_empty() { std::path::PathBuf::from(".") } else { dir.to_owned() })
}

/// What must not appear in an error: the URL itself and its password, raw and decoded.
struct Secrets(Vec<String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets([{} redacted])", self.0.len())
    }
}

impl Secrets {
    fn scrub(&self, e: DbErr) -> Error {
        let text = format!("{e} {e:?}");
        if !self.0.iter().any(|s| text.contains(s.as_str())) {
            return crate::error::storage(e);
        }
        let mut message = e.to_string();
        for s in &self.0 {
            message = message.replace(s.as_str(), "[redacted]");
        }
        let failed = ConnectFailed(message);
        if is_unavailable(&e) { Error::unavailable(failed) } else { Error::storage(failed) }
    }
}

/// A URL ready to connect with: the URL without its password (sea-orm logs the URL it is
/// given), the password apart (decoded), and what must never appear in an error.
#[derive(Debug)]
struct Target {
    kind: Kind,
    url: String,
    password: Option<Password>,
    secrets: Secrets,
    /// A server's host and port (the backend's default port when the URL names none).
    server: Option<(String, u16)>,
}

/// A decoded password, redacted in `Debug`.
#[derive(Clone)]
#[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))] // SQLite only
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Checks what can be checked of `url` without connecting, and takes its password out.
fn inspect(url: &str) -> Result<Target> {
    let mut secrets = Secrets(vec![url.to_owned()]);
    let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
    let kind = match scheme.as_deref() {
        Some("sqlite") => {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            Kind::Sqlite { in_memory }
        }
        Some("postgres" | "postgresql") => Kind::Postgres,
        Some("mysql") => Kind::MySql,
        Some("mariadb") => {
            return Err(Error::configuration(
                "unsupported database url scheme `mariadb:`; use `mysql://` for MariaDB",
            ));
        }
        _ => {
            return Err(Error::configuration(
                "database url must start with sqlite:, postgres:, postgresql: or mysql:",
            ));
        }
    };
    check_compiled_in(kind.backend())?;
    if matches!(kind, Kind::Sqlite { .. }) {
        // A SQLite URL is a path (which a URL parser may refuse), and has no password.
        return Ok(Target { kind, url: url.to_owned(), password: None, secrets, server: None });
    }
    let shape = || {
        Error::configuration(
            "database url does not parse (scheme://user:password@host:port/database)",
        )
    };
    let mut parsed = url::Url::parse(url).map_err(|_| shape())?;
    if !parsed.has_host() || parsed.host_str().is_some_and(str::is_empty) {
        return Err(shape());
    }
    let mut password = None;
    if let Some(raw) = parsed.password().filter(|p| !p.is_empty()).map(str::to_owned) {
        let decoded = percent_decode(&raw);
        secrets.0.push(raw);
        secrets.0.push(decoded.clone());
        password = Some(Password(decoded));
        parsed.set_password(None).map_err(|()| shape())?;
    }
    secrets.0.retain(|s| !s.is_empty());
    let default_port = if matches!(kind, Kind::Postgres) { 5432 } else { 3306 };
    let host = parsed.host_str().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    // A Unix socket (`?host=/run/postgresql`, `?socket=…`) is not probed over TCP.
    let socket = parsed.query_pairs().any(|(k, _)| k == "host" || k == "socket");
    let server = (!socket).then(|| (host, parsed.port().unwrap_or(default_port)));
    Ok(Target { kind, url: parsed.into(), password, secrets, server })
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Opens the pools for `url`: (the pool reads use, the pool writes use).
pub(crate) async fn open(
    url: &str,
    settings: &Settings,
) -> Result<(DatabaseConnection, DatabaseConnection)> {
    let Target { kind, url, password, secrets, server } = inspect(url)?;
    if let Kind::Sqlite { in_memory: false } = kind
        && let Some(dir) = sqlite_dir(&url)
        && !dir.is_dir()
    {
        // SQLite's own answer says only "unable to open database file". The path is not
        // repeated: it is part of the URL, which is never repeated whole or in part (a
        // password or token may sit anywhere in it).
        return Err(Error::configuration(
            "the directory of the SQLite database file does not exist (the file is created \
             if missing, its directory is not): create it first",
        ));
    }
    let server = &server;
    let connect = |max: Option<u32>| {
        let mut options = ConnectOptions::new(url.as_str());
        options
            .connect_timeout(settings.connect_timeout)
            .acquire_timeout(settings.acquire_timeout)
            .sqlx_logging(settings.log_statements)
            .sqlx_logging_level(log::LevelFilter::Debug);
        if let Some(n) = max {
            options.max_connections(n);
        }
        let timeout = settings.statement_timeout;
        match kind {
            Kind::Sqlite { in_memory } => sqlite_options(&mut options, in_memory, timeout),
            Kind::Postgres => postgres_options(&mut options, password.clone(), timeout),
            Kind::MySql => mysql_options(&mut options, password.clone(), timeout),
        }
        let secrets = &secrets;
        let patience = settings.connect_timeout;
        async move {
            // Opening a SQLite file sets its journal mode to WAL, which takes the file's
            // lock; while other processes open or migrate the same file at that moment, the
            // open can fail with SQLITE_BUSY before any busy handler is installed. Try again
            // until the connect timeout has passed (servers never answer this way).
            let deadline = std::time::Instant::now() + patience;
            loop {
                match Database::connect(options.clone()).await {
                    Err(e) if is_timed_out(&e) && std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Err(e) => {
                        return Err(explain(secrets.scrub(e), server.as_ref(), patience).await);
                    }
                    Ok(db) => return Ok(db),
                }
            }
        }
    };
    match kind {
        // Every connection to an in-memory database is a database of its own: one only.
        Kind::Sqlite { in_memory: true } => {
            let db = connect(Some(1)).await?;
            Ok((db.clone(), db))
        }
        Kind::Sqlite { in_memory: false } => {
            let readers = connect(Some(settings.max_connections.unwrap_or(8))).await?;
            let writer = connect(Some(1)).await?;
            Ok((readers, writer))
        }
        Kind::Postgres | Kind::MySql => {
            let db = connect(settings.max_connections).await?;
            Ok((db.clone(), db))
        }
    }
}

// Each backend's options. Without its feature a backend's URL is refused by `inspect`, so
// its function is never called; it exists so that `open` reads the same in every build.

/// A SQLite file: foreign keys on, WAL, created if missing, writers wait up to `timeout`.
#[cfg(feature = "sqlite")]
fn sqlite_options(options: &mut ConnectOptions, in_memory: bool, timeout: Duration) {
    use sea_orm::sqlx::sqlite::SqliteJournalMode;
    options.map_sqlx_sqlite_opts(move |o| {
        let o = o.foreign_keys(true).busy_timeout(timeout);
        if in_memory { o } else { o.create_if_missing(true).journal_mode(SqliteJournalMode::Wal) }
    });
}
#[cfg(not(feature = "sqlite"))]
fn sqlite_options(_: &mut ConnectOptions, _: bool, _: Duration) {}

/// PostgreSQL: `statement_timeout`, and the password given to the driver apart from the URL.
#[cfg(feature = "postgres")]
fn postgres_options(options: &mut ConnectOptions, password: Option<Password>, timeout: Duration) {
    options.statement_timeout(timeout);
    if let Some(pw) = password {
        options.map_sqlx_postgres_opts(move |o| o.password(&pw.0));
    }
}
#[cfg(not(feature = "postgres"))]
fn postgres_options(_: &mut ConnectOptions, _: Option<Password>, _: Duration) {}

/// MySQL/MariaDB: the password apart from the URL, and a statement time limit set on every
/// new connection.
#[cfg(feature = "mysql")]
fn mysql_options(options: &mut ConnectOptions, password: Option<Password>, timeout: Duration) {
    if let Some(pw) = password {
        options.map_sqlx_mysql_opts(move |o| o.password(&pw.0));
    }
    options.map_sqlx_mysql_pool_opts(move |pool| {
        pool.after_connect(move |conn, _| {
            Box::pin(async move { mysql_statement_timeout(conn, timeout).await })
        })
    });
}
#[cfg(not(feature = "mysql"))]
fn mysql_options(_: &mut ConnectOptions, _: Option<Password>, _: Duration) {}

/// Sets the session's statement time limit: MariaDB's `max_statement_time` (seconds, every
/// statement), else MySQL's `max_execution_time` (milliseconds, reads only) with
/// `innodb_lock_wait_timeout` (whole seconds) for writes waiting for a row lock.
#[cfg(feature = "mysql")]
async fn mysql_statement_timeout(
    conn: &mut sea_orm::sqlx::MySqlConnection,
    timeout: Duration,
) -> std::result::Result<(), sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Executor;
    let mariadb = format!("SET SESSION max_statement_time = {:.3}", timeout.as_secs_f64());
    if conn.execute(sea_orm::sqlx::AssertSqlSafe(mariadb)).await.is_ok() {
        return Ok(());
    }
    let mysql = format!("SET SESSION max_execution_time = {}", timeout.as_millis());
    conn.execute(sea_orm::sqlx::AssertSqlSafe(mysql)).await?;
    // MySQL's limit covers reads only: bound waits for a row lock (writes) too, in whole
    // seconds (at least one).
    let locks = format!("SET SESSION innodb_lock_wait_timeout = {}", timeout.as_secs().max(1));
    conn.execute(sea_orm::sqlx::AssertSqlSafe(locks)).await.map(|_| ())
}

#[cfg(all(test, feature = "sqlite", feature = "postgres", feature = "mysql"))]
mod tests {
    use super::*;

    #[test]
    fn sqlite_file_directories() {
        let dir = |u: &str| sqlite_dir(u).map(|d| d.display().to_string());
        assert_eq!(dir("sqlite:///tmp/a/x.db?mode=rwc").as_deref(), Some("/tmp/a"));
        assert_eq!(dir("sqlite://x.db").as_deref(), Some("."));
        assert_eq!(dir("sqlite:data/x.db").as_deref(), Some("data"));
        assert_eq!(dir("sqlite:///tmp/with%20space/x.db").as_deref(), Some("/tmp/with space"));
        assert_eq!(dir("sqlite://?mode=rwc"), None);
    }

    #[test]
    fn schemes_and_shapes() {
        let kind = |u: &str| inspect(u).map(|t| t.kind).ok();
        assert_eq!(kind("sqlite::memory:"), Some(Kind::Sqlite { in_memory: true }));
        assert_eq!(kind("sqlite://a.db"), Some(Kind::Sqlite { in_memory: false }));
        assert_eq!(kind("postgresql://u:p@h/db"), Some(Kind::Postgres));
        assert_eq!(kind("MYSQL://u:p@h/db"), Some(Kind::MySql));
        // The password is taken out of the URL handed on.
        let t = inspect("postgres://u:p%40ss@h:5/db?x=1").unwrap();
        assert_eq!(t.url, "postgres://u@h:5/db?x=1");
        assert_eq!(t.password.map(|p| p.0).as_deref(), Some("p@ss"));
        for bad in [
            "mariadb://u:pw@h/db",
            "ftp://u:pw@h/",
            "u:pw@h/db",
            "postgres://u:pw@[::1/db",
            "postgres:u:pw@h/db",
            "mysql://u:pw@/db",
        ] {
            let e = inspect(bad).unwrap_err();
            assert!(matches!(e, Error::Configuration { .. }), "{bad}: {e:?}");
            assert!(!format!("{e} {e:?}").contains("pw"), "{bad}: {e:?}");
        }
        let s = inspect("postgres://u:p%40ss%2Bw@h/db").unwrap().secrets;
        assert!(s.0.contains(&"p%40ss%2Bw".to_owned()) && s.0.contains(&"p@ss+w".to_owned()));
        // Characters that are literal in a password: `&`, `=`, `+`.
        let t = inspect("mysql://u:a&b=c+d@h/db").unwrap();
        assert_eq!(t.password.map(|p| p.0).as_deref(), Some("a&b=c+d"));
    }
}

/// In every build, whatever its features: a URL of a backend that is not compiled in is a
/// configuration error naming the feature to enable.
#[cfg(test)]
mod feature_tests {
    use super::*;

    #[test]
    fn backends_not_compiled_in_are_refused_naming_the_feature() {
        let cases = [
            ("sqlite::memory:", "sqlite", cfg!(feature = "sqlite")),
            ("postgres://u:pw@h/db", "postgres", cfg!(feature = "postgres")),
            ("mysql://u:pw@h/db", "mysql", cfg!(feature = "mysql")),
        ];
        for (url, feature, compiled_in) in cases {
            match inspect(url) {
                Ok(_) => assert!(compiled_in, "{url} accepted without the `{feature}` feature"),
                Err(Error::Configuration { reason }) => {
                    assert!(!compiled_in, "{url} refused with the `{feature}` feature: {reason}");
                    assert!(reason.contains(&format!("`{feature}` cargo feature")), "{reason}");
                }
                Err(e) => panic!("{url}: {e:?}"),
            }
        }
    }
}
