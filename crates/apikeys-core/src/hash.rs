//! HMAC-SHA256 key hashing with a required, rotatable signing secret.
//!
//! The database stores only `HMAC-SHA256(signing secret, full key)`. Without the secret, a
//! leaked table cannot be used to test guesses offline; with it, lookups are one indexed read.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// A signing secret: at least [`SigningSecret::MIN_LEN`] bytes, zeroed on drop, never printed.
///
/// Each secret has a version (default 1) so that a [`KeyHasher`] can hold the current secret and
/// older ones during a rotation.
pub struct SigningSecret {
    version: u32,
    bytes: Zeroizing<Vec<u8>>,
}

impl SigningSecret {
    /// The minimum length of a signing secret, in bytes (256 bits).
    pub const MIN_LEN: usize = 32;

    /// A version-1 secret from raw bytes (for instance 32+ random bytes, or a long random
    /// string). Pass an owned `Vec<u8>` or `String` so no copy is left behind.
    ///
    /// # Errors
    /// [`Error::Configuration`] if the secret is shorter than [`SigningSecret::MIN_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = Zeroizing::new(bytes.into());
        if bytes.len() < Self::MIN_LEN {
            return Err(Error::configuration(
                "signing secret must be at least 32 bytes (generate one with `openssl rand -base64 48`)",
            ));
        }
        Ok(Self { version: 1, bytes })
    }

    /// The same secret labelled with another version number.
    #[must_use]
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// This secret's version.
    #[must_use]
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningSecret")
            .field("version", &self.version)
            .field("bytes", &"[redacted]")
            .finish()
    }
}

