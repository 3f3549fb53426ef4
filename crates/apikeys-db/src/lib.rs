//! # apikeys-db
//!
//! Issue, scope, store and validate API keys for your customers, in your own database
//! (SQLite, PostgreSQL or MySQL/MariaDB, through SeaORM).
//!
//! ```
//! use apikeys_db::{ApiKeyClient, NewKey, ValidateOptions, Error};
//!
//! # #[tokio::main]
//! # async fn main() -> apikeys_db::Result<()> {
//! let client = ApiKeyClient::builder()
//!     .database_url("sqlite::memory:")
//!     .signing_secret("a-signing-secret-of-at-least-32-bytes!!")
//!     .environment("live")
//!     .build()
//!     .await?;
//! client.create_tables().await?;
//!
//! // On every deploy: idempotent bootstrap.
//! let (org, _created) = client.get_or_create_organization("acme").await?;
//! let (api, _) = client.get_or_create_product(org.id, "public-api").await?;
//!
//! // Issue a key; show `issued.key.expose_secret()` to the customer once.
//! let issued = client
//!     .create_key(org.id, NewKey::new("ci").with_scopes(["read"]))
//!     .await?;
//!
//! // On every request.
//! let opts = ValidateOptions::new().for_product(api.id).require_scopes(["read"])?;
//! let key = client.validate_key(issued.key.expose_secret(), &opts).await?;
//! assert_eq!(key.id, issued.record.id);
//!
//! let write = ValidateOptions::new().require_scopes(["write"])?;
//! match client.validate_key(issued.key.expose_secret(), &write).await {
//!     Err(Error::InsufficientScope { missing }) => assert_eq!(missing[0].as_str(), "write"),
//!     other => panic!("{other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Cargo features
//! One per database, in any combination: `sqlite` (default), `postgres`, `mysql`; and for
//! the servers a TLS implementation, `tls-rustls` or `tls-native-tls` (none by default).
//! Each backend feature pulls in only its own sqlx driver.
//!
//! ## Rate limits, costs and plans
//! A key may carry a main limit ([`NewKey::with_rate_limit`]) and named ones
//! ([`NewKey::with_rate_limits`], [`RateLimits`]: "10 a second and 10 000 a day"), and usage
//! credits ([`NewKey::with_credits`]). [`ApiKeyClient::validate_key`] counts a check against
//! all of them, all or nothing, at the cost [`ValidateOptions::cost`] says; a refusal is
//! [`Error::Quota`] naming the limit, or [`Error::UsageExhausted`]. Where the counts live
//! ([`RateLimitMode`]: one shared statement per check, leased blocks, or in-process GCRA;
//! SQL or, with the `redis` feature, Redis) is the client's choice
//! ([`ClientBuilder::rate_limit_mode`], [`ClientBuilder::credit_mode`]).
//!
//! A plan sold per customer is an owner's ([`ApiKeyClient::set_owner`], [`OwnerPlan`]): named
//! limits and credits shared by every key with that [`owner`](NewKey::with_owner) in the
//! organization, checked in the same all-or-nothing step, refusals named `owner.<name>`.
//!
//! ## The verified-key cache
//! [`ClientBuilder::cache`] ([`KeyCache`]) answers checks of known keys from memory (about a
//! microsecond), kept fresh by the change feed: every replica sees a revocation, a disable
//! or an update within the cache's staleness bound ([`KeyCache::max_staleness`]), and
//! nothing is served past it when the database cannot be asked (unless
//! [`KeyCache::stale_if_error`] says so).
//!
//! ## In the host's transaction
//! [`ApiKeyClient::with`] runs the writes of a sign-up or bootstrap inside a transaction the
//! host owns ([`InTransaction`]), so that rolling it back leaves nothing behind.
//!
//! ## What is where
//! The root has the types a user touches. [`core`] is the whole domain crate, with the input
//! bounds in [`core::limits`] and the building blocks of a store of your own (hashing, the
//! pure decision, validated inputs) fenced in [`core::hazmat`]. `sea_orm` is re-exported
//! for host transactions and [`ClientBuilder::connection`].
//!
//! ## What is stored
//! Only `HMAC-SHA256(signing secret, key)` and a short hint (`sk_live_Ab3x…`); the plaintext
//! key is returned once by [`ApiKeyClient::create_key`]. Signing secrets and plaintext keys
//! are zeroed on drop and print `[redacted]`. Errors never contain key material.

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-db/0.1.0")]

#[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
compile_error!("apikeys-db needs at least one database feature: sqlite, postgres or mysql");

mod audit;
mod breaker;
mod builder;
mod cache;
mod client;
mod clock;
mod connect;
mod convert;
mod credits;
mod entity;
mod error;
mod feed;
mod id;
mod idempotent;
mod key_admin;
mod key_list;
mod lifecycle;
mod link;
mod lock;
mod lookup;
mod observe;
mod org_child;
mod organization;
mod owner;
mod product;
mod project;
mod rate_limit;
#[cfg(feature = "redis")]
mod redis_conn;
mod schema;
mod secret_version;
mod transaction;
mod usage;
mod validate;

pub use builder::ClientBuilder;
pub use cache::{CacheStats, KeyCache};
pub use client::ApiKeyClient;
pub use clock::Clock;
pub use credits::CreditMode;
pub use lifecycle::MAX_GRACE;
pub use rate_limit::RateLimitMode;
pub use schema::{ApiKeysMigration, ApiKeysSchema};
pub use transaction::InTransaction;
pub use validate::{ValidateOptions, VerifyOptions};

#[doc(inline)]
pub use apikeys_core::{
    ApiKey, Credits, Error, Expiry, IpAllowlist, IssuedKey, KeyAction, KeyEvent, KeyFormat, KeyId,
    KeyPage, KeyStatus, KeyUpdate, NewKey, NewKeyInput, OrgId, Organization, Owner, OwnerPlan,
    Page, PlaintextKey, Product, ProductId, Project, ProjectId, RateLimit, RateLimits, RecordId,
    RecordKind, Refill, RefillInterval, Result, Scope, Scopes, SigningSecret, StatusFilter, Window,
};

/// The domain crate, `apikeys-core`, whole: input bounds ([`core::limits`]) and the building
/// blocks of a store ([`core::hazmat`]) beside what the root re-exports.
pub use apikeys_core as core;

pub use sea_orm;

/// This crate's README, whose example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
