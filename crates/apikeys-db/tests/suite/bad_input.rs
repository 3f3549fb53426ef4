//! Bad input through the public API: one row per case, each a typed error naming what was
//! wrong, and the database unchanged afterwards.

use std::future::Future;
use std::pin::Pin;

use apikeys_db::core::limits::MAX_EXPIRES_AT;
use apikeys_db::{
    Error, KeyId, KeyUpdate, NewKey, OrgId, Page, ProductId, ProjectId, RateLimit, RecordId,
    ValidateOptions, VerifyOptions, Window,
};
use chrono::TimeDelta;
use serde_json::json;

use apikeys_testing::{TestClock, TestDb, at};

/// What a row must fail with.
#[derive(Debug)]
enum Expect {
    /// `Error::InvalidInput` naming this field.
    Field(&'static str),
    /// `Error::InvalidKey` (the key is the only input).
    InvalidKey,
    /// `Error::NotFound` of this record.
    NotFound(RecordId),
}

type Call<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// One row: a case name, the call, what it must fail with.
fn row<'a, T>(
    name: impl Into<String>,
    expect: Expect,
    call: impl Future<Output = Result<T, Error>> + Send + 'a,
) -> (String, Expect, Call<'a>) {
    (name.into(), expect, Box::pin(async move { call.await.map(|_| ()) }))
}

