//! Usage tracking: `use_count` and `last_used_at` of each key, written at once (one atomic
//! `UPDATE` per successful check) or in batches (counted in memory, one statement per 500 keys
//! per flush interval).
//!
//! `last_used_at` only ever moves forward: every write keeps the later of the stored time and
//! its own, so two replicas flushing out of order cannot move it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use apikeys_core::{KeyId, Result};
use chrono::NaiveDateTime;
use sea_orm::sea_query::{CaseStatement, Condition, Expr, ExprTrait};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::breaker::Db;
use crate::entity::api_key;
use crate::error::{retry_conflicts, storage};
use crate::lock::lock;

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
struct Batch {
    pending: Mutex<HashMap<Uuid, Pending>>,
}

impl Batch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
        lock(&self.pending)
    }

    /// Puts counts back (a failed write), merged with any recorded meanwhile.
    fn restore(&self, batch: impl IntoIterator<Item = (Uuid, Pending)>) {
        let mut pending = self.lock();
        for (key, p) in batch {
            merge(&mut pending, key, p);
        }
    }

    /// Writes every pending count. On failure nothing is lost: the unwritten counts go back
    /// into the batch for the next flush. Returns the number of keys written.
    async fn flush(&self, db: &Db) -> Result<usize> {
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

/// `last_used_at` is null or earlier than `at`: the only case in which a write moves it.
fn earlier_than(at: NaiveDateTime) -> Condition {
    use api_key::Column::LastUsedAt;
    Condition::any().add(LastUsedAt.is_null()).add(LastUsedAt.lt(at))
}

/// One statement for a chunk of keys: `use_count + n` and `last_used_at` moved forward only.
async fn update(db: &Db, chunk: &[(Uuid, Pending)]) -> Result<(), sea_orm::DbErr> {
    use api_key::Column::{Id, LastUsedAt, UseCount};
    let mut count = CaseStatement::new();
    let mut last = CaseStatement::new();
    for (id, p) in chunk {
        let n = i64::try_from(p.count).unwrap_or(i64::MAX);
        count = count.case(Id.eq(*id), Expr::col(UseCount).add(n));
        last = last.case(
            Condition::all().add(Id.eq(*id)).add(earlier_than(p.last_used)),
            Expr::value(p.last_used),
        );
    }
    api_key::Entity::update_many()
        .col_expr(UseCount, count.finally(Expr::col(UseCount)).into())
        .col_expr(LastUsedAt, last.finally(Expr::col(LastUsedAt)).into())
        .filter(Id.is_in(chunk.iter().map(|(id, _)| *id)))
        .exec(db)
        .await?;
    Ok(())
}

/// Batched mode: the counts in memory and the task that flushes them.
struct Batched {
    counts: Arc<Batch>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Batched {
    fn stop_flusher(&self) {
        if let Some(task) = lock(&self.flusher).take() {
            task.abort();
        }
    }
}

/// One use of one key, at once: `use_count + 1`, `last_used_at` moved forward only. Simpler
/// than the batch statement's per-key `CASE` on `id`, which a database plans and runs more
/// slowly on the hot path.
async fn record_one(db: &Db, id: Uuid, at: NaiveDateTime) -> Result<(), sea_orm::DbErr> {
    use api_key::Column::{Id, LastUsedAt, UseCount};
    let last =
        CaseStatement::new().case(earlier_than(at), Expr::value(at)).finally(Expr::col(LastUsedAt));
    api_key::Entity::update_many()
        .col_expr(UseCount, Expr::col(UseCount).add(1))
        .col_expr(LastUsedAt, last.into())
        .filter(Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Records successful checks. Owns its connection handle; the client composes it.
pub(crate) struct UsageRecorder {
    db: Db,
    /// Batched mode.
    batch: Option<Batched>,
    /// Set by [`shutdown`](Self::shutdown): from then on every use is written at once.
    closed: AtomicBool,
}

impl std::fmt::Debug for UsageRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageRecorder").field("batched", &self.batch.is_some()).finish()
    }
}

impl UsageRecorder {
    /// One `UPDATE` per recorded use.
    pub(crate) fn immediate(db: Db) -> Self {
        Self { db, batch: None, closed: AtomicBool::new(false) }
    }

    /// Uses counted in memory and written every `interval` by a background task on
    /// `runtime`.
    pub(crate) fn batched(db: Db, interval: Duration, runtime: &tokio::runtime::Handle) -> Self {
        let counts = Arc::new(Batch::default());
        let task = spawn_flusher(runtime, Arc::downgrade(&counts), db.clone(), interval);
        let batch = Batched { counts, flusher: Mutex::new(Some(task)) };
        Self { db, batch: Some(batch), closed: AtomicBool::new(false) }
    }

    pub(crate) fn is_batched(&self) -> bool {
        self.batch.is_some()
    }

    /// Records one use of `key` at `at` in memory, when uses are batched and the recorder
    /// is not shut down. False: call [`record`](Self::record).
    pub(crate) fn record_in_memory(&self, key: KeyId, at: NaiveDateTime) -> bool {
        let Some(batch) = &self.batch else { return false };
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        merge(&mut batch.counts.lock(), key.as_uuid(), Pending { count: 1, last_used: at });
        true
    }

    /// Records one use of `key` at `at`.
    pub(crate) async fn record(&self, key: KeyId, at: NaiveDateTime) -> Result<()> {
        if self.record_in_memory(key, at) {
            return Ok(());
        }
        retry_conflicts(|| record_one(&self.db, key.as_uuid(), at)).await.map_err(storage)
    }

    /// Writes the counts held in memory; returns the number of keys written.
    pub(crate) async fn flush(&self) -> Result<usize> {
        match &self.batch {
            Some(batch) => batch.counts.flush(&self.db).await,
            None => Ok(0),
        }
    }

    /// Stops the background flusher, writes what is held, and writes every later use at
    /// once. Returns the number of keys written.
    pub(crate) async fn shutdown(&self) -> Result<usize> {
        self.closed.store(true, Ordering::Release);
        let Some(batch) = &self.batch else { return Ok(0) };
        batch.stop_flusher();
        self.flush().await
    }
}

impl Drop for UsageRecorder {
    fn drop(&mut self) {
        let Some(batch) = &self.batch else { return };
        batch.stop_flusher();
        // Nothing is written here: a drop cannot wait for the database, and a task spawned
        // now may never run on a runtime that is shutting down. Say what is lost.
        let pending = batch.counts.lock();
        if !pending.is_empty() {
            let uses: u64 = pending.values().map(|p| p.count).sum();
            tracing::warn!(
                keys = pending.len(),
                uses,
                "api key client dropped with unwritten use counts; call ApiKeyClient::shutdown() before dropping it"
            );
        }
    }
}

/// Flushes `batch` every `interval` until the recorder is dropped or shut down.
fn spawn_flusher(
    runtime: &tokio::runtime::Handle,
    batch: Weak<Batch>,
    db: Db,
    interval: Duration,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tick.tick().await;
            let Some(batch) = batch.upgrade() else { return };
            if let Err(e) = batch.flush(&db).await {
                tracing::warn!(error = %e, "usage flush failed; the counts are kept for the next one");
            }
        }
    })
}
