//! Failing fast while the database is unreachable.
//!
//! Without this, every call made while the database is down waits for the pool's acquire
//! timeout (5 s by default) before it fails, and a busy service piles up requests that all
//! fail anyway. Instead, the first statement that fails to reach the database opens the
//! breaker: from then on every statement fails at once with [`Error::Unavailable`], while
//! one background probe tries to reach the database every back-off period
//! ([`ClientBuilder::reconnect_interval`](crate::ClientBuilder::reconnect_interval)). The
//! probe's first success (or any statement that was already under way and succeeds) closes
//! it again.
//!
//! Only failures to *reach* the database open it: a refused or lost connection, a server
//! shutting down. A pool that gives no connection within the acquire timeout may mean the
//! database is down or only that every connection is busy (a burst, a host transaction held
//! open, a pool sized too small), so the breaker first tries a connection of its own, outside
//! the pool: it opens only if that fails too. A statement the database did not answer within
//! the client's deadline (see [`Db`]) is judged the same way. A statement that runs past its
//! time limit or waits for a lock does not open it either: the database is up then. The probe
//! that closes it again also connects on its own, never through the pool.
//!
//! [`Error::Unavailable`]: apikeys_core::Error::Unavailable

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult,
    QueryResult, RuntimeErr, Statement, TransactionOptions, TransactionTrait,
};

use crate::error::{is_connection_failure, is_pool_exhausted};

/// The message of the error a statement fails with while the breaker is open.
pub(crate) const FAIL_FAST: &str = "the database was unreachable at the last attempt; failing fast until a background probe reconnects";

/// The breaker one client's connections share.
pub(crate) struct Breaker {
    open: AtomicBool,
    probing: AtomicBool,
    /// Set while a caller checks whether an exhausted pool means an unreachable database.
    checking: AtomicBool,
    interval: Duration,
    /// How long a connection of the breaker's own may take to open and answer.
    patience: Duration,
    runtime: tokio::runtime::Handle,
    /// What it guards, for its log lines: "database", "Redis".
    what: &'static str,
}

/// What a breaker guards: something it can try to reach on a connection of its own.
pub(crate) trait Reach: Clone + Send + Sync + 'static {
    /// Whether it answers on a new connection of the breaker's own within `patience`; the
    /// error says why not.
    fn reach(&self, patience: Duration) -> impl Future<Output = Result<(), String>> + Send;
}

