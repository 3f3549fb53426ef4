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
mod tests;
