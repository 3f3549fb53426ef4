//! The guard as a tower layer: `apikeys-tower`'s.

/// The layer [`ApiKeyAuth::require`](crate::ApiKeyAuth::require) builds: `apikeys-tower`'s,
/// answering rejections with their problem. A request that passes goes on with the
/// validated key in its extensions (the [`ValidKey`](crate::ValidKey) extractor finds it
/// there); one that does not is answered with the rejection's problem (401, 403, 429, 503
/// or 500) and never reaches the inner service.
pub type RequireKeyLayer = apikeys_tower::RequireKeyLayer;

/// The service a [`RequireKeyLayer`] wraps around a route.
pub type RequireKey<S> = apikeys_tower::RequireKey<S>;
