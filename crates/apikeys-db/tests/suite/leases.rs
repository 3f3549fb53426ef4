//! Leased rate limits reserve ahead, off the request path (issue 24): a steadily checked key
//! is answered from units reserved in the background, a key active in a window gets its
//! next window's first block before it is checked there, and what a process holds unspent
//! stays within the documented bound.

use std::sync::Arc;
use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};
use apikeys_db::{ApiKeyClient, NewKey, RateLimit, RateLimitMode, ValidateOptions, Window};

use apikeys_testing::{TestDb, leave_room, window_rows};

async fn limited_key(client: &ApiKeyClient, limit: RateLimit) -> String {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("leased").with_rate_limit(limit);
    client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned()
}

/// Checks that write nothing but the rate limit (no usage), so a lock on the window rows is
/// the only thing a check could wait for.
fn untracked() -> ValidateOptions {
    ValidateOptions::new().track_usage(false)
}

/// Polls until `done` holds on the window rows (at most 10 s: a background reservation
/// lands within a few milliseconds on an idle machine).
async fn wait_for_rows(
    client: &ApiKeyClient,
    done: impl Fn(&[(i64, i64)]) -> bool,
) -> Vec<(i64, i64)> {
    for _ in 0..1_000 {
        let rows = window_rows(client).await;
        if done(&rows) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the window rows never got there: {:?}", window_rows(client).await);
}

/// Another connection's transaction holding every window row (on SQLite, the database's
/// write lock): a reservation made meanwhile waits for it and fails after the statement
/// timeout.
async fn lock_windows(admin: &ApiKeyClient) -> DatabaseTransaction {
    let txn = admin.begin().await.unwrap();
    let backend = txn.get_database_backend();
    if backend != DbBackend::Sqlite {
        let sql = "SELECT count FROM rate_limit_windows FOR UPDATE";
        txn.query_all_raw(Statement::from_string(backend, sql)).await.unwrap();
    }
    txn
}

/// The first check of a key reserves its unit on the request path; a block is then reserved
/// in the background, so the window's count runs ahead of what was admitted, and the second
/// check is answered from that block even while another transaction holds the window row (a
/// check that went to the database would wait for it and fail), without a statement of its
/// own: the count stays where the block left it.
pub async fn a_steady_key_is_answered_from_units_reserved_ahead(db: TestDb) {
    let client = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = limited_key(&client, RateLimit::per_hour(1_000).unwrap()).await;
    leave_room(&client, Window::Hour, Duration::from_secs(120)).await;
    client.validate_key(&key, &untracked()).await.unwrap();
    let rows = wait_for_rows(&client, |rows| rows.first().is_some_and(|w| w.1 > 1)).await;
    let reserved = rows[0].1;
    assert!(reserved <= 1 + 62, "one block at most (limit / 16): {reserved}");
    let admin = db.client().await;
    let txn = lock_windows(&admin).await;
    let second = client.validate_key(&key, &untracked()).await;
    txn.rollback().await.unwrap();
    second.unwrap();
    if reserved > 2 {
        assert_eq!(window_rows(&client).await[0].1, reserved, "the second check wrote nothing");
    }
}

/// A key checked twice in a window gets a block of the next window reserved as soon as that
/// window has begun by the database's clock, before any check is made in it: the next
/// window's row appears with no check after the first window.
pub async fn the_next_window_is_reserved_ahead_for_an_active_key(db: TestDb) {
    let client = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = limited_key(&client, RateLimit::per_second(1_000).unwrap()).await;
    // Both checks and the read of the rows inside one second: start early in one.
    leave_room(&client, Window::Second, Duration::from_millis(900)).await;
    for _ in 0..2 {
        client.validate_key(&key, &untracked()).await.unwrap();
    }
    let rows = window_rows(&client).await;
    let first = rows.first().copied().unwrap();
    assert_eq!(rows.len(), 1, "both checks in one window: {rows:?}");
    let rows = wait_for_rows(&client, |rows| rows.iter().any(|w| w.0 > first.0)).await;
    let next = rows.iter().find(|w| w.0 > first.0).copied().unwrap();
    assert_eq!(next.0, first.0 + 1_000, "the window right after: {rows:?}");
    assert!(next.1 >= 1, "a block is reserved in it: {rows:?}");
}

/// 8 tasks × 100 checks on one leased client, on a key limited to 1 600 an hour (blocks of
/// at most 100): once the background reservations have landed, the window's count exceeds
/// what was admitted by at most a block and a half, the documented bound; after shutdown it
/// is exactly what was admitted.
pub async fn leased_shortfall_is_bounded(db: TestDb) {
    let client = db.client_with(|b| b.rate_limit_mode(RateLimitMode::Leased)).await;
    let key = limited_key(&client, RateLimit::per_hour(1_600).unwrap()).await;
    leave_room(&client, Window::Hour, Duration::from_secs(120)).await;
    let mut handles = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    for _ in 0..8 {
        let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            for _ in 0..100 {
                client.validate_key(&key, &untracked()).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // Settled: the count reads the same three times in a row, 50 ms apart.
    let mut last = -1;
    let mut same = 0;
    while same < 3 {
        let count = window_rows(&client).await[0].1;
        same = if count == last { same + 1 } else { 0 };
        last = count;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((800..=800 + 150).contains(&last), "held unspent: {} (bound 150)", last - 800);
    client.shutdown().await.unwrap();
    assert_eq!(window_rows(&client).await[0].1, 800, "the unspent units went back");
}

/// A client on a connection of the test's own, counting the statements that reserve units
/// (`INSERT INTO rate_limit_windows`).
async fn counting_client(db: &TestDb) -> (ApiKeyClient, Arc<std::sync::atomic::AtomicUsize>) {
    use apikeys_db::sea_orm::{ConnectOptions, Database};
    let mut options = ConnectOptions::new(db.url.clone());
    options.sqlx_logging(false);
    #[cfg(feature = "sqlite")]
    if db.url.starts_with("sqlite:") {
        options
            .max_connections(2)
            .map_sqlx_sqlite_opts(|o| o.foreign_keys(true).busy_timeout(Duration::from_secs(5)));
    }
    let mut conn = Database::connect(options).await.unwrap();
    let reservations = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&reservations);
    conn.set_metric_callback(move |info| {
        let sql = &info.statement.sql;
        if sql.contains("INSERT INTO rate_limit_windows") {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let client = ApiKeyClient::builder()
        .connection(conn)
        .signing_secret(apikeys_testing::SECRET)
        .rate_limit_mode(RateLimitMode::Leased)
        .build()
        .await
        .unwrap();
    (client, reservations)
}

/// Reservations asked for at the same time go in shared statements: 64 keys checked for the
/// first time at once, each admitted exactly once, take far fewer than 64 statements (one
/// each, before batching), and the window rows count what was reserved.
pub async fn reservations_asked_together_share_statements(db: TestDb) {
    let admin = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_minute(160).unwrap();
    let mut keys = Vec::new();
    for i in 0..64 {
        let new = NewKey::new(format!("k{i}")).with_rate_limit(limit);
        keys.push(admin.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned());
    }
    leave_room(&admin, Window::Minute, Duration::from_secs(10)).await;
    let (client, reservations) = counting_client(&db).await;
    let client = Arc::new(client);
    let barrier = Arc::new(tokio::sync::Barrier::new(keys.len()));
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (client, barrier) = (Arc::clone(&client), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                client.validate_key(&key, &untracked()).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let statements = reservations.load(std::sync::atomic::Ordering::SeqCst);
    assert!(statements < 32, "{statements} statements for 64 keys' first reservations");
    let rows = window_rows(&client).await;
    assert_eq!(rows.len(), 64, "{rows:?}");
    assert!(rows.iter().all(|&(_, count)| (1..=160).contains(&count)), "{rows:?}");
    client.shutdown().await.unwrap();
}

/// A key deleted while its reservation waits in a batch fails the shared statement (its
/// window row cannot reference it): every other key of the batch is still answered, each on
/// its own, and the deleted key's check gives `InvalidKey`, never `Storage`.
pub async fn a_key_deleted_in_a_batch_fails_only_its_own_check(db: TestDb) {
    let admin = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_minute(160).unwrap();
    leave_room(&admin, Window::Minute, Duration::from_secs(10)).await;
    let (client, _) = counting_client(&db).await;
    let client = Arc::new(client);
    for round in 0..5 {
        let mut keys = Vec::new();
        for i in 0..16 {
            let new = NewKey::new(format!("r{round}k{i}")).with_rate_limit(limit);
            let issued = admin.create_key(org.id, new).await.unwrap();
            keys.push((issued.record.id, issued.key.expose_secret().to_owned()));
        }
        // The record is read before the key is deleted (as a cached record would be); the
        // deletion lands while the checks reserve.
        let records: Vec<_> = keys.iter().map(|(id, _)| *id).collect();
        let doomed = records[round % records.len()];
        let barrier = Arc::new(tokio::sync::Barrier::new(keys.len() + 1));
        let tasks: Vec<_> = keys
            .iter()
            .cloned()
            .map(|(id, key)| {
                let (client, barrier) = (Arc::clone(&client), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    (id, client.validate_key(&key, &untracked()).await)
                })
            })
            .collect();
        barrier.wait().await;
        admin.delete_key(doomed).await.unwrap();
        for task in tasks {
            let (id, result) = task.await.unwrap();
            match result {
                Ok(_) => {}
                Err(apikeys_db::Error::InvalidKey) if id == doomed => {}
                other => panic!("key {id} (deleted: {}): {other:?}", id == doomed),
            }
        }
    }
    client.shutdown().await.unwrap();
}
