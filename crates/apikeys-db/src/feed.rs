//! The change feed (`key_changes`): written in the same transaction as every change a cached
//! key could go stale on, read by every client's verified-key cache (see
//! [`cache`](crate::cache)).
//!
//! Sequence numbers come from the one row of `key_changes_head`, which a writer increments
//! before anything else it does in its transaction. The row's lock makes writers take turns
//! until they commit or roll back, so the numbers are gapless (a rolled-back increment is
//! given out again) and become visible in order: a reader that sees number `n` has seen
//! every number below it. A reader can therefore tell when rows it never saw were purged:
//! the first row it reads is not the one after its last.

use apikeys_core::{KeyId, ProductId, ProjectId, Result};
use chrono::NaiveDateTime;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement,
};

use crate::entity::key_change;
use crate::error::{corrupt, storage};

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// A key was updated, revoked or deleted.
    Key(KeyId),
    /// A product was linked to or unlinked from a project.
    Link { project: ProjectId, product: ProductId },
}

impl Change {
    /// The change a feed row records (`None`: a row this version does not know).
    pub(crate) fn from_row(row: &key_change::Model) -> Option<Self> {
        match (row.key_id, row.project_id, row.product_id) {
            (Some(key), _, _) => Some(Change::Key(KeyId::from_uuid(key))),
            (None, Some(project), Some(product)) => Some(Change::Link {
                project: ProjectId::from_uuid(project),
                product: ProductId::from_uuid(product),
            }),
            _ => None,
        }
    }
}

/// The next sequence number, taken on `conn` (inside a transaction: the head row stays
/// locked until it ends).
async fn next_seq<C: ConnectionTrait>(conn: &C) -> Result<i64> {
    let backend = conn.get_database_backend();
    let seq = match backend {
        DbBackend::MySql => {
            let sql = "UPDATE key_changes_head SET seq = LAST_INSERT_ID(seq + 1) WHERE id = 1";
            let res = conn.execute_raw(Statement::from_string(backend, sql)).await;
            let res = res.map_err(storage)?;
            (res.rows_affected() == 1).then(|| i64::try_from(res.last_insert_id()).ok()).flatten()
        }
        _ => {
            let sql = "UPDATE key_changes_head SET seq = seq + 1 WHERE id = 1 RETURNING seq";
            let row = conn.query_one_raw(Statement::from_string(backend, sql)).await;
            match row.map_err(storage)? {
                Some(row) => Some(row.try_get::<i64>("", "seq").map_err(storage)?),
                None => None,
            }
        }
    };
    seq.ok_or_else(|| corrupt("key_changes_head", "seq"))
}

/// Appends `change` to the feed on `conn`, which must be inside the transaction that makes
/// the change. Call it before the change's own statements: the head row is then always the
/// first lock the transaction takes among the feed's writers, so two of them never wait for
/// each other in a cycle. Returns the change's sequence number.
pub(crate) async fn record<C: ConnectionTrait>(
    conn: &C,
    change: Change,
    now: NaiveDateTime,
) -> Result<i64> {
    let seq = next_seq(conn).await?;
    let (key_id, project_id, product_id) = match change {
        Change::Key(key) => (Some(key.as_uuid()), None, None),
        Change::Link { project, product } => {
            (None, Some(project.as_uuid()), Some(product.as_uuid()))
        }
    };
    let row = key_change::Model { seq, key_id, project_id, product_id, created_at: now };
    key_change::Entity::insert(sea_orm::IntoActiveModel::into_active_model(row))
        .exec_without_returning(conn)
        .await
        .map_err(storage)?;
    Ok(seq)
}

/// The last sequence number given out.
pub(crate) async fn head<C: ConnectionTrait>(conn: &C) -> Result<i64, DbErr> {
    let backend = conn.get_database_backend();
    let sql = "SELECT seq FROM key_changes_head WHERE id = 1";
    let row = conn.query_one_raw(Statement::from_string(backend, sql)).await?;
    row.ok_or_else(|| DbErr::RecordNotFound("key_changes_head".into()))?.try_get("", "seq")
}

/// Up to `limit` feed rows after `seq`, in order: one read of the primary key's range.
pub(crate) async fn after<C: ConnectionTrait>(
    conn: &C,
    seq: i64,
    limit: u64,
) -> Result<Vec<key_change::Model>, DbErr> {
    key_change::Entity::find()
        .filter(key_change::Column::Seq.gt(seq))
        .order_by_asc(key_change::Column::Seq)
        .limit(limit)
        .all(conn)
        .await
}

/// Deletes feed rows written before `before`, except the newest row (which tells a reader
/// whether it missed rows). Returns the number deleted.
pub(crate) async fn purge<C: ConnectionTrait>(conn: &C, before: NaiveDateTime) -> Result<u64> {
    let backend = conn.get_database_backend();
    let newest = "(SELECT seq FROM key_changes_head WHERE id = 1)";
    let sql = match backend {
        DbBackend::Postgres => {
            format!("DELETE FROM key_changes WHERE created_at < $1 AND seq < {newest}")
        }
        _ => format!("DELETE FROM key_changes WHERE created_at < ? AND seq < {newest}"),
    };
    let stmt = Statement::from_sql_and_values(backend, sql, [before.into()]);
    let res = conn.execute_raw(stmt).await.map_err(storage)?;
    Ok(res.rows_affected())
}
