//! The stored view of a key, and a freshly issued key.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::id::{KeyId, OrgId, ProductId, ProjectId};
use crate::ip::IpAllowlist;
use crate::key::PlaintextKey;
use crate::lifecycle::Credits;
use crate::rate_limit::{RateLimit, RateLimits};
use crate::scope::Scopes;
use crate::status::KeyStatus;

/// A key as stored: everything but the secret (only its HMAC is stored, and not shown here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ApiKey {
    /// The key's id (not secret; use it to manage the key).
    pub id: KeyId,
    /// The organization the key belongs to.
    pub org_id: OrgId,
    /// The project the key is narrowed to, if any.
    pub project_id: Option<ProjectId>,
    /// The product the key is narrowed to, if any.
    pub product_id: Option<ProductId>,
    /// The key's display name.
    pub name: String,
    /// A short non-secret start of the key for listings, e.g. `sk_live_Ab3x…`.
    pub hint: String,
    /// The scopes the key holds.
    pub scopes: Scopes,
    /// The key's rate limit, if any.
    pub rate_limit: Option<RateLimit>,
    /// The key's named rate limits, beside its main one (see [`RateLimits`]).
    #[serde(default)]
    #[cfg_attr(feature = "utoipa", schema(value_type = std::collections::BTreeMap<String, RateLimit>))]
    pub rate_limits: RateLimits,
    /// Custom metadata (always a JSON object).
    #[cfg_attr(feature = "utoipa", schema(value_type = Object))]
    pub custom: Map<String, Value>,
    /// When the key was created.
    pub created_at: DateTime<Utc>,
    /// When the key's metadata last changed.
    pub updated_at: DateTime<Utc>,
    /// When the key expires, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the key was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// When the key was last verified successfully with usage tracking on.
    pub last_used_at: Option<DateTime<Utc>>,
    /// How many successful verifications with usage tracking on.
    pub use_count: u64,
    /// The host's id of the user or customer the key belongs to, if any.
    pub owner_id: Option<String>,
    /// The key's usage credits, if it has any (`None`: unlimited). After a successful
    /// validation that spent a credit, `remaining` is the balance right after it.
    pub credits: Option<Credits>,
    /// The key this one was rolled from (this key replaced it).
    pub rolled_from: Option<KeyId>,
    /// The key this one was rolled to (it replaces this key, which expires at the end of
    /// the grace period).
    pub rolled_to: Option<KeyId>,
    /// When the key was disabled, if it is: refused with
    /// [`Error::Disabled`](crate::Error::Disabled) until it is enabled again (unlike a
    /// revocation, which is final).
    #[serde(default)]
    pub disabled_at: Option<DateTime<Utc>>,
    /// The networks the key may be used from (`None`: any address).
    #[serde(default)]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<Vec<String>>))]
    pub allowed_ips: Option<IpAllowlist>,
}

impl ApiKey {
    /// The key's status at `now`: revoked, else expired, else disabled, else active.
    #[must_use]
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        match KeyStatus::at(self.revoked_at, self.expires_at, now) {
            KeyStatus::Active if self.disabled_at.is_some() => KeyStatus::Disabled,
            status => status,
        }
    }
}

/// A newly created key: the plaintext (shown to the customer once, never stored) and the
/// stored record.
#[derive(Debug)]
pub struct IssuedKey {
    /// The plaintext key. It cannot be recovered later.
    pub key: PlaintextKey,
    /// What was stored.
    pub record: ApiKey,
}
