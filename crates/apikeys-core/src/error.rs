//! The one error type of apikeys.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::id::ProductId;
use crate::rate_limit::RateLimit;
use crate::scope::Scope;

/// Shorthand for `std::result::Result<T, apikeys_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of record an [`Error::AlreadyExists`] or [`Error::NotFound`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Entity {
    /// An [`Organization`](crate::Organization).
    Organization,
    /// A [`Project`](crate::Project).
    Project,
    /// A [`Product`](crate::Product).
    Product,
    /// An API key ([`ApiKey`](crate::ApiKey)).
    Key,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Organization => "organization",
            Entity::Project => "project",
            Entity::Product => "product",
            Entity::Key => "key",
        })
    }
}

/// Everything that can go wrong in apikeys.
///
/// Match on the variant to decide what to answer a caller (for an HTTP service: `InvalidKey`,
/// `Expired` and `Revoked` are 401, `ProductNotAllowed` and `InsufficientScope` 403, `Quota` 429
/// with a `Retry-After` header, `InvalidInput` 400 or 422, `NotFound` 404, `AlreadyExists` 409,
/// `Unavailable` 503, the rest 500).
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

    /// The key's rate limit is used up for the current window.
    #[error("rate limit of {limit} exceeded, retry after {} ms", retry_after.as_millis())]
    Quota {
        /// How long until the window frees a slot: more than zero, never more than the window.
        retry_after: Duration,
        /// The limit that was hit.
        limit: RateLimit,
    },

    /// A record with the same unique name (or key hash) already exists.
    #[error("{entity} already exists (id {existing_id})")]
    AlreadyExists {
        /// Which kind of record.
        entity: Entity,
        /// The id of the record that already exists.
        existing_id: Uuid,
    },

    /// The record asked for does not exist (or belongs to another organization).
    #[error("{entity} not found")]
    NotFound {
        /// Which kind of record.
        entity: Entity,
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

    /// The database could not be reached: connecting or waiting for a pooled connection timed
    /// out, the connection was refused or lost, or the server is shutting down or starting.
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

    /// Whether retrying the same call later may succeed without any change to it:
    /// [`Error::Unavailable`] and [`Error::Quota`].
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Quota { .. })
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
            Error::NotFound { entity: Entity::Project },
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
    fn storage_keeps_source() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::storage(io);
        let source = std::error::Error::source(&e).expect("source kept");
        assert_eq!(source.to_string(), "disk on fire");
    }
}
