//! Projects: race-safe `get_or_create_project`, strict `create_project`, reads. The work is
//! written once for projects and products, in [`org_child`](crate::org_child).

use apikeys_core::hazmat::validate_name;
// For the `# Errors` sections' links only.
#[cfg(doc)]
use apikeys_core::Error;
use apikeys_core::{KeyAction, KeyPage, OrgId, Page, Project, ProjectId, Result};
use chrono::NaiveDateTime;
use uuid::Uuid;

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::entity::project;
use crate::idempotent::Read;
use crate::org_child::{OrgChild, find_child_on, get_child_on};

impl OrgChild for Project {
    type Table = project::Entity;
    type Row = project::Model;
    type Id = ProjectId;
    const LABEL: &'static str = "project";
    fn id_column() -> project::Column {
        project::Column::Id
    }
    fn org_column() -> project::Column {
        project::Column::OrgId
    }
    fn name_column() -> project::Column {
        project::Column::Name
    }
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> project::Model {
        project::Model { id, org_id: org.as_uuid(), name: name.to_owned(), created_at }
    }
    fn id(&self) -> ProjectId {
        self.id
    }
    fn created(&self, org: OrgId) -> (KeyAction, Subject) {
        let subject = Subject { project: Some(self.id), ..Subject::org(org) };
        (KeyAction::ProjectCreated, subject)
    }
}

impl ApiKeyClient {
    /// Returns the project named `name` in `org`, creating it if it does not exist; the flag
    /// says whether this call created it. Race-safe like
    /// [`get_or_create_organization`](Self::get_or_create_organization).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the organization does
    /// not exist; [`Error::Storage`].
    pub async fn get_or_create_project(&self, org: OrgId, name: &str) -> Result<(Project, bool)> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.get_or_create_child_on(txn, org, name).await).await
    }

    /// Creates a project in `org`.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] with the existing project's id if the name is taken in the
    /// organization; [`Error::InvalidInput`] (field `name`); [`Error::NotFound`] if the
    /// organization does not exist; [`Error::Storage`].
    pub async fn create_project(&self, org: OrgId, name: &str) -> Result<Project> {
        validate_name("name", name)?;
        self.in_transaction(async |txn| self.create_child_on(txn, org, name).await).await
    }

    /// The project with this id.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Storage`].
    pub async fn get_project(&self, id: ProjectId) -> Result<Project> {
        get_child_on(self.db(), id).await
    }

    /// The project with this exact name in `org`, if any.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn find_project(&self, org: OrgId, name: &str) -> Result<Option<Project>> {
        find_child_on(self.db(), org, name, Read::Plain).await
    }

    /// The projects of `org` a page at a time, oldest first (the cursor is a project's id).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_projects_page(
        &self,
        org: OrgId,
        page: Page,
    ) -> Result<KeyPage<Project, ProjectId>> {
        self.list_children_page(org, page).await
    }

    /// Every project of `org`, by name.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_projects(&self, org: OrgId) -> Result<Vec<Project>> {
        self.list_children(org).await
    }
}
