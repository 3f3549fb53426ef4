//! `apikeys keys …`: issuing, listing, changing, verifying and rotating keys.

use std::io::Read;

use apikeys_db::{
    ApiKey, ApiKeyClient, Credits, Error, IpAllowlist, KeyFormat, KeyId, KeyPage, KeyUpdate,
    NewKeyInput, Page, RateLimits, Refill, StatusFilter, ValidateOptions, VerifyOptions,
};
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

use crate::args::{
    CreateArgs, KeysCommand, ListArgs, RehashArgs, RenewArgs, UpdateArgs, VerifyArgs,
};
use crate::failure::{Failure, refuse_key};
use crate::output::{Out, key_json, note, print_line};
use crate::records;

/// The longest standard input `keys verify` reads: far more than any key.
const MAX_STDIN: u64 = 4096;

/// Runs one `keys` command.
pub async fn run(client: &ApiKeyClient, command: KeysCommand, out: &Out) -> Result<(), Failure> {
    match command {
        KeysCommand::Create(args) => create(client, args, out).await,
        KeysCommand::List(args) => list(client, args, out).await,
        KeysCommand::Show { id } => out.key(&client.get_key(key_id(&id)?).await?),
        KeysCommand::Revoke { id: Some(id), .. } => {
            let id = key_id(&id)?;
            let before = client.get_key(id).await?.revoked_at;
            let key = client.revoke_key(id).await?;
            if let Some(at) = before {
                note(&format!("already revoked at {}", crate::output::when(Some(at))));
            }
            out.key(&key)
        }
        KeysCommand::Revoke { owner: Some(owner), org: Some(org), .. } => {
            let org = records::org(client, &org).await?;
            let revoked = client.revoke_owner_keys(org.id, &owner).await?;
            if out.json {
                return out.json_value(&json!({ "revoked": revoked }));
            }
            for id in &revoked {
                print_line(&id.to_string())?;
            }
            note(&format!("revoked {} key(s) of that owner", revoked.len()));
            Ok(())
        }
        KeysCommand::Revoke { .. } => Err(Failure::usage("give a key id, or --owner and --org")),
        KeysCommand::Disable { id } => switch(client, &id, true, out).await,
        KeysCommand::Enable { id } => switch(client, &id, false, out).await,
        KeysCommand::Delete { id } => {
            let id = key_id(&id)?;
            client.delete_key(id).await?;
            if out.json {
                return out.json_value(&json!({ "deleted": id }));
            }
            print_line(&format!("deleted key {id}"))
        }
        KeysCommand::Verify(args) => verify(client, args, out).await,
        KeysCommand::Update(args) => update(client, args, out).await,
        KeysCommand::Roll { id, grace } => {
            let issued = client.roll_key(key_id(&id)?, grace).await.map_err(rolled("roll"))?;
            out.issued(&issued, "rolled: the new")
        }
        KeysCommand::Renew(args) => renew(client, args, out).await,
        KeysCommand::AddCredits { id, amount } => {
            let id = key_id(&id)?;
            if amount == 0 {
                return Err(Failure::invalid("invalid AMOUNT: add at least 1 credit"));
            }
            let key = client.add_credits(id, amount).await.map_err(|e| match e {
                Error::InvalidInput { field: "credits", .. } if client_has_no_balance(&e) => {
                    Failure::invalid(
                        "the key has no credit balance (unlimited use): set one with \
                         `keys update ID --credits N`",
                    )
                }
                other => rolled("top up")(other),
            })?;
            out.key(&key)
        }
        KeysCommand::Events { id } => out.events(&client.list_key_events(key_id(&id)?).await?),
        KeysCommand::Rehash(args) => rehash(client, args, out).await,
    }
}

/// The named limits of `--limit` flags.
pub fn named_limits(limits: Vec<(String, apikeys_db::RateLimit)>) -> Result<RateLimits, Failure> {
    let mut all = RateLimits::new();
    for (name, limit) in limits {
        if all.get(&name).is_some() {
            return Err(Failure::invalid(format!("--limit {name:?} is given twice")));
        }
        all = all.with(name, limit)?;
    }
    Ok(all)
}

/// Whether `e` is `add_credits`' refusal of a key with no balance.
fn client_has_no_balance(e: &Error) -> bool {
    matches!(e, Error::InvalidInput { reason, .. } if reason.contains("no credit balance"))
}

