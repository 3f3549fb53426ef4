//! The guard's configuration: where keys are read from, how a request's address is found,
//! how rejections are answered, and the check itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use apikeys_db::{ApiKey, ApiKeyClient, Error, ValidateOptions};
use apikeys_http::{ErrorMapper, ErrorResponse, TrustedProxies};
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{Extensions, HeaderMap, HeaderName};

use crate::layer::RequireKeyLayer;

/// Finds the address of the connection a request came on, in the request's extensions,
/// where the server put it: see [`ApiKeyAuth::peer_address`].
pub type PeerAddress = fn(&Extensions) -> Option<IpAddr>;

/// What guards services: the client, where keys are read from, how the connection's address
/// is found, the default requirements and the answers to rejected requests. Cheap to clone
/// (one `Arc`).
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
/// marked sensitive, so that the `Debug` output of services and of layers inside the guard
/// leaves them out. A trace layer outside the guard sees the request before that: if it logs
/// headers, put tower-http's `SetSensitiveRequestHeadersLayer` outermost.
///
/// A key with an IP allowlist is judged by the request's address: the connection's peer,
/// which [`peer_address`](Self::peer_address) finds in the request's extensions (a
/// [`SocketAddr`] there by default; servers put it under their own types, so tell the guard
/// which), or, behind a load balancer, what it forwarded, once
/// [`trusted_proxies`](Self::trusted_proxies) says which proxies to believe. Without an
/// address such keys are refused (403).
///
/// ```
/// use apikeys_tower::ApiKeyAuth;
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
    peer: PeerAddress,
}

