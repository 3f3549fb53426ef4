//! Custom JSON metadata: the rules every stored object follows.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Largest accepted custom metadata, serialized as JSON, in bytes.
pub const MAX_CUSTOM_BYTES: usize = 64 * 1024;
/// Deepest accepted nesting of custom metadata (the top-level object is depth 1).
pub const MAX_CUSTOM_DEPTH: usize = 32;

/// Checks custom metadata: a JSON object, at most [`MAX_CUSTOM_DEPTH`] deep and
/// [`MAX_CUSTOM_BYTES`] serialized, with no NUL character in any key or string (PostgreSQL's
/// `jsonb` cannot store one, so it is refused on every database). Returns the object.
///
/// The walk is iterative, so even absurdly deep values cannot overflow the stack here.
///
/// # Errors
/// [`Error::InvalidInput`] (field `custom`) when a rule is broken.
pub fn validate_custom(value: Value) -> Result<Map<String, Value>> {
    let Value::Object(map) = value else {
        return Err(Error::invalid_input("custom", "must be a json object"));
    };
    let nul = || Error::invalid_input("custom", "must not contain a NUL character (\\0)");
    if map.keys().any(|k| k.contains('\0')) {
        return Err(nul());
    }
    let mut stack: Vec<(&Value, usize)> = map.values().map(|v| (v, 2)).collect();
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::String(s) if s.contains('\0') => return Err(nul()),
            Value::Object(m) if m.keys().any(|k| k.contains('\0')) => return Err(nul()),
            Value::Object(m) => Box::new(m.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if depth > MAX_CUSTOM_DEPTH {
            return Err(Error::invalid_input("custom", "must be nested at most 32 levels deep"));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    let size = serde_json::to_vec(&map).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_CUSTOM_BYTES {
        return Err(Error::invalid_input("custom", "must be at most 64 KiB as json"));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!({ "a": v });
        }
        v
    }

    #[test]
    fn custom_rules() {
        let ok = validate_custom(json!({"user_id": 42, "plan": "pro", "tags": ["a", {"b": null}]}));
        assert_eq!(ok.unwrap().len(), 3);
        for bad in [json!([1]), json!("s"), json!(null), json!(3)] {
            assert!(matches!(
                validate_custom(bad),
                Err(Error::InvalidInput { field: "custom", .. })
            ));
        }
        assert!(validate_custom(nested(MAX_CUSTOM_DEPTH)).is_ok());
        assert!(validate_custom(nested(MAX_CUSTOM_DEPTH + 1)).is_err());
        assert!(validate_custom(nested(200)).is_err());
        let big = json!({ "blob": "x".repeat(MAX_CUSTOM_BYTES) });
        assert!(matches!(validate_custom(big), Err(Error::InvalidInput { field: "custom", .. })));
        // A NUL anywhere: a top-level or nested key, a top-level or nested string.
        for bad in [
            json!({"a\0": 1}),
            json!({"a": "x\0y"}),
            json!({"a": [1, {"b": ["\0"]}]}),
            json!({"a": {"k\0": true}}),
        ] {
            assert!(matches!(
                validate_custom(bad),
                Err(Error::InvalidInput { field: "custom", .. })
            ));
        }
    }
}
