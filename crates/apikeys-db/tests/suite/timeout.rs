//! A statement stuck on the server (here: waiting for a lock another connection holds)
//! ends after the client's statement timeout with `Error::Unavailable`, on every backend.

use std::time::Duration;

use apikeys_db::{Error, NewKey};

use apikeys_testing::{TestDb, hold_key_rows};

pub async fn stuck_statement_is_unavailable(db: TestDb) {
    let client = db.client_with(|b| b.statement_timeout(Duration::from_millis(800))).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let id = client.create_key(org.id, NewKey::new("k")).await.unwrap().record.id;

    // Another connection holds the key's row (the database's write lock on SQLite).
    let (other, txn) = hold_key_rows(&db).await;

    match client.revoke_key(id).await {
        Err(Error::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    txn.rollback().await.unwrap();
    // Nothing half-done, and the same client works again.
    let key = client.revoke_key(id).await.unwrap();
    assert!(key.revoked_at.is_some());
    assert_eq!(key.name, "k");
    other.close().await.unwrap();
    assert!(matches!(
        db.builder().statement_timeout(Duration::ZERO).build().await,
        Err(Error::Configuration { .. })
    ));
}