/// The default [`PeerAddress`]: a [`SocketAddr`] in the extensions.
fn socket_addr(extensions: &Extensions) -> Option<IpAddr> {
    extensions.get::<SocketAddr>().map(SocketAddr::ip)
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
                peer: socket_addr,
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

    /// Where the connection's address is in a request's extensions. By default a
    /// [`SocketAddr`], which a hyper server does not insert by itself: insert the
    /// connection's peer address in each request (see the guide's tower chapter). tonic puts a
    /// `TcpConnectInfo` there (`TlsConnectInfo<TcpConnectInfo>` with TLS), axum a
    /// `ConnectInfo<SocketAddr>` (which `apikeys-axum`'s guard reads):
    ///
    /// ```
    /// # fn demo(auth: apikeys_tower::ApiKeyAuth) {
    /// #[derive(Clone)]
    /// struct Peer(std::net::SocketAddr);
    /// let auth = auth.peer_address(|extensions| extensions.get::<Peer>().map(|p| p.0.ip()));
    /// # }
    /// ```
    #[must_use]
    pub fn peer_address(self, find: PeerAddress) -> Self {
        self.edit(|i| i.peer = find)
    }

    /// The query parameter keys are also read from, if [`query_param`](Self::query_param)
    /// named one.
    #[must_use]
    pub fn query_param_name(&self) -> Option<&str> {
        self.inner.query_param.as_deref()
    }

    /// The proxies whose forwarded address is believed, if
    /// [`trusted_proxies`](Self::trusted_proxies) named any.
    #[must_use]
    pub fn proxies(&self) -> Option<&TrustedProxies> {
        self.inner.proxies.as_ref()
    }

    /// The address the request's key is judged by (see [`ApiKeyAuth`]): `None` when the
    /// server put no connection address where [`peer_address`](Self::peer_address) looks,
    /// or a trusted proxy forwarded no address.
    #[must_use]
    pub fn client_ip(&self, parts: &Parts) -> Option<IpAddr> {
        self.client_ip_of(&parts.extensions, &parts.headers)
    }

    fn client_ip_of(&self, extensions: &Extensions, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = (self.inner.peer)(extensions);
        apikeys_http::client_ip(peer, headers, self.inner.proxies.as_ref())
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

    /// What a check without options of its own requires (nothing by default): the
    /// framework extractors built on this guard (`apikeys-axum`'s `ValidKey`) use it on
    /// routes without a guard layer.
    #[must_use]
    pub fn requirements(self, options: ValidateOptions) -> Self {
        self.edit(|i| i.defaults = options)
    }

    /// The options set by [`requirements`](Self::requirements).
    #[must_use]
    pub fn defaults(&self) -> &ValidateOptions {
        &self.inner.defaults
    }

    /// A layer that lets through only requests with a key that passes `options`, and hands
    /// the validated key on in the request's extensions (as a
    /// [`ValidatedKey`](crate::ValidatedKey), beside this guard). Rejected requests are
    /// answered with an RFC 9457 problem unless
    /// [`RequireKeyLayer::answer_with`] says otherwise.
    #[must_use]
    pub fn require(&self, options: ValidateOptions) -> RequireKeyLayer {
        RequireKeyLayer::new(self.clone(), options)
    }

    /// The client keys are validated with.
    #[must_use]
    pub fn client(&self) -> &ApiKeyClient {
        &self.inner.client
    }

    /// The error answers (with this guard's realm and key locations), for services that
    /// want to answer an [`Error`] the same way.
    #[must_use]
    pub fn errors(&self) -> &ErrorMapper {
        &self.inner.mapper
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

    /// Validates a key already read from a request (see
    /// [`find_key`](Self::find_key)) from `client_ip` against `options`.
    ///
    /// # Errors
    /// The [`Error`] of `validate_key`, as a [`Rejection`] with its answer.
    pub async fn validate(
        &self,
        key: &str,
        client_ip: Option<IpAddr>,
        options: &ValidateOptions,
    ) -> Result<ApiKey, Rejection> {
        let check = self.inner.client.validate_key_from(key, client_ip, options);
        check.await.map_err(|e| self.reject(e))
    }

    /// The rejection of a request that carries no key: 401 with the challenge.
    #[must_use]
    pub fn missing(&self) -> Rejection {
        Rejection::new(self.inner.mapper.missing_key(), None)
    }

    /// The rejection of `error`, with this guard's answer to it.
    #[must_use]
    pub fn reject(&self, error: Error) -> Rejection {
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
        let sent = parts.headers.get_all(key_header).into_iter().map(|v| v.as_bytes());
        let authorization = parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes());
        let query = inner.query_param.as_deref().zip(parts.uri.query());
        match inner.mapper.presented_key(sent, authorization, query) {
            Ok(key) => Ok(key.map(|k| k.into_owned())),
            Err(error) => Err(self.reject(error)),
        }
    }
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
#[derive(Debug)]
pub struct Rejection(Box<(ErrorResponse, Option<Error>)>);

impl Rejection {
    /// A rejection answered with `answer`, for `error` (`None`: the request carried no key).
    #[must_use]
    pub fn new(answer: ErrorResponse, error: Option<Error>) -> Self {
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

    /// The answer and the error.
    #[must_use]
    pub fn into_parts(self) -> (ErrorResponse, Option<Error>) {
        *self.0
    }

    /// Logs the rejection as the guards do before answering it: a server-side failure (5xx)
    /// at `ERROR` with its source chain, any other at `DEBUG`. Neither log holds the key.
    pub fn log(&self) {
        let status = self.answer().status;
        match self.error() {
            Some(error) if status.is_server_error() => {
                tracing::error!(error = error as &dyn std::error::Error, %status, "api key check failed");
            }
            _ => tracing::debug!(code = ?self.answer().problem.code, %status, "api key rejected"),
        }
    }

    /// The answer as an HTTP response: status, headers and the problem as its body.
    #[must_use]
    pub fn into_response<B: From<Vec<u8>>>(self) -> http::Response<B> {
        problem_response(self.into_parts().0)
    }
}

/// An [`ErrorResponse`] as an HTTP response of any body type that can hold bytes.
#[must_use]
pub fn problem_response<B: From<Vec<u8>>>(answer: ErrorResponse) -> http::Response<B> {
    let mut response = http::Response::new(B::from(answer.body()));
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers;
    response
}
