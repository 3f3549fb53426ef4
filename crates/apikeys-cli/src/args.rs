//! The command line, as clap parses it: every command, flag and help text.

use std::path::PathBuf;
use std::time::Duration;

use apikeys_db::{RateLimit, StatusFilter, Window};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::failure::Failure;

const ENVIRONMENT_HELP: &str = "\
Environment:
  DATABASE_URL                      the database (or --database-url): sqlite://PATH,
                                    postgres://USER:PASSWORD@HOST/DB, mysql://USER:PASSWORD@HOST/DB
  APIKEYS_SIGNING_SECRET            the signing secret (at least 32 bytes), or a file with
                                    --signing-secret-file / APIKEYS_SIGNING_SECRET_FILE; never a flag
  APIKEYS_PREVIOUS_SIGNING_SECRET   during a rotation, the previous secret (or its file with
                                    --previous-signing-secret-file), with its version

The `keys` commands need the signing secret your service uses, and the same key prefix and
environment: keys are stored as HMACs under that secret. `migrate`, `bootstrap`, `orgs`,
`projects`, `products` and `redact` issue no key and need none.

Exit status:
  0  success
  1  usage or configuration error (bad flag, missing DATABASE_URL or secret)
  2  not found or invalid: no such record, invalid input, a key that does not verify
  3  database error: unreachable, timed out, or a failed statement

Errors are one line on standard error. Output is a table for people, or JSON with --json.";

/// Manage API keys stored by apikeys: migrations, bootstrap, keys, organizations.
#[derive(Debug, Parser)]
#[command(name = "apikeys", version, about, long_about = None, after_long_help = ENVIRONMENT_HELP)]
#[command(after_help = "Run `apikeys --help` for the environment and the exit codes.")]
pub struct Cli {
    /// Where and how to connect.
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// Print JSON (one document on standard output) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Refuses what clap accepts but the command line does not: a key given as an argument
    /// of `keys verify`, which reads it from standard input only (arguments stay in shell
    /// history and are visible in the process list). The refusal does not repeat it.
    ///
    /// # Errors
    /// A usage [`Failure`] (exit 1) telling to pipe the key in.
    pub fn refuse_misuse(&self) -> Result<(), Failure> {
        if let Command::Keys(keys) = &self.command
            && let KeysCommand::Verify(VerifyArgs { misplaced_key: Some(_), .. }) = keys.as_ref()
        {
            return Err(Failure::usage(
                "`keys verify` takes the key on standard input, never as an argument (arguments \
                 stay in shell history and the process list): pipe it in, for instance \
                 `printf %s \"$KEY\" | apikeys keys verify`",
            ));
        }
        Ok(())
    }
}

/// The help heading of the settings every command shares.
pub const CONNECTION: &str = "Connection and key format (every command)";

