//! No plaintext key and no signing secret in any log line, error message or Debug output.
//!
//! A `tracing` subscriber at TRACE level for every target (ours, sea-orm's and sqlx's, which
//! log each SQL statement) writes into a buffer during a full flow on each backend; the buffer
//! and the Display, Debug and source chain of every error the flow provoked are then searched
//! for each plaintext key, each key's secret part alone, and the signing secrets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

apikeys_testing::backend_tests! {
    flow: [full_flow_leaks_no_secret],
}

/// Everything every test's subscriber wrote.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the global subscriber once (tests of this binary share it) and returns its buffer.
fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("no other subscriber in this binary");
        buffer
    })
}

mod flow {
    use apikeys_db::{
        Error, KeyUpdate, NewKey, RateLimit, RateLimitMode, ValidateOptions, VerifyOptions,
    };

    use apikeys_testing::TestDb;

    const OLD_SECRET: &str = "old-signing-secret-for-the-log-scan-0123456789";
    const SECRET: &str = "current-signing-secret-for-the-log-scan-abcdef";

    pub async fn full_flow_leaks_no_secret(db: TestDb) {
        let logs = crate::logs();
        let mut errors: Vec<Error> = Vec::new();
        let mut debug_output: Vec<String> = Vec::new();
        let old = db
            .client_with(|b| b.signing_secret(OLD_SECRET).environment("live").log_statements(true))
            .await;
        let client = db
            .client_with(|b| {
                b.signing_secret(SECRET)
                    .signing_secret_version(2)
                    .previous_signing_secret(1, OLD_SECRET)
                    .environment("live")
                    .log_statements(true)
            })
            .await;
        let local = db
            .client_with(|b| {
                b.signing_secret(SECRET)
                    .signing_secret_version(2)
                    .environment("live")
                    .rate_limit_mode(RateLimitMode::Local)
                    .log_statements(true)
            })
            .await;
        debug_output.push(format!("{client:?} {local:?} {:?}", db.builder()));

        let (org, _) = client.get_or_create_organization("acme").await.unwrap();
        let (project, _) = client.get_or_create_project(org.id, "web").await.unwrap();
        let (product, _) = client.get_or_create_product(org.id, "api").await.unwrap();
        let (other, _) = client.get_or_create_product(org.id, "billing").await.unwrap();
        client.add_product_to_project(product.id, project.id).await.unwrap();

        // An old key, re-hashed on first use; a limited, scoped project key.
        let legacy = old.create_key(org.id, NewKey::new("legacy")).await.unwrap();
        let issued = client
            .create_key(
                org.id,
                NewKey::new("main")
                    .with_project(project.id)
                    .with_scopes(["read"])
                    .with_rate_limit(RateLimit::per_hour(2).unwrap()),
            )
            .await
            .unwrap();
        debug_output.push(format!("{issued:?} {legacy:?} {}", issued.record.hint));
        let keys = [issued.key.expose_secret().to_owned(), legacy.key.expose_secret().to_owned()];

        client.verify_key(&keys[1], &VerifyOptions::new()).await.unwrap();
        let main = &keys[0];
        let full = ValidateOptions::new().for_product(product.id).require_scopes(["read"]).unwrap();
        // Every check in one hour (a new hour would admit the "over the limit" ones).
        apikeys_testing::leave_room(
            &client,
            apikeys_db::Window::Hour,
            std::time::Duration::from_secs(60),
        )
        .await;
        client.validate_key(main, &full.clone()).await.unwrap();
        local.validate_key(main, &full.clone()).await.unwrap();
        let mut push = |r: Result<apikeys_db::ApiKey, Error>| errors.push(r.unwrap_err());
        push(
            client
                .validate_key(main, &ValidateOptions::new().require_scopes(["admin"]).unwrap())
                .await,
        );
        push(client.validate_key(main, &ValidateOptions::new().for_product(other.id)).await);
        client.validate_key(main, &full.clone()).await.unwrap();
        push(client.validate_key(main, &full.clone()).await); // over the limit: Quota
        local.validate_key(main, &full.clone()).await.unwrap();
        push(local.validate_key(main, &full).await); // over the local limit: Quota
        // Malformed and near-miss keys: the presented string must not be echoed either.
        let near_miss = apikeys_testing::forged(main);
        push(client.verify_key(&near_miss, &VerifyOptions::new()).await);
        push(client.verify_key(&format!("{main}\n"), &VerifyOptions::new()).await);
        client.update_key(issued.record.id, KeyUpdate::new().with_rate_limit(None)).await.unwrap();
        client.revoke_key(issued.record.id).await.unwrap();
        push(client.verify_key(main, &VerifyOptions::new()).await);
        client.delete_key(issued.record.id).await.unwrap();
        push(client.verify_key(main, &VerifyOptions::new()).await);
        // Configuration errors carry no secret either.
        for builder in [
            db.builder().signing_secret("short-secret"),
            db.builder().signing_secret(SECRET).previous_signing_secret(1, SECRET),
            db.builder().signing_secret(SECRET).database_url("nosuchdb://x"),
        ] {
            errors.push(builder.build().await.unwrap_err());
        }
        client.purge_rate_limit_windows().await.unwrap();

        let mut haystack = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        assert!(haystack.contains("api_keys"), "the subscriber captured the SQL statements");
        assert!(haystack.contains("api key revoked"), "and our own events");
        // Events inside a check carry its span, with the key's id (not secret) once found.
        let span = format!("apikeys.check{{op=\"validate\" key_id={}", issued.record.id);
        assert!(haystack.contains(&span), "the check's span names the key it found");
        for e in &errors {
            haystack.push_str(&format!("\n{e}\n{e:?}"));
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                haystack.push_str(&format!("\n{s}\n{s:?}"));
                source = s.source();
            }
        }
        assert_eq!(errors.len(), 11, "every provoked error was collected");
        haystack.push_str(&debug_output.join("\n"));

