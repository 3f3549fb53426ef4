//! The key lookup: format → HMAC → one indexed read, and the re-hash of a key still under a
//! previous signing secret. A part with its own connection handles; the cache sits in front
//! of it ([`CachedLookup`](crate::cache::CachedLookup)).

mod sql;

use std::sync::Arc;

use apikeys_core::hazmat::{KeyHash, KeyHasher, ProductAccess};
use apikeys_core::{ApiKey, Error, KeyFormat, KeyId, OrgId, ProductId, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QueryResult, QuerySelect,
};

use crate::breaker::Db;
use crate::convert::{api_key_from_model, version_column};
use crate::entity::api_key;
use crate::error::storage;
use crate::owner::OwnerShare;
use crate::secret_version::SecretRegistry;
use sql::HashColumn;
pub(crate) use sql::LookupSql;

/// A stored hash to move to the current signing secret; the old one is kept as the
/// alternate hash, for replicas still on that secret alone.
#[derive(Debug, Clone)]
pub(crate) struct Rehash {
    version: u32,
    old_hash: Vec<u8>,
    old_version: u32,
    new_hash: Vec<u8>,
}

/// A key found by its plaintext, with what is needed to finish the check.
pub(crate) struct Found {
    pub(crate) key: Arc<ApiKey>,
    /// Set when the row holds a previous secret's hash.
    pub(crate) rehash: Option<Rehash>,
    /// What the decision needs to know about the requested product, if one was requested.
    pub(crate) product: Option<ProductAccess>,
    /// The plan of the key's owner, read with the key (`None`: no plan).
    pub(crate) owner: Option<Arc<OwnerShare>>,
}

/// A key row read together with the two product facts of the lookup (see [`LookupSql`]):
/// the product's organization (`None`: no such product), and the key's project if that
/// project is linked to the product.
struct KeyRow {
    model: api_key::Model,
    product_org_id: Option<uuid::Uuid>,
    linked_project_id: Option<uuid::Uuid>,
}

impl FromQueryResult for KeyRow {
    fn from_query_result(res: &QueryResult, pre: &str) -> std::result::Result<Self, DbErr> {
        Ok(Self {
            model: api_key::Model::from_query_result(res, pre)?,
            product_org_id: res.try_get(pre, "product_org_id")?,
            linked_project_id: res.try_get(pre, "linked_project_id")?,
        })
    }
}

/// A key row read with the plan of its owner (see [`sql::with_owner_plan`]).
struct OwnedRow {
    model: api_key::Model,
    owner: Option<Arc<OwnerShare>>,
}

impl FromQueryResult for OwnedRow {
    fn from_query_result(res: &QueryResult, pre: &str) -> std::result::Result<Self, DbErr> {
        let owner = OwnerShare::from_lookup(res).map_err(|e| DbErr::Custom(e.to_string()))?;
        Ok(Self { model: api_key::Model::from_query_result(res, pre)?, owner })
    }
}

/// Finds keys by their plaintext in the database, and moves their hashes to the current
/// secret.
pub(crate) struct KeyLookup {
    /// Reads go here.
    db: Db,
    /// Re-hashes go here.
    writer: Db,
    hasher: Arc<KeyHasher>,
    format: KeyFormat,
    sql: LookupSql,
    secrets: Arc<SecretRegistry>,
}

impl KeyLookup {
    pub(crate) fn new(
        db: Db,
        writer: Db,
        hasher: Arc<KeyHasher>,
        format: KeyFormat,
        secrets: Arc<SecretRegistry>,
    ) -> Result<Self> {
        let sql = LookupSql::new(db.raw().get_database_backend(), hasher.versions().count())?;
        Ok(Self { db, writer, hasher, format, sql, secrets })
    }

