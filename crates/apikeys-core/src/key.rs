//! The key format: `{prefix}_{environment}_{secret}{checksum}`.
//!
//! * `prefix`: 1 to 16 lowercase ASCII letters or digits, starting with a letter (default `sk`).
//! * `environment`: optional, same charset (for instance `live`, `test`).
//! * `secret`: 43 base62 characters drawn uniformly from the operating system's CSPRNG,
//!   which is 43 · log2(62) ≈ 256.03 bits.
//! * `checksum`: CRC-32 (IEEE) of everything before it, as 6 base62 digits (fixed width).
//!
//! The checksum lets [`KeyFormat::parse`] reject typos and made-up keys without a database
//! round-trip, and gives secret scanners a way to recognise real keys. It is not a security
//! measure: the HMAC in [`crate::KeyHasher`] is.

use std::fmt;

use rand::TryRng;
use rand::rngs::SysRng;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Number of base62 characters in a key's secret part (≥ 256 bits of entropy).
pub const SECRET_LEN: usize = 43;
/// Number of base62 characters in a key's checksum.
pub const CHECKSUM_LEN: usize = 6;
/// Longest accepted prefix or environment.
pub const MAX_SEGMENT_LEN: usize = 16;
/// Number of secret characters kept in a key's display hint.
const HINT_SECRET_CHARS: usize = 4;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// How keys look for one client: the prefix and the optional environment segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    prefix: String,
    environment: Option<String>,
}

impl Default for KeyFormat {
    /// Prefix `sk`, no environment.
    fn default() -> Self {
        Self { prefix: "sk".to_owned(), environment: None }
    }
}

fn validate_segment(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_SEGMENT_LEN {
        return Err(Error::invalid_input(field, "must be 1 to 16 characters"));
    }
    let mut chars = value.bytes();
    if !chars.next().is_some_and(|c| c.is_ascii_lowercase()) {
        return Err(Error::invalid_input(field, "must start with a lowercase ascii letter"));
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(Error::invalid_input(field, "must be lowercase ascii letters and digits only"));
    }
    Ok(())
}

impl KeyFormat {
    /// A format with the given prefix and optional environment.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `prefix` or `environment`) unless each is 1 to 16
    /// lowercase ASCII letters or digits starting with a letter.
    pub fn new(prefix: &str, environment: Option<&str>) -> Result<Self> {
        validate_segment("prefix", prefix)?;
        if let Some(env) = environment {
            validate_segment("environment", env)?;
        }
        Ok(Self { prefix: prefix.to_owned(), environment: environment.map(str::to_owned) })
    }

    /// The prefix, for instance `sk`.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The environment segment, if any.
    #[must_use]
    pub fn environment(&self) -> Option<&str> {
        self.environment.as_deref()
    }

    /// The length of every key of this format.
    #[must_use]
    pub fn key_len(&self) -> usize {
        self.head_len() + SECRET_LEN + CHECKSUM_LEN
    }

    /// Length of `prefix_` or `prefix_env_`.
    fn head_len(&self) -> usize {
        self.prefix.len() + 1 + self.environment.as_ref().map_or(0, |e| e.len() + 1)
    }

    /// Generates a new key from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`Error::Entropy`] if the operating system's random number generator fails.
    pub fn generate(&self) -> Result<PlaintextKey> {
        let mut key = Zeroizing::new(String::with_capacity(self.key_len()));
        key.push_str(&self.prefix);
        key.push('_');
        if let Some(env) = &self.environment {
            key.push_str(env);
            key.push('_');
        }
        let mut buf = Zeroizing::new([0u8; 64]);
        let mut produced = 0;
        while produced < SECRET_LEN {
            SysRng.try_fill_bytes(buf.as_mut()).map_err(|_| Error::Entropy)?;
            // Rejection sampling: 248 = 4 * 62, so `b % 62` is uniform over accepted bytes.
            for &b in buf.iter().filter(|&&b| b < 248).take(SECRET_LEN - produced) {
                key.push(char::from(BASE62[usize::from(b % 62)]));
                produced += 1;
            }
        }
        let checksum = checksum(key.as_bytes());
        key.push_str(&encode_checksum(checksum));
        Ok(PlaintextKey(key))
    }

    /// Checks that `key` is a well-formed key of this format with a correct checksum.
    ///
    /// Runs in time linear in `min(key.len(), key_len())`, allocates nothing and never panics,
    /// whatever the input.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for anything that is not such a key; it does not say why.
    pub fn parse<'k>(&self, key: &'k str) -> Result<ParsedKey<'k>> {
        let bytes = key.as_bytes();
        if bytes.len() != self.key_len() {
            return Err(Error::InvalidKey);
        }
        let rest = key.strip_prefix(self.prefix.as_str()).and_then(|r| r.strip_prefix('_'));
        let tail = match &self.environment {
            Some(env) => {
                rest.and_then(|r| r.strip_prefix(env.as_str())).and_then(|r| r.strip_prefix('_'))
            }
            None => rest,
        };
        // The length check above makes the tail exactly secret + checksum long.
        if !tail.is_some_and(|t| t.bytes().all(|b| b.is_ascii_alphanumeric())) {
            return Err(Error::InvalidKey);
        }
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if decode_checksum(sum) != Some(checksum(body)) {
            return Err(Error::InvalidKey);
        }
        Ok(ParsedKey { key })
    }
}

/// A key that passed [`KeyFormat::parse`]: right shape, right checksum. Not yet known to exist.
#[derive(Clone, Copy)]
pub struct ParsedKey<'k> {
    key: &'k str,
}

impl<'k> ParsedKey<'k> {
    /// The whole key, as presented.
    #[must_use]
    pub fn as_str(&self) -> &'k str {
        self.key
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ParsedKey([redacted])")
    }
}

/// A plaintext API key, as handed to a customer exactly once.
///
/// Zeroed when dropped, prints `[redacted]` in `Debug`, and has no `Display`: to show or send
/// it, call [`PlaintextKey::expose_secret`] deliberately.
pub struct PlaintextKey(Zeroizing<String>);

impl PlaintextKey {
    /// The key itself. Treat it like a password: show it once, never log it.
    #[must_use]
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// A short, non-secret hint for listings: the prefix, environment and the first four
    /// characters of the secret followed by `…`, e.g. `sk_live_Ab3x…`.
    #[must_use]
    pub fn hint(&self) -> String {
        key_hint(&self.0)
    }
}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlaintextKey([redacted])")
    }
}

/// The display hint of a key string (see [`PlaintextKey::hint`]).
pub(crate) fn key_hint(key: &str) -> String {
    let secret_start = key.rfind('_').map_or(0, |i| i + 1);
    let end = (secret_start + HINT_SECRET_CHARS).min(key.len());
    let mut hint = String::with_capacity(end + 3);
    hint.push_str(key.get(..end).unwrap_or_default());
    hint.push('…');
    hint
}

fn checksum(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

/// `value` as exactly [`CHECKSUM_LEN`] base62 digits, most significant first.
fn encode_checksum(mut value: u32) -> String {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

fn decode_checksum(digits: &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'A'..=b'Z' => d - b'A' + 10,
            b'a'..=b'z' => d - b'a' + 36,
            _ => return None,
        };
        value = value * 62 + u64::from(v);
    }
    u32::try_from(value).ok()
}

#[cfg(test)]
mod tests {

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
        let formats =
            [KeyFormat::default(), live(), KeyFormat::new("acme9", Some("test2")).unwrap()];
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
}
