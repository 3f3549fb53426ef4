//! The apikeys schema as [sea-orm-migration](https://docs.rs/sea-orm-migration) steps.
//!
//! Run it with the CLI (`sea-orm-cli migrate up -d migration -u URL`, or
//! `cargo run -p apikeys-migration -- up -u URL`), or let `ApiKeyClient::create_tables` run the
//! same [`Migrator`] on start-up.
//!
//! A host application with its own migrator can append ours:
//!
//! ```
//! use sea_orm_migration::prelude::*;
//!
//! pub struct AppMigrator;
//!
//! impl MigratorTrait for AppMigrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all = migration::Migrator::migrations();
//!         // all.push(Box::new(m20270101_000001_app_tables::Migration));
//!         all
//!     }
//! }
//! # fn main() { assert!(!AppMigrator::migrations().is_empty()); }
//! ```
//!
//! ## Column types
//! Times are UTC, stored without a zone: `timestamp` on PostgreSQL, `DATETIME(6)` on
//! MySQL/MariaDB (microseconds, no 2038 limit, no session time-zone conversion) and ISO-8601
//! text on SQLite.
//! Ids are UUIDs (`uuid`, `binary(16)`, blob). Key hashes are 32 bytes of binary. Scopes and
//! custom metadata are JSON. On MySQL every table uses `utf8mb4` with the binary collation, so
//! names compare exactly (case-sensitive) as on the other two databases.

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-migration/0.1.0")]

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_create_tables;
mod m20261124_000001_alt_key_hash;
mod m20261125_000001_key_changes;
mod m20261126_000001_key_lifecycle;
mod m20261205_000001_feed_token;
mod m20261205_000002_owners_and_lineage;
mod m20261205_000003_disable_and_ip_allowlist;
mod m20261206_000001_named_rate_limits;
mod m20261206_000002_owner_plans;

/// Runs the apikeys migrations in order.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_create_tables::Migration),
            Box::new(m20261124_000001_alt_key_hash::Migration),
            Box::new(m20261125_000001_key_changes::Migration),
            Box::new(m20261126_000001_key_lifecycle::Migration),
            Box::new(m20261205_000001_feed_token::Migration),
            Box::new(m20261205_000002_owners_and_lineage::Migration),
            Box::new(m20261205_000003_disable_and_ip_allowlist::Migration),
            Box::new(m20261206_000001_named_rate_limits::Migration),
            Box::new(m20261206_000002_owner_plans::Migration),
        ]
    }
}
