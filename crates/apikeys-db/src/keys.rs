//! Keys: create, verify, validate, read, update, revoke, delete, list.

use apikeys_core::{
    ApiKey, Entity, Error, IssuedKey, KeyHasher, KeyId, KeyPage, KeyUpdate, NewKey, OrgId, Page,
    ProductAccess, ProductId, ProjectId, Requirements, Result, Scopes, StatusFilter, decide,
};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, IntoActiveModel,
    QueryFilter, QueryOrder, QueryResult, QuerySelect,
};

use crate::client::ApiKeyClient;
use crate::convert::{api_key_from_model, naive, rate_limit_columns, scopes_to_json, to_micros};
use crate::entity::{api_key, product, project};
use crate::error::{corrupt, missing_parent, retry_conflicts, storage};
use crate::lookup::HashColumn;

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
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    product: Option<ProductId>,
    scopes: Vec<String>,
    track_usage: bool,
    check_rate_limit: bool,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self { product: None, scopes: Vec::new(), track_usage: true, check_rate_limit: true }
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

    /// The key must hold every one of these scopes.
    #[must_use]
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Whether a successful validation counts as a use (default on).
    #[must_use]
    pub fn track_usage(mut self, on: bool) -> Self {
        self.track_usage = on;
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

/// Checks that a referenced project or product (its `org_id`, if it exists) belongs to `org`.
fn owned_by(
    found_org: Option<uuid::Uuid>,
    org: OrgId,
    entity: Entity,
    field: &'static str,
) -> Result<()> {
    match found_org {
        None => Err(Error::NotFound { entity }),
        Some(o) if o != org.as_uuid() => {
            Err(Error::invalid_input(field, format!("{entity} belongs to another organization")))
        }
        Some(_) => Ok(()),
    }
}

/// A stored hash to move to the current signing secret; the old one is kept as the
/// alternate hash, for replicas still on that secret alone.
struct Rehash {
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
    /// Creates a key in `org`. The plaintext is in the result, once; only its HMAC and a short
    /// hint are stored.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`name`, `scopes`, `custom`, `expires_at`,
    /// `project_id`, `product_id`) — nothing is written then; [`Error::NotFound`] if the
    /// organization, project or product does not exist; [`Error::Entropy`];
    /// [`Error::Storage`].
    pub async fn create_key(&self, org: OrgId, new_key: NewKey) -> Result<IssuedKey> {
        let now = self.now();
        let v = new_key.validate(now, self.inner.default_lifetime)?;
        let plaintext = self.inner.format.generate()?;
        let hash = self.inner.hasher.hash(plaintext.expose_secret());
        let alt = self.inner.hasher.alternate(plaintext.expose_secret());
        let (rl_requests, rl_window) = rate_limit_columns(v.rate_limit);
        let row = api_key::Model {
            id: KeyId::new().as_uuid(),
            org_id: org.as_uuid(),
            project_id: v.project_id.map(|p| p.as_uuid()),
            product_id: v.product_id.map(|p| p.as_uuid()),
            key_hash: hash.as_bytes().to_vec(),
            // Checked at build(): every version fits.
            secret_version: i32::try_from(self.inner.hasher.current_version()).unwrap_or(i32::MAX),
            alt_key_hash: alt.map(|(_, h)| h.as_bytes().to_vec()),
            alt_secret_version: alt.map(|(v, _)| i32::try_from(v).unwrap_or(i32::MAX)),
            hint: plaintext.hint(),
            name: v.name,
            scopes: scopes_to_json(&v.scopes),
            rate_limit_requests: rl_requests,
            rate_limit_window: rl_window,
            custom: sea_orm::JsonValue::Object(v.custom),
            created_at: naive(now),
            updated_at: naive(now),
            expires_at: v.expires_at.map(|t| naive(to_micros(t))),
            revoked_at: None,
            last_used_at: None,
            use_count: 0,
        };
        let txn = self.begin_write().await?;
        // A missing organization is caught by the foreign key on insert (mapped to NotFound).
        if let Some(p) = v.project_id {
            let found =
                project::Entity::find_by_id(p.as_uuid()).one(&txn).await.map_err(storage)?;
            owned_by(found.map(|m| m.org_id), org, Entity::Project, "project_id")?;
        }
        if let Some(p) = v.product_id {
            let found =
                product::Entity::find_by_id(p.as_uuid()).one(&txn).await.map_err(storage)?;
            owned_by(found.map(|m| m.org_id), org, Entity::Product, "product_id")?;
        }
        api_key::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&txn)
            .await
            .map_err(|e| missing_parent(e, Entity::Organization))?;
        txn.commit().await.map_err(storage)?;
        tracing::debug!(key_id = %row.id, org_id = %org, "api key created");
        Ok(IssuedKey { key: plaintext, record: api_key_from_model(row)? })
    }

    /// Parses, hashes and looks up a presented key: one indexed read (two for a key found
    /// only by its alternate hash, or not found), which also reads what the decision needs
    /// about `product` when one is given.
    async fn find_by_plaintext(
        &self,
        plaintext: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let parsed = self.inner.format.parse(plaintext)?;
        let hasher = &self.inner.hasher;
        let candidates = hasher.candidates(parsed.as_str());
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
        let (Ok(version), Ok(old_version)) =
            (i32::try_from(rehash.version), i32::try_from(rehash.old_version))
        else {
            return;
        };
        let result = api_key::Entity::update_many()
            .col_expr(api_key::Column::KeyHash, Expr::value(rehash.new_hash))
            .col_expr(api_key::Column::SecretVersion, Expr::value(version))
            .col_expr(api_key::Column::AltKeyHash, Expr::value(rehash.old_hash.clone()))
            .col_expr(api_key::Column::AltSecretVersion, Expr::value(old_version))
            .filter(api_key::Column::Id.eq(id.as_uuid()))
            .filter(api_key::Column::KeyHash.eq(rehash.old_hash))
            .exec(self.writer())
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
    pub async fn verify_key(&self, plaintext: &str, options: VerifyOptions) -> Result<ApiKey> {
        let now = self.now();
        let mut found = self.find_by_plaintext(plaintext, None).await?;
        decide(&found.key, &Requirements::default(), now)?;
        self.record_success(&mut found, options.track_usage, now).await?;
        Ok(found.key)
    }

    /// [`verify_key`](Self::verify_key) plus the request's requirements, in this order:
    /// revoked, expired, product, scopes, then the key's rate limit (so a request rejected
    /// for any reason, the rate limit included, never uses up quota).
    ///
    /// A key deleted while the call runs gives [`Error::InvalidKey`] (or `Ok`, when the
    /// deletion lands after the call's last read); never [`Error::Storage`].
    ///
    /// # Errors
    /// Those of `verify_key`, and [`Error::ProductNotAllowed`],
    /// [`Error::InsufficientScope`] (with the missing scopes), [`Error::Quota`] (with
    /// `retry_after`), [`Error::InvalidInput`] (field `scopes`) for a malformed required scope.
    pub async fn validate_key(&self, plaintext: &str, options: ValidateOptions) -> Result<ApiKey> {
        let now = self.now();
        let scopes = Scopes::parse(options.scopes)?;
        let mut found = self.find_by_plaintext(plaintext, options.product).await?;
        decide(&found.key, &Requirements { product: found.product.take(), scopes }, now)?;
        if options.check_rate_limit
            && let Some(limit) = found.key.rate_limit
        {
            self.inner.limiter.check(found.key.id, limit).await?;
        }
        self.record_success(&mut found, options.track_usage, now).await?;
        Ok(found.key)
    }

    /// How many keys can be found under each signing-secret version, lowest version first:
    /// the progress of a rotation. A key counts under the version of its main hash and,
    /// during a rotation, under that of its alternate hash too. Before removing a secret,
    /// check that the count under the new version covers every key you still want.
    ///
    /// Keys move to the current secret on their first tracked success while the old secret
    /// is configured as previous; an HMAC cannot be re-keyed without the plaintext, so a key
    /// never presented during the rotation stays under its old version only.
    ///
    /// # Errors
    /// [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn keys_per_secret_version(&self) -> Result<Vec<(u32, u64)>> {
        use api_key::Column as C;
        let mut counts = std::collections::BTreeMap::<u32, u64>::new();
        for (column, hash) in [(C::SecretVersion, C::KeyHash), (C::AltSecretVersion, C::AltKeyHash)]
        {
            let rows: Vec<(Option<i32>, i64)> = api_key::Entity::find()
                .select_only()
                .column(column)
                .column_as(C::Id.count(), "keys")
                .filter(hash.is_not_null())
                .group_by(column)
                .into_tuple()
                .all(self.db())
                .await
                .map_err(storage)?;
            for (v, n) in rows {
                let v = v
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| corrupt("api_keys", "secret_version"))?;
                *counts.entry(v).or_default() += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// The key with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_key(&self, id: KeyId) -> Result<ApiKey> {
        let model = api_key::Entity::find_by_id(id.as_uuid())
            .one(self.db())
            .await
            .map_err(storage)?
            .ok_or(Error::NotFound { entity: Entity::Key })?;
        api_key_from_model(model)
    }

    /// Changes a key's metadata in place (name, scopes, rate limit, custom JSON); the key
    /// string stays the same. A new rate limit applies from the next check.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (nothing is written then);
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<ApiKey> {
        use api_key::Column as C;
        let v = update.validate()?;
        let now = self.now();
        let mut change = api_key::Entity::update_many()
            .col_expr(C::UpdatedAt, Expr::value(naive(now)))
            .filter(C::Id.eq(id.as_uuid()));
        if let Some(name) = v.name {
            change = change.col_expr(C::Name, Expr::value(name));
        }
        if let Some(scopes) = &v.scopes {
            change = change.col_expr(C::Scopes, Expr::value(scopes_to_json(scopes)));
        }
        if let Some(limit) = v.rate_limit {
            let (n, w) = rate_limit_columns(limit);
            change = change
                .col_expr(C::RateLimitRequests, Expr::value(n))
                .col_expr(C::RateLimitWindow, Expr::value(w));
        }
        if let Some(custom) = v.custom {
            change = change.col_expr(C::Custom, Expr::value(sea_orm::JsonValue::Object(custom)));
        }
        // One conditional UPDATE, then the read in the same transaction: a key deleted
        // meanwhile is NotFound, whichever statement the deletion lands between.
        let txn = self.begin_write().await?;
        let res = change.exec(&txn).await.map_err(storage)?;
        let model = if res.rows_affected == 0 {
            None
        } else {
            api_key::Entity::find_by_id(id.as_uuid()).one(&txn).await.map_err(storage)?
        };
        let model = model.ok_or(Error::NotFound { entity: Entity::Key })?;
        txn.commit().await.map_err(storage)?;
        self.inner.limiter.forget(id);
        api_key_from_model(model)
    }

    /// Revokes a key (soft delete: the record stays, later checks fail with
    /// [`Error::Revoked`]). Revoking a revoked key keeps its first `revoked_at`.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn revoke_key(&self, id: KeyId) -> Result<ApiKey> {
        let now = self.now();
        api_key::Entity::update_many()
            .col_expr(api_key::Column::RevokedAt, Expr::value(naive(now)))
            .col_expr(api_key::Column::UpdatedAt, Expr::value(naive(now)))
            .filter(api_key::Column::Id.eq(id.as_uuid()))
            .filter(api_key::Column::RevokedAt.is_null())
            .exec(self.writer())
            .await
            .map_err(storage)?;
        let key = self.get_key(id).await?;
        tracing::info!(key_id = %id, "api key revoked");
        Ok(key)
    }

    /// Deletes a key for good (for erasure requests); its rate-limit counters go with it.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn delete_key(&self, id: KeyId) -> Result<()> {
        let delete = || api_key::Entity::delete_by_id(id.as_uuid()).exec(self.writer());
        let res = retry_conflicts(delete).await.map_err(storage)?;
        self.inner.limiter.forget(id);
        if res.rows_affected == 0 {
            return Err(Error::NotFound { entity: Entity::Key });
        }
        tracing::info!(key_id = %id, "api key deleted");
        Ok(())
    }

    /// The keys of a project with the given status, oldest first, one page at a time.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `page.limit`); [`Error::Storage`].
    pub async fn list_project_keys(
        &self,
        project: ProjectId,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        self.list_keys(api_key::Column::ProjectId.eq(project.as_uuid()), status, page).await
    }

    /// The keys of an organization (org-wide and narrowed ones) with the given status, oldest
    /// first, one page at a time.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `page.limit`); [`Error::Storage`].
    pub async fn list_org_keys(
        &self,
        org: OrgId,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        self.list_keys(api_key::Column::OrgId.eq(org.as_uuid()), status, page).await
    }

    async fn list_keys(
        &self,
        owner: sea_orm::sea_query::SimpleExpr,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        let limit = page.limit()?;
        let now = self.now();
        use api_key::Column as C;
        let not_expired =
            Condition::any().add(C::ExpiresAt.is_null()).add(C::ExpiresAt.gt(naive(now)));
        let status_cond = match status {
            StatusFilter::All => Condition::all(),
            StatusFilter::Active => Condition::all().add(C::RevokedAt.is_null()).add(not_expired),
            StatusFilter::Revoked => Condition::all().add(C::RevokedAt.is_not_null()),
            StatusFilter::Expired => {
                Condition::all().add(C::RevokedAt.is_null()).add(C::ExpiresAt.lte(naive(now)))
            }
        };
        let mut query = api_key::Entity::find().filter(owner).filter(status_cond);
        if let Some(cursor) = page.cursor() {
            query = query.filter(C::Id.gt(cursor.as_uuid()));
        }
        let mut rows = query
            .order_by_asc(C::Id)
            .limit(u64::from(limit) + 1)
            .all(self.db())
            .await
            .map_err(storage)?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let items = rows.into_iter().map(api_key_from_model).collect::<Result<Vec<_>>>()?;
        let next = if more { items.last().map(|k| k.id) } else { None };
        Ok(KeyPage { items, next })
    }
}
