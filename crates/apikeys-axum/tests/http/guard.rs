//! The guard: layer and extractor, every rejection through real HTTP.

use std::sync::Arc;
use std::time::Duration;

use apikeys_axum::{ApiKeyAuth, ManagementApi, Requirement, ValidKey};
use apikeys_db::sea_orm::ConnectionTrait;
use apikeys_db::{ApiKeyClient, KeyCache, NewKey, RateLimit, ValidateOptions};
use axum::Router;
use axum::routing::get;
use chrono::TimeDelta;
use serde_json::json;

use crate::support::{Answer, fetch, key, serve, serve_with_peer};
use apikeys_testing::{TestClock, TestDb, at};

/// What a handler sees of the key.
async fn whoami(key: ValidKey) -> axum::Json<serde_json::Value> {
    axum::Json(
        json!({ "id": key.id, "org_id": key.org_id, "name": key.name, "custom": key.custom }),
    )
}

#[derive(Clone)]
struct AppState {
    write: Arc<ValidateOptions>,
}

/// Requires `widgets:write`.
struct Write;

impl Requirement<AppState> for Write {
    fn options<'a>(state: &'a AppState, _: &'a ApiKeyAuth) -> &'a ValidateOptions {
        &state.write
    }
}

async fn write_widget(key: ValidKey<Write>) -> String {
    format!("written by {}", key.id)
}

async fn maybe(key: Option<ValidKey>) -> String {
    key.map_or_else(|| "anonymous".to_owned(), |k| k.id.to_string())
}

/// `/whoami` behind the layer, `/read` behind a layer requiring `widgets:read`,
/// `/write` with the typed extractor, `/maybe` with an optional key, `/plain` with the
/// plain extractor and no layer.
fn app(auth: ApiKeyAuth) -> Router {
    let read = ValidateOptions::new().require_scopes(["widgets:read"]).unwrap();
    let write = Arc::new(ValidateOptions::new().require_scopes(["widgets:write"]).unwrap());
    Router::new()
        .route("/whoami", get(whoami).route_layer(auth.require(ValidateOptions::new())))
        .route("/read", get(whoami).route_layer(auth.require(read)))
        .route("/write", get(write_widget))
        .route("/maybe", get(maybe))
        .route("/plain", get(whoami))
        .layer(axum::Extension(auth))
        .with_state(AppState { write })
}

pub async fn header_and_bearer_keys_reach_the_handler(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("ci").with_custom(json!({"plan": "pro"}));
    let (plain, id) = key(&client, org.id, new).await;
    let base = serve(app(ApiKeyAuth::new(client.clone()))).await;
    for headers in [
        [("x-api-key", plain.as_str())],
        [("authorization", &format!("Bearer {plain}"))],
        [("authorization", &format!("bearer {plain}"))],
        [("X-Api-Key", &format!(" {plain} "))],
    ] {
        for path in ["/whoami", "/plain"] {
            let a = fetch(&format!("{base}{path}"), &headers).await;
            assert_eq!(a.status, 200, "{path} {headers:?}: {}", a.text);
            assert_eq!(
                a.body,
                json!({"id": id, "org_id": org.id, "name": "ci", "custom": {"plan": "pro"}})
            );
        }
    }
    // The key header wins over a bearer token.
    let a = fetch(
        &format!("{base}/whoami"),
        &[("x-api-key", &plain), ("authorization", "Bearer sk_wrong")],
    )
    .await;
    assert_eq!(a.status, 200);
    // Nine successful checks above, each counted once.
    assert_eq!(client.get_key(id).await.unwrap().use_count, 9);
}

