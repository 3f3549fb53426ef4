//! Arbitrary names and custom JSON through the public API on a real database: each value is
//! either refused with `InvalidInput` by the same rule on every backend (the core's
//! validators), or stored and read back as the core's validator returns it (identical, but
//! for the numbers PostgreSQL's jsonb reads back as another value, stored as it reads them on
//! every backend).
//! Cases per backend: a tenth of `APIKEYS_FUZZ_CASES` (default 100 000), at least 100.

use apikeys_db::core::hazmat::{validate_custom, validate_label, validate_name};
use apikeys_db::sea_orm::{ConnectionTrait, DbBackend};
use apikeys_db::{Error, KeyUpdate, NewKey, ValidateOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

use apikeys_testing::TestDb;

fn cases() -> u32 {
    let fuzz = std::env::var("APIKEYS_FUZZ_CASES").ok().and_then(|v| v.parse().ok());
    (fuzz.unwrap_or(100_000) / 10).max(100)
}

/// Text that leans on what databases disagree about: NUL and other controls, format
/// characters, astral-plane characters, combining marks, surrounding whitespace.
fn text() -> impl Strategy<Value = String> {
    let tricky = prop_oneof![
        Just('\0'),
        Just('\u{200B}'),
        Just('\u{202E}'),
        Just('\u{FEFF}'),
        Just('\u{1F600}'),
        Just('\u{301}'),
        Just('\u{430}'),
        Just(' '),
        Just('"'),
        Just('\\'),
        any::<char>(),
        proptest::char::range('a', 'z'),
    ];
    proptest::collection::vec(tricky, 0..24).prop_map(|c| c.into_iter().collect())
}

/// Half tricky text, half plain names: most tricky text is refused (a NUL, a control or
/// format character, surrounding spaces), and the values that are stored must be read back
/// often enough to find what a database changes.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![text(), "[a-z][a-z0-9_]{0,11}"]
}