pub async fn bad_input_table(db: TestDb) {
    use Expect::{Field, InvalidKey, NotFound};
    let clock = TestClock::at(at("2026-11-23T10:00:00Z"));
    let client = db.client_with(|b| b.clock(clock.as_fn()).environment("live")).await;
    let c = &client;
    let (acme, _) = c.get_or_create_organization("acme").await.unwrap();
    let (globex, _) = c.get_or_create_organization("globex").await.unwrap();
    let (v1, _) = c.get_or_create_project(acme.id, "v1").await.unwrap();
    let (api, _) = c.get_or_create_product(acme.id, "api").await.unwrap();
    let (g_project, _) = c.get_or_create_project(globex.id, "v1").await.unwrap();
    let (g_product, _) = c.get_or_create_product(globex.id, "api").await.unwrap();
    let issued = c.create_key(acme.id, NewKey::new("k").with_scopes(["read"])).await.unwrap();
    let key_id = issued.record.id;
    let good = issued.key.expose_secret().to_owned();
    let unknown = c.key_format().generate().unwrap().expose_secret().to_owned();
    let bad_checksum = apikeys_testing::forged(&good);

    let long = "x".repeat(256);
    let nested = (0..200).fold(json!(1), |v, _| json!({ "a": v }));
    let huge = json!({ "blob": "x".repeat(1 << 20) });
    let past = clock.now() - TimeDelta::seconds(1);
    let (verify, validate) = (VerifyOptions::new(), ValidateOptions::new());
    // Ids of records that do not exist.
    let (no_org, no_project, no_product, no_key) =
        (OrgId::new(), ProjectId::new(), ProductId::new(), KeyId::new());

    // Keys presented for verification.
    let bad_keys: [(&str, String); 11] = [
        ("empty", String::new()),
        ("one character", "s".to_owned()),
        ("10 KB", "s".repeat(10 * 1024)),
        ("wrong prefix", good.replacen("sk_", "pk_", 1)),
        ("wrong environment", good.replacen("_live_", "_test_", 1)),
        ("bad checksum", bad_checksum),
        ("valid-looking but never issued", unknown),
        ("leading whitespace", format!(" {good}")),
        ("trailing newline", format!("{good}\n")),
        ("space inside", format!("{} {}", &good[..20], &good[20..])),
        ("a Cyrillic letter in place of one", format!("{}\u{430}{}", &good[..20], &good[21..])),
    ];
    let mut rows: Vec<(String, Expect, Call<'_>)> = Vec::new();
    // Names of organizations, projects and products (every entry point that takes one).
    let bad_names: [(&str, &str); 16] = [
        ("zero-width space (looks like \"acme\")", "acme\u{200B}"),
        ("zero-width joiner", "ac\u{200D}me"),
        ("word joiner", "ac\u{2060}me"),
        ("byte-order mark", "\u{FEFF}acme"),
        ("right-to-left override", "ac\u{202E}em"),
        ("left-to-right isolate", "\u{2066}acme\u{2069}"),
        ("empty", ""),
        ("whitespace only", "   "),
        ("over 255 characters", &long),
        ("NUL", "ac\0me"),
        ("newline", "ac\nme"),
        ("leading space", " acme"),
        ("trailing space (so \"acme \" can never shadow \"acme\")", "acme "),
        ("tab", "ac\tme"),
        ("Latin with a Cyrillic look-alike", "\u{430}cme"),
        ("Latin with Greek", "\u{3bf}pen"),
    ];
    for (case, name) in bad_names {
        rows.push(row(
            format!("organization name: {case}"),
            Field("name"),
            c.get_or_create_organization(name),
        ));
        rows.push(row(
            format!("organization name (create): {case}"),
            Field("name"),
            c.create_organization(name),
        ));
        rows.push(row(
            format!("project name: {case}"),
            Field("name"),
            c.get_or_create_project(acme.id, name),
        ));
        rows.push(row(
            format!("product name: {case}"),
            Field("name"),
            c.create_product(acme.id, name),
        ));
    }
    rows.push(row(
        "project of an unknown organization",
        NotFound(no_org.into()),
        c.get_or_create_project(no_org, "x"),
    ));
    rows.push(row(
        "product of an unknown organization",
        NotFound(no_org.into()),
        c.get_or_create_product(no_org, "x"),
    ));

    for (case, key) in &bad_keys {
        rows.push(row(format!("verify key: {case}"), InvalidKey, c.verify_key(key, &verify)));
        rows.push(row(format!("validate key: {case}"), InvalidKey, c.validate_key(key, &validate)));
    }

    // New keys.
    let new_keys: Vec<(&str, Expect, NewKey)> = vec![
        ("key name empty", Field("name"), NewKey::new("")),
        ("key name over 255 characters", Field("name"), NewKey::new(long.clone())),
        ("key name with NUL", Field("name"), NewKey::new("k\0")),
        ("key name with a zero-width space", Field("name"), NewKey::new("k\u{200B}")),
        ("key name with a bidi override", Field("name"), NewKey::new("k\u{202E}yek")),
        (
            "custom with NUL in a string",
            Field("custom"),
            NewKey::new("k").with_custom(json!({ "a": "x\u{0}y" })),
        ),
        (
            "custom with NUL in a nested key",
            Field("custom"),
            NewKey::new("k").with_custom(json!({ "a": [{ "b\u{0}": 1 }] })),
        ),
        (
            "expiry after year 9999",
            Field("expires_at"),
            NewKey::new("k").expires_at(MAX_EXPIRES_AT + TimeDelta::microseconds(1)),
        ),
        (
            "lifetime reaching past year 9999",
            Field("expires_at"),
            NewKey::new("k").expires_after(std::time::Duration::from_secs(8_000 * 366 * 86_400)),
        ),
        ("custom is a string", Field("custom"), NewKey::new("k").with_custom(json!("string"))),
        ("custom is an array", Field("custom"), NewKey::new("k").with_custom(json!([1, 2]))),
        ("custom is null", Field("custom"), NewKey::new("k").with_custom(json!(null))),
        ("custom nested 200 deep", Field("custom"), NewKey::new("k").with_custom(nested.clone())),
        ("custom of 1 MB", Field("custom"), NewKey::new("k").with_custom(huge.clone())),
        ("empty scope", Field("scopes"), NewKey::new("k").with_scopes([""])),
        ("duplicated scope", Field("scopes"), NewKey::new("k").with_scopes(["read", "read"])),
        ("scope with a space", Field("scopes"), NewKey::new("k").with_scopes(["read all"])),
        ("scope with a newline", Field("scopes"), NewKey::new("k").with_scopes(["read\n"])),
        ("expiry in the past", Field("expires_at"), NewKey::new("k").expires_at(past)),
        ("expiry now", Field("expires_at"), NewKey::new("k").expires_at(clock.now())),
        (
            "project of another organization",
            Field("project_id"),
            NewKey::new("k").with_project(g_project.id),
        ),
        (
            "product of another organization",
            Field("product_id"),
            NewKey::new("k").with_product(g_product.id),
        ),
        ("unknown project", NotFound(no_project.into()), NewKey::new("k").with_project(no_project)),
        ("unknown product", NotFound(no_product.into()), NewKey::new("k").with_product(no_product)),
    ];
    for (case, expect, new_key) in new_keys {
        rows.push(row(format!("create key: {case}"), expect, c.create_key(acme.id, new_key)));
    }
    rows.push(row(
        "create key: unknown organization",
        NotFound(no_org.into()),
        c.create_key(no_org, NewKey::new("k")),
    ));

    // Rate limits: zero and negative (u32 constructors cannot express a negative count).
    for (case, requests) in [("zero", 0), ("negative", -1), ("too large", i64::from(u32::MAX) + 1)]
    {
        rows.push(row(format!("rate limit: {case}"), Field("rate_limit.requests"), async move {
            RateLimit::try_new(requests, Window::Minute)
        }));
    }
    rows.push(row("rate limit: zero per hour", Field("rate_limit.requests"), async {
        RateLimit::per_hour(0)
    }));

    // Updates of an existing key.
    let updates: Vec<(&str, &'static str, KeyUpdate)> = vec![
        ("empty name", "name", KeyUpdate::new().with_name("")),
        ("trailing whitespace in name", "name", KeyUpdate::new().with_name("k ")),
        ("custom not an object", "custom", KeyUpdate::new().with_custom(json!(42))),
        ("custom nested 200 deep", "custom", KeyUpdate::new().with_custom(nested.clone())),
        ("custom of 1 MB", "custom", KeyUpdate::new().with_custom(huge.clone())),
        ("duplicated scope", "scopes", KeyUpdate::new().with_scopes(["a", "a"])),
        ("scope with a space", "scopes", KeyUpdate::new().with_scopes(["a b"])),
        ("custom with NUL", "custom", KeyUpdate::new().with_custom(json!({ "a": ["\u{0}"] }))),
        ("name with a byte-order mark", "name", KeyUpdate::new().with_name("\u{FEFF}k")),
    ];
    for (case, field, update) in updates {
        rows.push(row(format!("update key: {case}"), Field(field), c.update_key(key_id, update)));
    }
    rows.push(row(
        "update key: unknown id",
        NotFound(no_key.into()),
        c.update_key(no_key, KeyUpdate::new().with_name("x")),
    ));

    // Validation requirements and listing parameters: refused when the value is built.
    rows.push(row("required scope with a space", Field("scopes"), async {
        ValidateOptions::new().require_scopes(["read all"])
    }));
    rows.push(row("required scope empty", Field("scopes"), async {
        ValidateOptions::new().require_scopes([""])
    }));
    rows.push(row("page of 0", Field("page.limit"), async { Page::first(0) }));
    rows.push(row("page of 1001", Field("page.limit"), async { Page::first(1001) }));

    // Product links across organizations and to unknown rows.
    rows.push(row(
        "link a product of another organization",
        Field("product_id"),
        c.add_product_to_project(g_product.id, v1.id),
    ));
    rows.push(row(
        "link to a project of another organization",
        Field("product_id"),
        c.add_product_to_project(api.id, g_project.id),
    ));
    rows.push(row(
        "link an unknown product",
        NotFound(no_product.into()),
        c.add_product_to_project(no_product, v1.id),
    ));
    rows.push(row(
        "link to an unknown project",
        NotFound(no_project.into()),
        c.add_product_to_project(api.id, no_project),
    ));

    let before = db.counts(c).await;
    let key_before = c.get_key(key_id).await.unwrap();
    let total = rows.len();
    for (case, expect, call) in rows {
        let result = call.await;
        let ok = match (&expect, &result) {
            (Field(want), Err(Error::InvalidInput { field, .. })) => field == want,
            (InvalidKey, Err(Error::InvalidKey)) => true,
            (NotFound(want), Err(Error::NotFound { id })) => id == want,
            _ => false,
        };
        assert!(ok, "{case}: expected {expect:?}, got {result:?}");
        // The message names the field too, so a caller can show it as is.
        if let (Field(want), Err(e)) = (&expect, &result) {
            assert!(e.to_string().contains(want), "{case}: {e}");
        }
    }
    assert!(total >= 135, "{total} rows");
    assert_eq!(db.counts(c).await, before, "bad input changed nothing");
    assert_eq!(c.get_key(key_id).await.unwrap(), key_before, "the key is untouched");

    // Decided and documented (the guide, "Concepts", "Names"): names are exact. Case makes a
    // different name on every backend; a trailing space is refused above, so it can never make a
    // look-alike.
    let (upper, created) = c.get_or_create_organization("ACME").await.unwrap();
    assert!(created);
    assert_ne!(upper.id, acme.id);
    assert_eq!(c.find_organization("acme").await.unwrap().unwrap().id, acme.id);
}
