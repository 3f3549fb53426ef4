//! The management API end to end through real HTTP.

use apikeys_axum::{Admin, ApiKeyAuth, ManagementApi, ValidKey};
use apikeys_db::core::find_keys;
use apikeys_db::{ApiKeyClient, Credits, Error, KeyAction, NewKey, OrgId, ValidateOptions};
use axum::Router;
use axum::http::request::Parts;
use axum::routing::get;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{Answer, fetch, serve_with_peer};
use apikeys_testing::TestDb;

const TOKEN: &str = "admin-token-for-tests";

/// The management API under `/admin` behind an `x-admin-token` check, and `/protected`
/// guarded by the same store.
async fn app(client: ApiKeyClient) -> String {
    let admin = ManagementApi::new(client.clone())
        .openapi_at("/openapi.json")
        .nested_at("/admin")
        .authorized_by_fn(|parts| parts.headers.get("x-admin-token").is_some_and(|t| t == TOKEN));
    let auth = ApiKeyAuth::new(client);
    let protected = get(|k: ValidKey| async move { k.name.clone() })
        .route_layer(auth.require(ValidateOptions::new()));
    serve_with_peer(Router::new().nest("/admin", admin).route("/protected", protected)).await
}

/// The guarded route, called with `key`.
async fn protected(base: &str, key: &str) -> Answer {
    fetch(&format!("{base}/protected"), &[("x-api-key", key)]).await
}

async fn call(base: &str, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}/admin{path}"))
        .header("x-admin-token", TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    Answer::of(request.send().await.unwrap()).await
}

pub async fn the_router_refuses_requests_its_admin_check_refuses(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let before = db.counts(&client).await;
    for (method, path) in [
        (Method::POST, "/orgs"),
        (Method::GET, "/orgs"),
        (Method::GET, "/openapi.json"),
        (Method::DELETE, "/keys/0191a0a0-0000-7000-8000-000000000000"),
    ] {
        for token in [None, Some("wrong")] {
            let mut request = reqwest::Client::new()
                .request(method.clone(), format!("{base}/admin{path}"))
                .json(&json!({"name": "evil"}));
            if let Some(token) = token {
                request = request.header("x-admin-token", token);
            }
            let a = Answer::of(request.send().await.unwrap()).await;
            a.assert_problem(403, "forbidden", "");
        }
    }
    assert_eq!(db.counts(&client).await, before);
}

pub async fn organizations_projects_and_products_end_to_end(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let org = call(&base, Method::POST, "/orgs", Some(json!({"name": "acme"}))).await;
    assert_eq!(org.status, 201, "{}", org.text);
    let org_id = org.body["id"].as_str().unwrap().to_owned();
    let again = call(&base, Method::POST, "/orgs", Some(json!({"name": "acme"}))).await;
    again.assert_problem(409, "already_exists", "");
    assert_eq!(
        (again.body["kind"].clone(), again.body["id"].clone()),
        (json!("organization"), json!(org_id))
    );
    assert_eq!(call(&base, Method::GET, &format!("/orgs/{org_id}"), None).await.body, org.body);
    let orgs = call(&base, Method::GET, "/orgs", None).await.body;
    assert_eq!(orgs, json!({"items": [org.body], "next": null}));

    let project =
        call(&base, Method::POST, &format!("/orgs/{org_id}/projects"), Some(json!({"name": "v1"})))
            .await;
    assert_eq!(project.status, 201, "{}", project.text);
    let project_id = project.body["id"].as_str().unwrap().to_owned();
    let product = call(
        &base,
        Method::POST,
        &format!("/orgs/{org_id}/products"),
        Some(json!({"name": "search"})),
    )
    .await;
    assert_eq!(product.status, 201);
    let product_id = product.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&base, Method::GET, &format!("/projects/{project_id}"), None).await.body,
        project.body
    );
    assert_eq!(
        call(&base, Method::GET, &format!("/products/{product_id}"), None).await.body,
        product.body
    );
    assert_eq!(
        call(&base, Method::GET, &format!("/orgs/{org_id}/projects"), None).await.body,
        json!({"items": [project.body], "next": null})
    );
    assert_eq!(
        call(&base, Method::GET, &format!("/orgs/{org_id}/products"), None).await.body,
        json!({"items": [product.body], "next": null})
    );

    let link = format!("/projects/{project_id}/products/{product_id}");
    for _ in 0..2 {
        assert_eq!(call(&base, Method::PUT, &link, None).await.status, 204);
    }
    let linked = call(&base, Method::GET, &format!("/projects/{project_id}/products"), None).await;
    assert_eq!(linked.body, json!([product.body]));
    assert_eq!(call(&base, Method::DELETE, &link, None).await.status, 204);
    let linked = call(&base, Method::GET, &format!("/projects/{project_id}/products"), None).await;
    assert_eq!(linked.body, json!([]));

    let unknown = "0191a0a0-0000-7000-8000-000000000000";
    for path in [
        format!("/orgs/{unknown}"),
        format!("/orgs/{unknown}/projects"),
        format!("/orgs/{unknown}/keys"),
        format!("/projects/{unknown}"),
        format!("/products/{unknown}"),
        format!("/projects/{unknown}/keys"),
        format!("/keys/{unknown}"),
    ] {
        let a = call(&base, Method::GET, &path, None).await;
        a.assert_problem(404, "not_found", "");
        assert_eq!(a.body["id"], unknown, "{path}");
    }
    let a =
        call(&base, Method::PUT, &format!("/projects/{project_id}/products/{unknown}"), None).await;
    a.assert_problem(404, "not_found", "");
    assert_eq!(a.body["kind"], "product");
}

pub async fn keys_end_to_end(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let body = json!({
        "name": "ci", "scopes": ["read", "write"], "custom": {"plan": "pro"},
        "rate_limit": {"requests": 100, "window": "minute"}, "expires_in_seconds": 3600
    });
    let created = call(&base, Method::POST, &format!("/orgs/{}/keys", org.id), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.header("cache-control"), "no-store");
    let plain = created.body["key"].as_str().unwrap().to_owned();
    let record = created.body["record"].clone();
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["scopes"], json!(["read", "write"]));
    assert_eq!(record["custom"], json!({"plan": "pro"}));
    assert_eq!(record["rate_limit"], json!({"requests": 100, "window": "minute"}));
    assert!(record["expires_at"].is_string());
    assert!(!record.to_string().contains(&plain));

    // The key works at once on a guarded route.
    let a = fetch(&format!("{base}/protected"), &[("x-api-key", &plain)]).await;
    assert_eq!(a.text, "ci");
    let got = call(&base, Method::GET, &format!("/keys/{id}"), None).await;
    assert_eq!(got.body["id"], id);
    assert_eq!(got.body["use_count"], 1);
    assert!(!got.text.contains(&plain));

    let patch = json!({"name": "renamed", "scopes": ["read"], "rate_limit": null});
    let updated = call(&base, Method::PATCH, &format!("/keys/{id}"), Some(patch)).await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_eq!(updated.body["name"], "renamed");
    assert_eq!(updated.body["scopes"], json!(["read"]));
    assert_eq!(updated.body["rate_limit"], Value::Null);
    assert_eq!(updated.body["custom"], json!({"plan": "pro"}), "absent members stay");
    assert_eq!(fetch(&format!("{base}/protected"), &[("x-api-key", &plain)]).await.text, "renamed");

    let revoked = call(&base, Method::POST, &format!("/keys/{id}/revoke"), None).await;
    assert_eq!(revoked.status, 200);
    assert!(revoked.body["revoked_at"].is_string());
    fetch(&format!("{base}/protected"), &[("x-api-key", &plain)])
        .await
        .assert_problem(401, "revoked", &plain);

    assert_eq!(call(&base, Method::DELETE, &format!("/keys/{id}"), None).await.status, 204);
    call(&base, Method::GET, &format!("/keys/{id}"), None).await.assert_problem(
        404,
        "not_found",
        "",
    );
    call(&base, Method::DELETE, &format!("/keys/{id}"), None).await.assert_problem(
        404,
        "not_found",
        "",
    );
    fetch(&format!("{base}/protected"), &[("x-api-key", &plain)]).await.assert_problem(
        401,
        "invalid_key",
        &plain,
    );

    // A key narrowed to a project and a product, never expiring.
    let (project, _) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let (product, _) = client.get_or_create_product(org.id, "search").await.unwrap();
    let body = json!({"name": "narrow", "project_id": project.id, "product_id": product.id, "never_expires": true});
    let created = call(&base, Method::POST, &format!("/orgs/{}/keys", org.id), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["record"]["project_id"], json!(project.id));
    assert_eq!(created.body["record"]["expires_at"], Value::Null);
}

