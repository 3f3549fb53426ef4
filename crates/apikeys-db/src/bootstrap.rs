//! Organizations, projects and products: race-safe `get_or_create_*`, strict `create_*`,
//! reads and links.
//!
//! Projects and products have the same shape (an organization, a name unique in it, a
//! creation time), so their operations are written once, generically over [`OrgChild`],
//! and each public method is a plain one-line call.

use apikeys_core::hazmat::validate_name;
use apikeys_core::{
    Error, OrgId, Organization, Product, ProductId, Project, ProjectId, RecordId, Result,
};
use chrono::NaiveDateTime;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Select, TryInsertResult,
};
use uuid::Uuid;

use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::{organization, product, project, project_product};
use crate::error::{Vanished, is_missing_parent, is_unique_violation, missing_parent, storage};

/// How often an idempotent call inserts again when the row it found was deleted before it
/// could read it back.
const VANISHED_RETRIES: usize = 3;

/// A record that belongs to one organization and whose name is unique in it.
pub(crate) trait OrgChild: From<<Self::Table as EntityTrait>::Model> {
    /// Its table.
    type Table: EntityTrait;
    /// Its typed id.
    type Id: Copy + Into<RecordId> + From<Uuid>;
    /// What it is called in messages.
    const LABEL: &'static str;
    /// The table's `id` column.
    fn id_column() -> <Self::Table as EntityTrait>::Column;
    /// The table's `org_id` column.
    fn org_column() -> <Self::Table as EntityTrait>::Column;
    /// The table's `name` column.
    fn name_column() -> <Self::Table as EntityTrait>::Column;
    /// A new row.
    fn row(
        id: Uuid,
        org: OrgId,
        name: &str,
        created_at: NaiveDateTime,
    ) -> <Self::Table as EntityTrait>::ActiveModel;
    /// The record's id.
    fn id(&self) -> Self::Id;
}

impl OrgChild for Project {
    type Table = project::Entity;
    type Id = ProjectId;
    const LABEL: &'static str = "project";
    fn id_column() -> project::Column {
        project::Column::Id
    }
    fn org_column() -> project::Column {
        project::Column::OrgId
    }
    fn name_column() -> project::Column {
        project::Column::Name
    }
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> project::ActiveModel {
        project::ActiveModel {
            id: Set(id),
            org_id: Set(org.as_uuid()),
            name: Set(name.to_owned()),
            created_at: Set(created_at),
        }
    }
    fn id(&self) -> ProjectId {
        self.id
    }
}

impl OrgChild for Product {
    type Table = product::Entity;
    type Id = ProductId;
    const LABEL: &'static str = "product";
    fn id_column() -> product::Column {
        product::Column::Id
    }
    fn org_column() -> product::Column {
        product::Column::OrgId
    }
    fn name_column() -> product::Column {
        product::Column::Name
    }
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> product::ActiveModel {
        product::ActiveModel {
            id: Set(id),
            org_id: Set(org.as_uuid()),
            name: Set(name.to_owned()),
            created_at: Set(created_at),
        }
    }
    fn id(&self) -> ProductId {
        self.id
    }
}

/// Reads the latest committed row, whatever the transaction's snapshot: MySQL's consistent
/// reads under `REPEATABLE READ` (its default) would not see a row another transaction
/// committed after this one's first read, which a `get_or_create_*` in a host transaction
/// must find. PostgreSQL and SQLite need nothing (see README, "Host transactions").
fn latest<E: EntityTrait>(select: Select<E>, backend: DbBackend) -> Select<E> {
    if backend == DbBackend::MySql { select.lock_shared() } else { select }
}

