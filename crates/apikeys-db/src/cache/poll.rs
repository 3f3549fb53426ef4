//! The poller: reads the change feed after the last row applied, drops what the rows name,
//! and records when each successful poll started (what [`CacheState::serving`] checks).

use std::sync::Weak;
use std::sync::atomic::Ordering;

use super::CacheState;
use crate::breaker::Db;
use crate::feed::{self, Change};
use crate::lock::lock;
use crate::observe;

/// Feed rows read per statement while catching up.
const FEED_PAGE: u64 = 500;

impl CacheState {
    /// Reads the feed rows after the last one applied and applies them, until none is left.
    async fn catch_up(&self, db: &Db) -> Result<(), sea_orm::DbErr> {
        let mut applied = self.applied.load(Ordering::Acquire);
        if applied < 0 {
            // First poll: whatever was cached before the head was read may be older than it.
            let head = feed::head(db).await?;
            self.clear();
            self.applied.store(head, Ordering::Release);
            return Ok(());
        }
        loop {
            let rows = feed::after(db, applied, FEED_PAGE).await?;
            let Some(first) = rows.first() else { return Ok(()) };
            if first.seq != applied + 1 {
                // Rows after ours were purged before we read them: start afresh.
                tracing::warn!(
                    applied,
                    next = first.seq,
                    "key cache fell behind the change feed's retention; emptying it"
                );
                self.clear();
            }
            for row in &rows {
                if let Some(change) = Change::from_row(row) {
                    self.forget(change);
                }
                applied = row.seq;
            }
            observe::feed(rows.len() as u64, None);
            self.applied.store(applied, Ordering::Release);
            self.resolve_pending(applied);
            if (rows.len() as u64) < FEED_PAGE {
                return Ok(());
            }
        }
    }

    /// Adds the lookups counted since the last call to the lookup metric.
    fn publish(&self, published: &mut [u64; 4]) {
        let c = &self.counts;
        let now = [&c.hits, &c.misses, &c.unknown, &c.bypassed].map(|n| n.load(Ordering::Relaxed));
        for ((result, now), before) in
            ["hit", "miss", "unknown", "bypass"].iter().zip(now).zip(published.iter_mut())
        {
            observe::cache_lookups(result, now - *before);
            *before = now;
        }
    }

    /// Forgets the pending marks the poller has now seen past.
    fn resolve_pending(&self, applied: i64) {
        let mut pending = lock(&self.pending);
        if !pending.is_empty() {
            pending.retain(|p| p.seq > applied);
            self.pending_len.store(pending.len(), Ordering::Release);
        }
    }

    /// One poll: catch up with the feed, then record when it started as the last success.
    async fn poll(&self, db: &Db) {
        let started = self.since_epoch().saturating_add(1);
        match self.catch_up(db).await {
            Ok(()) => {
                self.last_ok.store(started, Ordering::Release);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("key cache: change feed readable again");
                }
            }
            Err(e) => {
                self.counts.failed_polls.fetch_add(1, Ordering::Relaxed);
                let first = self.last_ok.load(Ordering::Acquire) == 0;
                if first {
                    // Before the first success: most likely the tables are not created yet.
                    tracing::debug!(error = %e, "key cache: the change feed is not readable yet");
                } else if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "key cache: reading the change feed failed; the cache stops serving once its bound has passed");
                }
            }
        }
        if let Some(lag) = self.since_last_ok() {
            observe::feed(0, Some(lag.as_secs_f64()));
        }
    }
}

/// Polls the change feed every `max_staleness / 4` (at least once a second) on `runtime`,
/// until the cache is dropped.
pub(crate) fn spawn_poller(runtime: &tokio::runtime::Handle, state: Weak<CacheState>, db: Db) {
    let Some(interval) = state.upgrade().map(|s| s.config.poll_interval()) else { return };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = [0; 4];
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            state.poll(&db).await;
            state.publish(&mut published);
        }
    });
}
