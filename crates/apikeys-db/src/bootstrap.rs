//! Organizations, projects and products: race-safe `get_or_create_*`, strict `create_*`,
//! reads and links.

use apikeys_core::{
    Entity, Error, OrgId, Organization, Product, ProductId, Project, ProjectId, Result,
    validate_name,
};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::{organization, product, project, project_product};
use crate::error::{is_unique_violation, missing_parent, storage};

impl ApiKeyClient {
    /// Returns the organization named `name`, creating it if it does not exist; the flag says
    /// whether this call created it.
    ///
    /// Race-safe across tasks, processes and replicas: it inserts with "on conflict do
    /// nothing" on the unique name and then reads the row by name, so concurrent callers end
    /// with one row and all get its id.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`) for a bad name; [`Error::Storage`].
    pub async fn get_or_create_organization(&self, name: &str) -> Result<(Organization, bool)> {
        validate_name("name", name)?;
        let id = Uuid::now_v7();
        let row = organization::ActiveModel {
            id: Set(id),
            name: Set(name.to_owned()),
            created_at: Set(naive(self.now())),
        };
        organization::Entity::insert(row)
            .on_conflict_do_nothing_on([organization::Column::Name])
            .exec_without_returning(self.writer())
            .await
            .map_err(storage)?;
        let found = self.find_organization(name).await?.ok_or_else(|| {
            Error::storage(sea_orm::DbErr::RecordNotFound("organization vanished".into()))
        })?;
        let created = found.id.as_uuid() == id;
        Ok((found, created))
    }

