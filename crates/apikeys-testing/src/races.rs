//! Helpers of the race tests: a stuck writer, the hot path and the admin calls that race it,
//! and the tally of what the hot path saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use apikeys_db::ApiKeyClient;
use apikeys_db::sea_orm::{ConnectionTrait, Database};

use crate::db::TestDb;

/// Another connection, holding a lock on every key row (on SQLite: the database's write
/// lock) until the returned transaction ends: what a stuck writer elsewhere looks like.
///
/// # Panics
/// If the connection or the lock cannot be had.
pub async fn hold_key_rows(
    db: &TestDb,
) -> (apikeys_db::sea_orm::DatabaseConnection, apikeys_db::sea_orm::DatabaseTransaction) {
    use apikeys_db::sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    let other = Database::connect(&db.url).await.unwrap();
    let options = TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    };
    let txn = other.begin_with_options(options).await.unwrap();
    txn.execute_unprepared("UPDATE api_keys SET name = 'held'").await.unwrap();
    (other, txn)
}

/// Outcomes seen by the hot path while admins act on the same keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Checks that passed.
    pub ok: usize,
    /// Checks refused with `Error::InvalidKey` (the key was deleted).
    pub invalid_key: usize,
    /// Checks refused with `Error::Revoked`.
    pub revoked: usize,
    /// Anything else: each one is a failure of the race tests.
    pub other: Vec<String>,
}

impl Tally {
    /// Counts the outcome of one check.
    pub fn add(&mut self, r: &apikeys_db::Result<apikeys_db::ApiKey>) {
        match r {
            Ok(_) => self.ok += 1,
            Err(apikeys_db::Error::InvalidKey) => self.invalid_key += 1,
            Err(apikeys_db::Error::Revoked { .. }) => self.revoked += 1,
            Err(e) => self.other.push(format!("{e:?}")),
        }
    }
    /// Adds another task's tally to this one.
    pub fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.invalid_key += o.invalid_key;
        self.revoked += o.revoked;
        self.other.extend(o.other);
    }
}

/// One hot-path task: checks `keys` round-robin (tracked and untracked verify, validate
/// with and without the shared rate limit) until `stop` is set.
pub async fn hot_path_until(
    client: ApiKeyClient,
    keys: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    seed: usize,
) -> Tally {
    use apikeys_db::{ValidateOptions, VerifyOptions};
    let mut tally = Tally::default();
    let mut i = seed;
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[i % keys.len()];
        let r = match i % 4 {
            0 => client.validate_key(key, &ValidateOptions::new()).await,
            1 => client.verify_key(key, &VerifyOptions::new()).await,
            2 => client.validate_key(key, &ValidateOptions::new().track_usage(false)).await,
            _ => client.verify_key(key, &VerifyOptions::new().track_usage(false)).await,
        };
        tally.add(&r);
        i += 1;
    }
    tally
}

/// The admin side of the race tests on the keys `ids` (in order): key i is deleted (i % 3
/// == 0), revoked then deleted (1), or updated and deleted at the same moment (2). Every
/// call must end in its documented outcome; returns the other ones.
///
/// # Panics
/// Never in practice (its rate limit is a valid constant).
pub async fn admin_races(client: &ApiKeyClient, ids: &[apikeys_db::KeyId]) -> Vec<String> {
    use apikeys_db::{Error, KeyUpdate, RateLimit};
    let mut wrong = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        match i % 3 {
            0 => {
                if let Err(e) = client.delete_key(*id).await {
                    wrong.push(format!("delete: {e:?}"));
                }
            }
            1 => {
                let (revoke, delete) = tokio::join!(client.revoke_key(*id), client.delete_key(*id));
                match revoke {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => wrong.push(format!("revoke racing delete: {e:?}")),
                }
                if let Err(e) = delete {
                    wrong.push(format!("delete racing revoke: {e:?}"));
                }
            }
            _ => {
                let update = KeyUpdate::new()
                    .with_name("renamed")
                    .with_rate_limit(Some(RateLimit::per_hour(5_000).unwrap()));
                let (update, delete) =
                    tokio::join!(client.update_key(*id, update), client.delete_key(*id));
                match update {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => wrong.push(format!("update racing delete: {e:?}")),
                }
                if let Err(e) = delete {
                    wrong.push(format!("delete racing update: {e:?}"));
                }
            }
        }
    }
    wrong
}