pub async fn listing_filters_by_status_and_pages(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (project, _) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut new = apikeys_db::NewKey::new(format!("k{i}"));
        if i % 2 == 0 {
            new = new.with_project(project.id);
        }
        ids.push(client.create_key(org.id, new).await.unwrap().record.id);
    }
    client.revoke_key(ids[1]).await.unwrap();
    client.revoke_key(ids[2]).await.unwrap();

    let names = |a: &Answer| -> Vec<String> {
        a.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = call(&base, Method::GET, &format!("/orgs/{}/keys", org.id), None).await;
    assert_eq!(names(&all), ["k0", "k1", "k2", "k3", "k4"]);
    assert_eq!(all.body["next"], Value::Null);
    let active =
        call(&base, Method::GET, &format!("/orgs/{}/keys?status=active", org.id), None).await;
    assert_eq!(names(&active), ["k0", "k3", "k4"]);
    let revoked =
        call(&base, Method::GET, &format!("/orgs/{}/keys?status=revoked", org.id), None).await;
    assert_eq!(names(&revoked), ["k1", "k2"]);
    let in_project =
        call(&base, Method::GET, &format!("/projects/{}/keys?status=active", project.id), None)
            .await;
    assert_eq!(names(&in_project), ["k0", "k4"]);

    let mut seen = Vec::new();
    let mut path = format!("/orgs/{}/keys?limit=2", org.id);
    loop {
        let page = call(&base, Method::GET, &path, None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        assert!(names(&page).len() <= 2);
        seen.extend(names(&page));
        match page.body["next"].as_str() {
            Some(next) => path = format!("/orgs/{}/keys?limit=2&after={next}", org.id),
            None => break,
        }
    }
    assert_eq!(seen, ["k0", "k1", "k2", "k3", "k4"]);
}

pub async fn bad_input_is_a_problem_and_changes_nothing(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let key = client.create_key(org.id, apikeys_db::NewKey::new("k")).await.unwrap().record;
    let keys = format!("/orgs/{}/keys", org.id);
    let before = db.counts(&client).await;

    // Requests that do not parse: 400-class problems, code bad_request.
    for (content_type, body, status) in
        [(Some("application/json"), "{not json", 400), (None, "{}", 415)]
    {
        let mut request = reqwest::Client::new()
            .post(format!("{base}/admin{keys}"))
            .header("x-admin-token", TOKEN);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let a = Answer::of(request.body(body).send().await.unwrap()).await;
        a.assert_problem(status, "bad_request", "");
    }
    for (method, path, body, status) in [
        (Method::POST, keys.clone(), Some(json!({"name": "x", "admin": true})), 422),
        (
            Method::POST,
            keys.clone(),
            Some(json!({"name": "x", "rate_limit": {"requests": 0, "window": "minute"}})),
            422,
        ),
        (
            Method::POST,
            keys.clone(),
            Some(json!({"name": "x", "rate_limit": {"requests": 1, "window": "fortnight"}})),
            422,
        ),
        (Method::GET, "/keys/not-a-uuid".to_owned(), None, 400),
        (Method::GET, format!("{keys}?status=lost"), None, 400),
        (Method::GET, format!("{keys}?after=nope"), None, 400),
        (Method::PATCH, format!("/keys/{}", key.id), Some(json!({"name": 5})), 422),
    ] {
        let a = call(&base, method, &path, body).await;
        a.assert_problem(status, "bad_request", "");
    }

    // Values the store rejects: 422 naming the field.
    for (method, path, body, field) in [
        (Method::POST, keys.clone(), json!({"name": ""}), "name"),
        (Method::POST, keys.clone(), json!({"name": "x", "scopes": ["no spaces"]}), "scopes"),
        (Method::POST, keys.clone(), json!({"name": "x", "custom": [1, 2]}), "custom"),
        (
            Method::POST,
            keys.clone(),
            json!({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (Method::POST, keys.clone(), json!({"name": "x", "expires_in_seconds": 0}), "expires_at"),
        (
            Method::POST,
            keys.clone(),
            json!({"name": "x", "never_expires": true, "expires_in_seconds": 5}),
            "expires_at",
        ),
        (Method::POST, "/orgs".to_owned(), json!({"name": "  "}), "name"),
        (Method::PATCH, format!("/keys/{}", key.id), json!({"custom": "text"}), "custom"),
        (Method::PATCH, format!("/keys/{}", key.id), json!({"scopes": ["a", "a"]}), "scopes"),
    ] {
        let a = call(&base, method, &path, Some(body.clone())).await;
        a.assert_problem(422, "invalid_input", "");
        assert_eq!(a.body["field"], field, "{body}: {}", a.text);
    }
    let a = call(&base, Method::GET, &format!("{keys}?limit=0"), None).await;
    a.assert_problem(422, "invalid_input", "");
    assert_eq!(a.body["field"], "page.limit");
    let a = call(&base, Method::GET, &format!("{keys}?limit=1001"), None).await;
    assert_eq!(a.body["field"], "page.limit");
    // A key narrowed to a project of another organization: not found, nothing created.
    let (other, _) = client.get_or_create_organization("other").await.unwrap();
    let (foreign, _) = client.get_or_create_project(other.id, "theirs").await.unwrap();
    let tables = before.len();
    let before = [before, db.counts(&client).await].concat();
    let a = call(&base, Method::POST, &keys, Some(json!({"name": "x", "project_id": foreign.id})))
        .await;
    assert!(a.status == 404 || a.status == 422, "{}", a.text);
    assert_eq!([before[..tables].to_vec(), db.counts(&client).await].concat(), before);
    assert_eq!(client.get_key(key.id).await.unwrap(), key);
}

/// A request whose path, query or body does not parse is answered with a problem that
/// names the part (`field`) and never repeats the value: not a key given where an id
/// belongs (the natural mistake), not any other value. Every route taking an id is tried,
/// in each of its id positions, with a key of this store, a key of another format and a
/// plain marker value; then the query parameters and the body members.
pub async fn values_that_do_not_parse_are_never_echoed(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (project, _) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let (product, _) = client.get_or_create_product(org.id, "search").await.unwrap();
    let issued = client.create_key(org.id, apikeys_db::NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret().to_owned();
    let foreign = apikeys_db::KeyFormat::new("acme", Some("live")).unwrap().generate().unwrap();
    let before = db.counts(&client).await;
    let body = || Some(json!({"name": "x"}));
    let mut failures = Vec::new();
    let mut check = |what: String, a: Answer, status: u16, field: Option<&str>, value: &str| {
        let echoed = a.text.contains(value) || !find_keys(a.text.as_bytes()).is_empty();
        let problem = a.status == status
            && a.header("content-type") == "application/problem+json"
            && a.body["code"] == "bad_request";
        let named = a.body["field"].as_str() == field;
        if echoed || !problem || !named {
            failures.push(format!("{what}: {} {}", a.status, a.text));
        }
    };
    for bad in [key.as_str(), foreign.expose_secret(), "marker-value-4242"] {
        let (o, pj, pd, k) =
            (org.id.to_string(), project.id.to_string(), product.id, issued.record.id);
        let routes: Vec<(Method, String, Option<Value>, &str)> = vec![
            (Method::GET, format!("/orgs/{bad}"), None, "org_id"),
            (Method::GET, format!("/orgs/{bad}/projects"), None, "org_id"),
            (Method::POST, format!("/orgs/{bad}/projects"), body(), "org_id"),
            (Method::GET, format!("/orgs/{bad}/products"), None, "org_id"),
            (Method::POST, format!("/orgs/{bad}/products"), body(), "org_id"),
            (Method::GET, format!("/orgs/{bad}/keys"), None, "org_id"),
            (Method::POST, format!("/orgs/{bad}/keys"), body(), "org_id"),
            (Method::GET, format!("/projects/{bad}"), None, "project_id"),
            (Method::GET, format!("/projects/{bad}/keys"), None, "project_id"),
            (Method::GET, format!("/projects/{bad}/products"), None, "project_id"),
            (Method::PUT, format!("/projects/{bad}/products/{pd}"), None, "project_id"),
            (Method::DELETE, format!("/projects/{bad}/products/{pd}"), None, "project_id"),
            (Method::PUT, format!("/projects/{pj}/products/{bad}"), None, "product_id"),
            (Method::DELETE, format!("/projects/{pj}/products/{bad}"), None, "product_id"),
            (Method::GET, format!("/products/{bad}"), None, "product_id"),
            (Method::GET, format!("/keys/{bad}"), None, "key_id"),
            (Method::PATCH, format!("/keys/{bad}"), body(), "key_id"),
            (Method::DELETE, format!("/keys/{bad}"), None, "key_id"),
            (Method::POST, format!("/keys/{bad}/revoke"), None, "key_id"),
            (Method::POST, format!("/keys/{bad}/disable"), None, "key_id"),
            (Method::POST, format!("/keys/{bad}/enable"), None, "key_id"),
            (
                Method::POST,
                format!("/keys/{bad}/roll"),
                Some(json!({"grace_seconds": 0})),
                "key_id",
            ),
            (
                Method::POST,
                format!("/keys/{bad}/renew"),
                Some(json!({"extend_by_seconds": 1})),
                "key_id",
            ),
            (Method::GET, format!("/keys/{bad}/events"), None, "key_id"),
            (Method::POST, format!("/keys/{bad}/credits"), Some(json!({"add": 1})), "key_id"),
            (Method::GET, format!("/orgs/{bad}/owners/u/keys"), None, "org_id"),
            (Method::POST, format!("/orgs/{bad}/owners/u/revoke"), None, "org_id"),
        ];
        for (method, path, body, field) in routes {
            let what = format!("{method} {path}");
            check(what, call(&base, method, &path, body).await, 400, Some(field), bad);
        }
        // Query parameters.
        for (query, field) in [
            (format!("status={bad}"), Some("status")),
            (format!("after={bad}"), Some("after")),
            (format!("limit={bad}"), Some("limit")),
            (format!("status=active&after={bad}"), Some("after")),
            (format!("{bad}=1"), None),
        ] {
            for path in [format!("/orgs/{o}/keys?{query}"), format!("/projects/{pj}/keys?{query}")]
            {
                let a = call(&base, Method::GET, &path, None).await;
                check(format!("GET {path}"), a, 400, field, bad);
            }
        }
        // Body members (422: JSON that does not fit; 400: not JSON at all).
        let keys = format!("/orgs/{o}/keys");
        let patch = format!("/keys/{k}");
        for (method, path, body, status, field) in [
            (Method::POST, &keys, json!({"name": "x", "project_id": bad}), 422, Some("project_id")),
            (Method::POST, &keys, json!({"name": "x", "product_id": bad}), 422, Some("product_id")),
            (Method::POST, &keys, json!({"name": "x", "expires_at": bad}), 422, Some("expires_at")),
            (
                Method::POST,
                &keys,
                json!({"name": "x", "expires_in_seconds": bad}),
                422,
                Some("expires_in_seconds"),
            ),
            (
                Method::POST,
                &keys,
                json!({"name": "x", "rate_limit": {"requests": 1, "window": bad}}),
                422,
                Some("rate_limit.window"),
            ),
            (
                Method::POST,
                &keys,
                json!({"name": "x", "scopes": ["a", [bad]]}),
                422,
                Some("scopes[1]"),
            ),
            (Method::POST, &keys, json!({"name": "x", bad: true}), 422, None),
            (Method::POST, &keys, json!({"name": [bad]}), 422, Some("name")),
            (Method::POST, &"/orgs".to_owned(), json!({bad: "x"}), 422, None),
            (Method::PATCH, &patch, json!({"rate_limit": bad}), 422, Some("rate_limit")),
            (Method::PATCH, &patch, json!({"scopes": bad}), 422, Some("scopes")),
        ] {
            let what = format!("{method} {path} {body}");
            check(what, call(&base, method, path, Some(body)).await, status, field, bad);
        }
        // (serde reads a member's name before its value: an unknown one is refused first.)
        for (text, status) in [
            (format!("{{\"name\": \"x\", \"custom\": {{\"{bad}\": tru}}}}"), 400),
            (format!("{{\"name\": \"x\", \"{bad}\": }}"), 422),
            (format!("{{\"name\": {bad}}}"), 400),
        ] {
            let a = reqwest::Client::new()
                .post(format!("{base}/admin{keys}"))
                .header("x-admin-token", TOKEN)
                .header("content-type", "application/json")
                .body(text.clone())
                .send()
                .await
                .unwrap();
            check(format!("POST {keys} {text}"), Answer::of(a).await, status, None, bad);
        }
    }
    // A member that is missing is named (by the type's own field name).
    let a = call(&base, Method::POST, "/orgs", Some(json!({}))).await;
    a.assert_problem(422, "bad_request", "");
    assert_eq!(
        (a.body["field"].as_str(), a.body["detail"].as_str()),
        (Some("name"), Some("the body member `name` is missing"))
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing was written, and the key still works.
    assert_eq!(db.counts(&client).await, before);
    client.verify_key(&key, &apikeys_db::VerifyOptions::new()).await.unwrap();
}

pub async fn the_openapi_document_describes_every_route(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let doc = call(&base, Method::GET, "/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.1.0");
    assert_eq!(doc.body["servers"], json!([{"url": "/admin"}]));
    let paths = doc.body["paths"].as_object().unwrap();
    let mut routes: Vec<String> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            "DELETE /keys/{key_id}",
            "DELETE /orgs/{org_id}/owners/{owner_id}",
            "DELETE /projects/{project_id}/products/{product_id}",
            "GET /keys/{key_id}",
            "GET /keys/{key_id}/events",
            "GET /orgs",
            "GET /orgs/{org_id}",
            "GET /orgs/{org_id}/keys",
            "GET /orgs/{org_id}/owners",
            "GET /orgs/{org_id}/owners/{owner_id}",
            "GET /orgs/{org_id}/owners/{owner_id}/keys",
            "GET /orgs/{org_id}/products",
            "GET /orgs/{org_id}/projects",
            "GET /products/{product_id}",
            "GET /projects/{project_id}",
            "GET /projects/{project_id}/keys",
            "GET /projects/{project_id}/products",
            "PATCH /keys/{key_id}",
            "PATCH /orgs/{org_id}/owners/{owner_id}",
            "POST /keys/{key_id}/credits",
            "POST /keys/{key_id}/disable",
            "POST /keys/{key_id}/enable",
            "POST /keys/{key_id}/renew",
            "POST /keys/{key_id}/revoke",
            "POST /keys/{key_id}/roll",
            "POST /orgs",
            "POST /orgs/{org_id}/keys",
            "POST /orgs/{org_id}/owners/{owner_id}/credits",
            "POST /orgs/{org_id}/owners/{owner_id}/revoke",
            "POST /orgs/{org_id}/products",
            "POST /orgs/{org_id}/projects",
            "PUT /orgs/{org_id}/owners/{owner_id}",
            "PUT /projects/{project_id}/products/{product_id}",
        ]
    );
    let schemas = doc.body["components"]["schemas"].as_object().unwrap();
    for name in [
        "ApiKey",
        "Problem",
        "NewKeyInput",
        "CreatedKey",
        "UpdateKeyBody",
        "RateLimit",
        "Organization",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}: {:?}", schemas.keys());
    }
    assert_eq!(
        doc.body["paths"]["/orgs/{org_id}/keys"]["post"]["responses"]["201"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/CreatedKey"
    );
    // The create body is NewKeyInput, with every option of NewKey and no other member.
    let create = &doc.body["paths"]["/orgs/{org_id}/keys"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["$ref"];
    assert_eq!(create, "#/components/schemas/NewKeyInput");
    let input = &schemas["NewKeyInput"];
    let members: Vec<&str> =
        input["properties"].as_object().unwrap().keys().map(String::as_str).collect();
    for member in [
        "name",
        "project_id",
        "product_id",
        "scopes",
        "rate_limit",
        "custom",
        "owner_id",
        "credits",
        "expires_at",
        "expires_in_seconds",
        "never_expires",
        "allowed_ips",
        "rate_limits",
    ] {
        assert!(members.contains(&member), "NewKeyInput lacks {member}: {members:?}");
    }
    assert_eq!(members.len(), 13, "{members:?}");
    assert_eq!(input["additionalProperties"], false, "{input}");
    assert_eq!(input["required"], json!(["name"]), "{input}");
    // The document served equals the one the host can take for its own.
    let own =
        serde_json::to_value(ManagementApi::new(client).nested_at("/admin").openapi()).unwrap();
    assert_eq!(own, doc.body);
}

/// `POST /orgs/{org_id}/keys` takes every option of `NewKey`: the record that comes back has
/// them all (owner and credits with their refill included), the guard spends the credits,
/// and the owner's listing finds the key.
pub async fn create_takes_every_option_of_new_key(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (project, _) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let (product, _) = client.get_or_create_product(org.id, "search").await.unwrap();
    let expires_at = "2999-01-31T00:00:00Z";
    let body = json!({
        "name": "billing",
        "project_id": project.id,
        "product_id": product.id,
        "scopes": ["read", "write"],
        "rate_limit": {"requests": 1000, "window": "hour"},
        "rate_limits": {"daily": {"requests": 20000, "window": "day"}},
        "custom": {"plan": "pro"},
        "owner_id": "user-42",
        "credits": {"remaining": 2, "refill": {"amount": 50, "interval": "month"}},
        "expires_at": expires_at,
    });
    let created = call(&base, Method::POST, &format!("/orgs/{}/keys", org.id), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let plain = created.body["key"].as_str().unwrap().to_owned();
    let record = &created.body["record"];
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["project_id"], json!(project.id));
    assert_eq!(record["product_id"], json!(product.id));
    assert_eq!(record["scopes"], json!(["read", "write"]));
    assert_eq!(record["rate_limit"], json!({"requests": 1000, "window": "hour"}));
    assert_eq!(record["rate_limits"], json!({"daily": {"requests": 20000, "window": "day"}}));
    assert_eq!(record["custom"], json!({"plan": "pro"}));
    assert_eq!(record["owner_id"], "user-42");
    assert_eq!(
        record["credits"],
        json!({"remaining": 2, "refill": {"amount": 50, "interval": "month"}})
    );
    assert_eq!(record["expires_at"], "2999-01-31T00:00:00Z");
    // The stored key is what the answer said.
    let stored = call(&base, Method::GET, &format!("/keys/{id}"), None).await;
    assert_eq!(stored.body, *record, "{}", stored.text);
    // Named limits are replaced by PATCH, and removed by `null` (as `{}`).
    let path = format!("/keys/{id}");
    let burst = json!({"rate_limits": {"burst": {"requests": 5, "window": "second"}}});
    let patched = call(&base, Method::PATCH, &path, Some(burst)).await;
    assert_eq!(patched.body["rate_limits"], json!({"burst": {"requests": 5, "window": "second"}}));
    let none = call(&base, Method::PATCH, &path, Some(json!({"rate_limits": null}))).await;
    assert_eq!(none.body["rate_limits"], json!({}), "{}", none.text);

    // The credits are spent by checks: two pass, the third is refused until the refill.
    for _ in 0..2 {
        assert_eq!(
            fetch(&format!("{base}/protected"), &[("x-api-key", &plain)]).await.text,
            "billing"
        );
    }
    fetch(&format!("{base}/protected"), &[("x-api-key", &plain)]).await.assert_problem(
        429,
        "usage_exhausted",
        &plain,
    );
    let spent = call(&base, Method::GET, &format!("/keys/{id}"), None).await;
    assert_eq!(spent.body["credits"]["remaining"], 0, "{}", spent.text);
    // The owner's listing finds it.
    let owned = client
        .list_owner_keys(
            org.id,
            "user-42",
            apikeys_db::StatusFilter::All,
            apikeys_db::Page::default(),
        )
        .await
        .unwrap();
    assert_eq!(owned.items.len(), 1);
    assert_eq!(owned.items[0].id.to_string(), id);
}

/// The create body refuses what it does not take: an unknown member (at the top or inside
/// `credits` or `rate_limit`) is a 422 naming it, and a bad owner or credits is a 422
/// `invalid_input` naming the field; none of it writes anything or repeats a value.
pub async fn create_refuses_unknown_members_and_bad_values(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let keys = format!("/orgs/{}/keys", org.id);
    let before = db.counts(&client).await;
    for (body, field) in [
        (json!({"name": "x", "owner": "user-42"}), "owner"),
        (
            json!({"name": "x", "credits": {"remaining": 5, "refil": {"amount": 5, "interval": "day"}}}),
            "credits.refil",
        ),
        (
            json!({"name": "x", "credits": {"remaining": 5, "refill": {"amount": 5, "interval": "day", "at": 1}}}),
            "credits.refill.at",
        ),
        (
            json!({"name": "x", "rate_limit": {"requests": 5, "window": "minute", "burst": 9}}),
            "rate_limit.burst",
        ),
    ] {
        let a = call(&base, Method::POST, &keys, Some(body.clone())).await;
        a.assert_problem(422, "bad_request", "");
        assert_eq!(a.body["field"], field, "{body}: {}", a.text);
        let detail = a.body["detail"].as_str().unwrap();
        assert!(detail.contains("not one this request takes"), "{body}: {detail}");
    }
    for (body, field) in [
        (json!({"name": "x", "owner_id": ""}), "owner_id"),
        (json!({"name": "x", "owner_id": " padded"}), "owner_id"),
        (json!({"name": "x", "credits": {"remaining": u64::MAX}}), "credits"),
        (
            json!({"name": "x", "credits": {"remaining": 1, "refill": {"amount": 0, "interval": "day"}}}),
            "credits",
        ),
    ] {
        let a = call(&base, Method::POST, &keys, Some(body.clone())).await;
        a.assert_problem(422, "invalid_input", "");
        assert_eq!(a.body["field"], field, "{body}: {}", a.text);
    }
    assert_eq!(db.counts(&client).await, before);
    // A key given as a member's name is refused without being named.
    let key = client.create_key(org.id, apikeys_db::NewKey::new("k")).await.unwrap();
    let before = db.counts(&client).await;
    let k = key.key.expose_secret();
    let a = call(&base, Method::POST, &keys, Some(json!({"name": "x", k: "1"}))).await;
    a.assert_problem(422, "bad_request", k);
    assert_eq!(a.body["field"], Value::Null, "{}", a.text);
    // A named limit's name that is not one (a typo's case, a key pasted there) is refused,
    // naming the member and never the name.
    let limit = json!({"requests": 5, "window": "day"});
    for name in ["Daily", k, "key"] {
        let body = json!({"name": "x", "rate_limits": {name: limit}});
        let a = call(&base, Method::POST, &keys, Some(body)).await;
        a.assert_problem(422, "bad_request", k);
        assert_eq!(a.body["field"], "rate_limits", "{}", a.text);
        assert!(!a.text.contains("Daily"), "{}", a.text);
    }
    assert_eq!(db.counts(&client).await, before);
}

/// Disable and enable through the API, as the guard answers them; a revoked key stays
/// revoked (409 for the admin, never a 401 that would blame the admin's credentials).
pub async fn disable_and_enable_through_the_api(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let org = call(&base, Method::POST, "/orgs", Some(json!({"name": "acme"}))).await;
    let org_id = org.body["id"].as_str().unwrap().to_owned();
    let created =
        call(&base, Method::POST, &format!("/orgs/{org_id}/keys"), Some(json!({"name": "ci"})))
            .await;
    let plain = created.body["key"].as_str().unwrap().to_owned();
    let id = created.body["record"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["record"]["disabled_at"], Value::Null);
    assert_eq!(protected(&base, &plain).await.status, 200);

    let disabled = call(&base, Method::POST, &format!("/keys/{id}/disable"), None).await;
    assert_eq!(disabled.status, 200, "{}", disabled.text);
    let since = disabled.body["disabled_at"].clone();
    assert!(since.is_string(), "{}", disabled.text);
    let refused = protected(&base, &plain).await;
    refused.assert_problem(401, "disabled", &plain);
    assert_eq!(refused.body["disabled_at"], since);
    // A second disable keeps the first time; the key is listed as disabled, not active.
    let again = call(&base, Method::POST, &format!("/keys/{id}/disable"), None).await;
    assert_eq!((again.status, &again.body["disabled_at"]), (200, &since));
    let listed = |status: &'static str| {
        let base = base.clone();
        let org_id = org_id.clone();
        async move {
            let page =
                call(&base, Method::GET, &format!("/orgs/{org_id}/keys?status={status}"), None)
                    .await;
            page.body["items"].as_array().unwrap().len()
        }
    };
    assert_eq!((listed("disabled").await, listed("active").await), (1, 0));

    let enabled = call(&base, Method::POST, &format!("/keys/{id}/enable"), None).await;
    assert_eq!((enabled.status, &enabled.body["disabled_at"]), (200, &Value::Null));
    assert_eq!(protected(&base, &plain).await.status, 200);
    assert_eq!((listed("disabled").await, listed("active").await), (0, 1));
    let events = client.list_key_events(id.parse().unwrap()).await.unwrap();
    let actions: Vec<_> = events.iter().map(|e| e.action).collect();
    let count = |a| actions.iter().filter(|x| **x == a).count();
    assert_eq!((count(KeyAction::Disabled), count(KeyAction::Enabled)), (1, 1), "{actions:?}");

    assert_eq!(call(&base, Method::POST, &format!("/keys/{id}/revoke"), None).await.status, 200);
    for verb in ["disable", "enable"] {
        let a = call(&base, Method::POST, &format!("/keys/{id}/{verb}"), None).await;
        a.assert_problem(409, "revoked", &plain);
        assert!(a.headers.get("www-authenticate").is_none());
    }
    let gone = "01938f2e-0000-7000-8000-000000000000";
    call(&base, Method::POST, &format!("/keys/{gone}/disable"), None).await.assert_problem(
        404,
        "not_found",
        "",
    );
}

/// IP allowlists set on create and by PATCH, judged by the guard against the connection's
/// address (loopback here); bad lists are 422 naming `allowed_ips` and change nothing.
pub async fn ip_allowlists_through_the_api(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let org = call(&base, Method::POST, "/orgs", Some(json!({"name": "acme"}))).await;
    let org_id = org.body["id"].as_str().unwrap().to_owned();
    let body = json!({"name": "office", "allowed_ips": ["127.0.0.0/8", "::1"]});
    let created = call(&base, Method::POST, &format!("/orgs/{org_id}/keys"), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["record"]["allowed_ips"], json!(["127.0.0.0/8", "::1/128"]));
    let plain = created.body["key"].as_str().unwrap().to_owned();
    let id = created.body["record"]["id"].as_str().unwrap().to_owned();
    assert_eq!(protected(&base, &plain).await.status, 200);

    let elsewhere = json!({"allowed_ips": ["203.0.113.0/24"]});
    let moved = call(&base, Method::PATCH, &format!("/keys/{id}"), Some(elsewhere)).await;
    assert_eq!(moved.body["allowed_ips"], json!(["203.0.113.0/24"]), "{}", moved.text);
    let refused = protected(&base, &plain).await;
    refused.assert_problem(403, "ip_not_allowed", &plain);
    assert!(refused.body["detail"].as_str().unwrap().contains("127.0.0.1"), "{}", refused.text);

    for bad in [json!(["10.1.2.3/8"]), json!([]), json!(["sk_live_notanip"]), json!("10.0.0.0/8")] {
        let a =
            call(&base, Method::PATCH, &format!("/keys/{id}"), Some(json!({"allowed_ips": bad})))
                .await;
        assert_eq!(a.status, 422, "{}", a.text);
        assert_eq!(a.body["field"], "allowed_ips", "{}", a.text);
        assert!(!a.text.contains("sk_live_notanip"), "{}", a.text);
        let create = json!({"name": "x", "allowed_ips": bad});
        let a = call(&base, Method::POST, &format!("/orgs/{org_id}/keys"), Some(create)).await;
        assert_eq!((a.status, &a.body["field"]), (422, &json!("allowed_ips")), "{}", a.text);
    }
    let got = call(&base, Method::GET, &format!("/keys/{id}"), None).await;
    assert_eq!(got.body["allowed_ips"], json!(["203.0.113.0/24"]), "bad updates changed nothing");
    let keys = call(&base, Method::GET, &format!("/orgs/{org_id}/keys"), None).await;
    assert_eq!(keys.body["items"].as_array().unwrap().len(), 1, "bad creates made no key");

    let cleared =
        call(&base, Method::PATCH, &format!("/keys/{id}"), Some(json!({"allowed_ips": null})))
            .await;
    assert_eq!(cleared.body["allowed_ips"], Value::Null);
    assert_eq!(protected(&base, &plain).await.status, 200);
}

/// Roll, renew and extend, the audit trail, owners' keys and PATCHing owner and credits,
/// through the API: the new plaintext once (no-store), the old key working in its grace,
/// 409 for a second roll and for a revoked key, 422 for a renew with both or neither member.
pub async fn roll_renew_events_and_owners_through_the_api(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let org = call(&base, Method::POST, "/orgs", Some(json!({"name": "acme"}))).await;
    let org_id = org.body["id"].as_str().unwrap().to_owned();
    let body = json!({"name": "ci", "owner_id": "user-1", "expires_in_seconds": 3600});
    let created = call(&base, Method::POST, &format!("/orgs/{org_id}/keys"), Some(body)).await;
    let old_plain = created.body["key"].as_str().unwrap().to_owned();
    let id = created.body["record"]["id"].as_str().unwrap().to_owned();

    let rolled =
        call(&base, Method::POST, &format!("/keys/{id}/roll"), Some(json!({"grace_seconds": 600})))
            .await;
    assert_eq!(rolled.status, 201, "{}", rolled.text);
    assert_eq!(rolled.header("cache-control"), "no-store");
    let new_plain = rolled.body["key"].as_str().unwrap().to_owned();
    let new_id = rolled.body["record"]["id"].as_str().unwrap().to_owned();
    assert_eq!(rolled.body["record"]["rolled_from"], json!(id));
    assert_eq!(protected(&base, &old_plain).await.status, 200, "the old key works in its grace");
    assert_eq!(protected(&base, &new_plain).await.status, 200);
    let again =
        call(&base, Method::POST, &format!("/keys/{id}/roll"), Some(json!({"grace_seconds": 0})))
            .await;
    again.assert_problem(409, "already_exists", &old_plain);
    assert_eq!(again.body["id"], json!(new_id));

    let later = "2999-01-01T00:00:00Z";
    let renewed = call(
        &base,
        Method::POST,
        &format!("/keys/{new_id}/renew"),
        Some(json!({"expires_at": later})),
    )
    .await;
    assert_eq!(
        (renewed.status, &renewed.body["expires_at"]),
        (200, &json!(later)),
        "{}",
        renewed.text
    );
    let extended = call(
        &base,
        Method::POST,
        &format!("/keys/{new_id}/renew"),
        Some(json!({"extend_by_seconds": 86400})),
    )
    .await;
    assert_eq!(extended.body["expires_at"], json!("2999-01-02T00:00:00Z"), "{}", extended.text);
    for bad in [json!({}), json!({"expires_at": later, "extend_by_seconds": 1})] {
        let a = call(&base, Method::POST, &format!("/keys/{new_id}/renew"), Some(bad)).await;
        a.assert_problem(422, "invalid_input", "");
    }
    let events = call(&base, Method::GET, &format!("/keys/{new_id}/events"), None).await;
    let actions: Vec<&str> = events.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["created", "renewed", "renewed"]);

    let patch = json!({"owner_id": "user-2", "credits": {"remaining": 1}});
    let updated = call(&base, Method::PATCH, &format!("/keys/{new_id}"), Some(patch)).await;
    assert_eq!(updated.body["owner_id"], "user-2", "{}", updated.text);
    assert_eq!(updated.body["credits"]["remaining"], 1);
    assert_eq!(protected(&base, &new_plain).await.status, 200);
    protected(&base, &new_plain).await.assert_problem(429, "usage_exhausted", &new_plain);
    let cleared =
        call(&base, Method::PATCH, &format!("/keys/{new_id}"), Some(json!({"credits": null})))
            .await;
    assert_eq!(cleared.body["credits"], Value::Null);

    let owned = call(&base, Method::GET, &format!("/orgs/{org_id}/owners/user-2/keys"), None).await;
    let ids: Vec<&str> =
        owned.body["items"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [new_id.as_str()]);
    let revoked =
        call(&base, Method::POST, &format!("/orgs/{org_id}/owners/user-2/revoke"), None).await;
    assert_eq!(revoked.body["revoked"], json!([new_id]), "{}", revoked.text);
    protected(&base, &new_plain).await.assert_problem(401, "revoked", &new_plain);
    let revoked_roll = call(
        &base,
        Method::POST,
        &format!("/keys/{new_id}/roll"),
        Some(json!({"grace_seconds": 0})),
    )
    .await;
    revoked_roll.assert_problem(409, "revoked", &new_plain);
    let gone = "01938f2e-0000-7000-8000-000000000000";
    call(&base, Method::GET, &format!("/orgs/{gone}/owners/user-2/keys"), None)
        .await
        .assert_problem(404, "not_found", "");
}

/// Tokens of an admin of every organization, and of an admin of `acme` alone, each named.
fn bound_admins(acme: OrgId) -> impl Fn(&Parts) -> Option<Admin> + Clone + Send + Sync + 'static {
    move |parts: &Parts| match parts.headers.get("x-admin-token")?.to_str().ok()? {
        "global" => Admin::global().named("ops:carol").ok(),
        "acme" => Admin::of_org(acme).named("acme:bob").ok(),
        _ => None,
    }
}

async fn call_as(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}/admin{path}"))
        .header("x-admin-token", token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    Answer::of(request.send().await.unwrap()).await
}

/// An admin bound to one organization works in it (keys created, changed and topped up,
/// with its name in the audit trail) and finds every record of another organization
/// missing: each route answers 404 and nothing of the other organization changes (no
/// event, the key still valid). It cannot create organizations (403) and lists its own
/// alone; a global admin sees both; a request the check refuses is 403.
pub async fn admins_bound_to_an_organization_stay_in_it(db: TestDb) {
    let client = db.client().await;
    let (acme, _) = client.get_or_create_organization("acme").await.unwrap();
    let (rival, _) = client.get_or_create_organization("rival").await.unwrap();
    let (project, _) = client.get_or_create_project(rival.id, "p").await.unwrap();
    let (product, _) = client.get_or_create_product(rival.id, "q").await.unwrap();
    let (own_project, _) = client.get_or_create_project(acme.id, "own").await.unwrap();
    let new = NewKey::new("theirs").with_credits(Credits::new(5)).with_owner("u1");
    let theirs = client.create_key(rival.id, new).await.unwrap();
    let admin = ManagementApi::new(client.clone()).authorized_as(bound_admins(acme.id));
    let base = serve_with_peer(Router::new().nest("/admin", admin)).await;

    let before = db.counts(&client).await;
    let (r, k, pj, pd) = (rival.id, theirs.record.id, project.id, product.id);
    let own = own_project.id;
    let name = || Some(json!({"name": "x"}));
    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/orgs/{r}"), None),
        (Method::GET, format!("/orgs/{r}/projects"), None),
        (Method::POST, format!("/orgs/{r}/projects"), name()),
        (Method::GET, format!("/orgs/{r}/products"), None),
        (Method::POST, format!("/orgs/{r}/products"), name()),
        (Method::GET, format!("/orgs/{r}/keys"), None),
        (Method::POST, format!("/orgs/{r}/keys"), name()),
        (Method::GET, format!("/projects/{pj}"), None),
        (Method::GET, format!("/projects/{pj}/keys"), None),
        (Method::GET, format!("/projects/{pj}/products"), None),
        (Method::PUT, format!("/projects/{pj}/products/{pd}"), None),
        (Method::PUT, format!("/projects/{own}/products/{pd}"), None),
        (Method::DELETE, format!("/projects/{pj}/products/{pd}"), None),
        (Method::GET, format!("/products/{pd}"), None),
        (Method::GET, format!("/keys/{k}"), None),
        (Method::PATCH, format!("/keys/{k}"), name()),
        (Method::DELETE, format!("/keys/{k}"), None),
        (Method::POST, format!("/keys/{k}/revoke"), None),
        (Method::POST, format!("/keys/{k}/disable"), None),
        (Method::POST, format!("/keys/{k}/enable"), None),
        (Method::POST, format!("/keys/{k}/roll"), Some(json!({"grace_seconds": 0}))),
        (Method::POST, format!("/keys/{k}/renew"), Some(json!({"extend_by_seconds": 1}))),
        (Method::GET, format!("/keys/{k}/events"), None),
        (Method::POST, format!("/keys/{k}/credits"), Some(json!({"add": 1}))),
        (Method::GET, format!("/orgs/{r}/owners/u1/keys"), None),
        (Method::POST, format!("/orgs/{r}/owners/u1/revoke"), None),
        (Method::GET, format!("/orgs/{r}/owners"), None),
        (Method::GET, format!("/orgs/{r}/owners/u1"), None),
        (Method::PUT, format!("/orgs/{r}/owners/u1"), Some(json!({}))),
        (Method::PATCH, format!("/orgs/{r}/owners/u1"), Some(json!({"rate_limits": {}}))),
        (Method::DELETE, format!("/orgs/{r}/owners/u1"), None),
        (Method::POST, format!("/orgs/{r}/owners/u1/credits"), Some(json!({"add": 1}))),
    ];
    for (method, path, body) in routes {
        let a = call_as(&base, "acme", method.clone(), &path, body).await;
        assert_eq!(a.status, 404, "{method} {path}: {}", a.text);
        a.assert_problem(404, "not_found", "");
    }
    assert_eq!(db.counts(&client).await, before, "nothing of the other organization changed");
    assert_eq!(client.list_key_events(k).await.unwrap().len(), 1, "created, nothing since");
    let valid = client.validate_key(theirs.key.expose_secret(), &ValidateOptions::new()).await;
    assert_eq!(valid.unwrap().credits.unwrap().remaining, 4);

    let created = call_as(&base, "acme", Method::POST, "/orgs", name()).await;
    created.assert_problem(403, "forbidden", "");
    let listed = call_as(&base, "acme", Method::GET, "/orgs", None).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1, "{}", listed.text);
    assert_eq!(listed.body["items"][0]["id"], json!(acme.id));
    let all = call_as(&base, "global", Method::GET, "/orgs", None).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2, "{}", all.text);
    call_as(&base, "nobody", Method::GET, "/orgs", None).await.assert_problem(403, "forbidden", "");

    // A key of its own organization narrowed to another's project or product: not found.
    let own_keys = format!("/orgs/{}/keys", acme.id);
    for body in [json!({"name": "x", "project_id": pj}), json!({"name": "x", "product_id": pd})] {
        let a = call_as(&base, "acme", Method::POST, &own_keys, Some(body)).await;
        a.assert_problem(404, "not_found", "");
    }
    assert_eq!(db.counts(&client).await, before);

    // In its own organization: the key it creates, tops up and revokes names it.
    let body = json!({"name": "mine", "credits": {"remaining": 1}});
    let path = format!("/orgs/{}/keys", acme.id);
    let mine = call_as(&base, "acme", Method::POST, &path, Some(body)).await;
    assert_eq!(mine.status, 201, "{}", mine.text);
    let id = mine.body["record"]["id"].as_str().unwrap().to_owned();
    let topped = call_as(
        &base,
        "acme",
        Method::POST,
        &format!("/keys/{id}/credits"),
        Some(json!({"add": 9})),
    )
    .await;
    assert_eq!(topped.body["credits"]["remaining"], 10, "{}", topped.text);
    let revoked = call_as(&base, "acme", Method::POST, &format!("/keys/{id}/revoke"), None).await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    let events = call_as(&base, "acme", Method::GET, &format!("/keys/{id}/events"), None).await;
    let trail: Vec<(&str, &str)> = events.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(trail, [("created", "acme:bob"), ("updated", "acme:bob"), ("revoked", "acme:bob")]);
    // A global admin acts anywhere, under its own name.
    let theirs_path = format!("/keys/{k}/revoke");
    let done = call_as(&base, "global", Method::POST, &theirs_path, None).await;
    assert_eq!(done.status, 200, "{}", done.text);
    let last = client.list_key_events(k).await.unwrap().pop().unwrap();
    assert_eq!((last.action, last.actor.as_deref()), (KeyAction::Revoked, Some("ops:carol")));
}

