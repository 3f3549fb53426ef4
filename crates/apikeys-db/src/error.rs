//! Mapping database errors onto the one apikeys [`Error`].

use apikeys_core::{Entity, Error};
use sea_orm::{DbErr, RuntimeErr, SqlErr};

/// A database error as [`Error::Unavailable`] when the database could not be reached, else
/// as [`Error::Storage`]; either way keeping it as the source.
pub(crate) fn storage(e: DbErr) -> Error {
    if is_unavailable(&e) { Error::unavailable(e) } else { Error::storage(e) }
}

/// Connection-level failures: pool timeout, refused or lost connection, and the SQLSTATE
/// classes 08 (connection exception; MySQL reports its shutdown as 08S01) and 57 (operator
/// intervention: PostgreSQL shutting down, starting up, or cancelling).
fn is_unavailable(e: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    let runtime = match e {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(r) | DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return false,
    };
    let RuntimeErr::SqlxError(sqlx) = runtime else { return false };
    match &**sqlx {
        Sqlx::Io(_)
        | Sqlx::Tls(_)
        | Sqlx::PoolTimedOut
        | Sqlx::PoolClosed
        | Sqlx::WorkerCrashed => true,
        Sqlx::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57")),
        _ => false,
    }
}

/// Whether `e` is a unique-constraint violation (on any backend).
pub(crate) fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// A foreign-key violation means a referenced row (organization, project, product) is gone.
pub(crate) fn missing_parent(e: DbErr, parent: Entity) -> Error {
    match e.sql_err() {
        Some(SqlErr::ForeignKeyConstraintViolation(_)) => Error::NotFound { entity: parent },
        _ => storage(e),
    }
}

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
