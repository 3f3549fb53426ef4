//! The guard's configuration, on top of `apikeys-tower`'s: where keys are read from, how
//! errors are answered, and the check itself, with the connection's address read from
//! axum's `ConnectInfo`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use apikeys_db::{ApiKey, ApiKeyClient, Error, ValidateOptions};
use apikeys_http::{ErrorMapper, ErrorResponse, TrustedProxies};
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{Extensions, HeaderName};

use crate::extract::{Defaults, ValidKey};
use crate::layer::RequireKeyLayer;

/// What guards routes: the client, where keys are read from, the default requirements and
/// the answers to rejected requests. Cheap to clone (one `Arc`). It is `apikeys-tower`'s
/// [`ApiKeyAuth`](apikeys_tower::ApiKeyAuth) reading the connection's address from axum's
/// `ConnectInfo`; [`tower`](Self::tower) hands that one out.
///
/// Keys are read, in this order, from:
/// 1. the key header, `X-API-Key` unless [`key_header`](Self::key_header) names another;
/// 2. `Authorization: Bearer <key>`, unless turned off with [`bearer`](Self::bearer);
/// 3. a query parameter, only if [`query_param`](Self::query_param) names one. It is off
///    by default, and best left off: URLs end up in access logs, proxy logs, browser
///    history and `Referer` headers, where a key in them leaks.
///
/// The first of those present is the one validated; the key header sent twice is rejected
/// as an invalid key. Before the check, the key header's and `Authorization`'s values are
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
pub struct ApiKeyAuth(apikeys_tower::ApiKeyAuth);

/// Where axum puts the connection's address.
fn connect_info(extensions: &Extensions) -> Option<IpAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

impl ApiKeyAuth {
    /// Keys from `X-API-Key` or `Authorization: Bearer`, validated by `client` with no
    /// product or scope required (until [`requirements`](Self::requirements) says
    /// otherwise), usage tracked and the key's rate limit checked.
    #[must_use]
    pub fn new(client: ApiKeyClient) -> Self {
        Self(apikeys_tower::ApiKeyAuth::new(client).peer_address(connect_info))
    }

    /// This guard as `apikeys-tower`'s, reading the address from `ConnectInfo` still.
    #[must_use]
    pub fn tower(&self) -> &apikeys_tower::ApiKeyAuth {
        &self.0
    }

    /// Reads keys from this header instead of `X-API-Key`.
    #[must_use]
    pub fn key_header(self, name: HeaderName) -> Self {
        Self(self.0.key_header(name))
    }

    /// Whether keys are also read from `Authorization: Bearer` (on by default).
    #[must_use]
    pub fn bearer(self, on: bool) -> Self {
        Self(self.0.bearer(on))
    }

    /// Also reads keys from this query parameter (`?api_key=...`). Off by default: a key in
    /// a URL is written to access logs, proxy logs and browser history, and sent onwards in
    /// `Referer` headers. Turn it on only for clients that cannot set headers.
    #[must_use]
    pub fn query_param(self, name: impl Into<String>) -> Self {
        Self(self.0.query_param(name))
    }

    /// Believes the client address that these proxies forward (see [`TrustedProxies`]) on
    /// requests whose peer is one of them. Off by default: the address is the peer's, and
    /// `X-Forwarded-For` and `Forwarded` are ignored, since any client can send them.
    #[must_use]
    pub fn trusted_proxies(self, proxies: TrustedProxies) -> Self {
        Self(self.0.trusted_proxies(proxies))
    }

    /// The address the request's key is judged by (see [`ApiKeyAuth`]): `None` when the
    /// app was not served with connection info, or a trusted proxy forwarded no address.
    #[must_use]
    pub fn client_ip(&self, parts: &Parts) -> Option<IpAddr> {
        self.0.client_ip(parts)
    }

    /// The realm named in `WWW-Authenticate` (`api` by default).
    ///
    /// # Errors
    /// [`Error::Configuration`] unless the realm is 1 to 64 printable ASCII characters
    /// without `"` or `\`.
    pub fn realm(self, realm: impl Into<String>) -> Result<Self, Error> {
        Ok(Self(self.0.realm(realm)?))
    }

