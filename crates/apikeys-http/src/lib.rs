//! HTTP answers for [`apikeys_core::Error`]: the status, the headers and an
//! [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) problem body, as plain
//! `http` values, so that any Rust web framework can answer the way `apikeys-axum` does.
//!
//! ```
//! use apikeys_core::Error;
//! use apikeys_http::{ErrorMapper, ProblemCode};
//!
//! let mapper = ErrorMapper::new();
//! let answer = mapper.response(&Error::InvalidKey);
//! assert_eq!(answer.status, http::StatusCode::UNAUTHORIZED);
//! assert_eq!(answer.headers["content-type"], "application/problem+json");
//! assert!(answer.headers.contains_key("www-authenticate"));
//! assert_eq!(answer.problem.code, ProblemCode::InvalidKey);
//!
//! // Status, headers and body for a framework that does not speak `http` types:
//! let (status, headers, body): (u16, Vec<(String, Vec<u8>)>, Vec<u8>) = (
//!     answer.status.as_u16(),
//!     answer.headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
//!     answer.body(),
//! );
//! # let _ = (status, headers, body);
//! ```
//!
//! | error | status | headers beside `Content-Type: application/problem+json` | body members |
//! |---|---|---|---|
//! | no key in the request ([`ErrorMapper::missing_key`]) | 401 | `WWW-Authenticate` | `code` |
//! | [`Error::InvalidKey`] | 401 | `WWW-Authenticate` | `code` |
//! | [`Error::Expired`] | 401 | `WWW-Authenticate` | `expired_at` |
//! | [`Error::Revoked`] | 401 | `WWW-Authenticate` | `revoked_at` |
//! | [`Error::Disabled`] | 401 | `WWW-Authenticate` | `disabled_at` |
//! | [`Error::IpNotAllowed`] | 403 | | `code` (the address is in `detail`) |
//! | [`Error::ProductNotAllowed`] | 403 | | `product_id` |
//! | [`Error::InsufficientScope`] | 403 | `WWW-Authenticate` (bearer only) | `missing_scopes` |
//! | [`Error::Quota`] | 429 | `Retry-After`, `RateLimit`, `RateLimit-Policy` | `retry_after`, `limit` |
//! | [`Error::UsageExhausted`] | 429 | `Retry-After` (when the credits refill) | `refill_at` |
//! | [`Error::InvalidInput`] | 422 | | `field` |
//! | [`Error::NotFound`] | 404 | | `kind`, `id` |
//! | [`Error::AlreadyExists`] | 409 | | `kind`, `id` |
//! | [`Error::Unavailable`], [`Error::Conflict`] | 503 | `Retry-After` | |
//! | anything else (storage, configuration) | 500 | | (a fixed detail) |
//!
//! Every answer also carries `Cache-Control: no-store`. A body never holds the presented
//! key, a signing secret or a database error's text: the `detail` of a 500 is a fixed
//! sentence, and the error itself is the host's to log.

// Links from the other apikeys crates to this one resolve to docs.rs when this crate's docs
// are not built beside theirs (`cargo doc --no-deps`); .ci/run checks the version.
#![doc(html_root_url = "https://docs.rs/apikeys-http/0.1.0")]

mod client_ip;

