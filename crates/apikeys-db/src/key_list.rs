//! Reading keys in bulk: listings with a status filter and keyset pagination, and the
//! count of keys per signing-secret version.

use apikeys_core::{ApiKey, KeyPage, OrgId, Page, ProjectId, Result, StatusFilter};
use sea_orm::sea_query::IntoCondition;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};

use crate::client::ApiKeyClient;
use crate::convert::{api_key_from_model, naive};
use crate::entity::api_key;
use crate::error::{corrupt, storage};

impl ApiKeyClient {
    /// How many keys can be found under each signing-secret version, lowest version first:
    /// the progress of a rotation. A key counts under the version of its main hash and,
    /// during a rotation, under that of its alternate hash too. Before removing a secret,
    /// check that the count under the new version covers every key you still want.
    ///
    /// Keys move to the current secret on their first tracked success while the old secret
    /// is configured as previous; an HMAC cannot be re-keyed without the plaintext, so a key
    /// never presented during the rotation stays under its old version only.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn keys_per_secret_version(&self) -> Result<Vec<(u32, u64)>> {
        use api_key::Column as C;
        let mut counts = std::collections::BTreeMap::<u32, u64>::new();
        for (column, hash) in [(C::SecretVersion, C::KeyHash), (C::AltSecretVersion, C::AltKeyHash)]
        {
            let rows: Vec<(Option<i32>, i64)> = api_key::Entity::find()
                .select_only()
                .column(column)
                .column_as(C::Id.count(), "keys")
                .filter(hash.is_not_null())
                .group_by(column)
                .into_tuple()
                .all(self.db())
                .await
                .map_err(storage)?;
            for (v, n) in rows {
                let v = v
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| corrupt("api_keys", "secret_version"))?;
                *counts.entry(v).or_default() += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(counts.into_iter().collect())
    }

    /// The keys that have no hash under the client's current signing secret, in the given
    /// status, oldest first, one page at a time: during a rotation, the keys not yet moved.
    ///
    /// They verify only on replicas that still hold the secret they are under, and move to
    /// the current one on their next tracked success while that secret is configured as
    /// previous. An HMAC cannot be re-keyed without the plaintext, which is never stored, so
    /// no offline pass can move them: once the old secret is removed they stop verifying.
    /// Revoke (and reissue) the ones you still want before then, or keep the previous secret
    /// longer. The `apikeys keys rehash` command walks this list.
    ///
    /// # Errors
    /// [`Error::Configuration`](crate::Error::Configuration) when a signing secret's version
    /// is registered with another secret (see
    /// [`create_tables`](Self::create_tables)); [`Error::Unavailable`](crate::Error::Unavailable);
    /// [`Error::Storage`](crate::Error::Storage).
    pub async fn list_unrotated_keys(
        &self,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        // The list trusts the version labels: check them first.
        self.inner.secrets.check().await?;
        self.list_keys(self.unrotated(), status, page).await
    }

    /// How many keys [`list_unrotated_keys`](Self::list_unrotated_keys) would list in all.
    ///
    /// # Errors
    /// As `list_unrotated_keys`.
    pub async fn count_unrotated_keys(&self, status: StatusFilter) -> Result<u64> {
        self.inner.secrets.check().await?;
        api_key::Entity::find()
            .filter(self.unrotated())
            .filter(status_condition(status, self.now()))
            .count(self.db())
            .await
            .map_err(storage)
    }

    /// Neither the main nor the alternate hash is under the current secret.
    fn unrotated(&self) -> Condition {
        use api_key::Column as C;
        let current = i32::try_from(self.inner.hasher.current_version()).unwrap_or(i32::MAX);
        Condition::all().add(C::SecretVersion.ne(current)).add(
            Condition::any()
                .add(C::AltKeyHash.is_null())
                .add(C::AltSecretVersion.is_null())
                .add(C::AltSecretVersion.ne(current)),
        )
    }

    /// The keys of a project with the given status, oldest first, one page at a time.
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn list_project_keys(
        &self,
        project: ProjectId,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        self.list_keys(api_key::Column::ProjectId.eq(project.as_uuid()), status, page).await
    }

    /// The keys of an organization (org-wide and narrowed ones) with the given status, oldest
    /// first, one page at a time.
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, Page, StatusFilter};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// # for name in ["a", "b", "c"] { client.create_key(org.id, NewKey::new(name)).await?; }
    /// let mut page = Page::first(2)?;
    /// let mut names = Vec::new();
    /// loop {
    ///     let keys = client.list_org_keys(org.id, StatusFilter::Active, page).await?;
    ///     names.extend(keys.items.into_iter().map(|k| k.name));
    ///     match keys.next {
    ///         Some(cursor) => page = page.after(cursor),
    ///         None => break,
    ///     }
    /// }
    /// assert_eq!(names, ["a", "b", "c"]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Unavailable`](crate::Error::Unavailable); [`Error::Storage`](crate::Error::Storage).
    pub async fn list_org_keys(
        &self,
        org: OrgId,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        self.list_keys(api_key::Column::OrgId.eq(org.as_uuid()), status, page).await
    }

    pub(crate) async fn list_keys(
        &self,
        owner: impl IntoCondition,
        status: StatusFilter,
        page: Page,
    ) -> Result<KeyPage<ApiKey>> {
        let query =
            api_key::Entity::find().filter(owner).filter(status_condition(status, self.now()));
        let (rows, more) = page_rows(self.db(), query, api_key::Column::Id, page).await?;
        let items = rows.into_iter().map(api_key_from_model).collect::<Result<Vec<_>>>()?;
        let next = if more { items.last().map(|k| k.id) } else { None };
        Ok(KeyPage { items, next })
    }
}

/// The rows of `query` on `page`: up to its limit, after its cursor, ordered by `id` (ids
/// are UUID v7, so this is creation order); and whether more follow.
pub(crate) async fn page_rows<E: EntityTrait>(
    db: &impl ConnectionTrait,
    mut query: Select<E>,
    id: E::Column,
    page: Page,
) -> Result<(Vec<E::Model>, bool)> {
    let limit = page.limit();
    if let Some(cursor) = page.cursor() {
        query = query.filter(id.gt(cursor));
    }
    let mut rows =
        query.order_by_asc(id).limit(u64::from(limit) + 1).all(db).await.map_err(storage)?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok((rows, more))
}

/// The SQL form of `ApiKey::status` (revoked, else expired from `now >= expires_at`, else
/// disabled, else active).
fn status_condition(status: StatusFilter, now: chrono::DateTime<chrono::Utc>) -> Condition {
    use api_key::Column as C;
    let not_expired = Condition::any().add(C::ExpiresAt.is_null()).add(C::ExpiresAt.gt(naive(now)));
    match status {
        StatusFilter::All => Condition::all(),
        StatusFilter::Active => Condition::all()
            .add(C::RevokedAt.is_null())
            .add(not_expired)
            .add(C::DisabledAt.is_null()),
        StatusFilter::Disabled => Condition::all()
            .add(C::RevokedAt.is_null())
            .add(not_expired)
            .add(C::DisabledAt.is_not_null()),
        StatusFilter::Revoked => Condition::all().add(C::RevokedAt.is_not_null()),
        StatusFilter::Expired => {
            Condition::all().add(C::RevokedAt.is_null()).add(C::ExpiresAt.lte(naive(now)))
        }
    }
}
