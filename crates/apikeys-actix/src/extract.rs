//! The validated key as a handler argument.

use std::fmt;
use std::future::{Ready, ready};
use std::ops::Deref;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use apikeys_db::ApiKey;
use apikeys_tower::ApiKeyAuth;
use futures_util::future::{Either, LocalBoxFuture};

use crate::{Rejection, check};

/// A key that passed validation, as a handler argument: derefs to the stored [`ApiKey`]
/// (its ids, name, scopes, custom JSON). Never holds the plaintext.
///
/// Behind a [`RequireKey`](crate::RequireKey) middleware it is the key the middleware
/// validated (no second check). Elsewhere it validates the request's key against the
/// guard's defaults ([`ApiKeyAuth::requirements`]), once per request however many extract
/// it; the guard is found in the app data (`.app_data(auth)` or `web::Data<ApiKeyAuth>`).
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
        let request = request.clone();
        Either::Right(Box::pin(async move {
            let auth = auth_of(&request)?;
            match extract(&auth, &request).await? {
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
        let request = request.clone();
        Box::pin(async move {
            if let Some(key) = request.extensions().get::<ValidKey>() {
                return Ok(Self(Some(key.clone())));
            }
            let auth = auth_of(&request)?;
            Ok(Self(extract(&auth, &request).await?))
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

/// The request's key validated against the guard's defaults, kept in the extensions so that
/// later extractors of the same request reuse it; `None` if the request carries no key.
async fn extract(auth: &ApiKeyAuth, request: &HttpRequest) -> Result<Option<ValidKey>, Rejection> {
    let Some(key) = check(auth, request, auth.defaults()).await? else { return Ok(None) };
    let key = ValidKey::new(key);
    request.extensions_mut().insert(key.clone());
    Ok(Some(key))
}
