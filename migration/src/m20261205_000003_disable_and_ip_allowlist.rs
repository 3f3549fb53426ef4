//! A reversible switch and an IP allowlist per key.
//!
//! `disabled_at` is set while a key is disabled (refused until enabled again; unlike
//! `revoked_at`, it can be cleared). `allowed_ips` is the JSON array of networks the key may
//! be used from (`NULL`: any address). Existing keys get neither: they stay enabled and usable
//! from anywhere.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::Types;

/// Adds `api_keys.disabled_at` and `api_keys.allowed_ips`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    DisabledAt,
    AllowedIps,
}

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());
        for mut column in [ty.time_null(ApiKeys::DisabledAt), json_binary_null(ApiKeys::AllowedIps)]
        {
            manager
                .alter_table(
                    Table::alter().table(ApiKeys::Table).add_column(&mut column).to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [ApiKeys::AllowedIps, ApiKeys::DisabledAt] {
            manager
                .alter_table(Table::alter().table(ApiKeys::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