/// Connection and key-format settings, shared by every command.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// The database URL. Prefer the environment variable: a flag is visible to other users
    /// of the machine in the process list.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true, value_name = "URL", help_heading = CONNECTION)]
    pub database_url: Option<String>,

    /// A file holding the signing secret (one trailing newline is ignored), instead of
    /// APIKEYS_SIGNING_SECRET.
    #[arg(long, env = "APIKEYS_SIGNING_SECRET_FILE", global = true, value_name = "PATH", hide_env_values = true, help_heading = CONNECTION)]
    pub signing_secret_file: Option<PathBuf>,

    /// The signing secret's version (as your service configures it).
    #[arg(long, env = "APIKEYS_SIGNING_SECRET_VERSION", global = true, value_name = "N", hide_env_values = true, help_heading = CONNECTION)]
    pub signing_secret_version: Option<u32>,

    /// During a rotation: a file holding the previous signing secret, instead of
    /// APIKEYS_PREVIOUS_SIGNING_SECRET.
    #[arg(long, env = "APIKEYS_PREVIOUS_SIGNING_SECRET_FILE", global = true, value_name = "PATH", hide_env_values = true, help_heading = CONNECTION)]
    pub previous_signing_secret_file: Option<PathBuf>,

    /// The previous signing secret's version (required with a previous secret).
    #[arg(long, env = "APIKEYS_PREVIOUS_SIGNING_SECRET_VERSION", global = true, value_name = "N", hide_env_values = true, help_heading = CONNECTION)]
    pub previous_signing_secret_version: Option<u32>,

    /// The key prefix your service uses.
    #[arg(long, env = "APIKEYS_KEY_PREFIX", default_value = "sk", global = true, hide_env_values = true, help_heading = CONNECTION)]
    pub key_prefix: String,

    /// The key environment segment your service uses, if any (for instance `live`).
    #[arg(long, env = "APIKEYS_ENVIRONMENT", global = true, value_name = "NAME", hide_env_values = true, help_heading = CONNECTION)]
    pub environment: Option<String>,

    /// Who is acting, as recorded in the audit trail (default: cli:$USER).
    #[arg(long, env = "APIKEYS_ACTOR", global = true, value_name = "NAME", hide_env_values = true, help_heading = CONNECTION)]
    pub actor: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply or inspect the schema's migrations (needs no signing secret).
    Migrate {
        /// What to do (default: up).
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
    /// Make sure the organizations, projects, products and links in a TOML file exist.
    ///
    /// Idempotent: run it on every deploy. It creates what is missing, prints what it
    /// created, and says "no changes" when everything was there. It never deletes or renames.
    /// See examples/bootstrap.toml for the format.
    Bootstrap {
        /// The TOML file.
        file: PathBuf,
        /// Print what would be created, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create, inspect, change and verify keys.
    #[command(subcommand)]
    Keys(Box<KeysCommand>),
    /// Organizations.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Projects.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// Products.
    #[command(subcommand)]
    Products(ProductsCommand),
    /// Owners' plans: rate limits and credits that every key of an owner shares.
    #[command(subcommand)]
    Owners(OwnersCommand),
    /// Mask anything shaped like an apikeys key in standard input (needs no database).
    ///
    /// Reads standard input line by line and writes it to standard output with every key of
    /// any prefix and environment replaced by its hint and `[redacted]` (for instance
    /// `sk_live_Ab3x…[redacted]`). A key is recognised by its shape and its checksum, so
    /// other long tokens are left alone. For log pipelines and support tickets.
    Redact {
        /// Replace keys by `[redacted]` alone, without their hint.
        #[arg(long)]
        no_hint: bool,
    },
}

/// `migrate` actions.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum MigrateAction {
    /// Apply the pending migrations (under a lock: safe from many deploy jobs at once).
    Up,
    /// List the migrations and whether each is applied.
    Status,
}

/// `orgs` commands.
#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// List the organizations.
    List,
}

/// `projects` commands.
#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// List projects: of one organization, or of all.
    List {
        /// Only this organization's (name or id).
        #[arg(long)]
        org: Option<String>,
    },
}

/// `products` commands.
#[derive(Debug, Subcommand)]
pub enum ProductsCommand {
    /// List products: of one organization or project, or of all.
    List {
        /// Only this organization's (name or id).
        #[arg(long)]
        org: Option<String>,
        /// Only those linked to this project (name or id; needs --org).
        #[arg(long, requires = "org")]
        project: Option<String>,
    },
}

