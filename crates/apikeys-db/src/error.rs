//! Mapping database errors onto the one apikeys [`Error`].

use apikeys_core::{Error, RecordId};
use sea_orm::{DbErr, RuntimeErr, SqlErr};

/// A database error as [`Error::Unavailable`] when the database could not be reached, as
/// [`Error::Conflict`] when it rolled the transaction back for a deadlock or serialization
/// failure, else as [`Error::Storage`]; always keeping it as the source.
pub(crate) fn storage(e: DbErr) -> Error {
    if is_unavailable(&e) {
        Error::unavailable(e)
    } else if is_retryable(&e) {
        Error::conflict(e)
    } else {
        Error::storage(e)
    }
}

/// The sqlx error inside `e`, if there is one.
fn sqlx_error(e: &DbErr) -> Option<&sea_orm::sqlx::Error> {
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(sqlx))
        | DbErr::Exec(RuntimeErr::SqlxError(sqlx))
        | DbErr::Query(RuntimeErr::SqlxError(sqlx)) => Some(sqlx),
        _ => None,
    }
}

/// Whether the database could not be reached, or no pooled connection came within the
/// acquire timeout ([`Error::Unavailable`] either way; see [`is_connection_failure`] and
/// [`is_pool_exhausted`] for what each means to the breaker).
pub(crate) fn is_unreachable(e: &DbErr) -> bool {
    is_connection_failure(e) || is_pool_exhausted(e)
}

/// Whether no pooled connection came within the acquire timeout: the database may be down
/// (no new connection could be opened) or merely busy (every connection in use). The breaker
/// tells the two apart on a connection of its own before it opens.
pub(crate) fn is_pool_exhausted(e: &DbErr) -> bool {
    use sea_orm::error::ConnAcquireErr;
    matches!(e, DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))
        || matches!(sqlx_error(e), Some(sea_orm::sqlx::Error::PoolTimedOut))
}

/// Whether a connection to the database failed (what opens the client's breaker at once): a
/// refused or lost connection, TLS, a closed pool, the SQLSTATE class 08 (connection
/// exception; MySQL reports its shutdown as 08S01) except 08004 (the server rejecting a
/// connection, say for too many: it is up), and PostgreSQL's admin shutdown, crash shutdown
/// and "cannot connect now" (57P01-57P03).
pub(crate) fn is_connection_failure(e: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    if matches!(e, DbErr::ConnectionAcquire(c) if !matches!(c, sea_orm::error::ConnAcquireErr::Timeout))
    {
        return true;
    }
    match sqlx_error(e) {
        // A protocol error is a connection that broke mid-message (cut in the TLS request
        // or a result): the soak found PostgreSQL's reported as a storage error.
        Some(
            Sqlx::Io(_) | Sqlx::Tls(_) | Sqlx::Protocol(_) | Sqlx::PoolClosed | Sqlx::WorkerCrashed,
        ) => true,
        // 08004 is the server rejecting a connection (MySQL's "too many connections"): it is
        // up, and answering.
        Some(Sqlx::Database(db)) => db.code().is_some_and(|c| {
            (c.starts_with("08") && c != "08004")
                || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Whether the database cut a statement short or it waited too long (the database is up):
/// PostgreSQL's class 57 (a statement cancelled past `statement_timeout`), MariaDB's
/// `max_statement_time` (1969), MySQL's `max_execution_time` (3024), a lock wait time-out
/// (1205), and SQLite's busy time-out (`SQLITE_BUSY`, another process held the write lock
/// too long).
pub(crate) fn is_timed_out(e: &DbErr) -> bool {
    let Some(sea_orm::sqlx::Error::Database(db)) = sqlx_error(e) else { return false };
    #[cfg(feature = "mysql")]
    if let Some(my) = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1969 | 3024 | 1205);
    }
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>().is_some() {
        // Primary result code SQLITE_BUSY (5), with any extended code.
        return db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| c & 0xff == 5);
    }
    db.code().is_some_and(|c| c.starts_with("57"))
}

/// [`Error::Unavailable`]'s failures: the database unreachable (or the breaker failing fast
/// because it was), or a statement timed out.
pub(crate) fn is_unavailable(e: &DbErr) -> bool {
    crate::breaker::is_fail_fast(e)
        || crate::breaker::is_no_answer(e)
        || is_unreachable(e)
        || is_timed_out(e)
}

/// A deadlock or serialization failure: the database rolled the statement back and it can
/// simply run again (PostgreSQL 40P01/40001, MySQL 1213/1020 under SQLSTATE 40001).
pub(crate) fn is_retryable(e: &DbErr) -> bool {
    match sqlx_error(e) {
        Some(sea_orm::sqlx::Error::Database(db)) => {
            db.code().is_some_and(|c| c == "40001" || c == "40P01")
        }
        _ => false,
    }
}

/// Runs `op` again (up to five times in all, after 2, 4, 8 and 16 ms) while it fails with a
/// deadlock or serialization failure, which a statement racing another one (a delete
/// cascading while a counter is written, the reservations of several processes as a window
/// begins) can hit on PostgreSQL and MySQL.
pub(crate) async fn retry_conflicts<T, F, Fut>(mut op: F) -> Result<T, DbErr>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbErr>>,
{
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < ATTEMPTS && is_retryable(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(1 << attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether `e` is a unique-constraint violation (on any backend).
pub(crate) fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Whether `e` is a foreign-key violation: a referenced row (organization, project, product,
/// key) is gone.
pub(crate) fn is_missing_parent(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_)))
}

/// A foreign-key violation as [`Error::NotFound`] of `parent`, anything else as [`storage`].
pub(crate) fn missing_parent(e: DbErr, parent: impl Into<RecordId>) -> Error {
    if is_missing_parent(&e) { Error::NotFound { id: parent.into() } } else { storage(e) }
}

/// A row that an idempotent call inserted (or found) was deleted again before it could be
/// read back, every time the call tried.
#[derive(Debug, thiserror::Error)]
#[error("the {0} was deleted concurrently each time it was created")]
pub(crate) struct Vanished(pub(crate) &'static str);

/// A stored row that the current code cannot read back (edited by hand, or a newer schema).
#[derive(Debug, thiserror::Error)]
#[error("stored {table} row has an invalid {column}")]
pub(crate) struct CorruptRow {
    pub(crate) table: &'static str,
    pub(crate) column: &'static str,
}

pub(crate) fn corrupt(table: &'static str, column: &'static str) -> Error {
    Error::storage(CorruptRow { table, column })
}
