//! The built `apikeys` binary, run as an operator runs it, against a fresh database on each
//! backend compiled in: SQLite always, PostgreSQL and MariaDB with the `postgres` and `mysql`
//! features (their server URLs in `APIKEYS_TEST_POSTGRES_URL` / `APIKEYS_TEST_MYSQL_URL`, as
//! `scripts/test-all` sets them; an unset URL fails the test, nothing is skipped).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test: failing loudly is the point

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use apikeys_testing::TestDb;
use serde_json::Value;

const SECRET: &str = "cli-test-signing-secret-0123456789-abcdefgh";
const NEW_SECRET: &str = "cli-test-signing-secret-rotated-9876543210";

const BOOTSTRAP: &str = r#"
[[organizations]]
name = "acme"
products = ["search", "maps"]

[[organizations.projects]]
name = "web"
products = ["search", "maps"]

[[organizations.projects]]
name = "mobile"
products = ["search"]

[[organizations]]
name = "globex"
"#;

/// A database of its own and a directory for files, and the binary pointed at them.
struct Cli {
    url: String,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// Keeps the test's database until the test ends (dropped then, also after a panic).
    _db: TestDb,
}

impl Cli {
    fn new(db: TestDb) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = db.url.clone();
        let env = vec![
            ("DATABASE_URL".to_owned(), url.clone()),
            ("APIKEYS_SIGNING_SECRET".to_owned(), SECRET.to_owned()),
        ];
        Self { url, dir, env, _db: db }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `apikeys ARGS` with this test's environment only, `stdin` as its input.
    fn run_with(&self, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_apikeys"));
        command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn apikeys");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        child.wait_with_output().expect("run apikeys")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(&[], args, "")
    }

