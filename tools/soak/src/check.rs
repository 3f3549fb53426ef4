//! The invariants, checked from the record of a run after it ended.
//!
//! Every figure comes from the record ([`Event`]s) and the database's state at the end
//! ([`KeyEnd`]); nothing here talks to a database, so each invariant is tested below on
//! records made by hand, with and without the breach it looks for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::events::{Change, Event, Outcome};

/// The margin kept from a rate-limit window's ends: a check counts in a window only if it
/// ran entirely inside it, this far from both ends (the database's clock is the host's).
pub const WINDOW_MARGIN_US: i64 = 50_000;
/// Allowed between the host's wall clock, which the record is written in, and the monotonic
/// clocks the cache's bound is kept by, and for the write of a record line.
pub const SLACK_US: i64 = 20_000;

/// What a run was set up with: written by the parent before the replicas start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// `sqlite`, `postgres` or `mysql`.
    pub backend: String,
    /// The seed of every random choice.
    pub seed: u64,
    /// The keys, by index.
    pub keys: Vec<KeySetup>,
    /// Each replica's clock offset from the host's (milliseconds).
    pub offsets_ms: Vec<i64>,
    /// The admin's clock offset (milliseconds).
    pub admin_offset_ms: i64,
    /// The cache's `max_staleness` (milliseconds).
    pub staleness_ms: i64,
    /// The clients' `reconnect_interval` (milliseconds).
    pub reconnect_ms: i64,
    /// How long after a fault ends every replica must answer again (milliseconds).
    pub recovery_bound_ms: i64,
    /// The longest any check may take (milliseconds): past every deadline of the client.
    pub hang_bound_ms: i64,
}

/// One key as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySetup {
    /// Its id.
    pub id: String,
    /// Its rate limit's request count.
    pub limit: u32,
    /// Its rate limit's window (seconds).
    pub window_s: i64,
    /// Its credits, if it has any (never refilled).
    pub credits: Option<u64>,
}

/// A key's state in the database at the end of the run (`None` for a deleted key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEnd {
    /// The key's own record's `use_count`.
    pub use_count: u64,
    /// The credits left on the newest record of its lineage (a roll moves the balance).
    pub remaining: Option<u64>,
}

/// One invariant's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// What it asserts.
    pub name: &'static str,
    /// The figure it was judged on.
    pub figure: String,
    /// Breaches found.
    pub breaches: u64,
    /// Up to ten breaches, described.
    pub examples: Vec<String>,
}

impl Verdict {
    fn new(name: &'static str) -> Self {
        Verdict { name, figure: String::new(), breaches: 0, examples: Vec::new() }
    }

