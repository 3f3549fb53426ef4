//! Owners as identities: a plan (rate limits and usage credits) that every key of one owner
//! shares, within its organization and across rolls.
//!
//! A key names its owner with `owner_id`, a label; an owner with a plan has a row in
//! `owners`, named by `(org_id, owner_id)` and with an id derived from them (the same on
//! every replica, before and after the row exists). The key lookup reads the owner's plan
//! with the key (one join), so a check of an owned key costs no extra read; a change to a
//! plan is written to the change feed as a change of each of the owner's keys, so cached
//! keys see it within the cache's staleness bound, like any change of their own.

use std::sync::Arc;

use apikeys_core::hazmat::validate_owner;
use apikeys_core::{
    Error, KeyId, KeyPage, OrgId, Owner, OwnerPlan, Page, RateLimits, RecordId, Result,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter,
    QueryResult, QuerySelect,
};
use uuid::Uuid;

use crate::client::ApiKeyClient;
use crate::convert::{credit_columns, credits_of, limits_of, limits_to_json, naive};
use crate::credits::{Row, stamp_refill_period};
use crate::entity::{api_key, organization, owner};
use crate::error::{Vanished, corrupt, missing_parent, storage};
use crate::feed::Change;
use crate::idempotent::{Read, VANISHED_RETRIES, insert_unique};
use crate::key_list::page_rows;
use crate::lifecycle::owner_condition;

/// What a check of an owned key needs of its owner's plan, read with the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnerShare {
    /// The plan's row: its counters and its balance.
    pub(crate) row: Uuid,
    /// The shared limits.
    pub(crate) limits: RateLimits,
    /// Whether the plan has a credit balance.
    pub(crate) credits: bool,
    /// The plan's `updated_at`: leased blocks of its balance are tied to it.
    pub(crate) updated_at: chrono::DateTime<chrono::Utc>,
}

impl OwnerShare {
    /// The owner columns a key lookup reads beside the key (`owner_row_id`,
    /// `owner_rate_limits`, `owner_remaining`, `owner_updated_at`): `None` when the key's
    /// owner has no plan.
    pub(crate) fn from_lookup(res: &QueryResult) -> Result<Option<Arc<Self>>> {
        let row: Option<Uuid> = res.try_get("", "owner_row_id").map_err(storage)?;
        let Some(row) = row else { return Ok(None) };
        let limits: Option<serde_json::Value> =
            res.try_get("", "owner_rate_limits").map_err(storage)?;
        let remaining: Option<i64> = res.try_get("", "owner_remaining").map_err(storage)?;
        let updated_at: Option<chrono::NaiveDateTime> =
            res.try_get("", "owner_updated_at").map_err(storage)?;
        let updated_at = updated_at.ok_or_else(|| corrupt("owners", "updated_at"))?;
        Ok(Some(Arc::new(Self {
            row,
            limits: limits_of("owners", limits)?,
            credits: remaining.is_some(),
            updated_at: updated_at.and_utc(),
        })))
    }

    /// About how many bytes it takes, for the cache's weight.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.limits.iter().map(|(n, _)| n.len() + 32).sum::<usize>()
    }
}

/// The record id of `owner`'s plan in `org`: the first 16 bytes of SHA-256(`apikeys
/// owner`, organization id, owner id) as a UUID (version 8). Every replica derives the same
/// one, so the plan's counters stay the same when a plan is deleted and set again.
pub(crate) fn owner_record_id(org: OrgId, owner: &str) -> Uuid {
    crate::id::derived(b"apikeys owner\0", &[org.as_uuid().as_bytes(), owner.as_bytes()])
}

/// Reads an `owners` row back into the core view.
fn owner_from_model(m: owner::Model) -> Result<Owner> {
    let credits = credits_of("owners", m.remaining, m.refill_amount, m.refill_interval.as_deref())?;
    Ok(Owner {
        id: m.id,
        org_id: OrgId::from_uuid(m.org_id),
        owner_id: m.owner_id,
        rate_limits: limits_of("owners", m.rate_limits)?,
        credits,
        created_at: m.created_at.and_utc(),
        updated_at: m.updated_at.and_utc(),
    })
}

/// What a write sets on a plan.
enum Set {
    /// Limits and credits (the balance set anew).
    Plan(OwnerPlan),
    /// Limits only; the balance stays.
    Limits(RateLimits),
}

