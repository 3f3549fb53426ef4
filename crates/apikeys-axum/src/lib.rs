//! axum integration for apikeys: guard a route with an API key in one line, and manage keys
//! over HTTP.
//!
//! - [`ApiKeyAuth`]: where keys are read from (`X-API-Key`, `Authorization: Bearer`, and
//!   optionally a query parameter), the client that validates them, and the answers to
//!   rejected requests.
//! - [`ApiKeyAuth::require`]: a tower layer ([`RequireKeyLayer`], the one of
//!   [`apikeys_tower`], which also guards hyper and tonic services) that guards a route or
//!   a whole router and puts the validated key in the request's extensions.
//! - [`ValidKey`]: the validated key as a handler argument (`FromRequestParts`), with
//!   per-route [`Requirement`]s, and `Option<ValidKey>` where a key is optional.
//! - [`ManagementApi`]: keys, organizations, projects and products over HTTP, with an
//!   OpenAPI document, mounted behind the host's own admin authentication.
//!
//! Rejected requests get 401 (no, invalid, expired or revoked key; with
//! `WWW-Authenticate`), 403 (wrong product, missing scopes), 429 (rate limit; with
//! `Retry-After`, `RateLimit` and `RateLimit-Policy`), 503 (database unreachable; with
//! `Retry-After`) or 500, each with an RFC 9457 `application/problem+json` body that never
//! holds the key: see [`apikeys_http`], which has the same mapping for other frameworks.
//!
//! ```
//! use apikeys_axum::{ApiKeyAuth, ValidKey};
//! use apikeys_db::{ApiKeyClient, ValidateOptions};
//! use axum::{Router, routing::get};
//!
//! async fn widgets(key: ValidKey) -> String {
//!     format!("widgets for organization {}", key.org_id)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> apikeys_db::Result<()> {
//! # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
//! #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
//! # client.create_tables().await?;
//! let auth = ApiKeyAuth::new(client);
//! let read = ValidateOptions::new().require_scopes(["widgets:read"])?;
//! let app: Router = Router::new()
//!     .route("/widgets", get(widgets).route_layer(auth.require(read)));
//! # Ok(())
//! # }
//! ```

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-axum/0.1.0")]

mod auth;
mod extract;
mod layer;
mod manage;

pub use auth::{ApiKeyAuth, Rejection, problem_response};
pub use extract::{Defaults, Requirement, ValidKey};
pub use layer::{RequireKey, RequireKeyLayer};
pub use manage::{
    AddCreditsBody, Admin, CreatedKey, ListQuery, ManagementApi, NameBody, UpdateKeyBody,
};

/// The error mapping for any framework: status, headers and RFC 9457 problem bodies.
pub use apikeys_http;
/// The guard as a plain tower layer, which this crate's is.
pub use apikeys_tower;

/// This crate's README, whose examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
