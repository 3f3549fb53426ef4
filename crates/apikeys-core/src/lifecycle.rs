//! The key lifecycle: usage credits, owners, and the audit trail's events.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::id::{KeyId, OrgId, ProductId, ProjectId};
use crate::org::validate_label;

/// The largest credit balance or refill amount (the databases store a signed 64-bit count).
pub const MAX_CREDITS: u64 = i64::MAX as u64;

/// A key's usage credits: how many more successful validations it allows, and how the
/// balance refills.
///
/// Each successful [`validate_key`] spends one credit (or the route's cost), atomically in
/// the database; a key with none left is refused with [`Error::UsageExhausted`].
///
/// [`validate_key`]: https://docs.rs/apikeys-db/latest/apikeys_db/struct.ApiKeyClient.html#method.validate_key
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Credits {
    /// Credits left.
    pub remaining: u64,
    /// The refill rule, if the balance refills.
    pub refill: Option<Refill>,
}

impl Credits {
    /// A balance of `remaining` credits that never refills.
    #[must_use]
    pub fn new(remaining: u64) -> Self {
        Self { remaining, refill: None }
    }

    /// The balance refills by this rule.
    #[must_use]
    pub fn with_refill(mut self, refill: Refill) -> Self {
        self.refill = Some(refill);
        self
    }

    /// Checks the balance and the refill amount.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `credits`) for a balance or refill amount above
    /// [`MAX_CREDITS`], or a refill amount of zero.
    pub fn validate(self) -> Result<Self> {
        if self.remaining > MAX_CREDITS {
            return Err(Error::invalid_input("credits", "remaining is above the maximum"));
        }
        if let Some(r) = self.refill
            && (r.amount == 0 || r.amount > MAX_CREDITS)
        {
            return Err(Error::invalid_input("credits", "refill amount must be 1 to the maximum"));
        }
        Ok(self)
    }
}

/// How a credit balance refills: at the first validation in each new period (a UTC day or
/// calendar month, by the database's clock: no replica's own clock moves the period), the
/// balance is **set** to `amount` (not added to), once per period whatever the number of
/// replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Refill {
    /// The balance after a refill.
    pub amount: u64,
    /// How often.
    pub interval: RefillInterval,
}

impl Refill {
    /// Back to `amount` every UTC day.
    #[must_use]
    pub fn daily(amount: u64) -> Self {
        Self { amount, interval: RefillInterval::Day }
    }

    /// Back to `amount` every calendar month (UTC).
    #[must_use]
    pub fn monthly(amount: u64) -> Self {
        Self { amount, interval: RefillInterval::Month }
    }
}

/// The period of a [`Refill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum RefillInterval {
    /// A UTC day.
    Day,
    /// A calendar month, in UTC.
    Month,
}

impl RefillInterval {
    /// Its stored name: `day` or `month`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RefillInterval::Day => "day",
            RefillInterval::Month => "month",
        }
    }

    /// The interval of a stored name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "day" => Some(RefillInterval::Day),
            "month" => Some(RefillInterval::Month),
            _ => None,
        }
    }

    /// The number of the period `at` falls in: days or months since the Unix epoch (UTC).
    #[must_use]
    pub fn period(self, at: DateTime<Utc>) -> i64 {
        match self {
            RefillInterval::Day => at.timestamp().div_euclid(86_400),
            RefillInterval::Month => i64::from(at.year() - 1970) * 12 + i64::from(at.month0()),
        }
    }

    /// When period number `period` begins (`None` past what a date holds).
    #[must_use]
    pub fn start(self, period: i64) -> Option<DateTime<Utc>> {
        match self {
            RefillInterval::Day => {
                period.checked_mul(86_400).and_then(|s| Utc.timestamp_opt(s, 0).single())
            }
            RefillInterval::Month => {
                let year = i32::try_from(period.div_euclid(12) + 1970).ok()?;
                let month = u32::try_from(period.rem_euclid(12)).ok()? + 1;
                let day = NaiveDate::from_ymd_opt(year, month, 1)?;
                Some(day.and_hms_opt(0, 0, 0)?.and_utc())
            }
        }
    }
}

impl fmt::Display for RefillInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks an owner id: the host's opaque id of the user or customer a key belongs to.
///
/// Compared exactly on every database. It follows the rules of [`validate_label`]: 1 to
/// 255 characters, no leading or trailing whitespace, no control or invisible format
/// characters.
///
/// # Errors
/// [`Error::InvalidInput`] (field `owner_id`) when one of those rules is broken.
pub fn validate_owner(owner: &str) -> Result<()> {
    validate_label("owner_id", owner)
}

