//! The guard as a tower [`Layer`] and [`Service`].

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use apikeys_db::{ApiKey, ValidateOptions};
use http::{Extensions, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::{ApiKeyAuth, Rejection};

/// How a guard answers the requests it rejects, as a response of the service's body type.
///
/// [`Problems`] (the default) answers with the RFC 9457 problem of [`apikeys_http`]; a
/// closure `Fn(Rejection) -> http::Response<B>` answers any other way, a gRPC status say.
/// The rejection is logged (see [`Rejection::log`]) before it is answered.
pub trait Answer<B>: Clone + Send + Sync + 'static {
    /// The response to `rejection`.
    fn answer(&self, rejection: Rejection) -> Response<B>;
}

/// The default [`Answer`]: the rejection's problem (`application/problem+json`), with its
/// status and headers, in any body that can be built from bytes (axum's `Body`,
/// http-body-util's `Full<Bytes>`, ...).
#[derive(Clone, Copy, Debug, Default)]
pub struct Problems;

impl<B: From<Vec<u8>>> Answer<B> for Problems {
    fn answer(&self, rejection: Rejection) -> Response<B> {
        rejection.into_response()
    }
}

impl<B, F> Answer<B> for F
where
    F: Fn(Rejection) -> Response<B> + Clone + Send + Sync + 'static,
{
    fn answer(&self, rejection: Rejection) -> Response<B> {
        self(rejection)
    }
}

/// The key a guard validated, in the request's extensions for the services behind it:
/// derefs to the stored [`ApiKey`] (its ids, name, scopes, custom JSON). Never holds the
/// plaintext. Cheap to clone (one `Arc`).
///
/// ```
/// use apikeys_tower::ValidatedKey;
///
/// fn org_of(request: &http::Request<()>) -> Option<String> {
///     let key = request.extensions().get::<ValidatedKey>()?;
///     Some(key.org_id.to_string())
/// }
/// ```
#[derive(Clone)]
pub struct ValidatedKey(Arc<ApiKey>);

impl ValidatedKey {
    /// The validated key, shared.
    #[must_use]
    pub fn shared(&self) -> &Arc<ApiKey> {
        &self.0
    }

    /// The stored key (a copy only if the request still holds it elsewhere).
    #[must_use]
    pub fn into_inner(self) -> ApiKey {
        Arc::unwrap_or_clone(self.0)
    }
}

impl Deref for ValidatedKey {
    type Target = ApiKey;

    fn deref(&self) -> &ApiKey {
        &self.0
    }
}

impl fmt::Debug for ValidatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValidatedKey").field(&self.0).finish()
    }
}

/// What a guard puts in a passing request's extensions instead of the [`ValidatedKey`] and
/// the [`ApiKeyAuth`]: see [`RequireKeyLayer::on_pass`].
pub type OnPass = fn(&ApiKeyAuth, Arc<ApiKey>, &mut Extensions);

/// The layer [`ApiKeyAuth::require`] builds: each request must carry a key that passes its
/// [`ValidateOptions`]. A request that passes goes on to the inner service with the key in
/// its extensions (as [`ValidatedKey`], beside the [`ApiKeyAuth`]); one that does not is
/// answered by `A` (see [`Answer`]) and never reaches the inner service.
///
/// ```
/// use apikeys_db::ValidateOptions;
/// use apikeys_tower::ApiKeyAuth;
/// use http_body_util::Full;
/// use hyper::body::Bytes;
/// use tower_layer::Layer;
///
/// # async fn demo(auth: ApiKeyAuth) -> apikeys_db::Result<()> {
/// async fn hello(_: http::Request<hyper::body::Incoming>)
///     -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
///     Ok(http::Response::new(Full::from("hello")))
/// }
/// let read = ValidateOptions::new().require_scopes(["hello:read"])?;
/// let service = auth.require(read).layer(tower::service_fn(hello));
/// # let _ = service; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RequireKeyLayer<A = Problems> {
    auth: ApiKeyAuth,
    options: Arc<ValidateOptions>,
    answer: A,
    on_pass: Option<OnPass>,
}

impl RequireKeyLayer {
    /// A guard of `auth` requiring `options`, answering rejections with their problem.
    #[must_use]
    pub fn new(auth: ApiKeyAuth, options: ValidateOptions) -> Self {
        Self { auth, options: Arc::new(options), answer: Problems, on_pass: None }
    }
}

impl<A> RequireKeyLayer<A> {
    /// The same guard, answering rejections with `answer` instead.
    #[must_use]
    pub fn answer_with<B>(self, answer: B) -> RequireKeyLayer<B> {
        let Self { auth, options, on_pass, .. } = self;
        RequireKeyLayer { auth, options, answer, on_pass }
    }

    /// The same guard, calling `insert` on each passing request instead of putting the
    /// [`ValidatedKey`] and the [`ApiKeyAuth`] in its extensions: to put them there under
    /// types of the host's or framework's own (as `apikeys-axum` does for its `ValidKey`),
    /// without the cost of both.
    #[must_use]
    pub fn on_pass(self, insert: OnPass) -> Self {
        Self { on_pass: Some(insert), ..self }
    }
}

impl<A> fmt::Debug for RequireKeyLayer<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireKeyLayer")
            .field("auth", &self.auth)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<S, A: Clone> Layer<S> for RequireKeyLayer<A> {
    type Service = RequireKey<S, A>;

    fn layer(&self, inner: S) -> RequireKey<S, A> {
        RequireKey {
            inner,
            auth: self.auth.clone(),
            options: Arc::clone(&self.options),
            answer: self.answer.clone(),
            on_pass: self.on_pass,
        }
    }
}

/// The service a [`RequireKeyLayer`] wraps around `S`.
#[derive(Clone)]
pub struct RequireKey<S, A = Problems> {
    inner: S,
    auth: ApiKeyAuth,
    options: Arc<ValidateOptions>,
    answer: A,
    on_pass: Option<OnPass>,
}

impl<S: fmt::Debug, A> fmt::Debug for RequireKey<S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireKey")
            .field("inner", &self.inner)
            .field("auth", &self.auth)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, A, ReqBody, ResBody> Service<Request<ReqBody>> for RequireKey<S, A>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    A: Answer<ResBody>,
    ReqBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service polled ready is the one to call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let options = Arc::clone(&self.options);
        let answer = self.answer.clone();
        let on_pass = self.on_pass;
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            match auth.check(&mut parts, &options).await {
                Ok(key) => {
                    let key = Arc::new(key);
                    match on_pass {
                        Some(insert) => insert(&auth, key, &mut parts.extensions),
                        None => {
                            parts.extensions.insert(ValidatedKey(key));
                            parts.extensions.insert(auth);
                        }
                    }
                    inner.call(Request::from_parts(parts, body)).await
                }
                Err(rejection) => {
                    rejection.log();
                    Ok(answer.answer(rejection))
                }
            }
        })
    }
}
