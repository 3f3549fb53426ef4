//! Scopes: validated permission strings and sets of them.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest accepted scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most scopes one key may hold.
pub const MAX_SCOPES: usize = 256;

/// One permission, such as `read`, `billing:write` or `repo/admin`.
///
/// 1 to 128 ASCII characters from `A-Z a-z 0-9 _ - . : / *`; no whitespace.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(value_type = String, example = "billing:read"))]
pub struct Scope(String);

impl Scope {
    /// A validated scope.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `scopes`) if the string is empty, too long or has a
    /// character outside the allowed set.
    pub fn new(scope: impl Into<String>) -> Result<Self> {
        let scope = scope.into();
        if scope.is_empty() {
            return Err(Error::invalid_input("scopes", "a scope must not be empty"));
        }
        if scope.len() > MAX_SCOPE_LEN {
            return Err(Error::invalid_input("scopes", "a scope must be at most 128 characters"));
        }
        if !scope.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/*".contains(&b)) {
            return Err(Error::invalid_input(
                "scopes",
                "a scope may only contain ascii letters, digits and _ - . : / *",
            ));
        }
        Ok(Self(scope))
    }

    /// The scope as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Scope {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Scope {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}

/// A set of scopes (sorted, no duplicates).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(value_type = Vec<String>))]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    /// The empty set.
    #[must_use]
    pub const fn new() -> Self {
        Self(BTreeSet::new())
    }

    /// Builds a set from strings, validating each.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `scopes`) if a scope is invalid, appears twice, or there
    /// are more than [`MAX_SCOPES`].
    pub fn parse<I, S>(scopes: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = BTreeSet::new();
        for s in scopes {
            let scope = Scope::new(s)?;
            if set.len() >= MAX_SCOPES {
                return Err(Error::invalid_input("scopes", "at most 256 scopes per key"));
            }
            if !set.insert(scope) {
                return Err(Error::invalid_input("scopes", "a scope is listed twice"));
            }
        }
        Ok(Self(set))
    }

    /// Whether the set holds `scope`.
    #[must_use]
    pub fn contains(&self, scope: &Scope) -> bool {
        self.0.contains(scope)
    }

    /// The scopes of `required` that this set lacks, in sorted order (empty: it has them all).
    #[must_use]
    pub fn missing(&self, required: &Scopes) -> Vec<Scope> {
        required.0.difference(&self.0).cloned().collect()
    }

    /// Whether this set holds every scope of `required`.
    #[must_use]
    pub fn contains_all(&self, required: &Scopes) -> bool {
        required.0.is_subset(&self.0)
    }

    /// Number of scopes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scopes in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(&self.0).finish()
    }
}

impl TryFrom<Vec<String>> for Scopes {
    type Error = Error;
    fn try_from(v: Vec<String>) -> Result<Self> {
        Self::parse(v)
    }
}

impl From<Scopes> for Vec<String> {
    fn from(s: Scopes) -> Vec<String> {
        s.0.into_iter().map(String::from).collect()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<T: IntoIterator<Item = Scope>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Scopes {
    type Item = &'a Scope;
    type IntoIter = std::collections::btree_set::Iter<'a, Scope>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        for ok in ["read", "billing:write", "repo/admin", "a.b-c_d", "*"] {
            Scope::new(ok).unwrap();
        }
        for bad in ["", " read", "read ", "re ad", "lé", "a\0b", &"x".repeat(129)] {
            assert!(
                matches!(Scope::new(bad), Err(Error::InvalidInput { field: "scopes", .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn duplicates_are_rejected() {
        assert!(matches!(
            Scopes::parse(["read", "read"]),
            Err(Error::InvalidInput { field: "scopes", .. })
        ));
    }

    #[test]
    fn contains_all_and_missing() {
        let held = Scopes::parse(["read", "write"]).unwrap();
        let need = Scopes::parse(["admin", "read", "billing"]).unwrap();
        assert!(!held.contains_all(&need));
        let missing: Vec<_> = held.missing(&need).iter().map(|s| s.to_string()).collect();
        assert_eq!(missing, ["admin", "billing"]);
        assert!(held.contains_all(&Scopes::parse(["write"]).unwrap()));
        assert!(held.contains_all(&Scopes::new()));
        assert!(held.missing(&Scopes::new()).is_empty());
    }

    #[test]
    fn serde_validates() {
        let s: Scopes = serde_json::from_str(r#"["b","a"]"#).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["a","b"]"#);
        assert!(serde_json::from_str::<Scopes>(r#"["a b"]"#).is_err());
    }
}
