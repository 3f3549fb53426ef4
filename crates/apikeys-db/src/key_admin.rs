//! Key administration: create, read, update, revoke, delete, list.
//!
//! Each write is written once, over any connection (`*_on`): the client runs it in a
//! transaction of its own, [`InTransaction`](crate::InTransaction) in a savepoint of the
//! host's transaction.

use apikeys_core::hazmat::ValidKeyUpdate;
use apikeys_core::{
    ApiKey, Error, IssuedKey, KeyAction, KeyId, KeyUpdate, NewKey, OrgId, PlaintextKey, ProductId,
    ProjectId, RecordId, Result,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, IntoActiveModel, QueryFilter,
};
use uuid::Uuid;

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::convert::{
    allowlist_to_json, api_key_from_model, credit_columns, limits_to_json, naive,
    rate_limit_columns, scopes_to_json, to_micros, version_column,
};
use crate::credits::{period_sql, stamp_refill_period};
use crate::entity::{api_key, product, project};
use crate::error::{missing_parent, storage};
use crate::feed::Change;
use crate::lifecycle::{followers_of, with_followers};
use crate::rate_limit::hand_over_lineage;

/// A key checked, generated and ready to insert.
pub(crate) struct PreparedKey {
    pub(crate) plaintext: PlaintextKey,
    pub(crate) row: api_key::Model,
    pub(crate) project_id: Option<ProjectId>,
    pub(crate) product_id: Option<ProductId>,
}

/// A freshly generated key and its hashes (under the current secret, and the alternate).
pub(crate) struct NewSecret {
    pub(crate) plaintext: PlaintextKey,
    pub(crate) hash: Vec<u8>,
    pub(crate) version: i32,
    pub(crate) alt: Option<(i32, Vec<u8>)>,
}

/// Checks that a referenced project or product (its `org_id`, if it exists) belongs to `org`.
fn owned_by(found_org: Option<Uuid>, org: OrgId, id: RecordId, field: &'static str) -> Result<()> {
    match found_org {
        None => Err(Error::NotFound { id }),
        Some(o) if o != org.as_uuid() => Err(Error::invalid_input(
            field,
            format!("{} belongs to another organization", id.kind()),
        )),
        Some(_) => Ok(()),
    }
}

