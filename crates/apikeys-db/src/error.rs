//! Mapping database errors onto the one apikeys [`Error`].

use apikeys_core::{Entity, Error};
use sea_orm::{DbErr, SqlErr};

/// Any database error as [`Error::Storage`], keeping it as the source.
pub(crate) fn storage(e: DbErr) -> Error {
    Error::storage(e)
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