impl Reach for DatabaseConnection {
    fn reach(&self, patience: Duration) -> impl Future<Output = Result<(), String>> + Send {
        reach(self, patience)
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("interval", &self.interval)
            .field("guards", &self.what)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker of the database that probes every `interval`, giving each of its
    /// own connections `patience` to open and answer.
    pub(crate) fn new(
        interval: Duration,
        patience: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Self::guarding("database", interval, patience, runtime)
    }

    /// A closed breaker of `what` (named in its log lines), as [`new`](Self::new).
    pub(crate) fn guarding(
        what: &'static str,
        interval: Duration,
        patience: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            checking: AtomicBool::new(false),
            interval,
            patience,
            runtime,
            what,
        })
    }

    /// After the pool gave no connection in time, or a statement no answer within the
    /// client's deadline: opens the breaker only if a connection of its own cannot reach
    /// the database either (a database that is merely busy or slow keeps it closed). One
    /// caller checks at a time; the others go on (their own calls have failed with
    /// `Unavailable` already).
    pub(crate) async fn check_exhausted<R: Reach>(
        self: &Arc<Self>,
        target: &R,
        error: &(dyn fmt::Display + Sync),
    ) {
        if self.is_open() || self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared however this ends: the caller's request may be dropped while it waits.
        let _checking = ClearOnDrop(&self.checking);
        match target.reach(self.patience).await {
            Ok(()) => tracing::debug!(
                error = %error,
                "no answer in time, but the {} answers a connection of its own: busy, not down",
                self.what
            ),
            Err(e) => {
                tracing::debug!(error = %e, "no answer in time, and no connection of its own either");
                self.trip(target, error);
            }
        }
    }

    /// Opens the breaker (if it was closed) and makes sure a probe runs.
    pub(crate) fn trip<R: Reach>(self: &Arc<Self>, target: &R, error: &(dyn fmt::Display + Sync)) {
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = %error,
                retry_every = ?self.interval,
                "{} unreachable; calls fail at once until it is reachable again",
                self.what
            );
        }
        if !self.probing.swap(true, Ordering::AcqRel) {
            self.runtime.spawn(probe(Arc::clone(self), target.clone()));
        }
    }

    /// Closes the breaker: what it guards answered.
    pub(crate) fn close(&self) {
        // A load first: the common case (closed) writes nothing to the shared flag.
        if self.open.load(Ordering::Acquire) && self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("{} reachable again", self.what);
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Whether the database answers on a new connection of its own (not one of the pool's,
/// which may all be busy or broken), opened, pinged and closed within `patience`. A server
/// that answers with a refusal (PostgreSQL's "too many connections", MySQL's 1040, an
/// authentication failure) is up: only an I/O or TLS failure, no answer in time, or a server
/// shutting down (57P01-57P03, 08S01) count as unreachable.
async fn reach(conn: &DatabaseConnection, patience: Duration) -> Result<(), String> {
    let attempt = async {
        match conn.get_database_backend() {
            #[cfg(feature = "postgres")]
            DbBackend::Postgres => connect_own(conn.get_postgres_connection_pool()).await,
            #[cfg(feature = "mysql")]
            DbBackend::MySql => connect_own(conn.get_mysql_connection_pool()).await,
            #[cfg(feature = "sqlite")]
            DbBackend::Sqlite => connect_own(conn.get_sqlite_connection_pool()).await,
            #[allow(unreachable_patterns)] // a backend not compiled in is refused at build()
            _ => Ok(()),
        }
    };
    match tokio::time::timeout(patience, attempt).await {
        Ok(Ok(())) => Ok(()),
        // The server answered, if only to refuse (too many connections, a bad password): it
        // is up. Only a server shutting down counts as unreachable among its answers.
        Ok(Err(sea_orm::sqlx::Error::Database(e)))
            if !e
                .code()
                .is_some_and(|c| matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "08S01")) =>
        {
            tracing::debug!(error = %e, "the database refused a connection of the breaker's own, but answered");
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {patience:?}")),
    }
}

/// Opens a connection with `pool`'s settings but outside it, pings it and closes it.
#[allow(dead_code)] // unused only when no backend feature is on
async fn connect_own<DB: sea_orm::sqlx::Database>(
    pool: &sea_orm::sqlx::Pool<DB>,
) -> Result<(), sea_orm::sqlx::Error> {
    use sea_orm::sqlx::{ConnectOptions, Connection};
    let mut own = pool.connect_options().connect().await?;
    own.ping().await?;
    own.close().await
}

/// Tries `target` every interval while the breaker is open; closes it on success.
async fn probe<R: Reach>(breaker: Arc<Breaker>, target: R) {
    loop {
        while breaker.is_open() {
            tokio::time::sleep(breaker.interval).await;
            if !breaker.is_open() {
                break;
            }
            match target.reach(breaker.patience).await {
                Ok(()) => breaker.close(),
                Err(e) => tracing::debug!(error = %e, "{} probe failed", breaker.what),
            }
        }
        breaker.probing.store(false, Ordering::Release);
        // A trip between the loop's last check and the line above found a probe running and
        // started none: carry on as that probe.
        if !breaker.is_open() || breaker.probing.swap(true, Ordering::AcqRel) {
            return;
        }
    }
}

/// The message of the error a statement (or transaction) fails with when the database gave
/// no answer within the client's deadline.
pub(crate) const NO_ANSWER: &str = "no answer from the database within the client's deadline (acquire timeout + statement timeout + 1 s, per statement): the network to it may be partitioned";

/// The error of a statement the database did not answer in time.
fn no_answer() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(NO_ANSWER.to_owned()))
}

/// Whether `e` is a statement (or transaction) the database did not answer in time.
pub(crate) fn is_no_answer(e: &DbErr) -> bool {
    matches!(e, DbErr::Conn(RuntimeErr::Internal(m)) if m == NO_ANSWER)
}

/// The error of a statement refused by the open breaker.
fn fail_fast() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(FAIL_FAST.to_owned()))
}

/// Whether `e` is a statement refused by the open breaker.
pub(crate) fn is_fail_fast(e: &DbErr) -> bool {
    matches!(e, DbErr::Conn(RuntimeErr::Internal(m)) if m == FAIL_FAST)
}

