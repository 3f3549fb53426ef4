//! The key lookup's SQL, built once per client.
//!
//! `verify_key` and `validate_key` run the same query on every call, differing only in the
//! bound hash candidates (and product). Building it with SeaORM each time (18 columns, a
//! condition, the subqueries) was a measurable part of the call, so the client renders it
//! once per shape and only binds values afterwards. The query is still written with SeaORM:
//! the rendered text is captured with sentinel values, and the position of each sentinel
//! among the rendered values says what to bind where.

use apikeys_core::hazmat::KeyHash;
use apikeys_core::{Error, ProductId, Result};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, EntityTrait, QueryFilter, QuerySelect, QueryTrait,
    Statement, Value,
};
use uuid::Uuid;

use crate::entity::{api_key, owner, product, project_product};

/// Where a rendered statement's parameter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The i-th hash candidate.
    Hash(usize),
    /// The requested product's id.
    Product,
}

/// One rendered statement.
#[derive(Debug)]
struct Template {
    sql: String,
    slots: Vec<Slot>,
}

/// Which stored hash a lookup matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashColumn {
    /// `key_hash`, the hash under the secret the key was last hashed with: where every key
    /// is found outside a rotation.
    Main,
    /// `alt_key_hash`, the hash under the previous secret, kept during a rotation: where a
    /// replica still on the old secret finds keys that rotating replicas created or moved.
    Alternate,
}

/// The shapes of the key lookup: on each hash column, plain and with the product facts.
#[derive(Debug)]
pub(crate) struct LookupSql {
    backend: DbBackend,
    plain: Template,
    with_product: Template,
    alt_plain: Template,
    alt_with_product: Template,
}

/// The product sentinel (never a real v7 id: version nibble 0).
const PRODUCT_SENTINEL: Uuid = Uuid::from_u128(0x5e17_1e15_0000_0000_0000_0000_0000_0001);

fn hash_sentinel(i: usize) -> Vec<u8> {
    let mut bytes = vec![0x5e; 32];
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    bytes
}

impl LookupSql {
    /// Renders every shape for `backend` and `candidates` hash candidates per lookup.
    pub(crate) fn new(backend: DbBackend, candidates: usize) -> Result<Self> {
        let hashes: Vec<Vec<u8>> = (0..candidates).map(hash_sentinel).collect();
        let render = |product: bool, column: HashColumn| {
            let select = lookup(hashes.iter().cloned(), column);
            let select = if product {
                with_product_facts(select, ProductId::from_uuid(PRODUCT_SENTINEL))
            } else {
                select
            };
            let statement = select.build(backend);
            let values = statement.values.map(|v| v.0).unwrap_or_default();
            let slots = values
                .iter()
                .map(|v| match v {
                    Value::Uuid(Some(u)) if *u == PRODUCT_SENTINEL => Some(Slot::Product),
                    Value::Bytes(Some(b)) => hashes.iter().position(|h| h == b).map(Slot::Hash),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::configuration("key lookup: unexpected parameter"))?;
            Ok::<_, Error>(Template { sql: statement.sql, slots })
        };
        Ok(Self {
            backend,
            plain: render(false, HashColumn::Main)?,
            with_product: render(true, HashColumn::Main)?,
            alt_plain: render(false, HashColumn::Alternate)?,
            alt_with_product: render(true, HashColumn::Alternate)?,
        })
    }

    /// The lookup of `candidates` in `column`, reading the product facts when `product` is
    /// given.
    pub(crate) fn statement(
        &self,
        candidates: &[(u32, KeyHash)],
        product: Option<ProductId>,
        column: HashColumn,
    ) -> Statement {
        let template = match (column, product.is_some()) {
            (HashColumn::Main, false) => &self.plain,
            (HashColumn::Main, true) => &self.with_product,
            (HashColumn::Alternate, false) => &self.alt_plain,
            (HashColumn::Alternate, true) => &self.alt_with_product,
        };
        let values = template.slots.iter().map(|slot| match (slot, product) {
            (Slot::Hash(i), _) => {
                Value::from(candidates.get(*i).map(|(_, h)| h.as_bytes().to_vec()))
            }
            (Slot::Product, p) => Value::from(p.map(|p| p.as_uuid())),
        });
        Statement::from_sql_and_values(self.backend, template.sql.clone(), values)
    }
}

/// The key row whose hash in `column` is one of `hashes`: one index probe per candidate. (One
/// statement over both columns with `OR` cost MariaDB an index-merge union, 1.6x the floor,
/// so the alternate column is a second statement, run only when the first finds nothing.) No
/// `LIMIT` (hashes are 256-bit HMACs: no two keys share one): on SQLite a bound `LIMIT ?` made
/// the cached statement be re-prepared on every call.
fn lookup(
    hashes: impl Iterator<Item = Vec<u8>>,
    column: HashColumn,
) -> sea_orm::Select<api_key::Entity> {
    let column = match column {
        HashColumn::Main => api_key::Column::KeyHash,
        HashColumn::Alternate => api_key::Column::AltKeyHash,
    };
    let condition = hashes.fold(Condition::any(), |c, h| c.add(column.eq(h)));
    with_owner_plan(api_key::Entity::find().filter(condition))
}

/// Adds the plan of the key's owner to a read of keys, from the same statement (a join on
/// the unique `(org_id, owner_id)` of `owners`): `owner_row_id` (NULL: no plan),
/// `owner_rate_limits`, `owner_remaining` and `owner_updated_at`, read by
/// [`OwnerShare::from_lookup`](crate::owner::OwnerShare::from_lookup).
pub(crate) fn with_owner_plan(
    select: sea_orm::Select<api_key::Entity>,
) -> sea_orm::Select<api_key::Entity> {
    use sea_orm::JoinType;
    let on = api_key::Entity::belongs_to(owner::Entity)
        .from((api_key::Column::OrgId, api_key::Column::OwnerId))
        .to((owner::Column::OrgId, owner::Column::OwnerId))
        .into();
    select
        .join(JoinType::LeftJoin, on)
        .expr_as(Expr::col((owner::Entity, owner::Column::Id)), "owner_row_id")
        .expr_as(Expr::col((owner::Entity, owner::Column::RateLimits)), "owner_rate_limits")
        .expr_as(Expr::col((owner::Entity, owner::Column::Remaining)), "owner_remaining")
        .expr_as(Expr::col((owner::Entity, owner::Column::UpdatedAt)), "owner_updated_at")
}

/// Adds two facts about `product` to a key lookup, as correlated subqueries, so that
/// validating for a product stays one round trip: `product_org_id` (the product's
/// organization; NULL if there is no such product) and `linked_project_id` (the key's
/// project, if that project is linked to the product).
fn with_product_facts(
    select: sea_orm::Select<api_key::Entity>,
    product: ProductId,
) -> sea_orm::Select<api_key::Entity> {
    let org = Query::select()
        .column(product::Column::OrgId)
        .from(product::Entity)
        .and_where(product::Column::Id.eq(product.as_uuid()))
        .to_owned();
    let linked = Query::select()
        .column((project_product::Entity, project_product::Column::ProjectId))
        .from(project_product::Entity)
        .and_where(project_product::Column::ProductId.eq(product.as_uuid()))
        .and_where(
            Expr::col((project_product::Entity, project_product::Column::ProjectId))
                .equals((api_key::Entity, api_key::Column::ProjectId)),
        )
        .to_owned();
    select.expr_as(org, "product_org_id").expr_as(linked, "linked_project_id")
}
