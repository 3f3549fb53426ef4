//! Signing-secret rotation as a rolling deploy runs it: old and new replicas side by side on
//! one database, each step rolled out and rolled back.

use apikeys_db::{ApiKeyClient, Error, NewKey, VerifyOptions};

use crate::common::TestDb;

const V1: &str = "first-signing-secret-0123456789-abcdefgh";
const V2: &str = "second-signing-secret-0123456789-abcdefg";

async fn all_verify(client: &ApiKeyClient, keys: &[String], who: &str) {
    for k in keys {
        // Untracked: the check itself must not move anything.
        let r = client.verify_key(k, VerifyOptions::new().track_usage(false)).await;
        assert!(r.is_ok(), "{who}: {r:?}");
    }
}

pub async fn rolling_rotation_and_rollback(db: TestDb) {
    // Step 0: v1 only. Step 1: v1 current, v2 next. Step 2: v2 current, v1 previous.
    // Step 3: v2 only.
    let step0 = db.client_with(|b| b.signing_secret(V1)).await;
    let step1 = db.client_with(|b| b.signing_secret(V1).next_signing_secret(2, V2)).await;
    let step2 = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    let step3 = db.client_with(|b| b.signing_secret(V2).signing_secret_version(2)).await;
    let (org, _) = step0.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    let mut issue = async |c: &ApiKeyClient| {
        let k = c.create_key(org.id, NewKey::new("k")).await.unwrap();
        keys.push(k.key.expose_secret().to_owned());
    };

    // Rolling out step 1 next to step 0: keys issued and used on either side verify on both,
    // and a step-1 replica moves nothing (so rolling step 1 back is free).
    issue(&step0).await;
    issue(&step1).await;
    let keys1 = keys.clone();
    for k in &keys1 {
        step1.verify_key(k, VerifyOptions::new()).await.unwrap();
    }
    all_verify(&step0, &keys1, "step 0 beside step 1").await;
    all_verify(&step1, &keys1, "step 1").await;
    assert_eq!(step0.keys_per_secret_version().await.unwrap(), vec![(1, 2)]);

    // Rolling out step 2 next to step 1: step 2 issues under v2 and re-hashes what it sees
    // used; step 1 still verifies everything.
    let mut keys = keys1.clone();
    let k = step2.create_key(org.id, NewKey::new("k2")).await.unwrap();
    keys.push(k.key.expose_secret().to_owned());
    step2.verify_key(&keys[0], VerifyOptions::new()).await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(1, 1), (2, 2)]);
    all_verify(&step1, &keys, "step 1 beside step 2").await;
    all_verify(&step2, &keys, "step 2").await;
    // A step-1 replica seeing a v2 key used leaves it under v2 (no ping-pong).
    step1.verify_key(&keys[0], VerifyOptions::new()).await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(1, 1), (2, 2)]);

    // Rolling step 2 back to step 1 keeps every key valid (step 1 knows v2 as next).
    all_verify(&step1, &keys, "rolled back to step 1").await;

    // Step 3 (v1 removed): what was used or issued during step 2 verifies; the key never
    // presented during step 2 is still under v1 and is refused. keys_per_secret_version
    // said so before the removal.
    all_verify(&step3, &keys[..1], "step 3, used in step 2").await;
    all_verify(&step3, &keys[2..], "step 3, issued in step 2").await;
    assert!(matches!(
        step3.verify_key(&keys[1], VerifyOptions::new()).await,
        Err(Error::InvalidKey)
    ));
    // Used once more under step 2, it moves, and step 3 accepts it.
    step2.verify_key(&keys[1], VerifyOptions::new()).await.unwrap();
    assert_eq!(step3.keys_per_secret_version().await.unwrap(), vec![(2, 3)]);
    all_verify(&step3, &keys, "step 3").await;
}

/// A re-hash that fails (here: the key's row is locked by another connection past the
/// statement timeout) leaves the check successful, and the next success re-hashes.
pub async fn failed_rehash_never_fails_the_check(db: TestDb) {
    use std::time::Duration;

    use apikeys_db::sea_orm::{
        ConnectionTrait, Database, SqliteTransactionMode, TransactionOptions, TransactionTrait,
    };

    let step0 = db.client_with(|b| b.signing_secret(V1)).await;
    let (org, _) = step0.get_or_create_organization("acme").await.unwrap();
    let issued = step0.create_key(org.id, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret();
    // Batched usage, so the only write a tracked check makes at once is the re-hash.
    let step2 = db
        .client_with(|b| {
            b.signing_secret(V2)
                .signing_secret_version(2)
                .previous_signing_secret(1, V1)
                .usage_flush_interval(Duration::from_secs(3600))
                .statement_timeout(Duration::from_millis(500))
        })
        .await;
    let other = Database::connect(&db.url).await.unwrap();
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    let txn = other.begin_with_options(options).await.unwrap();
    txn.execute_unprepared("UPDATE api_keys SET name = 'held'").await.unwrap();
    let checked = step2.verify_key(key, VerifyOptions::new()).await.unwrap();
    assert_eq!((checked.id, checked.use_count), (issued.record.id, 1));
    txn.rollback().await.unwrap();
    other.close().await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(1, 1)], "not re-hashed");
    step2.verify_key(key, VerifyOptions::new()).await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(2, 1)], "retried");
    assert_eq!(step2.shutdown().await.unwrap(), 1);
    assert_eq!(step2.get_key(issued.record.id).await.unwrap().use_count, 2);
}