    fn breach(&mut self, what: impl FnOnce() -> String) {
        self.breaches += 1;
        if self.examples.len() < 10 {
            self.examples.push(what());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Alive {
    Live,
    Revoked,
    Deleted,
    /// Rolled with a grace period by a call from `t0` to `t1`.
    Grace {
        t0: i64,
        t1: i64,
        grace_us: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    alive: Alive,
    read: bool,
    limit: u32,
}

/// A state of a key and when it may have been current: from the start of the call that
/// made it (`from`) to the return of the call that replaced it (`until`).
#[derive(Debug, Clone, Copy)]
struct Version {
    from: i64,
    until: i64,
    state: State,
}

/// A check as the invariants see it.
#[derive(Debug, Clone, Copy)]
struct Check {
    r: u32,
    k: u32,
    t0: i64,
    t1: i64,
    o: Outcome,
}

/// The verdicts on a run's record.
#[must_use]
pub fn check(setup: &Setup, events: &[Event], end: &[Option<KeyEnd>]) -> Vec<Verdict> {
    let checks: Vec<Check> = events
        .iter()
        .filter_map(|e| match *e {
            Event::Check { r, k, t0, t1, o, .. } => Some(Check { r, k, t0, t1, o }),
            _ => None,
        })
        .collect();
    let timelines = timelines(setup, events);
    let mut by_key: HashMap<u32, Vec<Check>> = HashMap::new();
    for c in &checks {
        by_key.entry(c.k).or_default().push(*c);
    }
    vec![
        rate_limits(setup, events, &timelines, &by_key),
        credits(setup, &by_key, end),
        staleness(setup, &timelines, &checks),
        storage(events, setup),
        recovery(setup, events, &checks),
        hangs(setup, &checks),
        usage(setup, &by_key, end),
    ]
}

fn timelines(setup: &Setup, events: &[Event]) -> Vec<Vec<Version>> {
    let mut out: Vec<Vec<Version>> = setup
        .keys
        .iter()
        .map(|k| {
            let state = State { alive: Alive::Live, read: true, limit: k.limit };
            vec![Version { from: i64::MIN, until: i64::MAX, state }]
        })
        .collect();
    let mut changes: Vec<(i64, i64, u32, Change)> = events
        .iter()
        .filter_map(|e| match *e {
            Event::Admin { k, t0, t1, change, done: true, .. } => Some((t0, t1, k, change)),
            _ => None,
        })
        .collect();
    changes.sort_by_key(|c| c.0);
    for (t0, t1, k, change) in changes {
        let Some(versions) = out.get_mut(k as usize) else { continue };
        let Some(last) = versions.last_mut() else { continue };
        last.until = t1;
        let mut state = last.state;
        match change {
            Change::Revoke | Change::RollRevoke => state.alive = Alive::Revoked,
            Change::Delete => state.alive = Alive::Deleted,
            Change::RollGrace { grace_ms } => {
                state.alive = Alive::Grace { t0, t1, grace_us: grace_ms * 1000 };
            }
            Change::Scopes { read } => state.read = read,
            Change::Limit { n } => state.limit = n,
        }
        versions.push(Version { from: t0, until: i64::MAX, state });
    }
    out
}

fn offset_us(setup: &Setup, r: u32) -> i64 {
    setup.offsets_ms.get(r as usize).copied().unwrap_or(0) * 1000
}

/// Whether `state` allows the check's outcome. A key rolled with grace is judged by the
/// replica's clock: it expires for replica r at real time `T + admin offset + grace - r's
/// offset`, where T is when the admin's roll read its clock (within its call).
fn allows(setup: &Setup, state: &State, c: &Check) -> bool {
    let (live, expired) = match state.alive {
        Alive::Live => (true, false),
        Alive::Revoked | Alive::Deleted => (false, false),
        Alive::Grace { t0, t1, grace_us } => {
            let shift = setup.admin_offset_ms * 1000 + grace_us - offset_us(setup, c.r);
            (c.t0 < t1 + shift + SLACK_US, c.t1 > t0 + shift - SLACK_US)
        }
    };
    match c.o {
        Outcome::Ok | Outcome::Quota | Outcome::UsageExhausted => live && state.read,
        Outcome::Scope => live && !state.read,
        Outcome::Revoked => state.alive == Alive::Revoked,
        Outcome::InvalidKey => state.alive == Alive::Deleted,
        Outcome::Expired => expired,
        Outcome::Unavailable | Outcome::Storage | Outcome::Conflict => true,
        Outcome::Other => false,
    }
}

/// No check that started later than `max_staleness` after a change returned was answered
/// with the state before it.
fn staleness(setup: &Setup, timelines: &[Vec<Version>], checks: &[Check]) -> Verdict {
    let mut v = Verdict::new(
        "no check started past max_staleness after a change answered with the old state",
    );
    let bound = setup.staleness_ms * 1000;
    let (mut judged, mut old_state, mut worst_lag) = (0u64, 0u64, 0i64);
    for c in checks {
        let Some(versions) = timelines.get(c.k as usize) else {
            v.breach(|| format!("a check of key {} that was never created", c.k));
            continue;
        };
        judged += 1;
        let earliest = c.t0 - bound - SLACK_US;
        let current = versions.iter().filter(|x| x.from <= c.t1 && x.until >= c.t0);
        if current.clone().any(|x| allows(setup, &x.state, c)) {
            continue;
        }
        // Not the state of any moment during the check: an older one, within the bound?
        let older = versions
            .iter()
            .filter(|x| x.until < c.t0 && x.until >= earliest)
            .filter(|x| allows(setup, &x.state, c))
            .map(|x| c.t0 - x.until)
            .min();
        match older {
            Some(lag) => {
                old_state += 1;
                worst_lag = worst_lag.max(lag);
            }
            None => v.breach(|| {
                let changes: Vec<String> = versions
                    .iter()
                    .skip(1)
                    .map(|x| format!("{:?} from {} (returned by {})", x.state, x.from, x.until))
                    .collect();
                format!(
                    "replica {} key {}: check {}..{} answered {:?}; key states: initial, {}",
                    c.r,
                    c.k,
                    c.t0,
                    c.t1,
                    c.o,
                    changes.join(", ")
                )
            }),
        }
    }
    v.figure = format!(
        "{judged} checks judged; {old_state} answered with a state a change had replaced, at most {:.1} ms after the change returned (bound {} ms)",
        worst_lag as f64 / 1000.0,
        setup.staleness_ms
    );
    v
}

/// Admitted ≤ limit per key and window.
fn rate_limits(
    setup: &Setup,
    events: &[Event],
    timelines: &[Vec<Version>],
    by_key: &HashMap<u32, Vec<Check>>,
) -> Verdict {
    let mut v = Verdict::new("admitted <= limit per key and window");
    let bound_us = setup.staleness_ms * 1000;
    let (mut windows, mut at_edges, mut worst) = (0u64, 0u64, 0.0f64);
    let mut counted_total = 0u64;
    for (&k, checks) in by_key {
        let Some(key) = setup.keys.get(k as usize) else { continue };
        let w = key.window_s * 1_000_000;
        let mut counts: BTreeMap<i64, u64> = BTreeMap::new();
        for c in checks.iter().filter(|c| c.o.counted()) {
            counted_total += 1;
            let first = (c.t0 - WINDOW_MARGIN_US).div_euclid(w);
            if (c.t1 + WINDOW_MARGIN_US).div_euclid(w) != first {
                at_edges += 1;
                continue;
            }
            *counts.entry(first).or_default() += 1;
        }
        // Rolls with grace: checks of the old key that a replica admitted before it learned
        // of the roll count in the old key's own window (documented on RateLimitMode).
        let rolls: Vec<(i64, i64)> = events
            .iter()
            .filter_map(|e| match *e {
                Event::Admin {
                    k: kk,
                    t0,
                    t1,
                    change: Change::RollGrace { .. },
                    done: true,
                    ..
                } if kk == k => Some((t0, t1 + bound_us + SLACK_US)),
                _ => None,
            })
            .collect();
        for (&window, &count) in &counts {
            windows += 1;
            let (ws, we) = (window * w, (window + 1) * w);
            // A replica may count with a limit it has not yet heard was changed, for up to
            // the cache's bound.
            let limit = timelines[k as usize]
                .iter()
                .filter(|x| x.from <= we && x.until.saturating_add(bound_us) >= ws)
                .map(|x| x.state.limit)
                .max()
                .unwrap_or(key.limit);
            // At most one more limit: the old key's own window.
            let allowance: u64 = rolls
                .iter()
                .filter(|(a, b)| *a < we && *b > ws)
                .map(|(a, b)| {
                    checks.iter().filter(|c| c.o.counted() && c.t0 >= *a && c.t0 <= *b).count()
                        as u64
                })
                .sum::<u64>()
                .min(u64::from(limit));
            worst = worst.max(count as f64 / f64::from(limit));
            if count > u64::from(limit) + allowance {
                v.breach(|| {
                    format!("key {k}: {count} admitted in window starting {ws} us, limit {limit}")
                });
            }
        }
    }
    v.figure = format!(
        "{windows} key-windows, {counted_total} counted checks ({at_edges} too near a window's edge to place); worst admitted/limit {worst:.3}"
    );
    v
}

/// Credits spent ≤ balance, and every admitted check of a key with credits was paid for.
fn credits(setup: &Setup, by_key: &HashMap<u32, Vec<Check>>, end: &[Option<KeyEnd>]) -> Verdict {
    let mut v = Verdict::new("credits spent <= balance");
    let (mut keys, mut worst, mut stranded) = (0u64, 0.0f64, 0u64);
    for (k, key) in setup.keys.iter().enumerate() {
        let Some(balance) = key.credits else { continue };
        keys += 1;
        let k = u32::try_from(k).unwrap_or(u32::MAX);
        let ok =
            by_key.get(&k).map_or(0, |c| c.iter().filter(|c| c.o == Outcome::Ok).count() as u64);
        worst = worst.max(ok as f64 / balance.max(1) as f64);
        if ok > balance {
            v.breach(|| format!("key {k}: {ok} admitted, balance {balance}"));
        }
        if let Some(Some(KeyEnd { remaining: Some(left), .. })) = end.get(k as usize) {
            let spent = balance.saturating_sub(*left);
            if ok > spent {
                v.breach(|| format!("key {k}: {ok} admitted but {spent} spent in the database"));
            }
            stranded += spent.saturating_sub(ok);
        }
    }
    v.figure = format!(
        "{keys} keys with credits; worst admitted/balance {worst:.3}; {stranded} credits spent in the database beyond the admitted checks"
    );
    v
}

/// No `Storage` error, and no `Conflict` the client's retries did not get past, outside the
/// injected faults.
fn storage(events: &[Event], setup: &Setup) -> Verdict {
    let mut v = Verdict::new("no Storage error (500) or Conflict outside injected faults");
    let phases = phases(events);
    let grace = setup.recovery_bound_ms * 1000;
    let (mut under_faults, mut total) = (0u64, 0u64);
    // Quiet: started past the recovery bound into a quiet phase, and answered within it.
    let mut judge = |t: i64, end: i64, what: String| {
        total += 1;
        let quiet =
            phases.iter().any(|(kind, t0, t1)| kind == "pass" && t > t0 + grace && end <= *t1);
        if quiet {
            v.breach(|| what);
        } else {
            under_faults += 1;
        }
    };
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        if let Event::Check {
            r,
            k,
            t0,
            t1,
            o: o @ (Outcome::Storage | Outcome::Conflict),
            detail,
        } = e
        {
            let detail = detail.clone().unwrap_or_default();
            *kinds.entry(detail.chars().take(120).collect()).or_default() += 1;
            judge(*t0, *t1, format!("replica {r} key {k}: {o:?} at {t0}: {detail}"));
        }
    }
    for e in events {
        if let Event::AdminError { t, error } = e
            && error.starts_with("storage")
        {
            judge(*t, *t, format!("admin: {error} at {t}"));
        }
    }
    v.figure =
        format!("{total} Storage or Conflict errors, {under_faults} of them under injected faults");
    for (detail, n) in &kinds {
        let _ = write!(v.figure, "; {n}× {detail}");
    }
    v
}

fn phases(events: &[Event]) -> Vec<(String, i64, i64)> {
    let mut p: Vec<(String, i64, i64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Phase { kind, t0, t1 } => Some((kind.clone(), *t0, *t1)),
            _ => None,
        })
        .collect();
    p.sort_by_key(|x| x.1);
    p
}

/// After each fault, every replica answers again within the recovery bound: no check that
/// started later than that into the quiet phase that follows, and was answered within it,
/// fails with `Unavailable` or `Storage`.
fn recovery(setup: &Setup, events: &[Event], checks: &[Check]) -> Verdict {
    let mut v = Verdict::new("after each fault the replicas answer again within one back-off");
    let bound = setup.recovery_bound_ms * 1000;
    let phases = phases(events);
    let mut worst: BTreeMap<String, i64> = BTreeMap::new();
    let mut faults = 0u64;
    for pair in phases.windows(2) {
        let ((kind, ..), (next, f, end)) = (&pair[0], &pair[1]);
        if next != "pass" || kind == "pass" {
            continue;
        }
        faults += 1;
        // Checks answered within the quiet phase (one that the next fault cut short is
        // that fault's).
        let failing = checks.iter().filter(|c| {
            c.t0 >= *f
                && c.t1 <= *end
                && matches!(c.o, Outcome::Unavailable | Outcome::Storage | Outcome::Conflict)
        });
        let recovered = failing.clone().map(|c| c.t1 - f).max().unwrap_or(0);
        let entry = worst.entry(kind.clone()).or_default();
        *entry = (*entry).max(recovered);
        for c in failing.filter(|c| c.t0 > f + bound) {
            v.breach(|| {
                format!(
                    "after {kind} ending {f}: replica {} failed a check started {:.0} ms later",
                    c.r,
                    (c.t0 - f) as f64 / 1000.0
                )
            });
        }
        // And each replica did answer (a replica whose checks all hang records nothing).
        for r in 0..u32::try_from(setup.offsets_ms.len()).unwrap_or(0) {
            let answered = checks.iter().any(|c| {
                c.r == r
                    && c.t0 > f + bound
                    && c.t1 <= *end
                    && !matches!(c.o, Outcome::Unavailable | Outcome::Storage | Outcome::Conflict)
            });
            if !answered {
                v.breach(|| format!("after {kind} ending {f}: replica {r} answered no check"));
            }
        }
    }
    let mut figure = format!(
        "{faults} faults; slowest recovery by fault (bound {} ms):",
        setup.recovery_bound_ms
    );
    for (kind, us) in &worst {
        let _ = write!(figure, " {kind} {:.0} ms", *us as f64 / 1000.0);
    }
    v.figure = figure;
    v
}

/// No check hangs: each is answered within the client's deadlines.
fn hangs(setup: &Setup, checks: &[Check]) -> Verdict {
    let mut v = Verdict::new("no check hung past the client's deadlines");
    let longest = checks.iter().map(|c| c.t1 - c.t0).max().unwrap_or(0);
    for c in checks.iter().filter(|c| c.t1 - c.t0 > setup.hang_bound_ms * 1000) {
        v.breach(|| format!("replica {} key {}: {} us, from {}", c.r, c.k, c.t1 - c.t0, c.t0));
    }
    v.figure = format!(
        "longest check {:.0} ms (bound {} ms)",
        longest as f64 / 1000.0,
        setup.hang_bound_ms
    );
    v
}

/// No use is lost: once every replica shut down, every key's stored use count is at least
/// its admitted checks. A write whose answer a cut connection lost is written again (usage is
/// counted at least once, see `ClientBuilder::usage_flush_interval`): the excess is reported.
fn usage(setup: &Setup, by_key: &HashMap<u32, Vec<Check>>, end: &[Option<KeyEnd>]) -> Verdict {
    let mut v = Verdict::new("no use lost: stored usage counts >= the admitted checks");
    let (mut keys, mut stored, mut admitted, mut over) = (0u64, 0u64, 0u64, 0u64);
    for k in 0..setup.keys.len() {
        let Some(Some(state)) = end.get(k) else { continue };
        let kk = u32::try_from(k).unwrap_or(u32::MAX);
        let ok =
            by_key.get(&kk).map_or(0, |c| c.iter().filter(|c| c.o == Outcome::Ok).count() as u64);
        keys += 1;
        stored += state.use_count;
        admitted += ok;
        over += u64::from(state.use_count > ok);
        if state.use_count < ok {
            v.breach(|| format!("key {k}: {} stored, {ok} admitted", state.use_count));
        }
    }
    v.figure = format!(
        "{keys} keys: {stored} uses stored, {admitted} checks admitted; {over} keys counted more (a write whose answer was lost, written again)"
    );
    v
}

/// Where any of `secrets` appears in `text`, also inside a longer run of letters and
/// digits: the lines, as `name:line`. Secrets are runs of ASCII letters and digits (16 or
/// more), so only such runs of a line are searched, at every offset, for each secret length.
#[must_use]
pub fn find_secrets(name: &str, text: &str, secrets: &HashSet<String>) -> Vec<String> {
    let lengths: HashSet<usize> = secrets.iter().map(String::len).collect();
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let hit = line.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
            lengths.iter().any(|&n| {
                w.len() >= n && (0..=w.len() - n).any(|at| secrets.contains(&w[at..at + n]))
            })
        });
        if hit {
            found.push(format!("{name}:{}", i + 1));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const S: i64 = 1_000_000; // a second, in microseconds

    fn setup() -> Setup {
        Setup {
            backend: "sqlite".into(),
            seed: 1,
            keys: vec![
                KeySetup { id: "a".into(), limit: 3, window_s: 60, credits: None },
                KeySetup { id: "b".into(), limit: 100, window_s: 60, credits: Some(2) },
            ],
            offsets_ms: vec![-30_000, 30_000],
            admin_offset_ms: -20_000,
            staleness_ms: 1000,
            reconnect_ms: 500,
            recovery_bound_ms: 1500,
            hang_bound_ms: 30_000,
        }
    }

    /// A check of `k` by replica `r` from `t` to `t` + 1 ms, at minute 10.
    fn probe(r: u32, k: u32, t: i64, o: Outcome) -> Event {
        Event::Check { r, k, t0: 600 * S + t, t1: 600 * S + t + 1000, o, detail: None }
    }

    fn admin(k: u32, t0: i64, t1: i64, change: Change) -> Event {
        let (t0, t1) = (600 * S + t0, 600 * S + t1);
        Event::Admin { k, t0, t1, change, done: true, attempts: 1, error: None }
    }

    fn verdict(events: &[Event], end: &[Option<KeyEnd>], name: &str) -> Verdict {
        check(&setup(), events, end).into_iter().find(|v| v.name.starts_with(name)).unwrap()
    }

    #[test]
    fn an_old_state_past_the_bound_is_a_breach_and_within_it_is_not() {
        let revoke = admin(0, 0, 10_000, Change::Revoke);
        let within = probe(0, 0, 900_000, Outcome::Ok);
        let v = verdict(&[revoke.clone(), within], &[], "no check started");
        assert_eq!(v.breaches, 0, "{v:?}");
        assert!(v.figure.contains("1 answered with a state a change had replaced"), "{}", v.figure);
        let past = probe(0, 0, 1_100_000, Outcome::Ok);
        assert_eq!(verdict(&[revoke.clone(), past], &[], "no check started").breaches, 1);
        // Refused as revoked before the revocation started: a breach the other way.
        let early = probe(0, 0, -5 * S, Outcome::Revoked);
        assert_eq!(verdict(&[revoke, early], &[], "no check started").breaches, 1);
    }

    #[test]
    fn a_grace_roll_is_judged_by_each_replicas_clock() {
        // Rolled at 0 with 60 s of grace by an admin 20 s behind: replica 0 (30 s behind)
        // sees it expire at 60 - 20 + 30 = 70 s, replica 1 (30 s ahead) at 10 s.
        let roll = admin(0, 0, 1000, Change::RollGrace { grace_ms: 60_000 });
        let ok = |r, t| verdict(&[roll.clone(), probe(r, 0, t, Outcome::Ok)], &[], "no check");
        let expired =
            |r, t| verdict(&[roll.clone(), probe(r, 0, t, Outcome::Expired)], &[], "no check");
        assert_eq!(ok(0, 69 * S).breaches, 0);
        assert_eq!(ok(0, 72 * S).breaches, 1);
        assert_eq!(ok(1, 9 * S).breaches, 0);
        assert_eq!(ok(1, 12 * S).breaches, 1);
        assert_eq!(expired(1, 12 * S).breaches, 0);
        assert_eq!(expired(0, 30 * S).breaches, 1);
    }

    #[test]
    fn scopes_deletes_and_other_outcomes_follow_the_state() {
        let drop_read = admin(0, 0, 1000, Change::Scopes { read: false });
        let v = |e: Vec<Event>| verdict(&e, &[], "no check").breaches;
        assert_eq!(v(vec![drop_read.clone(), probe(0, 0, 2 * S, Outcome::Scope)]), 0);
        assert_eq!(v(vec![drop_read.clone(), probe(0, 0, 2 * S, Outcome::Ok)]), 1);
        assert_eq!(v(vec![probe(0, 0, 2 * S, Outcome::Scope)]), 1);
        let delete = admin(0, 0, 1000, Change::Delete);
        assert_eq!(v(vec![delete.clone(), probe(0, 0, 2 * S, Outcome::InvalidKey)]), 0);
        assert_eq!(v(vec![delete, probe(0, 0, 2 * S, Outcome::Quota)]), 1);
        assert_eq!(v(vec![probe(0, 0, 0, Outcome::Other)]), 1);
        assert_eq!(v(vec![probe(0, 0, 0, Outcome::Unavailable)]), 0);
    }

    #[test]
    fn more_admitted_than_the_limit_in_a_window_is_a_breach() {
        let three: Vec<Event> =
            (0..3).map(|i| probe(i % 2, 0, S + i64::from(i) * S, Outcome::Ok)).collect();
        assert_eq!(verdict(&three, &[], "admitted").breaches, 0);
        // A check refused for its credits gave its unit back: not counted.
        let mut refused = three.clone();
        refused.push(probe(0, 0, 10 * S, Outcome::UsageExhausted));
        assert_eq!(verdict(&refused, &[], "admitted").breaches, 0);
        let mut four = three.clone();
        four.push(probe(0, 0, 10 * S, Outcome::Ok));
        assert_eq!(verdict(&four, &[], "admitted").breaches, 1);
        // The limit raised within the window allows the fourth.
        four.push(admin(0, 5 * S, 5 * S + 100, Change::Limit { n: 4 }));
        assert_eq!(verdict(&four, &[], "admitted").breaches, 0);
        // A check across a window's edge is not placed.
        let mut edge = three;
        edge.push(probe(0, 0, 60 * S - 10_000, Outcome::Ok));
        assert_eq!(verdict(&edge, &[], "admitted").breaches, 0);
    }

    #[test]
    fn credits_past_the_balance_or_unpaid_are_breaches() {
        let two = vec![probe(0, 1, S, Outcome::Ok), probe(1, 1, 2 * S, Outcome::Ok)];
        let paid = [None, Some(KeyEnd { use_count: 2, remaining: Some(0) })];
        assert_eq!(verdict(&two, &paid, "credits").breaches, 0);
        let unpaid = [None, Some(KeyEnd { use_count: 2, remaining: Some(1) })];
        assert_eq!(verdict(&two, &unpaid, "credits").breaches, 1);
        let mut three = two;
        three.push(probe(0, 1, 3 * S, Outcome::Ok));
        assert_eq!(verdict(&three, &[], "credits").breaches, 1);
    }

    #[test]
    fn storage_errors_count_only_under_faults() {
        let quiet = Event::Phase { kind: "pass".into(), t0: 600 * S, t1: 700 * S };
        let chaos = Event::Phase { kind: "chaos".into(), t0: 700 * S, t1: 800 * S };
        let v = |t| {
            verdict(
                &[quiet.clone(), chaos.clone(), probe(0, 0, t, Outcome::Storage)],
                &[],
                "no Storage",
            )
        };
        assert_eq!(v(10 * S).breaches, 1);
        assert_eq!(v(110 * S).breaches, 0);
        // A conflict the retries did not get past: the same.
        let conflict = |t| {
            verdict(
                &[quiet.clone(), chaos.clone(), probe(0, 0, t, Outcome::Conflict)],
                &[],
                "no Storage",
            )
        };
        assert_eq!(conflict(10 * S).breaches, 1);
        assert_eq!(conflict(110 * S).breaches, 0);
        // Within the recovery bound of the quiet phase's start: still the fault's.
        assert_eq!(v(S).breaches, 0);
        // Started in the quiet phase, answered after the next fault began: that fault's.
        assert_eq!(v(100 * S - 500).breaches, 0);
    }

    #[test]
    fn failing_past_the_recovery_bound_is_a_breach() {
        let restart = Event::Phase { kind: "restart".into(), t0: 590 * S, t1: 600 * S };
        let quiet = Event::Phase { kind: "pass".into(), t0: 600 * S, t1: 610 * S };
        let v = |t| {
            let answers = [probe(0, 0, 5 * S, Outcome::Ok), probe(1, 0, 5 * S, Outcome::Ok)];
            let mut e = vec![restart.clone(), quiet.clone(), probe(0, 0, t, Outcome::Unavailable)];
            e.extend(answers);
            verdict(&e, &[], "after each")
        };
        let fine = v(S);
        assert_eq!(fine.breaches, 0);
        assert!(fine.figure.contains("restart 1001 ms"), "{}", fine.figure);
        assert_eq!(v(2 * S).breaches, 1);
        // Answered after the quiet phase ended (the next fault's).
        assert_eq!(v(10 * S - 500).breaches, 0);
    }

    #[test]
    fn a_replica_that_answers_nothing_after_a_fault_is_a_breach() {
        let restart = Event::Phase { kind: "restart".into(), t0: 590 * S, t1: 600 * S };
        let quiet = Event::Phase { kind: "pass".into(), t0: 600 * S, t1: 610 * S };
        let answered = |r| probe(r, 0, 3 * S, Outcome::Ok);
        let both = [restart.clone(), quiet.clone(), answered(0), answered(1)];
        assert_eq!(verdict(&both, &[], "after each").breaches, 0);
        let one = [restart, quiet, answered(0)];
        assert_eq!(verdict(&one, &[], "after each").breaches, 1);
    }

    #[test]
    fn a_check_past_the_deadlines_is_a_breach() {
        let long =
            Event::Check { r: 0, k: 0, t0: 0, t1: 31 * S, o: Outcome::Unavailable, detail: None };
        assert_eq!(verdict(&[long], &[], "no check hung").breaches, 1);
        assert_eq!(verdict(&[probe(0, 0, 0, Outcome::Ok)], &[], "no check hung").breaches, 0);
    }

    #[test]
    fn a_lost_use_is_a_breach_and_a_repeated_write_is_reported() {
        let two = vec![probe(0, 0, S, Outcome::Ok), probe(1, 0, 2 * S, Outcome::Ok)];
        let end = |n| [Some(KeyEnd { use_count: n, remaining: None }), None];
        assert_eq!(verdict(&two, &end(2), "no use lost").breaches, 0);
        assert_eq!(verdict(&two, &end(1), "no use lost").breaches, 1);
        let over = verdict(&two, &end(3), "no use lost");
        assert_eq!(over.breaches, 0);
        assert!(over.figure.contains("1 keys counted more"), "{}", over.figure);
    }

    #[test]
    fn secrets_are_found_inside_words_too() {
        let secrets: HashSet<String> = ["Ab3xYz0123456789Qwerty".to_owned()].into();
        let text = "ok\nkey=sk_live_Ab3xYz0123456789Qwerty end\nxAb3xYz0123456789QwertyX\nAb3xYz0123456789Qwert\n";
        assert_eq!(find_secrets("f", text, &secrets), vec!["f:2".to_owned(), "f:3".to_owned()]);
    }
}
