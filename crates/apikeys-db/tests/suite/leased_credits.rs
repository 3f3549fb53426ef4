//! Leased credits (`CreditMode::Leased`, issue 24): blocks of a balance reserved ahead and
//! spent in memory, never more than the balance; what is held goes back on shutdown, but
//! never into a balance that was set again or refilled meanwhile.

use std::sync::Arc;
use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, Statement};
use apikeys_db::{
    ApiKeyClient, CreditMode, Credits, Error, KeyId, KeyUpdate, NewKey, Refill, ValidateOptions,
};

use apikeys_testing::TestDb;

async fn leased(db: &TestDb) -> ApiKeyClient {
    db.client_with(|b| b.credit_mode(CreditMode::Leased)).await
}

async fn key_with(client: &ApiKeyClient, credits: Credits) -> (KeyId, String) {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued =
        client.create_key(org.id, NewKey::new("plan").with_credits(credits)).await.unwrap();
    (issued.record.id, issued.key.expose_secret().to_owned())
}

/// The balance as stored (what is not held by any client nor spent).
async fn stored(db: &TestDb, id: KeyId) -> u64 {
    db.client().await.get_key(id).await.unwrap().credits.unwrap().remaining
}

/// Checks until the stored balance is below what was spent (a block is held), at most 200.
async fn until_held(db: &TestDb, client: &ApiKeyClient, key: &str, id: KeyId, start: u64) -> u64 {
    let mut spent = 0;
    while stored(db, id).await == start - spent {
        assert!(spent < 200, "no block was ever reserved ahead");
        client.validate_key(key, &ValidateOptions::new()).await.unwrap();
        spent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    spent
}

/// Three leased clients × 8 tasks check a key with 500 credits until each is refused:
/// exactly 500 pass, and the stored balance ends at 0.
pub async fn leased_credits_are_exact_across_clients(db: TestDb) {
    let first = leased(&db).await;
    let (id, key) = key_with(&first, Credits::new(500)).await;
    let clients = [first, leased(&db).await, leased(&db).await];
    let barrier = Arc::new(tokio::sync::Barrier::new(24));
    let mut handles = Vec::new();
    for client in &clients {
        for _ in 0..8 {
            let (client, key, barrier) = (client.clone(), key.clone(), Arc::clone(&barrier));
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut ok = 0;
                loop {
                    match client.validate_key(&key, &ValidateOptions::new()).await {
                        Ok(_) => ok += 1,
                        Err(Error::UsageExhausted { .. }) => return ok,
                        Err(e) => panic!("{e:?}"),
                    }
                    assert!(ok <= 500, "more passed than the balance");
                }
            }));
        }
    }
    let mut ok = 0;
    for h in handles {
        ok += h.await.unwrap();
    }
    assert_eq!(ok, 500);
    assert_eq!(stored(&db, id).await, 0);
    for client in &clients {
        client.shutdown().await.unwrap();
    }
    assert_eq!(stored(&db, id).await, 0, "nothing held, nothing given back");
}

/// A leased client holds a block; on shutdown it gives back exactly what it did not spend.
pub async fn leased_credits_go_back_on_shutdown(db: TestDb) {
    let client = leased(&db).await;
    let (id, key) = key_with(&client, Credits::new(10_000)).await;
    let spent = until_held(&db, &client, &key, id, 10_000).await;
    assert!(stored(&db, id).await < 10_000 - spent, "a block is held");
    client.shutdown().await.unwrap();
    assert_eq!(stored(&db, id).await, 10_000 - spent);
}

/// An admin sets a new balance (0) while a leased client holds a block of the old one: the
/// client's next check reads the changed key, drops the block and is refused; its shutdown
/// gives nothing back into the new balance.
pub async fn a_balance_set_again_drops_the_blocks_held(db: TestDb) {
    let client = leased(&db).await;
    let (id, key) = key_with(&client, Credits::new(10_000)).await;
    until_held(&db, &client, &key, id, 10_000).await;
    let admin = db.client().await;
    admin.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(0)))).await.unwrap();
    match client.validate_key(&key, &ValidateOptions::new()).await {
        Err(Error::UsageExhausted { .. }) => {}
        other => panic!("a block of the old balance was spent: {other:?}"),
    }
    client.shutdown().await.unwrap();
    assert_eq!(stored(&db, id).await, 0, "nothing given back into the new balance");

    // The same, shut down straight after the new balance is set (no check reads the changed
    // key): the give-back itself refuses the balance set again.
    let client = leased(&db).await;
    let (id, key) = key_with(&client, Credits::new(10_000)).await;
    until_held(&db, &client, &key, id, 10_000).await;
    admin.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(5)))).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(stored(&db, id).await, 5, "nothing given back into the new balance");
}

