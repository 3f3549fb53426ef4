//! The validated key as a handler argument.

use std::any::TypeId;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use apikeys_db::{ApiKey, ValidateOptions};
use apikeys_tower::ValidatedKey;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;

use crate::auth::{ApiKeyAuth, Rejection};

/// The requirements of a route, named by a type, for [`ValidKey<R>`]: the key must pass
/// these [`ValidateOptions`]. Build the options once (at start-up, after bootstrap, when the
/// product ids are known), keep them in the router's state, and return them from there.
///
/// ```
/// use std::sync::Arc;
/// use apikeys_axum::{ApiKeyAuth, Requirement, ValidKey};
/// use apikeys_db::ValidateOptions;
///
/// #[derive(Clone)]
/// struct AppState {
///     write_widgets: Arc<ValidateOptions>,
/// }
///
/// /// The key must hold `widgets:write`.
/// struct WriteWidgets;
///
/// impl Requirement<AppState> for WriteWidgets {
///     fn options<'a>(state: &'a AppState, _: &'a ApiKeyAuth) -> &'a ValidateOptions {
///         &state.write_widgets
///     }
/// }
///
/// async fn create_widget(key: ValidKey<WriteWidgets>) -> String {
///     format!("created by key {}", key.id)
/// }
///
/// # fn demo(auth: ApiKeyAuth) -> apikeys_db::Result<()> {
/// let state = AppState {
///     write_widgets: Arc::new(ValidateOptions::new().require_scopes(["widgets:write"])?),
/// };
/// let app: axum::Router = axum::Router::new()
///     .route("/widgets", axum::routing::post(create_widget))
///     .layer(axum::Extension(auth))
///     .with_state(state);
/// # Ok(()) }
/// ```
pub trait Requirement<S>: Send + Sync + 'static {
    /// The options the key must pass, from the router's state or the guard.
    fn options<'a>(state: &'a S, auth: &'a ApiKeyAuth) -> &'a ValidateOptions;
}

/// The requirement of a plain [`ValidKey`]: the one of the route's guard layer if it has
/// one, otherwise the guard's defaults ([`ApiKeyAuth::requirements`]).
#[derive(Debug)]
pub enum Defaults {}

impl<S> Requirement<S> for Defaults {
    fn options<'a>(_: &'a S, auth: &'a ApiKeyAuth) -> &'a ValidateOptions {
        auth.defaults()
    }
}

/// A key that passed validation, as a handler argument: derefs to the stored [`ApiKey`]
/// (its ids, name, scopes, custom JSON). Never holds the plaintext.
///
/// - `ValidKey` on a route behind a [`RequireKeyLayer`](crate::RequireKeyLayer) is the key
///   the layer validated (no second check). On a route without one, it validates the key
///   itself against the guard's defaults, also when a `ValidKey<R>` of the same handler
///   validated it first: `R`'s check never stands for the defaults' (that second check
///   counts no use, no request against the rate limit and no credit).
/// - `ValidKey<R>` validates against the route's [`Requirement`] `R`. Behind a guard layer
///   that already validated (and counted) the request, the second check counts neither a
///   use nor a request against the rate limit.
/// - `Option<ValidKey<R>>`, for routes where a key is optional: `None` when the request
///   carries no key, but a request with a bad key is still rejected (never served as
///   anonymous).
///
/// A rejected request gets the [`Rejection`]'s answer: 401, 403, 429, 503 or 500, with an
/// RFC 9457 problem body.
///
/// The extractor finds its [`ApiKeyAuth`] in the request's extensions, where a guard layer
/// puts it; on routes without one, add it with `.layer(axum::Extension(auth))`. Without
/// it, the request is answered 500 and the mistake logged at `ERROR`, the way axum-login's
/// session extractor reports a missing layer.
pub struct ValidKey<R = Defaults> {
    /// Shared, so that handing it on (extensions, later extractors) copies no metadata.
    key: Arc<ApiKey>,
    /// The requirement the key was validated against: `None` for a guard layer's (which
    /// stands for [`Defaults`] on its routes), else the [`Requirement`]'s type.
    by: Option<TypeId>,
    _requirement: PhantomData<fn() -> R>,
}

impl<R> ValidKey<R> {
    /// The key a guard layer validated (which stands for [`Defaults`] on its routes).
    pub(crate) fn from_layer(key: Arc<ApiKey>) -> Self {
        Self { key, by: None, _requirement: PhantomData }
    }

