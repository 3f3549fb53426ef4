//! The serde form of a key to create: what an HTTP body, a file or a command line gives,
//! turned into a [`NewKey`] in one place.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::custom::validate_custom;
use crate::error::{Error, Result};
use crate::id::{ProductId, ProjectId};
use crate::ip::IpAllowlist;
use crate::lifecycle::{Credits, validate_owner};
use crate::metadata::{Expiry, MAX_EXPIRES_AT, NewKey};
use crate::org::validate_label;
use crate::rate_limit::{RateLimit, RateLimits};
use crate::scope::Scopes;

/// A key to create, as data: every option of [`NewKey`], deserializable (unknown members are
/// refused, here and in `rate_limit` and `credits`), and turned into a [`NewKey`] by
/// [`into_new_key`](Self::into_new_key) with the checks [`NewKey::validate`] makes.
///
/// It is the body of apikeys-axum's `POST /orgs/{org_id}/keys` and what the `apikeys keys
/// create` command line fills from its flags, so that neither falls behind `NewKey`.
///
/// Give at most one of `expires_at`, `expires_in_seconds` and `never_expires`; with none,
/// the client's default lifetime applies.
///
/// ```
/// use apikeys_core::{NewKeyInput, Refill};
///
/// # fn main() -> apikeys_core::Result<()> {
/// let body = r#"{
///     "name": "ci",
///     "scopes": ["read"],
///     "owner_id": "user-42",
///     "credits": {"remaining": 1000, "refill": {"amount": 1000, "interval": "month"}},
///     "rate_limit": {"requests": 100, "window": "minute"},
///     "expires_in_seconds": 86400
/// }"#;
/// let input: NewKeyInput = serde_json::from_str(body).expect("the body's shape");
/// assert_eq!(input.credits.and_then(|c| c.refill), Some(Refill::monthly(1000)));
/// let new_key = input.into_new_key()?; // ready for ApiKeyClient::create_key
///
/// let typo = r#"{"name": "ci", "owner": "user-42"}"#;
/// assert!(serde_json::from_str::<NewKeyInput>(typo).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct NewKeyInput {
    /// The key's display name.
    pub name: String,
    /// Narrows the key to a project of the organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<ProjectId>,
    /// Narrows the key to a product of the organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<ProductId>,
    /// The scopes the key holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The key's rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The key's named rate limits, beside its main one: `{"daily": {"requests": 10000,
    /// "window": "day"}}` ([`RateLimits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<std::collections::BTreeMap<String, RateLimit>>))]
    pub rate_limits: Option<RateLimits>,
    /// Custom metadata: a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(value_type = Option<Object>))]
    pub custom: Option<Value>,
    /// The host's id of the user or customer the key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Usage credits, and how they refill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// The networks the key may be used from: IPv4 or IPv6 addresses and CIDR blocks (see
    /// [`IpAllowlist`]); without, any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    /// When the key expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// How long after creation the key expires, in seconds (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(minimum = 1))]
    pub expires_in_seconds: Option<u64>,
    /// The key never expires, even if the client has a default lifetime.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_expires: bool,
}

impl NewKeyInput {
    /// A key named `name` with nothing else set (the same defaults as [`NewKey::new`]).
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Self::default() }
    }

    /// The [`NewKey`] this describes, after the checks [`NewKey::validate`] makes that do not
    /// depend on the time. Whether `expires_at` is still in the future is decided when the
    /// key is created, by the client's clock (as for any `NewKey`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the first bad field: `name`, `scopes`, `custom`,
    /// `expires_at` (more than one of `expires_at`, `expires_in_seconds` and
    /// `never_expires`; a lifetime of zero seconds; an instant after year 9999), `owner_id`,
    /// `credits` or `allowed_ips`. No error repeats a value.
    pub fn into_new_key(self) -> Result<NewKey> {
        validate_label("name", &self.name)?;
        let scopes = Scopes::parse(self.scopes)?;
        let custom = self.custom.map(validate_custom).transpose()?;
        let expiry = match (self.expires_at, self.expires_in_seconds, self.never_expires) {
            (None, None, false) => Expiry::ClientDefault,
            (Some(at), None, false) if at > MAX_EXPIRES_AT => {
                return Err(Error::invalid_input("expires_at", "must be in or before year 9999"));
            }
            (Some(at), None, false) => Expiry::At(at),
            (None, Some(0), false) => {
                return Err(Error::invalid_input(
                    "expires_at",
                    "expires_in_seconds must be at least 1",
                ));
            }
            (None, Some(seconds), false) => Expiry::After(Duration::from_secs(seconds)),
            (None, None, true) => Expiry::Never,
            _ => {
                return Err(Error::invalid_input(
                    "expires_at",
                    "give at most one of expires_at, expires_in_seconds and never_expires",
                ));
            }
        };
        if let Some(owner) = &self.owner_id {
            validate_owner(owner)?;
        }
        let credits = self.credits.map(Credits::validate).transpose()?;
        let allowed_ips = self.allowed_ips.map(IpAllowlist::parse).transpose()?;
        Ok(NewKey {
            allowed_ips,
            name: self.name,
            project_id: self.project_id,
            product_id: self.product_id,
            scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            rate_limit: self.rate_limit,
            rate_limits: self.rate_limits.unwrap_or_default(),
            custom: custom.map(Value::Object),
            expiry,
            owner_id: self.owner_id,
            credits,
        })
    }
}

impl TryFrom<NewKeyInput> for NewKey {
    type Error = Error;

