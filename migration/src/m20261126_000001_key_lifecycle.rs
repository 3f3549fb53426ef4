//! The key lifecycle: owners, usage credits, rolls, and the audit trail.
//!
//! `api_keys` gains an external owner id (indexed, for "every key of this user"), a credit
//! balance with an optional refill rule, the links of a roll (`rolled_from`, `rolled_to`),
//! and an index on `expires_at` (for "keys expiring soon"). `key_events` is the append-only
//! audit trail: one row per change, written in the change's transaction, kept when its key
//! is deleted. It holds ids, an action, a time and the actor the caller named; never a
//! key's name, scopes or metadata.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::Types;

/// Adds the lifecycle columns to `api_keys` and creates `key_events`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    OwnerId,
    Remaining,
    RefillAmount,
    RefillInterval,
    RefilledPeriod,
    RolledFrom,
    RolledTo,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum KeyEvents {
    Table,
    Id,
    At,
    Action,
    KeyId,
    OrgId,
    ProjectId,
    ProductId,
    RelatedKeyId,
    Actor,
}

const OWNER_INDEX: &str = "ix_api_keys_owner";
const EXPIRY_INDEX: &str = "ix_api_keys_expires_at";
const EVENTS_INDEX: &str = "ix_key_events_key";

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());
        // One column per statement: SQLite alters one thing at a time.
        for column in [
            string_len_null(ApiKeys::OwnerId, 255),
            big_integer_null(ApiKeys::Remaining),
            big_integer_null(ApiKeys::RefillAmount),
            string_len_null(ApiKeys::RefillInterval, 8),
            big_integer_null(ApiKeys::RefilledPeriod),
            uuid_null(ApiKeys::RolledFrom),
            uuid_null(ApiKeys::RolledTo),
        ] {
            let mut column = column;
            manager
                .alter_table(
                    Table::alter().table(ApiKeys::Table).add_column(&mut column).to_owned(),
                )
                .await?;
        }
        for (name, column) in [(OWNER_INDEX, ApiKeys::OwnerId), (EXPIRY_INDEX, ApiKeys::ExpiresAt)]
        {
            manager
                .create_index(
                    Index::create().name(name).table(ApiKeys::Table).col(column).to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                ty.table(KeyEvents::Table)
                    .col(uuid(KeyEvents::Id).primary_key())
                    .col(ty.time(KeyEvents::At))
                    .col(string_len(KeyEvents::Action, 16))
                    .col(uuid_null(KeyEvents::KeyId))
                    .col(uuid_null(KeyEvents::OrgId))
                    .col(uuid_null(KeyEvents::ProjectId))
                    .col(uuid_null(KeyEvents::ProductId))
                    .col(uuid_null(KeyEvents::RelatedKeyId))
                    .col(string_len_null(KeyEvents::Actor, 255))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(EVENTS_INDEX)
                    .table(KeyEvents::Table)
                    .col(KeyEvents::KeyId)
                    .col(KeyEvents::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(KeyEvents::Table).if_exists().to_owned()).await?;
        for name in [OWNER_INDEX, EXPIRY_INDEX] {
            manager.drop_index(Index::drop().name(name).table(ApiKeys::Table).to_owned()).await?;
        }
        for column in [
            ApiKeys::RolledTo,
            ApiKeys::RolledFrom,
            ApiKeys::RefilledPeriod,
            ApiKeys::RefillInterval,
            ApiKeys::RefillAmount,
            ApiKeys::Remaining,
            ApiKeys::OwnerId,
        ] {
            manager
                .alter_table(Table::alter().table(ApiKeys::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
