//! A tower [`Layer`](tower_layer::Layer) that guards any `http` service with an apikeys API
//! key: hyper, tonic and axum services alike. It depends on no server framework, only on
//! `tower-layer`, `tower-service` and `http`.
//!
//! - [`ApiKeyAuth`]: where keys are read from (`X-API-Key`, `Authorization: Bearer`, and
//!   optionally a query parameter), where the connection's address is, the client that
//!   validates keys, and the answers to rejected requests.
//! - [`ApiKeyAuth::require`]: the [`RequireKeyLayer`]. A request whose key passes goes on
//!   with a [`ValidatedKey`] in its extensions; any other is answered without reaching the
//!   service: by default with the problem of [`apikeys_http`] (401 no, invalid, expired or
//!   revoked key, with `WWW-Authenticate`; 403 wrong product, missing scopes; 429 rate
//!   limit, with `Retry-After`, `RateLimit` and `RateLimit-Policy`; 503 database
//!   unreachable, with `Retry-After`; 500), or as [`RequireKeyLayer::answer_with`] says: a
//!   gRPC service answers with a status instead.
//!
//! No answer and no log holds the presented key.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use apikeys_db::{ApiKeyClient, ValidateOptions};
//! use apikeys_tower::{ApiKeyAuth, ValidatedKey};
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use tower_layer::Layer;
//!
//! async fn widgets(request: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
//!     let key = request.extensions().get::<ValidatedKey>().expect("behind the guard");
//!     Ok(http::Response::new(Full::from(format!("widgets for organization {}", key.org_id))))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> apikeys_db::Result<()> {
//! # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
//! #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
//! # client.create_tables().await?;
//! let auth = ApiKeyAuth::new(client);
//! let read = ValidateOptions::new().require_scopes(["widgets:read"])?;
//! let service = auth.require(read).layer(tower::service_fn(widgets));
//! // Serve it with hyper: hyper_util::service::TowerToHyperService::new(service).
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-tower/0.1.0")]

mod auth;
mod layer;

pub use auth::{ApiKeyAuth, PeerAddress, Rejection, problem_response};
pub use layer::{Answer, OnPass, Problems, RequireKey, RequireKeyLayer, ValidatedKey};

/// The error mapping: status, headers and RFC 9457 problem bodies.
pub use apikeys_http;
