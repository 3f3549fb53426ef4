//! The guard driven with `tower::ServiceExt::oneshot`, no socket: what the HTTP tests
//! cannot see from outside (and what the crate's types print in `Debug`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apikeys_db::ValidateOptions;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::routing::get;
use http::{HeaderMap, Request, StatusCode};
use tower::ServiceExt;

use apikeys_axum::{ApiKeyAuth, CreatedKey, Requirement, ValidKey};
use apikeys_db::NewKey;
use apikeys_db::core::find_keys;

mod in_memory;
use in_memory::client_and_key;

async fn call(app: Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn the_key_headers_reach_handlers_marked_sensitive() {
    let (client, key) = client_and_key().await;
    let auth = ApiKeyAuth::new(client);
    let app = Router::new()
        .route("/", get(|headers: HeaderMap| async move { format!("{headers:?}") }))
        .route_layer(auth.require(ValidateOptions::new()));
    for (name, value) in [("x-api-key", key.clone()), ("authorization", format!("Bearer {key}"))] {
        let request = Request::get("/").header(name, value).body(Body::empty()).unwrap();
        let (status, debug) = call(app.clone(), request).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!debug.contains(&key), "{debug}");
        assert!(debug.contains("Sensitive"), "{debug}");
    }
}

#[tokio::test]
async fn an_extractor_without_its_guard_is_a_500_not_a_pass() {
    let (_, key) = client_and_key().await;
    let app = Router::new().route("/", get(|k: ValidKey| async move { k.name.clone() }));
    let request = Request::get("/").header("x-api-key", &key).body(Body::empty()).unwrap();
    let (status, body) = call(app, request).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("\"code\":\"internal\""), "{body}");
    assert!(!body.contains(&key));
}

#[tokio::test]
async fn a_guard_layer_rejects_before_the_handler_runs() {
    let (client, key) = client_and_key().await;
    let auth = ApiKeyAuth::new(client);
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = ran.clone();
    let handler = move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            "ran"
        }
    };
    let read = ValidateOptions::new().require_scopes(["read"]).unwrap();
    let app = Router::new().route("/", get(handler)).layer(auth.require(read));
    for request in [
        Request::get("/").body(Body::empty()).unwrap(),
        Request::get("/").header("x-api-key", "sk_nope").body(Body::empty()).unwrap(),
        Request::get("/").header("x-api-key", &key).body(Body::empty()).unwrap(),
    ] {
        let (status, _) = call(app.clone(), request).await;
        assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN);
    }
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_key_header_that_is_not_ascii_is_an_invalid_key() {
    let (client, key) = client_and_key().await;
    let auth = ApiKeyAuth::new(client);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(auth.require(ValidateOptions::new()));
    let mut bytes = key.into_bytes();
    bytes[10] = 0xFF;
    let value = http::HeaderValue::from_bytes(&bytes).unwrap();
    let request = Request::get("/").header("x-api-key", value).body(Body::empty()).unwrap();
    let (status, body) = call(app, request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("\"code\":\"invalid_key\""), "{body}");
}

/// `CreatedKey` (the management API's answer to a key creation) holds the plaintext for its
/// JSON, which is the one place it is shown; its `Debug`, which ends up in logs, shows
/// `[redacted]` and the record (with its hint) instead.
#[tokio::test]
async fn a_created_key_shows_no_key_in_debug() {
    let (client, _) = client_and_key().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("shown once")).await.unwrap();
    let plain = issued.key.expose_secret().to_owned();
    let hint = issued.key.hint();
    let created = CreatedKey { key: plain.clone(), record: issued.record };
    for debug in [format!("{created:?}"), format!("{created:#?}")] {
        assert!(find_keys(debug.as_bytes()).is_empty(), "{debug}");
        assert!(!debug.contains(&plain[hint.len()..]), "{debug}");
        assert!(debug.contains("[redacted]") && debug.contains(hint.as_str()), "{debug}");
        assert!(debug.contains("shown once"), "{debug}");
    }
    // Whatever the string holds, Debug does not show it.
    let odd = CreatedKey { key: "not-key-shaped-secret".to_owned(), ..created };
    assert!(!format!("{odd:?}").contains("not-key-shaped-secret"));
    // The JSON answer still carries the key: that is what it is for.
    assert_eq!(serde_json::to_value(&odd).unwrap()["key"], "not-key-shaped-secret");
}

/// Behind the axum guard layer, the key and the guard are in the request's extensions under
/// the axum types (as before the layer was built on apikeys-tower), for middleware and
/// handlers that read them there.
#[tokio::test]
async fn the_layer_puts_the_key_and_the_guard_in_the_extensions_as_axum_types() {
    let (client, key) = client_and_key().await;
    let auth = ApiKeyAuth::new(client);
    let handler =
        |axum::Extension(key): axum::Extension<ValidKey>,
         axum::Extension(_): axum::Extension<ApiKeyAuth>| async move { key.name.clone() };
    let app =
        Router::new().route("/", get(handler)).route_layer(auth.require(ValidateOptions::new()));
    let request = Request::get("/").header("x-api-key", &key).body(Body::empty()).unwrap();
    let (status, body) = call(app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Any key; the requirement of the typed extractor below.
struct AnyKey;

static NOTHING: std::sync::LazyLock<ValidateOptions> =
    std::sync::LazyLock::new(ValidateOptions::new);

impl<S> Requirement<S> for AnyKey {
    fn options<'a>(_: &'a S, _: &'a ApiKeyAuth) -> &'a ValidateOptions {
        &NOTHING
    }
}

/// A typed extractor on a route whose layer's guard reads keys elsewhere than the guard an
/// outer `Extension` put in: the layer's guard is the one the extractor uses.
#[tokio::test]
async fn the_route_layers_guard_is_the_one_extractors_use() {
    let (client, key) = client_and_key().await;
    let outer = ApiKeyAuth::new(client.clone());
    let partner =
        ApiKeyAuth::new(client).key_header(http::HeaderName::from_static("x-partner-key"));
    let app = Router::new()
        .route("/", get(|k: ValidKey<AnyKey>| async move { k.name.clone() }))
        .route_layer(partner.require(ValidateOptions::new()))
        .layer(axum::Extension(outer));
    let request = Request::get("/").header("x-partner-key", &key).body(Body::empty()).unwrap();
    let (status, body) = call(app, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