impl ApiKeyClient {
    /// Creates a key in `org`. The plaintext is in the result, once; only its HMAC and a short
    /// hint are stored.
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, RateLimit};
    /// # use std::time::Duration;
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let new = NewKey::new("ci")
    ///     .with_scopes(["read", "write"])
    ///     .with_rate_limit(RateLimit::per_minute(600)?)
    ///     .with_custom(serde_json::json!({ "plan": "pro" }))
    ///     .expires_after(Duration::from_secs(90 * 86_400));
    /// let issued = client.create_key(org.id, new).await?;
    /// let show_once = issued.key.expose_secret(); // to the customer, once
    /// assert!(show_once.starts_with("sk_") && issued.record.expires_at.is_some());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`name`, `scopes`, `custom`, `expires_at`,
    /// `project_id`, `product_id`) — nothing is written then; [`Error::NotFound`] if the
    /// organization, project or product does not exist; [`Error::Entropy`];
    /// [`Error::Storage`].
    pub async fn create_key(&self, org: OrgId, new_key: NewKey) -> Result<IssuedKey> {
        let prepared = self.prepare_key(org, new_key)?;
        // Never store a hash under a version label that is another secret's.
        self.inner.secrets.check().await?;
        let issued = self
            .in_transaction(async move |txn| self.insert_key_on(txn, org, prepared).await)
            .await?;
        tracing::debug!(key_id = %issued.record.id, org_id = %org, "api key created");
        Ok(issued)
    }

    /// The first half of [`create_key`](Self::create_key), before any I/O: checks the input,
    /// generates the key and builds its row.
    pub(crate) fn prepare_key(&self, org: OrgId, new_key: NewKey) -> Result<PreparedKey> {
        let now = self.now();
        let v = new_key.validate(now, self.inner.default_lifetime)?;
        let NewSecret { plaintext, hash, version, alt } = self.new_secret()?;
        let (rl_requests, rl_window) = rate_limit_columns(v.rate_limit);
        let (remaining, refill_amount, refill_interval) = credit_columns(v.credits);
        // The period the balance was set in is the database's current one, stamped by
        // `insert_key_on` (a refill starts with the next period).
        let row = api_key::Model {
            id: self.new_id(now),
            org_id: org.as_uuid(),
            project_id: v.project_id.map(|p| p.as_uuid()),
            product_id: v.product_id.map(|p| p.as_uuid()),
            key_hash: hash,
            secret_version: version,
            alt_secret_version: alt.as_ref().map(|(v, _)| *v),
            alt_key_hash: alt.map(|(_, h)| h),
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
            owner_id: v.owner_id,
            remaining,
            refill_amount,
            refill_interval,
            refilled_period: None,
            rolled_from: None,
            rolled_to: None,
            lineage_head_id: None,
            disabled_at: None,
            allowed_ips: allowlist_to_json(v.allowed_ips.as_ref()),
            rate_limits: limits_to_json(&v.rate_limits),
        };
        Ok(PreparedKey { plaintext, row, project_id: v.project_id, product_id: v.product_id })
    }

    /// Generates a key and hashes it under the current secret (and the alternate one during
    /// a rotation).
    pub(crate) fn new_secret(&self) -> Result<NewSecret> {
        let plaintext = self.inner.format.generate()?;
        let hasher = &self.inner.hasher;
        let hash = hasher.hash(plaintext.expose_secret()).as_bytes().to_vec();
        let alt = match hasher.alternate(plaintext.expose_secret()) {
            Some((version, h)) => Some((version_column(version)?, h.as_bytes().to_vec())),
            None => None,
        };
        Ok(NewSecret { plaintext, hash, version: version_column(hasher.current_version())?, alt })
    }

    /// The second half of [`create_key`](Self::create_key), on `conn` (inside a
    /// transaction): checks the references and inserts.
    pub(crate) async fn insert_key_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        org: OrgId,
        key: PreparedKey,
    ) -> Result<IssuedKey> {
        let PreparedKey { plaintext, row, project_id, product_id } = key;
        // A missing organization is caught by the foreign key on insert (mapped to NotFound).
        if let Some(p) = project_id {
            let found =
                project::Entity::find_by_id(p.as_uuid()).one(conn).await.map_err(storage)?;
            owned_by(found.map(|m| m.org_id), org, p.into(), "project_id")?;
        }
        if let Some(p) = product_id {
            let found =
                product::Entity::find_by_id(p.as_uuid()).one(conn).await.map_err(storage)?;
            owned_by(found.map(|m| m.org_id), org, p.into(), "product_id")?;
        }
        api_key::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(conn)
            .await
            .map_err(|e| missing_parent(e, org))?;
        let record = api_key_from_model(row.clone())?;
        // A new balance with a refill rule: set in the database's current period (a rolled
        // key's keeps its predecessor's).
        if let Some(refill) = record.credits.and_then(|c| c.refill)
            && row.refilled_period.is_none()
        {
            stamp_refill_period(conn, crate::credits::Row::Key(record.id), refill.interval).await?;
        }
        let subject = Subject::key(&record);
        let subject = match record.rolled_from {
            Some(old) => subject.related(old),
            None => subject,
        };
        self.audit(conn, KeyAction::Created, subject).await?;
        Ok(IssuedKey { key: plaintext, record })
    }

    /// The key with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_key(&self, id: KeyId) -> Result<ApiKey> {
        get_key_on(self.db(), id).await
    }

    /// Changes a key's metadata in place (name, scopes, rate limit, custom JSON); the key
    /// string stays the same. A new rate limit applies from the next check.
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, KeyUpdate, NewKey};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// # let id = client.create_key(org.id, NewKey::new("ci")).await?.record.id;
    /// let key = client.update_key(id, KeyUpdate::new().with_scopes(["read"])).await?;
    /// assert_eq!(key.scopes.len(), 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (nothing is written then);
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<ApiKey> {
        let update = update.validate()?;
        let changes = match update.allowed_ips {
            Some(_) => with_followers(id, self.db()).await?,
            None => vec![Change::Key(id)],
        };
        self.change_all(&changes, async move |txn| self.update_key_on(txn, id, update).await).await
    }

    /// [`update_key`](Self::update_key) on `conn` (inside a transaction), with the update
    /// already checked.
    pub(crate) async fn update_key_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
        v: ValidKeyUpdate,
    ) -> Result<ApiKey> {
        use api_key::Column as C;
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
        if let Some(limits) = &v.rate_limits {
            change = change.col_expr(C::RateLimits, Expr::value(limits_to_json(limits)));
        }
        if let Some(custom) = v.custom {
            change = change.col_expr(C::Custom, Expr::value(sea_orm::JsonValue::Object(custom)));
        }
        if let Some(allowed) = &v.allowed_ips {
            let json = allowlist_to_json(allowed.as_ref());
            change = change.col_expr(C::AllowedIps, Expr::value(json.clone()));
            // The keys rolled into this one, in their grace, follow its allowlist.
            api_key::Entity::update_many()
                .col_expr(C::AllowedIps, Expr::value(json))
                .col_expr(C::UpdatedAt, Expr::value(naive(now)))
                .filter(followers_of(id))
                .exec(conn)
                .await
                .map_err(storage)?;
        }
        if let Some(owner) = v.owner_id {
            change = change.col_expr(C::OwnerId, Expr::value(owner));
        }
        if let Some(credits) = v.credits {
            let (remaining, amount, interval) = credit_columns(credits);
            // Set in the database's current period (a refill starts with the next one).
            let period = match credits.and_then(|c| c.refill) {
                Some(r) => Expr::cust(period_sql(conn.get_database_backend(), r.interval)),
                None => Expr::value(Option::<i64>::None),
            };
            change = change
                .col_expr(C::Remaining, Expr::value(remaining))
                .col_expr(C::RefillAmount, Expr::value(amount))
                .col_expr(C::RefillInterval, Expr::value(interval))
                .col_expr(C::RefilledPeriod, period);
        }
        // One conditional UPDATE, then the read in the same transaction: a key deleted
        // meanwhile is NotFound, whichever statement the deletion lands between.
        let res = change.exec(conn).await.map_err(storage)?;
        if res.rows_affected == 0 {
            return Err(Error::NotFound { id: id.into() });
        }
        let key = get_key_on(conn, id).await?;
        self.audit(conn, KeyAction::Updated, Subject::key(&key)).await?;
        self.inner.limiter.forget(id);
        self.inner.credits.forget(id);
        Ok(key)
    }

    /// Revokes a key (soft delete: the record stays, later checks fail with
    /// [`Error::Revoked`]). Revoking a revoked key keeps its first `revoked_at`.
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Error, NewKey, VerifyOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let issued = client.create_key(org.id, NewKey::new("leaked")).await?;
    /// client.revoke_key(issued.record.id).await?;
    /// let check = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await;
    /// assert!(matches!(check, Err(Error::Revoked { .. })));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn revoke_key(&self, id: KeyId) -> Result<ApiKey> {
        let key =
            self.change(Change::Key(id), async |txn| self.revoke_key_on(txn, id).await).await?;
        tracing::info!(key_id = %id, "api key revoked");
        Ok(key)
    }

    /// [`revoke_key`](Self::revoke_key) on `conn`.
    pub(crate) async fn revoke_key_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
    ) -> Result<ApiKey> {
        let now = self.now();
        let res = api_key::Entity::update_many()
            .col_expr(api_key::Column::RevokedAt, Expr::value(naive(now)))
            .col_expr(api_key::Column::UpdatedAt, Expr::value(naive(now)))
            .filter(api_key::Column::Id.eq(id.as_uuid()))
            .filter(api_key::Column::RevokedAt.is_null())
            .exec(conn)
            .await
            .map_err(storage)?;
        let key = get_key_on(conn, id).await?;
        if res.rows_affected == 1 {
            self.audit(conn, KeyAction::Revoked, Subject::key(&key)).await?;
        }
        Ok(key)
    }

    /// Deletes a key for good (for erasure requests); its main limit's counters go with it;
    /// its named limits' counters (which hold no key material, only counts under a derived
    /// id) are purged once their window has ended, and in Redis every counter expires a
    /// minute after its window ends.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn delete_key(&self, id: KeyId) -> Result<()> {
        // A delete cascading into rate-limit rows can deadlock with a check counting in one
        // of them (PostgreSQL, MySQL): the database aborts one side, and the delete runs
        // again.
        let mut attempt = 1;
        loop {
            let delete = async |txn: &DatabaseTransaction| self.delete_key_on(txn, id).await;
            match self.change(Change::Key(id), delete).await {
                Err(Error::Conflict { .. }) if attempt < 3 => attempt += 1,
                other => return other,
            }
        }
    }

    /// [`delete_key`](Self::delete_key) on `conn` (no retry there: a conflict inside the
    /// host's transaction aborts that transaction).
    pub(crate) async fn delete_key_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
    ) -> Result<()> {
        let Some(key) = find_key_on(conn, id).await? else {
            return self.deleted(id, 0);
        };
        if let Some(newest) = hand_over_lineage(conn, id, &key.rate_limits).await? {
            self.inner.limiter.take_over(key.org_id, id, newest, &key.rate_limits).await;
        }
        let res = api_key::Entity::delete_by_id(id.as_uuid()).exec(conn).await.map_err(storage)?;
        if res.rows_affected == 1 {
            self.audit(conn, KeyAction::Deleted, Subject::key(&key)).await?;
        }
        self.deleted(id, res.rows_affected)
    }

    fn deleted(&self, id: KeyId, rows: u64) -> Result<()> {
        self.inner.limiter.forget(id);
        self.inner.credits.forget(id);
        if rows == 0 {
            return Err(Error::NotFound { id: id.into() });
        }
        tracing::info!(key_id = %id, "api key deleted");
        Ok(())
    }
}

/// The key with this id, read on `conn`.
pub(crate) async fn get_key_on<C: ConnectionTrait>(conn: &C, id: KeyId) -> Result<ApiKey> {
    find_key_on(conn, id).await?.ok_or(Error::NotFound { id: id.into() })
}

/// The key with this id, if it exists, read on `conn`.
pub(crate) async fn find_key_on<C: ConnectionTrait>(conn: &C, id: KeyId) -> Result<Option<ApiKey>> {
    let model = api_key::Entity::find_by_id(id.as_uuid()).one(conn).await.map_err(storage)?;
    model.map(api_key_from_model).transpose()
}