    /// What the [`ValidKey`](crate::ValidKey) extractor requires on routes without a guard
    /// layer or a [`Requirement`](crate::Requirement) of their own (nothing by default).
    #[must_use]
    pub fn requirements(self, options: ValidateOptions) -> Self {
        Self(self.0.requirements(options))
    }

    /// A layer that lets through only requests with a key that passes `options`, and hands
    /// the validated key to the handler (as [`ValidKey`](crate::ValidKey), in the request's
    /// extensions). Guard one route with `.route_layer(..)`, or a whole router with
    /// `.layer(..)`.
    #[must_use]
    pub fn require(&self, options: ValidateOptions) -> RequireKeyLayer {
        self.0.require(options).on_pass(insert_for_axum)
    }

    /// The client keys are validated with.
    #[must_use]
    pub fn client(&self) -> &ApiKeyClient {
        self.0.client()
    }

    /// The error answers (with this guard's realm and key locations), for handlers that
    /// want to answer an [`Error`] the same way.
    #[must_use]
    pub fn errors(&self) -> &ErrorMapper {
        self.0.errors()
    }

    pub(crate) fn defaults(&self) -> &ValidateOptions {
        self.0.defaults()
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
        Ok(self.0.check(parts, options).await?)
    }

    pub(crate) async fn validate(
        &self,
        key: &str,
        client_ip: Option<IpAddr>,
        options: &ValidateOptions,
    ) -> Result<ApiKey, Rejection> {
        Ok(self.0.validate(key, client_ip, options).await?)
    }

    /// The rejection of a request that carries no key.
    pub(crate) fn missing(&self) -> Rejection {
        self.0.missing().into()
    }

    /// The key the request carries, if any (see the order on [`ApiKeyAuth`]), after marking
    /// the headers it may sit in as sensitive.
    ///
    /// # Errors
    /// A 401 [`Rejection`] when the key header is sent more than once, or its value is not
    /// visible ASCII (no key of ours is).
    pub fn find_key(&self, parts: &mut Parts) -> Result<Option<String>, Rejection> {
        Ok(self.0.find_key(parts)?)
    }
}

/// What the axum guard layer puts in a passing request's extensions (instead of the tower
/// layer's types): the key as [`ValidKey`] and this guard, so that extractors and middleware
/// after the layer find them under the axum types (and the layer's guard replaces one an
/// outer `Extension` put there).
fn insert_for_axum(
    auth: &apikeys_tower::ApiKeyAuth,
    key: Arc<ApiKey>,
    extensions: &mut Extensions,
) {
    extensions.insert(ValidKey::<Defaults>::from_layer(key));
    extensions.insert(ApiKeyAuth(auth.clone()));
}

impl From<apikeys_tower::ApiKeyAuth> for ApiKeyAuth {
    /// The tower guard as is: it keeps its own way of finding the connection's address.
    fn from(auth: apikeys_tower::ApiKeyAuth) -> Self {
        Self(auth)
    }
}

/// A request turned away by the guard: its HTTP answer (an RFC 9457 problem, see
/// [`apikeys_http`]) and, unless the request carried no key, the error behind it.
///
/// As a response it logs server-side failures (5xx) at `ERROR` with their source chain,
/// and other rejections at `DEBUG`; neither log holds the key.
#[derive(Debug)]
pub struct Rejection(apikeys_tower::Rejection);

impl Rejection {
    pub(crate) fn new(answer: ErrorResponse, error: Option<Error>) -> Self {
        Self(apikeys_tower::Rejection::new(answer, error))
    }

    /// The error behind the rejection; `None` when the request carried no key.
    #[must_use]
    pub fn error(&self) -> Option<&Error> {
        self.0.error()
    }

    /// The HTTP answer: status, headers and problem body.
    #[must_use]
    pub fn answer(&self) -> &ErrorResponse {
        self.0.answer()
    }
}

impl From<apikeys_tower::Rejection> for Rejection {
    fn from(rejection: apikeys_tower::Rejection) -> Self {
        Self(rejection)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        self.0.log();
        self.0.into_response()
    }
}

/// An [`ErrorResponse`] as an axum response.
#[must_use]
pub fn problem_response(answer: ErrorResponse) -> Response {
    apikeys_tower::problem_response(answer)
}
