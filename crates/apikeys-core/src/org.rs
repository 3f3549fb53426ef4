//! The tenant hierarchy: organizations, their projects and their products.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
use unicode_security::{GeneralSecurityProfile, RestrictionLevel, RestrictionLevelDetection};

use crate::error::{Error, Result};
use crate::id::{OrgId, ProductId, ProjectId};

/// Longest accepted name, in characters (Unicode scalar values).
pub const MAX_NAME_CHARS: usize = 255;

/// Checks the name of a key: free text shown to people.
///
/// A name must be 1 to 255 characters, must not start or end with whitespace, and must not
/// contain control characters (NUL, newline, tab, …) or format characters (Unicode category
/// Cf: zero-width space and joiner, word joiner, byte-order mark, bidi controls such as
/// U+202E), which make two different names look the same or reorder what is displayed.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when one of those rules is broken.
pub fn validate_label(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_input(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(Error::invalid_input(field, "must be at most 255 characters"));
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(Error::invalid_input(field, "must not start or end with whitespace"));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid_input(field, "must not contain control characters"));
    }
    if name.chars().any(|c| c.general_category() == GeneralCategory::Format) {
        return Err(Error::invalid_input(
            field,
            "must not contain invisible format characters (zero-width, bidi controls, BOM)",
        ));
    }
    Ok(())
}

/// Checks the name of an organization, project or product: an identifier that bootstrap code
/// looks up and that people read in dashboards.
///
/// Names are compared exactly (case-sensitive, byte for byte, no Unicode normalization) on
/// every database, so "Acme" and "acme" are two organizations. On top of the rules of
/// [`validate_label`], the letters of a name must not mix scripts in the ways Unicode TS #39
/// flags as spoofing risks: a name passes if its letters are at most *moderately
/// restrictive* (one script; or Latin with Han, Hiragana, Katakana or Hangul; or Latin with
/// one other recommended script except Cyrillic and Greek). "аcme" with a Cyrillic "а" is
/// rejected; "Café 東京" and "Яндекс" are fine. Spaces, digits, punctuation and symbols
/// do not count towards the scripts.
///
/// # Errors
/// [`Error::InvalidInput`] naming `field` when one of those rules is broken.
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    validate_label(field, name)?;
    let letters: String =
        name.chars().filter(|&c| GeneralSecurityProfile::identifier_allowed(c)).collect();
    if !letters.as_str().check_restriction_level(RestrictionLevel::ModeratelyRestrictive) {
        return Err(Error::invalid_input(
            field,
            "mixes scripts in a way that can spoof another name (e.g. Latin with Cyrillic)",
        ));
    }
    Ok(())
}

/// A tenant: the customer of the SaaS backend. Its name is unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Organization {
    /// Its id.
    pub id: OrgId,
    /// Its unique name.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A group of keys inside an organization ("v1", "mobile"); unique by (organization, name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Project {
    /// Its id.
    pub id: ProjectId,
    /// The organization it belongs to.
    pub org_id: OrgId,
    /// Its name, unique within the organization.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// An API surface of the SaaS backend, linked to projects; unique by (organization, name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct Product {
    /// Its id.
    pub id: ProductId,
    /// The organization it belongs to.
    pub org_id: OrgId,
    /// Its name, unique within the organization.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["acme", "Acme Inc.", "株式会社", "a", &"x".repeat(255), "ünïcödé – ok"]
        {
            validate_name("name", ok).unwrap();
        }
        let bad = [
            "".to_owned(),
            " ".to_owned(),
            " lead".to_owned(),
            "trail ".to_owned(),
            "nul\0byte".to_owned(),
            "line\nbreak".to_owned(),
            "x".repeat(256),
        ];
        for b in bad {
            assert!(
                matches!(validate_name("name", &b), Err(Error::InvalidInput { field: "name", .. })),
                "{b:?}"
            );
        }
        // 255 multi-byte characters are fine (the limit is in characters, not bytes).
        validate_name("name", &"é".repeat(255)).unwrap();
    }

    #[test]
    fn format_characters_are_refused_in_every_name() {
        // Zero-width space, non-joiner, joiner, word joiner, BOM, LRM, RLM, bidi embeddings
        // and overrides, isolates, Arabic letter mark, soft hyphen, Mongolian vowel separator.
        let format = [
            '\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{200E}', '\u{200F}',
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{061C}', '\u{00AD}', '\u{180E}',
        ];
        for c in format {
            for name in [format!("acme{c}"), format!("ac{c}me"), format!("{c}acme")] {
                for check in [validate_name, validate_label] {
                    assert!(
                        matches!(
                            check("name", &name),
                            Err(Error::InvalidInput { field: "name", .. })
                        ),
                        "U+{:04X} in {name:?}",
                        c as u32
                    );
                }
            }
        }
        // Combining marks and variation selectors are not format characters.
        validate_name("name", "Cafe\u{301}").unwrap();
        validate_label("name", "ok \u{2764}\u{FE0F}").unwrap();
    }

    #[test]
    fn mixed_scripts() {
        // One script, or Latin with CJK / one other script that is not easily confused.
        for ok in ["Café 東京", "Яндекс", "Ελληνικά", "acme-東京-株式会社", "Acme ᏣᎳᎩ", "Acme 🚀"]
        {
            validate_name("name", ok).unwrap();
        }
        // Latin mixed with Cyrillic or Greek look-alikes.
        for bad in ["\u{430}cme", "p\u{430}yp\u{430}l", "\u{3bf}pen", "Acme Россия"] {
            let err = validate_name("name", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput { field: "name", .. }), "{bad:?}");
        }
        // Key names are free text: only the label rules apply.
        validate_label("name", "Acme Россия").unwrap();
    }
}
