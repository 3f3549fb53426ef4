//! `apikeys redact`: a filter from standard input to standard output that masks keys.

use std::io::{BufRead, Write};

use apikeys_db::core::{find_keys, redact_keys};

use crate::failure::Failure;

/// Copies standard input to standard output line by line, each key replaced by its hint and
/// `[redacted]` (or by `[redacted]` alone). Bytes that are not UTF-8 pass through unchanged.
pub fn run(no_hint: bool) -> Result<(), Failure> {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    filter(stdin, stdout, no_hint)
}

fn filter(mut input: impl BufRead, mut output: impl Write, no_hint: bool) -> Result<(), Failure> {
    let read_failed =
        |e: std::io::Error| Failure::system(format!("cannot read standard input: {e}"));
    let write_failed =
        |e: std::io::Error| Failure::system(format!("cannot write to standard output: {e}"));
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(read_failed)? == 0 {
            break;
        }
        let mut last = 0;
        for range in find_keys(&line) {
            output.write_all(&line[last..range.start]).map_err(write_failed)?;
            // A found key is ASCII; core's redaction of it alone is its hint and the mark.
            match std::str::from_utf8(&line[range.clone()]) {
                Ok(key) if !no_hint => {
                    output.write_all(redact_keys(key).as_bytes()).map_err(write_failed)?;
                }
                _ => output.write_all(b"[redacted]").map_err(write_failed)?,
            }
            last = range.end;
        }
        output.write_all(&line[last..]).map_err(write_failed)?;
        // Each line as it comes: `tail -f | apikeys redact` must not wait for a buffer.
        output.flush().map_err(write_failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apikeys_db::KeyFormat;

    fn run(input: &[u8], no_hint: bool) -> Vec<u8> {
        let mut out = Vec::new();
        filter(input, &mut out, no_hint).unwrap();
        out
    }

    #[test]
    fn keys_are_masked_and_everything_else_passes_through() {
        let key = KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
        let k = key.expose_secret();
        let input = format!("a {k} b\n\u{e9}-free line\nlast {k}").into_bytes();
        let mut input_with_binary = input.clone();
        input_with_binary.extend_from_slice(b"\n\xff\xfe tail");
        let out = run(&input_with_binary, false);
        let expected = format!(
            "a {}[redacted] b\n\u{e9}-free line\nlast {}[redacted]",
            key.hint(),
            key.hint()
        );
        let mut expected = expected.into_bytes();
        expected.extend_from_slice(b"\n\xff\xfe tail");
        assert_eq!(out, expected);
        let bare = String::from_utf8(run(format!("x={k};").as_bytes(), true)).unwrap();
        assert_eq!(bare, "x=[redacted];");
    }
}
