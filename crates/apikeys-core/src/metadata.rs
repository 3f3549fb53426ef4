//! Key metadata: the inputs to create and update a key, and custom JSON rules.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

use crate::custom::validate_custom;
use crate::error::{Error, Result};
use crate::id::{ProductId, ProjectId};
use crate::ip::IpAllowlist;
use crate::lifecycle::{Credits, validate_owner};
use crate::org::validate_label;
use crate::rate_limit::{RateLimit, RateLimits};
use crate::scope::Scopes;

/// The latest expiry a key may have: the last microsecond of year 9999, the end of what
/// MySQL's `DATETIME`, PostgreSQL's `timestamp` and SQLite's ISO-8601 text (which must keep
/// four-digit years to sort in time order) all store exactly.
pub const MAX_EXPIRES_AT: DateTime<Utc> =
    match DateTime::from_timestamp_micros(253_402_300_799_999_999) {
        Some(t) => t,
        None => DateTime::<Utc>::MIN_UTC,
    };

/// When a new key expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiry {
    /// The client's default lifetime (if it has one; otherwise never).
    #[default]
    ClientDefault,
    /// Never.
    Never,
    /// At this instant (must be in the future when the key is created).
    At(DateTime<Utc>),
    /// This long after creation.
    After(Duration),
}

impl Expiry {
    /// The concrete `expires_at` for a key created at `now`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `expires_at`) if the instant is not after `now`, the
    /// duration is zero, or the result is later than [`MAX_EXPIRES_AT`].
    pub fn resolve(
        self,
        now: DateTime<Utc>,
        default: Option<Duration>,
    ) -> Result<Option<DateTime<Utc>>> {
        let at = self.resolve_unbounded(now, default)?;
        if at.is_some_and(|t| t > MAX_EXPIRES_AT) {
            return Err(Error::invalid_input("expires_at", "must be in or before year 9999"));
        }
        Ok(at)
    }

    fn resolve_unbounded(
        self,
        now: DateTime<Utc>,
        default: Option<Duration>,
    ) -> Result<Option<DateTime<Utc>>> {
        let after = |d: Duration| {
            TimeDelta::from_std(d)
                .ok()
                .filter(|d| *d > TimeDelta::zero())
                .and_then(|d| now.checked_add_signed(d))
                .ok_or_else(|| {
                    Error::invalid_input(
                        "expires_at",
                        "lifetime must be positive and representable",
                    )
                })
        };
        match self {
            Expiry::Never => Ok(None),
            Expiry::ClientDefault => default.map(after).transpose(),
            Expiry::After(d) => after(d).map(Some),
            Expiry::At(t) if t > now => Ok(Some(t)),
            Expiry::At(_) => Err(Error::invalid_input("expires_at", "must be in the future")),
        }
    }
}

/// What to create a key with: `NewKey::new("name")` then `with_*` setters.
///
/// Values are checked when the key is created ([`NewKey::validate`]); nothing is written if any
/// is invalid.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub(crate) name: String,
    pub(crate) project_id: Option<ProjectId>,
    pub(crate) product_id: Option<ProductId>,
    pub(crate) scopes: Vec<String>,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) rate_limits: RateLimits,
    pub(crate) custom: Option<Value>,
    pub(crate) expiry: Expiry,
    pub(crate) owner_id: Option<String>,
    pub(crate) credits: Option<Credits>,
    pub(crate) allowed_ips: Option<IpAllowlist>,
}

/// A [`NewKey`] whose every value passed validation.
#[derive(Debug, Clone)]
pub struct ValidNewKey {
    /// The key's name.
    pub name: String,
    /// The project it is narrowed to.
    pub project_id: Option<ProjectId>,
    /// The product it is narrowed to.
    pub product_id: Option<ProductId>,
    /// Its scopes.
    pub scopes: Scopes,
    /// Its rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Its named rate limits.
    pub rate_limits: RateLimits,
    /// Its custom metadata.
    pub custom: Map<String, Value>,
    /// When it expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// Its owner.
    pub owner_id: Option<String>,
    /// Its usage credits.
    pub credits: Option<Credits>,
    /// The networks it may be used from.
    pub allowed_ips: Option<IpAllowlist>,
}

