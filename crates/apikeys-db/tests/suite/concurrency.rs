use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Barrier;

use apikeys_testing::TestDb;

const TASKS: usize = 32;

/// 32 tasks, each with its own client (its own pool), run the same bootstrap at once.
pub async fn concurrent_bootstrap(db: TestDb) {
    let first = db.client().await;
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut handles = Vec::new();
    for i in 0..TASKS {
        // Half the tasks share one client, half have their own pool.
        let client =
            if i % 2 == 0 { first.clone() } else { db.client_with(|b| b.max_connections(2)).await };
        let barrier = Arc::clone(&barrier);
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let (org, org_created) = client.get_or_create_organization("acme").await.unwrap();
            let (project, project_created) =
                client.get_or_create_project(org.id, "v1").await.unwrap();
            let (product, product_created) =
                client.get_or_create_product(org.id, "api").await.unwrap();
            let linked = client.add_product_to_project(product.id, project.id).await.unwrap();
            (
                org.id,
                project.id,
                product.id,
                [org_created, project_created, product_created, linked],
            )
        }));
    }
    let mut ids = HashSet::new();
    let mut created = [0; 4];
    for h in handles {
        let (o, p, q, flags) = h.await.unwrap();
        ids.insert((o, p, q));
        for (c, f) in created.iter_mut().zip(flags) {
            *c += usize::from(f);
        }
    }
    assert_eq!(ids.len(), 1, "every caller must see the same ids");
    assert_eq!(created, [1, 1, 1, 1], "exactly one caller creates each row");
    assert_eq!(db.counts(&first).await[..4], [1, 1, 1, 1]);
}
