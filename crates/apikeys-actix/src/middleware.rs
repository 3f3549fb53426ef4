//! The guard as actix-web middleware.

use std::future::{Ready, ready};
use std::rc::Rc;
use std::sync::Arc;

use actix_web::HttpMessage;
use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use apikeys_db::ValidateOptions;
use apikeys_tower::ApiKeyAuth;
use futures_util::future::LocalBoxFuture;

use actix_web::http::header::{AUTHORIZATION, HeaderName};

use crate::extract::ValidKey;
use crate::{ResponseError as _, check};

/// The middleware: each request must carry a key that passes its [`ValidateOptions`]. A
/// request that passes reaches the handler with the key in its extensions (the
/// [`ValidKey`] extractor finds it there, and the [`ApiKeyAuth`] beside it); one that does
/// not is answered with the rejection's problem (401, 403, 429, 503 or 500) and never
/// reaches the handler.
///
/// Before the check, the key header's and `Authorization`'s values are marked sensitive, so
/// that the `Debug` output of the request in handlers leaves them out.
///
/// Each guard a request passes checks and counts it (a use, a request against the rate
/// limit, its credit cost), as tower's and axum's guard layers do: nested guards (an
/// app-wide one and a stricter one on a resource) count a request once per guard, so guard
/// each route once, with its whole requirement.
#[derive(Clone, Debug)]
pub struct RequireKey {
    auth: ApiKeyAuth,
    options: Arc<ValidateOptions>,
}

impl RequireKey {
    /// A guard of `auth` requiring `options`.
    #[must_use]
    pub fn new(auth: ApiKeyAuth, options: ValidateOptions) -> Self {
        Self { auth, options: Arc::new(options) }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RequireKey
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = RequireKeyMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequireKeyMiddleware { service: Rc::new(service), guard: self.clone() }))
    }
}

/// The service [`RequireKey`] wraps around the inner one.
#[derive(Debug)]
pub struct RequireKeyMiddleware<S> {
    service: Rc<S>,
    guard: RequireKey,
}

impl<S, B> Service<ServiceRequest> for RequireKeyMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, request: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        let RequireKey { auth, options } = self.guard.clone();
        let mut request = request;
        mark_sensitive(&auth, &mut request);
        Box::pin(async move {
            let checked = match check(&auth, request.request(), &options).await {
                Ok(Some(key)) => Ok(key),
                Ok(None) => Err(crate::Rejection::from(auth.missing())),
                Err(rejection) => Err(rejection),
            };
            match checked {
                Ok(key) => {
                    request.extensions_mut().insert(ValidKey::new(key));
                    request.extensions_mut().insert(auth);
                    Ok(service.call(request).await?.map_into_left_body())
                }
                Err(rejection) => {
                    let response = rejection.error_response();
                    Ok(request.into_response(response).map_into_right_body())
                }
            }
        })
    }
}

/// Marks the values of the key header and of `Authorization` sensitive.
fn mark_sensitive(auth: &ApiKeyAuth, request: &mut ServiceRequest) {
    let key_header = HeaderName::from_bytes(auth.errors().key_header().as_str().as_bytes());
    let headers = request.headers_mut();
    for name in key_header.into_iter().chain([AUTHORIZATION]) {
        let values: Vec<_> = headers.get_all(&name).cloned().collect();
        if values.is_empty() {
            continue;
        }
        headers.remove(&name);
        for mut value in values {
            value.set_sensitive(true);
            headers.append(name.clone(), value);
        }
    }
}
