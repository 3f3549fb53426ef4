//! A window of a shared limit, as the database sees it: its clock, what a counting statement
//! answers, and the purge of ended windows. Shared by the shared and leased modes.

use std::time::{Duration, Instant};

use apikeys_core::{Error, Result};
use chrono::Utc;
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::store::{WindowRef, in_table};
use crate::breaker::Db;
use crate::error::{is_missing_parent, storage};

/// How long after its end a window row is kept. A counting statement reads the database
/// clock before it takes the row's lock, so it may write to a window that ended a moment ago;
/// deleting only rows that ended this long ago (far more than any statement may run: see
/// `ClientBuilder::statement_timeout`) means a purge never deletes a row that a statement in
/// flight can still count in, which would restart that window at 1.
pub(crate) const PURGE_GRACE: Duration = Duration::from_secs(300);

/// The database's clock in Unix milliseconds, as PostgreSQL computes it.
pub(crate) const PG_NOW_MS: &str = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint";
/// The same for MySQL/MariaDB (`NOW(3)` is fixed for the whole statement).
pub(crate) const MY_NOW_MS: &str = "FLOOR(UNIX_TIMESTAMP(NOW(3)) * 1000)";

/// What the counting statement decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    /// Counted in the window it names (for a give-back).
    Admitted(WindowRef),
    /// Not counted: the window is full; this long until it ends (database clock).
    Refused(Duration),
}

/// Milliseconds since the Unix epoch on this host's system clock: the clock of a SQLite file.
pub(crate) fn host_millis() -> i64 {
    Utc::now().timestamp_millis()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When, on this process's monotonic clock, a window whose time left a counting statement
/// reported as `left` has surely ended, for a statement issued at `asked`.
///
/// The clocks read (`clock_timestamp()`, `NOW(3)`, the host's) are floored to whole
/// milliseconds, so `left` may exceed the true time left by up to a millisecond: right for
/// a `retry_after` (a caller waiting that long finds the window over), but a memo of the
/// refusal or a lease of the window's units must end no later than the window. The clock was
/// read after `asked`, so `asked + left - 1 ms` is never after the window's end.
pub(crate) fn window_ends(asked: Instant, left: Duration) -> Instant {
    asked + left.saturating_sub(Duration::from_millis(1))
}

pub(crate) fn left_ms(ms: i64) -> Duration {
    // A window always has time left when it is counted in; at least 1 ms for the caller.
    Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1))
}

/// A counting statement's failure: [`Error::InvalidKey`] when the counter's row could not
/// reference its key (the key was deleted after it was read), else as [`storage`].
pub(crate) fn counting_error(e: DbErr) -> Error {
    if is_missing_parent(&e) { Error::InvalidKey } else { storage(e) }
}

/// Deletes window rows that ended [`PURGE_GRACE`] ago or earlier, by the database's clock,
/// in the main limits' table and the named limits'.
pub(crate) async fn purge(db: &Db) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let grace = millis(PURGE_GRACE);
    let (sql, bound) = match backend {
        DbBackend::Postgres => {
            (format!("DELETE FROM rate_limit_windows WHERE expires_at <= {PG_NOW_MS} - $1"), grace)
        }
        DbBackend::MySql => {
            (format!("DELETE FROM rate_limit_windows WHERE expires_at <= {MY_NOW_MS} - ?"), grace)
        }
        _ => (
            "DELETE FROM rate_limit_windows WHERE expires_at <= ?".to_owned(),
            host_millis() - grace,
        ),
    };
    let mut deleted = 0;
    for named in [false, true] {
        let stmt = Statement::from_sql_and_values(backend, in_table(&sql, named), [bound.into()]);
        deleted += db.execute_raw(stmt).await?.rows_affected();
    }
    Ok(deleted)
}