pub use client_ip::{ForwardedHeader, TrustedProxies, client_ip};

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use apikeys_core::{Error, RateLimit};
use chrono::{DateTime, Utc};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The media type of every error body: `application/problem+json` (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The `Retry-After` of a 503: how long a caller should wait before retrying when the
/// database is unreachable or a transaction conflicted. A client probes an unreachable
/// database once a second by default (`ClientBuilder::reconnect_interval` in apikeys-db).
pub const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The header a key is read from by default: `X-API-Key`.
pub const DEFAULT_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// The name of the rate-limit policy in the `RateLimit` and `RateLimit-Policy` headers.
pub const RATE_LIMIT_POLICY: &str = "key";

/// What went wrong, as a stable machine-readable string in the problem's `code` member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub enum ProblemCode {
    /// The request carried no key.
    MissingKey,
    /// The key is malformed or unknown (which one is never said).
    InvalidKey,
    /// The key expired.
    Expired,
    /// The key was revoked.
    Revoked,
    /// The key is disabled (it may be enabled again).
    Disabled,
    /// The key may not be used from the request's address (its IP allowlist).
    IpNotAllowed,
    /// The key is not valid for the product of the route.
    ProductNotAllowed,
    /// The key lacks scopes the route requires.
    InsufficientScope,
    /// The key's rate limit is used up for now.
    QuotaExceeded,
    /// The key's usage credits are spent (not the rate limit).
    UsageExhausted,
    /// The host's own check (such as the admin authentication in front of the management
    /// API) refused the request.
    Forbidden,
    /// The request itself is malformed (a path, query or body that does not parse).
    BadRequest,
    /// A value in the request was rejected.
    InvalidInput,
    /// The record does not exist.
    NotFound,
    /// A record with that unique name exists.
    AlreadyExists,
    /// A concurrent change conflicted; retry.
    Conflict,
    /// The database is unreachable for now; retry.
    Unavailable,
    /// The server failed; the details are in its logs, not here.
    Internal,
}

/// An RFC 9457 problem body, with this crate's extension members.
///
/// `type` is left out, which RFC 9457 defines as `about:blank`: `title` is then the status's
/// reason phrase, and [`code`](Problem::code) tells the problems apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct Problem {
    /// The status's reason phrase, e.g. `Unauthorized`.
    pub title: Cow<'static, str>,
    /// The HTTP status code.
    pub status: u16,
    /// A sentence for a human about this occurrence.
    pub detail: String,
    /// What went wrong, for a program.
    pub code: ProblemCode,
    /// When the key expired ([`ProblemCode::Expired`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<DateTime<Utc>>,
    /// When the key was revoked ([`ProblemCode::Revoked`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// When the key was disabled ([`ProblemCode::Disabled`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<DateTime<Utc>>,
    /// The product the key is not valid for ([`ProblemCode::ProductNotAllowed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<Uuid>,
    /// The required scopes the key lacks ([`ProblemCode::InsufficientScope`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_scopes: Vec<String>,
    /// Seconds to wait before retrying, rounded up (429 and 503), as in `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The rate limit that was hit ([`ProblemCode::QuotaExceeded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RateLimit>,
    /// The rate-limit policies the request violated ([`ProblemCode::QuotaExceeded`]), by the
    /// names the `RateLimit` and `RateLimit-Policy` headers use: `key` for the key's main
    /// limit, else the named limit's name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violated_policies: Vec<String>,
    /// When the key's credits refill ([`ProblemCode::UsageExhausted`]), if they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill_at: Option<DateTime<Utc>>,
    /// The rejected field ([`ProblemCode::InvalidInput`]), or the part of a request that
    /// does not parse ([`ProblemCode::BadRequest`], when the framework adapter knows it: a
    /// path or query parameter, a body member). A name, never the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The kind of record (`organization`, `project`, `product`, `key`) that is missing or
    /// already exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The id of the record that is missing or already exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
}

impl Problem {
    /// A problem with `status`, its reason phrase as title, `code` and `detail`.
    #[must_use]
    pub fn new(status: StatusCode, code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            title: Cow::Borrowed(status.canonical_reason().unwrap_or("Error")),
            status: status.as_u16(),
            detail: detail.into(),
            code,
            expired_at: None,
            revoked_at: None,
            disabled_at: None,
            product_id: None,
            missing_scopes: Vec::new(),
            violated_policies: Vec::new(),
            retry_after: None,
            limit: None,
            refill_at: None,
            field: None,
            kind: None,
            id: None,
        }
    }
}

/// An error as an HTTP answer: status, headers and problem body.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ErrorResponse {
    /// The status code.
    pub status: StatusCode,
    /// The headers, `Content-Type: application/problem+json` among them.
    pub headers: HeaderMap,
    /// The body, before serialization.
    pub problem: Problem,
}