/// Inserts `row` unless its unique columns are taken; returns whether it inserted. One
/// statement that leaves the surrounding transaction usable either way: PostgreSQL aborts a
/// transaction on any error, so there it is `ON CONFLICT DO NOTHING` (its affected-row count
/// is exact); MySQL's is not (an ignored duplicate may count as found), but MySQL and SQLite
/// roll back only the failed statement, so there a duplicate-key error means "taken".
async fn insert_unique<E, C, I>(conn: &C, row: E::ActiveModel, unique: I) -> Result<bool, DbErr>
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
        self.get_or_create_organization_on(self.writer(), name).await
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
            if let Some(found) = find_organization_on(conn, name).await? {
                let created = found.id.as_uuid() == id;
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
        self.create_organization_on(self.writer(), name).await
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
            return Ok(row.into());
        }
        match find_organization_on(conn, name).await? {
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
        find_organization_on(self.db(), name).await
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

    /// Returns the project named `name` in `org`, creating it if it does not exist; the flag
    /// says whether this call created it. Race-safe like
    /// [`get_or_create_organization`](Self::get_or_create_organization).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization does
    /// not exist; [`Error::Storage`].
    pub async fn get_or_create_project(&self, org: OrgId, name: &str) -> Result<(Project, bool)> {
        self.get_or_create_child_on(self.writer(), org, name).await
    }

    /// Returns the product named `name` in `org`, creating it if it does not exist; the flag
    /// says whether this call created it. Race-safe like
    /// [`get_or_create_organization`](Self::get_or_create_organization).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization does
    /// not exist; [`Error::Storage`].
    pub async fn get_or_create_product(&self, org: OrgId, name: &str) -> Result<(Product, bool)> {
        self.get_or_create_child_on(self.writer(), org, name).await
    }

    /// Creates a project in `org`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing project's id if the name is taken in the
    /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
    /// organization does not exist; [`Error::Storage`].
    pub async fn create_project(&self, org: OrgId, name: &str) -> Result<Project> {
        self.create_child_on(self.writer(), org, name).await
    }

    /// Creates a product in `org`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing product's id if the name is taken in the
    /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
    /// organization does not exist; [`Error::Storage`].
    pub async fn create_product(&self, org: OrgId, name: &str) -> Result<Product> {
        self.create_child_on(self.writer(), org, name).await
    }

    /// The project with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_project(&self, id: ProjectId) -> Result<Project> {
        get_child_on(self.db(), id).await
    }

    /// The product with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_product(&self, id: ProductId) -> Result<Product> {
        get_child_on(self.db(), id).await
    }

    /// The project with this exact name in `org`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_project(&self, org: OrgId, name: &str) -> Result<Option<Project>> {
        find_child_on(self.db(), org, name).await
    }

    /// The product with this exact name in `org`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_product(&self, org: OrgId, name: &str) -> Result<Option<Product>> {
        find_child_on(self.db(), org, name).await
    }

    /// Every project of `org`, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_projects(&self, org: OrgId) -> Result<Vec<Project>> {
        self.list_children(org).await
    }

    /// Every product of `org`, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_products(&self, org: OrgId) -> Result<Vec<Product>> {
        self.list_children(org).await
    }

    /// `get_or_create_project` / `get_or_create_product` on `conn`.
    pub(crate) async fn get_or_create_child_on<T: OrgChild, C: ConnectionTrait>(
        &self,
        conn: &C,
        org: OrgId,
        name: &str,
    ) -> Result<(T, bool)> {
        validate_name("name", name)?;
        for _ in 0..VANISHED_RETRIES {
            let now = self.now();
            let id = self.new_id(now);
            T::Table::insert(T::row(id, org, name, naive(now)))
                .on_conflict_do_nothing_on([T::org_column(), T::name_column()])
                .exec_without_returning(conn)
                .await
                .map_err(|e| missing_parent(e, org))?;
            if let Some(found) = find_child_on::<T, C>(conn, org, name).await? {
                let created = found.id().into().as_uuid() == id;
                return Ok((found, created));
            }
        }
        Err(Error::conflict(Vanished(T::LABEL)))
    }

    /// `create_project` / `create_product` on `conn`.
    pub(crate) async fn create_child_on<T: OrgChild, C: ConnectionTrait>(
        &self,
        conn: &C,
        org: OrgId,
        name: &str,
    ) -> Result<T> {
        validate_name("name", name)?;
        let now = self.now();
        let id = self.new_id(now);
        let unique = [T::org_column(), T::name_column()];
        let inserted =
            insert_unique::<T::Table, _, _>(conn, T::row(id, org, name, naive(now)), unique)
                .await
                .map_err(|e| missing_parent(e, org))?;
        if inserted {
            return get_child_on(conn, T::Id::from(id)).await;
        }
        match find_child_on::<T, C>(conn, org, name).await? {
            Some(existing) => Err(Error::AlreadyExists { existing: existing.id().into() }),
            None => Err(Error::conflict(Vanished(T::LABEL))),
        }
    }

    async fn list_children<T: OrgChild>(&self, org: OrgId) -> Result<Vec<T>> {
        Ok(T::Table::find()
            .filter(T::org_column().eq(org.as_uuid()))
            .order_by_asc(T::name_column())
            .all(self.db())
            .await
            .map_err(storage)?
            .into_iter()
            .map(T::from)
            .collect())
    }

    /// Links `product` to `project`, so that keys of the project are valid for the product.
    /// Idempotent: returns whether this call created the link.
    ///
    /// # Errors
    /// [`Error::NotFound`] if either does not exist; [`Error::InvalidInput`] (field
    /// `product_id`) if they belong to different organizations; [`Error::Storage`].
    pub async fn add_product_to_project(
        &self,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        self.add_product_to_project_on(self.writer(), product, project).await
    }

    /// [`add_product_to_project`](Self::add_product_to_project) on `conn`.
    pub(crate) async fn add_product_to_project_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        let prod: Product = get_child_on(conn, product).await?;
        let proj: Project = get_child_on(conn, project).await?;
        if prod.org_id != proj.org_id {
            return Err(Error::invalid_input(
                "product_id",
                "product and project belong to different organizations",
            ));
        }
        let row = project_product::ActiveModel {
            project_id: Set(project.as_uuid()),
            product_id: Set(product.as_uuid()),
            created_at: Set(naive(self.now())),
        };
        let unique = [project_product::Column::ProjectId, project_product::Column::ProductId];
        match insert_unique::<project_product::Entity, _, _>(conn, row, unique).await {
            Ok(inserted) => Ok(inserted),
            // One of the two was deleted after it was read: say which.
            Err(e) if is_missing_parent(&e) => {
                match get_child_on::<Product, _>(conn, product).await {
                    Ok(_) => Err(Error::NotFound { id: project.into() }),
                    Err(gone) => Err(gone),
                }
            }
            Err(e) => Err(storage(e)),
        }
    }

    /// Removes the link between `product` and `project`; returns whether there was one.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn remove_product_from_project(
        &self,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        self.remove_product_from_project_on(self.writer(), product, project).await
    }

    /// [`remove_product_from_project`](Self::remove_product_from_project) on `conn`.
    pub(crate) async fn remove_product_from_project_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        let res = project_product::Entity::delete_many()
            .filter(project_product::Column::ProjectId.eq(project.as_uuid()))
            .filter(project_product::Column::ProductId.eq(product.as_uuid()))
            .exec(conn)
            .await
            .map_err(storage)?;
        Ok(res.rows_affected > 0)
    }

    /// The products linked to `project`, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_project_products(&self, project: ProjectId) -> Result<Vec<Product>> {
        let links = project_product::Entity::find()
            .filter(project_product::Column::ProjectId.eq(project.as_uuid()))
            .all(self.db())
            .await
            .map_err(storage)?;
        Ok(product::Entity::find()
            .filter(product::Column::Id.is_in(links.into_iter().map(|l| l.product_id)))
            .order_by_asc(product::Column::Name)
            .all(self.db())
            .await
            .map_err(storage)?
            .into_iter()
            .map(Product::from)
            .collect())
    }
}

async fn find_organization_on<C: ConnectionTrait>(
    conn: &C,
    name: &str,
) -> Result<Option<Organization>> {
    let select = organization::Entity::find().filter(organization::Column::Name.eq(name));
    Ok(latest(select, conn.get_database_backend())
        .one(conn)
        .await
        .map_err(storage)?
        .map(Organization::from))
}

async fn find_child_on<T: OrgChild, C: ConnectionTrait>(
    conn: &C,
    org: OrgId,
    name: &str,
) -> Result<Option<T>> {
    let select = T::Table::find()
        .filter(T::org_column().eq(org.as_uuid()))
        .filter(T::name_column().eq(name));
    Ok(latest(select, conn.get_database_backend()).one(conn).await.map_err(storage)?.map(T::from))
}

async fn get_child_on<T: OrgChild, C: ConnectionTrait>(conn: &C, id: T::Id) -> Result<T> {
    T::Table::find()
        .filter(T::id_column().eq(id.into().as_uuid()))
        .one(conn)
        .await
        .map_err(storage)?
        .map(T::from)
        .ok_or(Error::NotFound { id: id.into() })
}
