//! One budget per lineage: a roll hands the old key's windows to the new one, the delete of
//! a lineage's newest key hands them to the newest key left.

use apikeys_core::{KeyId, RateLimits, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement, Value,
};

use super::named_counter;
use super::store::in_table;
use crate::entity::api_key;
use crate::error::storage;

/// Adds the counts of `from`'s rate-limit windows to `to`'s (creating `to`'s rows as
/// needed), on `conn`, for its main limit and each of the named `limits`: a roll hands the
/// old key's windows to the new one, and the delete of a lineage's newest key hands them to
/// the newest key left. `from`'s rows stay (a check that read the key before the change
/// still counts in them).
pub(crate) async fn merge_windows<C: ConnectionTrait>(
    conn: &C,
    from: KeyId,
    to: KeyId,
    limits: &RateLimits,
) -> Result<()> {
    merge_counter(conn, from, to, false).await?;
    for (name, limit) in limits.iter() {
        let (from, to) =
            (named_counter(from, name, limit.window), named_counter(to, name, limit.window));
        merge_counter(conn, from, to, true).await?;
    }
    Ok(())
}

/// [`merge_windows`] of one counter, in the main limits' table or the named limits'.
async fn merge_counter<C: ConnectionTrait>(
    conn: &C,
    from: KeyId,
    to: KeyId,
    named: bool,
) -> Result<()> {
    let backend = conn.get_database_backend();
    let (to, from) = (Value::from(to.as_uuid()), Value::from(from.as_uuid()));
    let sql = match backend {
        DbBackend::Postgres => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT $1, window_start, count, expires_at FROM rate_limit_windows \
             WHERE key_id = $2 ON CONFLICT (key_id, window_start) \
             DO UPDATE SET count = rate_limit_windows.count + excluded.count"
        }
        DbBackend::MySql => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT ?, w.window_start, w.count, w.expires_at FROM rate_limit_windows w \
             WHERE w.key_id = ? \
             ON DUPLICATE KEY UPDATE count = rate_limit_windows.count + VALUES(count)"
        }
        _ => {
            "INSERT INTO rate_limit_windows (key_id, window_start, count, expires_at) \
             SELECT ?, window_start, count, expires_at FROM rate_limit_windows \
             WHERE key_id = ? ON CONFLICT (key_id, window_start) \
             DO UPDATE SET count = rate_limit_windows.count + excluded.count"
        }
    };
    conn.execute_raw(Statement::from_sql_and_values(backend, in_table(sql, named), [to, from]))
        .await
        .map_err(storage)?;
    Ok(())
}

/// Before `id` is deleted: if it is the newest key of a lineage whose rolled keys are still
/// around, the newest of those becomes the lineage's newest key, and gets `id`'s rate-limit
/// window counts (so the keys left keep sharing one budget, from where it was). Returns that
/// key.
pub(crate) async fn hand_over_lineage<C: ConnectionTrait>(
    conn: &C,
    id: KeyId,
    limits: &RateLimits,
) -> Result<Option<KeyId>> {
    use api_key::Column as Col;
    let newest: Option<uuid::Uuid> = api_key::Entity::find()
        .select_only()
        .column(Col::Id)
        .filter(Col::LineageHeadId.eq(id.as_uuid()))
        .filter(Col::Id.ne(id.as_uuid()))
        .order_by_desc(Col::Id)
        .limit(1)
        .into_tuple()
        .one(conn)
        .await
        .map_err(storage)?;
    let Some(newest) = newest else {
        return Ok(None);
    };
    merge_windows(conn, id, KeyId::from_uuid(newest), limits).await?;
    api_key::Entity::update_many()
        .col_expr(Col::LineageHeadId, Expr::value(newest))
        .filter(Col::LineageHeadId.eq(id.as_uuid()))
        .exec(conn)
        .await
        .map_err(storage)?;
    Ok(Some(KeyId::from_uuid(newest)))
}
