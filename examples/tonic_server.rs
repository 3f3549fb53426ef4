//! A gRPC server (tonic, with its standard health service) guarded by API keys: calls
//! carry the key in the `x-api-key` metadata (or `authorization: Bearer`), and rejected
//! calls get gRPC statuses: UNAUTHENTICATED (no, invalid, expired, revoked or disabled
//! key), PERMISSION_DENIED (scope, product, IP allowlist), RESOURCE_EXHAUSTED (rate limit,
//! credits) with a `google.rpc.RetryInfo` detail when the wait is known, UNAVAILABLE with
//! one (database unreachable), INTERNAL otherwise.
//!
//! A call is checked when it starts: a stream opened with a key stays open after the key
//! is revoked.
//!
//! `cargo run --example tonic_server` serves on 127.0.0.1:50051 (`BIND` to change) with a
//! SQLite file in the working directory (`DATABASE_URL` for another database).
//! It reads `APIKEYS_SIGNING_SECRET` and `APIKEYS_ENVIRONMENT`, the settings the README's CLI
//! block exports. Keys need the scope `health:check`; at start it prints one for
//! organization `acme`.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use apikeys_db::{ApiKeyClient, NewKey, ValidateOptions};
use apikeys_tower::{ApiKeyAuth, Rejection};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::TcpConnectInfo;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

// ANCHOR: grpc
/// The gRPC status of a rejected call, from the guard's HTTP answer. Its message is the
/// problem's `detail`, which never holds the key.
pub fn grpc_status(rejection: &Rejection) -> Status {
    let answer = rejection.answer();
    let message = answer.problem.detail.clone();
    let code = match answer.status.as_u16() {
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Internal,
    };
    match answer.problem.retry_after {
        // When to retry, as gRPC clients read it: a RetryInfo detail.
        Some(seconds) => {
            let retry = ErrorDetails::with_retry_info(Some(Duration::from_secs(seconds)));
            Status::with_error_details(code, message, retry)
        }
        None => Status::new(code, message),
    }
}

/// The guard's answer for gRPC: the status as a trailers-only response.
pub fn grpc_answer(rejection: Rejection) -> http::Response<tonic::body::Body> {
    grpc_status(&rejection).into_http()
}
// ANCHOR_END: grpc

/// Serves the health service on `listener`, every call guarded by `auth` and needing the
/// scope `health:check`.
///
/// # Errors
/// The scope does not parse (it does), or the server fails.
pub async fn serve(
    auth: ApiKeyAuth,
    listener: TcpListener,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // tonic puts the connection's address in a TcpConnectInfo: IP allowlists judge it.
    // (Served with TLS, tonic puts a TlsConnectInfo<TcpConnectInfo> there instead.)
    let auth = auth.peer_address(|extensions| {
        extensions.get::<TcpConnectInfo>().and_then(|info| info.remote_addr).map(|a| a.ip())
    });
    let check = ValidateOptions::new().require_scopes(["health:check"])?;
    let guard = auth.require(check).answer_with(grpc_answer);
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .layer(guard)
        .add_service(health)
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

#[allow(dead_code)] // the tests of apikeys-tower include this file, and call `serve` instead
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://apikeys-tonic-example.db".to_owned());
    // In production, read the secret from your secret store (32+ random bytes).
    let secret = std::env::var("APIKEYS_SIGNING_SECRET")
        .unwrap_or_else(|_| "example-signing-secret-change-me-0123456789".to_owned());
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let mut builder = ApiKeyClient::builder().database_url(&url).signing_secret(secret);
    // The key format the README's CLI block sets (APIKEYS_ENVIRONMENT=live): keys made by
    // `apikeys keys create` with the same DATABASE_URL, secret and environment work here.
    if let Ok(environment) = std::env::var("APIKEYS_ENVIRONMENT") {
        builder = builder.environment(environment);
    }
    let client = builder.build().await?;
    client.create_tables().await?;
    let (org, _) = client.get_or_create_organization("acme").await?;
    let issued =
        client.create_key(org.id, NewKey::new("grpc-demo").with_scopes(["health:check"])).await?;
    println!("a key with health:check (shown once): {}", issued.key.expose_secret());
    let listener = TcpListener::bind(&bind).await?;
    println!("gRPC health service on {bind}: grpc.health.v1.Health/Check");
    serve(ApiKeyAuth::new(client), listener).await
}