/// A pool behind the client's breaker: every statement is refused at once while it is open,
/// and every statement's outcome tells it whether the database is reachable.
///
/// On PostgreSQL and MySQL, when the client opened the pool from a URL, a statement also has
/// a deadline on the client's side: a statement still unanswered after the acquire timeout,
/// plus the statement timeout, plus a second, most likely went into a network that lost it
/// (a partition, a black-holed connection) and would otherwise wait for TCP to give up,
/// hours later. It fails with [`Error::Unavailable`](apikeys_core::Error::Unavailable); the
/// breaker opens if a connection of its own cannot reach the database either (a database
/// that is only slow keeps it closed). A whole transaction of the client's own gets the
/// acquire timeout, eight statement timeouts and a second. SQLite has no network to lose, and
/// a pool the host passes in ([`ClientBuilder::connection`](crate::ClientBuilder::connection))
/// keeps the host's own timeouts: neither gets a deadline.
#[derive(Clone)]
pub(crate) struct Db {
    conn: DatabaseConnection,
    breaker: Arc<Breaker>,
    /// The deadline of one statement, and of one transaction (`None`: SQLite).
    deadline: Option<(Duration, Duration)>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

impl Db {
    pub(crate) fn new(conn: DatabaseConnection, breaker: Arc<Breaker>) -> Self {
        Self { conn, breaker, deadline: None }
    }

    /// Gives statements and transactions their deadline on a server (see [`Db`]), from the
    /// acquire timeout and the statement timeout of the pool the client opened.
    pub(crate) fn with_deadlines(mut self, acquire: Duration, statement: Duration) -> Self {
        if self.conn.get_database_backend() != DbBackend::Sqlite {
            let slack = Duration::from_secs(1);
            self.deadline = Some((acquire + statement + slack, acquire + statement * 8 + slack));
        }
        self
    }

    /// Runs a whole transaction, `op`, within the transaction deadline: past it, it fails
    /// with `to_error` of the no-answer error and the breaker opens.
    pub(crate) async fn bounded<T, E>(
        &self,
        op: impl Future<Output = Result<T, E>>,
        to_error: impl FnOnce(DbErr) -> E,
    ) -> Result<T, E> {
        let Some((_, deadline)) = self.deadline else { return op.await };
        match tokio::time::timeout(deadline, op).await {
            Ok(result) => result,
            Err(_) => {
                let e = no_answer();
                self.breaker.check_exhausted(&self.conn, &e).await;
                Err(to_error(e))
            }
        }
    }

    /// The pool itself.
    pub(crate) fn raw(&self) -> &DatabaseConnection {
        &self.conn
    }

    fn gate(&self) -> Result<(), DbErr> {
        if self.breaker.is_open() { Err(fail_fast()) } else { Ok(()) }
    }

    async fn observe<T>(&self, result: &Result<T, DbErr>) {
        match result {
            Ok(_) => self.breaker.close(),
            Err(e) if is_connection_failure(e) => self.breaker.trip(&self.conn, e),
            Err(e) if is_pool_exhausted(e) || is_no_answer(e) => {
                self.breaker.check_exhausted(&self.conn, e).await;
            }
            Err(_) => {}
        }
    }

    async fn guarded<T>(&self, op: impl Future<Output = Result<T, DbErr>>) -> Result<T, DbErr> {
        self.gate()?;
        let result = match self.deadline {
            None => op.await,
            Some((deadline, _)) => {
                tokio::time::timeout(deadline, op).await.unwrap_or_else(|_| Err(no_answer()))
            }
        };
        self.observe(&result).await;
        result
    }

