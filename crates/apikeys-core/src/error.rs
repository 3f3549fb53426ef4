//! The one error type of apikeys.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::id::{KeyId, OrgId, ProductId, ProjectId};
use crate::rate_limit::RateLimit;
use crate::scope::Scope;

/// Shorthand for `std::result::Result<T, apikeys_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of record a [`RecordId`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKind {
    /// An [`Organization`](crate::Organization).
    Organization,
    /// A [`Project`](crate::Project).
    Project,
    /// A [`Product`](crate::Product).
    Product,
    /// An API key ([`ApiKey`](crate::ApiKey)).
    Key,
    /// An owner's plan ([`Owner`](crate::Owner)).
    Owner,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Organization => "organization",
            RecordKind::Project => "project",
            RecordKind::Product => "product",
            RecordKind::Key => "key",
            RecordKind::Owner => "owner",
        })
    }
}

/// The typed id of a record, as [`Error::NotFound`] and [`Error::AlreadyExists`] carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordId {
    /// An organization.
    Organization(OrgId),
    /// A project.
    Project(ProjectId),
    /// A product.
    Product(ProductId),
    /// An API key.
    Key(KeyId),
    /// An owner's plan, by its record id ([`Owner::id`](crate::Owner::id)).
    Owner(Uuid),
}

impl RecordId {
    /// Which kind of record this is.
    #[must_use]
    pub fn kind(&self) -> RecordKind {
        match self {
            RecordId::Organization(_) => RecordKind::Organization,
            RecordId::Project(_) => RecordKind::Project,
            RecordId::Product(_) => RecordKind::Product,
            RecordId::Key(_) => RecordKind::Key,
            RecordId::Owner(_) => RecordKind::Owner,
        }
    }

    /// The id as a bare UUID.
    #[must_use]
    pub fn as_uuid(&self) -> Uuid {
        match self {
            RecordId::Organization(id) => id.as_uuid(),
            RecordId::Project(id) => id.as_uuid(),
            RecordId::Product(id) => id.as_uuid(),
            RecordId::Key(id) => id.as_uuid(),
            RecordId::Owner(id) => *id,
        }
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.as_uuid())
    }
}

impl From<OrgId> for RecordId {
    fn from(id: OrgId) -> Self {
        RecordId::Organization(id)
    }
}

impl From<ProjectId> for RecordId {
    fn from(id: ProjectId) -> Self {
        RecordId::Project(id)
    }
}

impl From<ProductId> for RecordId {
    fn from(id: ProductId) -> Self {
        RecordId::Product(id)
    }
}

impl From<KeyId> for RecordId {
    fn from(id: KeyId) -> Self {
        RecordId::Key(id)
    }
}