/// `POST /keys/{id}/credits` adds to the balance; a key with no balance is 422 (field
/// `credits`), an amount of 0 is 422, a revoked key 409 `revoked`, a rolled one 409 naming
/// its successor; nothing is written by a refused call.
pub async fn credits_are_topped_up_through_the_api(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let plain = client.create_key(org.id, NewKey::new("unlimited")).await.unwrap().record.id;
    let new = NewKey::new("metered").with_credits(Credits::new(2));
    let metered = client.create_key(org.id, new).await.unwrap().record.id;
    let add = |n: u64| Some(json!({ "add": n }));
    let ok = call(&base, Method::POST, &format!("/keys/{metered}/credits"), add(40)).await;
    assert_eq!(
        (ok.status, ok.body["credits"]["remaining"].clone()),
        (200, json!(42)),
        "{}",
        ok.text
    );
    let before = db.counts(&client).await;
    let none = call(&base, Method::POST, &format!("/keys/{plain}/credits"), add(1)).await;
    none.assert_problem(422, "invalid_input", "");
    assert_eq!(none.body["field"], "credits");
    let zero = call(&base, Method::POST, &format!("/keys/{metered}/credits"), add(0)).await;
    zero.assert_problem(422, "invalid_input", "");
    let rolled = client.roll_key(metered, std::time::Duration::from_secs(60)).await.unwrap();
    let after_roll = db.counts(&client).await;
    let moved = call(&base, Method::POST, &format!("/keys/{metered}/credits"), add(1)).await;
    moved.assert_problem(409, "already_exists", "");
    assert_eq!(moved.body["id"], json!(rolled.record.id));
    client.revoke_key(plain).await.unwrap();
    let gone = call(&base, Method::POST, &format!("/keys/{plain}/credits"), add(1)).await;
    gone.assert_problem(409, "revoked", "");
    assert_eq!(client.get_key(rolled.record.id).await.unwrap().credits.unwrap().remaining, 42);
    assert_ne!(before, after_roll);
}

