//! The deploy-time setup a backend runs on every start: tables, organizations, projects,
//! products and their links. Idempotent: a second run creates nothing and says so.
//!
//! `cargo run --example bootstrap` (SQLite file `apikeys.db`), or set `DATABASE_URL` and
//! add `--features postgres` or `--features mysql`.
//! Several copies may run at once against one database (as replicas do).
#![allow(clippy::print_stdout)]

use apikeys_db::ApiKeyClient;

#[tokio::main]
async fn main() -> apikeys_db::Result<()> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://apikeys.db".to_owned());
    let secret = std::env::var("APIKEYS_SIGNING_SECRET")
        .unwrap_or_else(|_| "example-signing-secret-change-me-0123456789".to_owned());
    let client = ApiKeyClient::builder().database_url(url).signing_secret(secret).build().await?;
    client.create_tables().await?;

    let mut created = 0;
    let (org, c) = client.get_or_create_organization("acme").await?;
    created += usize::from(c);
    for project in ["v1", "mobile"] {
        let (p, c) = client.get_or_create_project(org.id, project).await?;
        created += usize::from(c);
        for product in ["public-api", "billing"] {
            let (q, c) = client.get_or_create_product(org.id, product).await?;
            created += usize::from(c);
            created += usize::from(client.add_product_to_project(q.id, p.id).await?);
        }
    }
    if created == 0 {
        println!("bootstrap: everything already in place, nothing created (org {})", org.id);
    } else {
        println!("bootstrap: created {created} rows (org {})", org.id);
    }
    Ok(())
}
