//! The guard as a tower layer, in the shape of tower-http's `AsyncRequireAuthorization`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use apikeys_db::ValidateOptions;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::Request;
use tower_http::auth::{AsyncAuthorizeRequest, AsyncRequireAuthorizationLayer};

use crate::auth::ApiKeyAuth;
use crate::extract::{Defaults, ValidKey};

/// The layer [`ApiKeyAuth::require`] builds: tower-http's
/// [`AsyncRequireAuthorizationLayer`] around a [`RequireKey`] check.
pub type RequireKeyLayer = AsyncRequireAuthorizationLayer<RequireKey>;

/// The check a [`RequireKeyLayer`] runs on each request: the key must pass the layer's
/// [`ValidateOptions`]. A request that passes goes on with the validated key in its
/// extensions (as [`ValidKey`], beside the [`ApiKeyAuth`] for later extractors); one that
/// does not is answered with the rejection's problem
/// (401, 403, 429, 503 or 500) and never reaches the inner service.
#[derive(Clone, Debug)]
pub struct RequireKey {
    auth: ApiKeyAuth,
    options: Arc<ValidateOptions>,
}

impl RequireKey {
    pub(crate) fn new(auth: ApiKeyAuth, options: ValidateOptions) -> Self {
        Self { auth, options: Arc::new(options) }
    }
}

impl<B: Send + 'static> AsyncAuthorizeRequest<B> for RequireKey {
    type RequestBody = B;
    type ResponseBody = Body;
    type Future = Pin<Box<dyn Future<Output = Result<Request<B>, Response>> + Send>>;

    fn authorize(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            match this.auth.check(&mut parts, &this.options).await {
                Ok(key) => {
                    parts.extensions.insert(ValidKey::<Defaults>::validated(key));
                    parts.extensions.insert(this.auth.clone());
                    Ok(Request::from_parts(parts, body))
                }
                Err(rejection) => Err(rejection.into_response()),
            }
        })
    }
}
