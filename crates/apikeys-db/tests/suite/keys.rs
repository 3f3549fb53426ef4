use std::time::Duration;

use apikeys_db::sea_orm::{ConnectionTrait, Statement};
use apikeys_db::{
    ApiKeyClient, Error, KeyId, KeyStatus, KeyUpdate, NewKey, OrgId, RateLimit, RecordId,
    ValidateOptions, VerifyOptions,
};
use chrono::TimeDelta;
use serde_json::json;

use apikeys_testing::{TestClock, TestDb, at};

pub async fn org(client: &ApiKeyClient, name: &str) -> OrgId {
    client.get_or_create_organization(name).await.unwrap().0.id
}

pub fn no_tracking() -> VerifyOptions {
    VerifyOptions::new().track_usage(false)
}

pub async fn create_and_verify(db: TestDb) {
    let client = db.client_with(|b| b.environment("live")).await;
    let org = org(&client, "acme").await;
    let issued = client
        .create_key(
            org,
            NewKey::new("ci").with_scopes(["read", "write"]).with_custom(json!({"plan": "pro"})),
        )
        .await
        .unwrap();
    let plaintext = issued.key.expose_secret().to_owned();
    assert!(plaintext.starts_with("sk_live_"));
    assert_eq!(issued.record.hint, format!("{}…", &plaintext[..12]));
    assert_eq!(issued.record.status(chrono::Utc::now()), KeyStatus::Active);
    assert_eq!(client.get_key(issued.record.id).await.unwrap(), issued.record);

    let verified = client.verify_key(&plaintext, &no_tracking()).await.unwrap();
    assert_eq!(verified, issued.record);

    // Only the HMAC is stored: the raw row holds neither the key nor its secret part.
    let conn = client.connection();
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT key_hash, hint FROM api_keys".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    let hash: Vec<u8> = row.try_get("", "key_hash").unwrap();
    assert_eq!(hash.len(), 32);
    assert!(!hash.windows(8).any(|w| plaintext.as_bytes().windows(8).any(|p| p == w)));
    let hint: String = row.try_get("", "hint").unwrap();
    assert!(!hint.contains(&plaintext[12..]));

    // Two keys never collide and each verifies to itself.
    let second = client.create_key(org, NewKey::new("second")).await.unwrap();
    assert_ne!(second.key.expose_secret(), plaintext);
    assert_eq!(
        client.verify_key(second.key.expose_secret(), &no_tracking()).await.unwrap().id,
        second.record.id
    );
}