/// `owners` commands. An owner is named as its keys name it (`keys create --owner`), within
/// one organization.
#[derive(Debug, Subcommand)]
pub enum OwnersCommand {
    /// Set an owner's plan whole: the limits and credits every key of the owner shares
    /// (created, or replaced: --credits sets the balance anew, none removes it).
    Set {
        /// The owner's id (as its keys' --owner).
        owner: String,
        /// The organization (name or id).
        #[arg(long)]
        org: String,
        /// A shared limit, as NAME=N/WINDOW (daily=10000/day); repeat for more.
        #[arg(long = "limit", value_parser = parse_named_limit, value_name = "NAME=N/WINDOW")]
        limits: Vec<(String, RateLimit)>,
        /// Shared usage credits: each validation of any of the owner's keys spends one.
        #[arg(long)]
        credits: Option<u64>,
        /// Refill the credits every period, as daily:N or monthly:N (needs --credits).
        #[arg(long, value_parser = parse_refill, requires = "credits", value_name = "PERIOD:N")]
        refill: Option<apikeys_db::Refill>,
    },
    /// Change only the shared limits of an owner's plan; its balance stays (no --limit
    /// removes them).
    Limits {
        /// The owner's id.
        owner: String,
        /// The organization (name or id).
        #[arg(long)]
        org: String,
        /// A shared limit, as NAME=N/WINDOW; repeat for more.
        #[arg(long = "limit", value_parser = parse_named_limit, value_name = "NAME=N/WINDOW")]
        limits: Vec<(String, RateLimit)>,
    },
    /// Show an owner's plan.
    Show {
        /// The owner's id.
        owner: String,
        /// The organization (name or id).
        #[arg(long)]
        org: String,
    },
    /// List the owners of an organization that have a plan.
    List {
        /// The organization (name or id).
        #[arg(long)]
        org: String,
    },
    /// Add credits to the balance an owner's keys share (one atomic statement).
    AddCredits {
        /// The owner's id.
        owner: String,
        /// The organization (name or id).
        #[arg(long)]
        org: String,
        /// How many credits to add (at least 1).
        amount: u64,
    },
    /// Delete an owner's plan: its keys stop sharing limits and credits. To close the
    /// owner's access, `keys revoke --owner` instead.
    Delete {
        /// The owner's id.
        owner: String,
        /// The organization (name or id).
        #[arg(long)]
        org: String,
    },
}

/// `keys` commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key and print it once (on standard output; the rest goes to standard error).
    Create(CreateArgs),
    /// List keys, oldest first.
    List(ListArgs),
    /// Show one key.
    Show {
        /// The key's id.
        id: String,
    },
    /// Revoke a key, or every key of an owner in an organization. Revoking is final.
    Revoke {
        /// The key's id.
        #[arg(required_unless_present = "owner", conflicts_with = "owner")]
        id: Option<String>,
        /// Revoke every key of this owner in --org instead (for instance a departed user).
        #[arg(long, requires = "org")]
        owner: Option<String>,
        /// The organization of --owner (name or id): owner ids are per organization.
        #[arg(long, requires = "owner")]
        org: Option<String>,
    },
    /// Disable a key: it is refused until enabled again (unlike revoke, this can be undone).
    Disable {
        /// The key's id.
        id: String,
    },
    /// Enable a disabled key again (a revoked key stays revoked).
    Enable {
        /// The key's id.
        id: String,
    },
    /// Delete a key. Its audit events stay.
    Delete {
        /// The key's id.
        id: String,
    },
    /// Check a key read from standard input (never from the command line). Counts no use.
    ///
    /// Exits 0 if the key is valid (and meets --product and --scope), 2 if not, with the
    /// reason on standard error: invalid, expired, revoked, disabled, not allowed from --ip,
    /// wrong product, missing scope.
    /// A key given as an argument instead is refused (exit 1) without being repeated.
    Verify(VerifyArgs),
    /// Change a key's name, scopes, rate limit, metadata, owner, credits or IP allowlist.
    Update(UpdateArgs),
    /// Replace a key by a new one (printed once); the old one keeps working for a grace period.
    ///
    /// The new key has the old one's organization, project, product, name, scopes, rate
    /// limit, metadata, owner and expiry; the credits move to it.
    Roll {
        /// The key's id.
        id: String,
        /// How long the old key keeps working, for instance 24h or 7d (0s: not at all).
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        grace: Duration,
    },
    /// Move a key's expiry: to an instant, or later by a duration.
    Renew(RenewArgs),
    /// Add usage credits to a key's balance (a top-up; `update --credits` sets it instead).
    ///
    /// One atomic statement: checks spending on any replica meanwhile lose none of them. A
    /// refill that fell due is applied first, so the top-up is not overwritten by it.
    AddCredits {
        /// The key's id.
        id: String,
        /// How many credits to add (at least 1).
        amount: u64,
    },
    /// A key's audit trail, oldest first.
    Events {
        /// The key's id.
        id: String,
    },
    /// The signing-secret rotation pass: find the keys not yet under the current secret.
    ///
    /// During a rotation (the new secret current, the old one previous), keys move to the
    /// new secret on their next tracked success. An HMAC cannot be re-keyed without the
    /// plaintext, which is never stored, so no offline pass can move the others: they stop
    /// verifying once the previous secret is removed. This pass lists them, in batches, with
    /// a progress bar; --revoke revokes them (reissue the ones still wanted). It is
    /// resumable: run it again and it goes on with what is left.
    Rehash(RehashArgs),
}