    /// Creates an organization.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing id if the name is taken;
    /// [`Error::InvalidInput`] (field `name`); [`Error::Storage`].
    pub async fn create_organization(&self, name: &str) -> Result<Organization> {
        validate_name("name", name)?;
        let row = organization::Model {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            created_at: naive(self.now()),
        };
        match organization::Entity::insert(organization::ActiveModel::from(row.clone()))
            .exec_without_returning(self.writer())
            .await
        {
            Ok(_) => Ok(row.into()),
            Err(e) if is_unique_violation(&e) => match self.find_organization(name).await? {
                Some(existing) => Err(Error::AlreadyExists {
                    entity: Entity::Organization,
                    existing_id: existing.id.as_uuid(),
                }),
                None => Err(storage(e)),
            },
            Err(e) => Err(storage(e)),
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
            .ok_or(Error::NotFound { entity: Entity::Organization })
    }

    /// The organization with this exact name, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_organization(&self, name: &str) -> Result<Option<Organization>> {
        Ok(organization::Entity::find()
            .filter(organization::Column::Name.eq(name))
            .one(self.db())
            .await
            .map_err(storage)?
            .map(Organization::from))
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

/// Projects and products have the same shape (id, org, name unique per org, created time);
/// this stamps out the same five operations for each, over its own entity.
macro_rules! org_child_ops {
    (
        $module:ident, $ty:ident, $id:ident, $entity:expr, $label:literal,
        $get_or_create:ident, $create:ident, $get:ident, $find:ident, $list:ident
    ) => {
        impl ApiKeyClient {
            #[doc = concat!("Returns the ", $label, " named `name` in `org`, creating it if it does not exist; the flag says whether this call created it.")]
            ///
            /// Race-safe like [`ApiKeyClient::get_or_create_organization`]: insert with "on
            /// conflict do nothing" on (organization, name), then read by it.
            ///
            /// # Errors
            /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization
            /// does not exist; [`Error::Storage`].
            pub async fn $get_or_create(&self, org: OrgId, name: &str) -> Result<($ty, bool)> {
                validate_name("name", name)?;
                let id = Uuid::now_v7();
                let row = $module::ActiveModel {
                    id: Set(id),
                    org_id: Set(org.as_uuid()),
                    name: Set(name.to_owned()),
                    created_at: Set(naive(self.now())),
                };
                let res = $module::Entity::insert(row)
                    .on_conflict_do_nothing_on([$module::Column::OrgId, $module::Column::Name])
                    .exec_without_returning(self.writer())
                    .await;
                if let Err(e) = res {
                    return Err(missing_parent(e, Entity::Organization));
                }
                let found = self.$find(org, name).await?.ok_or(Error::NotFound { entity: $entity })?;
                let created = found.id.as_uuid() == id;
                Ok((found, created))
            }

            #[doc = concat!("Creates a ", $label, " in `org`.")]
            ///
            /// # Errors
            /// [`Error::AlreadyExists`] with the existing id if the name is taken in the
            /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
            /// organization does not exist; [`Error::Storage`].
            pub async fn $create(&self, org: OrgId, name: &str) -> Result<$ty> {
                validate_name("name", name)?;
                let row = $module::Model {
                    id: Uuid::now_v7(),
                    org_id: org.as_uuid(),
                    name: name.to_owned(),
                    created_at: naive(self.now()),
                };
                match $module::Entity::insert($module::ActiveModel::from(row.clone()))
                    .exec_without_returning(self.writer())
                    .await
                {
                    Ok(_) => Ok(row.into()),
                    Err(e) if is_unique_violation(&e) => match self.$find(org, name).await? {
                        Some(existing) => Err(Error::AlreadyExists {
                            entity: $entity,
                            existing_id: existing.id.as_uuid(),
                        }),
                        None => Err(storage(e)),
                    },
                    Err(e) => Err(missing_parent(e, Entity::Organization)),
                }
            }

            #[doc = concat!("The ", $label, " with this id.")]
            ///
            /// # Errors
            /// [`Error::NotFound`]; [`Error::Storage`].
            pub async fn $get(&self, id: $id) -> Result<$ty> {
                $module::Entity::find_by_id(id.as_uuid())
                    .one(self.db())
                    .await
                    .map_err(storage)?
                    .map($ty::from)
                    .ok_or(Error::NotFound { entity: $entity })
            }

            #[doc = concat!("The ", $label, " with this exact name in `org`, if any.")]
            ///
            /// # Errors
            /// [`Error::Storage`].
            pub async fn $find(&self, org: OrgId, name: &str) -> Result<Option<$ty>> {
                Ok($module::Entity::find()
                    .filter($module::Column::OrgId.eq(org.as_uuid()))
                    .filter($module::Column::Name.eq(name))
                    .one(self.db())
                    .await
                    .map_err(storage)?
                    .map($ty::from))
            }

            #[doc = concat!("Every ", $label, " of `org`, by name.")]
            ///
            /// # Errors
            /// [`Error::Storage`].
            pub async fn $list(&self, org: OrgId) -> Result<Vec<$ty>> {
                Ok($module::Entity::find()
                    .filter($module::Column::OrgId.eq(org.as_uuid()))
                    .order_by_asc($module::Column::Name)
                    .all(self.db())
                    .await
                    .map_err(storage)?
                    .into_iter()
                    .map($ty::from)
                    .collect())
            }
        }
    };
}

org_child_ops!(
    project,
    Project,
    ProjectId,
    Entity::Project,
    "project",
    get_or_create_project,
    create_project,
    get_project,
    find_project,
    list_projects
);
org_child_ops!(
    product,
    Product,
    ProductId,
    Entity::Product,
    "product",
    get_or_create_product,
    create_product,
    get_product,
    find_product,
    list_products
);

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
        let (prod, proj) = (self.get_product(product).await?, self.get_project(project).await?);
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
        // A plain insert, with the duplicate-key error meaning "already linked": exact on
        // every backend (MySQL's affected-row count cannot tell an ignored duplicate apart).
        match project_product::Entity::insert(row).exec_without_returning(self.writer()).await {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(missing_parent(e, Entity::Product)),
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
        let res = project_product::Entity::delete_many()
            .filter(project_product::Column::ProjectId.eq(project.as_uuid()))
            .filter(project_product::Column::ProductId.eq(product.as_uuid()))
            .exec(self.writer())
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
