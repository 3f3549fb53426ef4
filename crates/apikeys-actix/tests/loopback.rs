//! The actix-web guard through real requests on loopback, beside the axum guard on the same
//! database: the same requests get the same answers, headers and problem bodies. On SQLite,
//! PostgreSQL and MariaDB.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::missing_panics_doc)]

use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use apikeys_actix::{ApiKeyAuth, MaybeKey, RequireKey, ValidKey};
use apikeys_db::core::find_keys;
use apikeys_db::{ApiKeyClient, IpAllowlist, NewKey, RateLimit, ValidateOptions, Window};
use apikeys_testing::{TestDb, forged, leave_room, plaintext_key as key};
use serde_json::{Value, json};

apikeys_testing::backend_tests!([
    the_answers_equal_the_axum_guards,
    the_key_headers_reach_handlers_marked_sensitive,
    two_extractors_of_one_request_count_it_once,
    nested_guards_each_count_the_request,
    an_extractor_under_another_guard_finds_its_own_key,
    keys_reach_handlers_through_the_middleware_and_the_extractors,
    ip_allowlists_judge_the_peer_and_not_what_the_client_claims,
]);

fn whoami(key: &ValidKey) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "id": key.id, "org_id": key.org_id, "name": key.name }))
}

/// `/read` behind the middleware requiring `widgets:read`, `/plain` with the extractor and
/// no middleware, `/maybe` with an optional key, `/debug` showing the request's `Debug`
/// behind the middleware, `/twice` with two extractors and no middleware, and
/// `/nested/read` behind an app-wide guard and a stricter one.
fn serve_actix(client: ApiKeyClient) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let auth = ApiKeyAuth::new(client);
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                let read = ValidateOptions::new().require_scopes(["widgets:read"]).unwrap();
                App::new()
                    .app_data(auth.clone())
                    .service(
                        web::resource("/read")
                            .wrap(RequireKey::new(auth.clone(), read.clone()))
                            .to(|key: ValidKey| async move { whoami(&key) }),
                    )
                    .route("/plain", web::get().to(|key: ValidKey| async move { whoami(&key) }))
                    .service(
                        web::resource("/debug")
                            .wrap(RequireKey::new(auth.clone(), ValidateOptions::new()))
                            .to(|request: HttpRequest| async move { format!("{request:?}") }),
                    )
                    .route(
                        "/twice",
                        web::get().to(|a: ValidKey, b: ValidKey| async move {
                            assert_eq!(a.id, b.id);
                            whoami(&a)
                        }),
                    )
                    .service(
                        web::scope("/nested")
                            .wrap(RequireKey::new(auth.clone(), ValidateOptions::new()))
                            .service(
                                web::resource("/read")
                                    .wrap(RequireKey::new(auth.clone(), read))
                                    .to(|key: ValidKey| async move { whoami(&key) }),
                            ),
                    )
                    .route(
                        "/maybe",
                        web::get().to(|MaybeKey(key): MaybeKey| async move {
                            key.map_or_else(|| HttpResponse::Ok().body("anonymous"), |k| whoami(&k))
                        }),
                    )
            });
            server.workers(1).disable_signals().listen(listener).unwrap().run().await.unwrap();
        });
    });
    format!("http://{addr}")
}

/// An App-level middleware that looks for a key (the App's guard, `x-api-key`) before any
/// route's extractor does, as a logging or tagging middleware would.
async fn peek(
    MaybeKey(_): MaybeKey,
    request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    next.call(request).await
}

/// `/partner/whoami`, in a scope whose guard reads `x-partner-key`, under an App whose
/// `peek` middleware looks for a key with the App's guard (`x-api-key`) first.
fn serve_partner(client: ApiKeyClient) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let partner =
        ApiKeyAuth::new(client.clone()).key_header(http::HeaderName::from_static("x-partner-key"));
    let auth = ApiKeyAuth::new(client);
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(actix_web::middleware::from_fn(peek))
                    .app_data(auth.clone())
                    .service(web::scope("/partner").app_data(partner.clone()).route(
                        "/whoami",
                        web::get().to(|key: ValidKey| async move { whoami(&key) }),
                    ))
            });
            server.workers(1).disable_signals().listen(listener).unwrap().run().await.unwrap();
        });
    });
    format!("http://{addr}")
}

