//! The poller: reads the change feed after the last row applied, drops what the rows name,
//! and records when each successful poll started (what [`CacheState::serving`] checks).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::CacheState;
use crate::breaker::Db;
use crate::entity::key_change;
use crate::feed::{self, Change};
use crate::lock::lock;
use crate::observe;

/// The shortest time between the start of a poll a change notice starts and that of the
/// poll before it (longer when that poll took more than half of it): a storm of notices
/// adds at most one feed read per this time per replica.
pub(crate) const WAKE_GAP: Duration = Duration::from_millis(10);

/// Feed rows read per statement while catching up.
const FEED_PAGE: u64 = 500;

/// Why a poll empties the cache and starts again at the feed's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// The head is below the last row applied: the feed was restored, failed over or created
    /// afresh.
    HeadWentBack,
    /// The last row applied is gone or carries another token: its number was given out
    /// again (a restore whose head has climbed back), or it was purged while behind.
    LastRowChanged,
    /// A number is missing between two rows read: purged before this client read it.
    Hole,
}

/// What the poller remembers between polls beside `applied`: the token of the last row
/// applied (`None`: unknown, or a row written before rows had tokens).
#[derive(Debug, Default)]
pub(super) struct Cursor {
    token: Option<i64>,
}

/// Checks rows read from number `applied` on (see [`feed::from`]) against what the poller
/// applied, and the head read after them.
fn check(
    applied: i64,
    token: Option<i64>,
    rows: &[key_change::Model],
    head: i64,
) -> Result<(), Restart> {
    if head < applied {
        return Err(Restart::HeadWentBack);
    }
    let mut rows = rows.iter();
    if applied > 0 {
        // The row applied last must still be there, as it was (the newest row is never
        // purged, and rows are purged oldest first).
        match rows.next() {
            Some(row) if row.seq == applied => {
                if let (Some(seen), Some(now)) = (token, row.token)
                    && seen != now
                {
                    return Err(Restart::LastRowChanged);
                }
            }
            _ => return Err(Restart::LastRowChanged),
        }
    }
    if (applied + 1..).zip(rows).any(|(expected, row)| row.seq != expected) {
        return Err(Restart::Hole);
    }
    Ok(())
}

impl CacheState {
    /// Reads the feed rows after the last one applied and applies them, until none is left.
    /// Every page is checked first (see [`check`]); a page that does not follow on from what
    /// was applied empties the cache and starts again at the head.
    async fn catch_up(&self, db: &Db, cursor: &mut Cursor) -> Result<(), sea_orm::DbErr> {
        let mut applied = self.applied.load(Ordering::Acquire);
        if applied < 0 {
            // First poll: whatever was cached before the head was read may be older than it.
            return self.restart(db, cursor, None).await;
        }
        loop {
            // The row applied last is read again, to check its token.
            let rows = feed::from(db, applied, FEED_PAGE + 1).await?;
            let head = feed::head(db).await?;
            if let Err(why) = check(applied, cursor.token, &rows, head) {
                return self.restart(db, cursor, Some((why, applied, head))).await;
            }
            let mut new = 0;
            let from = applied;
            for row in rows.iter().filter(|r| r.seq > from) {
                match Change::from_row(row) {
                    Some(change) => self.forget(change),
                    None => {
                        // A kind of change this version does not know (written by a newer
                        // one): it may touch any cached entry.
                        tracing::warn!(
                            seq = row.seq,
                            "change feed row of an unknown kind; emptying the key cache"
                        );
                        self.clear();
                    }
                }
                applied = row.seq;
                cursor.token = row.token;
                new += 1;
            }
            observe::feed(new, None);
            self.applied.store(applied, Ordering::Release);
            self.resolve_pending(applied);
            if new < FEED_PAGE {
                return Ok(());
            }
        }
    }

