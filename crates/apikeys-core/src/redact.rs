//! Finding keys in free text (log lines, support tickets) to mask them.
//!
//! A key is recognised by its shape, `{prefix}_{environment}_{secret}{checksum}` with any
//! prefix and environment [`KeyFormat`] accepts, standing on its own (no letter or digit
//! right before or after it), **and** by its checksum. The checksum is what keeps false
//! positives rare: a random 49-character alphanumeric run after a `word_` passes it with
//! probability about 1 in 56.8 billion (62⁶). A key with a typo no longer passes, so it is
//! not masked; it also no longer verifies.

use std::borrow::Cow;
use std::ops::Range;

use crate::key::{CHECKSUM_LEN, KeyFormat, MAX_SEGMENT_LEN, SECRET_LEN, key_hint};

/// Length of a key's tail: the secret and the checksum.
const TAIL_LEN: usize = SECRET_LEN + CHECKSUM_LEN;

/// The byte ranges of `text` that hold a key of any prefix and environment with a valid
/// checksum, in order and not overlapping.
///
/// Works on bytes, so text that is not UTF-8 (a binary log line) is scanned too; keys are
/// ASCII. Runs in time linear in `text.len()` and never panics.
///
/// ```
/// use apikeys_core::{KeyFormat, find_keys};
///
/// let key = KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
/// let line = format!("GET /v1/things key={} 200", key.expose_secret());
/// let found = find_keys(line.as_bytes());
/// assert_eq!(found, [19..19 + key.expose_secret().len()]);
/// assert!(find_keys(b"sk_live_notakeybutlongenoughtolookalittlelikeonemaybe1234").is_empty());
/// ```
#[must_use]
pub fn find_keys(text: &[u8]) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let starts_word = i == 0 || !text[i - 1].is_ascii_alphanumeric();
        if starts_word
            && text[i].is_ascii_lowercase()
            && let Some(len) = key_at(&text[i..])
        {
            found.push(i..i + len);
            i += len;
            continue;
        }
        i += 1;
    }
    found
}

/// `text` with every key [`find_keys`] finds replaced by its hint and `[redacted]`, for
/// instance `sk_live_Ab3x…[redacted]`: the hint (prefix, environment and the first four
/// characters of the secret) is what listings show, so a support engineer can still tell
/// which key it was. Borrowed when there was nothing to mask.
///
/// ```
/// use apikeys_core::{KeyFormat, redact_keys};
///
/// let key = KeyFormat::default().generate().unwrap();
/// let line = format!("Authorization: Bearer {}", key.expose_secret());
/// let masked = redact_keys(&line);
/// assert_eq!(masked, format!("Authorization: Bearer {}[redacted]", key.hint()));
/// assert!(!masked.contains(key.expose_secret()));
/// assert_eq!(redact_keys("nothing to see"), "nothing to see");
/// ```
#[must_use]
pub fn redact_keys(text: &str) -> Cow<'_, str> {
    let found = find_keys(text.as_bytes());
    if found.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for range in found {
        // Keys are ASCII and bounded by non-alphanumeric bytes, so these are char boundaries.
        out.push_str(text.get(last..range.start).unwrap_or_default());
        out.push_str(&key_hint(text.get(range.clone()).unwrap_or_default()));
        out.push_str("[redacted]");
        last = range.end;
    }
    out.push_str(text.get(last..).unwrap_or_default());
    Cow::Owned(out)
}

/// The length of the key that starts `text`, if one does and ends on a boundary.
fn key_at(text: &[u8]) -> Option<usize> {
    let prefix_len = segment(text)?;
    let rest = &text[prefix_len + 1..];
    // Without an environment: the tail follows the prefix at once.
    if let Some(len) = tail(rest) {
        return checked(text, prefix_len, None, prefix_len + 1 + len);
    }
    let env_len = segment(rest)?;
    let len = tail(&rest[env_len + 1..])?;
    checked(text, prefix_len, Some(env_len), prefix_len + 1 + env_len + 1 + len)
}

