//! Owners as identities: limits and usage credits shared by every key of one owner.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::OrgId;
use crate::lifecycle::Credits;
use crate::rate_limit::RateLimits;

/// An owner's plan as stored: rate limits and usage credits that every key of the owner
/// (within its organization, and across rolls) shares.
///
/// A check of such a key counts against the owner's limits and spends the owner's credits
/// too, in the same all-or-nothing step as the key's own: a check any of them refuses spends
/// nothing anywhere. Its errors name an owner's limit as `owner.<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Owner {
    /// The plan's record id (not the owner id: that is the host's).
    pub id: uuid::Uuid,
    /// The organization the owner belongs to.
    pub org_id: OrgId,
    /// The host's id of the owner (the `owner_id` of its keys).
    pub owner_id: String,
    /// The limits every key of the owner shares, by name.
    #[serde(default)]
    #[cfg_attr(feature = "utoipa", schema(value_type = std::collections::BTreeMap<String, crate::RateLimit>))]
    pub rate_limits: RateLimits,
    /// The credits every key of the owner spends from (`None`: unlimited).
    pub credits: Option<Credits>,
    /// When the plan was first set.
    pub created_at: DateTime<Utc>,
    /// When the plan was set whole last (a change of its limits alone and a credit top-up
    /// do not move it: checks refused meanwhile still give the balance's credits back).
    pub updated_at: DateTime<Utc>,
}

/// The limits and credits of an owner, to set with `ApiKeyClient::set_owner`.
///
/// ```
/// use apikeys_core::{Credits, OwnerPlan, RateLimit, RateLimits, Refill};
///
/// let plan = OwnerPlan::new()
///     .with_rate_limits(RateLimits::new().with("daily", RateLimit::per_day(10_000)?)?)
///     .with_credits(Credits::new(50_000).with_refill(Refill::monthly(50_000)));
/// assert!(plan.validate().is_ok());
/// # Ok::<(), apikeys_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OwnerPlan {
    /// The shared limits, by name (at most 8; names as for a key's [`RateLimits`]).
    #[serde(default)]
    #[cfg_attr(feature = "utoipa", schema(value_type = std::collections::BTreeMap<String, crate::RateLimit>))]
    pub rate_limits: RateLimits,
    /// The shared credits, and how they refill (`None`: unlimited).
    #[serde(default)]
    pub credits: Option<Credits>,
}

impl OwnerPlan {
    /// No limits, no credits.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared limits.
    #[must_use]
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits;
        self
    }

    /// The shared credits.
    #[must_use]
    pub fn with_credits(mut self, credits: Credits) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Checks the credits (the limits were checked when they were built or parsed).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) (field `credits`) as
    /// [`Credits::validate`].
    pub fn validate(self) -> Result<Self> {
        let credits = self.credits.map(Credits::validate).transpose()?;
        Ok(Self { credits, ..self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, Refill};

    #[test]
    fn plans_parse_and_refuse_what_keys_refuse() {
        let plan: OwnerPlan = serde_json::from_value(serde_json::json!({
            "rate_limits": {"daily": {"requests": 100, "window": "day"}},
            "credits": {"remaining": 10, "refill": {"amount": 10, "interval": "month"}}
        }))
        .unwrap();
        let plan = plan.validate().unwrap();
        assert_eq!(plan.rate_limits.len(), 1);
        assert_eq!(plan.credits, Some(Credits::new(10).with_refill(Refill::monthly(10))));
        let reserved =
            serde_json::json!({"rate_limits": {"key": {"requests": 1, "window": "day"}}});
        assert!(serde_json::from_value::<OwnerPlan>(reserved).is_err());
        let typo = serde_json::json!({"limits": {}});
        assert!(serde_json::from_value::<OwnerPlan>(typo).is_err());
        let zero_refill =
            OwnerPlan::new().with_credits(Credits::new(1).with_refill(Refill::daily(0)));
        assert!(matches!(
            zero_refill.validate(),
            Err(Error::InvalidInput { field: "credits", .. })
        ));
    }
}