    /// Empties the cache and goes on from the feed's head: on the first poll, and whenever
    /// the feed does not follow on from what was applied (`why`, with the position applied
    /// and the head then read).
    async fn restart(
        &self,
        db: &Db,
        cursor: &mut Cursor,
        why: Option<(Restart, i64, i64)>,
    ) -> Result<(), sea_orm::DbErr> {
        // The head first, then the cache emptied: a change committed before the head was
        // read is then in no entry (a lookup that began before the clear is dropped by the
        // generation it bumps), and every later one has a number above the head.
        let head = feed::head(db).await?;
        let token = feed::token_at(db, head).await?.flatten();
        if let Some((why, applied, seen_head)) = why {
            tracing::warn!(
                ?why,
                applied,
                head = seen_head,
                "the change feed does not follow on from the rows this key cache applied \
                 (purged while it was behind, or the database restored or failed over); \
                 emptying it"
            );
            self.counts.restarts.fetch_add(1, Ordering::Relaxed);
        }
        self.clear();
        cursor.token = token;
        self.applied.store(head, Ordering::Release);
        self.resolve_pending(head);
        Ok(())
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
    async fn poll(&self, db: &Db, cursor: &mut Cursor) {
        let started = self.since_epoch().saturating_add(1);
        self.polling_since.store(started, Ordering::Release);
        let result = self.catch_up(db, cursor).await;
        self.polling_since.store(0, Ordering::Release);
        match result {
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
/// until the cache is dropped; and, when a change notice from another client wakes it
/// (see the module `notices`, with the `redis` feature), at once, but never sooner than [`WAKE_GAP`] after the
/// poll before.
pub(crate) fn spawn_poller(runtime: &tokio::runtime::Handle, state: Weak<CacheState>, db: Db) {
    let Some((interval, wake)) =
        state.upgrade().map(|s| (s.config.poll_interval(), Arc::clone(&s.wake)))
    else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published = [0; 4];
        let mut cursor = Cursor::default();
        let mut last = tokio::time::Instant::now();
        let mut took = Duration::ZERO;
        loop {
            let woken = tokio::select! {
                _ = tick.tick() => false,
                () = wake.notified() => true,
            };
            if woken {
                // At least WAKE_GAP after the last poll started, and as long after it ended
                // as it took: notices cannot keep a slow database polled more than half the
                // time.
                tokio::time::sleep_until(last + WAKE_GAP.max(took * 2)).await;
                // The poll below is as good as a tick's.
                tick.reset();
            }
            let Some(state) = state.upgrade() else { return };
            if woken {
                state.counts.woken_polls.fetch_add(1, Ordering::Relaxed);
            }
            last = tokio::time::Instant::now();
            state.poll(&db, &mut cursor).await;
            took = last.elapsed();
            state.publish(&mut published);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, token: i64) -> key_change::Model {
        key_change::Model {
            seq,
            key_id: Some(uuid::Uuid::nil()),
            project_id: None,
            product_id: None,
            created_at: chrono::NaiveDateTime::default(),
            token: Some(token),
        }
    }

    #[test]
    fn every_row_must_follow_on() {
        // From the start of the feed: rows 1, 2, 3.
        assert_eq!(check(0, None, &[row(1, 7), row(2, 8)], 2), Ok(()));
        // Rows 1-2 purged before a reader at 0 read them.
        assert_eq!(check(0, None, &[row(3, 9)], 3), Err(Restart::Hole));
        // The last row applied, then a hole in the middle.
        assert_eq!(check(5, Some(1), &[row(5, 1), row(6, 2), row(8, 3)], 8), Err(Restart::Hole));
        assert_eq!(check(5, Some(1), &[row(5, 1), row(6, 2), row(7, 3)], 7), Ok(()));
        // Nothing new.
        assert_eq!(check(5, Some(1), &[row(5, 1)], 5), Ok(()));
    }

    #[test]
    fn a_feed_that_went_back_or_was_rewritten_is_noticed() {
        // The head below what was applied (a restore, before new changes).
        assert_eq!(check(5, Some(1), &[], 3), Err(Restart::HeadWentBack));
        // The head climbed back: row 5 is another row now.
        assert_eq!(check(5, Some(1), &[row(5, 2), row(6, 3)], 6), Err(Restart::LastRowChanged));
        // The row applied last is gone.
        assert_eq!(check(5, Some(1), &[row(6, 3)], 6), Err(Restart::LastRowChanged));
        assert_eq!(check(5, Some(1), &[], 5), Err(Restart::LastRowChanged));
        // A row from before tokens (None) cannot be compared: its number must do.
        assert_eq!(check(5, None, &[row(5, 2), row(6, 3)], 6), Ok(()));
    }
}
