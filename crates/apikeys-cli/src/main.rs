//! `apikeys`: the command line of the apikeys SDK. Runs migrations, applies a declarative
//! bootstrap file, and administers keys (create, list, verify, roll, revoke, …) in the
//! database a service keeps them in. `apikeys --help` lists the commands, the environment
//! and the exit codes.

mod args;
mod bootstrap;
mod config;
mod failure;
mod keys;
mod output;
mod owners;
mod records;
mod redact;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command, MigrateAction};
use crate::failure::Failure;
use crate::output::Out;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version are successes, printed as clap prints them.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // Every other parse error is a usage error (1), its message never showing a key.
        Err(e) => {
            let _ = std::io::stderr().lock().write_all(failure::parse_error_text(&e).as_bytes());
            return ExitCode::from(failure::USAGE);
        }
    };
    match cli.refuse_misuse().and_then(|()| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "apikeys: error: {}", failure.one_line());
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let out = Out::new(cli.json);
    // `redact` is a filter: no database, no runtime.
    if let Command::Redact { no_hint } = cli.command {
        return redact::run(no_hint);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::system(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        match cli.command {
            Command::Migrate { action } => {
                let schema = config::schema(&cli.connection).await?;
                match action.unwrap_or(MigrateAction::Up) {
                    MigrateAction::Up => {
                        let applied = schema.up().await?;
                        out.migrations_applied(&applied)
                    }
                    MigrateAction::Status => out.migration_status(&schema.status().await?),
                }
            }
            Command::Bootstrap { file, dry_run } => {
                let client = config::client_without_keys(&cli.connection).await?;
                bootstrap::run(&client, &file, dry_run, &out).await
            }
            Command::Keys(command) => {
                let client = config::client(&cli.connection).await?;
                keys::run(&client, *command, &out).await
            }
            Command::Orgs(command) => {
                let client = config::client_without_keys(&cli.connection).await?;
                records::orgs(&client, command, &out).await
            }
            Command::Projects(command) => {
                let client = config::client_without_keys(&cli.connection).await?;
                records::projects(&client, command, &out).await
            }
            Command::Products(command) => {
                let client = config::client_without_keys(&cli.connection).await?;
                records::products(&client, command, &out).await
            }
            Command::Owners(command) => {
                let client = config::client_without_keys(&cli.connection).await?;
                owners::run(&client, command, &out).await
            }
            Command::Redact { .. } => Ok(()),
        }
    })
}
