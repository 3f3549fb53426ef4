//! [`CachedLookup`]: the key lookup with the verified-key cache in front of it, when the
//! client has one.

use std::sync::Arc;

use apikeys_core::hazmat::KeyHash;
use apikeys_core::{Error, KeyId, ProductId, Result};

use super::{CacheState, CachedKey, Lookup};
use crate::feed::Change;
use crate::lookup::{Found, KeyLookup, Rehash};

/// How many keys [`CachedLookup::warm`] reads per statement.
const WARM_PAGE: u64 = 1_000;
/// How many times [`CachedLookup::warm`] reads a page again after a change was heard
/// while it was read.
const WARM_RETRIES: u32 = 3;

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
        // The database's paths are boxed: they cost a round trip anyway, and a check answered
        // from memory then builds no database future (the future of a check stays small, and
        // shallow enough for the callers' own async fns: a deep one overflows rustc's query
        // depth limit in a host's handler).
        let found = match &self.cache {
            None => Box::pin(self.lookup.find(key, product)).await?,
            Some(cache) => {
                let hash = self.lookup.hash(key);
                match cache.lookup(&hash, product) {
                    Lookup::Hit(entry, access) => Found {
                        key: Arc::clone(&entry.key),
                        rehash: entry.rehash.clone(),
                        product: access,
                        owner: entry.owner.clone(),
                    },
                    Lookup::Unknown => return Err(Error::InvalidKey),
                    Lookup::Miss => Box::pin(self.miss(cache, &hash, key, product)).await?,
                    // A key the cache holds while it is not serving: read at once (the pool
                    // bounds it).
                    Lookup::Bypass => {
                        Box::pin(self.find_and_cache(cache, &hash, key, product)).await?
                    }
                }
            }
        };
        // The check's span (see `observe`) names the key found, whatever the outcome.
        tracing::Span::current()
            .record("key_id", tracing::field::display(found.key.id))
            .record("org_id", tracing::field::display(found.key.org_id));
        Ok(found)
    }

    /// A key the cache does not know: waits for a turn to read the database (see
    /// [`KeyCache::max_concurrent_misses`]), then reads it and caches what was read.
    ///
    /// [`KeyCache::max_concurrent_misses`]: crate::KeyCache::max_concurrent_misses
    async fn miss(
        &self,
        cache: &CacheState,
        hash: &KeyHash,
        key: &str,
        product: Option<ProductId>,
    ) -> Result<Found> {
        let _turn = cache.miss_permit().await?;
        self.find_and_cache(cache, hash, key, product).await
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
                let entry = CachedKey::new(
                    Arc::clone(&found.key),
                    found.rehash.clone(),
                    found.owner.clone(),
                );
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

    /// Loads the keys that are neither revoked nor expired at `now` into the cache, a page
    /// of [`WARM_PAGE`] at a time in id order, once the cache's poller has taken its place
    /// in the feed; returns how many it loaded. It stops when the cache's room is taken or
    /// an insert evicts a key (so warming never swaps out keys in use). Keys whose stored
    /// hash is under a previous signing secret are left out (a check re-hashes them).
    ///
    /// Each page is inserted under the generation read before the page was, like a miss: a
    /// change heard while the page was read keeps its keys out, and the page is read again
    /// (up to [`WARM_RETRIES`] times), so nothing older than the change is ever served.
    pub(crate) async fn warm(&self, now: chrono::DateTime<chrono::Utc>) -> Result<usize> {
        let Some(cache) = &self.cache else {
            return Err(Error::configuration(
                "warm_cache needs the verified-key cache: configure it with ClientBuilder::cache",
            ));
        };
        // What is cached before the first poll is emptied by it.
        cache.positioned().await?;
        let mut loaded = std::collections::HashSet::new();
        let (mut room, mut after, mut retries) = (cache.room(), None, 0);
        loop {
            let (generation, room_before) = (cache.generation(), room);
            let page = self.lookup.live_page(after, now, WARM_PAGE).await?;
            let full_page = page.len() as u64 == WARM_PAGE;
            let mut last = after;
            for (hash, key, owner) in page {
                last = Some(key.id);
                let Some(hash) = hash else { continue };
                let (id, entry) = (key.id, CachedKey::new(Arc::new(key), None, owner));
                if entry.weight > room {
                    return Ok(loaded.len());
                }
                room -= entry.weight;
                let inserted = cache.insert_by_hash(hash, entry, None, generation);
                if !inserted.kept {
                    break;
                }
                loaded.insert(id);
                if !inserted.evicted.is_empty() {
                    for id in &inserted.evicted {
                        loaded.remove(id);
                    }
                    return Ok(loaded.len());
                }
            }
            if cache.generation() != generation && retries < WARM_RETRIES {
                // A change was heard while this page was read: read it again.
                retries += 1;
                room = room_before;
                continue;
            }
            retries = 0;
            after = last;
            if !full_page {
                return Ok(loaded.len());
            }
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
