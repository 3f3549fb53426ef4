//! Every SDK feature end to end: bootstrap, issue, validate, scopes, products, rate limits,
//! usage tracking, update, revoke, listing and delete.
//!
//! Runs on a SQLite file by default: `cargo run --example basic_flow`. For PostgreSQL or
//! MySQL compile that backend in and set `DATABASE_URL`:
//! `DATABASE_URL=postgres://… cargo run --features postgres --example basic_flow`.
#![allow(clippy::print_stdout)]

use apikeys_db::{
    ApiKeyClient, Error, KeyUpdate, NewKey, Page, RateLimit, StatusFilter, ValidateOptions,
    VerifyOptions,
};
use serde_json::json;

#[tokio::main]
async fn main() -> apikeys_db::Result<()> {
    let temp_db =
        std::env::temp_dir().join(format!("apikeys-basic-flow-{}.db", std::process::id()));
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| format!("sqlite://{}", temp_db.display()));
    // In production, read the secret from your secret store (32+ random bytes).
    let secret = std::env::var("APIKEYS_SIGNING_SECRET")
        .unwrap_or_else(|_| "example-signing-secret-change-me-0123456789".to_owned());
    let client = ApiKeyClient::builder()
        .database_url(&url)
        .signing_secret(secret)
        .environment("live")
        .build()
        .await?;
    client.create_tables().await?;
    println!("connected: {client:?}");

    // 1. Bootstrap (idempotent, safe on every deploy).
    let (org, created) = client.get_or_create_organization("acme").await?;
    let (v1, _) = client.get_or_create_project(org.id, "v1").await?;
    let (api, _) = client.get_or_create_product(org.id, "public-api").await?;
    let (billing, _) = client.get_or_create_product(org.id, "billing").await?;
    client.add_product_to_project(api.id, v1.id).await?;
    println!("organization {} ({})", org.name, if created { "created" } else { "existing" });

    // 2. Issue a key for the v1 project, with scopes, a rate limit and custom metadata.
    let issued = client
        .create_key(
            org.id,
            NewKey::new("mobile app")
                .with_project(v1.id)
                .with_scopes(["read", "write"])
                .with_rate_limit(RateLimit::per_minute(3)?)
                .with_custom(json!({"user_id": 42, "plan": "pro"})),
        )
        .await?;
    let key = issued.key.expose_secret().to_owned();
    println!("issued {} (show the plaintext once; stored: hash + hint)", issued.record.hint);

    // 3. Validate on each request: product, scopes, rate limit.
    let opts = ValidateOptions::new().for_product(api.id).require_scopes(["read"])?;
    let ok = client.validate_key(&key, &opts.clone()).await?;
    println!("valid for {}: uses = {}", api.name, ok.use_count);
    match client.validate_key(&key, &ValidateOptions::new().for_product(billing.id)).await {
        Err(Error::ProductNotAllowed { .. }) => {
            println!("not valid for billing (project not linked)")
        }
        other => println!("unexpected: {other:?}"),
    }
    match client.validate_key(&key, &ValidateOptions::new().require_scopes(["admin"])?).await {
        Err(Error::InsufficientScope { missing }) => println!("missing scopes: {missing:?}"),
        other => println!("unexpected: {other:?}"),
    }
    for _ in 0..3 {
        match client.validate_key(&key, &opts.clone()).await {
            Ok(_) => println!("request admitted"),
            Err(Error::Quota { retry_after, limit, .. }) => {
                println!("rate limited ({limit}), retry after {retry_after:?}");
            }
            Err(e) => return Err(e),
        }
    }

    // 4. Typos and forgeries are rejected offline.
    // (The last character changed, to one it is not: a key may end in 'x' already.)
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    let typo = format!("{}{last}", &key[..key.len() - 1]);
    assert!(matches!(
        client.verify_key(&typo, &VerifyOptions::new()).await,
        Err(Error::InvalidKey)
    ));

    // 5. Update metadata in place, list, revoke, delete.
    let updated = client
        .update_key(
            issued.record.id,
            KeyUpdate::new().with_name("mobile app (ios)").with_rate_limit(None),
        )
        .await?;
    println!("renamed to {:?}, rate limit {:?}", updated.name, updated.rate_limit);
    let page = client.list_project_keys(v1.id, StatusFilter::Active, Page::first(50)?).await?;
    println!("active keys in v1: {}", page.items.len());
    client.revoke_key(issued.record.id).await?;
    match client.verify_key(&key, &VerifyOptions::new()).await {
        Err(Error::Revoked { revoked_at }) => println!("revoked at {revoked_at}"),
        other => println!("unexpected: {other:?}"),
    }
    client.delete_key(issued.record.id).await?;
    println!("deleted; done");
    drop(client);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", temp_db.display()));
    }
    Ok(())
}
