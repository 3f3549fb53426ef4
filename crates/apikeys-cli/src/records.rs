//! Organizations, projects and products: finding them by name or id, and listing them.

use apikeys_db::{ApiKeyClient, Organization, Product, Project};
use serde_json::json;

use crate::args::{OrgsCommand, ProductsCommand, ProjectsCommand};
use crate::failure::{Failure, refuse_key};
use crate::output::{Out, table, when};

/// The organization named `name_or_id` (by name first, then as an id). A key given instead
/// is refused without being looked up or repeated, here and in [`project`] and [`product`].
pub async fn org(client: &ApiKeyClient, name_or_id: &str) -> Result<Organization, Failure> {
    refuse_key(name_or_id, "an organization name or id")?;
    if let Some(org) = client.find_organization(name_or_id).await? {
        return Ok(org);
    }
    match name_or_id.parse() {
        Ok(id) => Ok(client.get_organization(id).await?),
        Err(_) => Err(Failure::invalid(format!("organization {name_or_id:?} not found"))),
    }
}

/// The project `name_or_id` of `org`.
pub async fn project(
    client: &ApiKeyClient,
    org: &Organization,
    name_or_id: &str,
) -> Result<Project, Failure> {
    refuse_key(name_or_id, "a project name or id")?;
    if let Some(p) = client.find_project(org.id, name_or_id).await? {
        return Ok(p);
    }
    let not_found = || {
        Failure::invalid(format!("project {name_or_id:?} not found in organization {:?}", org.name))
    };
    match name_or_id.parse() {
        Ok(id) => match client.get_project(id).await {
            Ok(p) if p.org_id == org.id => Ok(p),
            Ok(_) | Err(apikeys_db::Error::NotFound { .. }) => Err(not_found()),
            Err(e) => Err(e.into()),
        },
        Err(_) => Err(not_found()),
    }
}

/// The product `name_or_id` of `org`.
pub async fn product(
    client: &ApiKeyClient,
    org: &Organization,
    name_or_id: &str,
) -> Result<Product, Failure> {
    refuse_key(name_or_id, "a product name or id")?;
    if let Some(p) = client.find_product(org.id, name_or_id).await? {
        return Ok(p);
    }
    let not_found = || {
        Failure::invalid(format!("product {name_or_id:?} not found in organization {:?}", org.name))
    };
    match name_or_id.parse() {
        Ok(id) => match client.get_product(id).await {
            Ok(p) if p.org_id == org.id => Ok(p),
            Ok(_) | Err(apikeys_db::Error::NotFound { .. }) => Err(not_found()),
            Err(e) => Err(e.into()),
        },
        Err(_) => Err(not_found()),
    }
}

/// `apikeys orgs …`.
pub async fn orgs(client: &ApiKeyClient, command: OrgsCommand, out: &Out) -> Result<(), Failure> {
    let OrgsCommand::List = command;
    let orgs = client.list_organizations().await?;
    if out.json {
        return out.json_value(&orgs);
    }
    let mut t = table(&["id", "name", "created"]);
    for o in &orgs {
        t.add_row(vec![o.id.to_string(), o.name.clone(), when(Some(o.created_at))]);
    }
    out.table(&t)
}

/// The organizations a listing covers: one, or all.
async fn scope(client: &ApiKeyClient, org: Option<&str>) -> Result<Vec<Organization>, Failure> {
    match org {
        Some(name) => Ok(vec![self::org(client, name).await?]),
        None => Ok(client.list_organizations().await?),
    }
}

/// `apikeys projects …`.
pub async fn projects(
    client: &ApiKeyClient,
    command: ProjectsCommand,
    out: &Out,
) -> Result<(), Failure> {
    let ProjectsCommand::List { org } = command;
    let mut rows = Vec::new();
    for o in scope(client, org.as_deref()).await? {
        for p in client.list_projects(o.id).await? {
            rows.push((o.name.clone(), p));
        }
    }
    if out.json {
        let items: Vec<_> =
            rows.iter().map(|(org, p)| json!({ "organization": org, "project": p })).collect();
        return out.json_value(&items);
    }
    let mut t = table(&["id", "organization", "name", "created"]);
    for (org, p) in &rows {
        t.add_row(vec![p.id.to_string(), org.clone(), p.name.clone(), when(Some(p.created_at))]);
    }
    out.table(&t)
}

/// `apikeys products …`.
pub async fn products(
    client: &ApiKeyClient,
    command: ProductsCommand,
    out: &Out,
) -> Result<(), Failure> {
    let ProductsCommand::List { org, project } = command;
    let mut rows = Vec::new();
    for o in scope(client, org.as_deref()).await? {
        let products = match &project {
            Some(name) => {
                let p = self::project(client, &o, name).await?;
                client.list_project_products(p.id).await?
            }
            None => client.list_products(o.id).await?,
        };
        rows.extend(products.into_iter().map(|p| (o.name.clone(), p)));
    }
    if out.json {
        let items: Vec<_> =
            rows.iter().map(|(org, p)| json!({ "organization": org, "product": p })).collect();
        return out.json_value(&items);
    }
    let mut t = table(&["id", "organization", "name", "created"]);
    for (org, p) in &rows {
        t.add_row(vec![p.id.to_string(), org.clone(), p.name.clone(), when(Some(p.created_at))]);
    }
    out.table(&t)
}