/// The stored lookup value of a key: HMAC-SHA256 of the full key under one signing secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// The 32 raw bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time comparison with raw bytes of any length.
    #[must_use]
    pub fn ct_eq_bytes(&self, other: &[u8]) -> bool {
        self.0.as_slice().ct_eq(other).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

struct Keyed {
    version: u32,
    mac: HmacSha256,
}

impl Keyed {
    fn new(secret: &SigningSecret) -> Result<Self> {
        let mac = <HmacSha256 as KeyInit>::new_from_slice(&secret.bytes)
            .map_err(|_| Error::configuration("signing secret rejected by hmac"))?;
        Ok(Self { version: secret.version, mac })
    }

    fn hash(&self, data: &[u8]) -> KeyHash {
        let mut mac = self.mac.clone();
        mac.update(data);
        KeyHash(mac.finalize().into_bytes().into())
    }
}

/// Hashes keys with the current signing secret, and recognises hashes made with the others.
///
/// A hasher holds the **current** secret (new keys are hashed with it) and any number of
/// **previous** ones ([`with_previous`](Self::with_previous)): keys hashed with those are
/// found, and [`needs_rehash`](Self::needs_rehash) says they should move to the current one.
/// While a previous secret is configured, a store keeps each key's hash under it too
/// ([`alternate`](Self::alternate)), so that replicas still on the old secret alone keep
/// finding every key during a rolling deploy.
///
/// The HMAC state is keyed once at construction. With the `zeroize` features of `hmac` and
/// `sha2` on (as this crate builds them), that state and the per-call copy each hash makes of
/// it are zeroed when dropped, so hashing a key costs two SHA-256 compressions plus the
/// message blocks and leaves no keyed state behind.
pub struct KeyHasher {
    current: Keyed,
    previous: Vec<Keyed>,
}

impl KeyHasher {
    /// A hasher with one (current) secret.
    ///
    /// # Errors
    /// [`Error::Configuration`] if the HMAC cannot be keyed (it accepts any length, so in
    /// practice never).
    pub fn new(current: SigningSecret) -> Result<Self> {
        Ok(Self { current: Keyed::new(&current)?, previous: Vec::new() })
    }

    /// Adds an older secret, so keys issued under it are still found (and can be re-hashed to
    /// the current secret).
    ///
    /// # Errors
    /// [`Error::Configuration`] if the version is already used by another secret of this hasher.
    pub fn with_previous(mut self, previous: SigningSecret) -> Result<Self> {
        let keyed = self.unused(&previous)?;
        self.previous.push(keyed);
        Ok(self)
    }

    fn unused(&self, secret: &SigningSecret) -> Result<Keyed> {
        if self.versions().any(|v| v == secret.version) {
            return Err(Error::configuration(format!(
                "signing secret version {} is used twice",
                secret.version
            )));
        }
        Keyed::new(secret)
    }

    /// Whether a key stored under `version` should be re-hashed to the current secret: true
    /// for the previous secrets only.
    #[must_use]
    pub fn needs_rehash(&self, version: u32) -> bool {
        self.previous.iter().any(|k| k.version == version)
    }

    /// The hash of `key` under the first previous secret, with its version: what a store
    /// keeps beside the current hash while a rotation is under way. `None` without a
    /// previous secret.
    #[must_use]
    pub fn alternate(&self, key: &str) -> Option<(u32, KeyHash)> {
        self.previous.first().map(|k| (k.version, k.hash(key.as_bytes())))
    }

    /// The current secret's version.
    #[must_use]
    pub fn current_version(&self) -> u32 {
        self.current.version
    }

    fn all(&self) -> impl Iterator<Item = &Keyed> + '_ {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// Every version this hasher knows, current first.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.all().map(|k| k.version)
    }

    /// Each secret's fingerprint with its version, current first: the HMAC under the secret
    /// of a fixed message. It reveals nothing of the secret, and tells whether two deploys
    /// that label a secret with the same version hold the same secret (a store keeps the first
    /// fingerprint seen per version and refuses a secret that does not match it).
    #[must_use]
    pub fn fingerprints(&self) -> Vec<(u32, [u8; 32])> {
        const MESSAGE: &[u8] = b"apikeys signing-secret fingerprint v1";
        self.all().map(|k| (k.version, *k.hash(MESSAGE).as_bytes())).collect()
    }

    /// The hash of `key` under the current secret.
    #[must_use]
    pub fn hash(&self, key: &str) -> KeyHash {
        self.current.hash(key.as_bytes())
    }

    /// The hash of `key` under every secret, current first, each with its version.
    #[must_use]
    pub fn candidates(&self, key: &str) -> Vec<(u32, KeyHash)> {
        self.all().map(|k| (k.version, k.hash(key.as_bytes()))).collect()
    }

    /// Which of the `candidates` equals `stored`, compared in constant time; its version.
    #[must_use]
    pub fn matching_version(candidates: &[(u32, KeyHash)], stored: &[u8]) -> Option<u32> {
        // Compare against all of them so the time does not depend on which one matches.
        candidates.iter().fold(
            None,
            |found, (version, hash)| {
                if hash.ct_eq_bytes(stored) { Some(*version) } else { found }
            },
        )
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher")
            .field("current_version", &self.current.version)
            .field(
                "previous_versions",
                &self.previous.iter().map(|k| k.version).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn hex(h: &KeyHash) -> String {
        h.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn raw(key: &[u8], data: &[u8]) -> String {
        let k = Keyed { version: 0, mac: HmacSha256::new_from_slice(key).unwrap() };
        hex(&k.hash(data))
    }

    #[test]
    fn rfc4231_vectors_short_keys() {
        // Test cases 1 and 2: keys shorter than our minimum, checked on the keyed core only.
        assert_eq!(
            raw(&[0x0b; 20], b"Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            raw(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn rfc4231_vectors_through_the_hasher() {
        // Test cases 6 and 7 (131-byte key, larger than the block size).
        let hasher = KeyHasher::new(SigningSecret::new(vec![0xaa; 131]).unwrap()).unwrap();
        assert_eq!(
            hex(&hasher.hash("Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            hex(&hasher.hash(
                "This is a test using a larger than block-size key and a larger than block-size \
                 data. The key needs to be hashed before being used by the HMAC algorithm."
            )),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn short_secret_is_a_configuration_error() {
        assert!(matches!(SigningSecret::new(vec![7; 31]), Err(Error::Configuration { .. })));
        assert!(matches!(SigningSecret::new(""), Err(Error::Configuration { .. })));
        assert!(SigningSecret::new(vec![7; 32]).is_ok());
    }

    #[test]
    fn rotation_finds_the_matching_version() {
        let v1 = || SigningSecret::new(vec![1; 32]).unwrap();
        let v2 = SigningSecret::new(vec![2; 32]).unwrap().with_version(2);
        let old = KeyHasher::new(v1()).unwrap();
        let stored = old.hash("sk_abc");
        let rotated = KeyHasher::new(v2).unwrap().with_previous(v1()).unwrap();
        assert_eq!(rotated.versions().collect::<Vec<_>>(), vec![2, 1]);
        let candidates = rotated.candidates("sk_abc");
        assert_eq!(candidates[0].1, rotated.hash("sk_abc"));
        assert_ne!(candidates[0].1, stored);
        assert_eq!(KeyHasher::matching_version(&candidates, stored.as_bytes()), Some(1));
        assert_eq!(KeyHasher::matching_version(&candidates, &[0; 32]), None);
        let dup = KeyHasher::new(v1()).unwrap().with_previous(v1());
        assert!(matches!(dup, Err(Error::Configuration { .. })));
    }

    #[test]
    fn rehash_and_alternate_come_from_previous_secrets() {
        let v1 = || SigningSecret::new(vec![1; 32]).unwrap();
        let v2 = || SigningSecret::new(vec![2; 32]).unwrap().with_version(2);
        let old = KeyHasher::new(v1()).unwrap();
        let new = KeyHasher::new(v2()).unwrap().with_previous(v1()).unwrap();
        assert_eq!(old.alternate("sk_abc"), None);
        assert_eq!(new.alternate("sk_abc"), Some((1, old.hash("sk_abc"))));
        assert!(new.needs_rehash(1) && !new.needs_rehash(2) && !old.needs_rehash(2));
    }

    /// Compiles only while `T` zeroes itself when dropped.
    pub(crate) fn zeroed_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}

    #[test]
    fn secrets_and_keyed_state_are_zeroed_on_drop() {
        // The SHA-256 core holds the keyed HMAC state (inner and outer pads) and is what each
        // hash clones: zeroed on drop with sha2's `zeroize` feature.
        zeroed_on_drop(&sha2::Sha256::default());
        let secret = SigningSecret::new(vec![7; 32]).unwrap();
        zeroed_on_drop(&secret.bytes);
    }

    #[test]
    fn secrets_are_redacted() {
        let secret = SigningSecret::new("correct horse battery staple 0123456789").unwrap();
        let dbg = format!("{secret:?}");
        assert!(dbg.contains("[redacted]") && !dbg.contains("horse"), "{dbg}");
        let hasher = KeyHasher::new(secret).unwrap();
        let dbg = format!("{hasher:?}");
        assert!(!dbg.contains("horse") && dbg.contains("current_version: 1"), "{dbg}");
    }
}
