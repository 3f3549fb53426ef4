//! `apikeys bootstrap FILE`: make the organizations, projects, products and links a TOML
//! file declares exist. Additive and idempotent; checked whole before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use apikeys_db::core::hazmat::validate_name;
use apikeys_db::{ApiKeyClient, Organization, ProductId};
use serde::{Deserialize, Serialize};

use crate::failure::Failure;
use crate::output::{Out, note, print_line};

/// The file: a list of organizations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    organizations: Vec<OrgSpec>,
}

/// One organization and what it must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgSpec {
    name: String,
    #[serde(default)]
    products: Vec<String>,
    #[serde(default)]
    projects: Vec<ProjectSpec>,
}

/// One project and the products linked to it (each among its organization's products).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectSpec {
    name: String,
    #[serde(default)]
    products: Vec<String>,
}

/// One change bootstrap makes (or, with `--dry-run`, would make).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Change {
    CreateOrganization { organization: String },
    CreateProduct { organization: String, product: String },
    CreateProject { organization: String, project: String },
    Link { organization: String, project: String, product: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateOrganization { organization } => {
                write!(f, "organization {organization:?}")
            }
            Change::CreateProduct { organization, product } => {
                write!(f, "product {product:?} in organization {organization:?}")
            }
            Change::CreateProject { organization, project } => {
                write!(f, "project {project:?} in organization {organization:?}")
            }
            Change::Link { organization, project, product } => write!(
                f,
                "link of product {product:?} to project {project:?} in organization {organization:?}"
            ),
        }
    }
}

/// Reads and checks the file: it parses, every name is valid, nothing is declared twice,
/// and every linked product is among its organization's products.
fn load(path: &Path) -> Result<File, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::invalid(format!("cannot read {}: {e}", path.display())))?;
    let file: File = toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(":{line}:{column}")
        });
        Failure::invalid(format!("{}{at}: {}", path.display(), e.message()))
    })?;
    let invalid = |what: String, e: apikeys_db::Error| {
        Failure::invalid(format!("{}: {what}: {e}", path.display()))
    };
    let mut orgs = BTreeSet::new();
    for org in &file.organizations {
        validate_name("name", &org.name)
            .map_err(|e| invalid(format!("organization {:?}", org.name), e))?;
        if !orgs.insert(org.name.as_str()) {
            return Err(Failure::invalid(format!(
                "{}: organization {:?} is declared twice",
                path.display(),
                org.name
            )));
        }
        let mut products = BTreeSet::new();
        for product in &org.products {
            validate_name("name", product).map_err(|e| {
                invalid(format!("product {product:?} of organization {:?}", org.name), e)
            })?;
            if !products.insert(product.as_str()) {
                return Err(Failure::invalid(format!(
                    "{}: product {product:?} is declared twice in organization {:?}",
                    path.display(),
                    org.name
                )));
            }
        }
        let mut projects = BTreeSet::new();
        for project in &org.projects {
            validate_name("name", &project.name).map_err(|e| {
                invalid(format!("project {:?} of organization {:?}", project.name, org.name), e)
            })?;
            if !projects.insert(project.name.as_str()) {
                return Err(Failure::invalid(format!(
                    "{}: project {:?} is declared twice in organization {:?}",
                    path.display(),
                    project.name,
                    org.name
                )));
            }
            let mut linked = BTreeSet::new();
            for product in &project.products {
                if !products.contains(product.as_str()) {
                    return Err(Failure::invalid(format!(
                        "{}: project {:?} links product {product:?}, which is not among the \
                         products of organization {:?}",
                        path.display(),
                        project.name,
                        org.name
                    )));
                }
                if !linked.insert(product.as_str()) {
                    return Err(Failure::invalid(format!(
                        "{}: project {:?} links product {product:?} twice",
                        path.display(),
                        project.name
                    )));
                }
            }
        }
    }
    Ok(file)
}

