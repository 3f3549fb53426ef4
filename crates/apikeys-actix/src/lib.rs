//! actix-web integration for apikeys: a middleware and an extractor that guard routes with
//! an API key, answering rejected requests exactly as `apikeys-axum` and `apikeys-tower` do.
//!
//! - [`ApiKeyAuth`]: the guard's configuration, shared with `apikeys-tower` (where keys are
//!   read from, trusted proxies, the realm, the default requirements). The connection's
//!   address is actix's `peer_addr`.
//! - [`RequireKey`]: the middleware (`.wrap(..)` on an app, scope or resource): only requests
//!   with a key that passes its [`ValidateOptions`] reach the handlers, with the key in the
//!   request's extensions.
//! - [`ValidKey`]: the validated key as a handler argument. Behind the middleware it is the
//!   key the middleware validated (no second check); elsewhere it validates against the
//!   guard's defaults ([`ApiKeyAuth::requirements`]), finding the guard in the app data.
//! - [`MaybeKey`], where a key is optional: `None` without a key, but a bad key is still
//!   rejected. (actix's own `Option<ValidKey>` would turn a rejected key into `None`, serving
//!   it as anonymous: use [`MaybeKey`].)
//!
//! Rejected requests get 401 (no, invalid, expired, revoked or disabled key; with
//! `WWW-Authenticate`), 403 (wrong product, missing scopes, address not allowed), 429 (rate
//! limit or credits; with `Retry-After`, and `RateLimit` and `RateLimit-Policy` for a rate
//! limit), 503 (database unreachable; with `Retry-After`) or 500, each with the RFC 9457
//! `application/problem+json` body of [`apikeys_http`], which never holds the key. Server-side
//! failures (5xx) are logged at `ERROR`, other rejections at `DEBUG`.
//!
//! ```
//! use actix_web::{App, HttpResponse, web};
//! use apikeys_actix::{ApiKeyAuth, RequireKey, ValidKey};
//! use apikeys_db::{ApiKeyClient, ValidateOptions};
//!
//! async fn widgets(key: ValidKey) -> HttpResponse {
//!     HttpResponse::Ok().body(format!("widgets for organization {}", key.org_id))
//! }
//!
//! # async fn demo(client: ApiKeyClient) -> apikeys_db::Result<()> {
//! let auth = ApiKeyAuth::new(client);
//! let read = ValidateOptions::new().require_scopes(["widgets:read"])?;
//! let app = App::new().service(
//!     web::resource("/widgets").wrap(RequireKey::new(auth.clone(), read)).to(widgets),
//! );
//! # let _ = app; Ok(()) }
//! ```

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-actix/0.1.0")]

mod extract;
mod middleware;

pub use extract::{MaybeKey, ValidKey};
pub use middleware::{RequireKey, RequireKeyMiddleware};

/// The guard's configuration, shared with `apikeys-tower`. Its `peer_address` setting is
/// not used here: actix knows the connection's address (`HttpRequest::peer_addr`).
pub use apikeys_tower::ApiKeyAuth;

/// The error mapping: status, headers and RFC 9457 problem bodies.
pub use apikeys_http;

use std::fmt;
use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::http::header::HeaderValue;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use apikeys_db::{ApiKey, ValidateOptions};

/// A request turned away by the guard: its answer (an RFC 9457 problem, see
/// [`apikeys_http`]) and, unless the request carried no key, the error behind it. As an
/// actix error it answers with that problem, status and headers.
#[derive(Debug)]
pub struct Rejection(apikeys_tower::Rejection);

impl Rejection {
    /// The error behind the rejection; `None` when the request carried no key.
    #[must_use]
    pub fn error(&self) -> Option<&apikeys_db::Error> {
        self.0.error()
    }

    /// The HTTP answer: status, headers and problem body.
    #[must_use]
    pub fn answer(&self) -> &apikeys_http::ErrorResponse {
        self.0.answer()
    }
}

impl From<apikeys_tower::Rejection> for Rejection {
    fn from(rejection: apikeys_tower::Rejection) -> Self {
        Self(rejection)
    }
}

impl fmt::Display for Rejection {
    /// The problem's detail, which never holds the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.answer().problem.detail)
    }
}

impl ResponseError for Rejection {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.answer().status.as_u16())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The problem, logged first (5xx at `ERROR`, others at `DEBUG`, never the key).
    fn error_response(&self) -> HttpResponse {
        self.0.log();
        let answer = self.answer();
        let mut response = HttpResponse::build(self.status_code());
        for (name, value) in &answer.headers {
            // Our own header values, valid in either `http` version.
            if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                response.append_header((name.as_str(), value));
            }
        }
        response.body(answer.body())
    }
}

/// The key the request carries, if any, from the places `auth` reads keys from.
fn find_key(auth: &ApiKeyAuth, request: &HttpRequest) -> Result<Option<String>, Rejection> {
    let headers = request.headers();
    let sent = headers.get_all(auth.errors().key_header().as_str()).map(|v| v.as_bytes());
    let authorization = headers.get("authorization").map(|v| v.as_bytes());
    let query = auth.query_param_name().map(|name| (name, request.query_string()));
    match auth.errors().presented_key(sent, authorization, query) {
        Ok(key) => Ok(key.map(|k| k.into_owned())),
        Err(error) => Err(auth.reject(error).into()),
    }
}

/// The address the request's key is judged by: the peer, or what a trusted proxy forwarded.
fn client_ip(auth: &ApiKeyAuth, request: &HttpRequest) -> Option<IpAddr> {
    let peer = request.peer_addr().map(|a| a.ip());
    match auth.proxies() {
        Some(proxies) => {
            let name = proxies.header_name();
            let values = request.headers().get_all(name.as_str()).map(|v| v.as_bytes());
            proxies.client_ip_from(peer, values)
        }
        None => peer.map(|p| p.to_canonical()),
    }
}

/// Validates the key `request` carries against `options`; `None` if it carries none.
async fn check(
    auth: &ApiKeyAuth,
    request: &HttpRequest,
    options: &ValidateOptions,
) -> Result<Option<ApiKey>, Rejection> {
    let Some(key) = find_key(auth, request)? else { return Ok(None) };
    let validated = auth.validate(&key, client_ip(auth, request), options).await?;
    Ok(Some(validated))
}
