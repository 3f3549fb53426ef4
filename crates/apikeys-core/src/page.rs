//! Keyset pagination for listings.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::KeyId;

/// Largest page a listing returns.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// Which page of a listing to return: up to `limit` items, oldest first, after a cursor.
///
/// Keys are ordered by id (UUID v7, so by creation time). Keyset pagination stays fast and
/// stable while keys are added or removed, unlike offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    limit: u32,
    after: Option<KeyId>,
}

impl Default for Page {
    /// The first page of 100.
    fn default() -> Self {
        Self { limit: 100, after: None }
    }
}

impl Page {
    /// The first page of up to `limit` items.
    #[must_use]
    pub fn first(limit: u32) -> Self {
        Self { limit, after: None }
    }

    /// The page that starts after `cursor` (a [`KeyPage::next`] value).
    #[must_use]
    pub fn after(mut self, cursor: KeyId) -> Self {
        self.after = Some(cursor);
        self
    }

    /// The requested size, checked.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `page.limit`) unless `1 ≤ limit ≤ 1000`.
    pub fn limit(&self) -> Result<u32> {
        if (1..=MAX_PAGE_SIZE).contains(&self.limit) {
            Ok(self.limit)
        } else {
            Err(Error::invalid_input("page.limit", "must be between 1 and 1000"))
        }
    }

    /// The cursor: items strictly after this id.
    #[must_use]
    pub fn cursor(&self) -> Option<KeyId> {
        self.after
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyPage<T> {
    /// The items, oldest first.
    pub items: Vec<T>,
    /// The cursor for the next page, or `None` if this is the last one.
    pub next: Option<KeyId>,
}