    /// Checks the presented key's format and checksum (offline): the parsed key, or
    /// [`Error::InvalidKey`].
    pub(crate) fn parse<'k>(&self, plaintext: &'k str) -> Result<&'k str> {
        Ok(self.format.parse(plaintext)?.as_str())
    }

    /// The HMAC of a parsed key under the current secret: what the cache is keyed by.
    pub(crate) fn hash(&self, key: &str) -> KeyHash {
        self.hasher.hash(key)
    }

    /// Hashes and looks up a parsed key: one indexed read (two for a key found only by its
    /// alternate hash, or not found), which also reads what the decision needs about
    /// `product` when one is given.
    pub(crate) async fn find(&self, key: &str, product: Option<ProductId>) -> Result<Found> {
        let candidates = self.hasher.candidates(key);
        let lookup = |column| {
            let statement = self.sql.statement(&candidates, product, column);
            async move { self.db.query_one_raw(statement).await.map_err(storage) }
        };
        // The main hash first: outside a rotation every key is found there, in one probe.
        let row = match lookup(HashColumn::Main).await? {
            Some(row) => row,
            None => lookup(HashColumn::Alternate).await?.ok_or(Error::InvalidKey)?,
        };
        let owner = OwnerShare::from_lookup(&row)?;
        let (model, product) = match product {
            None => (api_key::Model::from_query_result(&row, "").map_err(storage)?, None),
            Some(product_id) => {
                let row = KeyRow::from_query_result(&row, "").map_err(storage)?;
                // A product that does not exist is not allowed, like another organization's:
                // the nil organization matches no key. The decision reports it after the
                // key's own status, in the documented order.
                let access = ProductAccess {
                    product_id,
                    org_id: OrgId::from_uuid(row.product_org_id.unwrap_or_default()),
                    key_project_linked: row.linked_project_id.is_some(),
                };
                (row.model, Some(access))
            }
        };
        // Found by its hash or its alternate hash; only the main hash is ever moved.
        let main = KeyHasher::matching_version(&candidates, &model.key_hash);
        let alt =
            model.alt_key_hash.as_deref().and_then(|h| KeyHasher::matching_version(&candidates, h));
        main.or(alt).ok_or(Error::InvalidKey)?;
        let rehash = main.filter(|v| self.hasher.needs_rehash(*v)).map(|old_version| Rehash {
            version: self.hasher.current_version(),
            old_hash: model.key_hash.clone(),
            old_version,
            new_hash: candidates[0].1.as_bytes().to_vec(),
        });
        Ok(Found { key: Arc::new(api_key_from_model(model)?), rehash, product, owner })
    }

    /// Up to `limit` keys that are neither revoked nor expired at `now`, in id order after
    /// `after`: one indexed read, for warming the cache. Each comes with the hash it is found
    /// by under the current signing secret (its main hash, or its alternate one during a
    /// rotation), or `None` when neither is under the current secret: such a key needs a
    /// re-hash, which only its plaintext allows, so it is read on its first check instead.
    pub(crate) async fn live_page(
        &self,
        after: Option<KeyId>,
        now: chrono::DateTime<chrono::Utc>,
        limit: u64,
    ) -> Result<Vec<(Option<[u8; 32]>, ApiKey, Option<Arc<OwnerShare>>)>> {
        let now = crate::convert::naive(now);
        let mut query = sql::with_owner_plan(api_key::Entity::find())
            .filter(api_key::Column::RevokedAt.is_null())
            .filter(
                Condition::any()
                    .add(api_key::Column::ExpiresAt.is_null())
                    .add(api_key::Column::ExpiresAt.gt(now)),
            )
            .order_by_asc(api_key::Column::Id)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(api_key::Column::Id.gt(after.as_uuid()));
        }
        let rows = query.into_model::<OwnedRow>().all(&self.db).await.map_err(storage)?;
        let current = version_column(self.hasher.current_version())?;
        rows.into_iter()
            .map(|OwnedRow { model, owner }| {
                // A main hash under a previous secret is due a re-hash, which only a check
                // (with the plaintext) can do: such a row is left to its first check.
                let main_due = u32::try_from(model.secret_version)
                    .map_or(true, |v| self.hasher.needs_rehash(v));
                let hash = if model.secret_version == current {
                    Some(model.key_hash.as_slice())
                } else if model.alt_secret_version == Some(current) && !main_due {
                    model.alt_key_hash.as_deref()
                } else {
                    None
                };
                let hash = hash.and_then(|h| <[u8; 32]>::try_from(h).ok());
                Ok((hash, api_key_from_model(model)?, owner))
            })
            .collect()
    }

    /// Moves a key's stored hash from a previous secret to the current one, keeping the old
    /// hash as the alternate: a compare-and-set on the old hash, so it never overwrites
    /// another change. Best effort: a failure is logged and the next successful check tries
    /// again; the check itself has succeeded.
    pub(crate) async fn rehash(&self, id: KeyId, rehash: Rehash) {
        // Every version the hasher holds was checked to fit at build().
        let (Ok(version), Ok(old_version)) =
            (version_column(rehash.version), version_column(rehash.old_version))
        else {
            return;
        };
        if let Err(e) = self.secrets.check().await {
            tracing::warn!(key_id = %id, error = %e, "not re-hashing an api key: the signing secrets' versions could not be checked");
            return;
        }
        let result = api_key::Entity::update_many()
            .col_expr(api_key::Column::KeyHash, Expr::value(rehash.new_hash))
            .col_expr(api_key::Column::SecretVersion, Expr::value(version))
            .col_expr(api_key::Column::AltKeyHash, Expr::value(rehash.old_hash.clone()))
            .col_expr(api_key::Column::AltSecretVersion, Expr::value(old_version))
            .filter(api_key::Column::Id.eq(id.as_uuid()))
            .filter(api_key::Column::KeyHash.eq(rehash.old_hash))
            .exec(&self.writer)
            .await;
        match result {
            Ok(_) => {
                tracing::info!(key_id = %id, version, "api key re-hashed to the current signing secret")
            }
            Err(e) => {
                tracing::warn!(key_id = %id, error = %e, "re-hashing an api key failed; the next successful check retries")
            }
        }
    }
}
