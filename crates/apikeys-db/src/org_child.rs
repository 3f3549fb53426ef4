//! Projects and products: the same shape (an organization, a name unique in it, a creation
//! time), so their operations are written once, generically over [`OrgChild`], and each
//! public method is a plain one-line call.

use apikeys_core::hazmat::validate_name;
use apikeys_core::{
    Error, KeyAction, OrgId, Product, ProductId, Project, ProjectId, RecordId, Result,
};
use chrono::NaiveDateTime;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use uuid::Uuid;

use crate::audit::Subject;
use crate::bootstrap::{Read, VANISHED_RETRIES, insert_unique};
use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::{product, project};
use crate::error::{Vanished, missing_parent, storage};

/// A record that belongs to one organization and whose name is unique in it.
pub(crate) trait OrgChild: From<Self::Row> {
    /// Its table.
    type Table: EntityTrait<Model = Self::Row>;
    /// Its table's row.
    type Row: Clone + IntoActiveModel<<Self::Table as EntityTrait>::ActiveModel>;
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
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> Self::Row;
    /// The record's id.
    fn id(&self) -> Self::Id;
    /// The audit event of its creation.
    fn created(&self, org: OrgId) -> (KeyAction, Subject);
}

impl OrgChild for Project {
    type Table = project::Entity;
    type Row = project::Model;
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
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> project::Model {
        project::Model { id, org_id: org.as_uuid(), name: name.to_owned(), created_at }
    }
    fn id(&self) -> ProjectId {
        self.id
    }
    fn created(&self, org: OrgId) -> (KeyAction, Subject) {
        let subject = Subject { project: Some(self.id), ..Subject::org(org) };
        (KeyAction::ProjectCreated, subject)
    }
}

impl OrgChild for Product {
    type Table = product::Entity;
    type Row = product::Model;
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
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> product::Model {
        product::Model { id, org_id: org.as_uuid(), name: name.to_owned(), created_at }
    }
    fn id(&self) -> ProductId {
        self.id
    }
    fn created(&self, org: OrgId) -> (KeyAction, Subject) {
        let subject = Subject { product: Some(self.id), ..Subject::org(org) };
        (KeyAction::ProductCreated, subject)
    }
}

impl ApiKeyClient {
    /// Returns the project named `name` in `org`, creating it if it does not exist; the flag
    /// says whether this call created it. Race-safe like
    /// [`get_or_create_organization`](Self::get_or_create_organization).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization does
    /// not exist; [`Error::Storage`].
    pub async fn get_or_create_project(&self, org: OrgId, name: &str) -> Result<(Project, bool)> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.get_or_create_child_on(txn, org, name).await).await
    }

    /// Returns the product named `name` in `org`, creating it if it does not exist; the flag
    /// says whether this call created it. Race-safe like
    /// [`get_or_create_organization`](Self::get_or_create_organization).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization does
    /// not exist; [`Error::Storage`].
    pub async fn get_or_create_product(&self, org: OrgId, name: &str) -> Result<(Product, bool)> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.get_or_create_child_on(txn, org, name).await).await
    }

    /// Creates a project in `org`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing project's id if the name is taken in the
    /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
    /// organization does not exist; [`Error::Storage`].
    pub async fn create_project(&self, org: OrgId, name: &str) -> Result<Project> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.create_child_on(txn, org, name).await).await
    }

    /// Creates a product in `org`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing product's id if the name is taken in the
    /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
    /// organization does not exist; [`Error::Storage`].
    pub async fn create_product(&self, org: OrgId, name: &str) -> Result<Product> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.create_child_on(txn, org, name).await).await
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
        find_child_on(self.db(), org, name, Read::Plain).await
    }

    /// The product with this exact name in `org`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_product(&self, org: OrgId, name: &str) -> Result<Option<Product>> {
        find_child_on(self.db(), org, name, Read::Plain).await
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
            T::Table::insert(T::row(id, org, name, naive(now)).into_active_model())
                .on_conflict_do_nothing_on([T::org_column(), T::name_column()])
                .exec_without_returning(conn)
                .await
                .map_err(|e| missing_parent(e, org))?;
            if let Some(found) = find_child_on::<T, C>(conn, org, name, Read::Latest).await? {
                let created = found.id().into().as_uuid() == id;
                if created {
                    let (action, subject) = found.created(org);
                    self.audit(conn, action, subject).await?;
                }
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
        let row = T::row(id, org, name, naive(now));
        let unique = [T::org_column(), T::name_column()];
        let inserted =
            insert_unique::<T::Table, _, _>(conn, row.clone().into_active_model(), unique)
                .await
                .map_err(|e| missing_parent(e, org))?;
        if inserted {
            // What was inserted is what a read would return: no second round trip.
            let child = T::from(row);
            let (action, subject) = child.created(org);
            self.audit(conn, action, subject).await?;
            return Ok(child);
        }
        match find_child_on::<T, C>(conn, org, name, Read::Latest).await? {
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
}

async fn find_child_on<T: OrgChild, C: ConnectionTrait>(
    conn: &C,
    org: OrgId,
    name: &str,
    read: Read,
) -> Result<Option<T>> {
    let select = T::Table::find()
        .filter(T::org_column().eq(org.as_uuid()))
        .filter(T::name_column().eq(name));
    Ok(read
        .apply(select, conn.get_database_backend())
        .one(conn)
        .await
        .map_err(storage)?
        .map(T::from))
}

pub(crate) async fn get_child_on<T: OrgChild, C: ConnectionTrait>(
    conn: &C,
    id: T::Id,
) -> Result<T> {
    T::Table::find()
        .filter(T::id_column().eq(id.into().as_uuid()))
        .one(conn)
        .await
        .map_err(storage)?
        .map(T::from)
        .ok_or(Error::NotFound { id: id.into() })
}
