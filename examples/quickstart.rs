//! Generates a key, hashes it, parses it back and runs the verification decision.
#![allow(clippy::print_stdout)]

use apikeys_db::core::hazmat::{KeyHasher, Requirements, decide};
use apikeys_db::{ApiKey, KeyFormat, KeyId, OrgId, Scopes, SigningSecret};
use chrono::Utc;

fn main() -> apikeys_db::Result<()> {
    let format = KeyFormat::new("sk", Some("live"))?;
    let hasher = KeyHasher::new(SigningSecret::new(vec![7u8; 32])?)?;
    let key = format.generate()?;
    let hash = hasher.hash(key.expose_secret());
    println!("issued {} (stored hash {hash:?})", key.hint());

    let parsed = format.parse(key.expose_secret())?;
    assert_eq!(hasher.hash(parsed.as_str()), hash);
    println!("a typo is rejected offline: {}", format.parse("sk_live_typo").is_err());

    let now = Utc::now();
    let stored = ApiKey {
        id: KeyId::new(),
        org_id: OrgId::new(),
        project_id: None,
        product_id: None,
        name: "ci".into(),
        hint: key.hint(),
        scopes: Scopes::parse(["read"])?,
        rate_limit: None,
        rate_limits: Default::default(),
        custom: serde_json::Map::new(),
        created_at: now,
        updated_at: now,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        use_count: 0,
        owner_id: None,
        credits: None,
        rolled_from: None,
        rolled_to: None,
        disabled_at: None,
        allowed_ips: None,
    };
    let write = Scopes::parse(["write"])?;
    let need_write = Requirements { product: None, scopes: &write, client_ip: None };
    match decide(&stored, &need_write, now) {
        Err(e) => println!("decision: {e}"),
        Ok(()) => println!("decision: allowed"),
    }
    Ok(())
}
