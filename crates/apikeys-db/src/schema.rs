//! The schema's migrations without a client: [`ApiKeysSchema`] is for deploy tooling (the `apikeys`
//! CLI's `migrate`) that runs migrations and holds no signing secret. The locked migration
//! itself is shared with [`ApiKeyClient::create_tables`](crate::ApiKeyClient::create_tables).

use std::fmt;
use std::time::Duration;

use apikeys_core::{Error, Result};
use migration::MigratorTrait;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};

use crate::connect::{DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, Settings};
use crate::error::storage;

/// Key of the PostgreSQL advisory lock that serializes migrations
/// (the ASCII bytes of "apikeys\0" as a big-endian integer).
const MIGRATION_LOCK_ID: i64 = 0x6170_696b_6579_7300;
/// Name of the MySQL lock that serializes migrations.
const MIGRATION_LOCK_NAME: &str = "apikeys_migrations";
/// How long a MySQL migration waits for another process's lock, in seconds.
const MIGRATION_LOCK_WAIT_SECS: u32 = 60;
/// The statement timeout of [`ApiKeysSchema`]'s connection: a migration may rewrite a large table,
/// and waits up to a minute for the lock, so the hot path's few seconds do not fit it.
const SCHEMA_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Another process held the migration lock for longer than we wait.
#[derive(Debug, thiserror::Error)]
#[error("timed out waiting for the apikeys migration lock held by another process")]
struct MigrationLockTimeout;

/// Runs the pending migrations in `txn` (a write transaction: `BEGIN IMMEDIATE` on SQLite)
/// under the migration lock, commits, and returns the names of the migrations applied.
pub(crate) async fn migrate_locked(txn: DatabaseTransaction) -> Result<Vec<String>> {
    let backend = txn.get_database_backend();
    match backend {
        DbBackend::Postgres => {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"))
                .await
                .map_err(storage)?;
        }
        DbBackend::MySql => {
            // MySQL commits DDL implicitly, so the transaction only pins one connection;
            // the named lock belongs to that session until released (or disconnected).
            let sql = format!(
                "SELECT GET_LOCK('{MIGRATION_LOCK_NAME}', {MIGRATION_LOCK_WAIT_SECS}) AS got"
            );
            let row =
                txn.query_one_raw(Statement::from_string(backend, sql)).await.map_err(storage)?;
            let got = row.and_then(|r| r.try_get::<Option<i64>>("", "got").ok()).flatten();
            if got != Some(1) {
                return Err(Error::storage(MigrationLockTimeout));
            }
        }
        // BEGIN IMMEDIATE already holds the database's write lock.
        _ => {}
    }
    let result = async {
        let pending = migration::Migrator::get_pending_migrations(&txn).await.map_err(storage)?;
        migration::Migrator::up(&txn, None).await.map_err(storage)?;
        Ok(pending.iter().map(|m| m.name().to_owned()).collect())
    }
    .await;
    if backend == DbBackend::MySql {
        let sql = format!("SELECT RELEASE_LOCK('{MIGRATION_LOCK_NAME}')");
        txn.execute_unprepared(&sql).await.map_err(storage)?;
    }
    let applied = result?;
    txn.commit().await.map_err(storage)?;
    Ok(applied)
}

/// One migration of the apikeys schema and whether the database has it, as
/// [`ApiKeysSchema::status`] lists them.
///
/// Named for apikeys so that it can be imported beside sea-orm-migration's `Migration` and
/// `MigrationStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeysMigration {
    /// The migration's name, for instance `m20261123_000001_create_tables`.
    pub name: String,
    /// Whether the database has it applied.
    pub applied: bool,
}

/// The apikeys schema of one database, reached without a signing secret: what a deploy step
/// that only runs migrations needs.
///
/// [`up`](Self::up) takes the same lock as
/// [`ApiKeyClient::create_tables`](crate::ApiKeyClient::create_tables), so any number of
/// them may run at once, from any number of processes: one applies, the others find nothing
/// left to do.
///
/// Named for apikeys so that it can be imported beside `sea_orm::Schema`.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> apikeys_db::Result<()> {
/// let schema = apikeys_db::ApiKeysSchema::connect("sqlite::memory:").await?;
/// assert!(schema.status().await?.iter().all(|m| !m.applied));
/// let applied = schema.up().await?;
/// assert!(!applied.is_empty());
/// assert!(schema.up().await?.is_empty());
/// assert!(schema.status().await?.iter().all(|m| m.applied));
/// # Ok(())
/// # }
/// ```
pub struct ApiKeysSchema {
    db: DatabaseConnection,
}

impl fmt::Debug for ApiKeysSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeysSchema").field("backend", &self.db.get_database_backend()).finish()
    }
}

impl ApiKeysSchema {
    /// Connects to the database at `url` (the URLs [`ClientBuilder::database_url`] takes,
    /// checked the same way) with a statement timeout long enough for migrations.
    ///
    /// [`ClientBuilder::database_url`]: crate::ClientBuilder::database_url
    ///
    /// # Errors
    /// [`Error::Configuration`] if the URL does not parse or names a database this build has
    /// no support for; [`Error::Unavailable`] or [`Error::Storage`] if connecting fails. No
    /// error contains the URL's password.
    pub async fn connect(url: &str) -> Result<Self> {
        let settings = Settings {
            max_connections: Some(1),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            statement_timeout: SCHEMA_STATEMENT_TIMEOUT,
            log_statements: false,
        };
        let (_, writer) = crate::connect::open(url, &settings).await?;
        Ok(Self { db: writer })
    }

    /// Every migration this build knows, oldest first, and whether the database has it.
    /// Reads only: a database without the migrations table has them all pending.
    ///
    /// # Errors
    /// [`Error::Storage`] if the database cannot be read, or has applied a migration this
    /// build does not know (it was migrated by a newer release).
    pub async fn status(&self) -> Result<Vec<ApiKeysMigration>> {
        let pending = migration::Migrator::get_pending_migrations_read_only(&self.db)
            .await
            .map_err(storage)?;
        let pending: Vec<&str> = pending.iter().map(|m| m.name()).collect();
        Ok(migration::Migrator::migrations()
            .iter()
            .map(|m| ApiKeysMigration {
                name: m.name().to_owned(),
                applied: !pending.contains(&m.name()),
            })
            .collect())
    }

    /// Applies the pending migrations under the migration lock and returns their names (none
    /// when the schema was already current).
    ///
    /// # Errors
    /// [`Error::Storage`] if a migration fails or the lock cannot be taken within a minute;
    /// [`Error::Unavailable`] if the database cannot be reached.
    pub async fn up(&self) -> Result<Vec<String>> {
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        let txn = self.db.begin_with_options(options).await.map_err(storage)?;
        migrate_locked(txn).await
    }
}
