//! Organizations: race-safe `get_or_create_organization`, strict `create_organization`,
//! reads; and the two helpers every idempotent insert uses (here, `org_child` and `link`).

use apikeys_core::hazmat::validate_name;
use apikeys_core::{Error, KeyAction, OrgId, Organization, Result};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Select, TryInsertResult,
};

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::organization;
use crate::error::{Vanished, is_unique_violation, storage};

/// How often an idempotent call inserts again when the row it found was deleted before it
/// could read it back.
pub(crate) const VANISHED_RETRIES: usize = 3;

/// How an idempotent write reads back a row by its unique name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// A plain read, for the public `find_*` calls: never waits for another transaction.
    Plain,
    /// The latest committed row, whatever the transaction's snapshot: MySQL's plain reads
    /// under `REPEATABLE READ` (its default) would not see a row another transaction
    /// committed after this one's first read, which a `get_or_create_*` in a host
    /// transaction must find, so there it is a locking read (`LOCK IN SHARE MODE`), which
    /// waits for a transaction still writing that row. PostgreSQL and SQLite need nothing
    /// (README, "Host transactions").
    Latest,
}

impl Read {
    pub(crate) fn apply<E: EntityTrait>(self, select: Select<E>, backend: DbBackend) -> Select<E> {
        if self == Read::Latest && backend == DbBackend::MySql {
            select.lock_shared()
        } else {
            select
        }
    }
}

/// Inserts `row` unless its unique columns are taken; returns whether it inserted. One
/// statement that leaves the surrounding transaction usable either way: PostgreSQL aborts a
/// transaction on any error, so there it is `ON CONFLICT DO NOTHING` (its affected-row count
/// is exact); MySQL's is not (an ignored duplicate may count as found), but MySQL and SQLite
/// roll back only the failed statement, so there a duplicate-key error means "taken".
pub(crate) async fn insert_unique<E, C, I>(
    conn: &C,
    row: E::ActiveModel,
    unique: I,
) -> Result<bool, DbErr>
where
    E: EntityTrait,
    C: ConnectionTrait,
    I: IntoIterator<Item = E::Column>,
{
    let insert = E::insert(row);
    if conn.get_database_backend() == DbBackend::Postgres {
        let res = insert.on_conflict_do_nothing_on(unique).exec_without_returning(conn).await?;
        return Ok(matches!(res, TryInsertResult::Inserted(n) if n > 0));
    }
    match insert.exec_without_returning(conn).await {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

impl ApiKeyClient {
    /// Returns the organization named `name`, creating it if it does not exist; the flag says
    /// whether this call created it.
    ///
    /// Race-safe across tasks, processes and replicas: it inserts with "on conflict do
    /// nothing" on the unique name and then reads the row by name, so concurrent callers end
    /// with one row and all get its id.
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::ApiKeyClient;
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// // On every deploy, from every replica:
    /// let (org, created) = client.get_or_create_organization("acme").await?;
    /// let (again, created_again) = client.get_or_create_organization("acme").await?;
    /// assert!(created && !created_again && org.id == again.id);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`) for a bad name; [`Error::Storage`].
    pub async fn get_or_create_organization(&self, name: &str) -> Result<(Organization, bool)> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.get_or_create_organization_on(txn, name).await).await
    }

    /// [`get_or_create_organization`](Self::get_or_create_organization) on `conn`.
    pub(crate) async fn get_or_create_organization_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        name: &str,
    ) -> Result<(Organization, bool)> {
        validate_name("name", name)?;
        for _ in 0..VANISHED_RETRIES {
            let now = self.now();
            let id = self.new_id(now);
            let row = organization::ActiveModel {
                id: Set(id),
                name: Set(name.to_owned()),
                created_at: Set(naive(now)),
            };
            organization::Entity::insert(row)
                .on_conflict_do_nothing_on([organization::Column::Name])
                .exec_without_returning(conn)
                .await
                .map_err(storage)?;
            if let Some(found) = find_organization_on(conn, name, Read::Latest).await? {
                let created = found.id.as_uuid() == id;
                if created {
                    self.audit(conn, KeyAction::OrganizationCreated, Subject::org(found.id))
                        .await?;
                }
                return Ok((found, created));
            }
        }
        Err(Error::conflict(Vanished("organization")))
    }

    /// Creates an organization.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing organization's id if the name is taken;
    /// [`Error::InvalidInput`] (field `name`); [`Error::Storage`].
    pub async fn create_organization(&self, name: &str) -> Result<Organization> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.create_organization_on(txn, name).await).await
    }

    /// [`create_organization`](Self::create_organization) on `conn`.
    pub(crate) async fn create_organization_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        name: &str,
    ) -> Result<Organization> {
        validate_name("name", name)?;
        let now = self.now();
        let row = organization::Model {
            id: self.new_id(now),
            name: name.to_owned(),
            created_at: naive(now),
        };
        let active = organization::ActiveModel::from(row.clone());
        let unique = [organization::Column::Name];
        if insert_unique::<organization::Entity, _, _>(conn, active, unique)
            .await
            .map_err(storage)?
        {
            let org = Organization::from(row);
            self.audit(conn, KeyAction::OrganizationCreated, Subject::org(org.id)).await?;
            return Ok(org);
        }
        match find_organization_on(conn, name, Read::Latest).await? {
            Some(existing) => Err(Error::AlreadyExists { existing: existing.id.into() }),
            // Taken, then deleted before we read it: say it was taken, without an id.
            None => Err(Error::conflict(Vanished("organization"))),
        }
    }

    /// The organization with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_organization(&self, id: OrgId) -> Result<Organization> {
        organization::Entity::find_by_id(id.as_uuid())
            .one(self.db())
            .await
            .map_err(storage)?
            .map(Organization::from)
            .ok_or(Error::NotFound { id: id.into() })
    }

    /// The organization with this exact name, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_organization(&self, name: &str) -> Result<Option<Organization>> {
        find_organization_on(self.db(), name, Read::Plain).await
    }

    /// Every organization, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_organizations(&self) -> Result<Vec<Organization>> {
        Ok(organization::Entity::find()
            .order_by_asc(organization::Column::Name)
            .all(self.db())
            .await
            .map_err(storage)?
            .into_iter()
            .map(Organization::from)
            .collect())
    }
}

async fn find_organization_on<C: ConnectionTrait>(
    conn: &C,
    name: &str,
    read: Read,
) -> Result<Option<Organization>> {
    let select = organization::Entity::find().filter(organization::Column::Name.eq(name));
    Ok(read
        .apply(select, conn.get_database_backend())
        .one(conn)
        .await
        .map_err(storage)?
        .map(Organization::from))
}
