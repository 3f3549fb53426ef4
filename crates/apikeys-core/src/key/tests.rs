//! Tests of the key format: generation, parsing, hostile input.
#[test]
fn plaintext_is_zeroed_on_drop() {
    let key = KeyFormat::new("sk", None).unwrap().generate().unwrap();
    crate::hash::tests::zeroed_on_drop(&key.0);
}

use super::*;
use proptest::prelude::*;

fn live() -> KeyFormat {
    KeyFormat::new("sk", Some("live")).unwrap()
}

#[test]
fn checksum_known_answers() {
    // CRC-32/IEEE check value of "123456789" is 0xCBF43926 = 3421780262.
    assert_eq!(checksum(b"123456789"), 0xCBF4_3926);
    assert_eq!(encode_checksum(0xCBF4_3926), "3jZRME");
    assert_eq!(encode_checksum(0), "000000");
    assert_eq!(encode_checksum(u32::MAX), "4gfFC3");
    assert_eq!(decode_checksum(b"4gfFC3"), Some(u32::MAX));
    assert_eq!(decode_checksum(b"3jZRME"), Some(0xCBF4_3926));
    // 62^6 - 1 does not fit in a u32.
    assert_eq!(decode_checksum(b"zzzzzz"), None);
}

#[test]
fn generated_keys_have_the_documented_shape() {
    let key = live().generate().unwrap();
    let s = key.expose_secret();
    assert_eq!(s.len(), 8 + SECRET_LEN + CHECKSUM_LEN);
    assert!(s.starts_with("sk_live_"));
    assert!(s[8..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(key.hint(), format!("{}…", &s[..12]));
    let plain = KeyFormat::default().generate().unwrap();
    assert!(plain.expose_secret().starts_with("sk_"));
    assert_eq!(plain.expose_secret().len(), 3 + SECRET_LEN + CHECKSUM_LEN);
}

#[test]
fn round_trip_many_random_keys() {
    let formats = [KeyFormat::default(), live(), KeyFormat::new("acme9", Some("test2")).unwrap()];
    let mut seen = std::collections::HashSet::new();
    for format in &formats {
        for _ in 0..2_000 {
            let key = format.generate().unwrap();
            let parsed = format.parse(key.expose_secret()).unwrap();
            assert_eq!(parsed.as_str(), key.expose_secret());
            assert!(seen.insert(key.expose_secret().to_owned()), "duplicate key");
        }
    }
}

#[test]
fn secret_characters_are_spread_over_the_alphabet() {
    // 1000 keys give 43 000 secret characters: every one of the 62 symbols must occur, and
    // none more than twice its expected share (~694). A biased sampler would fail this.
    let mut counts = [0u32; 128];
    for _ in 0..1_000 {
        let key = KeyFormat::default().generate().unwrap();
        for b in key.expose_secret()[3..3 + SECRET_LEN].bytes() {
            counts[usize::from(b)] += 1;
        }
    }
    for &sym in BASE62 {
        let n = counts[usize::from(sym)];
        assert!(n > 0 && n < 1_400, "symbol {} seen {n} times", char::from(sym));
    }
}

#[test]
fn rejects_hostile_inputs() {
    let f = live();
    let good = f.generate().unwrap();
    let good = good.expose_secret();
    let cases: Vec<String> = vec![
        String::new(),
        "s".into(),
        "sk_live_".into(),
        "x".repeat(10_240),
        good.replacen("sk_", "pk_", 1),
        good.replacen("_live_", "_test_", 1),
        format!(" {}", &good[1..]),
        format!("{}\n", &good[..good.len() - 1]),
        format!("{good} "),
        good.to_uppercase(),
        format!("{}é", &good[..good.len() - 2]),
        good.replace('_', "-"),
        KeyFormat::default().generate().unwrap().expose_secret().to_owned(),
    ];
    for case in cases {
        assert!(matches!(f.parse(&case), Err(Error::InvalidKey)), "accepted {case:?}");
    }
}

#[test]
fn segments_are_validated() {
    for bad in ["", "SK", "s k", "1sk", "sk_", "abcdefghijklmnopq", "ské"] {
        assert!(matches!(
            KeyFormat::new(bad, None),
            Err(Error::InvalidInput { field: "prefix", .. })
        ));
        assert!(matches!(
            KeyFormat::new("sk", Some(bad)),
            Err(Error::InvalidInput { field: "environment", .. })
        ));
    }
    assert!(KeyFormat::new("abcdefghijklmnop", Some("prod2")).is_ok());
}

#[test]
fn debug_is_redacted() {
    let key = live().generate().unwrap();
    let secret = key.expose_secret().to_owned();
    let dbg = format!("{key:?}");
    assert_eq!(dbg, "PlaintextKey([redacted])");
    let parsed = live().parse(&secret).unwrap();
    assert!(!format!("{parsed:?}").contains(&secret[8..20]));
}

/// Cases per fuzz property: `APIKEYS_FUZZ_CASES`, default 100 000 (CI's bounded run).
fn fuzz_cases() -> u32 {
    std::env::var("APIKEYS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// A valid key changed in one of the ways a typo, a bad copy or an attacker changes it.
fn mutated() -> impl Strategy<Value = (String, String)> {
    (0usize..6, any::<usize>(), any::<char>(), 0usize..4).prop_map(|(kind, pos, c, n)| {
        let original = live().generate().unwrap().expose_secret().to_owned();
        let mut chars: Vec<char> = original.chars().collect();
        let pos = pos % chars.len();
        match kind {
            0 => chars[pos] = c,
            1 => chars.insert(pos, c),
            2 => {
                chars.remove(pos);
            }
            3 => {
                let next = (pos + 1) % chars.len();
                chars.swap(pos, next);
            }
            4 => chars.truncate(pos),
            _ => chars.extend(std::iter::repeat_n(c, n + 1)),
        }
        (original, chars.into_iter().collect())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

    #[test]
    fn parser_never_panics(s in ".{0,80}") {
        let _ = live().parse(&s);
        let _ = KeyFormat::default().parse(&s);
    }

    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = live().parse(&s);
    }

    /// Replacing, inserting or deleting a character, swapping two neighbours, truncating
    /// or appending: rejected, unless the change happens to give back the same string.
    #[test]
    fn every_small_change_is_rejected((original, changed) in mutated()) {
        let parsed = live().parse(&changed);
        if changed == original {
            prop_assert_eq!(parsed.unwrap().as_str(), original.as_str());
        } else {
            prop_assert!(matches!(parsed, Err(Error::InvalidKey)), "{:?}", changed);
        }
    }
}