/// The same `/read` route with the axum guard.
async fn serve_axum(client: ApiKeyClient) -> String {
    let auth = apikeys_axum::ApiKeyAuth::new(client);
    let read = ValidateOptions::new().require_scopes(["widgets:read"]).unwrap();
    let app = axum::Router::new().route(
        "/read",
        axum::routing::get(|key: apikeys_axum::ValidKey| async move {
            axum::Json(json!({ "id": key.id, "org_id": key.org_id, "name": key.name }))
        })
        .route_layer(auth.require(read)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// What of an answer must be the same: status, the headers the guard sets, the body.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let names = [
        "content-type",
        "www-authenticate",
        "retry-after",
        "ratelimit",
        "ratelimit-policy",
        "cache-control",
    ];
    let mut headers = Vec::new();
    for name in names {
        for value in response.headers().get_all(name) {
            headers.push((name.to_owned(), value.to_str().unwrap().to_owned()));
        }
    }
    let text = response.text().await.unwrap();
    let shown = format!("{headers:?} {text}");
    assert!(find_keys(shown.as_bytes()).is_empty(), "a key in the answer: {shown}");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, headers, body }
}

fn reader() -> NewKey {
    NewKey::new("reader").with_scopes(["widgets:read"])
}

/// Every answer of the actix guard equals the axum guard's to the same request.
pub async fn the_answers_equal_the_axum_guards(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let actix = serve_actix(client.clone());
    let axum = serve_axum(client.clone()).await;
    let good = key(&client, org, reader()).await;
    let writer = key(&client, org, NewKey::new("writer").with_scopes(["widgets:write"])).await;
    let revoked = client.create_key(org, reader()).await.unwrap();
    client.revoke_key(revoked.record.id).await.unwrap();
    let revoked = revoked.key.expose_secret().to_owned();
    let forged = forged(&good);
    let bearer = format!("Bearer {good}");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case<'_>> = vec![
        ("a good key", vec![("x-api-key", &good)], 200),
        ("a good bearer token", vec![("authorization", &bearer)], 200),
        ("no key", vec![], 401),
        ("a forged key", vec![("x-api-key", &forged)], 401),
        ("a revoked key", vec![("x-api-key", &revoked)], 401),
        ("a key twice", vec![("x-api-key", &good), ("x-api-key", &good)], 401),
        ("a key without the scope", vec![("x-api-key", &writer)], 403),
    ];
    for (case, headers, status) in &cases {
        let from_actix = get(&format!("{actix}/read"), headers).await;
        let from_axum = get(&format!("{axum}/read"), headers).await;
        assert_eq!(from_actix.status, *status, "{case}: {from_actix:?}");
        assert_eq!(from_actix, from_axum, "{case}");
    }
    // Rate limits: a key each (they count), the same limit, the same refusal.
    let limited = || reader().with_rate_limit(RateLimit::per_minute(2).unwrap());
    let (a, b) = (key(&client, org, limited()).await, key(&client, org, limited()).await);
    // All counted in one minute of the database's clock (a new minute would start afresh).
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    for _ in 0..2 {
        assert_eq!(get(&format!("{actix}/read"), &[("x-api-key", &a)]).await.status, 200);
        assert_eq!(get(&format!("{axum}/read"), &[("x-api-key", &b)]).await.status, 200);
    }
    let mut from_actix = get(&format!("{actix}/read"), &[("x-api-key", &a)]).await;
    let mut from_axum = get(&format!("{axum}/read"), &[("x-api-key", &b)]).await;
    assert_eq!(from_actix.status, 429, "{from_actix:?}");
    // The wait depends on when each counted; the rest must be the same.
    for answer in [&mut from_actix, &mut from_axum] {
        for (name, value) in &mut answer.headers {
            if name == "retry-after" || name == "ratelimit" {
                *value = String::new();
            }
        }
        answer.body["retry_after"] = Value::Null;
        answer.body["detail"] = Value::Null;
    }
    assert_eq!(from_actix, from_axum);
    // The database out of reach: 503 with Retry-After from both.
    client.connection().close_by_ref().await.unwrap();
    let from_actix = get(&format!("{actix}/read"), &[("x-api-key", &good)]).await;
    let from_axum = get(&format!("{axum}/read"), &[("x-api-key", &good)]).await;
    assert_eq!(from_actix.status, 503, "{from_actix:?}");
    assert_eq!(from_actix, from_axum);
}

/// The middleware, the extractor without it, and the optional key.
pub async fn keys_reach_handlers_through_the_middleware_and_the_extractors(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let issued = client.create_key(org, reader()).await.unwrap();
    let good = issued.key.expose_secret().to_owned();
    let writer = key(&client, org, NewKey::new("writer").with_scopes(["widgets:write"])).await;
    let actix = serve_actix(client.clone());
    let expected = json!({ "id": issued.record.id, "org_id": org, "name": "reader" });
    for path in ["read", "plain", "maybe"] {
        let answer = get(&format!("{actix}/{path}"), &[("x-api-key", &good)]).await;
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.body, expected, "{path}");
    }
    // Without the middleware, the guard's defaults (nothing required): any valid key.
    assert_eq!(get(&format!("{actix}/plain"), &[("x-api-key", &writer)]).await.status, 200);
    assert_eq!(get(&format!("{actix}/plain"), &[]).await.status, 401);
    // An optional key: none is anonymous, a bad one is still refused.
    assert_eq!(get(&format!("{actix}/maybe"), &[]).await.body, json!("anonymous"));
    let forged = forged(&good);
    let answer = get(&format!("{actix}/maybe"), &[("x-api-key", &forged)]).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.body["code"], "invalid_key");
}