impl NewKey {
    /// A new org-wide key with this display name, no scopes, no rate limit, the client's
    /// default expiry.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Self::default() }
    }

    /// Narrows the key to a project (of the same organization).
    #[must_use]
    pub fn with_project(mut self, project: ProjectId) -> Self {
        self.project_id = Some(project);
        self
    }

    /// Narrows the key to a product (of the same organization).
    #[must_use]
    pub fn with_product(mut self, product: ProductId) -> Self {
        self.product_id = Some(product);
        self
    }

    /// The key's scopes (validated on create; duplicates are an error).
    #[must_use]
    pub fn with_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// A per-key rate limit.
    #[must_use]
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Named rate limits beside the main one (a plan's "10 a second and 10 000 a day"):
    /// every check must fit in each of them, all or nothing (see [`RateLimits`]).
    #[must_use]
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits;
        self
    }

    /// Custom JSON metadata (must be an object; see [`validate_custom`]).
    #[must_use]
    pub fn with_custom(mut self, custom: Value) -> Self {
        self.custom = Some(custom);
        self
    }

    /// The host's id of the user or customer the key belongs to (an opaque string, compared
    /// exactly; see [`validate_owner`](crate::hazmat::validate_owner)), for listing, revoking
    /// or rolling all of one owner's keys.
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner_id = Some(owner.into());
        self
    }

    /// Usage credits: the key allows this many successful validations (refilled by the
    /// credits' rule, if any).
    #[must_use]
    pub fn with_credits(mut self, credits: Credits) -> Self {
        self.credits = Some(credits);
        self
    }

    /// The networks the key may be used from (see [`IpAllowlist`]); without, any address.
    #[must_use]
    pub fn with_allowed_ips(mut self, allowed: IpAllowlist) -> Self {
        self.allowed_ips = Some(allowed);
        self
    }

    /// Expires at this instant.
    #[must_use]
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expiry = Expiry::At(at);
        self
    }

    /// Expires this long after creation.
    #[must_use]
    pub fn expires_after(mut self, lifetime: Duration) -> Self {
        self.expiry = Expiry::After(lifetime);
        self
    }

    /// Never expires, even if the client has a default lifetime.
    #[must_use]
    pub fn never_expires(mut self) -> Self {
        self.expiry = Expiry::Never;
        self
    }

    /// Validates every value for a key created at `now`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the first bad field: `name`, `scopes`, `custom`,
    /// `expires_at`, `owner_id` or `credits`.
    pub fn validate(
        self,
        now: DateTime<Utc>,
        default_lifetime: Option<Duration>,
    ) -> Result<ValidNewKey> {
        validate_label("name", &self.name)?;
        let scopes = Scopes::parse(self.scopes)?;
        let custom = match self.custom {
            Some(v) => validate_custom(v)?,
            None => Map::new(),
        };
        let expires_at = self.expiry.resolve(now, default_lifetime)?;
        if let Some(owner) = &self.owner_id {
            validate_owner(owner)?;
        }
        let credits = self.credits.map(Credits::validate).transpose()?;
        Ok(ValidNewKey {
            owner_id: self.owner_id,
            credits,
            allowed_ips: self.allowed_ips,
            name: self.name,
            project_id: self.project_id,
            product_id: self.product_id,
            scopes,
            rate_limit: self.rate_limit,
            rate_limits: self.rate_limits,
            custom,
            expires_at,
        })
    }
}

/// Changes to a key's metadata: `KeyUpdate::new()` then `with_*` setters; unset fields stay.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    name: Option<String>,
    scopes: Option<Vec<String>>,
    rate_limit: Option<Option<RateLimit>>,
    rate_limits: Option<RateLimits>,
    custom: Option<Value>,
    owner_id: Option<Option<String>>,
    credits: Option<Option<Credits>>,
    allowed_ips: Option<Option<IpAllowlist>>,
}

/// A [`KeyUpdate`] whose every value passed validation.
#[derive(Debug, Clone, Default)]
pub struct ValidKeyUpdate {
    /// New name.
    pub name: Option<String>,
    /// New scopes.
    pub scopes: Option<Scopes>,
    /// New rate limit (`Some(None)` removes it).
    pub rate_limit: Option<Option<RateLimit>>,
    /// New named rate limits (replacing them all; empty removes them).
    pub rate_limits: Option<RateLimits>,
    /// New custom metadata (replaces the old object).
    pub custom: Option<Map<String, Value>>,
    /// New owner (`Some(None)` removes it).
    pub owner_id: Option<Option<String>>,
    /// New credits (`Some(None)` removes them: the key becomes unlimited).
    pub credits: Option<Option<Credits>>,
    /// New IP allowlist (`Some(None)` removes it: any address).
    pub allowed_ips: Option<Option<IpAllowlist>>,
}

