//! The audit trail (`key_events`): one row per change, written on the change's own
//! connection (inside its transaction), never updated, kept when its key is deleted.

use apikeys_core::hazmat::validate_actor;
use apikeys_core::{
    ApiKey, KeyAction, KeyEvent, KeyId, KeyPage, OrgId, Page, ProductId, ProjectId, Result,
};
use uuid::Uuid;

use crate::key_list::page_rows;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use std::sync::Arc;

use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::entity::key_event;
use crate::error::{corrupt, storage};

/// What an event is about: its ids.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Subject {
    pub(crate) key: Option<KeyId>,
    pub(crate) org: Option<OrgId>,
    pub(crate) project: Option<ProjectId>,
    pub(crate) product: Option<ProductId>,
    pub(crate) related: Option<KeyId>,
}

impl Subject {
    /// A key, with its organization, project and product.
    pub(crate) fn key(key: &ApiKey) -> Self {
        Self {
            key: Some(key.id),
            org: Some(key.org_id),
            project: key.project_id,
            product: key.product_id,
            related: None,
        }
    }

    /// An organization.
    pub(crate) fn org(org: OrgId) -> Self {
        Self { org: Some(org), ..Self::default() }
    }

    /// The same, naming the other key of a roll.
    pub(crate) fn related(mut self, other: KeyId) -> Self {
        self.related = Some(other);
        self
    }
}

impl ApiKeyClient {
    /// A handle on the same client whose changes the audit trail attributes to `actor` (a
    /// user, an admin token's name, a job: whatever the host wants to read later in
    /// [`list_key_events`](Self::list_key_events)). Cheap: it shares everything else.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, KeyAction, NewKey};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let key = client.create_key(org.id, NewKey::new("ci")).await?.record;
    /// client.acting_as("support:alice")?.revoke_key(key.id).await?;
    /// let events = client.list_key_events(key.id).await?;
    /// assert_eq!(events[1].action, KeyAction::Revoked);
    /// assert_eq!(events[1].actor.as_deref(), Some("support:alice"));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) (field `actor`): 1 to 255 characters, no leading or trailing
    /// whitespace, no control or invisible format characters.
    pub fn acting_as(&self, actor: &str) -> Result<ApiKeyClient> {
        validate_actor(actor)?;
        Ok(ApiKeyClient { inner: Arc::clone(&self.inner), actor: Some(Arc::from(actor)) })
    }

    /// Appends an event on `conn` (inside the change's transaction).
    pub(crate) async fn audit<C: ConnectionTrait>(
        &self,
        conn: &C,
        action: KeyAction,
        subject: Subject,
    ) -> Result<()> {
        let now = self.now();
        let row = key_event::Model {
            id: self.new_id(now),
            at: naive(now),
            action: action.as_str().to_owned(),
            key_id: subject.key.map(|k| k.as_uuid()),
            org_id: subject.org.map(|o| o.as_uuid()),
            project_id: subject.project.map(|p| p.as_uuid()),
            product_id: subject.product.map(|p| p.as_uuid()),
            related_key_id: subject.related.map(|k| k.as_uuid()),
            actor: self.actor.as_deref().map(str::to_owned),
        };
        key_event::Entity::insert(sea_orm::IntoActiveModel::into_active_model(row))
            .exec_without_returning(conn)
            .await
            .map_err(storage)?;
        Ok(())
    }

    /// A key's audit trail, oldest first: every event recorded for it (created, updated,
    /// rolled, renewed, revoked, deleted), also after the key was deleted. An unknown id
    /// has none.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn list_key_events(&self, key: KeyId) -> Result<Vec<KeyEvent>> {
        self.events_where(key_event::Column::KeyId.eq(key.as_uuid())).await
    }

    /// A key's audit trail a page at a time, oldest first: [`list_key_events`](Self::list_key_events)
    /// for a key with a long history. The cursor is an event's id.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn list_key_events_page(
        &self,
        key: KeyId,
        page: Page,
    ) -> Result<KeyPage<KeyEvent, Uuid>> {
        let query = key_event::Entity::find().filter(key_event::Column::KeyId.eq(key.as_uuid()));
        let (rows, more) = page_rows(self.db(), query, key_event::Column::Id, page).await?;
        let items = rows.into_iter().map(event_from_row).collect::<Result<Vec<_>>>()?;
        let next = if more { items.last().map(|e| e.id) } else { None };
        Ok(KeyPage { items, next })
    }

    /// The events of an organization, oldest first: its creation, its projects' and
    /// products' and its keys' events.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn list_org_events(&self, org: OrgId) -> Result<Vec<KeyEvent>> {
        self.events_where(key_event::Column::OrgId.eq(org.as_uuid())).await
    }

    /// The events matching `condition`, oldest first (ids are time-ordered).
    async fn events_where(
        &self,
        condition: sea_orm::sea_query::SimpleExpr,
    ) -> Result<Vec<KeyEvent>> {
        let rows = key_event::Entity::find()
            .filter(condition)
            .order_by_asc(key_event::Column::Id)
            .all(self.db())
            .await
            .map_err(storage)?;
        rows.into_iter().map(event_from_row).collect()
    }
}

fn event_from_row(m: key_event::Model) -> Result<KeyEvent> {
    let action = KeyAction::from_name(&m.action).ok_or_else(|| corrupt("key_events", "action"))?;
    Ok(KeyEvent {
        id: m.id,
        at: m.at.and_utc(),
        action,
        key_id: m.key_id.map(KeyId::from_uuid),
        org_id: m.org_id.map(OrgId::from_uuid),
        project_id: m.project_id.map(ProjectId::from_uuid),
        product_id: m.product_id.map(ProductId::from_uuid),
        related_key_id: m.related_key_id.map(KeyId::from_uuid),
        actor: m.actor,
    })
}
