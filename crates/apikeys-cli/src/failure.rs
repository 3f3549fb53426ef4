//! What went wrong, as one line and an exit code.

use std::fmt::Write as _;

use apikeys_db::Error;

/// Exit code of a usage or configuration error.
pub const USAGE: u8 = 1;
/// Exit code of "not found" or "invalid": no such record, bad input, a key that fails.
pub const INVALID: u8 = 2;
/// Exit code of a database (or other system) failure.
pub const DATABASE: u8 = 3;

/// A failed command: a message and the exit code it ends with.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// A usage or configuration error (exit 1).
    pub fn usage(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: USAGE }
    }

    /// Not found or invalid (exit 2).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: INVALID }
    }

    /// A failure of the system around us: I/O, the runtime (exit 3).
    pub fn system(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: DATABASE }
    }

    /// The exit code.
    pub fn exit_code(&self) -> u8 {
        self.code
    }

    /// The message on one line: line breaks in causes become spaces.
    pub fn one_line(&self) -> String {
        self.message.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Configuration { .. } => USAGE,
            Error::InvalidKey
            | Error::Expired { .. }
            | Error::Revoked { .. }
            | Error::ProductNotAllowed { .. }
            | Error::InsufficientScope { .. }
            | Error::Quota { .. }
            | Error::UsageExhausted { .. }
            | Error::AlreadyExists { .. }
            | Error::NotFound { .. }
            | Error::InvalidInput { .. } => INVALID,
            _ => DATABASE,
        };
        // The error and its causes (the library keeps passwords and keys out of all of them).
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                let _ = write!(message, ": {text}");
            }
            source = cause.source();
        }
        Self { message, code }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_error_kind() {
        assert_eq!(Failure::from(Error::InvalidKey).exit_code(), INVALID);
        assert_eq!(Failure::from(Error::invalid_input("name", "bad")).exit_code(), INVALID);
        assert_eq!(Failure::from(Error::configuration("no secret")).exit_code(), USAGE);
        assert_eq!(Failure::from(Error::storage(std::io::Error::other("x"))).exit_code(), DATABASE);
        assert_eq!(Failure::usage("a\n  b").one_line(), "a b");
    }
}
