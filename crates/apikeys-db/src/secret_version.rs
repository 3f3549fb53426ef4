//! The signing-secret version registry (`signing_secret_versions`): the fingerprint of the
//! secret first seen under each version label, so that a deploy whose secret carries another
//! secret's label (a mislabelled rollout) is refused before it stores a hash under that label.
//!
//! Without it, such a deploy stores hashes that no replica holding the real secret of that
//! version can verify, and `keys rehash --revoke`, which trusts the labels, would revoke the
//! keys it takes for unrotated.

use apikeys_core::{Error, Result};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::client::ApiKeyClient;
use crate::convert::{naive, version_column};
use crate::error::storage;

impl ApiKeyClient {
    /// Registers the fingerprint of every signing secret this client holds under its version
    /// (if that version has none yet) and checks each against the one registered, on `conn`.
    /// Once it has passed, later calls return at once (the registry only ever grows, and a
    /// version's fingerprint never changes).
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the version whose registered fingerprint is another
    /// secret's; [`Error::Unavailable`]; [`Error::Storage`].
    pub(crate) async fn check_secret_versions<C: ConnectionTrait>(&self, conn: &C) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.secrets_checked.load(Ordering::Acquire) {
            return Ok(());
        }
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
        let now = naive(self.now());
        let mut fingerprints = Vec::new();
        for (version, fingerprint) in self.inner.hasher.fingerprints() {
            fingerprints.push((version_column(version)?, fingerprint));
        }
        for (version, fingerprint) in &fingerprints {
            let version = *version;
            let values: [Value; 3] = [version.into(), fingerprint.to_vec().into(), now.into()];
            let stmt = Statement::from_sql_and_values(backend, insert, values);
            conn.execute_raw(stmt).await.map_err(storage)?;
        }
        let select = "SELECT version, fingerprint FROM signing_secret_versions";
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
        self.inner.secrets_checked.store(true, Ordering::Release);
        Ok(())
    }
}
