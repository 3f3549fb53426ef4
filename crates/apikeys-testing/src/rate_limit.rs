//! Helpers of the rate-limit tests: the database's clock, windows, and a loop of checks.

use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, DbBackend, Statement};
use apikeys_db::{ApiKeyClient, Window};
use chrono::Utc;

/// The database's clock in Unix milliseconds: what shared rate-limit windows are cut by
/// (a SQLite file's clock is the host's).
///
/// # Panics
/// If the database cannot be asked.
pub async fn db_now_ms(client: &ApiKeyClient) -> i64 {
    db_now_ms_on(client.connection()).await
}

/// [`db_now_ms`] on any connection (a benchmark's own, for instance).
///
/// # Panics
/// If the database cannot be asked.
pub async fn db_now_ms_on(db: &impl ConnectionTrait) -> i64 {
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS n"
        }
        DbBackend::MySql => "SELECT CAST(FLOOR(UNIX_TIMESTAMP(NOW(3)) * 1000) AS SIGNED) AS n",
        _ => return Utc::now().timestamp_millis(),
    };
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// Waits (at most one `window`) until the database's current window has at least `room`
/// left, so a test that must stay in one window does.
///
/// # Panics
/// If the database cannot be asked.
pub async fn leave_room(client: &ApiKeyClient, window: Window, room: Duration) {
    let len = window.seconds() * 1000;
    let now = db_now_ms(client).await;
    let left = len - now.rem_euclid(len);
    let room = i64::try_from(room.as_millis()).unwrap();
    if left < room {
        tokio::time::sleep(Duration::from_millis(u64::try_from(left + 20).unwrap())).await;
    }
}

/// Every rate-limit window row: (window_start, count), oldest first.
///
/// # Panics
/// If the table cannot be read.
pub async fn window_rows(client: &ApiKeyClient) -> Vec<(i64, i64)> {
    let db = client.connection();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT window_start, count FROM rate_limit_windows ORDER BY window_start",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (r.try_get::<i64>("", "window_start").unwrap(), r.try_get::<i64>("", "count").unwrap())
        })
        .collect()
}

/// Validates `key` `attempts` times; returns (admitted, rate-limited).
///
/// # Panics
/// If a quota error carries no `retry_after` within the key's `window`, or on any other
/// error: either fails the test.
pub async fn hammer(
    client: &ApiKeyClient,
    key: &str,
    attempts: usize,
    window: Duration,
) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..attempts {
        match client.validate_key(key, &apikeys_db::ValidateOptions::new()).await {
            Ok(_) => ok += 1,
            Err(apikeys_db::Error::Quota { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= window);
                limited += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    (ok, limited)
}