        let mut needles: Vec<String> = Vec::new();
        for key in &keys {
            needles.push(key.clone());
            // The 43-character secret part alone, without prefix, environment and checksum.
            let body = key.rsplit('_').next().unwrap();
            needles.push(body[..43].to_owned());
        }
        for secret in [SECRET, OLD_SECRET, "short-secret"] {
            needles.push(secret.to_owned());
            needles.push(format!("{:?}", secret.as_bytes()));
        }
        for needle in &needles {
            assert!(!haystack.contains(needle.as_str()), "leaked: {needle}");
        }
    }
}

/// Connection URLs of every malformed, unsupported or failing shape: no error (Display,
/// Debug, source chain) and no log line contains the password, raw or percent-decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_urls_leak_no_password() {
    let logs = logs();
    const PW: &str = "Hunter2-url-SECRET-pw";
    const ENCODED: &str = "p%40ss-url-SECRET%2Fpw";
    const DECODED: &str = "p@ss-url-SECRET/pw";
    let mut urls: Vec<String> = [
        "mariadb://u:{pw}@127.0.0.1:1/db",
        "postgres://u:{pw}@127.0.0.1:notaport/db",
        "postgres://u:{pw}@[::1/db",
        "postgres://u:{pw}@127.0.0.1:1/db",
        "postgresql://u:{pw}@/db",
        "mysql://u:{pw}@127.0.0.1:1/db",
        "mysql://u:{pw}@/db",
        "ftp://u:{pw}@h/",
        "u:{pw}@localhost/db",
        "postgres:u:{pw}@127.0.0.1/db",
        "postgres://u:{pw}@127.0.0.1:1/db?sslmode=bogus",
        "mysql://u:{pw}@127.0.0.1:1/db?ssl-mode=bogus",
        "sqlite://u:{pw}@/nonexistent-dir/x.db",
        "sqlite:///nonexistent-dir/{pw}/x.db",
    ]
    .iter()
    .flat_map(|u| [u.replace("{pw}", PW), u.replace("{pw}", ENCODED)])
    .collect();
    // Real servers refusing our password.
    for var in ["APIKEYS_TEST_POSTGRES_URL", "APIKEYS_TEST_MYSQL_URL"] {
        if let Ok(url) = std::env::var(var) {
            let (scheme, rest) = url.split_once("://").unwrap();
            let (creds, host_db) = rest.split_once('@').unwrap();
            let user = creds.split_once(':').unwrap().0;
            urls.push(format!("{scheme}://{user}:{PW}@{host_db}"));
            urls.push(format!("{scheme}://{user}:{ENCODED}@{host_db}"));
        }
    }
    for url in &urls {
        let result = apikeys_db::ApiKeyClient::builder()
            .database_url(url)
            .signing_secret(apikeys_testing::SECRET)
            .connect_timeout(std::time::Duration::from_secs(2))
            .acquire_timeout(std::time::Duration::from_secs(2))
            .build()
            .await;
        let e = result.expect_err(url);
        let mut text = format!("{e}\n{e:?}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!("\n{s}\n{s:?}"));
            source = s.source();
        }
        for needle in [PW, ENCODED, DECODED] {
            assert!(!text.contains(needle), "{url} leaked into: {text}");
        }
    }
    let haystack = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    for needle in [PW, ENCODED, DECODED] {
        let line = haystack.lines().find(|l| l.contains(needle));
        assert!(line.is_none(), "a log line holds the password: {line:?}");
    }
}
