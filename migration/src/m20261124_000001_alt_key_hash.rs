//! A second stored hash per key, for signing-secret rotation across a rolling deploy.
//!
//! While a client holds a current and a previous signing secret, it stores a key's hash under
//! both: `key_hash` under the current secret, `alt_key_hash` under the previous one. Replicas
//! still on the old secret alone then keep finding keys that new replicas created or
//! re-hashed, and a rollback loses nothing.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

/// Adds `alt_key_hash` and `alt_secret_version` to `api_keys`, with an index.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    AltKeyHash,
    AltSecretVersion,
}

const INDEX: &str = "ix_api_keys_alt_hash";

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(binary_len_null(ApiKeys::AltKeyHash, 32))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(integer_null(ApiKeys::AltSecretVersion))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(ApiKeys::Table)
                    .col(ApiKeys::AltKeyHash)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(INDEX).table(ApiKeys::Table).to_owned()).await?;
        for column in [ApiKeys::AltSecretVersion, ApiKeys::AltKeyHash] {
            manager
                .alter_table(Table::alter().table(ApiKeys::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
