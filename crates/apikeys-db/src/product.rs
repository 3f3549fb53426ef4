//! Products: race-safe `get_or_create_product`, strict `create_product`, reads. The work is
//! written once for projects and products, in [`org_child`](crate::org_child).

use apikeys_core::hazmat::validate_name;
// For the `# Errors` sections' links only.
#[cfg(doc)]
use apikeys_core::Error;
use apikeys_core::{KeyAction, KeyPage, OrgId, Page, Product, ProductId, Result};
use chrono::NaiveDateTime;
use uuid::Uuid;

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::entity::product;
use crate::idempotent::Read;
use crate::org_child::{OrgChild, find_child_on, get_child_on};

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

    /// The product with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_product(&self, id: ProductId) -> Result<Product> {
        get_child_on(self.db(), id).await
    }

    /// The product with this exact name in `org`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_product(&self, org: OrgId, name: &str) -> Result<Option<Product>> {
        find_child_on(self.db(), org, name, Read::Plain).await
    }

    /// The products of `org` a page at a time, oldest first (the cursor is a product's id).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_products_page(
        &self,
        org: OrgId,
        page: Page,
    ) -> Result<KeyPage<Product, ProductId>> {
        self.list_children_page(org, page).await
    }

    /// Every product of `org`, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_products(&self, org: OrgId) -> Result<Vec<Product>> {
        self.list_children(org).await
    }
}