/// `keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The organization (name or id).
    #[arg(long)]
    pub org: String,
    /// Narrow the key to a project of the organization (name or id).
    #[arg(long)]
    pub project: Option<String>,
    /// Narrow the key to a product of the organization (name or id).
    #[arg(long)]
    pub product: Option<String>,
    /// A display name.
    #[arg(long)]
    pub name: String,
    /// A scope the key grants (repeat, or separate with commas).
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// A rate limit, as N/second, N/minute, N/hour or N/day.
    #[arg(long, value_parser = parse_rate_limit, value_name = "N/WINDOW")]
    pub rate_limit: Option<RateLimit>,
    /// A named rate limit beside the main one, as NAME=N/WINDOW (daily=10000/day); repeat for
    /// more. Every check must fit in each.
    #[arg(long = "limit", value_parser = parse_named_limit, value_name = "NAME=N/WINDOW")]
    pub limits: Vec<(String, RateLimit)>,
    /// When it expires, as a duration from now (30d, 12h, 1y); default: never.
    #[arg(long, value_parser = parse_duration, conflicts_with = "expires_at")]
    pub expires_in: Option<Duration>,
    /// When it expires, as an RFC 3339 instant (2027-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_instant)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Custom metadata: key=value (a string) or key:=JSON (a number, object, …). Repeat.
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// The owner (an opaque id of yours: a user, a team).
    #[arg(long)]
    pub owner: Option<String>,
    /// Usage credits: each validation spends one; none left answers 429.
    #[arg(long)]
    pub credits: Option<u64>,
    /// Refill the credits every period, as daily:N or monthly:N (needs --credits).
    #[arg(long, value_parser = parse_refill, requires = "credits", value_name = "PERIOD:N")]
    pub refill: Option<apikeys_db::Refill>,
    /// Allow the key only from this address or CIDR block (repeat, or separate with commas);
    /// default: any address.
    #[arg(long = "allow-ip", value_delimiter = ',', value_name = "CIDR")]
    pub allow_ips: Vec<String>,
}

/// `keys list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The keys of this organization (name or id).
    #[arg(long, required_unless_present = "expiring_within")]
    pub org: Option<String>,
    /// Only the keys of this project of the organization (name or id).
    #[arg(long, requires = "org")]
    pub project: Option<String>,
    /// The keys of this owner in --org (owner ids are per organization).
    #[arg(long, requires = "org", conflicts_with_all = ["project", "expiring_within"])]
    pub owner: Option<String>,
    /// Active keys that expire within this long (7d), in any organization.
    #[arg(long, value_parser = parse_duration, conflicts_with = "org")]
    pub expiring_within: Option<Duration>,
    /// Which keys.
    #[arg(long, value_enum, default_value = "active")]
    pub status: StatusArg,
    /// At most this many keys per page (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Start after this key id (the `next` of an earlier page).
    #[arg(long)]
    pub after: Option<String>,
    /// Every page, not just the first.
    #[arg(long)]
    pub all: bool,
}

