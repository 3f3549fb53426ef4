//! Owners as identities: the limits and credits an owner's keys share.
//!
//! `owners` holds one row per owner that has a plan, named by `(org_id, owner_id)` as keys
//! name their owner (`api_keys.owner_id`, which stays a plain label: a key whose owner has
//! no row shares nothing). The credit columns are those of `api_keys`, so the same spend
//! statement serves both; the shared limits are counted in `rate_limit_named_windows` under
//! counter ids derived from the row's id. No existing data changes.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::{Types, cascade};

/// Adds the table `owners`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Organizations {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Owners {
    Table,
    Id,
    OrgId,
    OwnerId,
    RateLimits,
    Remaining,
    RefillAmount,
    RefillInterval,
    RefilledPeriod,
    CreatedAt,
    UpdatedAt,
}

/// `(org_id, owner_id)`, for the key lookup's join and the listing. Not unique: the id is
/// derived from the pair, so the primary key already is, and a second unique index would
/// make PostgreSQL's `ON CONFLICT (id)` of two racing inserts fail on it.
const OWNER_INDEX: &str = "ix_owners_org_owner";

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());
        manager
            .create_table(
                ty.table(Owners::Table)
                    .col(uuid(Owners::Id).primary_key())
                    .col(uuid(Owners::OrgId))
                    .col(string_len(Owners::OwnerId, 255))
                    .col(json_binary_null(Owners::RateLimits))
                    .col(big_integer_null(Owners::Remaining))
                    .col(big_integer_null(Owners::RefillAmount))
                    .col(string_len_null(Owners::RefillInterval, 8))
                    .col(big_integer_null(Owners::RefilledPeriod))
                    .col(ty.time(Owners::CreatedAt))
                    .col(ty.time(Owners::UpdatedAt))
                    .foreign_key(&mut cascade(
                        "fk_owners_org",
                        (Owners::Table, Owners::OrgId),
                        (Organizations::Table, Organizations::Id),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(OWNER_INDEX)
                    .table(Owners::Table)
                    .col(Owners::OrgId)
                    .col(Owners::OwnerId)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Owners::Table).if_exists().to_owned()).await?;
        Ok(())
    }
}