    /// [`NewKeyInput::into_new_key`].
    fn try_from(input: NewKeyInput) -> Result<Self> {
        input.into_new_key()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use serde_json::json;

    use super::*;
    use crate::lifecycle::Refill;
    use crate::rate_limit::Window;

    fn input(body: Value) -> NewKeyInput {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn every_option_reaches_the_new_key() {
        let now = Utc::now();
        let (project, product) = (ProjectId::new(), ProductId::new());
        let at = now + TimeDelta::days(30);
        let body = json!({
            "name": "ci",
            "project_id": project,
            "product_id": product,
            "scopes": ["write", "read"],
            "rate_limit": {"requests": 100, "window": "minute"},
            "custom": {"plan": "pro"},
            "owner_id": "user-42",
            "credits": {"remaining": 500, "refill": {"amount": 1000, "interval": "day"}},
            "expires_at": at,
        });
        let valid = input(body).into_new_key().unwrap().validate(now, None).unwrap();
        assert_eq!(valid.name, "ci");
        assert_eq!((valid.project_id, valid.product_id), (Some(project), Some(product)));
        let scopes: Vec<&str> = valid.scopes.iter().map(|s| s.as_str()).collect();
        assert_eq!(scopes, ["read", "write"]);
        assert_eq!(valid.rate_limit, Some(RateLimit::per_minute(100).unwrap()));
        assert_eq!(valid.custom.get("plan"), Some(&json!("pro")));
        assert_eq!(valid.owner_id.as_deref(), Some("user-42"));
        assert_eq!(valid.credits, Some(Credits::new(500).with_refill(Refill::daily(1000))));
        assert_eq!(valid.expires_at, Some(at));
        assert_eq!(valid.rate_limit.map(|l| l.window), Some(Window::Minute));
    }

    #[test]
    fn expiry_forms() {
        let now = Utc::now();
        let hour = Duration::from_secs(3600);
        let expires = |body: Value, default| {
            input(body).into_new_key().unwrap().validate(now, default).unwrap().expires_at
        };
        assert_eq!(expires(json!({"name": "k"}), None), None);
        assert_eq!(expires(json!({"name": "k"}), Some(hour)), Some(now + TimeDelta::hours(1)));
        let never = json!({"name": "k", "never_expires": true});
        assert_eq!(expires(never, Some(hour)), None);
        let after = json!({"name": "k", "expires_in_seconds": 60});
        assert_eq!(expires(after, None), Some(now + TimeDelta::seconds(60)));
    }

    #[test]
    fn the_same_input_from_rust_and_from_json() {
        let mut built = NewKeyInput::new("ci");
        built.scopes = vec!["read".into()];
        built.credits = Some(Credits::new(5));
        let text = serde_json::to_string(&built).unwrap();
        assert_eq!(
            text,
            r#"{"name":"ci","scopes":["read"],"credits":{"remaining":5,"refill":null}}"#
        );
        assert_eq!(serde_json::from_str::<NewKeyInput>(&text).unwrap(), built);
    }

    #[test]
    fn unknown_members_are_refused_at_every_level() {
        for body in [
            json!({"name": "k", "owner": "x"}),
            json!({"name": "k", "credits": {"remaining": 1, "refil": {"amount": 1, "interval": "day"}}}),
            json!({"name": "k", "credits": {"remaining": 1, "refill": {"amount": 1, "interval": "day", "at": 0}}}),
            json!({"name": "k", "rate_limit": {"requests": 1, "window": "minute", "burst": 5}}),
        ] {
            let e = serde_json::from_value::<NewKeyInput>(body.clone()).unwrap_err();
            assert!(e.to_string().starts_with("unknown field"), "{body}: {e}");
        }
    }

    #[test]
    fn bad_values_are_typed_errors_naming_the_field() {
        let key = crate::KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
        let k = key.expose_secret();
        let later = MAX_EXPIRES_AT + TimeDelta::microseconds(1);
        for (body, field) in [
            (json!({"name": ""}), "name"),
            (json!({"name": format!(" {k}")}), "name"),
            (json!({"name": "k", "scopes": [format!("{k} x")]}), "scopes"),
            (json!({"name": "k", "scopes": ["a", "a"]}), "scopes"),
            (json!({"name": "k", "custom": [k]}), "custom"),
            (json!({"name": "k", "owner_id": format!("{k}\n")}), "owner_id"),
            (json!({"name": "k", "owner_id": ""}), "owner_id"),
            (json!({"name": "k", "credits": {"remaining": u64::MAX}}), "credits"),
            (
                json!({"name": "k", "credits": {"remaining": 1, "refill": {"amount": 0, "interval": "month"}}}),
                "credits",
            ),
            (json!({"name": "k", "expires_in_seconds": 0}), "expires_at"),
            (json!({"name": "k", "expires_at": later}), "expires_at"),
            (json!({"name": "k", "never_expires": true, "expires_in_seconds": 5}), "expires_at"),
            (json!({"name": "k", "expires_at": Utc::now(), "expires_in_seconds": 5}), "expires_at"),
        ] {
            match input(body.clone()).into_new_key() {
                Err(e @ Error::InvalidInput { .. }) => {
                    let Error::InvalidInput { field: got, .. } = &e else { unreachable!() };
                    assert_eq!(*got, field, "{body}");
                    assert!(!format!("{e} {e:?}").contains(k), "the error repeats the key");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // A past instant is the client's to judge, when the key is created.
        let past = input(json!({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}));
        let new_key = past.into_new_key().unwrap();
        assert!(matches!(
            new_key.validate(Utc::now(), None),
            Err(Error::InvalidInput { field: "expires_at", .. })
        ));
    }
}
