//! [`InTransaction`]: the client's writes inside a transaction the host owns.

use std::fmt;

use apikeys_core::{
    ApiKey, IssuedKey, KeyId, KeyUpdate, NewKey, OrgId, Organization, Product, ProductId, Project,
    ProjectId, Result,
};
use sea_orm::{DatabaseTransaction, TransactionTrait};

use crate::client::{ApiKeyClient, finish};
use crate::error::storage;
use crate::feed::Change;
use crate::lifecycle::{Switch, followers_on};

/// The client's writes inside a transaction the host owns, from
/// [`ApiKeyClient::with`]. Nothing is visible to others until the host commits, and
/// rolling the host's transaction back leaves nothing behind: no key, no organization.
///
/// Each call runs in a savepoint of the host's transaction: a call that fails (a taken
/// name, a missing organization, a bad input) is undone alone, and the host's transaction
/// stays usable, even on PostgreSQL, which would otherwise abort it on the first error.
///
/// **What a host transaction holds.** A call that changes what a cached key could go stale on
/// ([`update_key`](Self::update_key), [`revoke_key`](Self::revoke_key),
/// [`disable_key`](Self::disable_key), [`enable_key`](Self::enable_key),
/// [`delete_key`](Self::delete_key), and linking or unlinking a product) appends a row to the
/// change feed, and with it takes the lock of the feed's one head row, which stays held until
/// the host commits or rolls back: meanwhile every other key change on the database, by any
/// replica and for any organization, waits for it (and fails with
/// [`Error::Unavailable`](crate::Error::Unavailable) once it has waited the statement
/// timeout). Make such calls last in the host's transaction and commit soon after. Creating
/// organizations, projects, products and keys appends nothing and takes no such lock, so a
/// sign-up transaction that only creates holds up nobody's revocation. On SQLite every write
/// transaction holds the database's write lock anyway.
///
/// What a call sees and how it waits is the isolation of the host's transaction (the guide,
/// "Bootstrap and host transactions"): `get_or_create_*` finds rows other transactions committed
/// before it runs on every backend; on PostgreSQL under `REPEATABLE READ` or `SERIALIZABLE` a row
/// committed after the host's snapshot gives [`Error::Conflict`](crate::Error::Conflict) instead,
/// and the host retries its transaction.
///
/// ```
/// use apikeys_db::{ApiKeyClient, NewKey, VerifyOptions};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
/// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
/// # client.create_tables().await?;
/// // Sign-up: the customer's organization and first key, all or nothing.
/// let txn = client.begin().await?;
/// let (org, _) = client.with(&txn).get_or_create_organization("new-customer").await?;
/// let issued = client.with(&txn).create_key(org.id, NewKey::new("first key")).await?;
/// // ... the host's own statements on `txn` ...
/// txn.rollback().await?; // the sign-up failed
///
/// let gone = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await;
/// assert!(gone.is_err() && client.find_organization("new-customer").await?.is_none());
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct InTransaction<'a> {
    client: &'a ApiKeyClient,
    txn: &'a DatabaseTransaction,
}

impl fmt::Debug for InTransaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InTransaction").field("client", self.client).finish_non_exhaustive()
    }
}

impl ApiKeyClient {
    /// The client's writes inside `txn`, a transaction the host owns (from
    /// [`begin`](Self::begin), or any transaction on the same database): see
    /// [`InTransaction`].
    pub fn with<'a>(&'a self, txn: &'a DatabaseTransaction) -> InTransaction<'a> {
        InTransaction { client: self, txn }
    }
}

