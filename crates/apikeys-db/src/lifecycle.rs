//! The key lifecycle: roll with a grace period, renew or extend, the keys of an owner (in an
//! organization), the keys about to expire.

use std::time::Duration;

use apikeys_core::hazmat::validate_owner;
use apikeys_core::limits::{MAX_CREDITS, MAX_EXPIRES_AT};
use apikeys_core::{
    ApiKey, Error, Expiry, IssuedKey, KeyAction, KeyId, KeyPage, OrgId, Page, Result, StatusFilter,
};
use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect,
};

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::convert::{api_key_from_model, naive, to_micros};
use crate::entity::api_key;
use crate::error::storage;
use crate::feed::Change;
use crate::key_admin::{NewSecret, PreparedKey, get_key_on};
use crate::rate_limit::merge_windows;

/// The longest grace period a roll accepts (a year).
pub const MAX_GRACE: Duration = Duration::from_secs(366 * 86_400);

impl ApiKeyClient {
    /// Replaces a key with a new one, for a customer whose key leaked or who rotates keys.
    ///
    /// The new key has the old one's organization, project, product, name, scopes, rate
    /// limit, custom metadata, owner and expiry, and takes over its usage credits (balance
    /// and refill rule). The old key keeps working for `grace`, then fails with
    /// [`Error::Expired`]; while it works, it spends the new key's credits and counts against
    /// the new key's rate limit (the window's count so far goes with it), so the two never
    /// spend more than one balance or admit more than one limit, however often the lineage
    /// is rolled. The records link to each other (`rolled_to`, `rolled_from`), the audit
    /// trail gets `rolled` (old key) and `created` (new key), and all of it is one
    /// transaction. Other replicas' caches learn of the roll through the change feed, within
    /// their staleness bound.
    ///
    /// A zero `grace` is a revocation: the old key is revoked in the roll's transaction (it
    /// also gets a `revoked` event) and every replica refuses it with [`Error::Revoked`],
    /// whatever its clock says (an expiry at the roller's `now` would still be ahead for a
    /// replica whose clock is behind).
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Error, NewKey, VerifyOptions};
    /// # use std::time::Duration;
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let old = client.create_key(org.id, NewKey::new("ci")).await?;
    /// let new = client.roll_key(old.record.id, Duration::ZERO).await?;
    /// assert_eq!(new.record.rolled_from, Some(old.record.id));
    /// let check = client.verify_key(old.key.expose_secret(), &VerifyOptions::new()).await;
    /// assert!(matches!(check, Err(Error::Revoked { .. })));
    /// client.verify_key(new.key.expose_secret(), &VerifyOptions::new()).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `grace`) for a grace above [`MAX_GRACE`];
    /// [`Error::NotFound`]; [`Error::Revoked`] for a revoked key and [`Error::Expired`] for an
    /// expired one (nothing is written); [`Error::AlreadyExists`] naming the key it was
    /// already rolled to (roll that one instead); [`Error::Entropy`]; [`Error::Storage`].
    pub async fn roll_key(&self, id: KeyId, grace: Duration) -> Result<IssuedKey> {
        let grace = TimeDelta::from_std(grace)
            .ok()
            .filter(|_| grace <= MAX_GRACE)
            .ok_or_else(|| Error::invalid_input("grace", "must be at most 366 days"))?;
        let secret = self.new_secret()?;
        // Never store a hash under a version label that is another secret's.
        self.inner.secrets.check().await?;
        let issued = self
            .change(Change::Key(id), async move |txn| {
                self.roll_key_on(txn, id, grace, secret).await
            })
            .await?;
        tracing::info!(key_id = %id, new_key_id = %issued.record.id, "api key rolled");
        Ok(issued)
    }

    async fn roll_key_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
        grace: TimeDelta,
        secret: NewSecret,
    ) -> Result<IssuedKey> {
        use api_key::Column as Col;
        let now = self.now();
        let old = locked_row(conn, id).await?;
        let record = api_key_from_model(old.clone())?;
        if let Some(revoked_at) = record.revoked_at {
            return Err(Error::Revoked { revoked_at });
        }
        if let Some(to) = record.rolled_to {
            return Err(Error::AlreadyExists { existing: to.into() });
        }
        if let Some(expired_at) = record.expires_at.filter(|e| now >= *e) {
            return Err(Error::Expired { expired_at });
        }
        let new_id = self.new_id(now);
        let revoke = grace.is_zero();
        let mut change = api_key::Entity::update_many()
            .col_expr(Col::RolledTo, Expr::value(new_id))
            .col_expr(Col::LineageHeadId, Expr::value(new_id))
            .col_expr(Col::UpdatedAt, Expr::value(naive(now)))
            .filter(Col::Id.eq(id.as_uuid()));
        change = if revoke {
            // Revoked, not expired at `now`: an expiry is judged by each replica's clock.
            change.col_expr(Col::RevokedAt, Expr::value(naive(now)))
        } else {
            let end = to_micros(now + grace);
            let old_ends = record.expires_at.map_or(end, |e| e.min(end));
            change.col_expr(Col::ExpiresAt, Expr::value(naive(old_ends)))
        };
        if old.remaining.is_some() {
            // The balance moves to the new key; the old one spends from there (see
            // `spend_credits`).
            change = change
                .col_expr(Col::Remaining, Expr::value(0_i64))
                .col_expr(Col::RefillAmount, Expr::value(Option::<i64>::None))
                .col_expr(Col::RefillInterval, Expr::value(Option::<String>::None))
                .col_expr(Col::RefilledPeriod, Expr::value(Option::<i64>::None));
        }
        change.exec(conn).await.map_err(storage)?;
        let row = api_key::Model {
            id: new_id,
            key_hash: secret.hash,
            secret_version: secret.version,
            alt_key_hash: secret.alt.as_ref().map(|(_, h)| h.clone()),
            alt_secret_version: secret.alt.as_ref().map(|(v, _)| *v),
            hint: secret.plaintext.hint(),
            created_at: naive(now),
            updated_at: naive(now),
            last_used_at: None,
            use_count: 0,
            rolled_from: Some(id.as_uuid()),
            rolled_to: None,
            lineage_head_id: None,
            ..old
        };
        let prepared = PreparedKey {
            plaintext: secret.plaintext,
            row,
            project_id: record.project_id,
            product_id: record.product_id,
        };
        let issued = self.insert_key_on(conn, record.org_id, prepared).await?;
        // One rate-limit budget for the lineage: the keys that counted in the old key's
        // windows (the old key, and any it had replaced) now count in the new key's, which
        // start from the old key's counts.
        api_key::Entity::update_many()
            .col_expr(Col::LineageHeadId, Expr::value(new_id))
            .filter(Col::LineageHeadId.eq(id.as_uuid()))
            .exec(conn)
            .await
            .map_err(storage)?;
        merge_windows(conn, id, issued.record.id, &record.rate_limits).await?;
        let (org, limits) = (record.org_id, &record.rate_limits);
        self.inner.limiter.take_over(org, id, issued.record.id, limits).await;
        let subject = Subject::key(&record).related(issued.record.id);
        self.audit(conn, KeyAction::Rolled, subject).await?;
        if revoke {
            let old = get_key_on(conn, id).await?;
            self.audit(conn, KeyAction::Revoked, Subject::key(&old)).await?;
        }
        Ok(issued)
    }

    /// Moves a key's expiry to `expires_at` (later or earlier, but in the future).
    ///
    /// A rolled key is refused: it was superseded, and its grace period is not to be
    /// stretched into a second life beside its successor (renew the successor instead; end
    /// the grace at once with [`revoke_key`](Self::revoke_key)).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `expires_at`) for a time not in the future or after
    /// [`MAX_EXPIRES_AT`]; [`Error::NotFound`]; [`Error::Revoked`] for a revoked key;
    /// [`Error::AlreadyExists`] naming the key a rolled key was rolled to (as
    /// [`roll_key`](Self::roll_key) refuses it); nothing is written then; [`Error::Storage`].
    pub async fn renew_key(&self, id: KeyId, expires_at: DateTime<Utc>) -> Result<ApiKey> {
        let at = to_micros(expires_at);
        check_expiry(at, self.now())?;
        self.change(Change::Key(id), async move |txn| self.set_expiry_on(txn, id, |_| Ok(at)).await)
            .await
    }

    /// Adds `amount` usage credits to a key's balance (a top-up), in one atomic statement:
    /// checks spending on any replica meanwhile neither lose the amount nor spend any credit
    /// twice. A refill that has fallen due is applied first (as the next check would), so a
    /// top-up in a new period adds to the refilled balance instead of being overwritten by
    /// it. To set a balance, or remove it, use [`update_key`](Self::update_key).
    ///
    /// Replicas keep the blocks they hold in [`CreditMode::Leased`](crate::CreditMode) (the
    /// record's `updated_at`, which a new balance set moves, stays), and one that found the
    /// balance spent admits the key again within a second.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Credits, Error, NewKey, ValidateOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let issued = client.create_key(org.id, NewKey::new("trial").with_credits(Credits::new(1))).await?;
    /// let (id, key) = (issued.record.id, issued.key.expose_secret());
    /// client.validate_key(key, &ValidateOptions::new()).await?;
    /// let spent = client.validate_key(key, &ValidateOptions::new()).await;
    /// assert!(matches!(spent, Err(Error::UsageExhausted { .. })));
    /// let topped_up = client.add_credits(id, 500).await?;
    /// assert_eq!(topped_up.credits.map(|c| c.remaining), Some(500));
    /// client.validate_key(key, &ValidateOptions::new()).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `credits`) for an amount of zero or above
    /// [`MAX_CREDITS`](crate::core::limits::MAX_CREDITS), a key with no balance (unlimited use), or a
    /// balance the amount would take past that maximum; [`Error::NotFound`];
    /// [`Error::Revoked`]; [`Error::AlreadyExists`] naming the key a rolled key was rolled
    /// to (its balance moved there); nothing is written then; [`Error::Storage`].
    pub async fn add_credits(&self, id: KeyId, amount: u64) -> Result<ApiKey> {
        if amount == 0 || amount > MAX_CREDITS {
            return Err(Error::invalid_input("credits", "the amount must be 1 to 2^63 - 1"));
        }
        self.in_transaction(async move |txn| {
            let record = api_key_from_model(locked_row(txn, id).await?)?;
            if let Some(revoked_at) = record.revoked_at {
                return Err(Error::Revoked { revoked_at });
            }
            if let Some(to) = record.rolled_to {
                return Err(Error::AlreadyExists { existing: to.into() });
            }
            if record.credits.is_none() {
                return Err(Error::invalid_input(
                    "credits",
                    "the key has no credit balance (unlimited use): set one with update_key",
                ));
            }
            if !crate::credits::add(txn, crate::credits::Row::Key(id), amount).await? {
                return Err(Error::invalid_input(
                    "credits",
                    "the balance would pass the largest one (2^63 - 1)",
                ));
            }
            let key = get_key_on(txn, id).await?;
            self.audit(txn, KeyAction::Updated, Subject::key(&key)).await?;
            Ok(key)
        })
        .await
    }

    /// Moves a key's expiry `by` later. A rolled key is refused, as by
    /// [`renew_key`](Self::renew_key).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `expires_at`) for a key that never expires, a zero
    /// duration, or a result still in the past or after [`MAX_EXPIRES_AT`];
    /// [`Error::NotFound`]; [`Error::Revoked`]; [`Error::AlreadyExists`] naming the key a
    /// rolled key was rolled to; nothing is written then; [`Error::Storage`].
    pub async fn extend_key(&self, id: KeyId, by: Duration) -> Result<ApiKey> {
        let by = TimeDelta::from_std(by)
            .ok()
            .filter(|d| *d > TimeDelta::zero())
            .ok_or_else(|| Error::invalid_input("expires_at", "the extension must be positive"))?;
        self.change(Change::Key(id), async move |txn| {
            self.set_expiry_on(txn, id, |current| {
                let base = current
                    .ok_or_else(|| Error::invalid_input("expires_at", "the key never expires"))?;
                base.checked_add_signed(by).ok_or_else(|| {
                    Error::invalid_input("expires_at", "must be in or before year 9999")
                })
            })
            .await
        })
        .await
    }

    /// Disables a key: every check of it fails with [`Error::Disabled`] until
    /// [`enable_key`](Self::enable_key) (a revocation, unlike this, is final). Other replicas'
    /// caches learn of it through the change feed, within their staleness bound, like a
    /// revocation. The key keeps everything else: its rate-limit windows, credits, expiry and
    /// the keys it was rolled to or from (a key rolled while disabled stays disabled in its
    /// successor). The keys rolled into it that are still in their grace period, which spend
    /// its credits and rate limit, are disabled with it (and enabled with it). Disabling a
    /// disabled key changes nothing and keeps its first `disabled_at`; the audit trail gets
    /// `disabled` once.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Error, NewKey, VerifyOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let issued = client.create_key(org.id, NewKey::new("unpaid invoice")).await?;
    /// client.disable_key(issued.record.id).await?;
    /// let check = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await;
    /// assert!(matches!(check, Err(Error::Disabled { .. })));
    /// client.enable_key(issued.record.id).await?;
    /// client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Revoked`] for a revoked key (nothing is written);
    /// [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn disable_key(&self, id: KeyId) -> Result<ApiKey> {
        self.switch(id, Switch::Disable).await
    }

    /// Enables a disabled key again: checks judge it as before it was disabled, on every
    /// replica within the cache's staleness bound. Enabling an enabled key changes nothing;
    /// the audit trail gets `enabled` once per disable.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Revoked`] for a revoked key (a revocation is final;
    /// nothing is written); [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn enable_key(&self, id: KeyId) -> Result<ApiKey> {
        self.switch(id, Switch::Enable).await
    }

    /// [`disable_key`](Self::disable_key) or [`enable_key`](Self::enable_key): the switch and
    /// its followers' in one transaction, each in the feed.
    async fn switch(&self, id: KeyId, switch: Switch) -> Result<ApiKey> {
        let changes = with_followers(id, self.db()).await?;
        let key =
            self.change_all(&changes, async |txn| self.switch_on(txn, id, switch).await).await?;
        match switch {
            Switch::Disable => tracing::info!(key_id = %id, "api key disabled"),
            Switch::Enable => tracing::info!(key_id = %id, "api key enabled"),
        }
        Ok(key)
    }

    /// [`disable_key`](Self::disable_key) or [`enable_key`](Self::enable_key) on `conn`.
    pub(crate) async fn switch_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
        switch: Switch,
    ) -> Result<ApiKey> {
        use api_key::Column as Col;
        let now = self.now();
        let record = api_key_from_model(locked_row(conn, id).await?)?;
        if let Some(revoked_at) = record.revoked_at {
            return Err(Error::Revoked { revoked_at });
        }
        let value = match switch {
            Switch::Disable => Some(naive(to_micros(now))),
            Switch::Enable => None,
        };
        // The keys rolled into this one, in their grace, follow it (each keeps its own first
        // `disabled_at`).
        let followers = api_key::Entity::update_many()
            .col_expr(Col::DisabledAt, Expr::value(value))
            .col_expr(Col::UpdatedAt, Expr::value(naive(now)))
            .filter(followers_of(id));
        match switch {
            Switch::Disable => followers.filter(Col::DisabledAt.is_null()),
            Switch::Enable => followers.filter(Col::DisabledAt.is_not_null()),
        }
        .exec(conn)
        .await
        .map_err(storage)?;
        let action = match switch {
            Switch::Disable if record.disabled_at.is_none() => KeyAction::Disabled,
            Switch::Enable if record.disabled_at.is_some() => KeyAction::Enabled,
            _ => return Ok(record),
        };
        api_key::Entity::update_many()
            .col_expr(Col::DisabledAt, Expr::value(value))
            .col_expr(Col::UpdatedAt, Expr::value(naive(now)))
            .filter(Col::Id.eq(id.as_uuid()))
            .exec(conn)
            .await
            .map_err(storage)?;
        let key = get_key_on(conn, id).await?;
        self.audit(conn, action, Subject::key(&key)).await?;
        Ok(key)
    }

    async fn set_expiry_on<C: ConnectionTrait>(
        &self,
        conn: &C,
        id: KeyId,
        new: impl FnOnce(Option<DateTime<Utc>>) -> Result<DateTime<Utc>>,
    ) -> Result<ApiKey> {
        let now = self.now();
        let record = api_key_from_model(locked_row(conn, id).await?)?;
        if let Some(revoked_at) = record.revoked_at {
            return Err(Error::Revoked { revoked_at });
        }
        if let Some(to) = record.rolled_to {
            return Err(Error::AlreadyExists { existing: to.into() });
        }
        let at = to_micros(new(record.expires_at)?);
        check_expiry(at, now)?;
        api_key::Entity::update_many()
            .col_expr(api_key::Column::ExpiresAt, Expr::value(naive(at)))
            .col_expr(api_key::Column::UpdatedAt, Expr::value(naive(now)))
            .filter(api_key::Column::Id.eq(id.as_uuid()))
            .exec(conn)
            .await
            .map_err(storage)?;
        let key = get_key_on(conn, id).await?;
        self.audit(conn, KeyAction::Renewed, Subject::key(&key)).await?;
        Ok(key)
    }

    /// The keys of one owner (see [`NewKey::with_owner`](crate::NewKey::with_owner)) in
    /// organization `org`, with the given status, oldest first, one page at a time. The owner
    /// id is compared exactly. Owner ids are the host's and only mean something within one
    /// organization: another organization's keys with the same owner id are never listed.
    /// An organization that does not exist has no keys (an empty page).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `owner_id`) for an id no key can have;
    /// [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn list_owner_keys(
        &self,
        org: OrgId,
        owner: &str,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        validate_owner(owner)?;
        self.list_keys(owner_condition(org, owner), status, page).await
    }

    /// Revokes every key of one owner in organization `org` that is not revoked yet, in one
    /// transaction (each gets a `revoked` event). Returns the ids of the keys it revoked. Keys
    /// of other organizations with the same owner id are never touched. A key created for
    /// the owner while this runs may be left out: call it again after the owner's access is
    /// closed.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `owner_id`); [`Error::Unavailable`];
    /// [`Error::Storage`].
    pub async fn revoke_owner_keys(&self, org: OrgId, owner: &str) -> Result<Vec<KeyId>> {
        use api_key::Column as Col;
        validate_owner(owner)?;
        let ids: Vec<uuid::Uuid> = api_key::Entity::find()
            .select_only()
            .column(Col::Id)
            .filter(owner_condition(org, owner))
            .filter(Col::RevokedAt.is_null())
            .into_tuple()
            .all(self.db())
            .await
            .map_err(storage)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let changes: Vec<Change> = ids.iter().map(|u| Change::Key(KeyId::from_uuid(*u))).collect();
        let revoked = self
            .change_all(&changes, async |txn| {
                let mut revoked = Vec::new();
                for id in &ids {
                    let id = KeyId::from_uuid(*id);
                    let before = get_key_on(txn, id).await;
                    match before {
                        // Still this owner's and not revoked (it may have changed since).
                        Ok(k)
                            if k.revoked_at.is_none()
                                && k.org_id == org
                                && k.owner_id.as_deref() == Some(owner) =>
                        {
                            self.revoke_key_on(txn, id).await?;
                            revoked.push(id);
                        }
                        Ok(_) | Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(revoked)
            })
            .await?;
        tracing::info!(org_id = %org, keys = revoked.len(), "api keys of one owner revoked");
        Ok(revoked)
    }

    /// Active keys that expire within `within` from now, oldest first, one page at a time:
    /// to warn their owners before the keys stop working. Rolled keys are not listed: they
    /// were superseded, and their successor (listed when it expires soon) is the key to
    /// renew.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `within`) for a duration too large to add to now;
    /// [`Error::Unavailable`]; [`Error::Storage`].
    pub async fn list_expiring_keys(
        &self,
        within: Duration,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        let horizon = TimeDelta::from_std(within)
            .ok()
            .and_then(|d| self.now().checked_add_signed(d))
            .map(|t| t.min(MAX_EXPIRES_AT))
            .ok_or_else(|| Error::invalid_input("within", "too large"))?;
        let cond = sea_orm::Condition::all()
            .add(api_key::Column::ExpiresAt.lte(naive(horizon)))
            .add(api_key::Column::RolledTo.is_null());
        self.list_keys(cond, StatusFilter::Active, page).await
    }
}

/// The keys of `owner` in `org` (the index `ix_api_keys_org_owner`).
pub(crate) fn owner_condition(org: OrgId, owner: &str) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(api_key::Column::OrgId.eq(org.as_uuid()))
        .add(api_key::Column::OwnerId.eq(owner))
}