/// For a call refused because the key was rolled (the library's `AlreadyExists`, naming the
/// key it was rolled to): says so, and which key to `verb` instead.
fn rolled(verb: &'static str) -> impl Fn(apikeys_db::Error) -> Failure {
    move |e| match e {
        apikeys_db::Error::AlreadyExists { existing } => Failure::invalid(format!(
            "this key was already rolled, to key {}: {verb} that one",
            existing.as_uuid()
        )),
        other => Failure::from(other),
    }
}

/// A key id from the command line. The text is not repeated in the error: someone may have
/// pasted a key instead of its id.
fn key_id(text: &str) -> Result<KeyId, Failure> {
    refuse_key(text, "a key id")?;
    text.trim()
        .parse()
        .map_err(|_| Failure::invalid("that is not a key id (a UUID, as `keys list` shows)"))
}

/// Custom metadata from `key=value` (a string) and `key:=JSON` pairs.
fn metadata(pairs: &[String]) -> Result<Value, Failure> {
    let mut map = Map::new();
    for pair in pairs {
        let (name, value) = pair.split_once('=').ok_or_else(|| {
            Failure::usage(format!("--meta {pair:?}: expected key=value or key:=JSON"))
        })?;
        let (name, value) = match name.strip_suffix(':') {
            Some(name) => {
                let value = serde_json::from_str(value).map_err(|e| {
                    Failure::usage(format!("--meta {name}:= is not valid JSON: {e}"))
                })?;
                (name, value)
            }
            None => (name, Value::String(value.to_owned())),
        };
        if name.is_empty() {
            return Err(Failure::usage(format!("--meta {pair:?}: the key is empty")));
        }
        if map.insert(name.to_owned(), value).is_some() {
            return Err(Failure::usage(format!("--meta {name:?} is given twice")));
        }
    }
    Ok(Value::Object(map))
}

fn credits(balance: u64, refill: Option<Refill>) -> Credits {
    let credits = Credits::new(balance);
    match refill {
        Some(r) => credits.with_refill(r),
        None => credits,
    }
}

/// `keys create`: the flags, names resolved to ids, fill the shared form of a new key
/// ([`NewKeyInput`], the management API's body too), which turns them into a `NewKey`.
async fn create(client: &ApiKeyClient, a: CreateArgs, out: &Out) -> Result<(), Failure> {
    let org = records::org(client, &a.org).await?;
    let mut input = NewKeyInput::new(a.name);
    input.scopes = a.scopes;
    if let Some(name) = &a.project {
        input.project_id = Some(records::project(client, &org, name).await?.id);
    }
    if let Some(name) = &a.product {
        input.product_id = Some(records::product(client, &org, name).await?.id);
    }
    input.rate_limit = a.rate_limit;
    if !a.limits.is_empty() {
        input.rate_limits = Some(named_limits(a.limits)?);
    }
    // The command line's default is never; a lifetime counts whole seconds, rounded up.
    match (a.expires_in, a.expires_at) {
        (Some(d), _) => {
            input.expires_in_seconds = Some(d.as_secs() + u64::from(d.subsec_nanos() > 0))
        }
        (None, Some(t)) => input.expires_at = Some(t),
        (None, None) => input.never_expires = true,
    }
    if !a.meta.is_empty() {
        input.custom = Some(metadata(&a.meta)?);
    }
    input.owner_id = a.owner;
    input.credits = a.credits.map(|balance| credits(balance, a.refill));
    if !a.allow_ips.is_empty() {
        input.allowed_ips = Some(a.allow_ips);
    }
    let issued = client.create_key(org.id, input.into_new_key()?).await?;
    out.issued(&issued, "created")
}

async fn list(client: &ApiKeyClient, a: ListArgs, out: &Out) -> Result<(), Failure> {
    let status = StatusFilter::from(a.status);
    let mut page = Page::first(a.limit)?;
    if let Some(after) = &a.after {
        page = page.after(key_id(after)?);
    }
    let org = match &a.org {
        Some(name) => Some(records::org(client, name).await?),
        None => None,
    };
    let project = match (&org, &a.project) {
        (Some(org), Some(name)) => Some(records::project(client, org, name).await?),
        _ => None,
    };
    let mut keys: Vec<ApiKey> = Vec::new();
    loop {
        let KeyPage { items, next } = match (&a.owner, a.expiring_within, &project, &org) {
            (Some(owner), _, _, Some(o)) => {
                client.list_owner_keys(o.id, owner, status, page).await?
            }
            (Some(_), _, _, None) => return Err(Failure::usage("--owner needs --org")),
            (None, Some(within), ..) => client.list_expiring_keys(within, page).await?,
            (None, None, Some(p), _) => client.list_project_keys(p.id, status, page).await?,
            (None, None, None, Some(o)) => client.list_org_keys(o.id, status, page).await?,
            (None, None, None, None) => {
                return Err(Failure::usage("give --org (with --owner) or --expiring-within"));
            }
        };
        keys.extend(items);
        match next {
            Some(cursor) if a.all => page = page.after(cursor),
            next => return out.keys(&keys, next.map(|c| c.to_string())),
        }
    }
}

