use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub org_id: Uuid,
    pub project_id: Option<Uuid>,
    pub product_id: Option<Uuid>,
    pub key_hash: Vec<u8>,
    pub secret_version: i32,
    pub alt_key_hash: Option<Vec<u8>>,
    pub alt_secret_version: Option<i32>,
    pub hint: String,
    pub name: String,
    pub scopes: Json,
    pub rate_limit_requests: Option<i64>,
    pub rate_limit_window: Option<String>,
    pub custom: Json,
    pub created_at: DateTime,
    pub updated_at: DateTime,
    pub expires_at: Option<DateTime>,
    pub revoked_at: Option<DateTime>,
    pub last_used_at: Option<DateTime>,
    pub use_count: i64,
    pub owner_id: Option<String>,
    pub remaining: Option<i64>,
    pub refill_amount: Option<i64>,
    pub refill_interval: Option<String>,
    pub refilled_period: Option<i64>,
    pub rolled_from: Option<Uuid>,
    pub rolled_to: Option<Uuid>,
    /// On a rolled key: the newest key of its lineage, whose rate-limit windows it counts in.
    pub lineage_head_id: Option<Uuid>,
    /// While the key is disabled: since when.
    pub disabled_at: Option<DateTime>,
    /// The JSON array of networks the key may be used from (`NULL`: any address).
    pub allowed_ips: Option<Json>,
    /// The key's named rate limits, a JSON object of name to limit (`NULL`: none).
    pub rate_limits: Option<Json>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
