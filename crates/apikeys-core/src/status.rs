//! Key status and the status filter used by listings.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum KeyStatus {
    /// Usable.
    Active,
    /// Revoked (soft-deleted; the record is kept).
    Revoked,
    /// Past its `expires_at`.
    Expired,
    /// Disabled: refused until it is enabled again.
    Disabled,
}

impl KeyStatus {
    /// The status at `now` of a key with these times. Revocation wins over expiry; a key is
    /// expired from the instant `now >= expires_at`. It never answers
    /// [`KeyStatus::Disabled`]: [`ApiKey::status`](crate::ApiKey::status) knows that too.
    #[must_use]
    pub fn at(
        revoked_at: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        if revoked_at.is_some() {
            KeyStatus::Revoked
        } else if expires_at.is_some_and(|e| now >= e) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
            KeyStatus::Disabled => "disabled",
        })
    }
}

/// Which keys a listing returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum StatusFilter {
    /// Only active keys (neither revoked, expired nor disabled).
    Active,
    /// Only revoked keys.
    Revoked,
    /// Only expired (and not revoked) keys.
    Expired,
    /// Only disabled keys that are neither revoked nor expired.
    Disabled,
    /// Every key.
    #[default]
    All,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn status_rules() {
        let now = Utc::now();
        let s = TimeDelta::seconds(1);
        assert_eq!(KeyStatus::at(None, None, now), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, Some(now + s), now), KeyStatus::Active);
        assert_eq!(KeyStatus::at(None, Some(now), now), KeyStatus::Expired);
        assert_eq!(KeyStatus::at(Some(now), Some(now - s), now), KeyStatus::Revoked);
    }
}