/// The key on standard input, trimmed of surrounding whitespace.
fn read_key() -> Result<String, Failure> {
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_STDIN)
        .read_to_string(&mut text)
        .map_err(|e| Failure::usage(format!("cannot read the key from standard input: {e}")))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(Failure::usage(
            "no key on standard input: pipe it in, for instance `printf %s \"$KEY\" | apikeys keys verify`",
        ));
    }
    Ok(key.to_owned())
}

async fn verify(client: &ApiKeyClient, a: VerifyArgs, out: &Out) -> Result<(), Failure> {
    let product = match (&a.org, &a.product) {
        (Some(org), Some(name)) => {
            let org = records::org(client, org).await?;
            Some(records::product(client, &org, name).await?)
        }
        _ => None,
    };
    let key = read_key()?;
    let checked = if product.is_none() && a.scopes.is_empty() {
        client.verify_key_from(&key, a.ip, &VerifyOptions::new().track_usage(false)).await
    } else {
        // Only the requirements: no use counted, no rate-limit unit, no credit spent.
        let mut options = ValidateOptions::new()
            .track_usage(false)
            .check_rate_limit(false)
            .credit_cost(0)
            .require_scopes(a.scopes)?;
        if let Some(p) = &product {
            options = options.for_product(p.id);
        }
        client.validate_key_from(&key, a.ip, &options).await
    };
    let other_format = other_format(&key, client.key_format());
    drop(key);
    let found = checked.map_err(|e| match (e, other_format) {
        (Error::InvalidKey, Some(theirs)) => Failure::invalid(format!(
            "invalid key here: it is a well-formed `{theirs}` key, and this command checks \
             `{ours}` keys; set APIKEYS_KEY_PREFIX and APIKEYS_ENVIRONMENT (or --key-prefix and \
             --environment) to the service's",
            ours = format_name(client.key_format()),
        )),
        (Error::InvalidKey, None) => Failure::invalid(
            "invalid key: malformed, unknown, or under a signing secret this command was not given",
        ),
        // Named as it was typed, not by its id.
        (Error::ProductNotAllowed { .. }, _) => Failure::invalid(format!(
            "api key not valid for product {:?} of organization {:?}",
            a.product.as_deref().unwrap_or_default(),
            a.org.as_deref().unwrap_or_default(),
        )),
        (e, _) => Failure::from(e),
    })?;
    if out.json {
        return out.json_value(&json!({ "valid": true, "key": key_json(&found) }));
    }
    print_line(&format!("valid: key {} ({}, {:?})", found.id, found.hint, found.name))
}

/// The format (`sk_live_…`) of `key` when it is a well-formed key (checksum included) of a
/// format other than `ours`: its prefix and environment, which every key shows in its hint,
/// never its secret part.
fn other_format(key: &str, ours: &KeyFormat) -> Option<String> {
    let mut segments = key.splitn(3, '_');
    let (prefix, second) = (segments.next()?, segments.next()?);
    let candidates = [KeyFormat::new(prefix, Some(second)), KeyFormat::new(prefix, None)];
    candidates.into_iter().flatten().find_map(|theirs| {
        let differs =
            theirs.prefix() != ours.prefix() || theirs.environment() != ours.environment();
        (differs && theirs.parse(key).is_ok()).then(|| format_name(&theirs))
    })
}

/// A key format as its keys start: `sk_live_…`.
fn format_name(format: &KeyFormat) -> String {
    match format.environment() {
        Some(env) => format!("{}_{env}_…", format.prefix()),
        None => format!("{}_…", format.prefix()),
    }
}

