//! # apikeys-core
//!
//! The domain of [apikeys](https://crates.io/crates/apikeys-db), with no I/O: the key format,
//! HMAC-SHA256 hashing with a required signing secret, scopes, metadata, rate-limit rules, key
//! status, the verification decision and the one error type.
//!
//! Most users want `apikeys-db`, which re-exports all of this and adds the store. The core is
//! useful on its own to check keys offline or to unit-test code that handles keys:
//!
//! ```
//! use apikeys_core::hazmat::KeyHasher;
//! use apikeys_core::{KeyFormat, SigningSecret};
//!
//! # fn main() -> apikeys_core::Result<()> {
//! let format = KeyFormat::new("sk", Some("live"))?;
//! let hasher = KeyHasher::new(SigningSecret::new(vec![42u8; 32])?)?;
//!
//! let key = format.generate()?;                 // show key.expose_secret() to the customer once
//! let stored = hasher.hash(key.expose_secret()); // store only this
//!
//! // On a request: reject malformed keys offline, then look the hash up.
//! let presented = format.parse(key.expose_secret())?;
//! assert_eq!(hasher.hash(presented.as_str()), stored);
//! assert!(format.parse("sk_live_not-a-key").is_err());
//! # Ok(())
//! # }
//! ```
//!
//! ## Security properties
//! * Keys carry 256 bits from the operating system's CSPRNG.
//! * Only `HMAC-SHA256(secret, key)` is meant to be stored; [`PlaintextKey`] and
//!   [`SigningSecret`] are zeroed on drop, print `[redacted]` and have no `Display`.
//! * [`Error`] never carries key material and never says whether a key was malformed or
//!   unknown.

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-core/0.1.0")]

mod custom;
mod error;
mod hash;
mod id;
mod input;
mod ip;
mod key;
mod lifecycle;
mod metadata;
mod org;
mod owner;
mod page;
mod rate_limit;
mod record;
mod redact;
mod scope;
mod status;
mod verify;

pub use error::{Error, RecordId, RecordKind, Result};
pub use hash::SigningSecret;
pub use id::{KeyId, OrgId, ProductId, ProjectId};
pub use input::NewKeyInput;
pub use ip::IpAllowlist;
pub use key::{KeyFormat, PlaintextKey};
pub use lifecycle::{Credits, KeyAction, KeyEvent, Refill, RefillInterval};
pub use metadata::{Expiry, KeyUpdate, NewKey};
pub use org::{Organization, Product, Project};
pub use owner::{Owner, OwnerPlan};
pub use page::{KeyPage, Page};
pub use rate_limit::{RateLimit, RateLimits, Window};
pub use record::{ApiKey, IssuedKey};
pub use redact::{find_keys, redact_keys};
pub use scope::{Scope, Scopes};
pub use status::{KeyStatus, StatusFilter};

/// The bounds every input is checked against.
pub mod limits {
    pub use crate::custom::{MAX_CUSTOM_BYTES, MAX_CUSTOM_DEPTH};
    pub use crate::ip::MAX_ALLOWED_NETWORKS;
    pub use crate::key::{CHECKSUM_LEN, MAX_SEGMENT_LEN, SECRET_LEN};
    pub use crate::lifecycle::MAX_CREDITS;
    pub use crate::metadata::MAX_EXPIRES_AT;
    pub use crate::org::MAX_NAME_CHARS;
    pub use crate::page::MAX_PAGE_SIZE;
    pub use crate::rate_limit::MAX_NAMED_LIMITS;
    pub use crate::scope::{MAX_SCOPE_LEN, MAX_SCOPES};
}

/// Building blocks for a store of your own: hashing, the pure verification decision, and
/// the validated forms of inputs.
///
/// `apikeys-db` is built from these. They are sharp: a store that stores
/// [`KeyHasher::hash`](hazmat::KeyHasher::hash) of the wrong string, skips
/// [`decide`](hazmat::decide), or writes a [`NewKey`] without
/// [`NewKey::validate`] breaks the guarantees the rest of this crate documents. Fenced
/// here (as `jsonwebtoken` fences its dangerous tools) so that none of it is picked up by
/// accident from the root.
pub mod hazmat {
    pub use crate::custom::validate_custom;
    pub use crate::hash::{KeyHash, KeyHasher};
    pub use crate::key::ParsedKey;
    pub use crate::lifecycle::{validate_actor, validate_owner};
    pub use crate::metadata::{ValidKeyUpdate, ValidNewKey};
    pub use crate::org::{validate_label, validate_name};
    pub use crate::verify::{ProductAccess, Requirements, decide};
}

/// This crate's README, whose example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod redaction_tests {
    use super::hazmat::KeyHasher;
    use super::*;
    use chrono::Utc;
    use std::time::Duration;

    #[test]
    fn no_secret_material_in_debug_or_display() {
        let secret_text = "s3cr3t-signing-material-that-must-not-leak-0123";
        let secret = SigningSecret::new(secret_text).unwrap();
        let format = KeyFormat::new("sk", Some("test")).unwrap();
        let key = format.generate().unwrap();
        let plaintext = key.expose_secret().to_owned();
        let secret_part = &plaintext[8..];
        let hasher = KeyHasher::new(secret).unwrap();
        let now = Utc::now();
        let record = ApiKey {
            id: KeyId::new(),
            org_id: OrgId::new(),
            project_id: None,
            product_id: None,
            name: "k".into(),
            hint: key.hint(),
            scopes: Scopes::new(),
            rate_limit: None,
            rate_limits: crate::RateLimits::new(),
            custom: serde_json::Map::new(),
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
        };
        let mut rendered = vec![
            format!("{hasher:?}"),
            format!("{:?}", SigningSecret::new(secret_text).unwrap()),
            format!("{:?}", format.parse(&plaintext).unwrap()),
            format!("{:?}", hasher.hash(&plaintext)),
        ];
        let issued = IssuedKey { key, record };
        rendered.push(format!("{issued:?}"));
        rendered.push(format!("{issued:#?}"));
        let errors = [
            Error::InvalidKey,
            format.parse(&plaintext[1..]).unwrap_err(),
            Error::Expired { expired_at: now },
            Error::Revoked { revoked_at: now },
            Error::Disabled { disabled_at: now },
            Error::IpNotAllowed { ip: None },
            Error::ProductNotAllowed { product_id: ProductId::new() },
            Error::InsufficientScope { missing: vec![Scope::new("a").unwrap()] },
            Error::Quota {
                retry_after: Duration::from_secs(1),
                limit: RateLimit::per_second(1).unwrap(),
                name: Some("daily".to_owned()),
            },
            Error::AlreadyExists { existing: RecordId::Key(KeyId::new()) },
            Error::NotFound { id: RecordId::Organization(OrgId::new()) },
            Error::conflict(std::io::Error::other("deadlock")),
            Error::invalid_input("name", "bad"),
            SigningSecret::new("short").unwrap_err(),
            Error::Entropy,
            Error::storage(std::io::Error::other("db down")),
            Error::unavailable(std::io::Error::other("connection refused")),
        ];
        for e in &errors {
            rendered.push(format!("{e:?}"));
            rendered.push(e.to_string());
        }
        for r in &rendered {
            assert!(!r.contains(secret_part), "plaintext key leaked: {r}");
            assert!(!r.contains(&secret_part[..12]), "part of the key leaked: {r}");
            assert!(!r.contains("s3cr3t"), "signing secret leaked: {r}");
        }
        // The issued key's Debug still shows the non-secret hint and the redaction marker.
        assert!(rendered[4].contains("[redacted]") && rendered[4].contains("sk_test_"));
    }
}