/// The peer address is actix's; a forwarded one is not believed without trusted proxies.
pub async fn ip_allowlists_judge_the_peer_and_not_what_the_client_claims(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let pinned = |net: &str| reader().with_allowed_ips(IpAllowlist::parse([net]).unwrap());
    let loopback = key(&client, org, pinned("127.0.0.0/8")).await;
    let elsewhere = key(&client, org, pinned("10.0.0.0/8")).await;
    let actix = serve_actix(client.clone());
    let url = format!("{actix}/read");
    assert_eq!(get(&url, &[("x-api-key", &loopback)]).await.status, 200);
    let claimed = [("x-api-key", elsewhere.as_str()), ("x-forwarded-for", "10.1.2.3")];
    let answer = get(&url, &claimed).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.body["code"], "ip_not_allowed");
}

/// Behind the middleware, the request's `Debug` in a handler leaves the key out.
pub async fn the_key_headers_reach_handlers_marked_sensitive(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let plain = key(&client, org, reader()).await;
    let actix = serve_actix(client);
    let bearer = format!("Bearer {plain}");
    for header in [("x-api-key", plain.as_str()), ("authorization", bearer.as_str())] {
        let answer = get(&format!("{actix}/debug"), &[header]).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let shown = answer.body.as_str().unwrap();
        assert!(!shown.contains(&plain), "{shown}");
    }
    // actix redacts Authorization itself; the key header is left out because it is marked.
    let answer = get(&format!("{actix}/debug"), &[("x-api-key", &plain)]).await;
    assert!(answer.body.as_str().unwrap().contains("\"x-api-key\": Sensitive"), "{answer:?}");
}

/// actix creates a handler's extractors before polling any: two `ValidKey`s share one
/// validation, and a key allowed one request a minute gets its one request.
pub async fn two_extractors_of_one_request_count_it_once(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let once = key(&client, org, reader().with_rate_limit(RateLimit::per_minute(1).unwrap())).await;
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    let actix = serve_actix(client);
    let first = get(&format!("{actix}/twice"), &[("x-api-key", &once)]).await;
    assert_eq!(first.status, 200, "{first:?}");
    let second = get(&format!("{actix}/twice"), &[("x-api-key", &once)]).await;
    assert_eq!(second.status, 429, "{second:?}");
    // A rejection reaches both extractors: one answer, the same as with one extractor.
    let answer = get(&format!("{actix}/twice"), &[]).await;
    assert_eq!((answer.status, answer.body["code"].as_str()), (401, Some("missing_key")));
}

/// An app-wide guard and a stricter one on a resource: each checks and counts the request
/// (as tower's and axum's layers do), so a key allowed two requests a minute gets one through
/// both; and a second key in another header cannot ride on the first one's check.
pub async fn nested_guards_each_count_the_request(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let twice =
        key(&client, org, reader().with_rate_limit(RateLimit::per_minute(2).unwrap())).await;
    let writer = key(&client, org, NewKey::new("writer").with_scopes(["widgets:write"])).await;
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    let actix = serve_actix(client);
    let url = format!("{actix}/nested/read");
    assert_eq!(get(&url, &[("x-api-key", &twice)]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", &twice)]).await.status, 429);
    let answer = get(&url, &[("x-api-key", &writer)]).await;
    assert_eq!((answer.status, answer.body["code"].as_str()), (403, Some("insufficient_scope")));
}

/// A scope with a guard of its own (keys in `x-partner-key`) under an App-level middleware
/// whose `MaybeKey` found no key in `x-api-key`: the scope's `ValidKey` still reads its own
/// header, and counts it.
pub async fn an_extractor_under_another_guard_finds_its_own_key(db: TestDb) {
    let (client, org) = db.client_and_org().await;
    let once = key(&client, org, reader().with_rate_limit(RateLimit::per_minute(1).unwrap())).await;
    leave_room(&client, Window::Minute, Duration::from_secs(10)).await;
    let actix = serve_partner(client);
    let url = format!("{actix}/partner/whoami");
    assert_eq!(get(&url, &[("x-partner-key", &once)]).await.status, 200);
    assert_eq!(get(&url, &[("x-partner-key", &once)]).await.status, 429);
    assert_eq!(get(&url, &[]).await.status, 401);
}
