use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "key_changes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub seq: i64,
    pub key_id: Option<Uuid>,
    pub project_id: Option<Uuid>,
    pub product_id: Option<Uuid>,
    pub created_at: DateTime,
    /// A random number per row (`None`: written before the column existed).
    pub token: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
