//! What the guard logs. Alone in its binary: tracing caches which call sites are enabled,
//! and tests running beside it without a subscriber would race that cache.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use apikeys_axum::ApiKeyAuth;
use apikeys_db::ValidateOptions;

mod in_memory;
use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode};
use in_memory::client_and_key;
use tower::ServiceExt;

/// Log lines written by the test's subscriber.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn server_failures_are_logged_at_error_and_rejections_at_debug_without_the_key() {
    use apikeys_db::sea_orm::ConnectionTrait;
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (client, key) = client_and_key().await;
    let auth = ApiKeyAuth::new(client.clone());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(auth.require(ValidateOptions::new()));
    let with = |key: &str| Request::get("/").header("x-api-key", key).body(Body::empty()).unwrap();

    let mut wrong = key.clone();
    wrong.pop();
    let status =
        |request: Request<Body>| async { app.clone().oneshot(request).await.unwrap().status() };
    assert_eq!(status(with(&wrong)).await, StatusCode::UNAUTHORIZED);
    client.connection().execute_unprepared("ALTER TABLE api_keys RENAME TO gone").await.unwrap();
    assert_eq!(status(with(&key)).await, StatusCode::INTERNAL_SERVER_ERROR);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let rejected = text.lines().find(|l| l.contains("api key rejected")).expect(&text);
    assert!(rejected.contains("DEBUG") && rejected.contains("InvalidKey"), "{rejected}");
    let failed = text.lines().find(|l| l.contains("api key check failed")).expect(&text);
    assert!(failed.contains("ERROR") && failed.contains("status=500"), "{failed}");
    assert!(failed.contains("api_keys"), "the cause is logged: {failed}");
    assert!(!text.contains(&key) && !text.contains(&wrong), "a key reached the logs: {text}");
}