/// Custom JSON as text: compared so, `-0.0` and `0.0` differ (as `Value`s they are equal).
fn json_text(custom: &Map<String, Value>) -> String {
    serde_json::to_string(custom).unwrap()
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        // Whole floats of every size: from 10^16 up, written with an exponent, read back by
        // PostgreSQL's jsonb as integers (the core stores them as such everywhere).
        any::<i64>().prop_map(|i| Value::from(i as f64)),
        any::<u64>().prop_map(|u| Value::from(u as f64)),
        Just(Value::from(1e300)),
        Just(Value::from(5e-324)),
        Just(Value::from(-0.0)),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        name().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

pub async fn arbitrary_names_and_json_round_trip(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let handle = tokio::runtime::Handle::current();
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    // Numbers under a plain key too: most arbitrary objects hold a NUL somewhere and are
    // refused, and numbers must still be read back in the rest.
    let numbers = proptest::collection::vec(number(), 0..8);
    let input = (text(), name(), proptest::collection::btree_map(name(), json(), 0..5), numbers);
    let result = tokio::task::block_in_place(|| {
        runner.run(&input, |(org_name, key_name, custom, numbers)| {
            let mut custom: Map<_, _> = custom.into_iter().collect();
            custom.insert("numbers".to_owned(), Value::Array(numbers));
            let custom = Value::Object(custom);
            handle.block_on(async {
                // Organization names.
                let got = client.get_or_create_organization(&org_name).await;
                match (validate_name("name", &org_name), got) {
                    (Ok(()), Ok((stored, _))) => {
                        prop_assert_eq!(&stored.name, &org_name);
                        let found = client.find_organization(&org_name).await.unwrap();
                        prop_assert_eq!(found.map(|o| o.id), Some(stored.id));
                    }
                    (Err(_), Err(Error::InvalidInput { field: "name", .. })) => {}
                    (want, got) => prop_assert!(false, "{:?}: {:?} vs {:?}", org_name, want, got),
                }
                // Key names and custom JSON.
                let want = validate_label("name", &key_name)
                    .and_then(|()| validate_custom(custom.clone()));
                let got = client
                    .create_key(org.id, NewKey::new(key_name.clone()).with_custom(custom.clone()))
                    .await;
                match (want, got) {
                    (Ok(canonical), Ok(issued)) => {
                        let stored = client.get_key(issued.record.id).await.unwrap();
                        prop_assert_eq!(&stored.name, &key_name);
                        // What the core returns, on every database (the object given, but
                        // for numbers jsonb reads back otherwise).
                        prop_assert_eq!(json_text(&issued.record.custom), json_text(&canonical));
                        prop_assert_eq!(json_text(&stored.custom), json_text(&canonical));
                    }
                    (
                        Err(Error::InvalidInput { field: a, .. }),
                        Err(Error::InvalidInput { field: b, .. }),
                    ) => {
                        prop_assert_eq!(a, b)
                    }
                    (want, got) => {
                        prop_assert!(false, "{:?} {:?}: {:?} vs {:?}", key_name, custom, want, got)
                    }
                }
                Ok(())
            })
        })
    });
    result.unwrap();
}

/// Numbers PostgreSQL's jsonb reads back as another JSON value are stored as it reads them,
/// on every backend, when created, updated and validated: a whole number written with an
/// exponent (`7.1e+16`) as the integer of its digits, `-0.0` as `0.0`; `2.0` stays a float,
/// and so does a float whose digits do not fit 64 bits. On PostgreSQL, the same numbers
/// written into the column as `serde_json` writes them read back as the core returns them.
pub async fn whole_floats_read_back_as_the_same_integers_everywhere(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let given = serde_json::json!({
        "big": -7.112_496_011_669_557_6e16,
        "nested": { "list": [1e16, 2.0, 2f64.powi(60)] },
        "huge": 1e20,
        "zero": -0.0,
    });
    let issued =
        client.create_key(org.id, NewKey::new("k").with_custom(given.clone())).await.unwrap();
    let expected = r#"{"big":-71124960116695576,"huge":1e20,"nested":{"list":[10000000000000000,2.0,1152921504606847000]},"zero":0.0}"#;
    let expected: Map<String, Value> = serde_json::from_str(expected).unwrap();
    assert_eq!(json_text(&issued.record.custom), json_text(&expected));
    let id = issued.record.id;
    assert_eq!(json_text(&client.get_key(id).await.unwrap().custom), json_text(&expected));
    let plain = issued.key.expose_secret();
    let validated = client.validate_key(plain, &ValidateOptions::new()).await.unwrap();
    assert_eq!(json_text(&validated.custom), json_text(&expected));
    let update = KeyUpdate::new().with_custom(serde_json::json!({ "big": 9.2e18 }));
    let updated = client.update_key(id, update).await.unwrap();
    assert_eq!(updated.custom["big"].as_u64(), Some(9_200_000_000_000_000_000));
    let stored = client.get_key(id).await.unwrap().custom;
    assert_eq!(json_text(&stored), json_text(&updated.custom));

    // jsonb itself: the numbers as serde_json writes them, put in the column by hand.
    let db = client.connection();
    if db.get_database_backend() == DbBackend::Postgres {
        let mut raw = given;
        for (i, f) in [-(2f64.powi(63)), 2f64.powi(64), 18_446_744_073_709_549_568.0, 5e-324]
            .into_iter()
            .enumerate()
        {
            raw[format!("f{i}")] = Value::from(f);
        }
        let raw_text = serde_json::to_string(&raw).unwrap();
        let sql = format!("UPDATE api_keys SET custom = '{raw_text}'::jsonb WHERE name = 'k'");
        db.execute_unprepared(&sql).await.unwrap();
        let read = client.get_key(id).await.unwrap().custom;
        assert_eq!(json_text(&read), json_text(&validate_custom(raw).unwrap()), "{raw_text}");
    }
}