impl ApiKeyClient {
    /// The plan of `owner` in organization `org`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `owner_id`); [`Error::NotFound`] (an owner with no
    /// plan, or an organization that does not exist); [`Error::Storage`].
    pub async fn get_owner(&self, org: OrgId, owner: &str) -> Result<Owner> {
        validate_owner(owner)?;
        let id = owner_record_id(org, owner);
        let row = owner::Entity::find_by_id(id).one(self.db()).await.map_err(storage)?;
        row.map(owner_from_model).transpose()?.ok_or(Error::NotFound { id: RecordId::Owner(id) })
    }

    /// The owners of organization `org` that have a plan, a page at a time, in record id
    /// order (stable, not creation order).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_owners_page(&self, org: OrgId, page: Page) -> Result<KeyPage<Owner, Uuid>> {
        let query = owner::Entity::find().filter(owner::Column::OrgId.eq(org.as_uuid()));
        let (rows, more) = page_rows(self.db(), query, owner::Column::Id, page).await?;
        let items = rows.into_iter().map(owner_from_model).collect::<Result<Vec<_>>>()?;
        let next = if more { items.last().map(|o| o.id) } else { None };
        Ok(KeyPage { items, next })
    }

    /// Sets the plan of `owner` in organization `org`: the limits and the credit balance
    /// that every key of the owner shares, created or replaced whole (a balance given is set
    /// anew; none removes it). For a deploy that declares plans each time it starts, see
    /// [`get_or_create_owner`](Self::get_or_create_owner), which leaves a plan in use as it
    /// is; to change only the limits, [`set_owner_limits`](Self::set_owner_limits); to top
    /// up, [`add_owner_credits`](Self::add_owner_credits).
    ///
    /// Every replica's checks of the owner's keys use the new plan at once, or within the
    /// verified-key cache's staleness bound when it has one.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Credits, Error, NewKey, OwnerPlan, RateLimit, RateLimits, ValidateOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let team = RateLimits::new().with("daily", RateLimit::per_day(3)?)?;
    /// client.set_owner(org.id, "team-7", OwnerPlan::new().with_rate_limits(team)).await?;
    /// let a = client.create_key(org.id, NewKey::new("a").with_owner("team-7")).await?.key;
    /// let b = client.create_key(org.id, NewKey::new("b").with_owner("team-7")).await?.key;
    /// let check = ValidateOptions::new();
    /// client.validate_key(a.expose_secret(), &check).await?;
    /// client.validate_key(b.expose_secret(), &check).await?;
    /// client.validate_key(a.expose_secret(), &check).await?;
    /// match client.validate_key(b.expose_secret(), &check).await {
    ///     Err(Error::Quota { name, .. }) => assert_eq!(name.as_deref(), Some("owner.daily")),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `owner_id` or `credits`); [`Error::NotFound`] for an
    /// organization that does not exist; [`Error::Unavailable`]; [`Error::Storage`]. Nothing
    /// is written on error.
    pub async fn set_owner(&self, org: OrgId, owner: &str, plan: OwnerPlan) -> Result<Owner> {
        validate_owner(owner)?;
        let plan = plan.validate()?;
        self.write_owner(org, owner, Set::Plan(plan)).await
    }

    /// Changes only the limits of `owner`'s plan in `org` (creating a plan without credits
    /// if it has none); its balance stays as it is.
    ///
    /// # Errors
    /// As [`set_owner`](Self::set_owner).
    pub async fn set_owner_limits(
        &self,
        org: OrgId,
        owner: &str,
        limits: RateLimits,
    ) -> Result<Owner> {
        validate_owner(owner)?;
        self.write_owner(org, owner, Set::Limits(limits)).await
    }

    /// The plan of `owner` in `org`, set to `plan` only if it has none: for bootstrap on
    /// every deploy. Returns the plan and whether this call created it. Safe to call from
    /// many replicas at once: one creates it, the others find it.
    ///
    /// # Errors
    /// As [`set_owner`](Self::set_owner).
    pub async fn get_or_create_owner(
        &self,
        org: OrgId,
        owner: &str,
        plan: OwnerPlan,
    ) -> Result<(Owner, bool)> {
        validate_owner(owner)?;
        let plan = plan.validate()?;
        match self.get_owner(org, owner).await {
            Ok(found) => return Ok((found, false)),
            Err(Error::NotFound { id: RecordId::Owner(_) }) => {}
            Err(e) => return Err(e),
        }
        let changes = self.owner_changes(org, owner).await?;
        let now = self.now();
        let found = self
            .change_all(&changes, async |txn| {
                org_exists(txn, org).await?;
                let created = insert_plan(txn, org, owner, &plan, now).await?;
                Ok((read_plan(txn, org, owner).await?, created))
            })
            .await?;
        if found.1 {
            self.catch_up(org, owner, &changes).await;
        }
        Ok(found)
    }

    /// Adds `amount` credits to the balance `owner`'s keys share, after a refill that is
    /// due, in one atomic statement (checks spending meanwhile lose nothing).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `credits`) for an amount of zero or above
    /// [`MAX_CREDITS`](crate::core::limits::MAX_CREDITS), a plan with no balance, or a
    /// balance the amount would take past that maximum; (field `owner_id`);
    /// [`Error::NotFound`]; [`Error::Storage`]. Nothing is written on error.
    pub async fn add_owner_credits(&self, org: OrgId, owner: &str, amount: u64) -> Result<Owner> {
        validate_owner(owner)?;
        if amount == 0 || amount > apikeys_core::limits::MAX_CREDITS {
            return Err(Error::invalid_input("credits", "the amount must be 1 to 2^63 - 1"));
        }
        let id = owner_record_id(org, owner);
        self.in_transaction(async |txn| {
            let row = owner::Entity::find_by_id(id).one(txn).await.map_err(storage)?;
            let plan = owner_from_model(row.ok_or(Error::NotFound { id: RecordId::Owner(id) })?)?;
            if plan.credits.is_none() {
                return Err(Error::invalid_input(
                    "credits",
                    "the owner's plan has no credit balance (unlimited use): set one with set_owner",
                ));
            }
            if !crate::credits::add(txn, Row::Owner(id), amount).await? {
                return Err(Error::invalid_input(
                    "credits",
                    "the balance would pass the largest one (2^63 - 1)",
                ));
            }
            let row = owner::Entity::find_by_id(id).one(txn).await.map_err(storage)?;
            owner_from_model(row.ok_or(Error::NotFound { id: RecordId::Owner(id) })?)
        })
        .await
    }

    /// Deletes `owner`'s plan in `org`: its keys stop sharing limits and credits (their own
    /// still apply). The keys themselves are untouched; to close the owner's access, see
    /// [`revoke_owner_keys`](Self::revoke_owner_keys).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `owner_id`); [`Error::NotFound`] for an owner with no
    /// plan; [`Error::Storage`].
    pub async fn delete_owner(&self, org: OrgId, owner: &str) -> Result<()> {
        validate_owner(owner)?;
        let id = owner_record_id(org, owner);
        // An owner with no plan: refused before any feed change is written.
        self.get_owner(org, owner).await?;
        let changes = self.owner_changes(org, owner).await?;
        self.change_all(&changes, async |txn| {
            let res = owner::Entity::delete_by_id(id).exec(txn).await.map_err(storage)?;
            if res.rows_affected == 0 {
                return Err(Error::NotFound { id: RecordId::Owner(id) });
            }
            Ok(())
        })
        .await?;
        self.catch_up(org, owner, &changes).await;
        Ok(())
    }

    /// Creates or changes a plan, in one transaction with a feed change of each of the
    /// owner's keys, then [`catch_up`](Self::catch_up).
    async fn write_owner(&self, org: OrgId, owner: &str, set: Set) -> Result<Owner> {
        let id = owner_record_id(org, owner);
        let changes = self.owner_changes(org, owner).await?;
        let now = self.now();
        let plan = match &set {
            Set::Plan(plan) => plan.clone(),
            Set::Limits(limits) => OwnerPlan::new().with_rate_limits(limits.clone()),
        };
        let written = self
            .change_all(&changes, async |txn| {
                org_exists(txn, org).await?;
                // Inserted, or updated; a plan deleted between the two is inserted again.
                for _ in 0..VANISHED_RETRIES {
                    if insert_plan(txn, org, owner, &plan, now).await? {
                        return read_plan(txn, org, owner).await;
                    }
                    let limits = Expr::value(limits_to_json(&plan.rate_limits));
                    let mut update =
                        owner::Entity::update_many().col_expr(owner::Column::RateLimits, limits);
                    if let Set::Plan(plan) = &set {
                        // A new balance: `updated_at` moves, which ends the give-backs of the
                        // old one. A change of limits alone keeps it (and them).
                        let (remaining, refill_amount, refill_interval) =
                            credit_columns(plan.credits);
                        update = update
                            .col_expr(owner::Column::UpdatedAt, Expr::value(naive(now)))
                            .col_expr(owner::Column::Remaining, Expr::value(remaining))
                            .col_expr(owner::Column::RefillAmount, Expr::value(refill_amount))
                            .col_expr(owner::Column::RefillInterval, Expr::value(refill_interval))
                            .col_expr(owner::Column::RefilledPeriod, Expr::value(None::<i64>));
                    }
                    let res = update.filter(owner::Column::Id.eq(id)).exec(txn).await;
                    if res.map_err(storage)?.rows_affected == 0 {
                        continue;
                    }
                    if let Set::Plan(plan) = &set
                        && let Some(refill) = plan.credits.and_then(|c| c.refill)
                    {
                        stamp_refill_period(txn, Row::Owner(id), refill.interval).await?;
                    }
                    return read_plan(txn, org, owner).await;
                }
                Err(Error::storage(Vanished("owner's plan")))
            })
            .await?;
        self.catch_up(org, owner, &changes).await;
        Ok(written)
    }

    /// After a plan change committed: a feed change for each key of the owner that
    /// `before` (read before the change) did not list. A key created for the owner, or
    /// given to it, while the change ran may have been read and cached with the old plan
    /// by a replica; its change makes every cache read it again. Best effort: a failure is
    /// logged, and such a key keeps the old plan in a cache until it is evicted or changed.
    async fn catch_up(&self, org: OrgId, owner: &str, before: &[Change]) {
        let after = match self.owner_changes(org, owner).await {
            Ok(after) => after,
            Err(e) => {
                tracing::warn!(org_id = %org, error = %e, "reading an owner's keys after a plan change failed; keys created meanwhile may keep the old plan in caches");
                return;
            }
        };
        let before: std::collections::HashSet<&Change> = before.iter().collect();
        let missed: Vec<Change> = after.into_iter().filter(|c| !before.contains(c)).collect();
        if missed.is_empty() {
            return;
        }
        if let Err(e) = self.change_all(&missed, async |_| Ok(())).await {
            tracing::warn!(org_id = %org, error = %e, "announcing the keys created during an owner's plan change failed; they may keep the old plan in caches");
        }
    }

    /// A feed change for each key of `owner` in `org` that is not revoked: a change to the
    /// plan makes their cached records stale.
    async fn owner_changes(&self, org: OrgId, owner: &str) -> Result<Vec<Change>> {
        let ids: Vec<Uuid> = api_key::Entity::find()
            .select_only()
            .column(api_key::Column::Id)
            .filter(owner_condition(org, owner))
            .filter(api_key::Column::RevokedAt.is_null())
            .into_tuple()
            .all(self.db())
            .await
            .map_err(storage)?;
        Ok(ids.into_iter().map(|id| Change::Key(KeyId::from_uuid(id))).collect())
    }
}