/// Which keys a listing shows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    /// Usable now.
    Active,
    /// Revoked.
    Revoked,
    /// Past their expiry (and not revoked).
    Expired,
    /// Disabled (and neither revoked nor expired).
    Disabled,
    /// Every key.
    All,
}

impl From<StatusArg> for StatusFilter {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Active => StatusFilter::Active,
            StatusArg::Revoked => StatusFilter::Revoked,
            StatusArg::Expired => StatusFilter::Expired,
            StatusArg::Disabled => StatusFilter::Disabled,
            StatusArg::All => StatusFilter::All,
        }
    }
}

/// `keys verify`. Its `Debug` shows `[redacted]` for an argument given in place of stdin.
#[derive(Args)]
pub struct VerifyArgs {
    /// Not accepted: caught here only to refuse it with a clear message instead of clap's,
    /// which would quote it (it is most likely the key itself).
    #[arg(hide = true, value_name = "KEY")]
    pub misplaced_key: Option<String>,
    /// The key must be allowed this product (name or id; needs --org).
    #[arg(long, requires = "org")]
    pub product: Option<String>,
    /// The organization of --product (name or id).
    #[arg(long)]
    pub org: Option<String>,
    /// A scope the key must grant (repeat, or separate with commas).
    #[arg(long = "scope", value_delimiter = ',')]
    pub scopes: Vec<String>,
    /// Check as a request from this address (for keys with an IP allowlist, which are
    /// refused without it).
    #[arg(long)]
    pub ip: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for VerifyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyArgs")
            .field("misplaced_key", &self.misplaced_key.as_ref().map(|_| "[redacted]"))
            .field("product", &self.product)
            .field("org", &self.org)
            .field("scopes", &self.scopes)
            .field("ip", &self.ip)
            .finish()
    }
}

/// `keys update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key's id.
    pub id: String,
    /// A new display name.
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the scopes by these (repeat, or separate with commas).
    #[arg(long = "scope", value_delimiter = ',', conflicts_with = "clear_scopes")]
    pub scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long)]
    pub clear_scopes: bool,
    /// A new rate limit (N/second, N/minute, N/hour, N/day).
    #[arg(long, value_parser = parse_rate_limit, value_name = "N/WINDOW", conflicts_with = "no_rate_limit")]
    pub rate_limit: Option<RateLimit>,
    /// Remove the rate limit.
    #[arg(long)]
    pub no_rate_limit: bool,
    /// Replace the named rate limits by these, as NAME=N/WINDOW (repeat for more).
    #[arg(long = "limit", value_parser = parse_named_limit, value_name = "NAME=N/WINDOW", conflicts_with = "no_limits")]
    pub limits: Vec<(String, RateLimit)>,
    /// Remove every named rate limit.
    #[arg(long)]
    pub no_limits: bool,
    /// Replace the custom metadata by these key=value / key:=JSON pairs.
    #[arg(long = "meta", value_name = "KEY=VALUE", conflicts_with = "clear_meta")]
    pub meta: Vec<String>,
    /// Remove all custom metadata.
    #[arg(long)]
    pub clear_meta: bool,
    /// A new owner.
    #[arg(long, conflicts_with = "no_owner")]
    pub owner: Option<String>,
    /// Remove the owner.
    #[arg(long)]
    pub no_owner: bool,
    /// Set the credits to this balance.
    #[arg(long, conflicts_with = "no_credits")]
    pub credits: Option<u64>,
    /// With --credits: refill every period, as daily:N or monthly:N.
    #[arg(long, value_parser = parse_refill, requires = "credits", value_name = "PERIOD:N")]
    pub refill: Option<apikeys_db::Refill>,
    /// Remove the credits (unlimited use).
    #[arg(long)]
    pub no_credits: bool,
    /// Replace the IP allowlist by these addresses or CIDR blocks (repeat, or separate with
    /// commas).
    #[arg(
        long = "allow-ip",
        value_delimiter = ',',
        value_name = "CIDR",
        conflicts_with = "any_ip"
    )]
    pub allow_ips: Vec<String>,
    /// Remove the IP allowlist (any address).
    #[arg(long)]
    pub any_ip: bool,
}

