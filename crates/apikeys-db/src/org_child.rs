//! What projects and products share: each belongs to one organization and has a name unique
//! in it, so their operations are written once here, generically over [`OrgChild`], and
//! [`project`](crate::project) and [`product`](crate::product) each implement the trait and
//! make every public method a plain one-line call.

use apikeys_core::hazmat::validate_name;
use apikeys_core::{Error, KeyAction, KeyPage, OrgId, Page, RecordId, Result};
use chrono::NaiveDateTime;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use uuid::Uuid;

use crate::audit::Subject;
use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::error::{Vanished, missing_parent, storage};
use crate::idempotent::{Read, VANISHED_RETRIES, insert_unique};
use crate::key_list::page_rows;

/// A record that belongs to one organization and whose name is unique in it.
pub(crate) trait OrgChild: From<Self::Row> {
    /// Its table.
    type Table: EntityTrait<Model = Self::Row>;
    /// Its table's row.
    type Row: Clone + IntoActiveModel<<Self::Table as EntityTrait>::ActiveModel>;
    /// Its typed id.
    type Id: Copy + Into<RecordId> + From<Uuid>;
    /// What it is called in messages.
    const LABEL: &'static str;
    /// The table's `id` column.
    fn id_column() -> <Self::Table as EntityTrait>::Column;
    /// The table's `org_id` column.
    fn org_column() -> <Self::Table as EntityTrait>::Column;
    /// The table's `name` column.
    fn name_column() -> <Self::Table as EntityTrait>::Column;
    /// A new row.
    fn row(id: Uuid, org: OrgId, name: &str, created_at: NaiveDateTime) -> Self::Row;
    /// The record's id.
    fn id(&self) -> Self::Id;
    /// The audit event of its creation.
    fn created(&self, org: OrgId) -> (KeyAction, Subject);
}

impl ApiKeyClient {
    /// `get_or_create_project` / `get_or_create_product` on `conn`.
    pub(crate) async fn get_or_create_child_on<T: OrgChild, C: ConnectionTrait>(
        &self,
        conn: &C,
        org: OrgId,
        name: &str,
    ) -> Result<(T, bool)> {
        validate_name("name", name)?;
        for _ in 0..VANISHED_RETRIES {
            let now = self.now();
            let id = self.new_id(now);
            T::Table::insert(T::row(id, org, name, naive(now)).into_active_model())
                .on_conflict_do_nothing_on([T::org_column(), T::name_column()])
                .exec_without_returning(conn)
                .await
                .map_err(|e| missing_parent(e, org))?;
            if let Some(found) = find_child_on::<T, C>(conn, org, name, Read::Latest).await? {
                let created = found.id().into().as_uuid() == id;
                if created {
                    let (action, subject) = found.created(org);
                    self.audit(conn, action, subject).await?;
                }
                return Ok((found, created));
            }
        }
        Err(Error::conflict(Vanished(T::LABEL)))
    }

    /// `create_project` / `create_product` on `conn`.
    pub(crate) async fn create_child_on<T: OrgChild, C: ConnectionTrait>(
        &self,
        conn: &C,
        org: OrgId,
        name: &str,
    ) -> Result<T> {
        validate_name("name", name)?;
        let now = self.now();
        let id = self.new_id(now);
        let row = T::row(id, org, name, naive(now));
        let unique = [T::org_column(), T::name_column()];
        let inserted =
            insert_unique::<T::Table, _, _>(conn, row.clone().into_active_model(), unique)
                .await
                .map_err(|e| missing_parent(e, org))?;
        if inserted {
            // What was inserted is what a read would return: no second round trip.
            let child = T::from(row);
            let (action, subject) = child.created(org);
            self.audit(conn, action, subject).await?;
            return Ok(child);
        }
        match find_child_on::<T, C>(conn, org, name, Read::Latest).await? {
            Some(existing) => Err(Error::AlreadyExists { existing: existing.id().into() }),
            None => Err(Error::conflict(Vanished(T::LABEL))),
        }
    }

    pub(crate) async fn list_children_page<T: OrgChild>(
        &self,
        org: OrgId,
        page: Page,
    ) -> Result<KeyPage<T, T::Id>> {
        let query = T::Table::find().filter(T::org_column().eq(org.as_uuid()));
        let (rows, more) = page_rows(self.db(), query, T::id_column(), page).await?;
        let items: Vec<T> = rows.into_iter().map(T::from).collect();
        let next = if more { items.last().map(T::id) } else { None };
        Ok(KeyPage { items, next })
    }

    pub(crate) async fn list_children<T: OrgChild>(&self, org: OrgId) -> Result<Vec<T>> {
        Ok(T::Table::find()
            .filter(T::org_column().eq(org.as_uuid()))
            .order_by_asc(T::name_column())
            .all(self.db())
            .await
            .map_err(storage)?
            .into_iter()
            .map(T::from)
            .collect())
    }
}

pub(crate) async fn find_child_on<T: OrgChild, C: ConnectionTrait>(
    conn: &C,
    org: OrgId,
    name: &str,
    read: Read,
) -> Result<Option<T>> {
    let select = T::Table::find()
        .filter(T::org_column().eq(org.as_uuid()))
        .filter(T::name_column().eq(name));
    Ok(read
        .apply(select, conn.get_database_backend())
        .one(conn)
        .await
        .map_err(storage)?
        .map(T::from))
}

pub(crate) async fn get_child_on<T: OrgChild, C: ConnectionTrait>(
    conn: &C,
    id: T::Id,
) -> Result<T> {
    T::Table::find()
        .filter(T::id_column().eq(id.into().as_uuid()))
        .one(conn)
        .await
        .map_err(storage)?
        .map(T::from)
        .ok_or(Error::NotFound { id: id.into() })
}
