//! Signing-secret rotation as a rolling deploy runs it: old and new replicas side by side on
//! one database, each step rolled out and rolled back.

use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, Statement};
use apikeys_db::{ApiKeyClient, Error, NewKey, VerifyOptions};

use crate::keys::{no_tracking, org};
use apikeys_testing::TestDb;

const V1: &str = "first-signing-secret-0123456789-abcdefgh";
const V2: &str = "second-signing-secret-0123456789-abcdefg";

async fn all_verify(client: &ApiKeyClient, keys: &[String], who: &str) {
    for k in keys {
        // Untracked: the check itself must not move anything.
        let r = client.verify_key(k, &VerifyOptions::new().track_usage(false)).await;
        assert!(r.is_ok(), "{who}: {r:?}");
    }
}

pub async fn rolling_rotation_and_rollback(db: TestDb) {
    // Before: v1 only. Rotating: v2 current, v1 previous. After: v2 only.
    let old = db.client_with(|b| b.signing_secret(V1)).await;
    let rotating = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    let new = db.client_with(|b| b.signing_secret(V2).signing_secret_version(2)).await;
    let (org, _) = old.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for (i, c) in [&old, &old, &rotating, &old].into_iter().enumerate() {
        let k = c.create_key(org.id, NewKey::new(format!("k{i}"))).await.unwrap();
        keys.push(k.key.expose_secret().to_owned());
    }
    // Rolling out: old and rotating replicas side by side. Keys issued on either side, and
    // keys the rotating replica re-hashes on use, verify on both.
    all_verify(&old, &keys, "old beside rotating").await;
    all_verify(&rotating, &keys, "rotating").await;
    assert_eq!(rotating.keys_per_secret_version().await.unwrap(), vec![(1, 4), (2, 1)]);
    rotating.verify_key(&keys[0], &VerifyOptions::new()).await.unwrap();
    old.verify_key(&keys[0], &VerifyOptions::new()).await.unwrap();
    assert_eq!(rotating.keys_per_secret_version().await.unwrap(), vec![(1, 4), (2, 2)]);
    all_verify(&old, &keys, "old after re-hashes").await;
    // Rolled back: the old configuration alone keeps every key, including those the rotating
    // replicas created and moved; and rolling forward again changes nothing.
    all_verify(&old, &keys, "rolled back").await;
    let k = old.create_key(org.id, NewKey::new("after rollback")).await.unwrap();
    keys.push(k.key.expose_secret().to_owned());
    all_verify(&rotating, &keys, "rolled forward").await;
    // The old secret removed: what was issued by or used on a rotating replica verifies;
    // keys never presented to one are under v1 only and are refused, as
    // keys_per_secret_version said (5 keys, 2 under v2).
    all_verify(&new, &keys[..1], "new, used while rotating").await;
    all_verify(&new, &keys[2..3], "new, issued while rotating").await;
    for k in [&keys[1], &keys[3], &keys[4]] {
        assert!(matches!(new.verify_key(k, &VerifyOptions::new()).await, Err(Error::InvalidKey)));
    }
    // Presented once more to a rotating replica, they move, and the new secret alone takes
    // every key.
    for k in &keys {
        rotating.verify_key(k, &VerifyOptions::new()).await.unwrap();
    }
    assert_eq!(new.keys_per_secret_version().await.unwrap(), vec![(1, 5), (2, 5)]);
    all_verify(&new, &keys, "new").await;
    all_verify(&old, &keys, "old, still beside").await;
}

/// A re-hash that fails (here: the key's row is locked by another connection past the
/// statement timeout) leaves the check successful, and the next success re-hashes.
pub async fn failed_rehash_never_fails_the_check(db: TestDb) {
    use std::time::Duration;

    let old = db.client_with(|b| b.signing_secret(V1)).await;
    let (org, _) = old.get_or_create_organization("acme").await.unwrap();
    let issued = old.create_key(org.id, NewKey::new("k")).await.unwrap();
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
    let (other, txn) = apikeys_testing::hold_key_rows(&db).await;
    let checked = step2.verify_key(key, &VerifyOptions::new()).await.unwrap();
    assert_eq!((checked.id, checked.use_count), (issued.record.id, 1));
    txn.rollback().await.unwrap();
    other.close().await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(1, 1)], "not re-hashed");
    step2.verify_key(key, &VerifyOptions::new()).await.unwrap();
    assert_eq!(step2.keys_per_secret_version().await.unwrap(), vec![(1, 1), (2, 1)], "retried");
    assert_eq!(step2.shutdown().await.unwrap(), 1);
    assert_eq!(step2.get_key(issued.record.id).await.unwrap().use_count, 2);
}

/// A database made before the alternate-hash step, with keys in it, upgrades in place with
/// `create_tables` (the same Migrator as `sea-orm-cli migrate up`); its keys keep working,
/// through a rotation too.
pub async fn schema_upgrade_keeps_keys(db: TestDb) {
    use migration::MigratorTrait;
    let old = db.client_with(|b| b.signing_secret(V1)).await;
    let (org, _) = old.get_or_create_organization("acme").await.unwrap();
    let issued = old.create_key(org.id, NewKey::new("k")).await.unwrap();
    // Back to the first schema (this drops the new columns), as a database made before.
    let later = u32::try_from(migration::Migrator::migrations().len() - 1).unwrap();
    migration::Migrator::down(old.connection(), Some(later)).await.unwrap();
    assert_eq!(
        migration::Migrator::get_pending_migrations(old.connection()).await.unwrap().len(),
        later as usize
    );
    old.create_tables().await.unwrap();
    assert!(
        migration::Migrator::get_pending_migrations(old.connection()).await.unwrap().is_empty()
    );
    let key = issued.key.expose_secret();
    let found = old.verify_key(key, &VerifyOptions::new()).await.unwrap();
    assert_eq!(found.id, issued.record.id);
    let rotating = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    rotating.verify_key(key, &VerifyOptions::new()).await.unwrap();
    old.verify_key(key, &VerifyOptions::new()).await.unwrap();
    assert_eq!(old.keys_per_secret_version().await.unwrap(), vec![(1, 1), (2, 1)]);
}