/// `keys renew`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["expires_at", "expires_in", "extend_by"])))]
pub struct RenewArgs {
    /// The key's id.
    pub id: String,
    /// The new expiry, as an RFC 3339 instant.
    #[arg(long, value_parser = parse_instant)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The new expiry, as a duration from now (30d).
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// Move the current expiry later by this much (30d).
    #[arg(long, value_parser = parse_duration)]
    pub extend_by: Option<Duration>,
}

/// `keys rehash`.
#[derive(Debug, Args)]
pub struct RehashArgs {
    /// Revoke the active keys not under the current secret (they are audited as revoked by
    /// the actor).
    #[arg(long)]
    pub revoke: bool,
    /// Keys per batch (1 to 1000).
    #[arg(long, default_value_t = 500)]
    pub batch: u32,
}

/// `30d`, `24h`, `1h30m`, `90s`: a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (for instance 30d, 24h, 90s)"))
}

/// An RFC 3339 instant.
pub fn parse_instant(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e} (for instance 2027-01-31T00:00:00Z)"))
}

/// `100/minute`: a rate limit.
pub fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let usage = "expected N/second, N/minute, N/hour or N/day, for instance 100/minute";
    let (n, window) = s.split_once('/').ok_or(usage)?;
    let window: Window = window.trim().parse().map_err(|_| usage.to_owned())?;
    let n: i64 = n.trim().parse().map_err(|_| usage.to_owned())?;
    RateLimit::try_new(n, window).map_err(|_| format!("the count must be 1 to 4294967295; {usage}"))
}

/// `daily=10000/day`: a named rate limit (the name is checked when the limits are built).
pub fn parse_named_limit(s: &str) -> Result<(String, RateLimit), String> {
    let (name, limit) =
        s.split_once('=').ok_or("expected NAME=N/WINDOW, for instance daily=10000/day")?;
    Ok((name.trim().to_owned(), parse_rate_limit(limit)?))
}

/// `daily:1000` or `monthly:50000`: a refill rule.
pub fn parse_refill(s: &str) -> Result<apikeys_db::Refill, String> {
    let usage = "expected daily:N or monthly:N, for instance monthly:10000";
    let (period, n) = s.split_once(':').ok_or(usage)?;
    let n: u64 = n.trim().parse().map_err(|_| usage.to_owned())?;
    match period.trim() {
        "daily" => Ok(apikeys_db::Refill::daily(n)),
        "monthly" => Ok(apikeys_db::Refill::monthly(n)),
        _ => Err(usage.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_key_given_to_verify_is_not_in_debug() {
        let key = apikeys_db::KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
        let cli = Cli::try_parse_from(["apikeys", "keys", "verify", key.expose_secret()]).unwrap();
        let Command::Keys(keys) = &cli.command else { panic!("{cli:?}") };
        let KeysCommand::Verify(args) = keys.as_ref() else { panic!("{cli:?}") };
        assert!(args.misplaced_key.is_some());
        assert!(cli.refuse_misuse().is_err());
        for debug in [format!("{cli:?}"), format!("{cli:#?}")] {
            assert!(apikeys_db::core::find_keys(debug.as_bytes()).is_empty(), "{debug}");
            assert!(debug.contains("[redacted]"), "{debug}");
        }
    }

    #[test]
    fn values_parse() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").is_err());
        let limit = parse_rate_limit("100/minute").unwrap();
        assert_eq!((limit.requests.get(), limit.window), (100, Window::Minute));
        for bad in ["100", "0/minute", "-1/second", "10/week", "x/day", "99999999999/day"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_refill("daily:5"), Ok(apikeys_db::Refill::daily(5)));
        assert!(parse_refill("weekly:5").is_err());
        assert!(parse_instant("2027-01-31T00:00:00Z").is_ok());
        assert!(parse_instant("tomorrow").is_err());
    }
}