impl ErrorResponse {
    fn new(problem: Problem) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, headers, problem }
    }

    /// The body: the problem as JSON.
    #[must_use]
    pub fn body(&self) -> Vec<u8> {
        // A struct of strings, numbers and options: serializing it cannot fail.
        serde_json::to_vec(&self.problem).unwrap_or_default()
    }

    /// The whole answer as an `http` [`Response`](http::Response) (for hyper, or any framework
    /// built on the `http` crate).
    #[must_use]
    pub fn into_http(self) -> http::Response<Vec<u8>> {
        let body = self.body();
        let mut response = http::Response::new(body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }

    fn retry_after(mut self, wait: Duration) -> Self {
        let seconds = whole_seconds(wait);
        self.headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        self.problem.retry_after = Some(seconds);
        self
    }
}

/// `wait` in whole seconds, rounded up, and at least one: what `Retry-After` says.
#[must_use]
pub fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Maps errors to HTTP answers, with the challenge (`WWW-Authenticate`) of the service.
///
/// The challenge names where the service reads keys: an `ApiKey` challenge with the header
/// name, and, when bearer tokens are accepted, a `Bearer` challenge in the form of RFC 6750
/// (with `error="invalid_token"` for a rejected key, and `error="insufficient_scope"` with
/// the missing scopes on a 403).
#[derive(Debug, Clone)]
pub struct ErrorMapper {
    realm: String,
    key_header: HeaderName,
    bearer: bool,
}

impl Default for ErrorMapper {
    fn default() -> Self {
        Self { realm: "api".to_owned(), key_header: DEFAULT_KEY_HEADER, bearer: true }
    }
}

impl ErrorMapper {
    /// Realm `api`, keys read from `X-API-Key` and from `Authorization: Bearer`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The realm named in `WWW-Authenticate`.
    ///
    /// # Errors
    /// [`Error::Configuration`] unless the realm is 1 to 64 printable ASCII characters
    /// without `"` or `\`.
    pub fn with_realm(mut self, realm: impl Into<String>) -> Result<Self, Error> {
        let realm = realm.into();
        let printable = |c: char| c.is_ascii_graphic() || c == ' ';
        if realm.is_empty()
            || realm.len() > 64
            || !realm.chars().all(printable)
            || realm.contains(['"', '\\'])
        {
            return Err(Error::configuration(
                "the realm must be 1 to 64 printable ASCII characters without quotes or backslashes",
            ));
        }
        self.realm = realm;
        Ok(self)
    }

    /// The header keys are read from, as the challenge names it.
    #[must_use]
    pub fn with_key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// Whether keys are accepted as `Authorization: Bearer` tokens (on by default), which
    /// adds a `Bearer` challenge.
    #[must_use]
    pub fn with_bearer(mut self, on: bool) -> Self {
        self.bearer = on;
        self
    }

    /// The realm.
    #[must_use]
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The header keys are read from.
    #[must_use]
    pub fn key_header(&self) -> &HeaderName {
        &self.key_header
    }

    /// Whether keys are accepted as bearer tokens.
    #[must_use]
    pub fn accepts_bearer(&self) -> bool {
        self.bearer
    }