    /// The stored key (a copy only if the request still holds it elsewhere).
    #[must_use]
    pub fn into_inner(self) -> ApiKey {
        Arc::unwrap_or_clone(self.key)
    }
}

impl<R> Deref for ValidKey<R> {
    type Target = ApiKey;

    fn deref(&self) -> &ApiKey {
        &self.key
    }
}

impl<R> Clone for ValidKey<R> {
    fn clone(&self) -> Self {
        Self { key: self.key.clone(), by: self.by, _requirement: PhantomData }
    }
}

impl<R> fmt::Debug for ValidKey<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValidKey").field(&self.key).finish()
    }
}

impl<S, R> FromRequestParts<S> for ValidKey<R>
where
    S: Send + Sync,
    R: Requirement<S>,
{
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Rejection> {
        let auth = auth_of(parts)?;
        match extract::<S, R>(&auth, parts, state).await? {
            Some(key) => Ok(key),
            None => Err(auth.missing()),
        }
    }
}

impl<S, R> OptionalFromRequestParts<S> for ValidKey<R>
where
    S: Send + Sync,
    R: Requirement<S>,
{
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, Rejection> {
        extract::<S, R>(&auth_of(parts)?, parts, state).await
    }
}

/// The guard of the request: put in its extensions by a guard layer or `Extension(auth)`
/// (or, as `apikeys-tower`'s, by a tower guard layer used directly).
fn auth_of(parts: &Parts) -> Result<ApiKeyAuth, Rejection> {
    let found = parts.extensions.get::<ApiKeyAuth>().cloned().or_else(|| {
        parts.extensions.get::<apikeys_tower::ApiKeyAuth>().cloned().map(ApiKeyAuth::from)
    });
    found.ok_or_else(|| {
        let error = apikeys_db::Error::configuration(
            "ValidKey needs an ApiKeyAuth in the request extensions: guard the route with \
             ApiKeyAuth::require, or add .layer(axum::Extension(auth))",
        );
        Rejection::new(apikeys_http::error_response(&error), Some(error))
    })
}

/// The key of the request validated against `R`, reusing a validation of this request
/// against the same requirement (by an earlier extractor of `R`, or, for [`Defaults`], by
/// a guard layer); `None` if the request carries no key. A validation against another
/// requirement is not reused: `R` is checked again, without counting the request again.
async fn extract<S, R: Requirement<S>>(
    auth: &ApiKeyAuth,
    parts: &mut Parts,
    state: &S,
) -> Result<Option<ValidKey<R>>, Rejection> {
    let requirement = TypeId::of::<R>();
    // An earlier validation: an extractor's or the axum layer's, else a plain tower layer's.
    let earlier =
        parts.extensions.get::<ValidKey>().map(|v| (v.key.clone(), v.by)).or_else(|| {
            parts.extensions.get::<ValidatedKey>().map(|v| (Arc::clone(v.shared()), None))
        });
    let counted = match earlier {
        Some((key, by)) if satisfies(by, requirement) => {
            return Ok(Some(ValidKey { key, by, _requirement: PhantomData }));
        }
        earlier => earlier.is_some(),
    };
    let Some(presented) = auth.find_key(parts)? else { return Ok(None) };
    let key = if counted {
        // Counted once already: check R's requirements without counting again.
        let options = R::options(state, auth)
            .clone()
            .track_usage(false)
            .check_rate_limit(false)
            .credit_cost(0);
        Arc::new(auth.validate(&presented, auth.client_ip(parts), &options).await?)
    } else {
        let client_ip = auth.client_ip(parts);
        let key = Arc::new(auth.validate(&presented, client_ip, R::options(state, auth)).await?);
        let by = Some(requirement);
        parts.extensions.insert(ValidKey::<Defaults> {
            key: Arc::clone(&key),
            by,
            _requirement: PhantomData,
        });
        key
    };
    Ok(Some(ValidKey { key, by: Some(requirement), _requirement: PhantomData }))
}

/// Whether a validation against `by` (`None`: a guard layer's) is one against
/// `requirement`: the same requirement, or a layer's for a plain [`ValidKey`] (on a layer's
/// routes, the layer's options are the defaults). A validation against another
/// [`Requirement`] never is, whatever it checked: nothing relates `R`'s options to the
/// guard's defaults.
fn satisfies(by: Option<TypeId>, requirement: TypeId) -> bool {
    match by {
        Some(by) => by == requirement,
        None => requirement == TypeId::of::<Defaults>(),
    }
}