impl InTransaction<'_> {
    /// Runs `op` in a savepoint of the host's transaction: released when it succeeds,
    /// rolled back alone when it fails.
    async fn in_savepoint<T>(
        &self,
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<T> {
        let sp = self.txn.begin().await.map_err(storage)?;
        let result = op(&sp).await;
        finish(sp, result).await
    }

    /// Runs `op`, which makes `change`, in a savepoint that first appends the change to the
    /// feed (taking the feed's head lock until the host's transaction ends); the client's cache forgets what it touched at once and serves none of it again
    /// until its poller has seen the change committed (or rolled back).
    async fn change<T>(
        &self,
        change: Change,
        op: impl AsyncFnOnce(&DatabaseTransaction) -> Result<T>,
    ) -> Result<T> {
        let (seq, value) =
            self.in_savepoint(async |sp| self.client.recorded(sp, change, op).await).await?;
        self.client.inner.feed.pending(change, seq);
        Ok(value)
    }

    /// [`ApiKeyClient::get_or_create_organization`] in the host's transaction.
    ///
    /// # Errors
    /// As `get_or_create_organization`, and [`Error::Conflict`](crate::Error::Conflict).
    pub async fn get_or_create_organization(&self, name: &str) -> Result<(Organization, bool)> {
        self.in_savepoint(async |sp| self.client.get_or_create_organization_on(sp, name).await)
            .await
    }

    /// [`ApiKeyClient::create_organization`] in the host's transaction.
    ///
    /// # Errors
    /// As `create_organization`.
    pub async fn create_organization(&self, name: &str) -> Result<Organization> {
        self.in_savepoint(async |sp| self.client.create_organization_on(sp, name).await).await
    }

    /// [`ApiKeyClient::get_or_create_project`] in the host's transaction.
    ///
    /// # Errors
    /// As `get_or_create_project`, and [`Error::Conflict`](crate::Error::Conflict).
    pub async fn get_or_create_project(&self, org: OrgId, name: &str) -> Result<(Project, bool)> {
        self.in_savepoint(async |sp| self.client.get_or_create_child_on(sp, org, name).await).await
    }

    /// [`ApiKeyClient::get_or_create_product`] in the host's transaction.
    ///
    /// # Errors
    /// As `get_or_create_product`, and [`Error::Conflict`](crate::Error::Conflict).
    pub async fn get_or_create_product(&self, org: OrgId, name: &str) -> Result<(Product, bool)> {
        self.in_savepoint(async |sp| self.client.get_or_create_child_on(sp, org, name).await).await
    }

    /// [`ApiKeyClient::create_project`] in the host's transaction.
    ///
    /// # Errors
    /// As `create_project`.
    pub async fn create_project(&self, org: OrgId, name: &str) -> Result<Project> {
        self.in_savepoint(async |sp| self.client.create_child_on(sp, org, name).await).await
    }

    /// [`ApiKeyClient::create_product`] in the host's transaction.
    ///
    /// # Errors
    /// As `create_product`.
    pub async fn create_product(&self, org: OrgId, name: &str) -> Result<Product> {
        self.in_savepoint(async |sp| self.client.create_child_on(sp, org, name).await).await
    }

    /// [`ApiKeyClient::add_product_to_project`] in the host's transaction.
    ///
    /// # Errors
    /// As `add_product_to_project`.
    pub async fn add_product_to_project(
        &self,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        self.change(Change::Link { project, product }, async |sp| {
            self.client.add_product_to_project_on(sp, product, project).await
        })
        .await
    }

    /// [`ApiKeyClient::remove_product_from_project`] in the host's transaction.
    ///
    /// # Errors
    /// As `remove_product_from_project`.
    pub async fn remove_product_from_project(
        &self,
        product: ProductId,
        project: ProjectId,
    ) -> Result<bool> {
        self.change(Change::Link { project, product }, async |sp| {
            self.client.remove_product_from_project_on(sp, product, project).await
        })
        .await
    }

    /// [`ApiKeyClient::create_key`] in the host's transaction: the key works once the host
    /// commits, and never if it rolls back. (With the verified-key cache on, a check of the
    /// key *before* the commit finds no key and is remembered as unknown, for up to
    /// `max_staleness`: check new keys after the commit.)
    ///
    /// # Errors
    /// As `create_key`.
    pub async fn create_key(&self, org: OrgId, new_key: NewKey) -> Result<IssuedKey> {
        let prepared = self.client.prepare_key(org, new_key)?;
        self.in_savepoint(async move |sp| {
            self.client.inner.secrets.check_in(sp).await?;
            self.client.insert_key_on(sp, org, prepared).await
        })
        .await
    }

    /// [`ApiKeyClient::update_key`] in the host's transaction.
    ///
    /// # Errors
    /// As `update_key`.
    pub async fn update_key(&self, id: KeyId, update: KeyUpdate) -> Result<ApiKey> {
        let update = update.validate()?;
        if update.allowed_ips.is_some() {
            self.followers_changed(id).await?;
        }
        self.change(Change::Key(id), async move |sp| {
            self.client.update_key_on(sp, id, update).await
        })
        .await
    }

    /// [`ApiKeyClient::revoke_key`] in the host's transaction: checks keep succeeding until
    /// the host commits.
    ///
    /// # Errors
    /// As `revoke_key`.
    pub async fn revoke_key(&self, id: KeyId) -> Result<ApiKey> {
        self.change(Change::Key(id), async |sp| self.client.revoke_key_on(sp, id).await).await
    }

    /// [`ApiKeyClient::disable_key`] in the host's transaction: checks keep succeeding until
    /// the host commits.
    ///
    /// # Errors
    /// As `disable_key`.
    pub async fn disable_key(&self, id: KeyId) -> Result<ApiKey> {
        self.followers_changed(id).await?;
        self.change(Change::Key(id), async |sp| {
            self.client.switch_on(sp, id, Switch::Disable).await
        })
        .await
    }

    /// [`ApiKeyClient::enable_key`] in the host's transaction.
    ///
    /// # Errors
    /// As `enable_key`.
    pub async fn enable_key(&self, id: KeyId) -> Result<ApiKey> {
        self.followers_changed(id).await?;
        self.change(Change::Key(id), async |sp| self.client.switch_on(sp, id, Switch::Enable).await)
            .await
    }

    /// Appends a change of each key rolled into `id` that is still in its grace (they follow
    /// `id`'s disable, enable and IP allowlist), so that caches drop them too once the host
    /// commits.
    async fn followers_changed(&self, id: KeyId) -> Result<()> {
        for follower in followers_on(self.txn, id).await? {
            self.change(Change::Key(follower), async |_| Ok(())).await?;
        }
        Ok(())
    }

    /// [`ApiKeyClient::delete_key`] in the host's transaction.
    ///
    /// # Errors
    /// As `delete_key`.
    pub async fn delete_key(&self, id: KeyId) -> Result<()> {
        self.change(Change::Key(id), async |sp| self.client.delete_key_on(sp, id).await).await
    }
}
