//! The change feed (`key_changes`): written in the same transaction as every change a cached
//! key could go stale on, read by every client's verified-key cache (see
//! [`cache`](crate::cache)).
//!
//! Sequence numbers come from the one row of `key_changes_head`, which a writer increments in
//! its transaction. The row's lock makes writers take turns from then until they commit or
//! roll back, so the numbers are gapless (a rolled-back increment is given out again) and
//! become visible in order: a reader that sees number `n` has seen every number below it.
//! A writer takes that lock *first* in its transaction, before any row of its own: it then
//! waits for it holding nothing else (a key's row stays free for the checks that count its
//! usage), and writers of the feed never wait for each other in a cycle. A change made in a
//! transaction the host owns holds it until the host commits (see
//! [`InTransaction`](crate::InTransaction)).
//!
//! A reader checks every row it reads: each must be numbered one more than the one before,
//! and the row it applied last must still carry the random `token` it had. Old rows are purged
//! as a prefix only (see [`purge`]), so a reader that fell behind the purge sees its next
//! row missing; a feed whose numbers were given out again (a point-in-time restore, a failover
//! to a replica that lost commits, the tables created afresh) shows up as a head below the
//! reader's position or as a different token on the reader's last row. Either way the reader
//! empties its cache and starts again at the head.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apikeys_core::{Error, KeyId, ProductId, ProjectId, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement,
};

use crate::breaker::Db;
use crate::clock::Clock;
use crate::convert::naive;
use crate::entity::key_change;
use crate::error::{corrupt, storage};

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
/// each other in a cycle, and one waiting for it holds no key's row meanwhile. Returns the
/// change's sequence number.
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
    // Random, so that a number given out twice (after a restore) is told apart.
    let token = Some(uuid::Uuid::new_v4().as_u64_pair().0.cast_signed());
    let row = key_change::Model { seq, key_id, project_id, product_id, created_at: now, token };
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

/// Up to `limit` feed rows from number `seq` on (that row included), in order: one read of
/// the primary key's range.
pub(crate) async fn from<C: ConnectionTrait>(
    conn: &C,
    seq: i64,
    limit: u64,
) -> Result<Vec<key_change::Model>, DbErr> {
    key_change::Entity::find()
        .filter(key_change::Column::Seq.gte(seq))
        .order_by_asc(key_change::Column::Seq)
        .limit(limit)
        .all(conn)
        .await
}

/// The token of row `seq`: `None` when there is no such row, `Some(None)` for a row written
/// before rows had tokens.
pub(crate) async fn token_at<C: ConnectionTrait>(
    conn: &C,
    seq: i64,
) -> Result<Option<Option<i64>>, DbErr> {
    let row = key_change::Entity::find_by_id(seq).one(conn).await?;
    Ok(row.map(|r| r.token))
}

/// Deletes the feed rows written before `before` (by their writers' clocks) as a prefix: every
/// row numbered below the one before the first row written at or after `before`, and never
/// the newest row (which tells a reader whether it missed rows). A row stamped early by a writer whose clock
/// is behind is therefore kept as long as any row before it is, and the feed never gets a
/// hole in the middle: a reader that had not read a purged row sees that its next row is
/// missing. Returns the number deleted.
pub(crate) async fn purge<C: ConnectionTrait>(conn: &C, before: NaiveDateTime) -> Result<u64> {
    let first_kept = key_change::Entity::find()
        .select_only()
        .column_as(key_change::Column::Seq.min(), "seq")
        .filter(key_change::Column::CreatedAt.gte(before))
        .into_tuple::<Option<i64>>()
        .one(conn)
        .await
        .map_err(storage)?
        .flatten();
    let newest = head(conn).await.map_err(storage)?;
    // The row before the first one kept stays too: after a quiet spell longer than the
    // retention it is the row every reader that was up to date sits on, and a reader that
    // finds its row gone starts afresh.
    let cutoff = first_kept.map_or(newest, |seq| (seq - 1).min(newest));
    let res = key_change::Entity::delete_many()
        .filter(key_change::Column::Seq.lt(cutoff))
        .exec(conn)
        .await
        .map_err(storage)?;
    Ok(res.rows_affected)
}

