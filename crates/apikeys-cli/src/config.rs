//! The client (or the schema handle) the command line's settings describe.

use std::path::Path;

use apikeys_db::{ApiKeyClient, ApiKeysSchema};

use crate::args::ConnectionArgs;
use crate::failure::Failure;

/// The database URL, from the flag or `DATABASE_URL`.
fn database_url(args: &ConnectionArgs) -> Result<&str, Failure> {
    args.database_url.as_deref().filter(|u| !u.is_empty()).ok_or_else(|| {
        Failure::usage(
            "no database: set DATABASE_URL (or pass --database-url), e.g. sqlite://apikeys.db",
        )
    })
}

/// The schema of the configured database (no signing secret needed).
pub async fn schema(args: &ConnectionArgs) -> Result<ApiKeysSchema, Failure> {
    Ok(ApiKeysSchema::connect(database_url(args)?).await?)
}

/// A secret from the environment variable `var` or the file `file` (exactly one).
fn secret(var: &str, file: Option<&Path>, file_flag: &str) -> Result<Option<Vec<u8>>, Failure> {
    let from_env = std::env::var_os(var).filter(|v| !v.is_empty());
    match (from_env, file) {
        (Some(_), Some(_)) => Err(Failure::usage(format!(
            "{var} and {file_flag} are both set: give the secret one way"
        ))),
        (Some(value), None) => value
            .into_string()
            .map(|s| Some(s.into_bytes()))
            .map_err(|_| Failure::usage(format!("{var} is not valid UTF-8"))),
        (None, Some(path)) => {
            let mut bytes = std::fs::read(path).map_err(|e| {
                Failure::usage(format!("cannot read {file_flag} {}: {e}", path.display()))
            })?;
            // Files usually end with a newline that is not part of the secret.
            if bytes.ends_with(b"\n") {
                bytes.pop();
                if bytes.ends_with(b"\r") {
                    bytes.pop();
                }
            }
            Ok(Some(bytes))
        }
        (None, None) => Ok(None),
    }
}

/// Who acts, for the audit trail: the flag, or `cli:$USER`, or `cli`.
fn actor(args: &ConnectionArgs) -> String {
    if let Some(actor) = &args.actor {
        return actor.clone();
    }
    match std::env::var("USER") {
        Ok(user)
            if !user.is_empty()
                && apikeys_db::core::hazmat::validate_actor(&format!("cli:{user}")).is_ok() =>
        {
            format!("cli:{user}")
        }
        _ => "cli".to_owned(),
    }
}

/// A client for the configured database, signing secret(s) and key format.
pub async fn client(args: &ConnectionArgs) -> Result<ApiKeyClient, Failure> {
    let current = secret(
        "APIKEYS_SIGNING_SECRET",
        args.signing_secret_file.as_deref(),
        "--signing-secret-file",
    )?
    .ok_or_else(|| {
        Failure::usage(
            "no signing secret: set APIKEYS_SIGNING_SECRET or pass --signing-secret-file \
                 (the secret your service uses)",
        )
    })?;
    client_with(args, current).await
}

/// A client for commands that hash no key (`bootstrap`, `orgs`, `projects`, `products`):
/// the configured signing secret if there is one, else a random one that never leaves this
/// process. Such a client never stores a hash nor reads the secret registry, so the
/// secret it holds changes nothing.
pub async fn client_without_keys(args: &ConnectionArgs) -> Result<ApiKeyClient, Failure> {
    let configured = secret(
        "APIKEYS_SIGNING_SECRET",
        args.signing_secret_file.as_deref(),
        "--signing-secret-file",
    )?;
    let current = configured.unwrap_or_else(|| {
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        format!("{}{}", a.simple(), b.simple()).into_bytes()
    });
    client_with(args, current).await
}

async fn client_with(args: &ConnectionArgs, current: Vec<u8>) -> Result<ApiKeyClient, Failure> {
    let url = database_url(args)?;
    let mut builder = ApiKeyClient::builder()
        .database_url(url)
        .signing_secret(current)
        .key_prefix(&args.key_prefix)
        // One connection is all a command needs.
        .max_connections(2);
    if let Some(version) = args.signing_secret_version {
        builder = builder.signing_secret_version(version);
    }
    if let Some(env) = &args.environment {
        builder = builder.environment(env);
    }
    let previous = secret(
        "APIKEYS_PREVIOUS_SIGNING_SECRET",
        args.previous_signing_secret_file.as_deref(),
        "--previous-signing-secret-file",
    )?;
    match (previous, args.previous_signing_secret_version) {
        (Some(secret), Some(version)) => builder = builder.previous_signing_secret(version, secret),
        (Some(_), None) => {
            return Err(Failure::usage(
                "a previous signing secret needs its version: --previous-signing-secret-version \
                 or APIKEYS_PREVIOUS_SIGNING_SECRET_VERSION",
            ));
        }
        (None, Some(_)) => {
            return Err(Failure::usage(
                "--previous-signing-secret-version is set but no previous secret is given",
            ));
        }
        (None, None) => {}
    }
    let client = builder.build().await?;
    Ok(client.acting_as(&actor(args))?)
}
