//! The pieces every idempotent insert shares (organizations, projects and products, and the
//! links between projects and products): insert unless the unique columns are taken, read the
//! row back, and how often to try again when it vanished in between.

use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, EntityTrait, QuerySelect, Select, TryInsertResult,
};

use crate::error::is_unique_violation;

/// How often an idempotent call inserts again when the row it found was deleted before it
/// could read it back.
pub(crate) const VANISHED_RETRIES: usize = 3;

/// How an idempotent write reads back a row by its unique name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// A plain read, for the public `find_*` calls: never waits for another transaction.
    Plain,
    /// The latest committed row, whatever the transaction's snapshot: MySQL's plain reads
    /// under `REPEATABLE READ` (its default) would not see a row another transaction
    /// committed after this one's first read, which a `get_or_create_*` in a host
    /// transaction must find, so there it is a locking read (`LOCK IN SHARE MODE`), which
    /// waits for a transaction still writing that row. PostgreSQL and SQLite need nothing
    /// (the guide, "Bootstrap and host transactions").
    Latest,
}

impl Read {
    pub(crate) fn apply<E: EntityTrait>(self, select: Select<E>, backend: DbBackend) -> Select<E> {
        if self == Read::Latest && backend == DbBackend::MySql {
            select.lock_shared()
        } else {
            select
        }
    }
}

/// Inserts `row` unless its unique columns are taken; returns whether it inserted. One
/// statement that leaves the surrounding transaction usable either way: PostgreSQL aborts a
/// transaction on any error, so there it is `ON CONFLICT DO NOTHING` (its affected-row count
/// is exact); MySQL's is not (an ignored duplicate may count as found), but MySQL and SQLite
/// roll back only the failed statement, so there a duplicate-key error means "taken".
pub(crate) async fn insert_unique<E, C, I>(
    conn: &C,
    row: E::ActiveModel,
    unique: I,
) -> Result<bool, DbErr>
where
    E: EntityTrait,
    C: ConnectionTrait,
    I: IntoIterator<Item = E::Column>,
{
    let insert = E::insert(row);
    if conn.get_database_backend() == DbBackend::Postgres {
        let res = insert.on_conflict_do_nothing_on(unique).exec_without_returning(conn).await?;
        return Ok(matches!(res, TryInsertResult::Inserted(n) if n > 0));
    }
    match insert.exec_without_returning(conn).await {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e),
    }
}
