//! What lets a reader of the change feed, and a client holding a signing secret, notice that
//! the database is not the one they knew.
//!
//! - `key_changes.token`: a random number per feed row. A reader remembers the token of the
//!   last row it applied and checks it on every poll, so a feed whose sequence numbers were
//!   given out again (a point-in-time restore, a failover to a replica that lost commits, the
//!   tables dropped and created again) is noticed even once its head has climbed back past
//!   the reader's position. Rows written before this step have none.
//! - `signing_secret_versions`: one row per signing-secret version label, with a fingerprint
//!   of the secret (an HMAC under it of a fixed message, which reveals nothing of the secret).
//!   A client whose secret does not match the fingerprint stored under its label is refused
//!   before it stores a hash under that label.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

use crate::m20261123_000001_create_tables::Types;

/// Adds `token` to `key_changes` and creates `signing_secret_versions`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum KeyChanges {
    Table,
    Token,
}

#[derive(DeriveIden)]
enum SigningSecretVersions {
    Table,
    Version,
    Fingerprint,
    CreatedAt,
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
                    .table(KeyChanges::Table)
                    .add_column(big_integer_null(KeyChanges::Token))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                ty.table(SigningSecretVersions::Table)
                    .col(integer(SigningSecretVersions::Version).primary_key())
                    .col(binary_len(SigningSecretVersions::Fingerprint, 32))
                    .col(ty.time(SigningSecretVersions::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SigningSecretVersions::Table).if_exists().to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter().table(KeyChanges::Table).drop_column(KeyChanges::Token).to_owned(),
            )
            .await
    }
}
