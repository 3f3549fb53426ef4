//! What went wrong, as one line and an exit code.

use std::borrow::Cow;
use std::fmt::Write as _;

use apikeys_db::Error;
use apikeys_db::core::{find_keys, redact_keys};

/// Exit code of a usage or configuration error.
pub const USAGE: u8 = 1;
/// Exit code of "not found" or "invalid": no such record, bad input, a key that fails.
pub const INVALID: u8 = 2;
/// Exit code of a database (or other system) failure.
pub const DATABASE: u8 = 3;

/// A failed command: a message and the exit code it ends with.
///
/// The message never holds a key: anything shaped like one (of any prefix) is masked to its
/// hint when the failure is made, whatever the message quotes (a `--meta` pair, a name, a
/// cause), so neither the error line nor `Debug` can show one.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn new(message: String, code: u8) -> Self {
        let message = match redact_keys(&message) {
            Cow::Borrowed(_) => message,
            Cow::Owned(masked) => masked,
        };
        Self { message, code }
    }

    /// A usage or configuration error (exit 1).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(message.into(), USAGE)
    }

    /// Not found or invalid (exit 2).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(message.into(), INVALID)
    }

    /// A failure of the system around us: I/O, the runtime (exit 3).
    pub fn system(message: impl Into<String>) -> Self {
        Self::new(message.into(), DATABASE)
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

/// Refuses `text`, given on the command line where `what` belongs (`"a key id"`, `"an
/// organization name or id"`), when it holds a key: the refusal says so without repeating
/// it (someone pasted a key where its id or a name goes).
///
/// # Errors
/// An invalid-input [`Failure`] (exit 2) when `text` holds a key.
pub fn refuse_key(text: &str, what: &str) -> Result<(), Failure> {
    if find_keys(text.as_bytes()).is_empty() {
        return Ok(());
    }
    Err(Failure::invalid(format!(
        "that is a key, not {what}: never pass keys on the command line (they stay in shell \
         history); `keys verify` reads one from standard input"
    )))
}

/// Clap's message for a command line it cannot parse, with anything shaped like a key
/// masked to its hint: clap quotes the argument it refuses (an unexpected argument, an
/// unknown subcommand, a flag's invalid value), and that argument may be a pasted key.
/// Plain text, no colours: the escape codes around a quoted value would hide it from the
/// key finder.
///
/// Its usage line leaves out the settings every command shares: clap lists there those set
/// from the environment (`DATABASE_URL`, `APIKEYS_ENVIRONMENT`, ...) as if they were required
/// arguments of the command.
pub fn parse_error_text(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let shared = shared_flags();
    let text: Vec<String> = text
        .split_inclusive('\n')
        .map(|line| match line.starts_with("Usage: ") {
            true => shared.iter().fold(line.to_owned(), |l, flag| l.replace(flag.as_str(), "")),
            false => line.to_owned(),
        })
        .collect();
    redact_keys(&text.concat()).into_owned()
}

/// The shared settings as a usage line shows them: ` --database-url <URL>`, ...
fn shared_flags() -> Vec<String> {
    use clap::Args as _;
    let command = crate::args::ConnectionArgs::augment_args(clap::Command::new("apikeys"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string);
            Some(format!(" --{long} <{value}>"))
        })
        .collect()
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Configuration { .. } => USAGE,
            Error::InvalidKey
            | Error::Expired { .. }
            | Error::Revoked { .. }
            | Error::Disabled { .. }
            | Error::IpNotAllowed { .. }
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
        // A rejected value is named by the flag that gave it, not the library's field.
        // Instants as everywhere else in the command's output: RFC 3339, to the second.
        let when = |t: &chrono::DateTime<chrono::Utc>| crate::output::when(Some(*t));
        let mut message = match &e {
            Error::InvalidInput { field, reason } => match flag_of(field) {
                Some(flag) => format!("invalid {flag}: {reason}"),
                None => e.to_string(),
            },
            Error::Expired { expired_at } => format!("api key expired at {}", when(expired_at)),
            Error::Revoked { revoked_at } => format!("api key revoked at {}", when(revoked_at)),
            Error::Disabled { disabled_at } => format!("api key disabled at {}", when(disabled_at)),
            _ => e.to_string(),
        };
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                let _ = write!(message, ": {text}");
            }
            source = cause.source();
        }
        if code == DATABASE && missing_table(&message) {
            message.push_str(
                " (the database has no apikeys tables yet, or not all of them: run \
                 `apikeys migrate up` first)",
            );
        }
        Self::new(message, code)
    }
}

/// The command-line flag that sets the library's field `field`, where the two differ.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "page.limit" => "--limit",
        "scopes" => "--scope",
        "rate_limit" | "rate_limit.requests" | "rate_limit.window" => "--rate-limit",
        "rate_limits" => "--limit",
        "custom" => "--meta",
        "owner_id" | "owner" => "--owner",
        "credits" => "--credits",
        "credits.refill" => "--refill",
        "expires_at" => "--expires-at / --expires-in",
        "allowed_ips" => "--allow-ip",
        "within" => "--expiring-within",
        "grace" => "--grace",
        "actor" => "--actor",
        "name" => "--name",
        _ => return None,
    })
}

/// Whether a database error says a table is missing, in the words of SQLite (`no such
/// table`), PostgreSQL (`relation "…" does not exist`) or MySQL/MariaDB (`Table '…' doesn't
/// exist`).
fn missing_table(message: &str) -> bool {
    message.contains("no such table")
        || (message.contains("relation \"") && message.contains("\" does not exist"))
        || (message.contains("Table '") && message.contains("' doesn't exist"))
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

    #[test]
    fn keys_in_messages_are_masked() {
        let key = apikeys_db::KeyFormat::new("acme", Some("live")).unwrap().generate().unwrap();
        let k = key.expose_secret();
        let line = Failure::usage(format!("--meta {k:?}: expected key=value")).one_line();
        assert!(find_keys(line.as_bytes()).is_empty() && line.contains(&key.hint()), "{line}");
        let failure = Failure::invalid(format!("no organization {k:?}"));
        let debug = format!("{failure:?}");
        assert!(find_keys(debug.as_bytes()).is_empty(), "{debug}");
        assert!(refuse_key(k, "a key id").is_err());
        assert!(refuse_key(&format!("x {k} y"), "a name").is_err());
        assert!(refuse_key("acme", "a name").is_ok());
    }
}
