//! The migration CLI: `cargo run -p apikeys-migration -- up -u DATABASE_URL` (what
//! `sea-orm-cli migrate up -d migration` runs).
//!
//! sea-orm-migration's own CLI, with two differences: a SQLite file that does not exist yet
//! is created (as `ApiKeyClient` does), and a database that cannot be reached gives one
//! line on stderr and exit code 1 instead of a panic.

#![allow(clippy::print_stderr)] // a command-line tool reports on stderr

use std::process::ExitCode;

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectOptions, Database};

/// Subcommands and flags that do not touch a database.
const OFFLINE: [&str; 7] = ["-h", "--help", "-V", "--version", "help", "init", "generate"];

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| OFFLINE.contains(&a.as_str())) {
        cli::run_cli(migration::Migrator).await;
        return ExitCode::SUCCESS;
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(url) = flag(&args, "-u", "--database-url").or_else(|| env("DATABASE_URL")) else {
        eprintln!("error: no database url: set DATABASE_URL or pass -u URL");
        return ExitCode::from(2);
    };
    let schema = flag(&args, "-s", "--database-schema").or_else(|| env("DATABASE_SCHEMA"));
    let db = match Database::connect(options(&url, schema)).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("error: could not connect to the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The URL is parsed again by the CLI; the connection is the one opened above.
    cli::run_cli_with_connection(migration::Migrator, move |_| async move { Ok(db) }).await;
    ExitCode::SUCCESS
}

/// How to connect: a SQLite URL without a `mode` is opened read-write-create.
fn options(url: &str, schema: Option<String>) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options.set_schema_search_path(schema.unwrap_or_else(|| "public".to_owned()));
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") && !url.contains("mode=") {
        options.map_sqlx_sqlite_opts(|o| o.create_if_missing(true));
    }
    options
}

/// The value of a flag given as `-u V`, `-uV`, `--database-url V` or `--database-url=V`.
fn flag(args: &[String], short: &str, long: &str) -> Option<String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == short || arg == long {
            return args.next().cloned();
        }
        if let Some(v) = arg.strip_prefix(&format!("{long}=")) {
            return Some(v.to_owned());
        }
        if let Some(v) = arg.strip_prefix(short).filter(|v| !v.is_empty()) {
            return Some(v.to_owned());
        }
    }
    None
}
