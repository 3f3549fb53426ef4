//! The verification decision: a pure function of (stored key, requirements, now).

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::id::{OrgId, ProductId};
use crate::record::ApiKey;
use crate::scope::Scopes;

/// The facts about a product a key is presented for, as the store knows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProductAccess {
    /// The product asked about.
    pub product_id: ProductId,
    /// The organization that owns it.
    pub org_id: OrgId,
    /// Whether the key's project (if it has one) is linked to this product.
    pub key_project_linked: bool,
}

/// What a request needs of a key. Borrows the required scopes, so a caller checks many
/// keys against one parsed set without copying it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Requirements<'a> {
    /// The product the key must be valid for, if any.
    pub product: Option<ProductAccess>,
    /// Scopes the key must all hold.
    pub scopes: &'a Scopes,
    /// The address the request came from, if known: a key with an IP allowlist is refused
    /// from any address outside it, and when this is `None`.
    pub client_ip: Option<IpAddr>,
}

/// The empty set of scopes.
const NO_SCOPES: &Scopes = &Scopes::new();

impl Default for Requirements<'_> {
    /// No product, no scopes.
    fn default() -> Self {
        Self { product: None, scopes: NO_SCOPES, client_ip: None }
    }
}

/// Whether `key` may be used at `now` for a request with these `requirements`.
///
/// Checks, in order: the key's IP allowlist (if it has one: from outside it, nothing more
/// about the key is told, not even that it is revoked), revoked, expired (from the instant
/// `now >= expires_at`), disabled, product, scopes.
/// The product rule: a key is valid for product P of organization O when it belongs to O and
/// it is either narrowed to P itself, or narrowed to a project linked to P (and not to another
/// product), or org-wide. A key of another organization never is.
///
/// # Errors
/// The first failing check: [`Error::IpNotAllowed`], [`Error::Revoked`], [`Error::Expired`],
/// [`Error::Disabled`], [`Error::ProductNotAllowed`] or [`Error::InsufficientScope`].
pub fn decide(key: &ApiKey, requirements: &Requirements<'_>, now: DateTime<Utc>) -> Result<()> {
    if let Some(allowed) = &key.allowed_ips
        && !requirements.client_ip.is_some_and(|ip| allowed.allows(ip))
    {
        return Err(Error::IpNotAllowed { ip: requirements.client_ip });
    }
    if let Some(revoked_at) = key.revoked_at {
        return Err(Error::Revoked { revoked_at });
    }
    if let Some(expired_at) = key.expires_at.filter(|e| now >= *e) {
        return Err(Error::Expired { expired_at });
    }
    if let Some(disabled_at) = key.disabled_at {
        return Err(Error::Disabled { disabled_at });
    }
    if let Some(product) = &requirements.product {
        let allowed = key.org_id == product.org_id
            && match (key.product_id, key.project_id) {
                (Some(p), _) => p == product.product_id,
                (None, Some(_)) => product.key_project_linked,
                (None, None) => true,
            };
        if !allowed {
            return Err(Error::ProductNotAllowed { product_id: product.product_id });
        }
    }
    let missing = key.scopes.missing(requirements.scopes);
    if !missing.is_empty() {
        return Err(Error::InsufficientScope { missing });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{KeyId, ProjectId};
    use chrono::TimeDelta;
    use serde_json::Map;

    fn key(org: OrgId) -> ApiKey {
        let now = Utc::now();
        ApiKey {
            id: KeyId::new(),
            org_id: org,
            project_id: None,
            product_id: None,
            name: "k".into(),
            hint: "sk_abcd…".into(),
            scopes: Scopes::parse(["read", "write"]).unwrap(),
            rate_limit: None,
            rate_limits: crate::RateLimits::new(),
            custom: Map::new(),
            created_at: now,
            updated_at: now,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            use_count: 0,
            owner_id: None,
            credits: None,
            rolled_from: None,
            rolled_to: None,
            disabled_at: None,
            allowed_ips: None,
        }
    }

    fn access(product: ProductId, org: OrgId, linked: bool) -> Option<ProductAccess> {
        Some(ProductAccess { product_id: product, org_id: org, key_project_linked: linked })
    }

    #[test]
    fn decision_table() {
        let now = Utc::now();
        let sec = TimeDelta::seconds(1);
        let org = OrgId::new();
        let other_org = OrgId::new();
        let p = ProductId::new();
        let q = ProductId::new();
        let proj = ProjectId::new();
        let none = Requirements::default();

        type Case =
            (&'static str, Box<dyn Fn(&mut ApiKey)>, Requirements<'static>, Option<&'static str>);
        let req = |product, scopes: &[&str]| Requirements {
            product,
            scopes: Box::leak(Box::new(Scopes::parse(scopes.iter().copied()).unwrap())),
            client_ip: None,
        };
        let from = |ip: &str| Requirements { client_ip: Some(ip.parse().unwrap()), ..none };
        let office = || Some(crate::IpAllowlist::parse(["192.0.2.0/24", "2001:db8::/32"]).unwrap());
        let cases: Vec<Case> = vec![
            ("active, no requirements", Box::new(|_| {}), none, None),
            ("revoked", Box::new(move |k| k.revoked_at = Some(now - sec)), none, Some("revoked")),
            (
                "revoked wins over expired",
                Box::new(move |k| {
                    k.revoked_at = Some(now);
                    k.expires_at = Some(now - sec);
                }),
                none,
                Some("revoked"),
            ),
            (
                "expires exactly now",
                Box::new(move |k| k.expires_at = Some(now)),
                none,
                Some("expired"),
            ),
            (
                "expires in the past",
                Box::new(move |k| k.expires_at = Some(now - sec)),
                none,
                Some("expired"),
            ),
            (
                "expires 1 ns later",
                Box::new(move |k| k.expires_at = Some(now + TimeDelta::nanoseconds(1))),
                none,
                None,
            ),
            (
                "expired wins over product and scopes",
                Box::new(move |k| k.expires_at = Some(now)),
                req(access(p, other_org, false), &["admin"]),
                Some("expired"),
            ),
            (
                "disabled",
                Box::new(move |k| k.disabled_at = Some(now - sec)),
                none,
                Some("disabled"),
            ),
            (
                "revoked wins over disabled",
                Box::new(move |k| {
                    k.revoked_at = Some(now);
                    k.disabled_at = Some(now);
                }),
                none,
                Some("revoked"),
            ),
            (
                "expired wins over disabled",
                Box::new(move |k| {
                    k.expires_at = Some(now);
                    k.disabled_at = Some(now);
                }),
                none,
                Some("expired"),
            ),
            (
                "the allowlist wins over revoked and disabled: an outsider learns nothing",
                Box::new(move |k| {
                    k.revoked_at = Some(now);
                    k.disabled_at = Some(now);
                    k.allowed_ips = office();
                }),
                from("198.51.100.1"),
                Some("ip"),
            ),
            (
                "inside the allowlist, disabled still counts",
                Box::new(move |k| {
                    k.disabled_at = Some(now);
                    k.allowed_ips = office();
                }),
                from("192.0.2.1"),
                Some("disabled"),
            ),
            (
                "allowlist, inside (v4)",
                Box::new(move |k| k.allowed_ips = office()),
                from("192.0.2.9"),
                None,
            ),
            (
                "allowlist, inside (v6)",
                Box::new(move |k| k.allowed_ips = office()),
                from("2001:db8::1"),
                None,
            ),
            (
                "allowlist, inside (v4 mapped into v6)",
                Box::new(move |k| k.allowed_ips = office()),
                from("::ffff:192.0.2.9"),
                None,
            ),
            (
                "allowlist, outside",
                Box::new(move |k| k.allowed_ips = office()),
                from("192.0.3.1"),
                Some("ip"),
            ),
            (
                "allowlist, unknown address",
                Box::new(move |k| k.allowed_ips = office()),
                none,
                Some("ip"),
            ),
            ("no allowlist, any address", Box::new(|_| {}), from("198.51.100.1"), None),
            (
                "allowlist checked before product and scopes",
                Box::new(move |k| k.allowed_ips = office()),
                Requirements {
                    client_ip: Some("10.0.0.1".parse().unwrap()),
                    ..req(access(p, other_org, false), &["admin"])
                },
                Some("ip"),
            ),
            ("org-wide key, own product", Box::new(|_| {}), req(access(p, org, false), &[]), None),
            (
                "org-wide key, other org's product",
                Box::new(|_| {}),
                req(access(p, other_org, false), &[]),
                Some("product"),
            ),
            (
                "product key, same product",
                Box::new(move |k| k.product_id = Some(p)),
                req(access(p, org, false), &[]),
                None,
            ),
            (
                "product key, other product",
                Box::new(move |k| k.product_id = Some(q)),
                req(access(p, org, true), &[]),
                Some("product"),
            ),
            (
                "product+project key, other product even if linked",
                Box::new(move |k| {
                    k.product_id = Some(q);
                    k.project_id = Some(proj);
                }),
                req(access(p, org, true), &[]),
                Some("product"),
            ),
            (
                "project key, linked",
                Box::new(move |k| k.project_id = Some(proj)),
                req(access(p, org, true), &[]),
                None,
            ),
            (
                "project key, not linked",
                Box::new(move |k| k.project_id = Some(proj)),
                req(access(p, org, false), &[]),
                Some("product"),
            ),
            (
                "project key, linked but other org",
                Box::new(move |k| k.project_id = Some(proj)),
                req(access(p, other_org, true), &[]),
                Some("product"),
            ),
            ("scopes held", Box::new(|_| {}), req(None, &["read"]), None),
            ("scopes missing", Box::new(|_| {}), req(None, &["read", "admin"]), Some("scope")),
            (
                "product checked before scopes",
                Box::new(|_| {}),
                req(access(p, other_org, false), &["admin"]),
                Some("product"),
            ),
        ];
        for (name, edit, requirements, expected) in cases {
            let mut k = key(org);
            edit(&mut k);
            let got = decide(&k, &requirements, now);
            let kind = match &got {
                Ok(()) => None,
                Err(Error::Revoked { .. }) => Some("revoked"),
                Err(Error::Expired { .. }) => Some("expired"),
                Err(Error::Disabled { .. }) => Some("disabled"),
                Err(Error::IpNotAllowed { .. }) => Some("ip"),
                Err(Error::ProductNotAllowed { .. }) => Some("product"),
                Err(Error::InsufficientScope { .. }) => Some("scope"),
                Err(e) => panic!("{name}: unexpected {e:?}"),
            };
            assert_eq!(kind, expected, "{name}");
        }
    }

    #[test]
    fn errors_carry_details() {
        let now = Utc::now();
        let mut k = key(OrgId::new());
        k.expires_at = Some(now);
        match decide(&k, &Requirements::default(), now) {
            Err(Error::Expired { expired_at }) => assert_eq!(expired_at, now),
            other => panic!("{other:?}"),
        }
        k.expires_at = None;
        let scopes = Scopes::parse(["admin", "read"]).unwrap();
        let req = Requirements { product: None, scopes: &scopes, client_ip: None };
        match decide(&k, &req, now) {
            Err(Error::InsufficientScope { missing }) => {
                assert_eq!(missing.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["admin"]);
            }
            other => panic!("{other:?}"),
        }
        k.allowed_ips = Some(crate::IpAllowlist::parse(["192.0.2.0/24"]).unwrap());
        let ip = "198.51.100.7".parse().unwrap();
        let req = Requirements { client_ip: Some(ip), ..Requirements::default() };
        match decide(&k, &req, now) {
            Err(e @ Error::IpNotAllowed { .. }) => {
                assert!(matches!(e, Error::IpNotAllowed { ip: Some(got) } if got == ip));
                assert_eq!(e.to_string(), "api key may not be used from 198.51.100.7");
            }
            other => panic!("{other:?}"),
        }
    }
}
