//! The hot path: verify and validate a presented key, and their options.
//!
//! A check is the lookup (format, HMAC, one indexed read that also reads the product facts),
//! the pure decision, the rate limiter, then the usage recorder and (during a rotation) a
//! re-hash. Nothing here parses the caller's requirements: [`ValidateOptions`] did that when
//! it was built.

use apikeys_core::hazmat::{KeyHash, KeyHasher, ProductAccess, Requirements, decide};
use apikeys_core::{ApiKey, Error, KeyId, OrgId, ProductId, Result, Scopes};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryResult,
};

use crate::cache::{CacheState, CachedKey, Lookup};
use crate::client::ApiKeyClient;
use crate::convert::{api_key_from_model, naive, version_column};
use crate::entity::api_key;
use crate::error::storage;
use crate::feed::Change;
use crate::lookup::HashColumn;
use crate::observe::{Op, observe};

/// Options of [`ApiKeyClient::verify_key`].
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    track_usage: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { track_usage: true }
    }
}

impl VerifyOptions {
    /// Usage tracking on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a successful verification adds one to `use_count` and sets `last_used_at`
    /// (default on; one atomic `UPDATE`). Turn it off for read-only checks.
    #[must_use]
    pub fn track_usage(mut self, on: bool) -> Self {
        self.track_usage = on;
        self
    }
}

/// What [`ApiKeyClient::validate_key`] requires of a key.
///
/// Build it once per route (the required scopes are parsed and checked then) and pass it by
/// reference on every request:
///
/// ```
/// use apikeys_db::{Error, ValidateOptions};
///
/// let read = ValidateOptions::new().require_scopes(["read"])?;
/// assert!(matches!(
///     ValidateOptions::new().require_scopes(["not a scope"]),
///     Err(Error::InvalidInput { field: "scopes", .. })
/// ));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    product: Option<ProductId>,
    scopes: Scopes,
    track_usage: bool,
    check_rate_limit: bool,
    credit_cost: u32,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self {
            product: None,
            scopes: Scopes::new(),
            track_usage: true,
            check_rate_limit: true,
            credit_cost: 1,
        }
    }
}

impl ValidateOptions {
    /// No product, no scopes; usage tracking and rate limit on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The key must be valid for this product (org-wide, linked project, or the product's own
    /// key, of the product's organization).
    #[must_use]
    pub fn for_product(mut self, product: ProductId) -> Self {
        self.product = Some(product);
        self
    }

    /// The key must hold every one of these scopes (replacing any required before).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `scopes`) for a malformed or repeated scope, or more
    /// than [`MAX_SCOPES`](crate::core::limits::MAX_SCOPES).
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Scopes::parse(scopes)?;
        Ok(self)
    }

    /// The key must hold every scope of this set (already checked when it was parsed).
    #[must_use]
    pub fn require(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// Whether a successful validation counts as a use (default on).
    #[must_use]
    pub fn track_usage(mut self, on: bool) -> Self {
        self.track_usage = on;
        self
    }

    /// How many usage credits a successful validation spends, for keys that have credits
    /// (default 1). Zero spends none and does not check the balance: for a second check of
    /// a request that was already counted.
    #[must_use]
    pub fn credit_cost(mut self, cost: u32) -> Self {
        self.credit_cost = cost;
        self
    }

    /// Whether to count this request against the key's rate limit (default on). Turn it off
    /// for trusted internal callers.
    #[must_use]
    pub fn check_rate_limit(mut self, on: bool) -> Self {
        self.check_rate_limit = on;
        self
    }
}

/// A stored hash to move to the current signing secret; the old one is kept as the
/// alternate hash, for replicas still on that secret alone.
#[derive(Debug, Clone)]
pub(crate) struct Rehash {
    version: u32,
    old_hash: Vec<u8>,
    old_version: u32,
    new_hash: Vec<u8>,
}

/// A key found by its plaintext, with what is needed to finish the verification.
struct Found {
    key: ApiKey,
    /// Set when the row holds a previous secret's hash.
    rehash: Option<Rehash>,
    /// What the decision needs to know about the requested product, if one was requested.
    product: Option<ProductAccess>,
}

/// A key row read together with the two product facts of the lookup (see
/// [`LookupSql`](crate::lookup::LookupSql)): the product's organization (`None`: no such
/// product), and the key's project if that project is linked to the product.
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

impl ApiKeyClient {
    /// Parses, hashes and finds a presented key: in the verified-key cache when the client
    /// has one, else (or on a miss) with one indexed read.
    async fn find_by_plaintext(
        &self,
        plaintext: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let parsed = self.inner.format.parse(plaintext)?;
        let found = match &self.inner.cache {
            None => self.find_in_db(parsed.as_str(), product).await?,
            Some(cache) => self.find_cached(cache, parsed.as_str(), product).await?,
        };
        // The check's span (see `observe`) names the key found, whatever the outcome.
        tracing::Span::current()
            .record("key_id", tracing::field::display(found.key.id))
            .record("org_id", tracing::field::display(found.key.org_id));
        Ok(found)
    }

