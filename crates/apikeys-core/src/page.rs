//! Keyset pagination for listings.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use uuid::Uuid;

use crate::id::KeyId;

/// Largest page a listing returns.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// Which page of a listing to return: up to `limit` items, oldest first, after a cursor (the
/// id of the previous page's last item: a key's, an organization's, a project's, ...).
///
/// Items are ordered by id (UUID v7, so by creation time). Keyset pagination stays fast and
/// stable while keys are added or removed, unlike offsets. The size is checked when the
/// page is built (and when one is deserialized), so a listing never fails for it.
///
/// ```
/// use apikeys_core::Page;
///
/// let page = Page::first(50)?;
/// assert_eq!(page.limit(), 50);
/// assert!(Page::first(0).is_err());
/// assert!(serde_json::from_str::<Page>(r#"{"limit":0,"after":null}"#).is_err());
/// # Ok::<(), apikeys_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PageFields")]
pub struct Page {
    limit: u32,
    after: Option<Uuid>,
}

/// A page as it is deserialized, before its size is checked.
#[derive(Deserialize)]
struct PageFields {
    limit: u32,
    after: Option<Uuid>,
}

impl TryFrom<PageFields> for Page {
    type Error = Error;

    fn try_from(f: PageFields) -> Result<Self> {
        Ok(Self { after: f.after, ..Page::first(f.limit)? })
    }
}

impl Default for Page {
    /// The first page of 100.
    fn default() -> Self {
        Self { limit: 100, after: None }
    }
}

impl Page {
    /// The first page of up to `limit` items.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `page.limit`) unless `1 ≤ limit ≤ 1000`.
    pub fn first(limit: u32) -> Result<Self> {
        if (1..=MAX_PAGE_SIZE).contains(&limit) {
            Ok(Self { limit, after: None })
        } else {
            Err(Error::invalid_input("page.limit", "must be between 1 and 1000"))
        }
    }

    /// The page that starts after `cursor` (a [`KeyPage::next`] value: a [`KeyId`], an
    /// [`OrgId`](crate::OrgId), ...).
    #[must_use]
    pub fn after(mut self, cursor: impl Into<Uuid>) -> Self {
        self.after = Some(cursor.into());
        self
    }

    /// The page size: between 1 and [`MAX_PAGE_SIZE`].
    #[must_use]
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The cursor: items strictly after this id.
    #[must_use]
    pub fn cursor(&self) -> Option<Uuid> {
        self.after
    }
}

/// One page of a listing: of keys (the default), or of records whose ids are `C`
/// (organizations, projects, products, audit events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct KeyPage<T, C = KeyId> {
    /// The items, oldest first.
    pub items: Vec<T>,
    /// The cursor for the next page (the id of this page's last item), or `None` if this is
    /// the last one.
    pub next: Option<C>,
}
