//! A network partition between a client and its server, through a fault-injecting proxy
//! (`apikeys_testing::proxy`): a statement whose answer the network lost fails with
//! `Error::Unavailable` at the client's deadline (acquire timeout + statement timeout + 1 s)
//! instead of waiting for TCP to give up, hours later; the breaker then fails later calls at
//! once; and once the network heals, the same client works again.
//!
//! Servers only: SQLite has no network to lose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code, unused_imports))]

use std::net::ToSocketAddrs;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, NewKey, ValidateOptions};
use apikeys_testing::proxy::{Chaos, Mode, Proxy};
use apikeys_testing::{Backend, SECRET, TestDb, hold_key_rows};

/// The client's connect and acquire timeouts.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Its statement timeout: long enough that the statement is still waiting for a row lock
/// when the network goes silent.
const STATEMENT: Duration = Duration::from_secs(5);
/// A hang guard, far past the deadline (1 + 5 + 1 s): reaching it fails the test.
const GUARD: Duration = Duration::from_secs(60);

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_partition() {
    partition(Backend::Postgres).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_partition() {
    partition(Backend::MySql).await;
}

fn source(e: &Error) -> String {
    std::error::Error::source(e).map(ToString::to_string).unwrap_or_default()
}

async fn partition(backend: Backend) {
    let db = TestDb::new(backend, "partition").await;
    let direct = db.client().await;
    let (org, _) = direct.get_or_create_organization("acme").await.unwrap();
    let issued = direct.create_key(org.id, NewKey::new("k")).await.unwrap();
    let key = issued.key.expose_secret().to_owned();

    let mut url = url::Url::parse(&db.url).unwrap();
    let upstream =
        (url.host_str().unwrap(), url.port().unwrap()).to_socket_addrs().unwrap().next().unwrap();
    let proxy = Proxy::start(upstream, Mode::Pass, Chaos::default(), 1).await.unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr().port())).unwrap();
    let client = ApiKeyClient::builder()
        .database_url(url.as_str())
        .signing_secret(SECRET)
        .connect_timeout(TIMEOUT)
        .acquire_timeout(TIMEOUT)
        .statement_timeout(STATEMENT)
        .reconnect_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    // Usage tracked at once: each check writes the key's row.
    let opts = ValidateOptions::new();
    client.validate_key(&key, &opts).await.unwrap();

    // A check whose write waits for a row another connection holds; meanwhile the network
    // goes silent (open connections and new ones); then the row is let go, and the server's
    // answer is lost.
    let (other, txn) = hold_key_rows(&db).await;
    let check = {
        let (client, key, opts) = (client.clone(), key.clone(), opts.clone());
        tokio::spawn(async move { client.validate_key(&key, &opts).await })
    };
    // Sequencing only (no figure is asserted): the check reaches the row lock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_mode(Mode::BlackHole);
    proxy.freeze();
    txn.rollback().await.unwrap();
    let lost = tokio::time::timeout(GUARD, check)
        .await
        .expect("a statement whose answer the network lost hung")
        .unwrap();
    let Err(e @ Error::Unavailable { .. }) = lost else {
        panic!("expected Unavailable, got {lost:?}");
    };
    assert!(source(&e).contains("no answer from the database"), "{}", source(&e));
    // The breaker is open: the next call fails at once.
    let next = tokio::time::timeout(GUARD, client.validate_key(&key, &opts)).await.unwrap();
    let Err(e @ Error::Unavailable { .. }) = next else {
        panic!("expected Unavailable, got {next:?}");
    };
    assert!(source(&e).contains("failing fast"), "{}", source(&e));

    // The network heals: the same client works again.
    proxy.set_mode(Mode::Pass);
    proxy.cut();
    tokio::time::timeout(GUARD, async {
        while client.validate_key(&key, &opts).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the client did not recover once the network healed");
    drop(other);
    client.shutdown().await.unwrap();
    db.cleanup().await;
}
