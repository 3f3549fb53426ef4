//! `verify_key` and `validate_key` with arbitrary input, on a real database: never a panic,
//! never an error other than `InvalidKey`, nothing written. Cases per backend:
//! `APIKEYS_FUZZ_CASES` (default 100 000, CI's bounded run).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use apikeys_db::{Error, NewKey, ValidateOptions, VerifyOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use apikeys_testing::TestDb;

fn fuzz_cases() -> u32 {
    std::env::var("APIKEYS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// `key` with one character replaced, inserted or removed, or cut short.
fn mutation_of(key: String) -> impl Strategy<Value = String> {
    (0usize..4, any::<usize>(), any::<char>()).prop_map(move |(kind, pos, c)| {
        let mut chars: Vec<char> = key.chars().collect();
        let pos = pos % chars.len();
        match kind {
            0 => chars[pos] = c,
            1 => chars.insert(pos, c),
            2 => {
                chars.remove(pos);
            }
            _ => chars.truncate(pos),
        }
        chars.into_iter().collect()
    })
}

#[allow(clippy::print_stderr)] // reports the number of executions
pub async fn verify_arbitrary_input(db: TestDb) {
    let client = db.client_with(|b| b.environment("live")).await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("k")).await.unwrap();
    let good = issued.key.expose_secret().to_owned();
    let format = client.key_format().clone();
    let before = db.counts(&client).await;

    let input = prop_oneof![
        // Arbitrary text and arbitrary bytes (as a caller would get them off the wire).
        ".{0,120}",
        proptest::collection::vec(any::<u8>(), 0..120)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Well-formed keys (right prefix, environment and checksum) that were never issued:
        // these go all the way to the database lookup.
        any::<u8>().prop_map(move |_| format.generate().unwrap().expose_secret().to_owned()),
        // Near misses of the real key.
        mutation_of(good.clone()),
    ];
    let runs = Arc::new(AtomicU64::new(0));
    let exact = Arc::new(AtomicU64::new(0));
    let handle = tokio::runtime::Handle::current();
    let config = Config { cases: fuzz_cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = tokio::task::block_in_place(|| {
        runner.run(&input, |key| {
            runs.fetch_add(1, Ordering::Relaxed);
            let (verified, validated) = handle.block_on(async {
                let options = VerifyOptions::new();
                (
                    client.verify_key(&key, &options).await,
                    client.validate_key(&key, &ValidateOptions::new()).await,
                )
            });
            for result in [verified, validated] {
                match result {
                    Ok(found) => {
                        prop_assert!(key == good && found.id == issued.record.id);
                        exact.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::InvalidKey) => prop_assert_ne!(&key, &good),
                    Err(e) => prop_assert!(false, "{:?} gave {:?}", key, e),
                }
            }
            Ok(())
        })
    });
    result.unwrap();
    let runs = runs.load(Ordering::Relaxed);
    assert!(runs >= u64::from(fuzz_cases()), "{runs} executions");
    eprintln!("{:?}: {runs} fuzz executions of verify_key + validate_key", db.backend);
    assert_eq!(db.counts(&client).await, before, "nothing written");
    // Only a success (the real key given back by a no-op mutation) counts as a use.
    let uses = client.get_key(issued.record.id).await.unwrap().use_count;
    assert_eq!(uses, exact.load(Ordering::Relaxed));
}
