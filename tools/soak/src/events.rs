//! The record of a run: one JSON object per line, written by every process of the soak.
//!
//! Times are microseconds since the Unix epoch by the host's clock, which every process of
//! the soak reads alike (the replicas' skew is only in the clock their client is given).

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, by the host's clock.
#[must_use]
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Admitted.
    Ok,
    /// Refused by the rate limit.
    Quota,
    /// Refused for credits (after counting against the rate limit).
    UsageExhausted,
    /// Refused: revoked.
    Revoked,
    /// Refused: expired.
    Expired,
    /// Refused: no such key.
    InvalidKey,
    /// Refused: a required scope is missing.
    Scope,
    /// The database could not be reached.
    Unavailable,
    /// A database failure (a 500).
    Storage,
    /// A conflict the client's retries did not get past (a deadlock storm): retryable, a 503.
    Conflict,
    /// Anything else: never expected.
    Other,
}

impl Outcome {
    /// The outcome of a `validate_key` call.
    #[must_use]
    pub fn of<T>(r: &apikeys_db::Result<T>) -> Outcome {
        use apikeys_db::Error as E;
        match r {
            Ok(_) => Outcome::Ok,
            Err(E::Quota { .. }) => Outcome::Quota,
            Err(E::UsageExhausted { .. }) => Outcome::UsageExhausted,
            Err(E::Revoked { .. }) => Outcome::Revoked,
            Err(E::Expired { .. }) => Outcome::Expired,
            Err(E::InvalidKey) => Outcome::InvalidKey,
            Err(E::InsufficientScope { .. }) => Outcome::Scope,
            Err(E::Unavailable { .. }) => Outcome::Unavailable,
            Err(E::Storage { .. }) => Outcome::Storage,
            Err(E::Conflict { .. }) => Outcome::Conflict,
            Err(_) => Outcome::Other,
        }
    }

    /// Counted against the key's rate limit: admitted. A check refused for its credits gives
    /// the units its limit counted back (`validate_key` is all or nothing), so it is not.
    #[must_use]
    pub fn counted(self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

/// A change the admin process makes to a key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// `revoke_key`.
    Revoke,
    /// `delete_key`.
    Delete,
    /// `roll_key` with no grace: the old key is revoked.
    RollRevoke,
    /// `roll_key` with a grace period: the old key expires `grace_ms` after the admin's
    /// clock read the roll's `now`.
    RollGrace {
        /// The grace period.
        grace_ms: i64,
    },
    /// `update_key` of the scopes: with `read` (and `write`), or `write` alone.
    Scopes {
        /// Whether the key has the scope the driver requires.
        read: bool,
    },
    /// `update_key` of the rate limit's request count (its window stays).
    Limit {
        /// The new limit.
        n: u32,
    },
}

impl Change {
    /// A change after which the admin leaves the key alone.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Change::Revoke | Change::Delete | Change::RollRevoke | Change::RollGrace { .. }
        )
    }
}

/// One line of the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Event {
    /// A replica checked key `k`, from `t0` to `t1`.
    Check {
        /// The replica.
        r: u32,
        /// The key's index.
        k: u32,
        /// Started.
        t0: i64,
        /// Answered.
        t1: i64,
        /// How.
        o: Outcome,
        /// For `Storage`, `Conflict` and `Other`: the error and its source, to tell what went
        /// wrong.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A replica's client is built and its cache warmed; traffic starts.
    Ready {
        /// The replica.
        r: u32,
        /// When.
        t: i64,
        /// The signing secret version it issues under.
        secret_version: u32,
        /// The keys `warm_cache` loaded.
        warmed: usize,
    },
    /// A replica stopped: `shutdown` gave leased units back and wrote batched usage.
    Stopped {
        /// The replica.
        r: u32,
        /// When.
        t: i64,
        /// The error of the last `shutdown` attempt, if none succeeded.
        error: Option<String>,
    },
    /// The admin changed key `k`: first attempt started at `t0`, the call that settled it
    /// returned at `t1`. `done` is false when the change was refused (nothing changed).
    Admin {
        /// The key's index.
        k: u32,
        /// First attempt started.
        t0: i64,
        /// Settled.
        t1: i64,
        /// What.
        #[serde(flatten)]
        change: Change,
        /// Whether the change is in the database.
        done: bool,
        /// Attempts (more than one after `Unavailable` or a storage error).
        attempts: u32,
        /// The refusal or the last error, without key material.
        error: Option<String>,
    },
    /// An error the admin's call got that it then retried.
    AdminError {
        /// When.
        t: i64,
        /// The error (`Unavailable` or `Storage`), as displayed.
        error: String,
    },
    /// A phase of the parent's fault schedule, from `t0` to `t1`.
    Phase {
        /// `chaos` (the proxy's per-connection faults), `pass` (no fault; opened by cutting
        /// every connection), or a global fault: `restart` (the database server stopped and
        /// started), `down` (the proxy refuses every connection), `black_hole` (a partition:
        /// open connections go silent, new ones too), `lock` (SQLite: a transaction holds
        /// the write lock), `rotate` (a rolling restart onto a new signing secret).
        kind: String,
        /// Started.
        t0: i64,
        /// Ended.
        t1: i64,
    },
}