/// The length of a prefix or environment segment (1 to 16 lowercase letters and digits,
/// starting with a letter) that starts `text` and is followed by `_`.
fn segment(text: &[u8]) -> Option<usize> {
    if !text.first()?.is_ascii_lowercase() {
        return None;
    }
    let len = text
        .iter()
        .take(MAX_SEGMENT_LEN + 1)
        .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        .count();
    (len <= MAX_SEGMENT_LEN && text.get(len) == Some(&b'_')).then_some(len)
}

/// [`TAIL_LEN`] if `text` starts with that many ASCII letters and digits and no other
/// letter or digit follows them.
fn tail(text: &[u8]) -> Option<usize> {
    let run = text.get(..TAIL_LEN)?;
    let ends = text.get(TAIL_LEN).is_none_or(|b| !b.is_ascii_alphanumeric());
    (run.iter().all(u8::is_ascii_alphanumeric) && ends).then_some(TAIL_LEN)
}

/// `Some(len)` if `text[..len]` passes the checksum of its format.
fn checked(text: &[u8], prefix_len: usize, env_len: Option<usize>, len: usize) -> Option<usize> {
    let candidate = std::str::from_utf8(text.get(..len)?).ok()?;
    let prefix = candidate.get(..prefix_len)?;
    let env = match env_len {
        Some(n) => Some(candidate.get(prefix_len + 1..prefix_len + 1 + n)?),
        None => None,
    };
    let format = KeyFormat::new(prefix, env).ok()?;
    format.parse(candidate).ok().map(|_| len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, env: Option<&str>) -> String {
        KeyFormat::new(prefix, env).unwrap().generate().unwrap().expose_secret().to_owned()
    }

    #[test]
    fn keys_of_any_format_are_found_where_they_stand() {
        let a = key("sk", Some("live"));
        let b = key("sk", None);
        let c = key("acme9", Some("test2"));
        let text = format!("a={a}&b=\"{b}\"\n{c}");
        let found = find_keys(text.as_bytes());
        let got: Vec<&str> = found.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(got, [a.as_str(), b.as_str(), c.as_str()]);
        let masked = redact_keys(&text);
        for k in [&a, &b, &c] {
            assert!(!masked.contains(k.as_str()));
        }
        assert!(masked.starts_with(&format!("a={}…[redacted]&b=", &a[..12])));
    }

    #[test]
    fn keys_after_an_underscore_word_and_before_punctuation_are_found() {
        let a = key("sk", Some("live"));
        for text in [format!("API_KEY_{a}"), format!("{a}_suffix"), format!("({a})."), a.clone()] {
            assert_eq!(find_keys(text.as_bytes()).len(), 1, "{text}");
        }
    }

    #[test]
    fn near_misses_are_left_alone() {
        let a = key("sk", Some("live"));
        let last = a.chars().last().unwrap();
        let typo = format!("{}{}", &a[..a.len() - 1], if last == 'x' { 'y' } else { 'x' });
        let glued_before = format!("x{a}");
        let glued_after = format!("{a}0");
        let upper = a.replacen("sk", "SK", 1);
        for text in [typo, glued_before, glued_after, upper, a[..a.len() - 1].to_owned()] {
            assert!(find_keys(text.as_bytes()).is_empty(), "{text}");
            assert_eq!(redact_keys(&text), text);
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_scanned_too() {
        let a = key("sk", None);
        let mut text = vec![0xff, b' '];
        text.extend_from_slice(a.as_bytes());
        text.push(0xfe);
        let found = find_keys(&text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0], 2..2 + a.len());
    }

    #[test]
    fn random_text_yields_no_key_and_never_panics() {
        let alphabet = b"sk_live_abcXYZ019 \n=\xff";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2_000 {
            let text: Vec<u8> = (0..200)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            assert!(find_keys(&text).is_empty());
        }
    }
}
