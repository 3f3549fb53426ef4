//! The change feed: how a change made by one replica reaches the verified-key caches of the
//! others.
//!
//! Every change that a cached key could go stale on (a key updated, revoked or deleted, a
//! product linked to or unlinked from a project) appends a row to `key_changes`, in the same
//! transaction as the change. Sequence numbers come from the one row of `key_changes_head`,
//! which each writer increments first: that row's lock makes writers take turns, so the
//! numbers are gapless and commit in order, and a reader that has seen number `n` has seen
//! every change before it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::Types;

/// Creates `key_changes` and `key_changes_head` (with its one row, at 0).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum KeyChanges {
    Table,
    Seq,
    KeyId,
    ProjectId,
    ProductId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum KeyChangesHead {
    Table,
    Id,
    Seq,
}

// async_trait's expansion cannot name SchemaManager's lifetime (see the first migration).
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());
        manager
            .create_table(
                ty.table(KeyChanges::Table)
                    .col(big_integer(KeyChanges::Seq).primary_key())
                    .col(uuid_null(KeyChanges::KeyId))
                    .col(uuid_null(KeyChanges::ProjectId))
                    .col(uuid_null(KeyChanges::ProductId))
                    .col(ty.time(KeyChanges::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                ty.table(KeyChangesHead::Table)
                    .col(integer(KeyChangesHead::Id).primary_key())
                    .col(big_integer(KeyChangesHead::Seq))
                    .to_owned(),
            )
            .await?;
        let mut head = Query::insert();
        head.into_table(KeyChangesHead::Table)
            .columns([KeyChangesHead::Id, KeyChangesHead::Seq])
            .values([1.into(), 0_i64.into()])
            .map_err(|e| DbErr::Migration(e.to_string()))?;
        manager.exec_stmt(head).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [KeyChangesHead::Table.into_iden(), KeyChanges::Table.into_iden()] {
            manager.drop_table(Table::drop().table(table).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}
