//! Organizations: race-safe `get_or_create_organization`, strict `create_organization`,
//! reads.

use apikeys_core::hazmat::validate_name;
use apikeys_core::{Error, KeyAction, KeyPage, OrgId, Organization, Page, Result};

use crate::key_list::page_rows;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
};

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::organization;
use crate::error::{Vanished, storage};
use crate::idempotent::{Read, VANISHED_RETRIES, insert_unique};

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

    /// The organizations a page at a time, oldest first (the cursor is an organization's
    /// id).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_organizations_page(
        &self,
        page: Page,
    ) -> Result<KeyPage<Organization, OrgId>> {
        let query = organization::Entity::find();
        let (rows, more) = page_rows(self.db(), query, organization::Column::Id, page).await?;
        let items: Vec<Organization> = rows.into_iter().map(Organization::from).collect();
        let next = if more { items.last().map(|o| o.id) } else { None };
        Ok(KeyPage { items, next })
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
