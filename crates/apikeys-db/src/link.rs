//! Links between products and projects: a key of a project is valid for the products
//! linked to it.

use apikeys_core::{Error, Product, ProductId, Project, ProjectId, Result};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder,
};

use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::{product, project_product};
use crate::error::{is_missing_parent, storage};
use crate::feed::Change;
use crate::idempotent::insert_unique;
use crate::org_child::get_child_on;

impl ApiKeyClient {
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
        let link = Change::Link { project, product };
        self.change(link, async |txn| self.add_product_to_project_on(txn, product, project).await)
            .await
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
        let link = Change::Link { project, product };
        let remove = async |txn: &DatabaseTransaction| {
            self.remove_product_from_project_on(txn, product, project).await
        };
        self.change(link, remove).await
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
