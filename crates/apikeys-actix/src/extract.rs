//! The validated key as a handler argument.

use std::fmt;
use std::future::{Ready, ready};
use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use apikeys_db::ApiKey;
use apikeys_http::ErrorResponse;
use apikeys_tower::ApiKeyAuth;
use futures_util::future::{Either, LocalBoxFuture};
use tokio::sync::OnceCell;

use crate::{Rejection, check};

/// A key that passed validation, as a handler argument: derefs to the stored [`ApiKey`]
/// (its ids, name, scopes, custom JSON). Never holds the plaintext.
///
/// Behind a [`RequireKey`](crate::RequireKey) middleware it is the key the middleware
/// validated (no second check). Elsewhere it validates the request's key against the
/// guard's defaults ([`ApiKeyAuth::requirements`]), once per request however many extract
/// it (the request is counted once); the guard is found in the app data (`.app_data(auth)`
/// or `web::Data<ApiKeyAuth>`).
/// Without one, the request is answered 500 and the mistake logged at `ERROR`.
#[derive(Clone)]
pub struct ValidKey(Arc<ApiKey>);

impl ValidKey {
    pub(crate) fn new(key: ApiKey) -> Self {
        Self(Arc::new(key))
    }

    /// The stored key (a copy only if the request still holds it elsewhere).
    #[must_use]
    pub fn into_inner(self) -> ApiKey {
        Arc::unwrap_or_clone(self.0)
    }
}

impl Deref for ValidKey {
    type Target = ApiKey;

    fn deref(&self) -> &ApiKey {
        &self.0
    }
}

impl fmt::Debug for ValidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValidKey").field(&self.0).finish()
    }
}

impl FromRequest for ValidKey {
    type Error = Rejection;
    type Future =
        Either<Ready<Result<Self, Rejection>>, LocalBoxFuture<'static, Result<Self, Rejection>>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        if let Some(key) = request.extensions().get::<ValidKey>() {
            return Either::Left(ready(Ok(key.clone())));
        }
        let shared = Shared::of(request);
        let request = request.clone();
        Either::Right(Box::pin(async move {
            let auth = auth_of(&request)?;
            match shared.extract(&auth, &request).await? {
                Some(key) => Ok(key),
                None => Err(auth.missing().into()),
            }
        }))
    }
}

/// A key where one is optional: `None` when the request carries no key, but a request with
/// a bad key is still rejected (never served as anonymous). Otherwise as [`ValidKey`].
#[derive(Clone, Debug)]
pub struct MaybeKey(pub Option<ValidKey>);

impl FromRequest for MaybeKey {
    type Error = Rejection;
    type Future = LocalBoxFuture<'static, Result<Self, Rejection>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        if let Some(key) = request.extensions().get::<ValidKey>() {
            return Box::pin(ready(Ok(Self(Some(key.clone())))));
        }
        let shared = Shared::of(request);
        let request = request.clone();
        Box::pin(async move {
            let auth = auth_of(&request)?;
            Ok(Self(shared.extract(&auth, &request).await?))
        })
    }
}

/// The guard: put in the extensions by the middleware, or in the app data by the host.
fn auth_of(request: &HttpRequest) -> Result<ApiKeyAuth, Rejection> {
    let found = request
        .extensions()
        .get::<ApiKeyAuth>()
        .cloned()
        .or_else(|| request.app_data::<ApiKeyAuth>().cloned())
        .or_else(|| request.app_data::<web::Data<ApiKeyAuth>>().map(|d| ApiKeyAuth::clone(d)));
    found.ok_or_else(|| {
        let error = apikeys_db::Error::configuration(
            "ValidKey needs an ApiKeyAuth: wrap the route in RequireKey, or add it with \
             .app_data(auth)",
        );
        Rejection(apikeys_tower::Rejection::new(apikeys_http::error_response(&error), Some(error)))
    })
}

/// The one validation of a request's key against the guard's defaults, shared by every
/// extractor of the request. actix creates all of a handler's extractors before it polls
/// any, so the first to run validates and the others wait for its outcome: the request is
/// counted once (one use, one rate-limit request, one charge of credits).
#[derive(Clone)]
struct Shared(Rc<OnceCell<Result<Option<ValidKey>, ErrorResponse>>>);

impl Shared {
    /// The request's validation, put in its extensions by the first extractor.
    fn of(request: &HttpRequest) -> Self {
        let mut extensions = request.extensions_mut();
        match extensions.get::<Shared>() {
            Some(shared) => shared.clone(),
            None => {
                let shared = Self(Rc::new(OnceCell::new()));
                extensions.insert(shared.clone());
                shared
            }
        }
    }

    /// The request's key validated against the guard's defaults; `None` if the request
    /// carries no key. The extractor that ran the check gets its rejection whole (with the
    /// error, which it logs); the others get the same answer.
    async fn extract(
        &self,
        auth: &ApiKeyAuth,
        request: &HttpRequest,
    ) -> Result<Option<ValidKey>, Rejection> {
        let mut mine = None;
        let outcome = self
            .0
            .get_or_init(|| async {
                match check(auth, request, auth.defaults()).await {
                    Ok(key) => Ok(key.map(ValidKey::new)),
                    Err(rejection) => {
                        let answer = rejection.answer().clone();
                        mine = Some(rejection);
                        Err(answer)
                    }
                }
            })
            .await;
        if let Some(rejection) = mine {
            return Err(rejection);
        }
        match outcome {
            Ok(Some(key)) => {
                request.extensions_mut().insert(key.clone());
                Ok(Some(key.clone()))
            }
            // No key where that guard looks, so nothing was counted: this extractor's guard
            // (another scope's, say) may look elsewhere.
            Ok(None) => match check(auth, request, auth.defaults()).await? {
                Some(key) => {
                    let key = ValidKey::new(key);
                    request.extensions_mut().insert(key.clone());
                    Ok(Some(key))
                }
                None => Ok(None),
            },
            Err(answer) => Err(Rejection(apikeys_tower::Rejection::new(answer.clone(), None))),
        }
    }
}