/// Checks the actor named on an audited change (see [`KeyEvent::actor`]); the rules of
/// [`validate_label`].
///
/// # Errors
/// [`Error::InvalidInput`] (field `actor`) when one of those rules is broken.
pub fn validate_actor(actor: &str) -> Result<()> {
    validate_label("actor", actor)
}

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub enum KeyAction {
    /// A key was created (also the new key of a roll, with the old one as related key).
    Created,
    /// A key's metadata, credits or owner changed.
    Updated,
    /// A key was rolled: a new key (the related key) replaces it after a grace period.
    Rolled,
    /// A key's expiry was moved.
    Renewed,
    /// A key was revoked.
    Revoked,
    /// A key was disabled.
    Disabled,
    /// A disabled key was enabled again.
    Enabled,
    /// A key was deleted (its events stay).
    Deleted,
    /// An organization was created.
    OrganizationCreated,
    /// A project was created.
    ProjectCreated,
    /// A product was created.
    ProductCreated,
}

impl KeyAction {
    /// Its stored name, e.g. `rolled`, `organization_created`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::Created => "created",
            KeyAction::Updated => "updated",
            KeyAction::Rolled => "rolled",
            KeyAction::Renewed => "renewed",
            KeyAction::Revoked => "revoked",
            KeyAction::Disabled => "disabled",
            KeyAction::Enabled => "enabled",
            KeyAction::Deleted => "deleted",
            KeyAction::OrganizationCreated => "org_created",
            KeyAction::ProjectCreated => "project_created",
            KeyAction::ProductCreated => "product_created",
        }
    }

    /// The action of a stored name.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [
            KeyAction::Created,
            KeyAction::Updated,
            KeyAction::Rolled,
            KeyAction::Renewed,
            KeyAction::Revoked,
            KeyAction::Disabled,
            KeyAction::Enabled,
            KeyAction::Deleted,
            KeyAction::OrganizationCreated,
            KeyAction::ProjectCreated,
            KeyAction::ProductCreated,
        ]
        .into_iter()
        .find(|a| a.as_str() == name)
    }
}

impl fmt::Display for KeyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the audit trail: written in the same transaction as the change it records,
/// never changed, and kept when its key is deleted. It holds ids, a time, the action and the
/// actor: never a key's name, scopes, owner or metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct KeyEvent {
    /// The event's id (time-ordered).
    pub id: Uuid,
    /// When the change was made (the writing client's clock).
    pub at: DateTime<Utc>,
    /// What was done.
    pub action: KeyAction,
    /// The key changed, for key events.
    pub key_id: Option<KeyId>,
    /// The organization concerned.
    pub org_id: Option<OrgId>,
    /// The project concerned (its creation, or the key's project).
    pub project_id: Option<ProjectId>,
    /// The product concerned (its creation, or the key's product).
    pub product_id: Option<ProductId>,
    /// The other key of a roll: the new key on `rolled`, the old one on the new key's
    /// `created`.
    pub related_key_id: Option<KeyId>,
    /// Who made the change, as the caller named it (`ApiKeyClient::acting_as`).
    pub actor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_their_starts() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 23, 59, 59).unwrap();
        let day = RefillInterval::Day.period(t);
        assert_eq!(
            RefillInterval::Day.start(day + 1),
            Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).single()
        );
        let month = RefillInterval::Month.period(t);
        assert_eq!(month, 56 * 12 + 10);
        assert_eq!(
            RefillInterval::Month.start(month + 1),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single()
        );
        assert_eq!(
            RefillInterval::Month.start(month + 2),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).single()
        );
        let before_epoch = Utc.with_ymd_and_hms(1969, 12, 31, 12, 0, 0).unwrap();
        assert_eq!(RefillInterval::Day.period(before_epoch), -1);
        assert_eq!(RefillInterval::Month.period(before_epoch), -1);
        for a in [KeyAction::Created, KeyAction::ProductCreated, KeyAction::Rolled] {
            assert_eq!(KeyAction::from_name(a.as_str()), Some(a));
        }
        assert!(RefillInterval::from_name("week").is_none());
    }

    #[test]
    fn credits_validation() {
        assert!(Credits::new(MAX_CREDITS).validate().is_ok());
        assert!(Credits::new(MAX_CREDITS + 1).validate().is_err());
        assert!(Credits::new(1).with_refill(Refill::daily(0)).validate().is_err());
        assert!(Credits::new(0).with_refill(Refill::monthly(10)).validate().is_ok());
        assert!(validate_owner(" user").is_err() && validate_owner("user_1").is_ok());
    }
}
