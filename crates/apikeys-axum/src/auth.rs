//! The guard's configuration: where keys are read from, how errors are answered, and the
//! check itself.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use apikeys_db::{ApiKey, ApiKeyClient, Error, ValidateOptions};
use apikeys_http::{ErrorMapper, ErrorResponse, TrustedProxies};
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, HeaderName};

use crate::layer::{RequireKey, RequireKeyLayer};

/// What guards routes: the client, where keys are read from, the default requirements and
/// the answers to rejected requests. Cheap to clone (one `Arc`).
///
/// Keys are read, in this order, from:
/// 1. the key header, `X-API-Key` unless [`key_header`](Self::key_header) names another;
/// 2. `Authorization: Bearer <key>`, unless turned off with [`bearer`](Self::bearer);
/// 3. a query parameter, only if [`query_param`](Self::query_param) names one. It is off
///    by default, and best left off: URLs end up in access logs, proxy logs, browser
///    history and `Referer` headers, where a key in them leaks.
///
/// The first of those present is the one validated; a header sent twice is rejected as an
/// invalid key. Before the check, the key header's and `Authorization`'s values are
/// marked sensitive, so that the `Debug` output of handlers and of layers inside the guard
/// leaves them out. A trace layer outside the guard sees the request before that: if it logs
/// headers, put tower-http's `SetSensitiveRequestHeadersLayer` outermost.
///
/// A key with an IP allowlist is judged by the request's address: the connection's peer,
/// which axum knows when the app is served with
/// `into_make_service_with_connect_info::<SocketAddr>()` (without it the address is unknown,
/// and such keys are refused with 403), or, behind a load balancer, what it forwarded, once
/// [`trusted_proxies`](Self::trusted_proxies) says which proxies to believe.
///
/// ```
/// use apikeys_axum::ApiKeyAuth;
/// # async fn demo(client: apikeys_db::ApiKeyClient) -> apikeys_db::Result<()> {
/// let auth = ApiKeyAuth::new(client)
///     .key_header(http::HeaderName::from_static("x-widgets-key"))
///     .realm("widgets")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ApiKeyAuth {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    client: ApiKeyClient,
    query_param: Option<String>,
    /// The answers, and where keys are read from (the key header, bearer tokens or not).
    mapper: ErrorMapper,
    defaults: ValidateOptions,
    proxies: Option<TrustedProxies>,
}

impl ApiKeyAuth {
    /// Keys from `X-API-Key` or `Authorization: Bearer`, validated by `client` with no
    /// product or scope required (until [`requirements`](Self::requirements) says
    /// otherwise), usage tracked and the key's rate limit checked.
    #[must_use]
    pub fn new(client: ApiKeyClient) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                query_param: None,
                mapper: ErrorMapper::new(),
                defaults: ValidateOptions::new(),
                proxies: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Reads keys from this header instead of `X-API-Key`.
    #[must_use]
    pub fn key_header(self, name: HeaderName) -> Self {
        self.edit(|i| i.mapper = i.mapper.clone().with_key_header(name))
    }

    /// Whether keys are also read from `Authorization: Bearer` (on by default).
    #[must_use]
    pub fn bearer(self, on: bool) -> Self {
        self.edit(|i| i.mapper = i.mapper.clone().with_bearer(on))
    }

    /// Also reads keys from this query parameter (`?api_key=...`). Off by default: a key in
    /// a URL is written to access logs, proxy logs and browser history, and sent onwards in
    /// `Referer` headers. Turn it on only for clients that cannot set headers.
    #[must_use]
    pub fn query_param(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.edit(|i| i.query_param = Some(name))
    }

    /// Believes the client address that these proxies forward (see [`TrustedProxies`]) on
    /// requests whose peer is one of them. Off by default: the address is the peer's, and
    /// `X-Forwarded-For` and `Forwarded` are ignored, since any client can send them.
    #[must_use]
    pub fn trusted_proxies(self, proxies: TrustedProxies) -> Self {
        self.edit(|i| i.proxies = Some(proxies))
    }