pub async fn no_key_is_401_with_a_challenge(db: TestDb) {
    let client = db.client().await;
    let base = serve(app(ApiKeyAuth::new(client))).await;
    for headers in [
        &[][..],
        &[("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")][..],
        &[("authorization", "Bearer ")][..],
    ] {
        for path in ["/whoami", "/plain", "/write"] {
            let a = fetch(&format!("{base}{path}"), headers).await;
            a.assert_problem(401, "missing_key", "");
            assert_eq!(
                a.all("www-authenticate"),
                ["ApiKey realm=\"api\", header=\"x-api-key\"", "Bearer realm=\"api\""]
            );
            assert_eq!(a.header("cache-control"), "no-store");
        }
    }
    // Without bearer tokens, a custom header and realm: the challenge says so.
    let client = db.client().await;
    let auth = ApiKeyAuth::new(client)
        .bearer(false)
        .key_header(http::HeaderName::from_static("x-widgets-key"))
        .realm("widgets")
        .unwrap();
    let base = serve(app(auth)).await;
    let a = fetch(&format!("{base}/whoami"), &[("authorization", "Bearer sk_x")]).await;
    a.assert_problem(401, "missing_key", "");
    assert_eq!(a.all("www-authenticate"), ["ApiKey realm=\"widgets\", header=\"x-widgets-key\""]);
}

