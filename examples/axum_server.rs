//! A small axum service guarded by API keys: a route any valid key may call, routes that
//! need a scope, and the management API behind an admin token.
//!
//! `cargo run --example axum_server` serves on 127.0.0.1:3000 (`BIND` to change) with a
//! SQLite file in the working directory (`DATABASE_URL` for another database; compile
//! PostgreSQL or MySQL in with `--features postgres` or `mysql`). It reads
//! `APIKEYS_SIGNING_SECRET` and `APIKEYS_ENVIRONMENT`, the settings the README's CLI block
//! exports, so keys made by `apikeys keys create` on the same database work here. The admin
//! token is `ADMIN_TOKEN`, or a random one printed at start. The guide's "HTTP guards"
//! chapter (docs/src/guards.md, "Try it") has curl lines for every route.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;

use apikeys_axum::{ApiKeyAuth, ManagementApi, ValidKey};
use apikeys_db::{ApiKeyClient, ValidateOptions};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// Any valid key.
async fn hello(key: ValidKey) -> Json<Value> {
    Json(json!({ "hello": key.name, "key_id": key.id, "custom": key.custom }))
}

/// Needs `widgets:read`.
async fn list_widgets(key: ValidKey) -> Json<Value> {
    Json(json!({ "widgets": ["sprocket", "gear"], "for": key.name }))
}

/// Needs `widgets:write`.
async fn create_widget(key: ValidKey) -> (axum::http::StatusCode, Json<Value>) {
    (axum::http::StatusCode::CREATED, Json(json!({ "created": "widget", "by": key.id })))
}

/// Works with or without a key; a bad key is still refused.
async fn status(key: Option<ValidKey>) -> Json<Value> {
    Json(json!({ "ok": true, "caller": key.map(|k| k.name.clone()) }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://apikeys-axum-example.db".to_owned());
    // In production, read the secret from your secret store (32+ random bytes).
    let secret = std::env::var("APIKEYS_SIGNING_SECRET")
        .unwrap_or_else(|_| "example-signing-secret-change-me-0123456789".to_owned());
    let admin_token = match std::env::var("ADMIN_TOKEN") {
        Ok(token) if token.len() >= 16 => token,
        Ok(_) => return Err("ADMIN_TOKEN must be at least 16 characters".into()),
        Err(_) => {
            let token = uuid::Uuid::new_v4().simple().to_string();
            println!("admin token (set ADMIN_TOKEN to choose one): {token}");
            token
        }
    };
    let mut builder = ApiKeyClient::builder().database_url(&url).signing_secret(secret);
    // The key format the README's CLI block sets (APIKEYS_ENVIRONMENT=live): keys made by
    // `apikeys keys create` with the same DATABASE_URL, secret and environment work here.
    if let Ok(environment) = std::env::var("APIKEYS_ENVIRONMENT") {
        builder = builder.environment(environment);
    }
    let client = builder.build().await?;
    client.create_tables().await?;
    // Deploy-time bootstrap: idempotent.
    let (org, _) = client.get_or_create_organization("acme").await?;
    println!("organization acme: {}", org.id);

    let auth = ApiKeyAuth::new(client.clone());
    let read = ValidateOptions::new().require_scopes(["widgets:read"])?;
    let write = ValidateOptions::new().require_scopes(["widgets:write"])?;
    let admin_token = Arc::new(admin_token);
    let admin = ManagementApi::new(client.clone())
        .openapi_at("/openapi.json")
        .nested_at("/admin")
        .authorized_by_fn(move |parts| {
            let sent = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
            let expected = format!("Bearer {admin_token}");
            sent.is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(expected.as_bytes())))
        });

    let app = Router::new()
        .route("/hello", get(hello).route_layer(auth.require(ValidateOptions::new())))
        .route(
            "/widgets",
            get(list_widgets)
                .route_layer(auth.require(read))
                .merge(axum::routing::post(create_widget).route_layer(auth.require(write))),
        )
        .route("/status", get(status))
        .layer(axum::Extension(auth))
        .nest("/admin", admin);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    // Give back leased limits and write batched usage before exiting.
    client.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
}
