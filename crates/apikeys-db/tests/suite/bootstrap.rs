use apikeys_db::{Error, OrgId, ProductId, RecordId, RecordKind};

use apikeys_testing::TestDb;

pub async fn organization_get_or_create_is_idempotent(db: TestDb) {
    let client = db.client().await;
    let (a, created) = client.get_or_create_organization("acme").await.unwrap();
    assert!(created);
    let (b, created_again) = client.get_or_create_organization("acme").await.unwrap();
    assert!(!created_again);
    assert_eq!(a, b);
    assert_eq!(client.get_organization(a.id).await.unwrap(), a);
    assert_eq!(client.find_organization("acme").await.unwrap(), Some(a.clone()));
    assert_eq!(client.find_organization("nope").await.unwrap(), None);
    assert_eq!(client.list_organizations().await.unwrap(), vec![a]);
    let missing = OrgId::new();
    match client.get_organization(missing).await {
        Err(Error::NotFound { id }) => assert_eq!(id, RecordId::Organization(missing)),
        other => panic!("{other:?}"),
    }
    // create_tables is safe to run again.
    client.create_tables().await.unwrap();
    assert_eq!(db.count(&client, "organizations").await, 1);
}

pub async fn create_duplicate_reports_existing_id(db: TestDb) {
    let client = db.client().await;
    let org = client.create_organization("acme").await.unwrap();
    match client.create_organization("acme").await {
        Err(Error::AlreadyExists { existing }) => {
            assert_eq!(existing, RecordId::Organization(org.id));
            assert_eq!(existing.kind(), RecordKind::Organization);
        }
        other => panic!("{other:?}"),
    }
    let project = client.create_project(org.id, "v1").await.unwrap();
    match client.create_project(org.id, "v1").await {
        Err(Error::AlreadyExists { existing }) => {
            assert_eq!(existing, RecordId::Project(project.id));
            assert_eq!(existing.kind(), RecordKind::Project);
        }
        other => panic!("{other:?}"),
    }
    let product = client.create_product(org.id, "api").await.unwrap();
    match client.create_product(org.id, "api").await {
        Err(Error::AlreadyExists { existing }) => {
            assert_eq!(existing, RecordId::Product(product.id));
            assert_eq!(existing.kind(), RecordKind::Product);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(db.counts(&client).await[..3], [1, 1, 1]);
}

pub async fn projects_and_products(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (other, _) = client.get_or_create_organization("globex").await.unwrap();
    let (p1, c1) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let (p1b, c1b) = client.get_or_create_project(org.id, "v1").await.unwrap();
    assert!(c1 && !c1b);
    assert_eq!(p1, p1b);
    assert_eq!(p1.org_id, org.id);
    // The same name in another organization is another project.
    let (p_other, c_other) = client.get_or_create_project(other.id, "v1").await.unwrap();
    assert!(c_other);
    assert_ne!(p_other.id, p1.id);
    let (mobile, _) = client.get_or_create_project(org.id, "mobile").await.unwrap();
    let names: Vec<_> =
        client.list_projects(org.id).await.unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["mobile", "v1"]);
    assert_eq!(client.get_project(mobile.id).await.unwrap(), mobile);

    let (api, created) = client.get_or_create_product(org.id, "public-api").await.unwrap();
    assert!(created);
    assert!(!client.get_or_create_product(org.id, "public-api").await.unwrap().1);
    assert_eq!(client.get_product(api.id).await.unwrap(), api);
    assert_eq!(client.list_products(org.id).await.unwrap(), vec![api.clone()]);
    assert_eq!(client.find_product(org.id, "public-api").await.unwrap(), Some(api));
    assert_eq!(client.find_product(other.id, "public-api").await.unwrap(), None);

    // Unknown organization: typed error, nothing written.
    let before = db.counts(&client).await;
    let missing = OrgId::new();
    assert!(matches!(
        client.get_or_create_project(missing, "x").await,
        Err(Error::NotFound { id: RecordId::Organization(o) }) if o == missing
    ));
    assert!(matches!(
        client.create_product(missing, "x").await,
        Err(Error::NotFound { id: RecordId::Organization(o) }) if o == missing
    ));
    assert_eq!(db.counts(&client).await, before);
}

/// Bad names are in the bad-input table; this is the edge that must pass.
pub async fn names_up_to_255_characters(db: TestDb) {
    let client = db.client().await;
    // 255 characters, multi-byte, is fine everywhere.
    let max = "é".repeat(255);
    let (o, _) = client.get_or_create_organization(&max).await.unwrap();
    assert_eq!(o.name, max);
    let (p, _) = client.get_or_create_project(o.id, &max).await.unwrap();
    assert_eq!(client.get_project(p.id).await.unwrap().name, max);
}

pub async fn names_are_exact_on_every_backend(db: TestDb) {
    let client = db.client().await;
    let mut ids = Vec::new();
    for name in ["acme", "Acme", "ACME", "acmé", "ａｃｍｅ", "acme corp", "acme  corp"] {
        let (org, created) = client.get_or_create_organization(name).await.unwrap();
        assert!(created, "{name} should be its own organization");
        assert_eq!(org.name, name);
        ids.push(org.id);
    }
    for (i, name) in ["acme", "Acme", "ACME"].iter().enumerate() {
        assert_eq!(client.find_organization(name).await.unwrap().unwrap().id, ids[i]);
    }
    assert_eq!(db.count(&client, "organizations").await, 7);
}

pub async fn product_links(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let (other, _) = client.get_or_create_organization("globex").await.unwrap();
    let (v1, _) = client.get_or_create_project(org.id, "v1").await.unwrap();
    let (api, _) = client.get_or_create_product(org.id, "api").await.unwrap();
    let (billing, _) = client.get_or_create_product(org.id, "billing").await.unwrap();
    let (foreign, _) = client.get_or_create_product(other.id, "api").await.unwrap();
    assert!(client.add_product_to_project(api.id, v1.id).await.unwrap());
    assert!(!client.add_product_to_project(api.id, v1.id).await.unwrap());
    assert!(client.add_product_to_project(billing.id, v1.id).await.unwrap());
    let linked: Vec<_> =
        client.list_project_products(v1.id).await.unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(linked, [api.id, billing.id]);
    let before = db.counts(&client).await;
    assert!(matches!(
        client.add_product_to_project(foreign.id, v1.id).await,
        Err(Error::InvalidInput { field: "product_id", .. })
    ));
    let missing = ProductId::new();
    assert!(matches!(
        client.add_product_to_project(missing, v1.id).await,
        Err(Error::NotFound { id: RecordId::Product(p) }) if p == missing
    ));
    assert_eq!(db.counts(&client).await, before);
    assert!(client.remove_product_from_project(billing.id, v1.id).await.unwrap());
    assert!(!client.remove_product_from_project(billing.id, v1.id).await.unwrap());
    assert_eq!(db.count(&client, "project_products").await, 1);
}