async fn update(client: &ApiKeyClient, a: UpdateArgs, out: &Out) -> Result<(), Failure> {
    let id = key_id(&a.id)?;
    let mut update = KeyUpdate::new();
    let mut any = false;
    if let Some(name) = a.name {
        update = update.with_name(name);
        any = true;
    }
    if !a.scopes.is_empty() || a.clear_scopes {
        update = update.with_scopes(a.scopes);
        any = true;
    }
    if a.rate_limit.is_some() || a.no_rate_limit {
        update = update.with_rate_limit(a.rate_limit);
        any = true;
    }
    if !a.limits.is_empty() || a.no_limits {
        update = update.with_rate_limits(named_limits(a.limits)?);
        any = true;
    }
    if !a.meta.is_empty() || a.clear_meta {
        update = update.with_custom(metadata(&a.meta)?);
        any = true;
    }
    if a.owner.is_some() || a.no_owner {
        update = update.with_owner(a.owner);
        any = true;
    }
    if a.credits.is_some() || a.no_credits {
        update = update.with_credits(a.credits.map(|b| credits(b, a.refill)));
        any = true;
    }
    if !a.allow_ips.is_empty() || a.any_ip {
        let allowed = (!a.any_ip).then(|| IpAllowlist::parse(&a.allow_ips)).transpose()?;
        update = update.with_allowed_ips(allowed);
        any = true;
    }
    if !any {
        return Err(Failure::usage("nothing to change: see `apikeys keys update --help`"));
    }
    out.key(&client.update_key(id, update).await?)
}

/// `keys disable` (`disable`) and `keys enable`: the key, and on standard error whether it
/// changed (a second disable or enable is not silent).
async fn switch(client: &ApiKeyClient, id: &str, disable: bool, out: &Out) -> Result<(), Failure> {
    let id = key_id(id)?;
    let before = client.get_key(id).await?.disabled_at;
    let key = if disable { client.disable_key(id).await? } else { client.enable_key(id).await? };
    match (disable, before) {
        (true, Some(since)) => {
            note(&format!("already disabled since {}", crate::output::when(Some(since))))
        }
        (false, None) => note("already enabled"),
        _ => {}
    }
    out.key(&key)
}

async fn renew(client: &ApiKeyClient, a: RenewArgs, out: &Out) -> Result<(), Failure> {
    let id = key_id(&a.id)?;
    let key = match (a.expires_at, a.expires_in, a.extend_by) {
        (Some(at), ..) => client.renew_key(id, at).await.map_err(rolled("renew"))?,
        (None, Some(d), _) => {
            let at = chrono::TimeDelta::from_std(d)
                .ok()
                .and_then(|d| Utc::now().checked_add_signed(d))
                .ok_or_else(|| Failure::invalid("--expires-in is too far in the future"))?;
            client.renew_key(id, at).await.map_err(rolled("renew"))?
        }
        (None, None, Some(by)) => client.extend_key(id, by).await.map_err(rolled("renew"))?,
        (None, None, None) => {
            return Err(Failure::usage("give --expires-at, --expires-in or --extend-by"));
        }
    };
    out.key(&key)
}

async fn rehash(client: &ApiKeyClient, a: RehashArgs, out: &Out) -> Result<(), Failure> {
    let per_version = client.keys_per_secret_version().await?;
    // Revoked and expired keys verify nowhere anyway.
    let status = StatusFilter::Active;
    let total = client.count_unrotated_keys(status).await?;
    let versions: Vec<String> = per_version.iter().map(|(v, n)| format!("v{v}: {n}")).collect();
    note(&format!(
        "keys per signing-secret version: {}; active keys not under the current secret: {total}",
        if versions.is_empty() { "none".to_owned() } else { versions.join(", ") }
    ));
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} keys {msg}")
            .map_err(|e| Failure::system(e.to_string()))?,
    );
    let mut page = Page::first(a.batch)?;
    let mut seen: Vec<ApiKey> = Vec::new();
    let mut revoked: Vec<KeyId> = Vec::new();
    loop {
        let batch = client.list_unrotated_keys(status, page).await?;
        for key in batch.items {
            if a.revoke {
                match client.revoke_key(key.id).await {
                    // Revoked or deleted since it was listed: nothing left to do for it.
                    Ok(_) | Err(Error::Revoked { .. } | Error::NotFound { .. }) => {
                        revoked.push(key.id)
                    }
                    Err(e) => {
                        bar.abandon();
                        return Err(Failure::from(e));
                    }
                }
            }
            bar.inc(1);
            seen.push(key);
        }
        match batch.next {
            Some(cursor) => page = page.after(cursor),
            None => break,
        }
    }
    bar.finish_and_clear();
    if a.revoke {
        if out.json {
            return out.json_value(&json!({ "revoked": revoked }));
        }
        note(&format!("revoked {} key(s) not under the current secret", revoked.len()));
        for id in &revoked {
            print_line(&id.to_string())?;
        }
        return Ok(());
    }
    out.keys(&seen, None)?;
    if !seen.is_empty() && !out.json {
        note(
            "these keys move to the current secret on their next tracked success; the others \
             stop verifying once the previous secret is removed (`--revoke` revokes them)",
        );
    }
    Ok(())
}
