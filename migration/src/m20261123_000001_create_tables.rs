//! The initial schema: organizations, projects, products, their links, keys and rate-limit
//! window counters.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DbBackend;

/// Creates every apikeys table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Organizations {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Projects {
    Table,
    Id,
    OrgId,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Products {
    Table,
    Id,
    OrgId,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ProjectProducts {
    Table,
    ProjectId,
    ProductId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    OrgId,
    ProjectId,
    ProductId,
    KeyHash,
    SecretVersion,
    Hint,
    Name,
    Scopes,
    RateLimitRequests,
    RateLimitWindow,
    Custom,
    CreatedAt,
    UpdatedAt,
    ExpiresAt,
    RevokedAt,
    LastUsedAt,
    UseCount,
}

#[derive(DeriveIden)]
enum RateLimitWindows {
    Table,
    KeyId,
    WindowStart,
    Count,
    ExpiresAt,
}

/// Column and table helpers that keep the types identical in behaviour on all three backends.
pub(crate) struct Types(pub(crate) DbBackend);

impl Types {
    /// A UTC instant, stored without a zone, with microsecond precision and no 2038 limit:
    /// `timestamp` on PostgreSQL, `DATETIME(6)` on MySQL (never `TIMESTAMP`), text on SQLite.
    pub(crate) fn time<T: IntoIden>(&self, col: T) -> ColumnDef {
        match self.0 {
            DbBackend::MySql => custom(col, Alias::new("DATETIME(6)")),
            _ => timestamp(col),
        }
    }

    pub(crate) fn time_null<T: IntoIden>(&self, col: T) -> ColumnDef {
        match self.0 {
            DbBackend::MySql => custom_null(col, Alias::new("DATETIME(6)")),
            _ => timestamp_null(col),
        }
    }

    /// `CREATE TABLE` with the exact (binary) collation on MySQL.
    pub(crate) fn table<T: IntoIden>(&self, name: T) -> TableCreateStatement {
        let mut t = Table::create();
        t.table(name);
        if self.0 == DbBackend::MySql {
            t.character_set("utf8mb4").collate("utf8mb4_bin");
        }
        t
    }
}

/// A foreign key whose rows go when the referenced row is deleted.
pub(crate) fn cascade(
    name: impl Into<String>,
    from: (impl IntoIden, impl IntoIden),
    to: (impl IntoIden, impl IntoIden),
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

// The trait's signatures elide the manager's lifetime; async_trait needs ours to match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ty = Types(manager.get_database_backend());

        manager
            .create_table(
                ty.table(Organizations::Table)
                    .col(uuid(Organizations::Id).primary_key())
                    .col(string_len(Organizations::Name, 255))
                    .col(ty.time(Organizations::CreatedAt))
                    .index(
                        Index::create()
                            .name("uq_organizations_name")
                            .col(Organizations::Name)
                            .unique(),
                    )
                    .to_owned(),
            )
            .await?;

        for (table, id, org, name, created, uq) in [
            (
                Projects::Table.into_iden(),
                Projects::Id.into_iden(),
                Projects::OrgId.into_iden(),
                Projects::Name.into_iden(),
                Projects::CreatedAt.into_iden(),
                "uq_projects_org_name",
            ),
            (
                Products::Table.into_iden(),
                Products::Id.into_iden(),
                Products::OrgId.into_iden(),
                Products::Name.into_iden(),
                Products::CreatedAt.into_iden(),
                "uq_products_org_name",
            ),
        ] {
            let fk = format!("fk_{table}_org");
            manager
                .create_table(
                    ty.table(table.clone())
                        .col(uuid(id).primary_key())
                        .col(uuid(org.clone()))
                        .col(string_len(name.clone(), 255))
                        .col(ty.time(created))
                        .index(Index::create().name(uq).col(org.clone()).col(name).unique())
                        .foreign_key(&mut cascade(
                            fk,
                            (table, org),
                            (Organizations::Table, Organizations::Id),
                        ))
                        .to_owned(),
                )
                .await?;
        }

        manager
            .create_table(
                ty.table(ProjectProducts::Table)
                    .col(uuid(ProjectProducts::ProjectId))
                    .col(uuid(ProjectProducts::ProductId))
                    .col(ty.time(ProjectProducts::CreatedAt))
                    .primary_key(
                        Index::create()
                            .name("pk_project_products")
                            .col(ProjectProducts::ProjectId)
                            .col(ProjectProducts::ProductId),
                    )
                    .foreign_key(&mut cascade(
                        "fk_project_products_project",
                        (ProjectProducts::Table, ProjectProducts::ProjectId),
                        (Projects::Table, Projects::Id),
                    ))
                    .foreign_key(&mut cascade(
                        "fk_project_products_product",
                        (ProjectProducts::Table, ProjectProducts::ProductId),
                        (Products::Table, Products::Id),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_project_products_product")
                    .table(ProjectProducts::Table)
                    .col(ProjectProducts::ProductId)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                ty.table(ApiKeys::Table)
                    .col(uuid(ApiKeys::Id).primary_key())
                    .col(uuid(ApiKeys::OrgId))
                    .col(uuid_null(ApiKeys::ProjectId))
                    .col(uuid_null(ApiKeys::ProductId))
                    .col(binary_len(ApiKeys::KeyHash, 32))
                    .col(integer(ApiKeys::SecretVersion))
                    .col(string_len(ApiKeys::Hint, 64))
                    .col(string_len(ApiKeys::Name, 255))
                    .col(json_binary(ApiKeys::Scopes))
                    .col(big_integer_null(ApiKeys::RateLimitRequests))
                    .col(string_len_null(ApiKeys::RateLimitWindow, 8))
                    .col(json_binary(ApiKeys::Custom))
                    .col(ty.time(ApiKeys::CreatedAt))
                    .col(ty.time(ApiKeys::UpdatedAt))
                    .col(ty.time_null(ApiKeys::ExpiresAt))
                    .col(ty.time_null(ApiKeys::RevokedAt))
                    .col(ty.time_null(ApiKeys::LastUsedAt))
                    .col(big_integer(ApiKeys::UseCount).default(0))
                    .index(Index::create().name("uq_api_keys_hash").col(ApiKeys::KeyHash).unique())
                    .foreign_key(&mut cascade(
                        "fk_api_keys_org",
                        (ApiKeys::Table, ApiKeys::OrgId),
                        (Organizations::Table, Organizations::Id),
                    ))
                    .foreign_key(&mut cascade(
                        "fk_api_keys_project",
                        (ApiKeys::Table, ApiKeys::ProjectId),
                        (Projects::Table, Projects::Id),
                    ))
                    .foreign_key(&mut cascade(
                        "fk_api_keys_product",
                        (ApiKeys::Table, ApiKeys::ProductId),
                        (Products::Table, Products::Id),
                    ))
                    .to_owned(),
            )
            .await?;
        // Listings: by organization or project, in id (= creation, UUID v7) order.
        for (name, col) in [
            ("ix_api_keys_org_id", ApiKeys::OrgId),
            ("ix_api_keys_project_id", ApiKeys::ProjectId),
            ("ix_api_keys_product_id", ApiKeys::ProductId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(ApiKeys::Table)
                        .col(col)
                        .col(ApiKeys::Id)
                        .to_owned(),
                )
                .await?;
        }

        manager
            .create_table(
                ty.table(RateLimitWindows::Table)
                    .col(uuid(RateLimitWindows::KeyId))
                    .col(big_integer(RateLimitWindows::WindowStart))
                    .col(big_integer(RateLimitWindows::Count))
                    .col(big_integer(RateLimitWindows::ExpiresAt))
                    .primary_key(
                        Index::create()
                            .name("pk_rate_limit_windows")
                            .col(RateLimitWindows::KeyId)
                            .col(RateLimitWindows::WindowStart),
                    )
                    .foreign_key(&mut cascade(
                        "fk_rate_limit_windows_key",
                        (RateLimitWindows::Table, RateLimitWindows::KeyId),
                        (ApiKeys::Table, ApiKeys::Id),
                    ))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_rate_limit_windows_expires_at")
                    .table(RateLimitWindows::Table)
                    .col(RateLimitWindows::ExpiresAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            RateLimitWindows::Table.into_iden(),
            ApiKeys::Table.into_iden(),
            ProjectProducts::Table.into_iden(),
            Products::Table.into_iden(),
            Projects::Table.into_iden(),
            Organizations::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}
