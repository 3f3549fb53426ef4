//! The `tonic_server` example: tonic's health service behind the guard, called by tonic's
//! generated client on loopback; rejections are gRPC statuses.

use std::time::Duration;

use apikeys_db::core::find_keys;
use apikeys_db::{ApiKeyClient, Credits, IpAllowlist, NewKey, RateLimit, Window};
use apikeys_testing::{TestDb, forged, leave_room, plaintext_key as key};
use apikeys_tower::ApiKeyAuth;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_types::StatusExt;

use crate::tonic_example::serve;

/// The example served on a loopback port; its address.
async fn start(client: ApiKeyClient) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { serve(ApiKeyAuth::new(client), listener).await.unwrap() });
    format!("http://{addr}")
}

/// A health check carrying `metadata` (name, value): its serving status, or the status.
async fn check(url: &str, metadata: &[(&'static str, &str)]) -> Result<i32, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap();
    let mut health = HealthClient::new(channel.connect().await.unwrap());
    let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
    for (name, value) in metadata {
        let value: MetadataValue<_> = value.parse().unwrap();
        request.metadata_mut().insert(*name, value);
    }
    health.check(request).await.map(|r| r.into_inner().status)
}

/// The call failed with `code`, and its message holds neither `key` nor anything key-shaped.
fn assert_refused(result: Result<i32, tonic::Status>, code: Code, key: &str) -> tonic::Status {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    let shown = format!("{status:?} {}", status.message());
    assert!(find_keys(shown.as_bytes()).is_empty(), "a key in the status: {shown}");
    assert!(key.is_empty() || !shown.contains(key), "the status echoes the key: {shown}");
    status
}

fn checker() -> NewKey {
    NewKey::new("checker").with_scopes(["health:check"])
}

const SERVING: i32 = ServingStatus::Serving as i32;

pub async fn a_valid_key_in_metadata_or_as_bearer_is_served(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let plain = key(&client, org, checker()).await;
    let url = start(client).await;
    assert_eq!(check(&url, &[("x-api-key", &plain)]).await.unwrap(), SERVING);
    let bearer = format!("Bearer {plain}");
    assert_eq!(check(&url, &[("authorization", &bearer)]).await.unwrap(), SERVING);
}

pub async fn no_bad_or_revoked_keys_are_unauthenticated(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let issued = client.create_key(org, checker()).await.unwrap();
    let plain = issued.key.expose_secret().to_owned();
    let url = start(client.clone()).await;
    assert_refused(check(&url, &[]).await, Code::Unauthenticated, "");
    let forged = forged(&plain);
    assert_refused(check(&url, &[("x-api-key", &forged)]).await, Code::Unauthenticated, &forged);
    assert_eq!(check(&url, &[("x-api-key", &plain)]).await.unwrap(), SERVING);
    client.revoke_key(issued.record.id).await.unwrap();
    let status =
        assert_refused(check(&url, &[("x-api-key", &plain)]).await, Code::Unauthenticated, &plain);
    assert!(status.message().contains("revoked"), "{status:?}");
}

pub async fn missing_scopes_and_foreign_addresses_are_permission_denied(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let other = key(&client, org, NewKey::new("other").with_scopes(["widgets:read"])).await;
    let pinned = |net: &str| checker().with_allowed_ips(IpAllowlist::parse([net]).unwrap());
    let loopback = key(&client, org, pinned("127.0.0.0/8")).await;
    let elsewhere = key(&client, org, pinned("10.0.0.0/8")).await;
    let url = start(client).await;
    assert_refused(check(&url, &[("x-api-key", &other)]).await, Code::PermissionDenied, &other);
    // The peer comes from tonic's TcpConnectInfo, as the example tells the guard.
    assert_eq!(check(&url, &[("x-api-key", &loopback)]).await.unwrap(), SERVING);
    let refused = check(&url, &[("x-api-key", &elsewhere)]).await;
    assert_refused(refused, Code::PermissionDenied, &elsewhere);
}

pub async fn over_the_limit_is_resource_exhausted_with_retry_info(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let plain =
        key(&client, org, checker().with_rate_limit(RateLimit::per_minute(2).unwrap())).await;
    // All counted in one minute of the database's clock (a new minute would start afresh).
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    let url = start(client).await;
    for _ in 0..2 {
        assert_eq!(check(&url, &[("x-api-key", &plain)]).await.unwrap(), SERVING);
    }
    let refused = check(&url, &[("x-api-key", &plain)]).await;
    let status = assert_refused(refused, Code::ResourceExhausted, &plain);
    let retry = status.get_details_retry_info().expect("a RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(60), "{delay:?}");
}

pub async fn a_database_outage_is_unavailable_with_retry_info(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let plain = key(&client, org, checker()).await;
    let url = start(client.clone()).await;
    assert_eq!(check(&url, &[("x-api-key", &plain)]).await.unwrap(), SERVING);
    client.connection().close_by_ref().await.unwrap();
    let status =
        assert_refused(check(&url, &[("x-api-key", &plain)]).await, Code::Unavailable, &plain);
    let retry = status.get_details_retry_info().expect("a RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
}

pub async fn spent_credits_are_resource_exhausted_without_a_wait(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let plain = key(&client, org, checker().with_credits(Credits::new(1))).await;
    let url = start(client).await;
    assert_eq!(check(&url, &[("x-api-key", &plain)]).await.unwrap(), SERVING);
    let refused = check(&url, &[("x-api-key", &plain)]).await;
    let status = assert_refused(refused, Code::ResourceExhausted, &plain);
    // Credits that never refill: no time to wait for, so no RetryInfo.
    assert!(status.get_details_retry_info().is_none(), "{status:?}");
}