pub async fn usage_tracking(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let issued = client.create_key(org, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret();
    for i in 1..=3u64 {
        clock.advance(TimeDelta::seconds(1));
        let k = client.verify_key(key, &VerifyOptions::new()).await.unwrap();
        assert_eq!(k.use_count, i);
        assert_eq!(k.last_used_at, Some(clock.now()));
    }
    client.verify_key(key, &no_tracking()).await.unwrap();
    client.validate_key(key, &ValidateOptions::new().track_usage(false)).await.unwrap();
    client.validate_key(key, &ValidateOptions::new()).await.unwrap();
    let stored = client.get_key(issued.record.id).await.unwrap();
    assert_eq!(stored.use_count, 4);
    assert_eq!(stored.last_used_at, Some(clock.now()));
    // Concurrent uses are counted exactly (one atomic UPDATE each).
    let mut handles = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        let key = key.to_owned();
        handles.push(tokio::spawn(
            async move { client.verify_key(&key, &VerifyOptions::new()).await },
        ));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(client.get_key(issued.record.id).await.unwrap().use_count, 24);
}

pub async fn invalid_keys(db: TestDb) {
    let client = db.client_with(|b| b.environment("live")).await;
    let org = org(&client, "acme").await;
    let issued = client.create_key(org, NewKey::new("k")).await.unwrap();
    let good = issued.key.expose_secret();
    // A well-formed key (right prefix, environment and checksum) that was never issued.
    let unknown = client.key_format().generate().unwrap();
    let other_env = ApiKeyClient::builder()
        .database_url(&db.url)
        .signing_secret(apikeys_testing::SECRET)
        .environment("test")
        .build()
        .await
        .unwrap();
    let mut flipped = good.to_owned().into_bytes();
    flipped[20] = if flipped[20] == b'a' { b'b' } else { b'a' };
    let flipped = String::from_utf8(flipped).unwrap();
    let cases = [
        String::new(),
        "s".to_owned(),
        "x".repeat(10 * 1024),
        good.replacen("sk_", "pk_", 1),
        good.replacen("_live_", "_test_", 1),
        flipped,
        format!(" {good}"),
        format!("{good}\n"),
        unknown.expose_secret().to_owned(),
    ];
    let before = db.counts(&client).await;
    for case in &cases {
        assert!(
            matches!(client.verify_key(case, &VerifyOptions::new()).await, Err(Error::InvalidKey)),
            "{case:?}"
        );
        assert!(matches!(
            client.validate_key(case, &ValidateOptions::new()).await,
            Err(Error::InvalidKey)
        ));
    }
    // A client of another environment does not accept this one's keys.
    assert!(matches!(
        other_env.verify_key(good, &VerifyOptions::new()).await,
        Err(Error::InvalidKey)
    ));
    // A client with another secret cannot find the key.
    let other_secret = db
        .client_with(|b| {
            b.signing_secret("another-secret-that-is-32-bytes-long!!")
                .signing_secret_version(2)
                .environment("live")
        })
        .await;
    assert!(matches!(
        other_secret.verify_key(good, &VerifyOptions::new()).await,
        Err(Error::InvalidKey)
    ));
    assert_eq!(db.counts(&client).await, before);
    assert_eq!(client.get_key(issued.record.id).await.unwrap().use_count, 0);
}

pub async fn revoke_and_delete(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00.123456Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let issued = client.create_key(org, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret();
    let revoked = client.revoke_key(issued.record.id).await.unwrap();
    let revoked_at = clock.now();
    assert_eq!(revoked.revoked_at, Some(revoked_at));
    assert_eq!(revoked.status(clock.now()), KeyStatus::Revoked);
    clock.advance(TimeDelta::hours(1));
    // Revoking again keeps the first time.
    assert_eq!(client.revoke_key(issued.record.id).await.unwrap().revoked_at, Some(revoked_at));
    match client.verify_key(key, &VerifyOptions::new()).await {
        Err(Error::Revoked { revoked_at: t }) => assert_eq!(t, revoked_at),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.validate_key(key, &ValidateOptions::new()).await,
        Err(Error::Revoked { .. })
    ));
    assert_eq!(client.get_key(issued.record.id).await.unwrap().use_count, 0);

    client.delete_key(issued.record.id).await.unwrap();
    assert!(matches!(
        client.get_key(issued.record.id).await,
        Err(Error::NotFound { id: RecordId::Key(k) }) if k == issued.record.id
    ));
    assert!(matches!(
        client.delete_key(issued.record.id).await,
        Err(Error::NotFound { id: RecordId::Key(_) })
    ));
    assert!(matches!(
        client.revoke_key(issued.record.id).await,
        Err(Error::NotFound { id: RecordId::Key(_) })
    ));
    assert!(matches!(client.verify_key(key, &VerifyOptions::new()).await, Err(Error::InvalidKey)));
    assert_eq!(db.count(&client, "api_keys").await, 0);
}

pub async fn expiry(db: TestDb) {
    let t0 = at("2026-11-23T10:00:00Z");
    let clock = TestClock::at(t0);
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let expires_at = t0 + TimeDelta::days(30);
    let issued = client.create_key(org, NewKey::new("k").expires_at(expires_at)).await.unwrap();
    let key = issued.key.expose_secret();
    assert_eq!(issued.record.expires_at, Some(expires_at));
    assert_eq!(client.get_key(issued.record.id).await.unwrap().expires_at, Some(expires_at));
    clock.set(expires_at - TimeDelta::microseconds(1));
    client.verify_key(key, &VerifyOptions::new()).await.unwrap();
    clock.set(expires_at);
    match client.verify_key(key, &VerifyOptions::new()).await {
        Err(Error::Expired { expired_at }) => assert_eq!(expired_at, expires_at),
        other => panic!("{other:?}"),
    }
    // After 2038, to the microsecond, on every backend.
    let far = at("2099-01-02T03:04:05.678901Z");
    let late = client.create_key(org, NewKey::new("late").expires_at(far)).await.unwrap();
    assert_eq!(client.get_key(late.record.id).await.unwrap().expires_at, Some(far));
    // Relative expiry.
    let rel = client
        .create_key(org, NewKey::new("rel").expires_after(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(rel.record.expires_at, Some(clock.now() + TimeDelta::seconds(60)));
}

pub async fn product_rule(db: TestDb) {
    let client = db.client().await;
    let acme = org(&client, "acme").await;
    let globex = org(&client, "globex").await;
    let (v1, _) = client.get_or_create_project(acme, "v1").await.unwrap();
    let (v2, _) = client.get_or_create_project(acme, "v2").await.unwrap();
    let (api, _) = client.get_or_create_product(acme, "api").await.unwrap();
    let (billing, _) = client.get_or_create_product(acme, "billing").await.unwrap();
    let (g_api, _) = client.get_or_create_product(globex, "api").await.unwrap();
    client.add_product_to_project(api.id, v1.id).await.unwrap();

    let org_wide = client.create_key(acme, NewKey::new("org")).await.unwrap();
    let project_key = client.create_key(acme, NewKey::new("v1").with_project(v1.id)).await.unwrap();
    let unlinked = client.create_key(acme, NewKey::new("v2").with_project(v2.id)).await.unwrap();
    let product_key =
        client.create_key(acme, NewKey::new("billing").with_product(billing.id)).await.unwrap();
    let globex_key = client.create_key(globex, NewKey::new("g")).await.unwrap();

    let check = |key: &apikeys_db::IssuedKey, product| {
        let client = client.clone();
        let key = key.key.expose_secret().to_owned();
        async move {
            match client.validate_key(&key, &ValidateOptions::new().for_product(product)).await {
                Ok(_) => true,
                Err(Error::ProductNotAllowed { product_id }) => {
                    assert_eq!(product_id, product);
                    false
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    };
    assert!(check(&org_wide, api.id).await);
    assert!(check(&org_wide, billing.id).await);
    assert!(!check(&org_wide, g_api.id).await, "org-wide key of another org");
    assert!(check(&project_key, api.id).await, "linked project");
    assert!(!check(&project_key, billing.id).await, "project not linked");
    assert!(!check(&unlinked, api.id).await);
    assert!(check(&product_key, billing.id).await);
    assert!(!check(&product_key, api.id).await);
    assert!(!check(&globex_key, api.id).await, "cross-tenant");
    assert!(check(&globex_key, g_api.id).await);
    assert!(!check(&org_wide, apikeys_db::ProductId::new()).await, "unknown product");
    // The key's own status is reported first, whatever the product.
    client.revoke_key(org_wide.record.id).await.unwrap();
    for product in [g_api.id, apikeys_db::ProductId::new()] {
        let options = ValidateOptions::new().for_product(product);
        assert!(matches!(
            client.validate_key(org_wide.key.expose_secret(), &options).await,
            Err(Error::Revoked { .. })
        ));
    }
}

pub async fn scopes(db: TestDb) {
    let client = db.client().await;
    let org = org(&client, "acme").await;
    let issued = client
        .create_key(org, NewKey::new("k").with_scopes(["read", "billing:write"]))
        .await
        .unwrap();
    let key = issued.key.expose_secret();
    client
        .validate_key(key, &ValidateOptions::new().require_scopes(["read"]).unwrap())
        .await
        .unwrap();
    client
        .validate_key(
            key,
            &ValidateOptions::new().require_scopes(["billing:write", "read"]).unwrap(),
        )
        .await
        .unwrap();
    match client
        .validate_key(
            key,
            &ValidateOptions::new().require_scopes(["read", "admin", "delete"]).unwrap(),
        )
        .await
    {
        Err(Error::InsufficientScope { missing }) => {
            assert_eq!(missing.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["admin", "delete"]);
        }
        other => panic!("{other:?}"),
    }
    // A malformed requirement is refused when the options are built, before any call.
    assert!(matches!(
        ValidateOptions::new().require_scopes(["bad scope"]),
        Err(Error::InvalidInput { field: "scopes", .. })
    ));
    // Failed validations are not counted as uses.
    assert_eq!(client.get_key(issued.record.id).await.unwrap().use_count, 2);
}

pub async fn update_metadata(db: TestDb) {
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn())).await;
    let org = org(&client, "acme").await;
    let issued = client.create_key(org, NewKey::new("old").with_scopes(["read"])).await.unwrap();
    clock.advance(TimeDelta::minutes(5));
    let limit = RateLimit::per_minute(10).unwrap();
    let updated = client
        .update_key(
            issued.record.id,
            KeyUpdate::new()
                .with_name("new")
                .with_scopes(["read", "write"])
                .with_rate_limit(Some(limit))
                .with_custom(json!({"user_id": 7})),
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "new");
    assert_eq!(updated.scopes.len(), 2);
    assert_eq!(updated.rate_limit, Some(limit));
    assert_eq!(updated.custom["user_id"], json!(7));
    assert_eq!(updated.updated_at, clock.now());
    assert_eq!(updated.created_at, issued.record.created_at);
    assert_eq!(client.get_key(issued.record.id).await.unwrap(), updated);
    // The same plaintext still works, with the new scopes.
    client
        .validate_key(
            issued.key.expose_secret(),
            &ValidateOptions::new().require_scopes(["write"]).unwrap(),
        )
        .await
        .unwrap();
    // Partial update leaves other fields; removing the rate limit.
    let cleared =
        client.update_key(issued.record.id, KeyUpdate::new().with_rate_limit(None)).await.unwrap();
    assert_eq!(cleared.rate_limit, None);
    assert_eq!(cleared.name, "new");
    // Bad input: typed error, nothing changes.
    let before = client.get_key(issued.record.id).await.unwrap();
    for (update, field) in [
        (KeyUpdate::new().with_name(""), "name"),
        (KeyUpdate::new().with_name("ok").with_scopes(["a", "a"]), "scopes"),
        (KeyUpdate::new().with_custom(json!([1, 2])), "custom"),
    ] {
        match client.update_key(issued.record.id, update).await {
            Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(client.get_key(issued.record.id).await.unwrap(), before);
    assert!(matches!(
        client.update_key(KeyId::new(), KeyUpdate::new().with_name("x")).await,
        Err(Error::NotFound { id: RecordId::Key(_) })
    ));
}

pub async fn metadata_round_trip(db: TestDb) {
    let client = db.client().await;
    let org = org(&client, "組織 🚀").await;
    let custom = json!({
        "user_id": 9007199254740991u64,
        "plan": "pro",
        "名前": "テスト ✓ émoji 🎉",
        "nested": {"a": [1, 2.5, {"b": null, "c": [true, false]}], "deep": {"x": {"y": {"z": "end"}}}},
        "empty": {},
        "neg": -42
    });
    let issued = client
        .create_key(
            org,
            NewKey::new("clé d'accès — ключ")
                .with_scopes(["read", "repo/admin", "a.b-c_d:*"])
                .with_custom(custom.clone()),
        )
        .await
        .unwrap();
    let stored = client.get_key(issued.record.id).await.unwrap();
    assert_eq!(stored, issued.record);
    assert_eq!(serde_json::Value::Object(stored.custom), custom);
    assert_eq!(stored.name, "clé d'accès — ключ");
    assert_eq!(client.get_organization(org).await.unwrap().name, "組織 🚀");
}
