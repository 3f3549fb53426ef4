//! [`CachedLookup`]: the key lookup with the verified-key cache in front of it, when the
//! client has one.

use std::sync::Arc;

use apikeys_core::hazmat::KeyHash;
use apikeys_core::{Error, KeyId, ProductId, Result};

use super::{CacheState, CachedKey, Lookup};
use crate::feed::Change;
use crate::lookup::{Found, KeyLookup, Rehash};

/// Finds presented keys: in the cache when there is one and it can answer, else in the
/// database through the [`KeyLookup`] (and then caches what was read).
pub(crate) struct CachedLookup {
    lookup: KeyLookup,
    cache: Option<Arc<CacheState>>,
}

impl CachedLookup {
    pub(crate) fn new(lookup: KeyLookup, cache: Option<Arc<CacheState>>) -> Self {
        Self { lookup, cache }
    }

    /// The cache, when the client has one.
    pub(crate) fn cache(&self) -> Option<&Arc<CacheState>> {
        self.cache.as_ref()
    }

    /// Parses, hashes and finds a presented key: in the verified-key cache when there is
    /// one, else (or on a miss) with one indexed read.
    pub(crate) async fn find(&self, plaintext: &str, product: Option<ProductId>) -> Result<Found> {
        let key = self.lookup.parse(plaintext)?;
        let found = match &self.cache {
            // The database's paths are boxed: they cost a round trip anyway, and the future of a
            // check stays shallow enough for the callers' own async fns (a deep one overflows
            // rustc's query depth limit in a host's handler).
            None => Box::pin(self.lookup.find(key, product)).await?,
            Some(cache) => self.find_cached(cache, key, product).await?,
        };
        // The check's span (see `observe`) names the key found, whatever the outcome.
        tracing::Span::current()
            .record("key_id", tracing::field::display(found.key.id))
            .record("org_id", tracing::field::display(found.key.org_id));
        Ok(found)
    }

    /// The cache's answer, or the database's (which is then cached). Keys not in the cache
    /// wait for a turn to read the database (see [`KeyCache::max_concurrent_misses`]); keys in
    /// it, while it is not serving, read the database without one.
    ///
    /// [`KeyCache::max_concurrent_misses`]: crate::KeyCache::max_concurrent_misses
    async fn find_cached(
        &self,
        cache: &CacheState,
        key: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let hash = self.lookup.hash(key);
        match cache.lookup(&hash, product) {
            Lookup::Hit(entry, access) => Ok(Found {
                key: Arc::clone(&entry.key),
                rehash: entry.rehash.clone(),
                product: access,
            }),
            Lookup::Unknown => Err(Error::InvalidKey),
            Lookup::Miss => {
                let _turn = cache.miss_permit().await?;
                Box::pin(self.find_and_cache(cache, &hash, key, product)).await
            }
            // A key the cache holds while it is not serving: read at once (the pool bounds it).
            Lookup::Bypass => Box::pin(self.find_and_cache(cache, &hash, key, product)).await,
        }
    }

    /// Reads a key from the database and caches what was read (or that it does not exist).
    async fn find_and_cache(
        &self,
        cache: &CacheState,
        hash: &KeyHash,
        key: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let generation = cache.generation();
        match self.lookup.find(key, product).await {
            Ok(found) => {
                let entry = CachedKey::new(Arc::clone(&found.key), found.rehash.clone());
                cache.insert(hash, entry, found.product, generation);
                Ok(found)
            }
            Err(Error::InvalidKey) => {
                cache.insert_unknown(hash, generation);
                Err(Error::InvalidKey)
            }
            Err(e) => Err(e),
        }
    }

    /// Moves a key's hash to the current secret (see [`KeyLookup::rehash`]). The cached
    /// entry says a re-hash is due: it is dropped either way, so the next check reads the
    /// row as it now is.
    pub(crate) async fn rehash(&self, id: KeyId, rehash: Rehash) {
        self.lookup.rehash(id, rehash).await;
        if let Some(cache) = &self.cache {
            cache.forget(Change::Key(id));
        }
    }
}
