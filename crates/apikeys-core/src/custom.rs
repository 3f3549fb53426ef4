//! Custom JSON metadata: the rules every stored object follows.

use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// Largest accepted custom metadata, serialized as JSON, in bytes.
pub const MAX_CUSTOM_BYTES: usize = 64 * 1024;
/// Deepest accepted nesting of custom metadata (the top-level object is depth 1).
pub const MAX_CUSTOM_DEPTH: usize = 32;

/// Checks custom metadata: a JSON object, at most [`MAX_CUSTOM_DEPTH`] deep and
/// [`MAX_CUSTOM_BYTES`] serialized, with no NUL character in any key or string (PostgreSQL's
/// `jsonb` cannot store one, so it is refused on every database). Returns the object as it
/// is stored and read back on every database.
///
/// That is the object given, except for one kind of number: a float that is a whole number
/// written with an exponent (`serde_json` writes floats from 10¹⁶ up that way, `7.1e16`) and
/// fits a 64-bit integer is returned as that integer, of the same value. PostgreSQL's
/// `jsonb` reads such a float back as an integer, so every database stores it as one, and a
/// key's metadata reads back the same whichever database holds it. Other floats (`2.0`,
/// `1.5`, `1e300`) and every integer are kept as given.
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
    let mut map = map;
    let mut stack: Vec<&mut Value> = map.values_mut().collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::Number(n) => {
                if let Some(whole) = whole_number(n) {
                    *n = whole;
                }
            }
            Value::Object(m) => stack.extend(m.values_mut()),
            Value::Array(a) => stack.extend(a.iter_mut()),
            _ => {}
        }
    }
    Ok(map)
}

/// The integer a float written with an exponent stands for, when it is a whole number that
/// fits `i64` (below zero) or `u64`: what PostgreSQL's `jsonb` reads back for it.
fn whole_number(n: &Number) -> Option<Number> {
    // 2⁶³ and 2⁶⁴, exactly representable as f64.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    let f = n.as_f64().filter(|_| n.is_f64())?;
    if f.fract() != 0.0 || !n.to_string().contains(['e', 'E']) {
        return None;
    }
    // In range, a whole f64 converts exactly.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    if (-I64_END..0.0).contains(&f) {
        Some(Number::from(f as i64))
    } else if (0.0..U64_END).contains(&f) {
        Some(Number::from(f as u64))
    } else {
        None
    }
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

    /// Whole floats written with an exponent become the integer PostgreSQL's `jsonb` reads
    /// back; other numbers, at any depth, are kept as they were.
    #[test]
    fn whole_floats_with_an_exponent_become_integers() {
        let given = json!({
            "neg": -7.112_496_011_669_557_6e16,
            "pos": 1e16,
            "deep": [{ "n": 9.2e18 }],
            "beyond_u64": 1e20,
            "below_i64": -1e19,
            "u64_top": 1.844_674_407_370_955e19,
            "plain": 2.0,
            "half": 1.5,
            "small": 1.5e-7,
            "int": 42,
            "big_int": u64::MAX,
        });
        let got = validate_custom(given).unwrap();
        assert_eq!(got["neg"], json!(-71_124_960_116_695_576_i64));
        assert!(got["neg"].is_i64());
        assert_eq!(got["pos"], json!(10_000_000_000_000_000_u64));
        assert!(got["pos"].is_u64());
        assert_eq!(got["deep"][0]["n"], json!(9_200_000_000_000_000_000_u64));
        assert!(got["u64_top"].is_u64());
        for kept in ["beyond_u64", "below_i64", "plain", "half", "small"] {
            assert!(got[kept].is_f64(), "{kept}: {:?}", got[kept]);
        }
        assert_eq!(got["plain"], json!(2.0));
        assert_eq!((got["int"].clone(), got["big_int"].clone()), (json!(42), json!(u64::MAX)));
        // serde_json writes each kept float without an exponent or beyond 64 bits.
        assert_eq!(serde_json::to_string(&json!(1e15)).unwrap(), "1000000000000000.0");
        assert!(validate_custom(json!({ "f": 1e15 })).unwrap()["f"].is_f64());
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
