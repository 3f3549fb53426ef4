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
//! Only failures to *reach* the database open it (no connection within the acquire
//! timeout, a refused or lost connection, a server shutting down); a statement that runs
//! past its time limit or waits for a lock does not: the database is up then.
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

use crate::error::is_unreachable;

/// The message of the error a statement fails with while the breaker is open.
pub(crate) const FAIL_FAST: &str = "the database was unreachable at the last attempt; failing fast until a background probe reconnects";

/// The breaker one client's connections share.
pub(crate) struct Breaker {
    open: AtomicBool,
    probing: AtomicBool,
    interval: Duration,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub(crate) fn new(interval: Duration, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            interval,
            runtime,
        })
    }

    /// Opens the breaker (if it was closed) and makes sure a probe runs.
    fn trip(self: &Arc<Self>, conn: &DatabaseConnection, error: &DbErr) {
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = %error,
                retry_every = ?self.interval,
                "database unreachable; calls fail at once until it is reachable again"
            );
        }
        if !self.probing.swap(true, Ordering::AcqRel) {
            self.runtime.spawn(probe(Arc::clone(self), conn.clone()));
        }
    }

    /// Closes the breaker: the database answered.
    fn close(&self) {
        // A load first: the common case (closed) writes nothing to the shared flag.
        if self.open.load(Ordering::Acquire) && self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("database reachable again");
        }
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

/// Tries the database every interval while the breaker is open; closes it on success.
async fn probe(breaker: Arc<Breaker>, conn: DatabaseConnection) {
    loop {
        while breaker.is_open() {
            tokio::time::sleep(breaker.interval).await;
            if !breaker.is_open() {
                break;
            }
            match conn.execute_unprepared("SELECT 1").await {
                Ok(_) => breaker.close(),
                Err(e) => tracing::debug!(error = %e, "database probe failed"),
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
#[derive(Clone)]
pub(crate) struct Db {
    conn: DatabaseConnection,
    breaker: Arc<Breaker>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

impl Db {
    pub(crate) fn new(conn: DatabaseConnection, breaker: Arc<Breaker>) -> Self {
        Self { conn, breaker }
    }

    /// The pool itself.
    pub(crate) fn raw(&self) -> &DatabaseConnection {
        &self.conn
    }

    fn gate(&self) -> Result<(), DbErr> {
        if self.breaker.is_open() { Err(fail_fast()) } else { Ok(()) }
    }

    fn observe<T>(&self, result: &Result<T, DbErr>) {
        match result {
            Ok(_) => self.breaker.close(),
            Err(e) if is_unreachable(e) => self.breaker.trip(&self.conn, e),
            Err(_) => {}
        }
    }

    async fn guarded<T>(&self, op: impl Future<Output = Result<T, DbErr>>) -> Result<T, DbErr> {
        self.gate()?;
        let result = op.await;
        self.observe(&result);
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

    #[test]
    fn only_failures_to_reach_the_database_open_it() {
        assert!(is_unreachable(&DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)));
        assert!(is_unreachable(&DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)));
        let io = sea_orm::sqlx::Error::Io(std::io::Error::other("connection refused"));
        assert!(is_unreachable(&DbErr::Conn(RuntimeErr::SqlxError(Arc::new(io)))));
        assert!(!is_unreachable(&DbErr::RecordNotFound("x".into())));
        assert!(!is_unreachable(&DbErr::Custom("x".into())));
        // The breaker's own refusal is Unavailable, and does not count as a new failure.
        assert!(!is_unreachable(&fail_fast()));
        assert!(is_fail_fast(&fail_fast()));
        assert!(crate::error::is_unavailable(&fail_fast()));
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn open_refuses_at_once_and_a_probe_closes_it() {
        let conn = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let breaker = Breaker::new(Duration::from_millis(10), tokio::runtime::Handle::current());
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