impl KeyUpdate {
    /// An update that changes nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Renames the key.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Replaces the key's scopes.
    #[must_use]
    pub fn with_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Some(scopes.into_iter().map(Into::into).collect());
        self
    }

    /// Sets (`Some`) or removes (`None`) the key's rate limit.
    #[must_use]
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Replaces the key's named rate limits (an empty set removes them). A limit that keeps
    /// its name and window keeps its count in the current window.
    #[must_use]
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = Some(limits);
        self
    }

    /// Replaces the key's custom metadata.
    #[must_use]
    pub fn with_custom(mut self, custom: Value) -> Self {
        self.custom = Some(custom);
        self
    }

    /// Sets (`Some`) or removes (`None`) the key's owner.
    #[must_use]
    pub fn with_owner(mut self, owner: Option<String>) -> Self {
        self.owner_id = Some(owner);
        self
    }

    /// Sets (`Some`: the balance and the refill rule, both replaced) or removes (`None`:
    /// unlimited) the key's usage credits.
    #[must_use]
    pub fn with_credits(mut self, credits: Option<Credits>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets (`Some`: replaces the list) or removes (`None`: any address) the key's IP
    /// allowlist. The next check of the key on every replica, within the cache's staleness
    /// bound, judges by the new list; so do the checks of the keys rolled into it that are
    /// still in their grace period.
    #[must_use]
    pub fn with_allowed_ips(mut self, allowed: Option<IpAllowlist>) -> Self {
        self.allowed_ips = Some(allowed);
        self
    }

    /// Validates every value.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the first bad field: `name`, `scopes`, `custom`,
    /// `owner_id` or `credits`.
    pub fn validate(self) -> Result<ValidKeyUpdate> {
        if let Some(name) = &self.name {
            validate_label("name", name)?;
        }
        if let Some(Some(owner)) = &self.owner_id {
            validate_owner(owner)?;
        }
        let credits = match self.credits {
            Some(Some(c)) => Some(Some(c.validate()?)),
            other => other,
        };
        Ok(ValidKeyUpdate {
            name: self.name,
            scopes: self.scopes.map(Scopes::parse).transpose()?,
            rate_limit: self.rate_limit,
            rate_limits: self.rate_limits,
            custom: self.custom.map(validate_custom).transpose()?,
            owner_id: self.owner_id,
            credits,
            allowed_ips: self.allowed_ips,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expiry_stays_within_year_9999() {
        let now = Utc::now();
        assert_eq!(MAX_EXPIRES_AT.to_rfc3339(), "9999-12-31T23:59:59.999999+00:00");
        assert_eq!(Expiry::At(MAX_EXPIRES_AT).resolve(now, None).unwrap(), Some(MAX_EXPIRES_AT));
        let later = MAX_EXPIRES_AT + TimeDelta::microseconds(1);
        for bad in [Expiry::At(later), Expiry::After(Duration::from_secs(9_000 * 366 * 86_400))] {
            assert!(matches!(
                bad.resolve(now, None),
                Err(Error::InvalidInput { field: "expires_at", .. })
            ));
        }
    }

    #[test]
    fn expiry_resolution() {
        let now = Utc::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(Expiry::ClientDefault.resolve(now, None).unwrap(), None);
        assert_eq!(
            Expiry::ClientDefault.resolve(now, Some(hour)).unwrap(),
            Some(now + TimeDelta::hours(1))
        );
        assert_eq!(Expiry::Never.resolve(now, Some(hour)).unwrap(), None);
        assert_eq!(
            Expiry::After(hour).resolve(now, None).unwrap(),
            Some(now + TimeDelta::hours(1))
        );
        for bad in
            [Expiry::At(now), Expiry::At(now - TimeDelta::days(1)), Expiry::After(Duration::ZERO)]
        {
            assert!(matches!(
                bad.resolve(now, None),
                Err(Error::InvalidInput { field: "expires_at", .. })
            ));
        }
        assert!(Expiry::After(Duration::from_secs(u64::MAX)).resolve(now, None).is_err());
    }

    #[test]
    fn new_key_validation_names_the_field() {
        let now = Utc::now();
        let field = |k: NewKey| match k.validate(now, None) {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(NewKey::new("")), "name");
        assert_eq!(field(NewKey::new("k").with_scopes(["a b"])), "scopes");
        assert_eq!(field(NewKey::new("k").with_scopes(["a", "a"])), "scopes");
        assert_eq!(field(NewKey::new("k").with_custom(json!([]))), "custom");
        assert_eq!(field(NewKey::new("k").expires_at(now)), "expires_at");
        let ok = NewKey::new("k")
            .with_scopes(["read"])
            .with_custom(json!({"x": 1}))
            .validate(now, None)
            .unwrap();
        assert_eq!(ok.scopes.len(), 1);
        assert!(KeyUpdate::new().with_name("\0").validate().is_err());
        assert!(KeyUpdate::new().with_scopes([""]).validate().is_err());
        let u = KeyUpdate::new().with_rate_limit(None).validate().unwrap();
        assert_eq!(u.rate_limit, Some(None));
    }
}