/// A replica whose cache still holds the old record keeps spending after an admin set the
/// balance again, and its refills then come from the new balance: what it holds must never
/// mix the two, so its shutdown gives back at most what it took from the new balance, and
/// the stored balance never ends above what was set. (Mixing gave back the old balance's
/// credits too.)
pub async fn a_stale_record_never_mixes_two_balances(db: TestDb) {
    let client = db
        .client_with(|b| {
            b.credit_mode(CreditMode::Leased)
                .cache(apikeys_db::KeyCache::new().max_staleness(Duration::from_secs(60)))
        })
        .await;
    let (id, key) = key_with(&client, Credits::new(10_000)).await;
    until_held(&db, &client, &key, id, 10_000).await;
    let admin = db.client().await;
    admin.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(10_000)))).await.unwrap();
    // Checks answered from the stale cached record until a refill took from the new balance.
    let mut spent_after = 0;
    while stored(&db, id).await == 10_000 {
        assert!(spent_after < 2_000, "no refill ever came from the new balance");
        client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
        spent_after += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.shutdown().await.unwrap();
    let left = stored(&db, id).await;
    assert!(left <= 10_000, "{left} left of 10 000 set, after {spent_after} checks");
}

/// A refilling balance: a leased client holds a block when the period rolls over (simulated
/// by ageing the stored period, as the refill tests do); its shutdown gives nothing back into
/// the next period's balance.
pub async fn held_credits_never_go_back_into_a_new_period(db: TestDb) {
    let client = leased(&db).await;
    let credits = Credits::new(10_000).with_refill(Refill::daily(10_000));
    let (id, key) = key_with(&client, credits).await;
    until_held(&db, &client, &key, id, 10_000).await;
    let before = stored(&db, id).await;
    let conn = client.connection();
    let backend = conn.get_database_backend();
    let sql = match backend {
        apikeys_db::sea_orm::DbBackend::Postgres => {
            "UPDATE api_keys SET refilled_period = refilled_period - 1 WHERE id = $1"
        }
        _ => "UPDATE api_keys SET refilled_period = refilled_period - 1 WHERE id = ?",
    };
    let values = [id.as_uuid().into()];
    conn.execute_raw(Statement::from_sql_and_values(backend, sql, values)).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(stored(&db, id).await, before, "the held block did not go back");
}

/// A balance found spent is refused from memory for a moment: while another transaction
/// holds the key's row (a check that asked the database would wait for it and fail after the
/// statement timeout), the key is still refused with `UsageExhausted`, at once. A balance set
/// again is spent as soon as the check reads the changed record.
pub async fn a_spent_balance_is_refused_from_memory_until_the_key_changes(db: TestDb) {
    let client = db
        .client_with(|b| {
            b.credit_mode(CreditMode::Leased).statement_timeout(Duration::from_millis(500))
        })
        .await;
    let (id, key) = key_with(&client, Credits::new(2)).await;
    let once = ValidateOptions::new().track_usage(false);
    for _ in 0..2 {
        client.validate_key(&key, &once).await.unwrap();
    }
    let refused = client.validate_key(&key, &once).await;
    assert!(matches!(refused, Err(Error::UsageExhausted { .. })), "{refused:?}");

    let admin = db.client().await;
    let txn = admin.begin().await.unwrap();
    let backend = txn.get_database_backend();
    if backend != apikeys_db::sea_orm::DbBackend::Sqlite {
        let sql = "SELECT remaining FROM api_keys FOR UPDATE";
        txn.query_all_raw(Statement::from_string(backend, sql)).await.unwrap();
    } else {
        // SQLite: the database's write lock, held by a write.
        let sql = "UPDATE organizations SET name = name";
        txn.execute_unprepared(sql).await.unwrap();
    }
    for _ in 0..3 {
        let refused = client.validate_key(&key, &once).await;
        assert!(matches!(refused, Err(Error::UsageExhausted { .. })), "{refused:?}");
    }
    txn.rollback().await.unwrap();

    admin.update_key(id, KeyUpdate::new().with_credits(Some(Credits::new(3)))).await.unwrap();
    let passed = client.validate_key(&key, &once).await.unwrap();
    assert_eq!(passed.credits.map(|c| c.remaining), Some(2));
    client.shutdown().await.unwrap();
}

/// A top-up (`add_credits`) leaves the blocks replicas hold valid: two leased clients that
/// each hold a block go on spending from it after a top-up of 100, and once both shut down
/// (giving back what they hold) the credits spent plus the stored balance are exactly the
/// balance plus the top-up.
pub async fn a_top_up_keeps_the_blocks_replicas_hold(db: TestDb) {
    let (a, b) = (leased(&db).await, leased(&db).await);
    let (id, key) = key_with(&a, Credits::new(10_000)).await;
    let mut spent = until_held(&db, &a, &key, id, 10_000).await;
    spent += until_held(&db, &b, &key, id, 10_000 - spent).await;
    let before = stored(&db, id).await;
    db.client().await.add_credits(id, 100).await.unwrap();
    assert_eq!(stored(&db, id).await, before + 100, "added to what is stored");
    for client in [&a, &b] {
        for _ in 0..5 {
            client.validate_key(&key, &ValidateOptions::new()).await.unwrap();
            spent += 1;
        }
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(stored(&db, id).await + spent, 10_100, "spent {spent}: nothing lost or doubled");
}