    /// The cache's answer, or the database's (which is then cached). Keys not in the cache
    /// wait for a turn to read the database (see [`KeyCache::max_concurrent_misses`]); keys in
    /// it, while it is not serving, read the database without one.
    ///
    /// [`KeyCache::max_concurrent_misses`]: crate::KeyCache::max_concurrent_misses
    async fn find_cached(
        &self,
        cache: &CacheState,
        key: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let hash = self.inner.hasher.hash(key);
        match cache.lookup(&hash, product) {
            Lookup::Hit(entry, access) => {
                Ok(Found { key: entry.key.clone(), rehash: entry.rehash.clone(), product: access })
            }
            Lookup::Unknown => Err(Error::InvalidKey),
            Lookup::Miss => {
                let _turn = cache.miss_permit().await?;
                self.find_and_cache(cache, &hash, key, product).await
            }
            // A key the cache holds while it is not serving: read at once (the pool bounds it).
            Lookup::Bypass => self.find_and_cache(cache, &hash, key, product).await,
        }
    }

    /// Reads a key from the database and caches what was read (or that it does not exist).
    async fn find_and_cache(
        &self,
        cache: &CacheState,
        hash: &KeyHash,
        key: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let generation = cache.generation();
        match self.find_in_db(key, product).await {
            Ok(found) => {
                let entry = CachedKey { key: found.key.clone(), rehash: found.rehash.clone() };
                cache.insert(hash, entry, found.product, generation);
                Ok(found)
            }
            Err(Error::InvalidKey) => {
                cache.insert_unknown(hash, generation);
                Err(Error::InvalidKey)
            }
            Err(e) => Err(e),
        }
    }

    /// Hashes and looks up a parsed key: one indexed read (two for a key found only by its
    /// alternate hash, or not found), which also reads what the decision needs about
    /// `product` when one is given.
    async fn find_in_db(&self, key: &str, product: Option<ProductId>) -> Result<Found> {
        let hasher = &self.inner.hasher;
        let candidates = hasher.candidates(key);
        let lookup = |column| {
            let statement = self.inner.lookup.statement(&candidates, product, column);
            async move { self.db().query_one_raw(statement).await.map_err(storage) }
        };
        // The main hash first: outside a rotation every key is found there, in one probe.
        let row = match lookup(HashColumn::Main).await? {
            Some(row) => row,
            None => lookup(HashColumn::Alternate).await?.ok_or(Error::InvalidKey)?,
        };
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
        let rehash = main.filter(|v| hasher.needs_rehash(*v)).map(|old_version| Rehash {
            version: hasher.current_version(),
            old_hash: model.key_hash.clone(),
            old_version,
            new_hash: candidates[0].1.as_bytes().to_vec(),
        });
        Ok(Found { key: api_key_from_model(model)?, rehash, product })
    }

    /// After a successful check: count the use (at once or in the batch), then move the
    /// hash to the current secret if it is still under a previous one. Nothing at all is
    /// written when `track` is off.
    async fn record_success(
        &self,
        found: &mut Found,
        track: bool,
        now: DateTime<Utc>,
    ) -> Result<()> {
        if !track {
            return Ok(());
        }
        self.inner.usage.record(found.key.id, naive(now)).await?;
        found.key.use_count += 1;
        found.key.last_used_at = Some(now);
        if let Some(rehash) = found.rehash.take() {
            self.rehash(found.key.id, rehash).await;
        }
        Ok(())
    }

