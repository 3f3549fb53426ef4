//! Owners per organization, and the lineage of rolled keys.
//!
//! An owner id is the host's id of a user or customer, and two organizations (tenants) may
//! well use the same one: "every key of this owner" is asked within one organization, so the
//! owner index becomes `(org_id, owner_id, id)` (the listing's order) in place of the
//! owner-only one.
//!
//! `lineage_head_id` is set on a key that was rolled: the newest key of its lineage (the key
//! it was rolled to, or that key's successor, ...), whose rate-limit windows it counts in
//! during its grace period, so that an old key and its successors share one budget. `NULL`
//! on a key never rolled. Keys rolled before this step get the key they were rolled to.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

/// Makes the owner index per organization and adds `api_keys.lineage_head_id`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    OrgId,
    OwnerId,
    RolledTo,
    LineageHeadId,
}

/// The owner-only index of `m20261126_000001_key_lifecycle`, replaced here.
const OWNER_INDEX: &str = "ix_api_keys_owner";
const ORG_OWNER_INDEX: &str = "ix_api_keys_org_owner";
const LINEAGE_INDEX: &str = "ix_api_keys_lineage_head";

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(ORG_OWNER_INDEX)
                    .table(ApiKeys::Table)
                    .col(ApiKeys::OrgId)
                    .col(ApiKeys::OwnerId)
                    .col(ApiKeys::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(Index::drop().name(OWNER_INDEX).table(ApiKeys::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(uuid_null(ApiKeys::LineageHeadId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(LINEAGE_INDEX)
                    .table(ApiKeys::Table)
                    .col(ApiKeys::LineageHeadId)
                    .to_owned(),
            )
            .await?;
        // Keys rolled before: their successor is their lineage's head (one step; a key
        // rolled twice before this step counts in its direct successor's windows).
        manager
            .exec_stmt(
                Query::update()
                    .table(ApiKeys::Table)
                    .value(ApiKeys::LineageHeadId, Expr::col(ApiKeys::RolledTo))
                    .and_where(Expr::col(ApiKeys::RolledTo).is_not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name(LINEAGE_INDEX).table(ApiKeys::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter().table(ApiKeys::Table).drop_column(ApiKeys::LineageHeadId).to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(OWNER_INDEX)
                    .table(ApiKeys::Table)
                    .col(ApiKeys::OwnerId)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(Index::drop().name(ORG_OWNER_INDEX).table(ApiKeys::Table).to_owned())
            .await
    }
}