    /// The key a request presents, read from raw values so that any framework can use it
    /// (the guards of `apikeys-tower`, `apikeys-axum` and `apikeys-actix` do), in this order:
    /// 1. the [key header](Self::key_header), whose values are `key_header_values`;
    /// 2. `Authorization: Bearer <key>` (`authorization`), if [bearer tokens are
    ///    accepted](Self::accepts_bearer);
    /// 3. the query parameter `query.0` of the query string `query.1`, if given.
    ///
    /// The first present is the key (surrounding whitespace trimmed); `None` if none is.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when the key header is sent more than once, or its value is not
    /// visible ASCII (no key of ours is).
    ///
    /// ```
    /// use apikeys_http::ErrorMapper;
    ///
    /// let mapper = ErrorMapper::new();
    /// let key = mapper.presented_key([], Some(b"Bearer sk_abc".as_slice()), None)?;
    /// assert_eq!(key.as_deref(), Some("sk_abc"));
    /// let key = mapper.presented_key([], None, Some(("api_key", "a=1&api_key=sk_x%2By")))?;
    /// assert_eq!(key.as_deref(), Some("sk_x+y"));
    /// assert!(mapper.presented_key([b"a".as_slice(), b"b"], None, None).is_err());
    /// # Ok::<(), apikeys_core::Error>(())
    /// ```
    pub fn presented_key<'a>(
        &self,
        key_header_values: impl IntoIterator<Item = &'a [u8]>,
        authorization: Option<&'a [u8]>,
        query: Option<(&str, &'a str)>,
    ) -> Result<Option<Cow<'a, str>>, Error> {
        let mut sent = key_header_values.into_iter();
        if let Some(value) = sent.next() {
            if sent.next().is_some() {
                return Err(Error::InvalidKey);
            }
            let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
            return match std::str::from_utf8(value) {
                Ok(key) if visible => Ok(Some(Cow::Borrowed(key.trim()))),
                _ => Err(Error::InvalidKey),
            };
        }
        if self.bearer
            && let Some(token) = authorization.and_then(bearer_token)
        {
            return Ok(Some(Cow::Borrowed(token)));
        }
        if let Some((name, query)) = query {
            let found = url::form_urlencoded::parse(query.as_bytes()).find(|(n, _)| n == name);
            return Ok(found.map(|(_, value)| Cow::Owned(value.into_owned())));
        }
        Ok(None)
    }

    /// The answer to a request that carried no key: 401 with the challenge.
    #[must_use]
    pub fn missing_key(&self) -> ErrorResponse {
        let detail = if self.bearer {
            format!("send an api key in the {} header or as a bearer token", self.key_header)
        } else {
            format!("send an api key in the {} header", self.key_header)
        };
        let problem = Problem::new(StatusCode::UNAUTHORIZED, ProblemCode::MissingKey, detail);
        self.challenge(ErrorResponse::new(problem), None)
    }

    /// The answer to a request that could not be read (a path, query or body that does not
    /// parse): `status` (400 unless the framework knows better, e.g. 413 or 415), code
    /// [`ProblemCode::BadRequest`].
    #[must_use]
    pub fn bad_request(&self, status: StatusCode, detail: impl Into<String>) -> ErrorResponse {
        ErrorResponse::new(Problem::new(status, ProblemCode::BadRequest, detail))
    }

    /// The answer to a request the host's own check refused: 403, code
    /// [`ProblemCode::Forbidden`].
    #[must_use]
    pub fn forbidden(&self) -> ErrorResponse {
        let detail = "the request is not authorized";
        ErrorResponse::new(Problem::new(StatusCode::FORBIDDEN, ProblemCode::Forbidden, detail))
    }

    /// The answer to `error` (see the table in the crate docs).
    #[must_use]
    pub fn response(&self, error: &Error) -> ErrorResponse {
        let problem = |status, code| Problem::new(status, code, error.to_string());
        match error {
            Error::InvalidKey => {
                let p = problem(StatusCode::UNAUTHORIZED, ProblemCode::InvalidKey);
                self.challenge(ErrorResponse::new(p), Some(error))
            }
            Error::Expired { expired_at } => {
                let mut p = problem(StatusCode::UNAUTHORIZED, ProblemCode::Expired);
                p.expired_at = Some(*expired_at);
                self.challenge(ErrorResponse::new(p), Some(error))
            }
            Error::Revoked { revoked_at } => {
                let mut p = problem(StatusCode::UNAUTHORIZED, ProblemCode::Revoked);
                p.revoked_at = Some(*revoked_at);
                self.challenge(ErrorResponse::new(p), Some(error))
            }
            Error::Disabled { disabled_at } => {
                let mut p = problem(StatusCode::UNAUTHORIZED, ProblemCode::Disabled);
                p.disabled_at = Some(*disabled_at);
                self.challenge(ErrorResponse::new(p), Some(error))
            }
            Error::IpNotAllowed { .. } => {
                ErrorResponse::new(problem(StatusCode::FORBIDDEN, ProblemCode::IpNotAllowed))
            }
            Error::ProductNotAllowed { product_id } => {
                let mut p = problem(StatusCode::FORBIDDEN, ProblemCode::ProductNotAllowed);
                p.product_id = Some(product_id.as_uuid());
                ErrorResponse::new(p)
            }
            Error::InsufficientScope { missing } => {
                let mut p = problem(StatusCode::FORBIDDEN, ProblemCode::InsufficientScope);
                p.missing_scopes = missing.iter().map(|s| s.as_str().to_owned()).collect();
                let mut answer = ErrorResponse::new(p);
                if self.bearer {
                    let scopes = answer.problem.missing_scopes.join(" ");
                    let value = format!(
                        "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{scopes}\"",
                        self.realm
                    );
                    append(&mut answer.headers, WWW_AUTHENTICATE, value);
                }
                answer
            }
            Error::Quota { retry_after, limit, name } => {
                let mut p = problem(StatusCode::TOO_MANY_REQUESTS, ProblemCode::QuotaExceeded);
                p.limit = Some(*limit);
                // Named limits' names are checked (`[a-z][a-z0-9_-]*`): safe in a quoted
                // structured-field string.
                let policy_name = name.as_deref().unwrap_or(RATE_LIMIT_POLICY);
                p.violated_policies = vec![policy_name.to_owned()];
                let mut answer = ErrorResponse::new(p).retry_after(*retry_after);
                let (q, w) = (limit.requests.get(), limit.window.seconds());
                let t = whole_seconds(*retry_after);
                let policy = format!("\"{policy_name}\";q={q};w={w}");
                let state = format!("\"{policy_name}\";r=0;t={t}");
                append(&mut answer.headers, HeaderName::from_static("ratelimit-policy"), policy);
                append(&mut answer.headers, HeaderName::from_static("ratelimit"), state);
                answer
            }
            Error::UsageExhausted { refill_at } => {
                let mut p = problem(StatusCode::TOO_MANY_REQUESTS, ProblemCode::UsageExhausted);
                p.refill_at = *refill_at;
                let answer = ErrorResponse::new(p);
                match refill_at.and_then(|at| (at - Utc::now()).to_std().ok()) {
                    Some(wait) => answer.retry_after(wait.max(Duration::from_millis(1))),
                    None => answer,
                }
            }
            Error::InvalidInput { field, .. } => {
                let mut p = problem(StatusCode::UNPROCESSABLE_ENTITY, ProblemCode::InvalidInput);
                p.field = Some((*field).to_owned());
                ErrorResponse::new(p)
            }
            Error::NotFound { id } | Error::AlreadyExists { existing: id } => {
                let (status, code) = match error {
                    Error::NotFound { .. } => (StatusCode::NOT_FOUND, ProblemCode::NotFound),
                    _ => (StatusCode::CONFLICT, ProblemCode::AlreadyExists),
                };
                let mut p = problem(status, code);
                p.kind = Some(id.kind().to_string());
                p.id = Some(id.as_uuid());
                ErrorResponse::new(p)
            }
            Error::Unavailable { .. } => {
                let p = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::Unavailable,
                    "the service is unavailable for now; retry later",
                );
                ErrorResponse::new(p).retry_after(UNAVAILABLE_RETRY_AFTER)
            }
            Error::Conflict { .. } => {
                let p = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ProblemCode::Conflict,
                    "the change conflicted with a concurrent one; retry it",
                );
                ErrorResponse::new(p).retry_after(UNAVAILABLE_RETRY_AFTER)
            }
            _ => ErrorResponse::new(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ProblemCode::Internal,
                "the server failed to handle the request",
            )),
        }
    }

    /// Adds the challenges of a 401: `ApiKey`, and `Bearer` when bearer tokens are accepted
    /// (with `error="invalid_token"` when a key was presented and rejected, RFC 6750 §3).
    fn challenge(&self, mut answer: ErrorResponse, rejected: Option<&Error>) -> ErrorResponse {
        let api_key = format!("ApiKey realm=\"{}\", header=\"{}\"", self.realm, self.key_header);
        append(&mut answer.headers, WWW_AUTHENTICATE, api_key);
        if self.bearer {
            let mut bearer = format!("Bearer realm=\"{}\"", self.realm);
            if let Some(error) = rejected {
                // Our messages are ASCII without quotes or backslashes (a timestamp at most).
                let _ = write!(bearer, ", error=\"invalid_token\", error_description=\"{error}\"");
            }
            append(&mut answer.headers, WWW_AUTHENTICATE, bearer);
        }
        answer
    }
}