pub async fn invalid_expired_and_revoked_keys_are_401(db: TestDb) {
    let clock = TestClock::at(at("2026-03-01T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (expiring, expiring_id) =
        key(&client, org.id, NewKey::new("e").expires_at(at("2026-03-01T11:00:00Z"))).await;
    let (revoked, revoked_id) = key(&client, org.id, NewKey::new("r")).await;
    let base = serve(app(ApiKeyAuth::new(client.clone()))).await;
    let url = format!("{base}/whoami");

    let forged = apikeys_testing::forged(&revoked);
    for bad in ["garbage", "sk_live_short", forged.as_str(), &"x".repeat(5000)] {
        let a = fetch(&url, &[("x-api-key", bad)]).await;
        a.assert_problem(401, "invalid_key", bad);
        assert_eq!(
            a.all("www-authenticate")[1],
            "Bearer realm=\"api\", error=\"invalid_token\", error_description=\"invalid api key\""
        );
    }
    // The key header sent twice is ambiguous: rejected, not guessed at.
    let a = Answer::of(
        reqwest::Client::new()
            .get(&url)
            .header("x-api-key", &expiring)
            .header("x-api-key", &revoked)
            .send()
            .await
            .unwrap(),
    )
    .await;
    a.assert_problem(401, "invalid_key", &expiring);

    assert_eq!(fetch(&url, &[("x-api-key", &expiring)]).await.status, 200);
    clock.advance(TimeDelta::hours(2));
    let a = fetch(&url, &[("x-api-key", &expiring)]).await;
    a.assert_problem(401, "expired", &expiring);
    let expires_at = client.get_key(expiring_id).await.unwrap().expires_at.unwrap();
    assert_eq!(a.body["expired_at"], json!(expires_at));

    let record = client.revoke_key(revoked_id).await.unwrap();
    let a = fetch(&url, &[("authorization", &format!("Bearer {revoked}"))]).await;
    a.assert_problem(401, "revoked", &revoked);
    assert_eq!(a.body["revoked_at"], json!(record.revoked_at.unwrap()));
    assert!(a.all("www-authenticate")[1].contains("error=\"invalid_token\""));
}

pub async fn wrong_scope_and_wrong_product_are_403(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (billing, _) = client.get_or_create_product(org.id, "billing").await.unwrap();
    let (search, _) = client.get_or_create_product(org.id, "search").await.unwrap();
    let (reader, _) = key(&client, org.id, NewKey::new("r").with_scopes(["widgets:read"])).await;
    let (writer, _) = key(&client, org.id, NewKey::new("w").with_scopes(["widgets:write"])).await;
    let (search_key, _) = key(&client, org.id, NewKey::new("s").with_product(search.id)).await;
    let auth = ApiKeyAuth::new(client.clone());
    let billing_only = auth.require(ValidateOptions::new().for_product(billing.id));
    let app = app(auth).route("/billing", get(|| async { "billed" }).route_layer(billing_only));
    let base = serve(app).await;

    assert_eq!(fetch(&format!("{base}/read"), &[("x-api-key", &reader)]).await.status, 200);
    let a = fetch(&format!("{base}/read"), &[("authorization", &format!("Bearer {writer}"))]).await;
    a.assert_problem(403, "insufficient_scope", &writer);
    assert_eq!(a.body["missing_scopes"], json!(["widgets:read"]));
    assert_eq!(
        a.all("www-authenticate"),
        ["Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"widgets:read\""]
    );
    // The typed extractor, without a layer.
    let a = fetch(&format!("{base}/write"), &[("x-api-key", &reader)]).await;
    a.assert_problem(403, "insufficient_scope", &reader);
    assert_eq!(a.body["missing_scopes"], json!(["widgets:write"]));
    assert_eq!(fetch(&format!("{base}/write"), &[("x-api-key", &writer)]).await.status, 200);

    let a = fetch(&format!("{base}/billing"), &[("x-api-key", &search_key)]).await;
    a.assert_problem(403, "product_not_allowed", &search_key);
    assert_eq!(a.body["product_id"], json!(billing.id));
    // An org-wide key is valid for every product of its organization.
    assert_eq!(fetch(&format!("{base}/billing"), &[("x-api-key", &reader)]).await.text, "billed");
}

pub async fn over_the_limit_is_429_with_retry_after_and_ratelimit_headers(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_minute(2).unwrap();
    let (plain, _) = key(&client, org.id, NewKey::new("l").with_rate_limit(limit)).await;
    apikeys_testing::leave_room(&client, apikeys_db::Window::Minute, Duration::from_secs(10)).await;
    let base = serve(app(ApiKeyAuth::new(client.clone()))).await;
    let url = format!("{base}/whoami");
    for _ in 0..2 {
        assert_eq!(fetch(&url, &[("x-api-key", &plain)]).await.status, 200);
    }
    let a = fetch(&url, &[("x-api-key", &plain)]).await;
    a.assert_problem(429, "quota_exceeded", &plain);
    let wait: u64 = a.header("retry-after").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(a.body["retry_after"], wait);
    assert_eq!(a.body["limit"], json!({"requests": 2, "window": "minute"}));
    assert_eq!(a.header("ratelimit-policy"), "\"key\";q=2;w=60");
    assert_eq!(a.header("ratelimit"), format!("\"key\";r=0;t={wait}"));
    assert_eq!(a.body["violated_policies"], json!(["key"]));

    // A named limit that refuses is the policy named in the headers and the problem body.
    let plan = apikeys_db::RateLimits::new().with("burst", RateLimit::per_minute(1).unwrap());
    let new = NewKey::new("named").with_rate_limit(RateLimit::per_hour(100).unwrap());
    let (named, _) = key(&client, org.id, new.with_rate_limits(plan.unwrap())).await;
    assert_eq!(fetch(&url, &[("x-api-key", &named)]).await.status, 200);
    let a = fetch(&url, &[("x-api-key", &named)]).await;
    a.assert_problem(429, "quota_exceeded", &named);
    let wait: u64 = a.header("retry-after").parse().unwrap();
    assert_eq!(a.header("ratelimit-policy"), "\"burst\";q=1;w=60");
    assert_eq!(a.header("ratelimit"), format!("\"burst\";r=0;t={wait}"));
    assert_eq!(a.body["violated_policies"], json!(["burst"]));
    assert_eq!(a.body["limit"], json!({"requests": 1, "window": "minute"}));
}

pub async fn query_parameter_only_when_turned_on(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (plain, _) = key(&client, org.id, NewKey::new("q")).await;
    let off = serve(app(ApiKeyAuth::new(client.clone()))).await;
    let a = fetch(&format!("{off}/whoami?api_key={plain}"), &[]).await;
    a.assert_problem(401, "missing_key", &plain);

    let on = serve(app(ApiKeyAuth::new(client).query_param("api_key"))).await;
    assert_eq!(fetch(&format!("{on}/whoami?x=1&api_key={plain}"), &[]).await.status, 200);
    let a = fetch(&format!("{on}/whoami?api_key=nope"), &[]).await;
    a.assert_problem(401, "invalid_key", "");
    // Headers still come first.
    let a = fetch(&format!("{on}/whoami?api_key=nope"), &[("x-api-key", &plain)]).await;
    assert_eq!(a.status, 200);
}

/// Whatever a request presents, and however the guard turns it away, the answer never
/// repeats a key: a key of another format, a key with something glued to it, two keys, a
/// key under another scheme or in a query parameter the guard does not read, on routes
/// behind the layer, with the plain extractor and with a typed one.
pub async fn rejections_never_echo_what_was_presented(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (plain, _) = key(&client, org.id, NewKey::new("p")).await;
    let foreign = apikeys_db::KeyFormat::new("acme", Some("live")).unwrap().generate().unwrap();
    let foreign = foreign.expose_secret();
    let base = serve(app(ApiKeyAuth::new(client.clone()))).await;
    let with_query = serve(app(ApiKeyAuth::new(client).query_param("api_key"))).await;
    for path in ["/whoami", "/plain", "/write", "/maybe"] {
        for k in [plain.as_str(), foreign] {
            for value in [format!("{k}x"), format!("{k} {k}"), format!("{k},{k}")] {
                let a = fetch(&format!("{base}{path}"), &[("x-api-key", &value)]).await;
                a.assert_problem(401, "invalid_key", k);
            }
            let a = fetch(&format!("{base}{path}"), &[("x-api-key", foreign)]).await;
            a.assert_problem(401, "invalid_key", foreign);
            let a = fetch(&format!("{with_query}{path}?api_key={foreign}"), &[]).await;
            a.assert_problem(401, "invalid_key", foreign);
            if path != "/maybe" {
                let basic = format!("Basic {k}");
                let a = fetch(&format!("{base}{path}"), &[("authorization", &basic)]).await;
                a.assert_problem(401, "missing_key", k);
                let a = fetch(&format!("{base}{path}?api_key={k}"), &[]).await;
                a.assert_problem(401, "missing_key", k);
            }
        }
    }
}

pub async fn typed_requirements_and_optional_keys(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (plain, id) = key(&client, org.id, NewKey::new("o")).await;
    let auth = ApiKeyAuth::new(client.clone())
        .requirements(ValidateOptions::new().require_scopes(["profile"]).unwrap());
    let base = serve(app(auth)).await;
    assert_eq!(fetch(&format!("{base}/maybe"), &[]).await.text, "anonymous");
    // A bad key on an optional route is rejected, never served as anonymous.
    let a = fetch(&format!("{base}/maybe"), &[("x-api-key", "sk_bad")]).await;
    a.assert_problem(401, "invalid_key", "");
    // The guard's default requirements apply where no layer and no Requirement say more.
    let a = fetch(&format!("{base}/maybe"), &[("x-api-key", &plain)]).await;
    a.assert_problem(403, "insufficient_scope", &plain);
    let a = fetch(&format!("{base}/plain"), &[("x-api-key", &plain)]).await;
    a.assert_problem(403, "insufficient_scope", &plain);
    // A layer's requirements replace the defaults on its routes.
    assert_eq!(fetch(&format!("{base}/whoami"), &[("x-api-key", &plain)]).await.status, 200);
    client.update_key(id, apikeys_db::KeyUpdate::new().with_scopes(["profile"])).await.unwrap();
    assert_eq!(
        fetch(&format!("{base}/maybe"), &[("x-api-key", &plain)]).await.text,
        id.to_string()
    );
}

pub async fn a_layer_and_an_extractor_count_a_request_once(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_minute(3).unwrap();
    let new = NewKey::new("c").with_scopes(["widgets:write"]).with_rate_limit(limit);
    let (plain, id) = key(&client, org.id, new).await;
    apikeys_testing::leave_room(&client, apikeys_db::Window::Minute, Duration::from_secs(10)).await;
    let auth = ApiKeyAuth::new(client.clone());
    // The layer validates (and counts); the typed extractor checks its scope again.
    let write = Arc::new(ValidateOptions::new().require_scopes(["widgets:write"]).unwrap());
    let state = AppState { write };
    let app = Router::new()
        .route("/write", get(write_widget).route_layer(auth.require(ValidateOptions::new())))
        .with_state(state);
    let base = serve(app).await;
    for _ in 0..3 {
        let a = fetch(&format!("{base}/write"), &[("x-api-key", &plain)]).await;
        assert_eq!(a.text, format!("written by {id}"));
    }
    assert_eq!(client.get_key(id).await.unwrap().use_count, 3);
    fetch(&format!("{base}/write"), &[("x-api-key", &plain)]).await.assert_problem(
        429,
        "quota_exceeded",
        &plain,
    );
}

async fn typed_then_plain(typed: ValidKey<Write>, plain: ValidKey) -> String {
    format!("{} {}", typed.name, plain.name)
}

async fn plain_then_typed(plain: ValidKey, typed: ValidKey<Write>) -> String {
    format!("{} {}", typed.name, plain.name)
}

/// On a route without a guard layer, a handler taking `ValidKey<R>` and a plain `ValidKey`
/// gets a plain key that meets the guard's default requirements, in either order: the
/// typed extractor's validation (against `R` alone) is never handed on as the defaults'
/// one. Each request is still counted once.
pub async fn a_plain_key_after_a_typed_one_still_meets_the_defaults(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (writer, _) = key(&client, org.id, NewKey::new("w").with_scopes(["widgets:write"])).await;
    let both = NewKey::new("b").with_scopes(["widgets:write", "profile"]);
    let (both, both_id) = key(&client, org.id, both).await;
    let defaults = ValidateOptions::new().require_scopes(["profile"]).unwrap();
    let auth = ApiKeyAuth::new(client.clone()).requirements(defaults);
    let write = Arc::new(ValidateOptions::new().require_scopes(["widgets:write"]).unwrap());
    let app = Router::new()
        .route("/typed-then-plain", get(typed_then_plain))
        .route("/plain-then-typed", get(plain_then_typed))
        .layer(axum::Extension(auth))
        .with_state(AppState { write });
    let base = serve(app).await;
    for path in ["/typed-then-plain", "/plain-then-typed"] {
        let a = fetch(&format!("{base}{path}"), &[("x-api-key", &writer)]).await;
        a.assert_problem(403, "insufficient_scope", &writer);
        assert_eq!(a.body["missing_scopes"], json!(["profile"]), "{path}: {}", a.text);
        let a = fetch(&format!("{base}{path}"), &[("x-api-key", &both)]).await;
        assert_eq!((a.status, a.text.as_str()), (200, "b b"), "{path}");
    }
    assert_eq!(client.get_key(both_id).await.unwrap().use_count, 2, "one use per request");
}

pub async fn database_failures_are_503_and_500_without_details(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (plain, _) = key(&client, org.id, NewKey::new("d")).await;
    let base = serve(app(ApiKeyAuth::new(client.clone()))).await;
    // A table gone: a real storage failure, 500, its SQL kept out of the answer.
    let db_conn = client.connection();
    db_conn.execute_unprepared("ALTER TABLE api_keys RENAME TO api_keys_gone").await.unwrap();
    let a = fetch(&format!("{base}/whoami"), &[("x-api-key", &plain)]).await;
    a.assert_problem(500, "internal", &plain);
    assert!(!a.text.contains("api_keys"), "{}", a.text);
    assert!(a.headers.get("retry-after").is_none());
    db_conn.execute_unprepared("ALTER TABLE api_keys_gone RENAME TO api_keys").await.unwrap();
    assert_eq!(fetch(&format!("{base}/whoami"), &[("x-api-key", &plain)]).await.status, 200);
    // The pool closed: the database is out of reach, 503 with Retry-After.
    db_conn.close_by_ref().await.unwrap();
    let a = fetch(&format!("{base}/whoami"), &[("x-api-key", &plain)]).await;
    a.assert_problem(503, "unavailable", &plain);
    assert_eq!(a.header("retry-after"), "1");
    assert_eq!(a.body["retry_after"], 1);
}

pub async fn a_revoke_through_the_api_is_seen_by_a_caching_guard(db: TestDb) {
    // Two replicas: one guards with the verified-key cache, the other serves the admin API.
    let cache = KeyCache::new().max_staleness(Duration::from_millis(300));
    let guard_client = db.client_with(|b| b.cache(cache)).await;
    let admin_client: ApiKeyClient = db.client().await;
    let (org, _) = admin_client.get_or_create_organization("acme").await.unwrap();
    let (plain, id) = key(&admin_client, org.id, NewKey::new("c")).await;
    let guard = serve(app(ApiKeyAuth::new(guard_client))).await;
    let admin = serve(ManagementApi::new(admin_client).authorized_by_fn(|_| true)).await;
    for _ in 0..3 {
        assert_eq!(fetch(&format!("{guard}/whoami"), &[("x-api-key", &plain)]).await.status, 200);
    }
    let revoked =
        reqwest::Client::new().post(format!("{admin}/keys/{id}/revoke")).send().await.unwrap();
    assert_eq!(revoked.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = fetch(&format!("{guard}/whoami"), &[("x-api-key", &plain)]).await;
        if a.status == 401 {
            a.assert_problem(401, "revoked", &plain);
            break;
        }
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(std::time::Instant::now() < deadline, "the guard kept serving a revoked key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn admin_calls_racing_guarded_requests_end_in_documented_answers(db: TestDb) {
    // One process serves both, as a replica would; eight callers hammer 24 keys while the
    // management API deletes, revokes, and updates-while-deleting them over HTTP.
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for i in 0..24 {
        keys.push(key(&client, org.id, NewKey::new(format!("k{i}"))).await);
    }
    let admin = ManagementApi::new(client.clone()).authorized_by_fn(|_| true);
    let base = serve(app(ApiKeyAuth::new(client)).nest("/admin", admin)).await;
    let plains: Arc<Vec<String>> = Arc::new(keys.iter().map(|(p, _)| p.clone()).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|seed| {
            let (base, plains, stop) = (base.clone(), plains.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut seen, mut wrong) = (0, Vec::new());
                let mut i = seed;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let a = fetch(
                        &format!("{base}/whoami"),
                        &[("x-api-key", &plains[i % plains.len()])],
                    )
                    .await;
                    let code = a.body["code"].as_str().unwrap_or("");
                    if !(a.status == 200
                        || (a.status == 401 && (code == "invalid_key" || code == "revoked")))
                    {
                        wrong.push(format!("{} {}", a.status, a.text));
                    }
                    seen += 1;
                    i += 7;
                }
                (seen, wrong)
            })
        })
        .collect();
    let http = reqwest::Client::new();
    let mut admin_wrong = Vec::new();
    for (i, (_, id)) in keys.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let url = format!("{base}/admin/keys/{id}");
        let statuses: Vec<u16> = match i % 3 {
            0 => vec![http.delete(&url).send().await.unwrap().status().as_u16()],
            1 => {
                let revoke = http.post(format!("{url}/revoke")).send();
                let delete = http.delete(&url).send();
                let (r, d) = tokio::join!(revoke, delete);
                vec![r.unwrap().status().as_u16(), d.unwrap().status().as_u16()]
            }
            _ => {
                let update = http.patch(&url).json(&json!({"name": "renamed", "rate_limit": {"requests": 5000, "window": "hour"}})).send();
                let delete = http.delete(&url).send();
                let (u, d) = tokio::join!(update, delete);
                vec![u.unwrap().status().as_u16(), d.unwrap().status().as_u16()]
            }
        };
        // Deletes succeed (204); a revoke or update racing a delete is done (200) or finds
        // the key gone (404): never a 5xx.
        if !statuses.iter().all(|s| [200, 204, 404].contains(s)) || statuses.last() != Some(&204) {
            admin_wrong.push(format!("key {i}: {statuses:?}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (seen, wrong) = caller.await.unwrap();
        total += seen;
        assert!(wrong.is_empty(), "guard answers outside 200/401: {wrong:?}");
    }
    assert!(admin_wrong.is_empty(), "{admin_wrong:?}");
    assert!(total > 24, "the callers ran alongside the admin calls ({total} requests)");
    for plain in plains.iter() {
        fetch(&format!("{base}/whoami"), &[("x-api-key", plain)]).await.assert_problem(
            401,
            "invalid_key",
            plain,
        );
    }
}

/// A key with an IP allowlist, behind the layer and the extractor: judged by the
/// connection's peer (loopback); a forwarding header is ignored until the peer is a trusted
/// proxy, and then read right to left; without connection info the address is unknown and
/// the key refused. Keys without an allowlist never care.
pub async fn ip_allowlists_judge_the_peer_and_only_trusted_forwarding(db: TestDb) {
    use apikeys_db::IpAllowlist;
    use apikeys_http::{ForwardedHeader, TrustedProxies};
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let list = |nets: &[&str]| IpAllowlist::parse(nets).unwrap();
    let (local, _) =
        key(&client, org.id, NewKey::new("l").with_allowed_ips(list(&["127.0.0.0/8"]))).await;
    let (office, _) =
        key(&client, org.id, NewKey::new("o").with_allowed_ips(list(&["203.0.113.0/24"]))).await;
    let (anywhere, _) = key(&client, org.id, NewKey::new("a")).await;

    let direct = serve_with_peer(app(ApiKeyAuth::new(client.clone()))).await;
    for path in ["/whoami", "/plain"] {
        let url = format!("{direct}{path}");
        assert_eq!(fetch(&url, &[("x-api-key", &local)]).await.status, 200, "{path}");
        assert_eq!(fetch(&url, &[("x-api-key", &anywhere)]).await.status, 200, "{path}");
        let a = fetch(&url, &[("x-api-key", &office)]).await;
        a.assert_problem(403, "ip_not_allowed", &office);
        // A forwarding header from an untrusted peer is the sender's own claim.
        let spoofed = [("x-api-key", office.as_str()), ("x-forwarded-for", "203.0.113.9")];
        fetch(&url, &spoofed).await.assert_problem(403, "ip_not_allowed", &office);
    }

    let proxies =
        TrustedProxies::new(list(&["127.0.0.0/8"]), ForwardedHeader::XForwardedFor).unwrap();
    let behind =
        serve_with_peer(app(ApiKeyAuth::new(client.clone()).trusted_proxies(proxies))).await;
    for path in ["/whoami", "/plain"] {
        let url = format!("{behind}{path}");
        let chain = "6.6.6.6, 203.0.113.9";
        let forwarded = [("x-api-key", office.as_str()), ("x-forwarded-for", chain)];
        assert_eq!(fetch(&url, &forwarded).await.status, 200, "{path}");
        // The client is 203.0.113.9 now, not the loopback proxy.
        let forwarded = [("x-api-key", local.as_str()), ("x-forwarded-for", chain)];
        fetch(&url, &forwarded).await.assert_problem(403, "ip_not_allowed", &local);
        // The proxy's own request, without a header: its address.
        assert_eq!(fetch(&url, &[("x-api-key", &local)]).await.status, 200, "{path}");
        // A header the proxy chain garbled: unknown, refused.
        let garbled = [("x-api-key", office.as_str()), ("x-forwarded-for", "203.0.113.9, unknown")];
        let a = fetch(&url, &garbled).await;
        a.assert_problem(403, "ip_not_allowed", &office);
        assert!(a.body["detail"].as_str().unwrap().contains("unknown address"), "{}", a.text);
    }

    // Served without connection info: no address, so keys with an allowlist are refused.
    let blind = serve(app(ApiKeyAuth::new(client.clone()))).await;
    let a = fetch(&format!("{blind}/whoami"), &[("x-api-key", &local)]).await;
    a.assert_problem(403, "ip_not_allowed", &local);
    assert_eq!(fetch(&format!("{blind}/whoami"), &[("x-api-key", &anywhere)]).await.status, 200);
}

/// A key disabled and enabled by another replica (the admin's) is refused and served again
/// by a caching guard within its staleness bound.
pub async fn a_disable_and_enable_reach_a_caching_guard(db: TestDb) {
    let cache = KeyCache::new().max_staleness(Duration::from_millis(300));
    let guard_client = db.client_with(|b| b.cache(cache)).await;
    let admin: ApiKeyClient = db.client().await;
    let (org, _) = admin.get_or_create_organization("acme").await.unwrap();
    let (plain, id) = key(&admin, org.id, NewKey::new("c")).await;
    let guard = serve(app(ApiKeyAuth::new(guard_client))).await;
    let url = format!("{guard}/whoami");
    assert_eq!(fetch(&url, &[("x-api-key", &plain)]).await.status, 200);
    admin.disable_key(id).await.unwrap();
    let until = |status: u16| {
        let (url, plain) = (url.clone(), plain.clone());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let a = fetch(&url, &[("x-api-key", &plain)]).await;
                if a.status == status {
                    return a;
                }
                assert!(std::time::Instant::now() < deadline, "still {}: {}", a.status, a.text);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(401).await.assert_problem(401, "disabled", &plain);
    admin.enable_key(id).await.unwrap();
    until(200).await;
}