    /// Runs and expects exit code 0; returns standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(code(&out), 0, "apikeys {args:?} failed: {}", stderr(&out));
        stdout(&out)
    }

    /// Runs with `--json`, expects success, parses standard output.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
    }

    fn verify(&self, key: &str, extra: &[&str]) -> Output {
        let mut args = vec!["keys", "verify"];
        args.extend_from_slice(extra);
        self.run_with(&[], &args, key)
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}
fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}
fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// A failure: the expected exit code and exactly one line on standard error, no panic.
fn assert_fails(out: &Output, expected: i32, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(code(out), expected, "{what}: exit code (stderr: {err})");
    assert_eq!(err.lines().count(), 1, "{what}: one line expected: {err}");
    assert!(err.starts_with("apikeys: error: "), "{what}: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: {err}");
    err
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

async fn bootstrap_twice(db: TestDb) {
    let cli = Cli::new(db);
    let status = cli.json(&["migrate", "status"]);
    assert!(status.as_array().unwrap().iter().all(|m| m["applied"] == false));
    assert!(cli.ok(&["migrate", "up"]).contains("applied m20261123_000001_create_tables"));
    assert_eq!(cli.ok(&["migrate"]), "no changes: the schema is up to date\n");
    assert!(
        cli.json(&["migrate", "status"]).as_array().unwrap().iter().all(|m| m["applied"] == true)
    );

    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    let file = file.to_str().unwrap();
    // A dry run first: it says what it would do and writes nothing.
    let planned = cli.json(&["bootstrap", file, "--dry-run"]);
    assert_eq!(planned["changes"].as_array().unwrap().len(), 9, "{planned}");
    assert_eq!(cli.json(&["orgs", "list"]), serde_json::json!([]));

    let first = cli.ok(&["bootstrap", file]);
    assert!(first.contains("created organization \"acme\""), "{first}");
    assert!(first.contains("created link of product \"maps\" to project \"web\""), "{first}");
    assert_eq!(first.lines().count(), 9, "{first}");
    // The second run changes nothing and says so, also as a dry run and as JSON.
    assert_eq!(cli.ok(&["bootstrap", file]), "no changes\n");
    assert_eq!(cli.ok(&["bootstrap", file, "--dry-run"]), "no changes\n");
    let again = cli.json(&["bootstrap", file]);
    assert_eq!(again["changes"], serde_json::json!([]));

    let orgs = cli.json(&["orgs", "list"]);
    let names: Vec<&str> =
        orgs.as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{orgs}");
    assert!(names.contains(&"acme") && names.contains(&"globex"));
    let web = cli.json(&["products", "list", "--org", "acme", "--project", "web"]);
    assert_eq!(web.as_array().unwrap().len(), 2, "{web}");
    let projects = cli.json(&["projects", "list"]);
    assert_eq!(projects.as_array().unwrap().len(), 2, "{projects}");

    // A file that grows: only the new parts are created.
    write(Path::new(file), &format!("{BOOTSTRAP}products = [\"billing\"]\n"));
    let grown = cli.json(&["bootstrap", file]);
    assert_eq!(
        grown["changes"],
        serde_json::json!([{ "action": "create_product", "organization": "globex", "product": "billing" }])
    );

    // A bad file is refused whole, before anything is written.
    let bad = cli.path("bad.toml");
    write(
        &bad,
        "[[organizations]]\nname = \"initech\"\nproducts = [\"a\"]\n[[organizations.projects]]\nname = \"p\"\nproducts = [\"b\"]\n",
    );
    let out = cli.run(&["bootstrap", bad.to_str().unwrap()]);
    let err = assert_fails(&out, 2, "undeclared product");
    assert!(err.contains("\"b\""), "{err}");
    write(&bad, "[[organizations]]\nnam = \"x\"\n");
    let err = assert_fails(&cli.run(&["bootstrap", bad.to_str().unwrap()]), 2, "unknown field");
    assert!(err.contains("bad.toml:2:1"), "{err}");
    assert_eq!(cli.json(&["orgs", "list"]).as_array().unwrap().len(), 2);

    // The README's example file applies, then has nothing left to do.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/bootstrap.toml");
    // (acme and globex exist already: only what the example adds is created.)
    assert!(cli.ok(&["bootstrap", example]).contains("created project \"internal\""));
    assert_eq!(cli.ok(&["bootstrap", example]), "no changes\n");
}

/// Several deploy jobs at once: `migrate up` and `bootstrap` from four processes each on a
/// fresh database. All succeed, each change is made exactly once, and a later run has none.
async fn concurrent_deploys(db: TestDb) {
    let cli = Cli::new(db);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    let file = file.to_str().unwrap().to_owned();
    let spawn = |args: Vec<String>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_apikeys"));
        command.env_clear().envs(cli.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let migrations: Vec<_> = (0..4).map(|_| spawn(vec!["migrate".into(), "up".into()])).collect();
    let mut applied = 0;
    for child in migrations {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        applied += stdout(&out).lines().filter(|l| l.starts_with("applied ")).count();
    }
    assert_eq!(applied, cli.json(&["migrate", "status"]).as_array().unwrap().len());
    let jobs: Vec<_> =
        (0..4).map(|_| spawn(vec!["bootstrap".into(), file.clone(), "--json".into()])).collect();
    let mut changes = Vec::new();
    for child in jobs {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
        changes.extend(report["changes"].as_array().unwrap().iter().map(Value::to_string));
    }
    changes.sort();
    let before = changes.len();
    changes.dedup();
    assert_eq!((before, changes.len()), (9, 9), "each change made once: {changes:?}");
    assert_eq!(cli.ok(&["bootstrap", &file]), "no changes\n");
}

async fn key_lifecycle(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    cli.ok(&["bootstrap", file.to_str().unwrap()]);

    let out = cli.run(&[
        "keys",
        "create",
        "--org",
        "acme",
        "--project",
        "web",
        "--product",
        "search",
        "--name",
        "deploy bot",
        "--scope",
        "read",
        "--scope",
        "write",
        "--rate-limit",
        "1/minute",
        "--credits",
        "2",
        "--expires-in",
        "30d",
        "--meta",
        "tier=gold",
        "--meta",
        "seats:=5",
        "--owner",
        "user-1",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The plaintext alone on standard output, once; the note on standard error.
    let key = stdout(&out).trim_end().to_owned();
    assert_eq!(stdout(&out).lines().count(), 1);
    assert_eq!(apikeys_db::core::find_keys(key.as_bytes()).len(), 1, "a key: {key}");
    assert!(stderr(&out).contains("shown only once") && !stderr(&out).contains(&key));

    // Verify through standard input: valid, with the scopes and product it has.
    let ok = cli.verify(&key, &[]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert!(!stdout(&ok).contains(&key));
    let ok = cli
        .verify(&format!("{key}\n"), &["--org", "acme", "--product", "search", "--scope", "read"]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    let err = assert_fails(&cli.verify(&key, &["--scope", "admin"]), 2, "missing scope");
    assert!(err.contains("admin") && !err.contains(&key), "{err}");
    let err = assert_fails(
        &cli.verify(&key, &["--org", "acme", "--product", "maps"]),
        2,
        "wrong product",
    );
    assert!(!err.contains(&key));
    assert!(err.contains(r#"product "maps" of organization "acme""#), "named as typed: {err}");

    // Verifying counts no use and spends no rate-limit unit (1 per minute) and no credit.
    for _ in 0..3 {
        let again = cli.verify(&key, &["--scope", "read"]);
        assert_eq!(code(&again), 0, "{}", stderr(&again));
    }
    // A key passed where an id belongs is refused without being echoed.
    let err = assert_fails(&cli.run(&["keys", "show", &key]), 2, "key as id");
    assert!(!err.contains(&key) && err.contains("standard input"), "{err}");

    let listed = cli.json(&["keys", "list", "--org", "acme"]);
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    let id = items[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(items[0]["status"], "active");
    assert_eq!(
        (items[0]["use_count"].as_u64(), items[0]["credits"]["remaining"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(items[0]["custom"], serde_json::json!({ "tier": "gold", "seats": 5 }));
    assert_eq!(items[0]["rate_limit"]["window"], "minute");
    assert!(!listed.to_string().contains(&key));
    let by_owner = cli.json(&["keys", "list", "--org", "acme", "--owner", "user-1"]);
    assert_eq!(by_owner["items"][0]["id"], id.as_str());
    // Owners are per organization: --owner needs --org, and another one has none of them.
    for args in [&["keys", "list", "--owner", "user-1"], &["keys", "revoke", "--owner", "user-1"]] {
        let out = cli.run(args);
        assert_eq!(code(&out), 1, "{args:?} needs --org: {}", stderr(&out));
        assert!(stderr(&out).contains("--org"), "{}", stderr(&out));
    }
    let table = cli.ok(&["keys", "list", "--org", "acme", "--project", "web"]);
    assert!(table.contains(&id) && table.contains("deploy bot"), "{table}");

    let updated = cli.json(&["keys", "update", &id, "--name", "renamed", "--no-rate-limit"]);
    assert_eq!(
        (updated["name"].as_str(), updated["rate_limit"].is_null()),
        (Some("renamed"), true)
    );
    let renewed = cli.json(&["keys", "renew", &id, "--expires-at", "2099-01-01T00:00:00Z"]);
    assert_eq!(renewed["expires_at"], "2099-01-01T00:00:00Z");

    // Roll with a grace: both keys work; the new one was printed once.
    let rolled = cli.json(&["keys", "roll", &id, "--grace", "1h"]);
    let new_key = rolled["key"].as_str().unwrap().to_owned();
    let new_id = rolled["id"].as_str().unwrap().to_owned();
    assert_eq!(rolled["rolled_from"], id.as_str());
    assert_eq!(code(&cli.verify(&new_key, &[])), 0);
    assert_eq!(code(&cli.verify(&key, &[])), 0);
    // A second roll, a renew or a top-up of the old key says it was rolled, and to which key.
    for again in [
        vec!["keys", "roll", &id],
        vec!["keys", "renew", &id, "--extend-by", "1d"],
        vec!["keys", "add-credits", &id, "1"],
    ] {
        let err = assert_fails(&cli.run(&again), 2, "a rolled key");
        assert!(err.contains(&format!("already rolled, to key {new_id}")), "{again:?}: {err}");
    }
    // A value refused by the library is named by its flag.
    let err = assert_fails(&cli.run(&["keys", "list", "--org", "acme", "--limit", "0"]), 2, "0");
    assert!(err.contains("--limit") && !err.contains("page.limit"), "{err}");

    // Revoke: the key fails with exit code 2 and a one-line reason; a second revoke says so.
    let revoked = cli.json(&["keys", "revoke", &id]);
    assert_eq!(revoked["status"], "revoked");
    let again = cli.run(&["keys", "revoke", &id]);
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    let note = stderr(&again);
    let at = note.rsplit("already revoked at ").next().unwrap().trim_end();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'), "{note}");
    let err = assert_fails(&cli.verify(&key, &[]), 2, "revoked key");
    assert!(err.contains("revoked") && !err.contains(&key), "{err}");
    // The instant as the tables show it: RFC 3339 to the second.
    let at = err.rsplit("revoked at ").next().unwrap().trim_end();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z'), "{err}");
    assert_eq!(at.len(), "2026-01-01T00:00:00Z".len(), "{err}");
    assert_eq!(code(&cli.verify(&new_key, &[])), 0);
    // Revoke by owner, in one organization: the rolled key is user-1's in acme.
    let none = cli.json(&["keys", "revoke", "--owner", "user-2", "--org", "acme"]);
    assert_eq!(none["revoked"], serde_json::json!([]));
    let by_owner = cli.json(&["keys", "revoke", "--owner", "user-1", "--org", "acme"]);
    assert_eq!(by_owner["revoked"], serde_json::json!([new_id]));
    assert_fails(&cli.verify(&new_key, &[]), 2, "revoked with its owner");

    let events = cli.json(&["keys", "events", &id]);
    let actions: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["created", "updated", "renewed", "rolled", "revoked"]);
    assert!(events.as_array().unwrap().iter().all(|e| e["actor"] == "cli"), "{events}");

    let shown = cli.json(&["keys", "show", &new_id]);
    assert_eq!(shown["name"], "renamed");
    cli.ok(&["keys", "delete", &new_id]);
    assert_fails(&cli.run(&["keys", "show", &new_id]), 2, "deleted key");
    assert_fails(&cli.verify(&new_key, &[]), 2, "deleted key verifies no more");
}

async fn errors_and_exit_codes(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    // Usage: a bad flag value, a missing argument, no secret, no database (exit 1).
    let bad_limit =
        cli.run(&["keys", "create", "--org", "a", "--name", "n", "--rate-limit", "5/week"]);
    assert_eq!(code(&bad_limit), 1);
    assert_eq!(code(&cli.run(&["keys", "show"])), 1);
    let no_secret =
        cli.run_with(&[("APIKEYS_SIGNING_SECRET", "")], &["keys", "list", "--org", "a"], "");
    assert!(assert_fails(&no_secret, 1, "no secret").contains("APIKEYS_SIGNING_SECRET"));
    let no_db = cli.run_with(&[("DATABASE_URL", "")], &["orgs", "list"], "");
    assert!(assert_fails(&no_db, 1, "no database").contains("DATABASE_URL"));
    let short = cli.run_with(&[("APIKEYS_SIGNING_SECRET", "short")], &["orgs", "list"], "");
    let err = assert_fails(&short, 1, "short secret");
    assert!(!err.contains("short\n") && !err.contains(": short"), "{err}");
    assert_fails(&cli.verify("", &[]), 1, "empty stdin");
    // Not found or invalid (exit 2).
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_fails(&cli.run(&["keys", "show", &unknown]), 2, "unknown key id");
    assert_fails(&cli.run(&["keys", "list", "--org", "nobody"]), 2, "unknown org");
    assert_fails(&cli.verify("sk_not_a_key", &[]), 2, "malformed key");
    let err = assert_fails(
        &cli.run(&["keys", "create", "--org", "nobody", "--name", "x"]),
        2,
        "create in unknown org",
    );
    assert!(err.contains("nobody"), "{err}");
    // Database failures (exit 3), with no password in the line.
    let down = cli.run_with(
        &[("DATABASE_URL", "postgres://admin:hunter2secret@127.0.0.1:1/none")],
        &["migrate", "status"],
        "",
    );
    if cfg!(feature = "postgres") {
        let err = assert_fails(&down, 3, "unreachable database");
        assert!(!err.contains("hunter2secret"), "{err}");
    } else {
        // Without the postgres feature the URL is a configuration error (exit 1).
        let err = assert_fails(&down, 1, "backend not compiled in");
        assert!(!err.contains("hunter2secret"), "{err}");
    }
    // The secret file form, and the refusal of both forms at once.
    let secret_file = cli.path("secret");
    write(&secret_file, &format!("{SECRET}\n"));
    let path = secret_file.to_str().unwrap();
    let from_file = cli.run_with(
        &[("APIKEYS_SIGNING_SECRET", "")],
        &["--signing-secret-file", path, "orgs", "list"],
        "",
    );
    assert_eq!(code(&from_file), 0, "{}", stderr(&from_file));
    assert_fails(&cli.run(&["--signing-secret-file", path, "orgs", "list"]), 1, "two secrets");
    let _ = &cli.url;
    // The audit trail's actor: --actor, else cli:$USER.
    write(&cli.path("b.toml"), BOOTSTRAP);
    cli.ok(&["bootstrap", cli.path("b.toml").to_str().unwrap()]);
    // Bad values for the key are refused by the shared form of a new key (exit 2), naming the
    // flag that gave them; nothing is created.
    for (flags, field) in [
        (vec!["--owner", " padded"], "invalid --owner"),
        (vec!["--credits", "18446744073709551615"], "invalid --credits"),
        (vec!["--credits", "5", "--refill", "daily:0"], "invalid --credits"),
        (vec!["--scope", "a,a"], "invalid --scope"),
        (vec!["--expires-at", "2001-01-01T00:00:00Z"], "invalid --expires-at / --expires-in"),
    ] {
        let mut args = vec!["keys", "create", "--org", "acme", "--name", "bad"];
        args.extend(flags);
        let err = assert_fails(&cli.run(&args), 2, field);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    assert_eq!(cli.json(&["keys", "list", "--org", "acme"])["items"], serde_json::json!([]));
    for (env, args, actor) in [
        (vec![("USER", "ops")], vec![], "cli:ops"),
        (vec![("USER", "ops")], vec!["--actor", "deploy-bot"], "deploy-bot"),
    ] {
        let mut all = vec!["keys", "create", "--org", "acme", "--name", "audited", "--json"];
        all.extend(args);
        let created: Value = serde_json::from_str(&stdout(&cli.run_with(&env, &all, ""))).unwrap();
        let events = cli.json(&["keys", "events", created["id"].as_str().unwrap()]);
        assert_eq!(events[0]["actor"], actor, "{events}");
    }
}

async fn rehash_pass(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    cli.ok(&[
        "bootstrap",
        {
            let f = cli.path("b.toml");
            write(&f, BOOTSTRAP);
            f.to_str().unwrap().to_owned()
        }
        .as_str(),
    ]);
    let mut old_keys = Vec::new();
    for name in ["a", "b", "c"] {
        let key = cli.ok(&["keys", "create", "--org", "acme", "--name", name]);
        old_keys.push(key.trim_end().to_owned());
    }
    // Secret rotation: v2 current, v1 previous. The three keys are not under v2 yet.
    let rotating = [
        ("APIKEYS_SIGNING_SECRET", NEW_SECRET),
        ("APIKEYS_SIGNING_SECRET_VERSION", "2"),
        ("APIKEYS_PREVIOUS_SIGNING_SECRET", SECRET),
        ("APIKEYS_PREVIOUS_SIGNING_SECRET_VERSION", "1"),
    ];
    let rotated_key = {
        let out =
            cli.run_with(&rotating, &["keys", "create", "--org", "acme", "--name", "new"], "");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stdout(&out).trim_end().to_owned()
    };
    let listed = cli.run_with(&rotating, &["keys", "rehash", "--json", "--batch", "2"], "");
    assert_eq!(code(&listed), 0, "{}", stderr(&listed));
    let listed: Value = serde_json::from_str(&stdout(&listed)).expect("json");
    let names: Vec<&str> =
        listed["items"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"], "{listed}");
    // Every key still verifies under the rotating configuration.
    for key in old_keys.iter().chain([&rotated_key]) {
        assert_eq!(code(&cli.run_with(&rotating, &["keys", "verify"], key)), 0);
    }
    let revoked =
        cli.run_with(&rotating, &["keys", "rehash", "--revoke", "--json", "--batch", "2"], "");
    assert_eq!(code(&revoked), 0, "{}", stderr(&revoked));
    let revoked: Value = serde_json::from_str(&stdout(&revoked)).expect("json");
    assert_eq!(revoked["revoked"].as_array().unwrap().len(), 3, "{revoked}");
    // Resumable: a second pass finds nothing left.
    let again = cli.run_with(&rotating, &["keys", "rehash", "--revoke", "--json"], "");
    let again: Value = serde_json::from_str(&stdout(&again)).expect("json");
    assert_eq!(again["revoked"], serde_json::json!([]));
    let err =
        assert_fails(&cli.run_with(&rotating, &["keys", "verify"], &old_keys[0]), 2, "revoked");
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(code(&cli.run_with(&rotating, &["keys", "verify"], &rotated_key)), 0);
}

/// Nothing the binary prints on any path holds a key: a key given where an id, a name or a
/// flag value belongs, as an unknown subcommand or an unexpected argument, or positionally
/// to `keys verify`, is refused without being echoed, by our messages and by clap's alike.
/// Both a key of this store and one of another format (any prefix is recognised) are tried.
async fn keys_are_never_echoed(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    write(&cli.path("b.toml"), BOOTSTRAP);
    cli.ok(&["bootstrap", cli.path("b.toml").to_str().unwrap()]);
    let key = cli.ok(&["keys", "create", "--org", "acme", "--name", "k"]).trim_end().to_owned();
    let listed = cli.json(&["keys", "list", "--org", "acme"]);
    let id = listed["items"][0]["id"].as_str().unwrap().to_owned();
    let foreign = apikeys_db::KeyFormat::new("acme", Some("live")).unwrap().generate().unwrap();
    for k in [key.as_str(), foreign.expose_secret()] {
        let (as_flag, as_flag_value) = (format!("--{k}"), format!("--{k}={k}"));
        let cases: Vec<(Vec<&str>, i32)> = vec![
            // The natural mistake: the key as an argument of `keys verify`.
            (vec!["keys", "verify", k], 1),
            (vec!["keys", "verify", "--scope", "read", k], 1),
            (vec!["keys", "verify", k, "--json"], 1),
            // A key where an id belongs, in every command that takes one.
            (vec!["keys", "show", k], 2),
            (vec!["keys", "revoke", k], 2),
            (vec!["keys", "delete", k], 2),
            (vec!["keys", "events", k], 2),
            (vec!["keys", "roll", k], 2),
            (vec!["keys", "renew", k, "--extend-by", "1d"], 2),
            (vec!["keys", "update", k, "--name", "x"], 2),
            (vec!["keys", "list", "--org", "acme", "--after", k], 2),
            // A key where a name (or id) belongs.
            (vec!["keys", "create", "--org", k, "--name", "x"], 2),
            (vec!["keys", "create", "--org", "acme", "--project", k, "--name", "x"], 2),
            (vec!["keys", "create", "--org", "acme", "--product", k, "--name", "x"], 2),
            (vec!["keys", "list", "--org", k], 2),
            (vec!["keys", "list", "--org", "acme", "--project", k], 2),
            (vec!["keys", "verify", "--org", k, "--product", "search"], 2),
            (vec!["keys", "verify", "--org", "acme", "--product", k], 2),
            (vec!["projects", "list", "--org", k], 2),
            (vec!["products", "list", "--org", "acme", "--project", k], 2),
            // A key as a flag value clap checks, and as a metadata pair.
            (vec!["keys", "list", "--org", "acme", "--status", k], 1),
            (vec!["keys", "list", "--org", "acme", "--limit", k], 1),
            (vec!["keys", "list", "--expiring-within", k], 1),
            (vec!["keys", "create", "--org", "acme", "--name", "x", "--rate-limit", k], 1),
            (vec!["keys", "create", "--org", "acme", "--name", "x", "--expires-in", k], 1),
            (vec!["keys", "create", "--org", "acme", "--name", "x", "--expires-at", k], 1),
            (vec!["keys", "create", "--org", "acme", "--name", "x", "--credits", k], 1),
            (vec!["keys", "create", "--org", "acme", "--name", "x", "--meta", k], 1),
            (vec!["keys", "roll", &id, "--grace", k], 1),
            (vec!["keys", "renew", &id, "--expires-at", k], 1),
            (vec!["keys", "rehash", "--batch", k], 1),
            (vec!["--signing-secret-version", k, "orgs", "list"], 1),
            // A key as a command, or as an argument where none is expected.
            (vec![k], 1),
            (vec!["keys", k], 1),
            (vec!["keys", "show", &id, k], 1),
            (vec!["orgs", "list", k], 1),
            (vec!["migrate", k], 1),
            (vec!["redact", k], 1),
            (vec![&as_flag], 1),
            (vec!["keys", "list", &as_flag_value], 1),
        ];
        // Every case is run, then every failure reported at once.
        let mut failures = Vec::new();
        for (args, expected) in cases {
            let out = cli.run(&args);
            let printed = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
            let printed_text = String::from_utf8_lossy(&printed);
            if !apikeys_db::core::find_keys(&printed).is_empty() {
                failures.push(format!("apikeys {args:?} echoes the key: {printed_text}"));
            }
            if code(&out) != expected || printed_text.contains("panicked") {
                failures.push(format!("apikeys {args:?}: exit {}: {printed_text}", code(&out)));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // `keys verify KEY` says where the key goes instead, on one line.
        let err = assert_fails(&cli.run(&["keys", "verify", k]), 1, "key as an argument");
        assert!(err.contains("standard input") && err.contains("| apikeys keys verify"), "{err}");
    }
    // None of it changed the key: it is still the one active key, and verifies.
    let after = cli.json(&["keys", "list", "--org", "acme", "--status", "all"]);
    assert_eq!(after["items"].as_array().unwrap().len(), 1, "{after}");
    assert_eq!(after["items"][0]["status"], "active", "{after}");
    assert_eq!(code(&cli.verify(&key, &[])), 0);
}

/// `keys disable` / `keys enable`, and IP allowlists from `--allow-ip`, through the binary:
/// verify answers 2 with the reason, a second disable or enable says so, a revoked key
/// stays revoked, a bad block is refused naming the flag's field.
async fn disable_enable_and_allowlists(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    cli.ok(&["bootstrap", file.to_str().unwrap()]);
    let create = [
        "keys",
        "create",
        "--org",
        "acme",
        "--name",
        "office",
        "--allow-ip",
        "192.0.2.0/24,2001:db8::/32",
    ];
    let out = cli.run(&create);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let key = stdout(&out).trim_end().to_owned();
    let listed = cli.json(&["keys", "list", "--org", "acme"]);
    let id = listed["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        listed["items"][0]["allowed_ips"],
        serde_json::json!(["192.0.2.0/24", "2001:db8::/32"])
    );

    assert_eq!(code(&cli.verify(&key, &["--ip", "192.0.2.7"])), 0);
    let err = assert_fails(&cli.verify(&key, &["--ip", "198.51.100.7"]), 2, "outside the list");
    assert!(err.contains("198.51.100.7") && !err.contains(&key), "{err}");
    let err = assert_fails(&cli.verify(&key, &[]), 2, "no address");
    assert!(err.contains("unknown address"), "{err}");
    cli.ok(&["keys", "update", &id, "--any-ip"]);
    assert_eq!(code(&cli.verify(&key, &[])), 0);
    let err = assert_fails(
        &cli.run(&["keys", "update", &id, "--allow-ip", "10.1.2.3/8"]),
        2,
        "host bits",
    );
    assert!(err.contains("--allow-ip") && err.contains("10.0.0.0/8"), "{err}");
    assert_eq!(code(&cli.verify(&key, &[])), 0, "a refused update changed nothing");

    let disabled = cli.json(&["keys", "disable", &id]);
    assert_eq!(disabled["status"], "disabled");
    let err = assert_fails(&cli.verify(&key, &[]), 2, "disabled key");
    assert!(err.contains("disabled"), "{err}");
    let again = cli.run(&["keys", "disable", &id]);
    assert_eq!(code(&again), 0);
    assert!(stderr(&again).contains("already disabled"), "{}", stderr(&again));
    let only_disabled = cli.json(&["keys", "list", "--org", "acme", "--status", "disabled"]);
    assert_eq!(only_disabled["items"].as_array().unwrap().len(), 1);
    assert_eq!(cli.json(&["keys", "enable", &id])["status"], "active");
    assert!(stderr(&cli.run(&["keys", "enable", &id])).contains("already enabled"));
    assert_eq!(code(&cli.verify(&key, &[])), 0);
    let events = cli.json(&["keys", "events", &id]);
    let actions: Vec<&str> =
        events.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["created", "updated", "disabled", "enabled"]);

    cli.ok(&["keys", "revoke", &id]);
    let err = assert_fails(&cli.run(&["keys", "enable", &id]), 2, "enable a revoked key");
    assert!(err.contains("revoked"), "{err}");
}

/// Named limits from the command line: `--limit NAME=N/WINDOW` on create (repeatable),
/// shown by `keys show`, replaced by `update --limit` and removed by `--no-limits`; a bad
/// name names the flag, and a name given twice is refused.
async fn named_limits_from_the_command_line(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    cli.ok(&["bootstrap", file.to_str().unwrap()]);
    let create = ["keys", "create", "--org", "acme", "--name", "plan"];
    let mut args = create.to_vec();
    args.extend(["--limit", "burst=10/second", "--limit", "daily=10000/day", "--json"]);
    let created: Value = serde_json::from_str(&cli.ok(&args)).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["rate_limits"],
        serde_json::json!({
            "burst": {"requests": 10, "window": "second"},
            "daily": {"requests": 10000, "window": "day"}
        })
    );
    let shown = stdout(&cli.run(&["keys", "show", &id]));
    assert!(shown.contains("burst: 10 per second, daily: 10000 per day"), "{shown}");
    let updated = cli.json(&["keys", "update", &id, "--limit", "hourly=50/hour"]);
    assert_eq!(
        updated["rate_limits"],
        serde_json::json!({"hourly": {"requests": 50, "window": "hour"}})
    );
    let cleared = cli.json(&["keys", "update", &id, "--no-limits"]);
    assert_eq!(cleared["rate_limits"], serde_json::json!({}));
    for bad in ["Daily=1/day", "key=1/day"] {
        let err = assert_fails(&cli.run(&["keys", "update", &id, "--limit", bad]), 2, bad);
        assert!(err.contains("invalid --limit"), "{err}");
    }
    let week = cli.run(&["keys", "update", &id, "--limit", "a=1/week"]);
    assert_eq!(code(&week), 1, "{}", stderr(&week));
    assert!(stderr(&week).contains("N/second, N/minute, N/hour or N/day"), "{}", stderr(&week));
    let twice = ["keys", "update", &id, "--limit", "a=1/day", "--limit", "a=2/day"];
    assert!(assert_fails(&cli.run(&twice), 2, "twice").contains("twice"));
}

/// `keys add-credits` tops a balance up and says why it refuses: a key with no balance, an
/// amount of zero.
async fn credits_are_topped_up(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    cli.ok(&["bootstrap", file.to_str().unwrap()]);
    let metered = ["keys", "create", "--org", "acme", "--name", "m", "--credits", "5"];
    cli.ok(&metered);
    cli.ok(&["keys", "create", "--org", "acme", "--name", "u"]);
    let listed = cli.json(&["keys", "list", "--org", "acme"]);
    let id = |i: usize| listed["items"][i]["id"].as_str().unwrap().to_owned();
    let topped = cli.json(&["keys", "add-credits", &id(0), "20"]);
    assert_eq!(topped["credits"]["remaining"], 25);
    let err = assert_fails(&cli.run(&["keys", "add-credits", &id(1), "20"]), 2, "no balance");
    assert!(err.contains("no credit balance"), "{err}");
    let err = assert_fails(&cli.run(&["keys", "add-credits", &id(0), "0"]), 2, "zero");
    assert!(err.contains("AMOUNT"), "{err}");
    let err = assert_fails(&cli.run(&["keys", "add-credits", &id(1), "5"]), 2, "no balance");
    assert!(err.contains("keys update ID --credits N"), "{err}");
    let shown = cli.json(&["keys", "show", &id(0)]);
    assert_eq!(shown["credits"]["remaining"], 25, "a refused call changed nothing");
}

/// `owners set`, `limits`, `add-credits`, `show`, `list` and `delete`, with no signing
/// secret (they issue no key); the plan set applies to the owner's keys; bad input is
/// refused naming the flag, and an owner with no plan is named as such.
async fn owner_plans_from_the_command_line(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    cli.ok(&["bootstrap", file.to_str().unwrap()]);
    let no_secret = [("APIKEYS_SIGNING_SECRET", "")];
    let set =
        ["owners", "set", "team-1", "--org", "acme", "--limit", "daily=2/day", "--credits", "5"];
    let out = cli.run_with(&no_secret, &set, "");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("daily: 2 per day"), "{}", stdout(&out));
    let topped = cli.json(&["owners", "add-credits", "team-1", "--org", "acme", "3"]);
    assert_eq!(topped["credits"]["remaining"], 8);
    let limits = ["owners", "limits", "team-1", "--org", "acme", "--limit", "daily=1/day"];
    let changed = cli.json(&limits);
    assert_eq!(
        (
            changed["credits"]["remaining"].clone(),
            changed["rate_limits"]["daily"]["requests"].clone()
        ),
        (8.into(), 1.into())
    );
    let listed = cli.json(&["owners", "list", "--org", "acme"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(cli.json(&["owners", "show", "team-1", "--org", "acme"]), changed);
    // The plan applies to the owner's keys.
    cli.ok(&["keys", "create", "--org", "acme", "--name", "k", "--owner", "team-1"]);
    let client = apikeys_db::ApiKeyClient::builder()
        .database_url(&cli.url)
        .signing_secret(SECRET)
        .build()
        .await
        .unwrap();
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let key = client.create_key(org.id, apikeys_db::NewKey::new("k2").with_owner("team-1")).await;
    let key = key.unwrap().key;
    let check = apikeys_db::ValidateOptions::new().track_usage(false);
    client.validate_key(key.expose_secret(), &check).await.unwrap();
    let refused = client.validate_key(key.expose_secret(), &check).await;
    assert!(
        matches!(refused, Err(apikeys_db::Error::Quota { ref name, .. }) if name.as_deref() == Some("owner.daily")),
        "{refused:?}"
    );
    // Bad input, named by flag or argument; nothing changes.
    let err = assert_fails(
        &cli.run(&["owners", "set", "team-1", "--org", "acme", "--limit", "key=1/day"]),
        2,
        "reserved name",
    );
    assert!(err.contains("--limit"), "{err}");
    let err = assert_fails(
        &cli.run(&["owners", "add-credits", "team-1", "--org", "acme", "0"]),
        2,
        "zero",
    );
    assert!(err.contains("AMOUNT"), "{err}");
    let err = assert_fails(&cli.run(&["owners", "show", "nobody", "--org", "acme"]), 2, "no plan");
    assert!(err.contains("no plan"), "{err}");
    let shown = cli.json(&["owners", "show", "team-1", "--org", "acme"]);
    assert_eq!(shown["credits"]["remaining"], 7, "one check spent one; nothing else changed");
    assert_eq!(shown["rate_limits"], changed["rate_limits"]);
    cli.ok(&["owners", "delete", "team-1", "--org", "acme"]);
    client.validate_key(key.expose_secret(), &check).await.unwrap();
    let err =
        assert_fails(&cli.run(&["owners", "delete", "team-1", "--org", "acme"]), 2, "deleted");
    assert!(err.contains("no plan"), "{err}");
}

/// A key of another environment (the service's `sk_live_…` while the command runs without
/// APIKEYS_ENVIRONMENT) is refused with the two formats named, and never repeated; a
/// malformed one gets the plain answer.
async fn verify_names_a_key_of_another_format(db: TestDb) {
    let cli = Cli::new(db);
    cli.ok(&["migrate", "up"]);
    let live = apikeys_db::KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
    let live = live.expose_secret();
    let err = assert_fails(&cli.verify(live, &[]), 2, "a key of another environment");
    assert!(err.contains("`sk_live_…`") && err.contains("`sk_…`"), "{err}");
    assert!(err.contains("APIKEYS_ENVIRONMENT") && !err.contains(live), "{err}");
    assert!(apikeys_db::core::find_keys(err.as_bytes()).is_empty(), "{err}");
    // One character off: the checksum fails, so it is no key of any format.
    let typo = apikeys_testing::forged(live);
    let err = assert_fails(&cli.verify(&typo, &[]), 2, "a typo");
    assert!(!err.contains("sk_live") && err.contains("malformed"), "{err}");
}

apikeys_testing::backend_tests!([
    named_limits_from_the_command_line,
    newcomer_errors_name_their_cause,
    disable_enable_and_allowlists,
    credits_are_topped_up,
    owner_plans_from_the_command_line,
    verify_names_a_key_of_another_format,
    bootstrap_twice,
    concurrent_deploys,
    key_lifecycle,
    errors_and_exit_codes,
    rehash_pass,
    keys_are_never_echoed,
]);

/// What a newcomer meets first, answered with its cause: `bootstrap` before `migrate up`
/// says to migrate; `bootstrap`, `orgs` and the like need no signing secret (they issue no
/// key), and running them without one leaves the keys made with the real secret working;
/// `keys` commands still ask for it.
async fn newcomer_errors_name_their_cause(db: TestDb) {
    let cli = Cli::new(db);
    let no_secret = [("APIKEYS_SIGNING_SECRET", "")];
    let file = cli.path("bootstrap.toml");
    write(&file, BOOTSTRAP);
    let file = file.to_str().unwrap();
    let out = cli.run_with(&no_secret, &["bootstrap", file], "");
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("run `apikeys migrate up` first"), "{}", stderr(&out));
    cli.ok(&["migrate", "up"]);
    let out = cli.run_with(&no_secret, &["bootstrap", file], "");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = cli.run_with(&no_secret, &["orgs", "list"], "");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("acme"), "{}", stdout(&out));
    let create = ["keys", "create", "--org", "acme", "--name", "k"];
    let out = cli.run_with(&no_secret, &create, "");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no signing secret"), "{}", stderr(&out));
    let key = cli.ok(&create).trim_end().to_owned();
    let out = cli.run_with(&no_secret, &["bootstrap", file], "");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&cli.verify(&key, &[])), 0, "a secretless bootstrap changed nothing");
}

/// The database cannot be opened: the answer says why, never the password nor the URL. A
/// SQLite file whose directory is missing says so (not where: the path is part of the URL);
/// a server that refuses the connection is named by host and port.
#[test]
fn unreachable_databases_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let run = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_apikeys"))
            .env_clear()
            .env("DATABASE_URL", url)
            .args(["orgs", "list"])
            .output()
            .unwrap()
    };
    let out = run(&format!("sqlite://{}/apikeys.db", missing.display()));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("directory of the SQLite database file does not exist"), "{err}");
    assert!(!err.contains("no-such-dir"), "the URL is never repeated: {err}");
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    {
        // Port 1 on loopback: nothing listens there.
        let mut urls = Vec::new();
        if cfg!(feature = "postgres") {
            urls.push("postgres://someone:pw-4242-secret@127.0.0.1:1/db");
        }
        if cfg!(feature = "mysql") {
            urls.push("mysql://someone:pw-4242-secret@127.0.0.1:1/db");
        }
        for url in urls {
            let out = run(url);
            assert_eq!(code(&out), 3, "{url}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(err.contains("127.0.0.1:1") && err.to_lowercase().contains("refused"), "{err}");
            assert!(!err.contains("pw-4242") && !err.contains("someone"), "{err}");
        }
    }
}

/// Help puts the settings every command shares under a heading of their own, after the
/// command's options, and shows unset variables without a dangling `=`; a usage error's
/// usage line lists the command's arguments, not the settings the environment gave.
#[test]
fn help_and_usage_keep_shared_settings_apart() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_apikeys"));
        command.env_clear().envs(env.iter().copied()).args(args);
        command.output().unwrap()
    };
    let help = stdout(&run(&[], &["keys", "list", "--help"]));
    let heading = help.find("Connection and key format").expect(&help);
    assert!(help.find("--org").is_some_and(|at| at < heading), "{help}");
    assert!(help.find("--database-url").is_some_and(|at| at > heading), "{help}");
    assert!(!help.contains("=]"), "{help}");
    let set = [("DATABASE_URL", "sqlite://x.db"), ("APIKEYS_ENVIRONMENT", "live")];
    let err = stderr(&run(&set, &["keys", "list"]));
    let usage = err.lines().find(|l| l.starts_with("Usage: ")).expect(&err);
    assert_eq!(usage, "Usage: apikeys keys list --org <ORG>", "{err}");
}

/// `redact` needs no database: keys in, hints out, the rest untouched.
#[test]
fn redact_masks_keys_on_stdin() {
    let key = apikeys_db::KeyFormat::new("sk", Some("live")).unwrap().generate().unwrap();
    let k = key.expose_secret();
    let mut child = Command::new(env!("CARGO_BIN_EXE_apikeys"))
        .env_clear()
        .arg("redact")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("GET /x?key={k} 200\nno key here sk_live_tooshort\n");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        format!("GET /x?key={}[redacted] 200\nno key here sk_live_tooshort\n", key.hint())
    );
}

/// The help of the binary and of every subcommand is complete: usage, and a description
/// for each flag; `--help` adds the environment and the exit codes.
#[test]
fn every_command_has_help() {
    let commands: &[&[&str]] = &[
        &[],
        &["migrate"],
        &["migrate", "up"],
        &["migrate", "status"],
        &["bootstrap"],
        &["keys"],
        &["keys", "create"],
        &["keys", "list"],
        &["keys", "show"],
        &["keys", "revoke"],
        &["keys", "delete"],
        &["keys", "disable"],
        &["keys", "enable"],
        &["keys", "verify"],
        &["keys", "update"],
        &["keys", "roll"],
        &["keys", "renew"],
        &["keys", "events"],
        &["keys", "rehash"],
        &["orgs", "list"],
        &["projects", "list"],
        &["products", "list"],
        &["redact"],
    ];
    for command in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_apikeys"))
            .env_clear()
            .args(command.iter().copied())
            .arg("-h")
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{command:?} --help");
        assert!(text.contains("Usage: apikeys"), "{command:?}: {text}");
        // Every flag and argument clap lists has a description after it.
        // Every flag has a description: after it on its line, or on the next, indented deeper.
        let lines: Vec<&str> = text.lines().collect();
        // (A flag's line is indented a few columns; a wrapped description that happens to
        // start with `--` is indented to the description column.)
        let indent_of = |l: &str| l.len() - l.trim_start().len();
        let flags = lines.iter().enumerate();
        for (i, line) in
            flags.filter(|(_, l)| l.trim_start().starts_with("--") && indent_of(l) <= 8)
        {
            let indent = indent_of(line);
            let same_line = line.trim().split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
            let next_line = lines.get(i + 1).is_some_and(|next| {
                let deeper = next.len() - next.trim_start().len() > indent;
                deeper && !next.trim().is_empty() && !next.trim_start().starts_with('-')
            });
            assert!(same_line || next_line, "{command:?}: undocumented: {line}");
        }
    }
    let top = Command::new(env!("CARGO_BIN_EXE_apikeys")).arg("--help").output().unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    for needle in ["Exit status", "DATABASE_URL", "APIKEYS_SIGNING_SECRET", "3  database error"] {
        assert!(top.contains(needle), "--help lacks {needle}");
    }
}
