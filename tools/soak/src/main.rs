//! `apikeys-soak`: the soak under faults. See the crate's docs (`src/lib.rs`) and
//! `scripts/soak`.
//!
//! ```sh
//! apikeys-soak [--seconds N | --minutes N] [--backend sqlite|postgres|mysql] [--seed S]
//!              [--keys N] [--rate CHECKS_PER_S_PER_REPLICA] [--dir DIR]
//! ```
//! The same binary is each of the processes: the parent (as run), and, with
//! `APIKEYS_SOAK_ROLE` set, a replica or the admin it starts.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod parent;
mod replica;
mod spec;

use std::process::ExitCode;

use spec::{ROLE_ENV, SPEC_ENV, Spec};

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let role = std::env::var(ROLE_ENV).unwrap_or_default();
    if role.is_empty() {
        return match parent::Args::parse(std::env::args().skip(1)) {
            Ok(args) => runtime.block_on(parent::run(args)),
            Err(e) => {
                eprintln!("soak: {e}");
                ExitCode::from(2)
            }
        };
    }
    let spec: Spec = match std::env::var(SPEC_ENV)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak {role}: bad {SPEC_ENV}: {e}");
            return ExitCode::from(2);
        }
    };
    match role.as_str() {
        "replica" => runtime.block_on(replica::run(spec)),
        "admin" => runtime.block_on(admin::run(spec)),
        other => {
            eprintln!("soak: unknown role {other}");
            ExitCode::from(2)
        }
    }
}
