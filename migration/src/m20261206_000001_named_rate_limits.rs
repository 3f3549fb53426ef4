//! Named rate limits per key, beside the main one.
//!
//! `api_keys.rate_limits` is the JSON object of a key's named limits (`NULL`: none). Their
//! windows are counted in `rate_limit_named_windows`, which has the columns of
//! `rate_limit_windows`; its `key_id` holds a counter id derived from the key's id and the
//! limit's name, so it has no foreign key: its rows are purged by their end, like the others.
//! Existing keys get no named limit.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::Types;

/// Adds `api_keys.rate_limits` and the table `rate_limit_named_windows`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    RateLimits,
}

#[derive(DeriveIden)]
enum RateLimitNamedWindows {
    Table,
    KeyId,
    WindowStart,
    Count,
    ExpiresAt,
}

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(json_binary_null(ApiKeys::RateLimits))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                ty.table(RateLimitNamedWindows::Table)
                    .col(uuid(RateLimitNamedWindows::KeyId))
                    .col(big_integer(RateLimitNamedWindows::WindowStart))
                    .col(big_integer(RateLimitNamedWindows::Count))
                    .col(big_integer(RateLimitNamedWindows::ExpiresAt))
                    .primary_key(
                        Index::create()
                            .name("pk_rate_limit_named_windows")
                            .col(RateLimitNamedWindows::KeyId)
                            .col(RateLimitNamedWindows::WindowStart),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_rate_limit_named_windows_expires_at")
                    .table(RateLimitNamedWindows::Table)
                    .col(RateLimitNamedWindows::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RateLimitNamedWindows::Table).if_exists().to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter().table(ApiKeys::Table).drop_column(ApiKeys::RateLimits).to_owned(),
            )
            .await?;
        Ok(())
    }
}
