//! Cross-tenant isolation: two organizations with identical names for everything inside them.
//! Only the organization tells them apart, and nothing of one may reach the other.

use std::collections::BTreeSet;

use apikeys_db::{
    ApiKeyClient, Error, IssuedKey, KeyId, NewKey, OrgId, Page, Product, StatusFilter,
    ValidateOptions,
};

use apikeys_testing::TestDb;

/// One tenant: projects "web" and "mobile", products "api" and "billing" ("api" linked to
/// "web"), and one key of each kind.
struct Tenant {
    org: OrgId,
    web: apikeys_db::Project,
    products: Vec<Product>,
    keys: Vec<IssuedKey>,
}

async fn tenant(client: &ApiKeyClient, name: &str) -> Tenant {
    let (org, _) = client.get_or_create_organization(name).await.unwrap();
    let (web, _) = client.get_or_create_project(org.id, "web").await.unwrap();
    client.get_or_create_project(org.id, "mobile").await.unwrap();
    let (api, _) = client.get_or_create_product(org.id, "api").await.unwrap();
    let (billing, _) = client.get_or_create_product(org.id, "billing").await.unwrap();
    client.add_product_to_project(api.id, web.id).await.unwrap();
    Tenant { org: org.id, web, products: vec![api, billing], keys: Vec::new() }
}

async fn issue(client: &ApiKeyClient, t: &mut Tenant) {
    let (web, api) = (t.web.id, t.products[0].id);
    for new_key in [
        NewKey::new("org-wide"),
        NewKey::new("web").with_project(web),
        NewKey::new("api").with_product(api),
    ] {
        t.keys.push(client.create_key(t.org, new_key).await.unwrap());
    }
}

async fn allowed(client: &ApiKeyClient, key: &IssuedKey, product: &Product) -> bool {
    let options = ValidateOptions::new().for_product(product.id);
    match client.validate_key(key.key.expose_secret(), &options).await {
        Ok(record) => {
            assert_eq!(record.id, key.record.id);
            true
        }
        Err(Error::ProductNotAllowed { product_id }) => {
            assert_eq!(product_id, product.id);
            false
        }
        Err(e) => panic!("{e:?}"),
    }
}

/// Every key id of `org` in pages of 2, for `status`.
async fn listed(client: &ApiKeyClient, org: OrgId, status: StatusFilter) -> Vec<KeyId> {
    let (mut out, mut page) = (Vec::new(), Page::first(2).unwrap());
    loop {
        let p = client.list_org_keys(org, status, page).await.unwrap();
        out.extend(p.items.iter().map(|k| k.id));
        match p.next {
            Some(cursor) => page = Page::first(2).unwrap().after(cursor),
            None => return out,
        }
    }
}

pub async fn cross_tenant_isolation(db: TestDb) {
    let client = db.client().await;
    let mut a = tenant(&client, "acme").await;
    let mut b = tenant(&client, "globex").await;
    // Interleaved, so the two tenants' keys are neighbours in id order.
    for _ in 0..3 {
        issue(&client, &mut a).await;
        issue(&client, &mut b).await;
    }

    // A key validates for its own organization's products as its rule says, and never for a
    // product of the other organization, whatever its kind.
    for (own, other) in [(&a, &b), (&b, &a)] {
        for key in &own.keys {
            let expected_own = match key.record.name.as_str() {
                "org-wide" => [true, true],
                "web" => [true, false], // "api" is linked to "web", "billing" is not
                _ => [true, false],     // the "api" product key
            };
            for (product, expected) in own.products.iter().zip(expected_own) {
                assert_eq!(allowed(&client, key, product).await, expected, "{}", key.record.name);
            }
            for product in &other.products {
                assert!(!allowed(&client, key, product).await, "cross-tenant {}", key.record.name);
            }
        }
    }

    // Projects and products of one organization cannot be linked to the other's.
    for (own, other) in [(&a, &b), (&b, &a)] {
        for product in &other.products {
            assert!(matches!(
                client.add_product_to_project(product.id, own.web.id).await,
                Err(Error::InvalidInput { field: "product_id", .. })
            ));
        }
        let linked = client.list_project_products(own.web.id).await.unwrap();
        assert_eq!(linked, vec![own.products[0].clone()]);
    }

    // Listing never shows another organization's keys, projects or products, in any status,
    // page by page, even with the other tenant's key id as the cursor.
    client.revoke_key(a.keys[0].record.id).await.unwrap();
    client.revoke_key(b.keys[1].record.id).await.unwrap();
    for (own, other) in [(&a, &b), (&b, &a)] {
        let own_ids: BTreeSet<_> = own.keys.iter().map(|k| k.record.id).collect();
        for status in [StatusFilter::All, StatusFilter::Active, StatusFilter::Revoked] {
            let ids = listed(&client, own.org, status).await;
            assert!(!ids.is_empty());
            assert!(ids.iter().all(|id| own_ids.contains(id)), "{status:?} leaked: {ids:?}");
        }
        assert_eq!(listed(&client, own.org, StatusFilter::All).await.len(), own.keys.len());
        let foreign_cursor = other.keys[0].record.id;
        let page = client
            .list_org_keys(
                own.org,
                StatusFilter::All,
                Page::first(100).unwrap().after(foreign_cursor),
            )
            .await
            .unwrap();
        assert!(page.items.iter().all(|k| k.org_id == own.org));
        let project_keys = client
            .list_project_keys(own.web.id, StatusFilter::All, Page::first(100).unwrap())
            .await
            .unwrap();
        assert_eq!(project_keys.items.len(), 3);
        assert!(project_keys.items.iter().all(|k| k.org_id == own.org));
        for project in client.list_projects(own.org).await.unwrap() {
            assert_eq!(project.org_id, own.org);
        }
        assert_eq!(client.list_products(own.org).await.unwrap(), own.products);
        let found = client.find_project(own.org, "web").await.unwrap().unwrap();
        assert_eq!(found.id, own.web.id);
    }
}