    /// The address the request's key is judged by (see [`ApiKeyAuth`]): `None` when the
    /// app was not served with connection info, or a trusted proxy forwarded no address.
    #[must_use]
    pub fn client_ip(&self, parts: &Parts) -> Option<IpAddr> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        apikeys_http::client_ip(peer, &parts.headers, self.inner.proxies.as_ref())
    }

    /// The realm named in `WWW-Authenticate` (`api` by default).
    ///
    /// # Errors
    /// [`Error::Configuration`] unless the realm is 1 to 64 printable ASCII characters
    /// without `"` or `\`.
    pub fn realm(self, realm: impl Into<String>) -> Result<Self, Error> {
        let mapper = self.inner.mapper.clone().with_realm(realm)?;
        Ok(self.edit(|i| i.mapper = mapper))
    }

    /// What the [`ValidKey`](crate::ValidKey) extractor requires on routes without a guard
    /// layer or a [`Requirement`](crate::Requirement) of their own (nothing by default).
    #[must_use]
    pub fn requirements(self, options: ValidateOptions) -> Self {
        self.edit(|i| i.defaults = options)
    }

    /// A layer that lets through only requests with a key that passes `options`, and hands
    /// the validated key to the handler (as [`ValidKey`](crate::ValidKey), in the request's
    /// extensions). Guard one route with `.route_layer(..)`, or a whole router with
    /// `.layer(..)`.
    #[must_use]
    pub fn require(&self, options: ValidateOptions) -> RequireKeyLayer {
        RequireKeyLayer::new(RequireKey::new(self.clone(), options))
    }

    /// The client keys are validated with.
    #[must_use]
    pub fn client(&self) -> &ApiKeyClient {
        &self.inner.client
    }

    /// The error answers (with this guard's realm and key locations), for handlers that
    /// want to answer an [`Error`] the same way.
    #[must_use]
    pub fn errors(&self) -> &ErrorMapper {
        &self.inner.mapper
    }

    pub(crate) fn defaults(&self) -> &ValidateOptions {
        &self.inner.defaults
    }

    /// Validates the key the request carries against `options`.
    ///
    /// # Errors
    /// A [`Rejection`]: no key (401), or the [`Error`] of `validate_key` as its answer.
    pub async fn check(
        &self,
        parts: &mut Parts,
        options: &ValidateOptions,
    ) -> Result<ApiKey, Rejection> {
        match self.find_key(parts)? {
            Some(key) => self.validate(&key, self.client_ip(parts), options).await,
            None => Err(self.missing()),
        }
    }

    pub(crate) async fn validate(
        &self,
        key: &str,
        client_ip: Option<IpAddr>,
        options: &ValidateOptions,
    ) -> Result<ApiKey, Rejection> {
        let check = self.inner.client.validate_key_from(key, client_ip, options);
        check.await.map_err(|e| self.reject(e))
    }

    /// The rejection of a request that carries no key.
    pub(crate) fn missing(&self) -> Rejection {
        Rejection::new(self.inner.mapper.missing_key(), None)
    }

    pub(crate) fn reject(&self, error: Error) -> Rejection {
        Rejection::new(self.inner.mapper.response(&error), Some(error))
    }

    /// The key the request carries, if any (see the order on [`ApiKeyAuth`]), after marking
    /// the headers it may sit in as sensitive.
    ///
    /// # Errors
    /// A 401 [`Rejection`] when the key header is sent more than once, or its value is not
    /// visible ASCII (no key of ours is).
    pub fn find_key(&self, parts: &mut Parts) -> Result<Option<String>, Rejection> {
        let inner = &*self.inner;
        let key_header = inner.mapper.key_header();
        mark_sensitive(&mut parts.headers, key_header);
        let mut sent = parts.headers.get_all(key_header).iter();
        if let Some(value) = sent.next() {
            if sent.next().is_some() {
                return Err(self.reject(Error::InvalidKey));
            }
            return match value.to_str() {
                Ok(key) => Ok(Some(key.trim().to_owned())),
                Err(_) => Err(self.reject(Error::InvalidKey)),
            };
        }
        if inner.mapper.accepts_bearer()
            && let Some(token) =
                parts.headers.get(AUTHORIZATION).and_then(|v| bearer_token(v.as_bytes()))
        {
            return Ok(Some(token.to_owned()));
        }
        if let (Some(name), Some(query)) = (&inner.query_param, parts.uri.query()) {
            let found =
                url::form_urlencoded::parse(query.as_bytes()).find(|(n, _)| n == name.as_str());
            return Ok(found.map(|(_, value)| Cow::into_owned(value)));
        }
        Ok(None)
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme matched without
/// regard to case, as RFC 9110 says); `None` for any other scheme.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn mark_sensitive(headers: &mut HeaderMap, key_header: &HeaderName) {
    for name in [key_header, &AUTHORIZATION] {
        if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// A request turned away by the guard: its HTTP answer (an RFC 9457 problem, see
/// [`apikeys_http`]) and, unless the request carried no key, the error behind it.
///
/// As a response it logs server-side failures (5xx) at `ERROR` with their source chain,
/// and other rejections at `DEBUG`; neither log holds the key.
#[derive(Debug)]
pub struct Rejection(Box<(ErrorResponse, Option<Error>)>);

impl Rejection {
    pub(crate) fn new(answer: ErrorResponse, error: Option<Error>) -> Self {
        Self(Box::new((answer, error)))
    }

    /// The error behind the rejection; `None` when the request carried no key.
    #[must_use]
    pub fn error(&self) -> Option<&Error> {
        self.0.1.as_ref()
    }

    /// The HTTP answer: status, headers and problem body.
    #[must_use]
    pub fn answer(&self) -> &ErrorResponse {
        &self.0.0
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (answer, error) = *self.0;
        let status = answer.status;
        match &error {
            Some(error) if status.is_server_error() => {
                tracing::error!(error = error as &dyn std::error::Error, %status, "api key check failed");
            }
            _ => tracing::debug!(code = ?answer.problem.code, %status, "api key rejected"),
        }
        problem_response(answer)
    }
}

/// An [`ErrorResponse`] as an axum response.
#[must_use]
pub fn problem_response(answer: ErrorResponse) -> Response {
    let body = answer.body();
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers;
    response
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

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
}