/// The answer to `error` with the default [`ErrorMapper`] (realm `api`, `X-API-Key` and
/// bearer tokens).
#[must_use]
pub fn error_response(error: &Error) -> ErrorResponse {
    ErrorMapper::new().response(error)
}

/// The token of an `Authorization: Bearer <token>` value (the scheme matched without
/// regard to case, as RFC 9110 says); `None` for any other scheme.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Appends a header built from our own text; a value that is not a valid header value
/// (which none of ours is) is left out rather than panicking.
fn append(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.append(name, value);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use apikeys_core::{KeyId, OrgId, ProductId, Scope, Window};
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_any_case_of_the_scheme_only() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_token(b"BEARER abc"), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer \xff"), None);
    }

    #[test]
    fn a_key_is_read_from_the_first_place_it_is_in_and_a_bad_header_is_invalid() {
        let mapper = ErrorMapper::new();
        let header = Some(b"Bearer from-bearer".as_slice());
        let query = Some(("k", "k=from-query"));
        let key = mapper.presented_key([b" from-header ".as_slice()], header, query).unwrap();
        assert_eq!(key.as_deref(), Some("from-header"));
        assert_eq!(
            mapper.presented_key([], header, query).unwrap().as_deref(),
            Some("from-bearer")
        );
        assert_eq!(mapper.presented_key([], None, query).unwrap().as_deref(), Some("from-query"));
        assert_eq!(mapper.presented_key([], None, Some(("k", "j=1"))).unwrap(), None);
        assert_eq!(mapper.presented_key([], None, None).unwrap(), None);
        let no_bearer = ErrorMapper::new().with_bearer(false);
        assert_eq!(no_bearer.presented_key([], header, None).unwrap(), None);
        for bad in [&[b"a".as_slice(), b"b"][..], &[b"k\xffey"], &[b"k\x7fey"]] {
            let read = mapper.presented_key(bad.iter().copied(), header, None);
            assert!(matches!(read, Err(Error::InvalidKey)), "{bad:?}");
        }
    }

    fn json(answer: &ErrorResponse) -> Value {
        serde_json::from_slice(&answer.body()).unwrap()
    }

    fn challenges(answer: &ErrorResponse) -> Vec<String> {
        answer
            .headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_401s_carry_challenges_and_their_times() {
        let m = ErrorMapper::new();
        let missing = m.missing_key();
        assert_eq!(missing.status, 401);
        assert_eq!(
            challenges(&missing),
            ["ApiKey realm=\"api\", header=\"x-api-key\"", "Bearer realm=\"api\""]
        );
        assert_eq!(json(&missing)["code"], "missing_key");
        assert_eq!(json(&missing)["title"], "Unauthorized");

        let invalid = m.response(&Error::InvalidKey);
        assert_eq!(invalid.status, 401);
        assert_eq!(
            challenges(&invalid)[1],
            "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"invalid api key\""
        );
        assert_eq!(
            json(&invalid),
            json!({
                "title": "Unauthorized", "status": 401, "detail": "invalid api key", "code": "invalid_key"
            })
        );

        let expired = m.response(&Error::Expired { expired_at: at("2026-01-02T03:04:05Z") });
        assert_eq!(expired.status, 401);
        assert_eq!(json(&expired)["code"], "expired");
        assert_eq!(json(&expired)["expired_at"], "2026-01-02T03:04:05Z");
        assert_eq!(challenges(&expired).len(), 2);

        let revoked = m.response(&Error::Revoked { revoked_at: at("2026-01-02T03:04:05Z") });
        assert_eq!(
            (revoked.status, json(&revoked)["code"].clone()),
            (StatusCode::UNAUTHORIZED, json!("revoked"))
        );
        assert_eq!(json(&revoked)["revoked_at"], "2026-01-02T03:04:05Z");

        let disabled = m.response(&Error::Disabled { disabled_at: at("2026-01-02T03:04:05Z") });
        assert_eq!(
            (disabled.status, json(&disabled)["code"].clone()),
            (StatusCode::UNAUTHORIZED, json!("disabled"))
        );
        assert_eq!(json(&disabled)["disabled_at"], "2026-01-02T03:04:05Z");
        assert_eq!(challenges(&disabled).len(), 2);
    }

    #[test]
    fn an_address_outside_the_allowlist_is_403_naming_it() {
        let ip = "198.51.100.7".parse().unwrap();
        let p = error_response(&Error::IpNotAllowed { ip: Some(ip) });
        assert_eq!(p.status, 403);
        assert_eq!(json(&p)["code"], "ip_not_allowed");
        assert_eq!(json(&p)["detail"], "api key may not be used from 198.51.100.7");
        assert!(challenges(&p).is_empty());
        let unknown = error_response(&Error::IpNotAllowed { ip: None });
        assert_eq!(json(&unknown)["detail"], "api key may not be used from an unknown address");
    }

    #[test]
    fn without_bearer_only_the_api_key_challenge_with_the_configured_header() {
        let m = ErrorMapper::new()
            .with_bearer(false)
            .with_key_header(HeaderName::from_static("x-widget-key"))
            .with_realm("widgets")
            .unwrap();
        assert_eq!(
            challenges(&m.response(&Error::InvalidKey)),
            ["ApiKey realm=\"widgets\", header=\"x-widget-key\""]
        );
        assert!(json(&m.missing_key())["detail"].as_str().unwrap().contains("x-widget-key"));
        let scope = Error::InsufficientScope { missing: vec![Scope::new("a").unwrap()] };
        assert!(challenges(&m.response(&scope)).is_empty());
    }

    #[test]
    fn bad_realms_are_refused() {
        for realm in ["", "a\"b", "a\\b", "new\nline", "é", &"x".repeat(65)] {
            assert!(
                matches!(ErrorMapper::new().with_realm(realm), Err(Error::Configuration { .. })),
                "{realm:?}"
            );
        }
        assert_eq!(ErrorMapper::new().with_realm("My API v2").unwrap().realm(), "My API v2");
    }

    #[test]
    fn the_403s_name_the_product_or_the_missing_scopes() {
        let product = ProductId::new();
        let p = error_response(&Error::ProductNotAllowed { product_id: product });
        assert_eq!(p.status, 403);
        assert_eq!(json(&p)["product_id"], product.to_string());
        assert_eq!(json(&p)["code"], "product_not_allowed");
        assert!(challenges(&p).is_empty());

        let missing = vec![Scope::new("billing:read").unwrap(), Scope::new("write").unwrap()];
        let s = error_response(&Error::InsufficientScope { missing });
        assert_eq!(s.status, 403);
        assert_eq!(json(&s)["missing_scopes"], json!(["billing:read", "write"]));
        assert_eq!(
            challenges(&s),
            ["Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"billing:read write\""]
        );
    }

    #[test]
    fn usage_exhausted_is_429_without_rate_limit_headers() {
        let at = Utc::now() + chrono::TimeDelta::seconds(90);
        let e = error_response(&Error::UsageExhausted { refill_at: Some(at) });
        assert_eq!(e.status, 429);
        assert_eq!(json(&e)["code"], "usage_exhausted");
        let wait: u64 = e.headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((89..=90).contains(&wait), "{wait}");
        assert!(
            !e.headers.contains_key("ratelimit") && !e.headers.contains_key("ratelimit-policy")
        );
        let never = error_response(&Error::UsageExhausted { refill_at: None });
        assert_eq!(never.status, 429);
        assert!(!never.headers.contains_key(RETRY_AFTER));
        assert!(json(&never).get("refill_at").is_none());
    }

    #[test]
    fn quota_rounds_retry_after_up_and_states_the_policy() {
        let limit = RateLimit::new(NonZeroU32::new(100).unwrap(), Window::Minute);
        for (wait, seconds) in [
            (Duration::from_millis(1), 1),
            (Duration::from_millis(1000), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_millis(59_999), 60),
        ] {
            let q = error_response(&Error::Quota { retry_after: wait, limit, name: None });
            assert_eq!(q.status, 429);
            assert_eq!(q.headers[RETRY_AFTER], seconds.to_string(), "{wait:?}");
            assert_eq!(q.headers["ratelimit-policy"], "\"key\";q=100;w=60");
            assert_eq!(q.headers["ratelimit"], format!("\"key\";r=0;t={seconds}"));
            let body = json(&q);
            assert_eq!(body["retry_after"], seconds);
            assert_eq!(body["limit"], json!({"requests": 100, "window": "minute"}));
            assert_eq!(body["code"], "quota_exceeded");
        }
    }

    #[test]
    fn management_errors_name_the_record_or_the_field() {
        let key = KeyId::new();
        let nf = error_response(&Error::NotFound { id: key.into() });
        assert_eq!(nf.status, 404);
        assert_eq!(
            (json(&nf)["kind"].clone(), json(&nf)["id"].clone()),
            (json!("key"), json!(key.to_string()))
        );
        let org = OrgId::new();
        let ae = error_response(&Error::AlreadyExists { existing: org.into() });
        assert_eq!(ae.status, 409);
        assert_eq!(json(&ae)["kind"], "organization");
        let ii = error_response(&Error::invalid_input("name", "must not be empty"));
        assert_eq!(ii.status, 422);
        assert_eq!(json(&ii)["field"], "name");
        assert_eq!(json(&ii)["detail"], "invalid name: must not be empty");
        let f = ErrorMapper::new().forbidden();
        assert_eq!(
            (f.status, json(&f)["code"].clone()),
            (StatusCode::FORBIDDEN, json!("forbidden"))
        );
        let br = ErrorMapper::new().bad_request(StatusCode::BAD_REQUEST, "malformed json");
        assert_eq!(
            (br.status, json(&br)["code"].clone()),
            (StatusCode::BAD_REQUEST, json!("bad_request"))
        );
    }

    #[test]
    fn server_side_failures_say_nothing_of_their_cause() {
        let secret = "postgres://admin:hunter2@db/prod";
        for (error, status, code) in [
            (Error::unavailable(std::io::Error::other(secret)), 503, "unavailable"),
            (Error::conflict(std::io::Error::other(secret)), 503, "conflict"),
            (Error::storage(std::io::Error::other(secret)), 500, "internal"),
            (Error::configuration(secret), 500, "internal"),
            (Error::Entropy, 500, "internal"),
        ] {
            let answer = error_response(&error);
            assert_eq!(answer.status, status);
            assert_eq!(json(&answer)["code"], code);
            let all = format!("{:?}{}", answer.headers, String::from_utf8(answer.body()).unwrap());
            assert!(!all.contains("hunter2"), "{all}");
            if status == 503 {
                assert_eq!(answer.headers[RETRY_AFTER], "1");
            } else {
                assert!(!answer.headers.contains_key(RETRY_AFTER));
            }
        }
    }

    #[test]
    fn every_answer_is_an_uncacheable_problem_document() {
        let answer = error_response(&Error::InvalidKey);
        assert_eq!(answer.headers[CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
        let response = answer.clone().into_http();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers(), &answer.headers);
        let back: Problem = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(back, answer.problem);
    }
}

/// This crate's README, whose example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