    /// Moves a key's stored hash from a previous secret to the current one, keeping the old
    /// hash as the alternate: a compare-and-set on the old hash, so it never overwrites
    /// another change. Best effort: a failure is logged and the next successful check tries
    /// again; the check itself has succeeded.
    async fn rehash(&self, id: KeyId, rehash: Rehash) {
        // Every version the hasher holds was checked to fit at build().
        let (Ok(version), Ok(old_version)) =
            (version_column(rehash.version), version_column(rehash.old_version))
        else {
            return;
        };
        if let Err(e) = self.check_secret_versions().await {
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
            .exec(self.writer())
            .await;
        // The cached entry says a re-hash is due: drop it either way, so the next check
        // reads the row as it now is.
        if let Some(cache) = &self.inner.cache {
            cache.forget(Change::Key(id));
        }
        match result {
            Ok(_) => {
                tracing::info!(key_id = %id, version, "api key re-hashed to the current signing secret")
            }
            Err(e) => {
                tracing::warn!(key_id = %id, error = %e, "re-hashing an api key failed; the next successful check retries")
            }
        }
    }

    /// Checks that `plaintext` is a live key: format and checksum (offline), HMAC, one indexed
    /// lookup, then status. Returns the stored record.
    ///
    /// A key hashed under any signing secret the client knows (current, previous, next) is
    /// found. With usage tracking on (the default) a success adds one to `use_count` and moves
    /// `last_used_at` forward in one atomic `UPDATE`, or, with
    /// [`ClientBuilder::usage_flush_interval`](crate::ClientBuilder::usage_flush_interval), in
    /// memory until the next flush (the returned record counts this use either way); a key
    /// still under a previous secret is then re-hashed to the current one (best effort: a
    /// failed re-hash is logged, never fails the check, and is retried on the next success).
    /// With tracking off, nothing at all is written.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] (malformed or unknown: it does not say which);
    /// [`Error::Revoked`]; [`Error::Expired`]; [`Error::Unavailable`]; [`Error::Storage`].
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, VerifyOptions, Error};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let issued = client.create_key(org.id, NewKey::new("ci")).await?;
    /// let key = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await?;
    /// assert_eq!((key.id, key.use_count), (issued.record.id, 1));
    ///
    /// let wrong = client.verify_key("sk_not-a-key", &VerifyOptions::new()).await;
    /// assert!(matches!(wrong, Err(Error::InvalidKey)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn verify_key(&self, plaintext: &str, options: &VerifyOptions) -> Result<ApiKey> {
        observe(&self.inner.metrics, Op::Verify, self.verify(plaintext, options)).await
    }

    async fn verify(&self, plaintext: &str, options: &VerifyOptions) -> Result<ApiKey> {
        let now = self.now();
        let mut found = self.find_by_plaintext(plaintext, None).await?;
        decide(&found.key, &Requirements::default(), now)?;
        self.record_success(&mut found, options.track_usage, now).await?;
        Ok(found.key)
    }

    /// [`verify_key`](Self::verify_key) plus the request's requirements, in this order:
    /// revoked, expired, product, scopes, the key's rate limit, then its usage credits. A
    /// request rejected for any reason before the rate limit (the rate limit included) uses
    /// up no quota and spends no credit; one refused for exhausted credits has counted
    /// against the rate limit.
    ///
    /// A key with usage credits spends [`ValidateOptions::credit_cost`] of them (one by
    /// default) in one atomic statement in the database, whether or not the client caches
    /// keys: every replica sees the same balance, and a key with none left is refused with
    /// [`Error::UsageExhausted`] at once, everywhere. `verify_key` neither spends nor checks
    /// credits.
    ///
    /// A key deleted while the call runs gives [`Error::InvalidKey`] (or `Ok`, when the
    /// deletion lands after the call's last read); never [`Error::Storage`].
    ///
    /// # Errors
    /// Those of `verify_key`, and [`Error::ProductNotAllowed`],
    /// [`Error::InsufficientScope`] (with the missing scopes), [`Error::Quota`] (with
    /// `retry_after`), [`Error::UsageExhausted`] (with the next refill, if any).
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, RateLimit, ValidateOptions, Error};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let (api, _) = client.get_or_create_product(org.id, "public-api").await?;
    /// let new = NewKey::new("ci").with_scopes(["read"]).with_rate_limit(RateLimit::per_minute(1)?);
    /// let key = client.create_key(org.id, new).await?.key;
    ///
    /// // Once per route, reused for every request.
    /// let route = ValidateOptions::new().for_product(api.id).require_scopes(["read"])?;
    /// client.validate_key(key.expose_secret(), &route).await?;
    /// match client.validate_key(key.expose_secret(), &route).await {
    ///     Err(Error::Quota { retry_after, .. }) => assert!(retry_after.as_secs() <= 60),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn validate_key(&self, plaintext: &str, options: &ValidateOptions) -> Result<ApiKey> {
        observe(&self.inner.metrics, Op::Validate, self.validate(plaintext, options)).await
    }

    async fn validate(&self, plaintext: &str, options: &ValidateOptions) -> Result<ApiKey> {
        let now = self.now();
        let mut found = self.find_by_plaintext(plaintext, options.product).await?;
        let requirements = Requirements { product: found.product.take(), scopes: &options.scopes };
        decide(&found.key, &requirements, now)?;
        if options.check_rate_limit
            && let Some(limit) = found.key.rate_limit
        {
            self.inner.limiter.check(&found.key, limit).await?;
        }
        if options.credit_cost > 0 && found.key.credits.is_some() {
            self.spend_credits(&mut found.key, options.credit_cost).await?;
        }
        self.record_success(&mut found, options.track_usage, now).await?;
        Ok(found.key)
    }
}