    /// Begins a transaction on the pool, through the breaker.
    pub(crate) async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> Result<DatabaseTransaction, DbErr> {
        self.guarded(self.conn.begin_with_options(options)).await
    }
}

// sea-orm's own re-export of async_trait, which its trait is written with.
#[sea_orm::prelude::async_trait::async_trait]
impl ConnectionTrait for Db {
    fn get_database_backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.guarded(self.conn.execute_raw(stmt)).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.guarded(self.conn.execute_unprepared(sql)).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.guarded(self.conn.query_one_raw(stmt)).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.guarded(self.conn.query_all_raw(stmt)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sea_orm::error::ConnAcquireErr;

    /// A breaker probing every 10 ms, with 5 s for a connection of its own.
    #[cfg(feature = "sqlite")]
    fn test_breaker() -> Arc<Breaker> {
        Breaker::new(
            Duration::from_millis(10),
            Duration::from_secs(5),
            tokio::runtime::Handle::current(),
        )
    }

    #[test]
    fn only_failures_to_reach_the_database_open_it() {
        use crate::error::is_unreachable;
        // Unavailable, but checked on a connection of the breaker's own before it opens.
        assert!(is_pool_exhausted(&DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)));
        assert!(!is_connection_failure(&DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)));
        assert!(is_unreachable(&DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)));
        assert!(is_connection_failure(&DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)));
        let io = sea_orm::sqlx::Error::Io(std::io::Error::other("connection refused"));
        assert!(is_connection_failure(&DbErr::Conn(RuntimeErr::SqlxError(Arc::new(io)))));
        assert!(!is_unreachable(&DbErr::RecordNotFound("x".into())));
        assert!(!is_unreachable(&DbErr::Custom("x".into())));
        // The breaker's own refusal is Unavailable, and does not count as a new failure.
        assert!(!is_unreachable(&fail_fast()));
        assert!(is_fail_fast(&fail_fast()));
        assert!(crate::error::is_unavailable(&fail_fast()));
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn an_exhausted_pool_of_a_reachable_database_keeps_it_closed() {
        let conn = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let breaker = test_breaker();
        let db = Db::new(conn.clone(), Arc::clone(&breaker));
        let exhausted: Result<(), DbErr> = Err(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout));
        db.observe(&exhausted).await;
        assert!(!breaker.is_open(), "a busy pool of a database that answers opened the breaker");
        db.execute_unprepared("SELECT 1").await.unwrap();
    }

    /// The caller checking an exhausted pool may be dropped mid-check (a request timeout, a
    /// client gone): the next exhausted pool is still checked.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_dropped_check_lets_the_next_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());
        let conn = sea_orm::Database::connect(&url).await.unwrap();
        let breaker = test_breaker();
        let error = DbErr::ConnectionAcquire(ConnAcquireErr::Timeout);
        {
            let check = breaker.check_exhausted(&conn, &error);
            let mut check = std::pin::pin!(check);
            let waker = std::task::Waker::noop();
            let _ = check.as_mut().poll(&mut std::task::Context::from_waker(waker));
        }
        assert!(!breaker.checking.load(Ordering::Acquire), "a dropped check left the flag set");
    }

    /// A server that answers a connection of the breaker's own with a refusal (here a wrong
    /// password; in production, too many connections) is up; one that does not answer is not.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_server_that_refuses_a_connection_is_up() {
        let url = std::env::var("APIKEYS_TEST_POSTGRES_URL")
            .expect("APIKEYS_TEST_POSTGRES_URL (scripts/test-all sets it)");
        let wrong = url.replacen("apikeys:apikeys@", "apikeys:not-the-password@", 1);
        assert_ne!(wrong, url);
        let lazy = |u: &str| {
            let mut options = sea_orm::ConnectOptions::new(u);
            options.connect_lazy(true);
            options
        };
        let refused = sea_orm::Database::connect(lazy(&wrong)).await.unwrap();
        assert_eq!(reach(&refused, Duration::from_secs(5)).await, Ok(()));
        let nobody =
            sea_orm::Database::connect(lazy("postgres://u:p@127.0.0.1:1/none")).await.unwrap();
        assert!(reach(&nobody, Duration::from_secs(5)).await.is_err());
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn open_refuses_at_once_and_a_probe_closes_it() {
        let conn = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let breaker = test_breaker();
        let db = Db::new(conn.clone(), Arc::clone(&breaker));
        db.execute_unprepared("SELECT 1").await.unwrap();
        breaker.trip(&conn, &DbErr::ConnectionAcquire(ConnAcquireErr::Timeout));
        let refused = db.execute_unprepared("SELECT 1").await.unwrap_err();
        assert!(is_fail_fast(&refused));
        // The database is there: the probe closes the breaker within a few intervals.
        for _ in 0..500 {
            if !breaker.is_open() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        db.execute_unprepared("SELECT 1").await.unwrap();
    }
}