/// Reads a key's row, locked for the rest of the transaction (PostgreSQL, MySQL; a SQLite
/// write transaction holds the whole database already).
async fn locked_row<C: ConnectionTrait>(conn: &C, id: KeyId) -> Result<api_key::Model> {
    let select = api_key::Entity::find_by_id(id.as_uuid());
    let select = if conn.get_database_backend() == DbBackend::Sqlite {
        select
    } else {
        select.lock_exclusive()
    };
    select.one(conn).await.map_err(storage)?.ok_or(Error::NotFound { id: id.into() })
}

/// The rules of a new key's expiry (core's `Expiry::resolve`): after `now`, no later than
/// [`MAX_EXPIRES_AT`].
fn check_expiry(at: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
    Expiry::At(at).resolve(now, None).map(|_| ())
}

/// Which way [`ApiKeyClient::switch_on`] turns a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Switch {
    Disable,
    Enable,
}

/// The rows of the keys rolled into `id` that are not revoked: its followers (see
/// [`followers_on`]).
pub(crate) fn followers_of(id: KeyId) -> Condition {
    use api_key::Column as Col;
    Condition::all().add(Col::LineageHeadId.eq(id.as_uuid())).add(Col::RevokedAt.is_null())
}

/// The keys rolled into `id` whose grace has not ended (and are not revoked): they spend
/// `id`'s credits and rate limit, and follow its disable, enable and IP allowlist.
pub(crate) async fn followers_on<C: ConnectionTrait>(conn: &C, id: KeyId) -> Result<Vec<KeyId>> {
    use api_key::Column as Col;
    let ids: Vec<uuid::Uuid> = api_key::Entity::find()
        .select_only()
        .column(Col::Id)
        .filter(followers_of(id))
        .into_tuple()
        .all(conn)
        .await
        .map_err(storage)?;
    Ok(ids.into_iter().map(KeyId::from_uuid).collect())
}

/// The feed changes of a change to `id` that its followers ([`followers_on`]) follow: the
/// key's and each follower's, so that every replica's cache drops them all. A key rolled
/// into `id` between this read and the change's transaction cannot appear (rolling makes new
/// keys, never new predecessors of an existing one).
pub(crate) async fn with_followers<C: ConnectionTrait>(id: KeyId, conn: &C) -> Result<Vec<Change>> {
    let mut changes = vec![Change::Key(id)];
    changes.extend(followers_on(conn, id).await?.into_iter().map(Change::Key));
    Ok(changes)
}