/// Organizations, an organization's projects and products, and a key's events come a page
/// at a time: `?limit=2` walks 5 of each in 3 pages by their `next` cursors, oldest first,
/// each item once; a bad limit or cursor is a 400/422 problem naming the parameter.
pub async fn listings_come_a_page_at_a_time(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let mut orgs = Vec::new();
    for i in 0..5 {
        orgs.push(client.create_organization(&format!("org-{i}")).await.unwrap().id.to_string());
    }
    let org = orgs[0].clone();
    let (mut projects, mut products) = (Vec::new(), Vec::new());
    let org_id: OrgId = org.parse().unwrap();
    for i in 0..5 {
        // Created in reverse name order: pages follow creation, not names.
        let name = format!("n-{}", 9 - i);
        projects.push(client.create_project(org_id, &name).await.unwrap().id.to_string());
        products.push(client.create_product(org_id, &name).await.unwrap().id.to_string());
    }
    let key = client.create_key(org_id, NewKey::new("k")).await.unwrap().record.id;
    let mut events = vec![client.list_key_events(key).await.unwrap()[0].id.to_string()];
    for i in 0..4 {
        let update = apikeys_db::KeyUpdate::new().with_name(format!("k{i}"));
        client.update_key(key, update).await.unwrap();
    }
    for e in client.list_key_events(key).await.unwrap().iter().skip(1) {
        events.push(e.id.to_string());
    }
    for (path, all) in [
        ("/orgs".to_owned(), &orgs),
        (format!("/orgs/{org}/projects"), &projects),
        (format!("/orgs/{org}/products"), &products),
        (format!("/keys/{key}/events"), &events),
    ] {
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let query =
                after.as_ref().map_or("?limit=2".to_owned(), |a| format!("?limit=2&after={a}"));
            let page = call(&base, Method::GET, &format!("{path}{query}"), None).await;
            assert_eq!(page.status, 200, "{path}: {}", page.text);
            pages += 1;
            let items = page.body["items"].as_array().unwrap();
            assert!(items.len() <= 2, "{path}: {}", page.text);
            seen.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
            match page.body["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(&seen, all, "{path}");
        assert_eq!(pages, 3, "{path}");
        let bad = call(&base, Method::GET, &format!("{path}?limit=0"), None).await;
        bad.assert_problem(422, "invalid_input", "");
        let bad = call(&base, Method::GET, &format!("{path}?after=not-an-id"), None).await;
        bad.assert_problem(400, "bad_request", "");
        assert_eq!(bad.body["field"], "after", "{}", bad.text);
    }
}

/// Owners' plans through the API: `PUT` sets a plan whole, `PATCH` its limits only (the
/// balance stays), `POST …/credits` tops it up, `GET` reads one and lists an
/// organization's, `DELETE` removes it; the plan is shared by the owner's keys (a check
/// beyond its limit gets the 429 of `owner.daily`). Bad input is a problem naming the field,
/// and changes nothing.
pub async fn owner_plans_through_the_api(db: TestDb) {
    let client = db.client().await;
    let base = app(client.clone()).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let o = org.id;
    let plan = json!({
        "rate_limits": {"daily": {"requests": 2, "window": "day"}},
        "credits": {"remaining": 5}
    });
    let set = call(&base, Method::PUT, &format!("/orgs/{o}/owners/team-1"), Some(plan)).await;
    assert_eq!(set.status, 200, "{}", set.text);
    assert_eq!(set.body["credits"]["remaining"], json!(5));
    assert_eq!(set.body["owner_id"], json!("team-1"));
    let key = client.create_key(o, NewKey::new("k").with_owner("team-1")).await.unwrap().key;
    let check = ValidateOptions::new().track_usage(false);
    client.validate_key(key.expose_secret(), &check).await.unwrap();
    let topped = call(
        &base,
        Method::POST,
        &format!("/orgs/{o}/owners/team-1/credits"),
        Some(json!({"add": 10})),
    )
    .await;
    assert_eq!(topped.body["credits"]["remaining"], json!(14), "{}", topped.text);
    let limits = json!({"rate_limits": {"daily": {"requests": 1, "window": "day"}}});
    let patched =
        call(&base, Method::PATCH, &format!("/orgs/{o}/owners/team-1"), Some(limits)).await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.body["credits"]["remaining"], json!(14), "the balance stays");
    assert_eq!(patched.body["rate_limits"]["daily"]["requests"], json!(1));
    match client.validate_key(key.expose_secret(), &check).await {
        Err(Error::Quota { name, .. }) => assert_eq!(name.as_deref(), Some("owner.daily")),
        other => panic!("{other:?}"),
    }
    let got = call(&base, Method::GET, &format!("/orgs/{o}/owners/team-1"), None).await;
    assert_eq!(got.body, patched.body);
    let listed = call(&base, Method::GET, &format!("/orgs/{o}/owners?limit=10"), None).await;
    assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(1), "{}", listed.text);
    assert_eq!(listed.body["next"], Value::Null);

    let before = db.counts(&client).await;
    let bad: Vec<(Method, String, Option<Value>, &str)> = vec![
        (
            Method::PUT,
            format!("/orgs/{o}/owners/team-2"),
            Some(json!({"credits": {"remaining": -1}})),
            "",
        ),
        (Method::PUT, format!("/orgs/{o}/owners/team-2"), Some(json!({"limits": {}})), "limits"),
        (
            Method::PUT,
            format!("/orgs/{o}/owners/team-2"),
            Some(json!({"rate_limits": {"key": {"requests": 1, "window": "day"}}})),
            "",
        ),
        (
            Method::POST,
            format!("/orgs/{o}/owners/team-1/credits"),
            Some(json!({"add": 0})),
            "credits",
        ),
        (Method::PUT, format!("/orgs/{o}/owners/%20x"), Some(json!({})), "owner_id"),
    ];
    for (method, path, body, field) in bad {
        let r = call(&base, method.clone(), &path, body).await;
        assert_eq!(r.status, 422, "{method} {path}: {}", r.text);
        if !field.is_empty() {
            assert_eq!(r.body["field"], json!(field), "{method} {path}: {}", r.text);
        }
    }
    let missing = call(&base, Method::GET, &format!("/orgs/{o}/owners/team-2"), None).await;
    missing.assert_problem(404, "not_found", "");
    assert_eq!(missing.body["kind"], json!("owner"));
    assert_eq!(db.counts(&client).await, before, "nothing written");

    let deleted = call(&base, Method::DELETE, &format!("/orgs/{o}/owners/team-1"), None).await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    client.validate_key(key.expose_secret(), &check).await.unwrap();
    let again = call(&base, Method::DELETE, &format!("/orgs/{o}/owners/team-1"), None).await;
    again.assert_problem(404, "not_found", "");
}
