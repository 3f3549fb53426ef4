//! The shared test support's own promise: a test that panics still drops its database.

use apikeys_testing::TestDb;

/// A test body that panics in a task of its own, holding a database with tables and a client
/// on it: the panic drops the database (the server's, or the SQLite file), as the stamped
/// tests rely on.
pub async fn a_panicking_test_drops_its_database(db: TestDb) {
    let backend = db.backend;
    let _suite_client = db.client().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let inner = TestDb::new(backend, "drop_guard").await;
        let client = inner.client().await;
        client.get_or_create_organization("acme").await.unwrap();
        let location = inner.location();
        assert!(location.exists().await, "the database exists while the test runs");
        tx.send(location).unwrap();
        panic!("a failing test");
    });
    let outcome = failing.await;
    assert!(outcome.is_err_and(|e| e.is_panic()), "the test body panicked");
    let location = rx.await.unwrap();
    assert!(!location.exists().await, "the panic dropped the database: {location:?}");
    // The suite's own database is untouched, and its cleanup is still the explicit one.
    assert!(db.location().exists().await);
}