pub async fn secret_rotation(db: TestDb) {
    const V1: &str = "first-signing-secret-0123456789-abcdefgh";
    const V2: &str = "second-signing-secret-0123456789-abcdefg";
    let v1_client = db.client_with(|b| b.signing_secret(V1)).await;
    let org = org(&v1_client, "acme").await;
    let issued = v1_client.create_key(org, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret();

    // Only the new secret: the old key is not found.
    let v2_only = db.client_with(|b| b.signing_secret(V2).signing_secret_version(2)).await;
    assert!(matches!(v2_only.verify_key(key, &VerifyOptions::new()).await, Err(Error::InvalidKey)));

    // New + previous: found; a check that does not track usage writes nothing (the key
    // stays under v1, so the old-only client still finds it), a tracked one re-hashes to v2.
    let rotating = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    rotating.verify_key(key, &no_tracking()).await.unwrap();
    v1_client.verify_key(key, &no_tracking()).await.unwrap();
    rotating.verify_key(key, &VerifyOptions::new()).await.unwrap();
    // Now the new secret alone finds it, and so does a replica still on the old one (the
    // old hash is kept beside the new one while the rotation runs).
    v2_only.verify_key(key, &VerifyOptions::new()).await.unwrap();
    v1_client.verify_key(key, &VerifyOptions::new()).await.unwrap();
    let conn = v2_only.connection();
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT secret_version FROM api_keys".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<i32>("", "secret_version").unwrap(), 2);
    // Configuration errors.
    let conn = v2_only.connection().clone();
    let shared = || apikeys_db::ApiKeyClient::builder().connection(conn.clone()).signing_secret(V1);
    shared().build().await.expect("a connection without pool settings is fine");
    for builder in [
        shared().max_connections(4),
        shared().connect_timeout(Duration::from_secs(1)),
        shared().acquire_timeout(Duration::from_secs(1)),
        shared().statement_timeout(Duration::from_secs(1)),
        shared().log_statements(true),
    ] {
        match builder.build().await {
            Err(Error::Configuration { reason }) => assert!(reason.contains("url"), "{reason}"),
            other => panic!("a pool setting with .connection(db) must be refused: {other:?}"),
        }
    }
    for builder in [
        db.builder().signing_secret_version(u32::MAX),
        db.builder().previous_signing_secret(1 << 31, V2),
        db.builder().max_connections(0),
        db.builder().acquire_timeout(Duration::ZERO),
        db.builder().previous_signing_secret(1, V2),
        apikeys_db::ApiKeyClient::builder().database_url(&db.url).signing_secret("short"),
        apikeys_db::ApiKeyClient::builder().database_url(&db.url),
        db.builder().key_prefix("Bad_Prefix"),
        apikeys_db::ApiKeyClient::builder().signing_secret(V1),
    ] {
        assert!(matches!(builder.build().await, Err(Error::Configuration { .. })));
    }
}

/// A deploy whose new secret kept the old secret's version label is refused before it
/// stores a hash under that label (and before `keys rehash` trusts the labels): by
/// `create_tables`, by `create_key` (nothing written), by the unrotated-key listing. The same
/// secret under a version of its own rotates as usual.
pub async fn a_mislabelled_secret_is_refused(db: TestDb) {
    use apikeys_db::{Page, StatusFilter};
    let first = db.client_with(|b| b.signing_secret(V1)).await;
    let org = org(&first, "acme").await;
    let issued = first.create_key(org, NewKey::new("k")).await.unwrap();
    let before = db.counts(&first).await;

    let mislabelled = db.builder().signing_secret(V2).build().await.unwrap();
    let configuration = |r: Result<(), Error>| match r {
        Err(Error::Configuration { reason }) => assert!(reason.contains("version 1"), "{reason}"),
        other => panic!("{other:?}"),
    };
    configuration(mislabelled.create_tables().await);
    configuration(mislabelled.create_key(org, NewKey::new("x")).await.map(drop));
    configuration(
        mislabelled
            .list_unrotated_keys(StatusFilter::Active, Page::first(10).unwrap())
            .await
            .map(drop),
    );
    configuration(mislabelled.count_unrotated_keys(StatusFilter::Active).await.map(drop));
    assert_eq!(db.counts(&first).await, before, "nothing written");
    // Rotated properly: the new secret under version 2, the old one as previous.
    let rotated = db
        .client_with(|b| {
            b.signing_secret(V2).signing_secret_version(2).previous_signing_secret(1, V1)
        })
        .await;
    rotated.create_key(org, NewKey::new("new")).await.unwrap();
    rotated.verify_key(issued.key.expose_secret(), &no_tracking()).await.unwrap();
    // A wrong previous secret under a registered version is refused too.
    let wrong_previous = db
        .builder()
        .signing_secret(V2)
        .signing_secret_version(2)
        .previous_signing_secret(1, "not-the-first-secret-0123456789-abcdefg")
        .build()
        .await
        .unwrap();
    configuration(wrong_previous.create_tables().await);
}
