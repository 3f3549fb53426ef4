//! Conversions between database rows and core types.

use apikeys_core::{
    ApiKey, Credits, Error, IpAllowlist, KeyId, OrgId, Organization, Product, ProductId, Project,
    ProjectId, RateLimit, RateLimits, Refill, RefillInterval, Result, Scopes, Window,
};
use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sea_orm::JsonValue;

use crate::entity::{api_key, organization, product, project};
use crate::error::corrupt;

/// Times are stored with microsecond precision on every backend; truncating before writing
/// makes what a call returns equal to what a later read returns.
pub(crate) fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Times are stored as UTC without a zone on every backend (PostgreSQL `timestamp`, MySQL
/// `DATETIME(6)`, SQLite text). MySQL would turn a zoned value into a `TIMESTAMP` parameter,
/// which cannot hold instants after 2038.
pub(crate) fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

impl From<organization::Model> for Organization {
    fn from(m: organization::Model) -> Self {
        Organization {
            id: OrgId::from_uuid(m.id),
            name: m.name,
            created_at: m.created_at.and_utc(),
        }
    }
}

impl From<project::Model> for Project {
    fn from(m: project::Model) -> Self {
        Project {
            id: ProjectId::from_uuid(m.id),
            org_id: OrgId::from_uuid(m.org_id),
            name: m.name,
            created_at: m.created_at.and_utc(),
        }
    }
}

impl From<product::Model> for Product {
    fn from(m: product::Model) -> Self {
        Product {
            id: ProductId::from_uuid(m.id),
            org_id: OrgId::from_uuid(m.org_id),
            name: m.name,
            created_at: m.created_at.and_utc(),
        }
    }
}

/// A signing-secret version as its column stores it. `build()` refuses versions that do not
/// fit, so this only fails for a version the client was never configured with.
pub(crate) fn version_column(version: u32) -> Result<i32> {
    i32::try_from(version)
        .map_err(|_| Error::configuration("signing secret versions must be at most 2147483647"))
}

pub(crate) fn scopes_to_json(scopes: &Scopes) -> JsonValue {
    JsonValue::Array(scopes.iter().map(|s| JsonValue::String(s.as_str().to_owned())).collect())
}

/// The `allowed_ips` column of an allowlist.
pub(crate) fn allowlist_to_json(allowed: Option<&IpAllowlist>) -> Option<JsonValue> {
    allowed.map(|a| JsonValue::Array(a.networks().map(JsonValue::String).collect()))
}

/// The `rate_limits` column of `limits`: `NULL` for none.
pub(crate) fn limits_to_json(limits: &RateLimits) -> Option<JsonValue> {
    (!limits.is_empty()).then(|| serde_json::to_value(limits).unwrap_or(JsonValue::Null))
}

pub(crate) fn rate_limit_columns(limit: Option<RateLimit>) -> (Option<i64>, Option<String>) {
    match limit {
        Some(l) => (Some(i64::from(l.requests.get())), Some(l.window.as_str().to_owned())),
        None => (None, None),
    }
}

/// The credit columns of `credits`: remaining, refill amount, refill interval.
pub(crate) fn credit_columns(
    credits: Option<Credits>,
) -> (Option<i64>, Option<i64>, Option<String>) {
    let count = |n: u64| i64::try_from(n).ok();
    match credits {
        None => (None, None, None),
        Some(c) => (
            count(c.remaining),
            c.refill.and_then(|r| count(r.amount)),
            c.refill.map(|r| r.interval.as_str().to_owned()),
        ),
    }
}

/// The credits an `api_keys` row holds.
fn credits_from_columns(m: &api_key::Model) -> Result<Option<Credits>> {
    credits_of("api_keys", m.remaining, m.refill_amount, m.refill_interval.as_deref())
}

/// The named limits in the `rate_limits` column of a row of `table` (keys' or owners').
pub(crate) fn limits_of(table: &'static str, column: Option<JsonValue>) -> Result<RateLimits> {
    match column {
        None => Ok(RateLimits::new()),
        // A JSON `null` or anything but a valid object is no value this library writes.
        Some(v @ JsonValue::Object(_)) => {
            serde_json::from_value(v).map_err(|_| corrupt(table, "rate_limits"))
        }
        Some(_) => Err(corrupt(table, "rate_limits")),
    }
}

/// The credits the credit columns of a row of `table` (keys' or owners') hold.
pub(crate) fn credits_of(
    table: &'static str,
    remaining: Option<i64>,
    refill_amount: Option<i64>,
    refill_interval: Option<&str>,
) -> Result<Option<Credits>> {
    let count = |n: i64, field| u64::try_from(n).map_err(|_| corrupt(table, field));
    let refill = match (refill_amount, refill_interval) {
        (Some(amount), Some(interval)) => Some(Refill {
            amount: count(amount, "refill_amount")?,
            interval: RefillInterval::from_name(interval)
                .ok_or_else(|| corrupt(table, "refill_interval"))?,
        }),
        (None, None) => None,
        _ => return Err(corrupt(table, "refill_amount")),
    };
    match remaining {
        Some(n) => Ok(Some(Credits { remaining: count(n, "remaining")?, refill })),
        None if refill.is_none() => Ok(None),
        None => Err(corrupt(table, "remaining")),
    }
}

/// Reads an `api_keys` row back into the core view.
pub(crate) fn api_key_from_model(m: api_key::Model) -> Result<ApiKey> {
    const T: &str = "api_keys";
    let credits = credits_from_columns(&m)?;
    let scopes = match m.scopes {
        JsonValue::Array(items) => Scopes::parse(items.into_iter().map(|v| match v {
            JsonValue::String(s) => s,
            _ => String::new(), // rejected by Scopes::parse
        }))
        .map_err(|_| corrupt(T, "scopes"))?,
        _ => return Err(corrupt(T, "scopes")),
    };
    let rate_limit = match (m.rate_limit_requests, m.rate_limit_window) {
        (Some(n), Some(w)) => {
            let window: Window = w.parse().map_err(|_| corrupt(T, "rate_limit_window"))?;
            Some(RateLimit::try_new(n, window).map_err(|_| corrupt(T, "rate_limit_requests"))?)
        }
        (None, None) => None,
        _ => return Err(corrupt(T, "rate_limit_requests")),
    };
    let rate_limits = limits_of(T, m.rate_limits)?;
    let JsonValue::Object(custom) = m.custom else {
        return Err(corrupt(T, "custom"));
    };
    let allowed_ips = match m.allowed_ips {
        // SQL NULL only: a JSON `null` is no value this library writes, and reading it as
        // "any address" would fail open.
        None => None,
        Some(JsonValue::Array(items)) => {
            let entries = items.into_iter().map(|v| match v {
                JsonValue::String(s) => s,
                _ => String::new(), // rejected by IpAllowlist::parse
            });
            Some(IpAllowlist::parse(entries).map_err(|_| corrupt(T, "allowed_ips"))?)
        }
        Some(_) => return Err(corrupt(T, "allowed_ips")),
    };
    Ok(ApiKey {
        id: KeyId::from_uuid(m.id),
        org_id: OrgId::from_uuid(m.org_id),
        project_id: m.project_id.map(ProjectId::from_uuid),
        product_id: m.product_id.map(ProductId::from_uuid),
        name: m.name,
        hint: m.hint,
        scopes,
        rate_limit,
        rate_limits,
        custom,
        created_at: m.created_at.and_utc(),
        updated_at: m.updated_at.and_utc(),
        expires_at: m.expires_at.map(|t| t.and_utc()),
        revoked_at: m.revoked_at.map(|t| t.and_utc()),
        last_used_at: m.last_used_at.map(|t| t.and_utc()),
        use_count: u64::try_from(m.use_count).unwrap_or(0),
        owner_id: m.owner_id,
        credits,
        rolled_from: m.rolled_from.map(KeyId::from_uuid),
        rolled_to: m.rolled_to.map(KeyId::from_uuid),
        disabled_at: m.disabled_at.map(|t| t.and_utc()),
        allowed_ips,
    })
}