/// Every this many changes a client makes, it deletes old change-feed rows in the background.
const PURGE_EVERY: u64 = 256;

/// Who hears of the changes the feed records in this process: the client's cache.
pub(crate) trait ChangeListener: Send + Sync {
    /// `change` was made (its transaction has ended): drop what it may have made stale.
    fn changed(&self, change: Change);
    /// `change`, numbered `seq`, was recorded in a transaction the host owns: drop what it
    /// may have made stale now, and do not serve it again until the feed shows `seq`.
    fn changed_pending(&self, change: Change, seq: i64);
}

/// The change feed as a part of the client: records changes in a transaction, tells the
/// client's own cache once they have ended (or, for a transaction the host owns, at once and
/// until the poller has seen them), and purges old rows. Its own connection handle (the
/// writer) and clock.
pub(crate) struct ChangeFeed {
    writer: Db,
    clock: Clock,
    listener: Option<Arc<dyn ChangeListener>>,
    /// How long rows are kept (the cache's setting, or an hour).
    retention: Duration,
    /// Changes recorded so far (every [`PURGE_EVERY`] it purges in the background).
    changes: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// Tells other clients through Redis that a change has ended.
    #[cfg(feature = "redis")]
    notices: Option<crate::cache::notices::Notices>,
}

impl ChangeFeed {
    pub(crate) fn new(
        writer: Db,
        clock: Clock,
        listener: Option<Arc<dyn ChangeListener>>,
        retention: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            writer,
            clock,
            listener,
            retention,
            changes: AtomicU64::new(0),
            runtime,
            #[cfg(feature = "redis")]
            notices: None,
        }
    }

    /// Announces each change of the client's own, once it has ended, through `notices`.
    #[cfg(feature = "redis")]
    pub(crate) fn with_notices(mut self, notices: Option<crate::cache::notices::Notices>) -> Self {
        self.notices = notices;
        self
    }

    /// Appends `change` on `txn` (see [`record`]), stamped by the client's clock; returns its
    /// number.
    pub(crate) async fn record<C: ConnectionTrait>(&self, txn: &C, change: Change) -> Result<i64> {
        record(txn, change, naive(crate::clock::now(&self.clock))).await
    }

    /// After a transaction of the client's own that recorded `change` has ended (committed
    /// or not): the client's cache forgets what it touched, and other clients are told
    /// through Redis when notices are on.
    pub(crate) fn after_commit(self: &Arc<Self>, change: Change) {
        if let Some(listener) = &self.listener {
            listener.changed(change);
        }
        #[cfg(feature = "redis")]
        if let Some(notices) = &self.notices {
            notices.announce();
        }
        self.count();
    }

    /// After `change`, numbered `seq`, was recorded in a transaction the host owns: the
    /// cache forgets what it touched now, and does not serve it until the poller has seen
    /// `seq`.
    pub(crate) fn pending(self: &Arc<Self>, change: Change, seq: i64) {
        if let Some(listener) = &self.listener {
            listener.changed_pending(change, seq);
        }
        self.count();
    }

    /// Counts a recorded change; every [`PURGE_EVERY`] changes, purges in the background.
    fn count(self: &Arc<Self>) {
        let n = self.changes.fetch_add(1, Ordering::Relaxed);
        if n % PURGE_EVERY == PURGE_EVERY - 1 {
            let feed = Arc::clone(self);
            self.runtime.spawn(async move {
                if let Err(e) = feed.purge().await {
                    tracing::warn!(error = %e, "purging old change-feed rows failed");
                }
            });
        }
    }

    /// Deletes the rows older than the retention by the client's clock (see [`purge`]).
    pub(crate) async fn purge(&self) -> Result<u64> {
        let retention = chrono::Duration::from_std(self.retention)
            .map_err(|_| Error::configuration("feed retention out of range"))?;
        let now = crate::clock::now(&self.clock);
        let before = now.checked_sub_signed(retention).unwrap_or(DateTime::<Utc>::MIN_UTC);
        purge(&self.writer, naive(before)).await
    }
}
