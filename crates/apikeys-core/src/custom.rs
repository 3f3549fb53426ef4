//! Custom JSON metadata: the rules every stored object follows.

use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// Largest accepted custom metadata, serialized as JSON, in bytes.
pub const MAX_CUSTOM_BYTES: usize = 64 * 1024;
/// Deepest accepted nesting of custom metadata (the top-level object is depth 1).
pub const MAX_CUSTOM_DEPTH: usize = 32;

/// Checks custom metadata: a JSON object, at most [`MAX_CUSTOM_DEPTH`] deep and
/// [`MAX_CUSTOM_BYTES`] as stored, with no NUL character in any key or string (PostgreSQL's
/// `jsonb` cannot store one, so it is refused on every database). Returns the object as
/// every database stores it and reads it back.
///
/// That is the object given, but for numbers PostgreSQL's `jsonb` would read back as
/// another JSON value; they are returned, and stored everywhere, as `jsonb` reads them, so
/// a key's metadata is the same whichever database holds it:
/// - a number written with an exponent that stands for a whole number (`serde_json` writes
///   floats from 10¹⁶ up that way, `7.1e+16`) becomes the integer it stands for
///   (71 000 000 000 000 000), when that fits `i64` (below zero) or `u64`;
/// - `-0.0` becomes `0.0`.
///
/// Every other number (`2.0`, `1.5`, `1e300`, integers) is kept as given. The size counts
/// numbers as PostgreSQL writes them out (`1e300` is 301 digits there).
///
/// The walk is iterative, so even absurdly deep values cannot overflow the stack here.
///
/// # Errors
/// [`Error::InvalidInput`] (field `custom`) when a rule is broken.
pub fn validate_custom(value: Value) -> Result<Map<String, Value>> {
    let Value::Object(mut map) = value else {
        return Err(Error::invalid_input("custom", "must be a json object"));
    };
    let nul = || Error::invalid_input("custom", "must not contain a NUL character (\\0)");
    let nul_key = |m: &Map<String, Value>| m.keys().any(|k| k.contains('\0'));
    if nul_key(&map) {
        return Err(nul());
    }
    // Bytes PostgreSQL adds by writing out the exponents of the numbers left as floats.
    let mut written_out = 0_usize;
    let mut stack: Vec<(&mut Value, usize)> = map.values_mut().map(|v| (v, 2)).collect();
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return Err(nul()),
            Value::Number(n) => {
                let (stored, longer) = as_stored(n);
                if let Some(stored) = stored {
                    *n = stored;
                }
                written_out = written_out.saturating_add(longer);
            }
            Value::Object(_) | Value::Array(_) if depth > MAX_CUSTOM_DEPTH => {
                return Err(Error::invalid_input(
                    "custom",
                    "must be nested at most 32 levels deep",
                ));
            }
            Value::Object(m) if nul_key(m) => return Err(nul()),
            Value::Object(m) => stack.extend(m.values_mut().map(|c| (c, depth + 1))),
            Value::Array(a) => stack.extend(a.iter_mut().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    let size = serde_json::to_vec(&map).map(|v| v.len()).unwrap_or(usize::MAX);
    if size.saturating_add(written_out) > MAX_CUSTOM_BYTES {
        return Err(Error::invalid_input("custom", "must be at most 64 KiB as json"));
    }
    Ok(map)
}

/// A number as PostgreSQL's `jsonb` reads it back, if that is another JSON value (see
/// [`validate_custom`]), and how many bytes longer PostgreSQL writes it than `serde_json`.
///
/// `jsonb` keeps a number as a decimal of the digits written: `d.ddde±x` is `dddd` times a
/// power of ten, written out in full, and read back by `serde_json` as an integer when it
/// has no fractional digits and fits 64 bits.
fn as_stored(n: &Number) -> (Option<Number>, usize) {
    let text = n.to_string();
    let unsigned = text.strip_prefix('-').unwrap_or(&text);
    let negative = unsigned.len() < text.len();
    let Some((mantissa, exponent)) = unsigned.split_once(['e', 'E']) else {
        let zero = n.as_f64().is_some_and(|f| f == 0.0);
        let negative_zero = negative && zero && !(n.is_i64() || n.is_u64());
        return (negative_zero.then(|| Number::from_f64(0.0)).flatten(), 0);
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = whole.len() + fraction.len();
    // An exponent too large for i64 is far beyond any size we accept anyway.
    let Ok(exponent) = exponent.parse::<i64>() else { return (None, usize::MAX) };
    let Ok(fraction_len) = i64::try_from(fraction.len()) else { return (None, usize::MAX) };
    // The value is `whole fraction` (as one integer) times 10^shift.
    let shift = exponent.saturating_sub(fraction_len);
    let written = match usize::try_from(shift) {
        // Digits, then `shift` zeros.
        Ok(zeros) => digits.saturating_add(zeros),
        // `0.` or the integer digits, a point, `-shift` fractional digits.
        Err(_) => {
            let after = usize::try_from(shift.unsigned_abs()).unwrap_or(usize::MAX);
            digits.saturating_sub(after).max(1).saturating_add(1).saturating_add(after)
        }
    };
    let longer = written.saturating_sub(unsigned.len());
    // 20 digits at most fit u64; more zeros cannot.
    let integer = match usize::try_from(shift) {
        Ok(zeros) if zeros <= 20 => {
            let sign = if negative { "-" } else { "" };
            let literal = format!("{sign}{whole}{fraction}{}", "0".repeat(zeros));
            if negative {
                literal.parse::<i64>().ok().map(Number::from)
            } else {
                literal.parse::<u64>().ok().map(Number::from)
            }
        }
        _ => None,
    };
    let longer = if integer.is_some() { 0 } else { longer };
    (integer, longer)
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

    /// Numbers PostgreSQL's `jsonb` reads back as another value are returned as it reads
    /// them (the integer of the digits written, `0.0` for `-0.0`), at any depth; the others
    /// are kept as they were.
    #[test]
    fn numbers_are_returned_as_jsonb_reads_them_back() {
        let two_to_60 = 2f64.powi(60);
        let given = json!({
            "neg": -7.112_496_011_669_557_6e16,
            "pos": 1e16,
            "deep": [{ "n": two_to_60 }],
            "i64_min": -(2f64.powi(63)),
            "u64_top": 18_446_744_073_709_549_568.0,
            "two_to_64": 2f64.powi(64),
            "beyond_u64": 1e20,
            "below_i64": -1e19,
            "neg_zero": -0.0,
            "plain": 2.0,
            "half": 1.5,
            "small": 1.5e-7,
            "int": 42,
            "big_int": u64::MAX,
            "min_int": i64::MIN,
        });
        let got = validate_custom(given).unwrap();
        assert_eq!(serde_json::to_string(&got["neg"]).unwrap(), "-71124960116695576");
        assert_eq!(serde_json::to_string(&got["pos"]).unwrap(), "10000000000000000");
        // The digits serde_json writes (1.152921504606847e+18), not 2^60's binary value.
        assert_eq!(serde_json::to_string(&got["deep"][0]["n"]).unwrap(), "1152921504606847000");
        assert_eq!(serde_json::to_string(&got["u64_top"]).unwrap(), "18446744073709550000");
        // Digits that do not fit 64 bits stay floats (jsonb's text then reads back as one).
        for kept in ["i64_min", "two_to_64", "beyond_u64", "below_i64", "plain", "half", "small"] {
            assert!(got[kept].is_f64(), "{kept}: {:?}", got[kept]);
        }
        assert_eq!(serde_json::to_string(&got["neg_zero"]).unwrap(), "0.0");
        assert_eq!(serde_json::to_string(&got["plain"]).unwrap(), "2.0");
        assert_eq!((got["int"].clone(), got["big_int"].clone()), (json!(42), json!(u64::MAX)));
        assert_eq!(got["min_int"], json!(i64::MIN));
        // Below 10^16 serde_json writes no exponent, and a whole float stays one.
        assert_eq!(serde_json::to_string(&json!(1e15)).unwrap(), "1000000000000000.0");
        assert!(validate_custom(json!({ "f": 1e15 })).unwrap()["f"].is_f64());
    }

    /// The size is that of what is stored: integers written out, and floats as PostgreSQL
    /// writes their exponents out.
    #[test]
    fn the_size_counts_numbers_as_stored() {
        // 6 bytes each as given, 21 as stored.
        let integers = json!({ "a": vec![1e19; 10_000] });
        assert!(serde_json::to_vec(&integers).unwrap().len() < MAX_CUSTOM_BYTES);
        assert!(matches!(
            validate_custom(integers),
            Err(Error::InvalidInput { field: "custom", .. })
        ));
        // 7 bytes each as given, 301 digits in PostgreSQL; and 326 characters for 5e-324.
        for tiny_or_huge in [1e300, 5e-324] {
            let floats = json!({ "a": vec![tiny_or_huge; 1_000] });
            assert!(serde_json::to_vec(&floats).unwrap().len() < MAX_CUSTOM_BYTES / 8);
            assert!(validate_custom(floats).is_err(), "{tiny_or_huge}");
        }
        assert!(validate_custom(json!({ "a": vec![1e300; 100] })).is_ok());
    }

    proptest::proptest! {
        /// What is returned is returned again unchanged, and no number makes it panic.
        #[test]
        fn validating_twice_changes_nothing(
            f in proptest::num::f64::ANY,
            i in proptest::prelude::any::<i64>(),
            u in proptest::prelude::any::<u64>(),
            whole in proptest::prelude::any::<i64>(),
        ) {
            let mut given = json!({ "i": i, "u": u, "whole": whole as f64 });
            if let Some(f) = serde_json::Number::from_f64(f) {
                given["f"] = Value::Number(f);
            }
            let once = validate_custom(given).unwrap();
            let twice = validate_custom(Value::Object(once.clone())).unwrap();
            proptest::prop_assert_eq!(
                serde_json::to_string(&once).unwrap(),
                serde_json::to_string(&twice).unwrap()
            );
        }
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