/// Everything that can go wrong in apikeys.
///
/// Match on the variant to decide what to answer a caller (for an HTTP service: `InvalidKey`,
/// `Expired`, `Revoked` and `Disabled` are 401, `IpNotAllowed`, `ProductNotAllowed` and
/// `InsufficientScope` 403, `Quota` 429
/// with a `Retry-After` header, `UsageExhausted` 429 (with a distinct code), `InvalidInput` 400 or 422, `NotFound` 404, `AlreadyExists` 409,
/// `Unavailable` 503, `Conflict` 503 or a retry, the rest 500).
///
/// No variant ever carries a plaintext key or a signing secret, and the messages never say
/// whether a rejected key was malformed or unknown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The presented key is not a valid key: it is malformed, fails its checksum, or is unknown.
    /// Deliberately says nothing more.
    #[error("invalid api key")]
    InvalidKey,

    /// The key exists but expired at `expired_at`.
    #[error("api key expired at {expired_at}")]
    Expired {
        /// When the key stopped being valid.
        expired_at: DateTime<Utc>,
    },

    /// The key exists but was revoked at `revoked_at`.
    #[error("api key revoked at {revoked_at}")]
    Revoked {
        /// When the key was revoked.
        revoked_at: DateTime<Utc>,
    },

    /// The key exists but was disabled at `disabled_at`, and is refused until it is enabled
    /// again.
    #[error("api key disabled at {disabled_at}")]
    Disabled {
        /// When the key was disabled.
        disabled_at: DateTime<Utc>,
    },

    /// The key has an IP allowlist, and the request came from outside it (or from an address
    /// the caller did not know).
    #[error("api key may not be used from {}", ip.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string()))]
    IpNotAllowed {
        /// The request's address, if the caller knew it.
        ip: Option<std::net::IpAddr>,
    },

    /// The key is valid but not for the product it was presented for.
    #[error("api key is not valid for product {product_id}")]
    ProductNotAllowed {
        /// The product the caller asked about.
        product_id: ProductId,
    },

    /// The key lacks one or more of the required scopes.
    #[error("api key lacks required scopes: {}", DisplayScopes(missing))]
    InsufficientScope {
        /// The required scopes the key does not hold, in sorted order.
        missing: Vec<Scope>,
    },

    /// A rate limit of the key is used up for the current window: its main limit, or the
    /// named one in `name` ([`RateLimits`](crate::RateLimits)).
    #[error("rate limit {}of {limit} exceeded, retry after {} ms", name.as_deref().map(|n| format!("`{n}` ")).unwrap_or_default(), retry_after.as_millis())]
    Quota {
        /// How long until the window frees a slot: more than zero, never more than the window.
        retry_after: Duration,
        /// The limit that was hit.
        limit: RateLimit,
        /// The name of the limit that was hit, when it is one of the key's named limits
        /// (`None`: its main limit).
        name: Option<String>,
    },

    /// The key's usage credits are spent (see [`Credits`](crate::Credits)). Not the rate
    /// limit: nothing frees up with time unless the credits refill.
    #[error("api key has no usage credits left")]
    UsageExhausted {
        /// When the balance refills, if it has a refill rule (the start of the next period
        /// by the database's clock).
        refill_at: Option<DateTime<Utc>>,
    },

    /// A record with the same unique name already exists.
    #[error("{existing} already exists")]
    AlreadyExists {
        /// The record that already exists (its kind and typed id).
        existing: RecordId,
    },

    /// The record does not exist: the one asked for, or one a call refers to (the
    /// organization of a new project, the project a new key is narrowed to, ...).
    #[error("{id} not found")]
    NotFound {
        /// The record that is missing (its kind and typed id).
        id: RecordId,
    },

    /// An argument was rejected before anything was changed.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The name of the offending field or argument.
        field: &'static str,
        /// Why it was rejected.
        reason: Cow<'static, str>,
    },

    /// The client or hasher was configured wrongly (for instance a missing or short signing
    /// secret).
    #[error("configuration error: {reason}")]
    Configuration {
        /// What is wrong.
        reason: Cow<'static, str>,
    },

    /// The operating system's random number generator failed.
    #[error("the operating system random number generator failed")]
    Entropy,

    /// The database (or another backing store) failed; the original error is the source.
    #[error("storage error")]
    Storage {
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The database rolled the call's transaction back because it conflicted with a
    /// concurrent one (a deadlock, or a serialization failure under `REPEATABLE READ` or
    /// `SERIALIZABLE`). The client retries its own short transactions a few times before
    /// giving up with this; inside a transaction the host owns (see
    /// `ApiKeyClient::with` in apikeys-db) the database has aborted the host's whole
    /// transaction, which the host should roll back and run again.
    #[error("transaction conflicted with a concurrent one; retry it")]
    Conflict {
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The database (or the Redis that counts shared rate limits) could not be reached:
    /// connecting or waiting for a pooled connection timed out, the connection was refused or
    /// lost, or the server is shutting down or starting.
    /// Nothing was changed by the failed call (or, for a connection lost mid-commit, the
    /// database decided alone); retrying later is safe, and the same client reconnects by
    /// itself once the database is back. How long a call waits is bounded by the client's
    /// connect and acquire timeouts.
    #[error("storage unavailable")]
    Unavailable {
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid_input(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidInput { field, reason: reason.into() }
    }

    /// Shorthand for [`Error::Configuration`].
    pub fn configuration(reason: impl Into<Cow<'static, str>>) -> Self {
        Error::Configuration { reason: reason.into() }
    }

    /// Wraps any error as [`Error::Storage`], keeping it as the source.
    pub fn storage(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Storage { source: Box::new(source) }
    }

    /// Wraps any error as [`Error::Unavailable`], keeping it as the source.
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Unavailable { source: Box::new(source) }
    }

    /// Wraps any error as [`Error::Conflict`], keeping it as the source.
    pub fn conflict(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Conflict { source: Box::new(source) }
    }

    /// Whether retrying the same call later may succeed without any change to it:
    /// [`Error::Unavailable`], [`Error::Quota`] and [`Error::Conflict`] (for a conflict in
    /// a host transaction: retrying that whole transaction).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Quota { .. } | Error::Conflict { .. })
    }
}

struct DisplayScopes<'a>(&'a [Scope]);

impl fmt::Display for DisplayScopes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        assert!(std::mem::size_of::<Error>() <= 64, "size is {}", std::mem::size_of::<Error>());
    }

    #[test]
    fn messages_are_lowercase_without_period() {
        let errors = [
            Error::InvalidKey,
            Error::NotFound { id: RecordId::Project(ProjectId::new()) },
            Error::invalid_input("name", "must not be empty"),
            Error::configuration("signing secret missing"),
            Error::unavailable(std::io::Error::other("refused")),
            Error::InsufficientScope {
                missing: vec![Scope::new("read").unwrap(), Scope::new("write").unwrap()],
            },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.chars().next().unwrap().is_lowercase(), "{msg}");
            assert!(!msg.ends_with('.'), "{msg}");
        }
        let e = Error::InsufficientScope {
            missing: vec![Scope::new("read").unwrap(), Scope::new("write").unwrap()],
        };
        assert_eq!(e.to_string(), "api key lacks required scopes: read, write");
    }

    #[test]
    fn record_ids_name_kind_and_id() {
        let id = KeyId::new();
        let e = Error::NotFound { id: id.into() };
        assert_eq!(e.to_string(), format!("key {id} not found"));
        let org = OrgId::new();
        let e = Error::AlreadyExists { existing: org.into() };
        assert_eq!(e.to_string(), format!("organization {org} already exists"));
        let Error::AlreadyExists { existing } = e else { unreachable!() };
        assert_eq!(
            (existing.kind(), existing.as_uuid()),
            (RecordKind::Organization, org.as_uuid())
        );
        assert!(Error::conflict(std::io::Error::other("40001")).is_retryable());
    }

    #[test]
    fn storage_keeps_source() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::storage(io);
        let source = std::error::Error::source(&e).expect("source kept");
        assert_eq!(source.to_string(), "disk on fire");
    }
}
