//! Writes inside a transaction the host owns (`client.begin()`, `client.with(&txn)`): commit keeps
//! everything, rollback leaves nothing, a failed call does not break the host's transaction, and
//! what each backend's isolation gives, as the guide ("Bootstrap and host transactions") documents
//! it.

use std::time::Duration;

use apikeys_db::sea_orm::{
    ConnectionTrait, DbBackend, IsolationLevel, Statement, TransactionTrait,
};
use apikeys_db::{
    ApiKeyClient, Error, KeyUpdate, NewKey, OrgId, ProjectId, RecordId, ValidateOptions,
    VerifyOptions,
};

use apikeys_testing::{Backend, TestDb};

/// The host's own table, written in the same transaction as ours.
async fn customers_table(client: &ApiKeyClient) {
    let sql = "CREATE TABLE customers (name VARCHAR(64) NOT NULL)";
    client.connection().execute_unprepared(sql).await.unwrap();
}

async fn customers(client: &ApiKeyClient) -> i64 {
    let conn = client.connection();
    let sql = "SELECT COUNT(*) AS n FROM customers".to_owned();
    let row = conn
        .query_one_raw(Statement::from_string(conn.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// A sign-up: the host's row, an organization, a project linked to a product, a key of that
/// project; once rolled back, once committed.
pub async fn host_transaction_commit_and_rollback(db: TestDb) {
    let client = db.client().await;
    customers_table(&client).await;
    let before = db.counts(&client).await;

    for commit in [false, true] {
        let txn = client.begin().await.unwrap();
        txn.execute_unprepared("INSERT INTO customers (name) VALUES ('globex')").await.unwrap();
        let tx = client.with(&txn);
        let (org, created) = tx.get_or_create_organization("globex").await.unwrap();
        assert!(created);
        let (project, _) = tx.get_or_create_project(org.id, "v1").await.unwrap();
        let product = tx.create_product(org.id, "api").await.unwrap();
        assert!(tx.add_product_to_project(product.id, project.id).await.unwrap());
        let issued = tx
            .create_key(org.id, NewKey::new("first").with_project(project.id).with_scopes(["read"]))
            .await
            .unwrap();
        let key = issued.key.expose_secret();
        // Not visible outside the transaction before it ends.
        assert!(matches!(
            client.verify_key(key, &VerifyOptions::new()).await,
            Err(Error::InvalidKey)
        ));
        assert_eq!(client.find_organization("globex").await.unwrap(), None);

        let route = ValidateOptions::new().for_product(product.id).require_scopes(["read"]);
        if commit {
            txn.commit().await.unwrap();
            let found = client.validate_key(key, &route.unwrap()).await.unwrap();
            assert_eq!((found.id, found.project_id), (issued.record.id, Some(project.id)));
            assert_eq!(
                client.find_organization("globex").await.unwrap().map(|o| o.id),
                Some(org.id)
            );
            assert_eq!(customers(&client).await, 1);
            let after = db.counts(&client).await;
            assert_eq!(
                after[..5],
                [before[0] + 1, before[1] + 1, before[2] + 1, before[3] + 1, before[4] + 1]
            );
        } else {
            txn.rollback().await.unwrap();
            assert!(matches!(
                client.validate_key(key, &route.unwrap()).await,
                Err(Error::InvalidKey)
            ));
            assert!(matches!(
                client.get_organization(org.id).await,
                Err(Error::NotFound { id: RecordId::Organization(o) }) if o == org.id
            ));
            assert_eq!(customers(&client).await, 0);
            assert_eq!(db.counts(&client).await, before, "a rolled-back sign-up leaves nothing");
        }
    }
}

/// Calls that fail inside the host's transaction are undone alone (a savepoint each): the
/// transaction goes on and commits what succeeded. On PostgreSQL this is what keeps the
/// transaction alive after an error.
pub async fn failed_calls_leave_the_host_transaction_usable(db: TestDb) {
    let client = db.client().await;
    let acme = client.create_organization("acme").await.unwrap();
    let txn = client.begin().await.unwrap();
    let tx = client.with(&txn);
    match tx.create_organization("acme").await {
        Err(Error::AlreadyExists { existing }) => {
            assert_eq!(existing, RecordId::Organization(acme.id));
        }
        other => panic!("{other:?}"),
    }
    let missing_org = OrgId::new();
    assert!(matches!(
        tx.create_project(missing_org, "v1").await,
        Err(Error::NotFound { id: RecordId::Organization(o) }) if o == missing_org
    ));
    let missing_project = ProjectId::new();
    assert!(matches!(
        tx.create_key(acme.id, NewKey::new("k").with_project(missing_project)).await,
        Err(Error::NotFound { id: RecordId::Project(p) }) if p == missing_project
    ));
    assert!(matches!(
        tx.create_key(acme.id, NewKey::new("")).await,
        Err(Error::InvalidInput { field: "name", .. })
    ));
    let project = tx.create_project(acme.id, "v1").await.unwrap();
    assert!(matches!(
        tx.create_project(acme.id, "v1").await,
        Err(Error::AlreadyExists { existing: RecordId::Project(p) }) if p == project.id
    ));
    let issued = tx.create_key(acme.id, NewKey::new("k").with_project(project.id)).await.unwrap();
    txn.commit().await.unwrap();
    let key = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await.unwrap();
    assert_eq!(key.project_id, Some(project.id));
    assert_eq!(db.counts(&client).await[..5], [1, 1, 0, 0, 1]);
}

/// Update, revoke and delete in the host's transaction take effect at its commit, and not at
/// all after a rollback.
pub async fn key_changes_follow_the_host_transaction(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let issued = client.create_key(org.id, NewKey::new("k")).await.unwrap();
    let (id, key) = (issued.record.id, issued.key.expose_secret());
    let check = || async { client.verify_key(key, &VerifyOptions::new().track_usage(false)).await };

    let txn = client.begin().await.unwrap();
    let revoked = client.with(&txn).revoke_key(id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let renamed = client.with(&txn).update_key(id, KeyUpdate::new().with_name("renamed")).await;
    assert_eq!(renamed.unwrap().name, "renamed");
    assert!(check().await.is_ok(), "uncommitted revocation is not seen outside");
    txn.rollback().await.unwrap();
    let after = check().await.unwrap();
    assert_eq!((after.name.as_str(), after.revoked_at), ("k", None));

    let txn = client.begin().await.unwrap();
    client.with(&txn).delete_key(id).await.unwrap();
    assert!(matches!(
        client.with(&txn).delete_key(id).await,
        Err(Error::NotFound { id: RecordId::Key(k) }) if k == id
    ));
    txn.commit().await.unwrap();
    assert!(matches!(check().await, Err(Error::InvalidKey)));
}

/// Two host transactions bootstrap the same names at once: one row each, the same ids, one
/// creator.
pub async fn concurrent_host_transactions_create_one_row(db: TestDb) {
    let client = db.client().await;
    let first = client.begin().await.unwrap();
    let (org, created) = client.with(&first).get_or_create_organization("acme").await.unwrap();
    assert!(created);
    let (project, _) = client.with(&first).get_or_create_project(org.id, "v1").await.unwrap();
    // The second waits for the first's row (PostgreSQL, MySQL) or for its write lock (SQLite).
    let other = client.clone();
    let second = tokio::spawn(async move {
        let txn = other.begin().await.unwrap();
        let (o, created_o) = other.with(&txn).get_or_create_organization("acme").await.unwrap();
        let (p, created_p) = other.with(&txn).get_or_create_project(o.id, "v1").await.unwrap();
        txn.commit().await.unwrap();
        (o.id, created_o, p.id, created_p)
    });
    first.commit().await.unwrap();
    let (org_id, org_created, project_id, project_created) = second.await.unwrap();
    assert_eq!((org_id, project_id), (org.id, project.id));
    assert!(!org_created && !project_created);
    assert_eq!(db.counts(&client).await[..2], [1, 1]);
}

/// The host's first read in its transaction (which fixes a `REPEATABLE READ` snapshot).
async fn first_read(txn: &apikeys_db::sea_orm::DatabaseTransaction) {
    let sql = "SELECT COUNT(*) AS n FROM organizations".to_owned();
    let stmt = Statement::from_string(txn.get_database_backend(), sql);
    txn.query_one_raw(stmt).await.unwrap().unwrap();
}

/// What the guide's isolation table says: a row committed after the host's transaction
/// first read is found by `get_or_create_*` on MySQL (`REPEATABLE READ`, a locking read)
/// and PostgreSQL (`READ COMMITTED`); under PostgreSQL `REPEATABLE READ` it is a typed,
/// retryable `Conflict`; on SQLite the host's transaction holds the write lock, so another
/// writer waits and gives up with `Unavailable` after the statement timeout.
pub async fn isolation_as_documented(db: TestDb) {
    let client = db.client().await;
    if db.backend == Backend::Sqlite {
        let impatient = db.client_with(|b| b.statement_timeout(Duration::from_millis(200))).await;
        let txn = client.begin().await.unwrap();
        client.with(&txn).get_or_create_organization("held").await.unwrap();
        assert!(matches!(
            impatient.create_organization("other").await,
            Err(Error::Unavailable { .. })
        ));
        txn.commit().await.unwrap();
        impatient.create_organization("other").await.unwrap();
        return;
    }
    // The host's default isolation (READ COMMITTED on PostgreSQL, REPEATABLE READ on MySQL).
    let txn = client.begin().await.unwrap();
    first_read(&txn).await;
    let late = client.create_organization("late").await.unwrap();
    let (found, created) = client.with(&txn).get_or_create_organization("late").await.unwrap();
    assert_eq!((found.id, created), (late.id, false));
    txn.commit().await.unwrap();

    if db.backend == Backend::Postgres {
        let conn = client.connection();
        assert_eq!(conn.get_database_backend(), DbBackend::Postgres);
        let txn = conn.begin_with_config(Some(IsolationLevel::RepeatableRead), None).await.unwrap();
        first_read(&txn).await;
        client.create_organization("later").await.unwrap();
        match client.with(&txn).get_or_create_organization("later").await {
            Err(e @ Error::Conflict { .. }) => assert!(e.is_retryable()),
            other => panic!("expected a conflict, got {other:?}"),
        }
        txn.rollback().await.unwrap();
    }
}
