//! Everything printed: tables for people, one JSON document for scripts. Data goes to
//! standard output; notes for the person at the terminal go to standard error.

use std::io::Write;

use apikeys_db::{ApiKey, ApiKeysMigration, IssuedKey, KeyEvent};
use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use serde_json::{Value, json};

use crate::failure::Failure;

/// Where and how results are printed.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// JSON instead of tables.
    pub json: bool,
}

/// A table without borders, as `kubectl` or `docker` print them.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| h.to_uppercase()));
    t
}

/// An instant as RFC 3339 to the second, or `-`.
pub fn when(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// Writes `text` and a newline to standard output.
pub fn print_line(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").and_then(|()| stdout.flush()).map_err(broken_pipe)
}

/// Writes a note for the person at the terminal to standard error.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn broken_pipe(e: std::io::Error) -> Failure {
    Failure::system(format!("cannot write to standard output: {e}"))
}

/// A key as JSON: its record and its status now.
pub fn key_json(key: &ApiKey) -> Value {
    let mut value = serde_json::to_value(key).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("status".to_owned(), json!(key.status(Utc::now()).to_string()));
    }
    value
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Named limits on one line (`daily: 10000 per day, …`), or `-`.
pub fn limits_text(limits: &apikeys_db::RateLimits) -> String {
    if limits.is_empty() {
        return "-".to_owned();
    }
    let named = limits.iter().map(|(name, l)| format!("{name}: {l}"));
    named.collect::<Vec<_>>().join(", ")
}

/// A credit balance and its refill rule, or `-`.
pub fn credits_text(credits: Option<apikeys_db::Credits>) -> String {
    credits.map_or_else(
        || "-".to_owned(),
        |c| match c.refill {
            Some(r) => format!("{} (refill {} per {})", c.remaining, r.amount, r.interval),
            None => c.remaining.to_string(),
        },
    )
}

impl Out {
    /// The output settings.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Prints `value` as pretty JSON.
    pub fn json_value<T: Serialize>(&self, value: &T) -> Result<(), Failure> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| Failure::system(format!("cannot encode JSON: {e}")))?;
        print_line(&text)
    }

    /// Prints a table.
    pub fn table(&self, table: &Table) -> Result<(), Failure> {
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        print_line(&lines.join("\n"))
    }

    /// One key, field by field.
    pub fn key(&self, key: &ApiKey) -> Result<(), Failure> {
        if self.json {
            return self.json_value(&key_json(key));
        }
        let mut t = table(&["field", "value"]);
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        let rows: Vec<(&str, String)> = vec![
            ("id", key.id.to_string()),
            ("name", key.name.clone()),
            ("hint", key.hint.clone()),
            ("status", key.status(Utc::now()).to_string()),
            ("organization", key.org_id.to_string()),
            ("project", opt(key.project_id)),
            ("product", opt(key.product_id)),
            ("scopes", if scopes.is_empty() { "-".to_owned() } else { scopes.join(" ") }),
            ("rate limit", opt(key.rate_limit)),
            ("named limits", limits_text(&key.rate_limits)),
            ("credits", credits_text(key.credits)),
            ("owner", key.owner_id.clone().unwrap_or_else(|| "-".to_owned())),
            (
                "metadata",
                if key.custom.is_empty() {
                    "-".to_owned()
                } else {
                    Value::Object(key.custom.clone()).to_string()
                },
            ),
            ("created", when(Some(key.created_at))),
            ("updated", when(Some(key.updated_at))),
            ("expires", when(key.expires_at)),
            ("revoked", when(key.revoked_at)),
            ("disabled", when(key.disabled_at)),
            (
                "allowed ips",
                key.allowed_ips.as_ref().map_or_else(|| "any".to_owned(), ToString::to_string),
            ),
            ("last used", when(key.last_used_at)),
            ("uses", key.use_count.to_string()),
            ("rolled from", opt(key.rolled_from)),
            ("rolled to", opt(key.rolled_to)),
        ];
        for (field, value) in rows {
            t.add_row(vec![field.to_owned(), value]);
        }
        self.table(&t)
    }

    /// Keys, one row each; `next` is the cursor of the next page, if any.
    pub fn keys(&self, keys: &[ApiKey], next: Option<String>) -> Result<(), Failure> {
        if self.json {
            let items: Vec<Value> = keys.iter().map(key_json).collect();
            return self.json_value(&json!({ "items": items, "next": next }));
        }
        let now = Utc::now();
        let mut t =
            table(&["id", "name", "hint", "status", "scopes", "expires", "last used", "uses"]);
        for k in keys {
            let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
            t.add_row(vec![
                k.id.to_string(),
                k.name.clone(),
                k.hint.clone(),
                k.status(now).to_string(),
                if scopes.is_empty() { "-".to_owned() } else { scopes.join(",") },
                when(k.expires_at),
                when(k.last_used_at),
                k.use_count.to_string(),
            ]);
        }
        self.table(&t)?;
        if let Some(next) = next {
            note(&format!("more keys: --after {next}"));
        }
        Ok(())
    }

    /// A newly issued key: the plaintext on standard output (alone, so that
    /// `KEY=$(apikeys keys create …)` captures it), the rest on standard error.
    pub fn issued(&self, issued: &IssuedKey, what: &str) -> Result<(), Failure> {
        if self.json {
            let mut value = key_json(&issued.record);
            if let Value::Object(map) = &mut value {
                map.insert("key".to_owned(), json!(issued.key.expose_secret()));
            }
            return self.json_value(&value);
        }
        print_line(issued.key.expose_secret())?;
        note(&format!(
            "{what} key {} ({}). Store it now: it is shown only once.",
            issued.record.id, issued.record.hint
        ));
        Ok(())
    }

    /// A key's audit trail.
    pub fn events(&self, events: &[KeyEvent]) -> Result<(), Failure> {
        if self.json {
            return self.json_value(&events);
        }
        let mut t = table(&["at", "action", "actor", "related key"]);
        for e in events {
            t.add_row(vec![
                when(Some(e.at)),
                e.action.to_string(),
                opt(e.actor.as_ref()),
                opt(e.related_key_id),
            ]);
        }
        self.table(&t)
    }

    /// The migrations `migrate up` applied.
    pub fn migrations_applied(&self, applied: &[String]) -> Result<(), Failure> {
        if self.json {
            return self.json_value(&json!({ "applied": applied }));
        }
        if applied.is_empty() {
            return print_line("no changes: the schema is up to date");
        }
        for name in applied {
            print_line(&format!("applied {name}"))?;
        }
        Ok(())
    }

    /// `migrate status`.
    pub fn migration_status(&self, all: &[ApiKeysMigration]) -> Result<(), Failure> {
        if self.json {
            let items: Vec<Value> =
                all.iter().map(|m| json!({ "name": m.name, "applied": m.applied })).collect();
            return self.json_value(&items);
        }
        let mut t = table(&["migration", "status"]);
        for m in all {
            t.add_row(vec![
                m.name.clone(),
                (if m.applied { "applied" } else { "pending" }).to_owned(),
            ]);
        }
        self.table(&t)
    }
}
