//! Batched usage tracking: successful checks are counted in memory and written to the database
//! in one statement per flush interval, instead of one `UPDATE` per check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use apikeys_core::Result;
use chrono::NaiveDateTime;
use sea_orm::sea_query::{CaseStatement, Expr, ExprTrait};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::client::{ApiKeyClient, Inner};
use crate::entity::api_key;
use crate::error::storage;

/// Keys per `UPDATE` statement (each key adds a few bound parameters).
const CHUNK: usize = 500;

/// Uses of one key not yet written.
#[derive(Debug, Clone, Copy)]
struct Pending {
    count: u64,
    last_used: NaiveDateTime,
}

/// The counts waiting for the next flush.
#[derive(Debug, Default)]
pub(crate) struct UsageBatch {
    pending: Mutex<HashMap<Uuid, Pending>>,
}

impl UsageBatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
        // A panic while holding the lock leaves counts, never a broken map: keep going.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one use of `key` at `at`.
    pub(crate) fn record(&self, key: Uuid, at: NaiveDateTime) {
        merge(&mut self.lock(), key, Pending { count: 1, last_used: at });
    }

    /// Puts counts that could not be written back, merged with any recorded meanwhile.
    fn restore(&self, batch: impl IntoIterator<Item = (Uuid, Pending)>) {
        let mut pending = self.lock();
        for (key, p) in batch {
            merge(&mut pending, key, p);
        }
    }

    /// Writes every pending count: one `UPDATE … SET use_count = use_count + CASE id …` per
    /// 500 keys. On failure nothing pending is lost: the unwritten counts go back into the
    /// batch for the next flush. Returns the number of keys written.
    pub(crate) async fn flush(&self, db: &DatabaseConnection) -> Result<usize> {
        let batch: Vec<(Uuid, Pending)> = self.lock().drain().collect();
        let mut written = 0;
        for (i, chunk) in batch.chunks(CHUNK).enumerate() {
            if let Err(e) = update(db, chunk).await {
                self.restore(batch[i * CHUNK..].iter().copied());
                return Err(storage(e));
            }
            written += chunk.len();
        }
        Ok(written)
    }
}

fn merge(pending: &mut HashMap<Uuid, Pending>, key: Uuid, add: Pending) {
    let entry = pending.entry(key).or_insert(Pending { count: 0, last_used: add.last_used });
    entry.count += add.count;
    entry.last_used = Ord::max(entry.last_used, add.last_used);
}

async fn update(db: &DatabaseConnection, chunk: &[(Uuid, Pending)]) -> Result<(), sea_orm::DbErr> {
    use api_key::Column::{Id, LastUsedAt, UseCount};
    let mut count = CaseStatement::new();
    let mut last = CaseStatement::new();
    for (id, p) in chunk {
        let n = i64::try_from(p.count).unwrap_or(i64::MAX);
        count = count.case(Id.eq(*id), Expr::col(UseCount).add(n));
        last = last.case(Id.eq(*id), Expr::value(p.last_used));
    }
    api_key::Entity::update_many()
        .col_expr(UseCount, count.finally(Expr::col(UseCount)).into())
        .col_expr(LastUsedAt, last.finally(Expr::col(LastUsedAt)).into())
        .filter(Id.is_in(chunk.iter().map(|(id, _)| *id)))
        .exec(db)
        .await?;
    Ok(())
}

/// Flushes `inner`'s batch every `interval` until the last client is dropped.
pub(crate) fn spawn_flusher(inner: Weak<Inner>, interval: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if let Some(batch) = &inner.usage
                && let Err(e) = batch.flush(&inner.db).await
            {
                tracing::warn!(error = %e, "usage flush failed; the counts are kept for the next one");
            }
        }
    });
}

/// When the last client goes away: one last flush in the background, if a runtime is there.
pub(crate) fn flush_on_drop(batch: &Arc<UsageBatch>, db: &DatabaseConnection) {
    if batch.lock().is_empty() {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    let (batch, db) = (batch.clone(), db.clone());
    handle.spawn(async move {
        if let Err(e) = batch.flush(&db).await {
            tracing::warn!(error = %e, "final usage flush failed; those counts are lost");
        }
    });
}

impl ApiKeyClient {
    /// Writes the use counts that batched usage tracking
    /// ([`ClientBuilder::usage_flush_interval`](crate::ClientBuilder::usage_flush_interval))
    /// holds in memory. Call it on graceful shutdown; the client also flushes on every interval
    /// and, best effort, when its last clone is dropped inside a tokio runtime. Returns the
    /// number of keys written (0 without batching).
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable) or
    /// [`Error::Storage`](crate::Error::Storage); the counts are then kept for the next flush.
    pub async fn flush_usage(&self) -> Result<usize> {
        match &self.inner.usage {
            Some(batch) => batch.flush(&self.inner.db).await,
            None => Ok(0),
        }
    }
}
