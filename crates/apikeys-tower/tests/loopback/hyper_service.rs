//! A plain hyper server: the guard's layer around a `service_fn`, served with hyper-util.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use apikeys_db::core::find_keys;
use apikeys_db::{IpAllowlist, NewKey, RateLimit, ValidateOptions, Window};
use apikeys_testing::{TestDb, forged, leave_room, plaintext_key as key};
use apikeys_tower::{ApiKeyAuth, ValidatedKey};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_layer::Layer;

/// What the service sees of the key the guard put in the extensions.
async fn whoami(
    request: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let body = match request.extensions().get::<ValidatedKey>() {
        Some(key) => json!({ "id": key.id, "org_id": key.org_id, "name": key.name }),
        None => json!({ "id": null }),
    };
    Ok(http::Response::new(Full::from(body.to_string())))
}

/// Serves `whoami` behind a guard requiring `widgets:read`, each request carrying its
/// connection's peer address as a `SocketAddr` extension (the guard's default place).
async fn serve(auth: ApiKeyAuth) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = ValidateOptions::new().require_scopes(["widgets:read"]).unwrap();
    let guarded = auth.require(read).layer(tower::service_fn(whoami));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = listener.accept().await.unwrap();
            let guarded = guarded.clone();
            let service = tower::service_fn(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert::<SocketAddr>(peer);
                guarded.clone().oneshot(request)
            });
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let service = TowerToHyperService::new(service);
                let _ =
                    auto::Builder::new(TokioExecutor::new()).serve_connection(io, service).await;
            });
        }
    });
    format!("http://{addr}")
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status, headers, body, text }
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// A problem with this status and code, holding neither `key` nor anything key-shaped.
    fn assert_problem(&self, status: u16, code: &str, key: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.header("content-type"), "application/problem+json", "{}", self.text);
        assert_eq!(self.body["code"], code, "{}", self.text);
        let headers = format!("{:?}", self.headers);
        assert!(find_keys(self.text.as_bytes()).is_empty(), "a key in the body: {}", self.text);
        assert!(find_keys(headers.as_bytes()).is_empty(), "a key in a header: {headers}");
        if !key.is_empty() {
            assert!(!self.text.contains(key) && !headers.contains(key), "{}", self.text);
        }
    }
}

pub async fn a_valid_key_reaches_the_service_with_the_key_in_its_extensions(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let issued =
        client.create_key(org, NewKey::new("reader").with_scopes(["widgets:read"])).await.unwrap();
    let plain = issued.key.expose_secret().to_owned();
    let url = serve(ApiKeyAuth::new(client.clone())).await;
    for headers in [[("x-api-key", plain.clone())], [("authorization", format!("Bearer {plain}"))]]
    {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = get(&url, &headers).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body["id"], json!(issued.record.id));
        assert_eq!(answer.body["org_id"], json!(org));
        assert_eq!(answer.body["name"], "reader");
    }
}

pub async fn rejections_are_problems_that_never_echo_the_key(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let writer = key(&client, org, NewKey::new("writer").with_scopes(["widgets:write"])).await;
    let url = serve(ApiKeyAuth::new(client.clone())).await;

    let none = get(&url, &[]).await;
    none.assert_problem(401, "missing_key", "");
    assert!(none.header("www-authenticate").contains("x-api-key"), "{:?}", none.headers);

    let forged = forged(&writer);
    get(&url, &[("x-api-key", &forged)]).await.assert_problem(401, "invalid_key", &forged);
    let twice = reqwest::Client::new()
        .get(&url)
        .header("x-api-key", &writer)
        .header("x-api-key", &writer)
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 401);
    get(&url, &[("x-api-key", &writer)]).await.assert_problem(403, "insufficient_scope", &writer);
}

pub async fn over_the_limit_is_429_with_retry_after_and_ratelimit_headers(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let limited = NewKey::new("limited")
        .with_scopes(["widgets:read"])
        .with_rate_limit(RateLimit::per_minute(2).unwrap());
    let plain = key(&client, org, limited).await;
    // All counted in one minute of the database's clock (a new minute would start afresh).
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    let url = serve(ApiKeyAuth::new(client.clone())).await;
    for _ in 0..2 {
        assert_eq!(get(&url, &[("x-api-key", &plain)]).await.status, 200);
    }
    let refused = get(&url, &[("x-api-key", &plain)]).await;
    refused.assert_problem(429, "quota_exceeded", &plain);
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(refused.header("ratelimit-policy"), "\"key\";q=2;w=60");
    assert_eq!(refused.header("ratelimit"), format!("\"key\";r=0;t={retry}"));
}

pub async fn ip_allowlists_judge_the_peer_the_server_put_in_the_extensions(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let new = |allowed: &str| {
        NewKey::new("pinned")
            .with_scopes(["widgets:read"])
            .with_allowed_ips(IpAllowlist::parse([allowed]).unwrap())
    };
    let loopback = key(&client, org, new("127.0.0.0/8")).await;
    let elsewhere = key(&client, org, new("10.0.0.0/8")).await;
    let url = serve(ApiKeyAuth::new(client.clone())).await;
    assert_eq!(get(&url, &[("x-api-key", &loopback)]).await.status, 200);
    // A forwarded address is not believed without trusted proxies.
    let spoofed = get(&url, &[("x-api-key", &elsewhere), ("x-forwarded-for", "10.1.2.3")]).await;
    spoofed.assert_problem(403, "ip_not_allowed", &elsewhere);

    // A guard told to look elsewhere for the address finds none there: refused, not let by.
    let blind = ApiKeyAuth::new(client.clone()).peer_address(|_| None);
    let url = serve(blind).await;
    get(&url, &[("x-api-key", &loopback)]).await.assert_problem(403, "ip_not_allowed", &loopback);
}

pub async fn a_revoke_is_seen_by_the_next_request(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let issued =
        client.create_key(org, NewKey::new("reader").with_scopes(["widgets:read"])).await.unwrap();
    let plain = issued.key.expose_secret().to_owned();
    let url = serve(ApiKeyAuth::new(client.clone())).await;
    assert_eq!(get(&url, &[("x-api-key", &plain)]).await.status, 200);
    client.revoke_key(issued.record.id).await.unwrap();
    get(&url, &[("x-api-key", &plain)]).await.assert_problem(401, "revoked", &plain);
}
