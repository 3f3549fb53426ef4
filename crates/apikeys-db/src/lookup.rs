//! The key lookup's SQL, built once per client.
//!
//! `verify_key` and `validate_key` run the same query on every call, differing only in the
//! bound hash candidates (and product). Building it with SeaORM each time (18 columns, a
//! condition, the subqueries) was a measurable part of the call, so the client renders it
//! once per shape and only binds values afterwards. The query is still written with SeaORM:
//! the rendered text is captured with sentinel values, and the position of each sentinel
//! among the rendered values says what to bind where.

use apikeys_core::{Error, KeyHash, ProductId, Result};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, EntityTrait, QueryFilter, QuerySelect, QueryTrait,
    Statement, Value,
};
use uuid::Uuid;

use crate::entity::{api_key, product, project_product};

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

/// The two shapes of the key lookup: plain, and with the product facts.
#[derive(Debug)]
pub(crate) struct LookupSql {
    backend: DbBackend,
    plain: Template,
    with_product: Template,
}

/// The product sentinel (never a real v7 id: version nibble 0).
const PRODUCT_SENTINEL: Uuid = Uuid::from_u128(0x5e17_1e15_0000_0000_0000_0000_0000_0001);

fn hash_sentinel(i: usize) -> Vec<u8> {
    let mut bytes = vec![0x5e; 32];
    bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
    bytes
}

impl LookupSql {
    /// Renders both shapes for `backend` and `candidates` hash candidates per lookup.
    pub(crate) fn new(backend: DbBackend, candidates: usize) -> Result<Self> {
        let hashes: Vec<Vec<u8>> = (0..candidates).map(hash_sentinel).collect();
        let render = |product: bool| {
            let select = lookup(hashes.iter().cloned());
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
        Ok(Self { backend, plain: render(false)?, with_product: render(true)? })
    }

    /// The lookup of `candidates`, reading the product facts when `product` is given.
    pub(crate) fn statement(
        &self,
        candidates: &[(u32, KeyHash)],
        product: Option<ProductId>,
    ) -> Statement {
        let template = if product.is_some() { &self.with_product } else { &self.plain };
        let values = template.slots.iter().map(|slot| match (slot, product) {
            (Slot::Hash(i), _) => {
                Value::from(candidates.get(*i).map(|(_, h)| h.as_bytes().to_vec()))
            }
            (Slot::Product, p) => Value::from(p.map(|p| p.as_uuid())),
        });
        Statement::from_sql_and_values(self.backend, template.sql.clone(), values)
    }
}

/// The key row whose hash or alternate hash (kept during a rotation) is one of `hashes`. No
/// `LIMIT` (hashes are 256-bit HMACs: no two keys share one): on SQLite a bound `LIMIT ?` made
/// the cached statement be re-prepared on every call.
fn lookup(hashes: impl Iterator<Item = Vec<u8>> + Clone) -> sea_orm::Select<api_key::Entity> {
    let main = hashes.clone().fold(Condition::any(), |c, h| c.add(api_key::Column::KeyHash.eq(h)));
    let condition = hashes.fold(main, |c, h| c.add(api_key::Column::AltKeyHash.eq(h)));
    api_key::Entity::find().filter(condition)
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
