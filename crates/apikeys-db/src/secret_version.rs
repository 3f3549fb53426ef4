//! The signing-secret version registry (`signing_secret_versions`): the fingerprint of the
//! secret first seen under each version label, so that a deploy whose secret carries another
//! secret's label (a mislabelled rollout) is refused before it stores a hash under that label.
//!
//! Without it, such a deploy stores hashes that no replica holding the real secret of that
//! version can verify, and `keys rehash --revoke`, which trusts the labels, would revoke the
//! keys it takes for unrotated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use apikeys_core::hazmat::KeyHasher;
use apikeys_core::{Error, Result};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::breaker::Db;
use crate::clock::{self, Clock};
use crate::convert::{naive, version_column};
use crate::error::storage;

/// The client's part that checks its signing secrets against the registry: its own
/// connection handle (the writer), the hasher's fingerprints, and whether the check passed.
pub(crate) struct SecretRegistry {
    writer: Db,
    hasher: Arc<KeyHasher>,
    clock: Clock,
    /// Set once the check passed on a connection of the registry's own.
    checked: AtomicBool,
}

impl SecretRegistry {
    pub(crate) fn new(writer: Db, hasher: Arc<KeyHasher>, clock: Clock) -> Self {
        Self { writer, hasher, clock, checked: AtomicBool::new(false) }
    }

    /// Forgets that the check passed (the tables were just created or migrated).
    pub(crate) fn reset(&self) {
        self.checked.store(false, Ordering::Release);
    }

    /// Registers the fingerprint of every signing secret this client holds under its version
    /// (if that version has none yet) and checks each against the one registered, in
    /// statements of the client's own. Once it has passed, later calls return at once (the
    /// registry only ever grows, and a version's fingerprint never changes).
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the version whose registered fingerprint is another
    /// secret's; [`Error::Unavailable`]; [`Error::Storage`].
    pub(crate) async fn check(&self) -> Result<()> {
        if self.checked.load(Ordering::Acquire) {
            return Ok(());
        }
        self.verify(&self.writer).await?;
        self.checked.store(true, Ordering::Release);
        Ok(())
    }

    /// [`check`](Self::check) on `conn`, a transaction the
    /// host owns (on SQLite it holds the only writer connection): the check runs there, and
    /// is not remembered, since the host may roll its registration back.
    pub(crate) async fn check_in<C: ConnectionTrait>(&self, conn: &C) -> Result<()> {
        if self.checked.load(Ordering::Acquire) {
            return Ok(());
        }
        self.verify(conn).await
    }

    async fn verify<C: ConnectionTrait>(&self, conn: &C) -> Result<()> {
        let backend = conn.get_database_backend();
        let insert = match backend {
            DbBackend::MySql => {
                "INSERT IGNORE INTO signing_secret_versions (version, fingerprint, created_at) \
                 VALUES (?, ?, ?)"
            }
            DbBackend::Postgres => {
                "INSERT INTO signing_secret_versions (version, fingerprint, created_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING"
            }
            _ => {
                "INSERT INTO signing_secret_versions (version, fingerprint, created_at) \
                 VALUES (?, ?, ?) ON CONFLICT (version) DO NOTHING"
            }
        };
        let now = naive(clock::now(&self.clock));
        let mut fingerprints = Vec::new();
        for (version, fingerprint) in self.hasher.fingerprints() {
            fingerprints.push((version_column(version)?, fingerprint));
        }
        for (version, fingerprint) in &fingerprints {
            let values: [Value; 3] = [(*version).into(), fingerprint.to_vec().into(), now.into()];
            let stmt = Statement::from_sql_and_values(backend, insert, values);
            conn.execute_raw(stmt).await.map_err(storage)?;
        }
        // On MySQL a locking read: inside a host's REPEATABLE READ transaction a plain one
        // would not see a row another replica registered after the transaction's snapshot.
        let select = match backend {
            DbBackend::MySql => {
                "SELECT version, fingerprint FROM signing_secret_versions LOCK IN SHARE MODE"
            }
            _ => "SELECT version, fingerprint FROM signing_secret_versions",
        };
        let rows =
            conn.query_all_raw(Statement::from_string(backend, select)).await.map_err(storage)?;
        for row in rows {
            let version: i32 = row.try_get("", "version").map_err(storage)?;
            let stored: Vec<u8> = row.try_get("", "fingerprint").map_err(storage)?;
            let mine = fingerprints.iter().find(|(v, _)| *v == version).map(|(_, f)| f);
            if mine.is_some_and(|f| f.as_slice() != stored.as_slice()) {
                return Err(Error::configuration(format!(
                    "signing secret version {version} is not the secret this database has \
                     registered under that version: each secret needs a version number of its \
                     own (check the signing secret's version setting)"
                )));
            }
        }
        Ok(())
    }
}
