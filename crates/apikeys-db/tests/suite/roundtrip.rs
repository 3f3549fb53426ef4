//! Arbitrary names and custom JSON through the public API on a real database: each value is
//! either refused with `InvalidInput` by the same rule on every backend (the core's
//! validators), or stored and read back identical. Cases per backend: a tenth of
//! `APIKEYS_FUZZ_CASES` (default 100 000), at least 100.

use apikeys_db::core::hazmat::{validate_custom, validate_label, validate_name};
use apikeys_db::{Error, NewKey};
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

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
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
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(text(), inner, 0..6)
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
    let input = (text(), text(), proptest::collection::btree_map(text(), json(), 0..5));
    let result = tokio::task::block_in_place(|| {
        runner.run(&input, |(org_name, key_name, custom)| {
            let custom = Value::Object(custom.into_iter().collect());
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
                    .and_then(|()| validate_custom(custom.clone()).map(|_| ()));
                let got = client
                    .create_key(org.id, NewKey::new(key_name.clone()).with_custom(custom.clone()))
                    .await;
                match (want, got) {
                    (Ok(()), Ok(issued)) => {
                        let stored = client.get_key(issued.record.id).await.unwrap();
                        prop_assert_eq!(&stored.name, &key_name);
                        prop_assert_eq!(&Value::Object(stored.custom), &custom);
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