/// What applying `spec` to the database would change, read without writing.
async fn plan(client: &ApiKeyClient, spec: &OrgSpec) -> Result<Vec<Change>, Failure> {
    let org_name = || spec.name.clone();
    let Some(org) = client.find_organization(&spec.name).await? else {
        // Nothing of a missing organization exists.
        let mut changes = vec![Change::CreateOrganization { organization: org_name() }];
        changes.extend(
            spec.products
                .iter()
                .map(|p| Change::CreateProduct { organization: org_name(), product: p.clone() }),
        );
        for project in &spec.projects {
            changes.push(Change::CreateProject {
                organization: org_name(),
                project: project.name.clone(),
            });
            changes.extend(project.products.iter().map(|p| Change::Link {
                organization: org_name(),
                project: project.name.clone(),
                product: p.clone(),
            }));
        }
        return Ok(changes);
    };
    let mut changes = Vec::new();
    let mut existing: BTreeMap<&str, ProductId> = BTreeMap::new();
    for product in &spec.products {
        match client.find_product(org.id, product).await? {
            Some(p) => {
                existing.insert(product.as_str(), p.id);
            }
            None => changes
                .push(Change::CreateProduct { organization: org_name(), product: product.clone() }),
        }
    }
    for project in &spec.projects {
        let linked: Vec<ProductId> = match client.find_project(org.id, &project.name).await? {
            Some(p) => {
                client.list_project_products(p.id).await?.into_iter().map(|p| p.id).collect()
            }
            None => {
                changes.push(Change::CreateProject {
                    organization: org_name(),
                    project: project.name.clone(),
                });
                Vec::new()
            }
        };
        for product in &project.products {
            let is_linked = existing.get(product.as_str()).is_some_and(|id| linked.contains(id));
            if !is_linked {
                changes.push(Change::Link {
                    organization: org_name(),
                    project: project.name.clone(),
                    product: product.clone(),
                });
            }
        }
    }
    Ok(changes)
}

/// Applies `spec`: every step is idempotent and safe to race with other deploy jobs.
async fn apply(client: &ApiKeyClient, spec: &OrgSpec) -> Result<Vec<Change>, Failure> {
    let mut changes = Vec::new();
    let (org, created): (Organization, bool) =
        client.get_or_create_organization(&spec.name).await?;
    if created {
        changes.push(Change::CreateOrganization { organization: org.name.clone() });
    }
    let mut ids: BTreeMap<&str, ProductId> = BTreeMap::new();
    for name in &spec.products {
        let (product, created) = client.get_or_create_product(org.id, name).await?;
        if created {
            changes.push(Change::CreateProduct {
                organization: org.name.clone(),
                product: name.clone(),
            });
        }
        ids.insert(name.as_str(), product.id);
    }
    for project_spec in &spec.projects {
        let (project, created) = client.get_or_create_project(org.id, &project_spec.name).await?;
        if created {
            changes.push(Change::CreateProject {
                organization: org.name.clone(),
                project: project.name.clone(),
            });
        }
        for name in &project_spec.products {
            // `load` checked that every linked product is declared, so it has an id.
            let Some(&product) = ids.get(name.as_str()) else { continue };
            if client.add_product_to_project(product, project.id).await? {
                changes.push(Change::Link {
                    organization: org.name.clone(),
                    project: project.name.clone(),
                    product: name.clone(),
                });
            }
        }
    }
    Ok(changes)
}

/// Runs `apikeys bootstrap`.
pub async fn run(
    client: &ApiKeyClient,
    path: &Path,
    dry_run: bool,
    out: &Out,
) -> Result<(), Failure> {
    let file = load(path)?;
    let mut changes = Vec::new();
    for org in &file.organizations {
        let made = if dry_run { plan(client, org).await? } else { apply(client, org).await? };
        if !out.json {
            let verb = if dry_run { "would create" } else { "created" };
            for change in &made {
                print_line(&format!("{verb} {change}"))?;
            }
        }
        changes.extend(made);
    }
    if out.json {
        return out.json_value(&serde_json::json!({ "dry_run": dry_run, "changes": changes }));
    }
    match (changes.len(), dry_run) {
        (0, _) => print_line("no changes"),
        (n, true) => {
            note(&format!("{n} change(s) to make; --dry-run wrote nothing"));
            Ok(())
        }
        (n, false) => {
            note(&format!("{n} change(s) made"));
            Ok(())
        }
    }
}