/// [`Error::NotFound`] unless organization `org` exists.
async fn org_exists<C: ConnectionTrait>(conn: &C, org: OrgId) -> Result<()> {
    let found = organization::Entity::find_by_id(org.as_uuid()).one(conn).await.map_err(storage)?;
    found.map(|_| ()).ok_or(Error::NotFound { id: org.into() })
}

/// `owner`'s plan in `org`, as the latest committed row (MySQL's plain reads in a
/// transaction see its first read's snapshot, which may predate another caller's insert).
async fn read_plan<C: ConnectionTrait>(conn: &C, org: OrgId, owner: &str) -> Result<Owner> {
    let id = owner_record_id(org, owner);
    let select = Read::Latest.apply(owner::Entity::find_by_id(id), conn.get_database_backend());
    let row = select.one(conn).await.map_err(storage)?;
    owner_from_model(row.ok_or(Error::NotFound { id: RecordId::Owner(id) })?)
}

/// Inserts `owner`'s plan unless it has one; returns whether it did.
async fn insert_plan<C: ConnectionTrait>(
    conn: &C,
    org: OrgId,
    owner: &str,
    plan: &OwnerPlan,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool> {
    let id = owner_record_id(org, owner);
    let (remaining, refill_amount, refill_interval) = credit_columns(plan.credits);
    let row = owner::Model {
        id,
        org_id: org.as_uuid(),
        owner_id: owner.to_owned(),
        rate_limits: limits_to_json(&plan.rate_limits),
        remaining,
        refill_amount,
        refill_interval,
        refilled_period: None,
        created_at: naive(now),
        updated_at: naive(now),
    };
    let mut active = row.into_active_model();
    active.refilled_period = ActiveValue::Set(None);
    let inserted = insert_unique::<owner::Entity, _, _>(conn, active, [owner::Column::Id])
        .await
        .map_err(|e| missing_parent(e, org))?;
    if inserted && let Some(refill) = plan.credits.and_then(|c| c.refill) {
        stamp_refill_period(conn, Row::Owner(id), refill.interval).await?;
    }
    Ok(inserted)
}
