//! The hot path: verify and validate a presented key, and their options.
//!
//! A check is the lookup (format, HMAC, one indexed read that also reads the product facts),
//! the pure decision, the rate limiter, then the usage recorder and (during a rotation) a
//! re-hash. Nothing here parses the caller's requirements: [`ValidateOptions`] did that when
//! it was built.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

#[cfg(doc)]
use apikeys_core::Error;
use apikeys_core::hazmat::{Requirements, decide};
use apikeys_core::{ApiKey, ProductId, Result, Scopes};

use crate::client::ApiKeyClient;
use crate::convert::naive;
use crate::credits::Balance;
use crate::observe::{Op, observe};
use crate::rate_limit::Taken;

/// Options of [`ApiKeyClient::verify_key`].
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    track_usage: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { track_usage: true }
    }
}

impl VerifyOptions {
    /// Usage tracking on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a successful verification adds one to `use_count` and sets `last_used_at`
    /// (default on; one atomic `UPDATE`). Turn it off for read-only checks.
    #[must_use]
    pub fn track_usage(mut self, on: bool) -> Self {
        self.track_usage = on;
        self
    }
}

/// What [`ApiKeyClient::validate_key`] requires of a key.
///
/// Build it once per route (the required scopes are parsed and checked then) and pass it by
/// reference on every request:
///
/// ```
/// use apikeys_db::{Error, ValidateOptions};
///
/// let read = ValidateOptions::new().require_scopes(["read"])?;
/// assert!(matches!(
///     ValidateOptions::new().require_scopes(["not a scope"]),
///     Err(Error::InvalidInput { field: "scopes", .. })
/// ));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    product: Option<ProductId>,
    scopes: Scopes,
    track_usage: bool,
    check_rate_limit: bool,
    cost: u32,
    credit_cost: u32,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        Self {
            product: None,
            scopes: Scopes::new(),
            track_usage: true,
            check_rate_limit: true,
            cost: 1,
            credit_cost: 1,
        }
    }
}

impl ValidateOptions {
    /// No product, no scopes; usage tracking and rate limit on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The key must be valid for this product (org-wide, linked project, or the product's own
    /// key, of the product's organization).
    #[must_use]
    pub fn for_product(mut self, product: ProductId) -> Self {
        self.product = Some(product);
        self
    }

    /// The key must hold every one of these scopes (replacing any required before).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `scopes`) for a malformed or repeated scope, or more
    /// than [`MAX_SCOPES`](crate::core::limits::MAX_SCOPES).
    pub fn require_scopes<I, S>(mut self, scopes: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes = Scopes::parse(scopes)?;
        Ok(self)
    }

    /// The key must hold every scope of this set (already checked when it was parsed).
    #[must_use]
    pub fn require(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// Whether a successful validation counts as a use (default on).
    #[must_use]
    pub fn track_usage(mut self, on: bool) -> Self {
        self.track_usage = on;
        self
    }

    /// What this request costs (default 1): the units it takes from the key's rate limit,
    /// and the credits it spends, for an endpoint that costs more than others. Sets both;
    /// [`credit_cost`](Self::credit_cost) after it sets the credits apart.
    ///
    /// All or nothing: a request is admitted only if the limit's window has `cost` units
    /// left *and* the credits cover it; a request refused by either spends nothing. A cost
    /// above the key's limit is never admitted ([`Error::Quota`]). Zero counts nothing and
    /// checks neither.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Credits, Error, NewKey, RateLimit, ValidateOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let new = NewKey::new("ci").with_rate_limit(RateLimit::per_hour(10)?);
    /// let key = client.create_key(org.id, new.with_credits(Credits::new(12))).await?.key;
    /// let search = ValidateOptions::new().cost(5);
    /// client.validate_key(key.expose_secret(), &search).await?; // 5 of 10, 7 credits left
    /// client.validate_key(key.expose_secret(), &search).await?; // 10 of 10, 2 credits left
    /// let third = client.validate_key(key.expose_secret(), &search).await;
    /// assert!(matches!(third, Err(Error::Quota { .. })));
    /// let left = client.validate_key(key.expose_secret(), &ValidateOptions::new().cost(0)).await?;
    /// assert_eq!(left.credits.map(|c| c.remaining), Some(2), "the refused check spent none");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self.credit_cost = cost;
        self
    }

    /// How many usage credits a successful validation spends, for keys that have credits
    /// (default 1, or what [`cost`](Self::cost) set). Zero spends none and does not check
    /// the balance: for a second check of a request that was already counted.
    #[must_use]
    pub fn credit_cost(mut self, cost: u32) -> Self {
        self.credit_cost = cost;
        self
    }

    /// Whether to count this request against the key's rate limit (default on). Turn it off
    /// for trusted internal callers.
    #[must_use]
    pub fn check_rate_limit(mut self, on: bool) -> Self {
        self.check_rate_limit = on;
        self
    }
}

/// What a check does after the decision, for the keys that get so far.
struct Check<'a> {
    /// Units this request takes from the key's rate limit (0: not counted).
    rate_limit_cost: u32,
    /// Spend this many credits of a key that has them (0: none, balance unchecked).
    credit_cost: u32,
    /// Count the use.
    track_usage: bool,
    scopes: &'a Scopes,
    /// Where the request came from, for keys with an IP allowlist.
    client_ip: Option<IpAddr>,
}

/// One of the limits a check counts against.
#[derive(Clone, Copy)]
enum Limit<'a> {
    /// The key's main limit (`None`) or one of its named limits.
    Key(Option<&'a str>),
    /// A limit of the owner's plan (its row, the limit's name).
    Owner(uuid::Uuid, &'a str),
}

impl Limit<'_> {
    /// A refusal of this limit says which: its name (`owner.<name>` for an owner's), none
    /// for the key's main limit.
    fn name_refusal(self, e: apikeys_core::Error) -> apikeys_core::Error {
        let name = match self {
            Limit::Key(name) => name.map(str::to_owned),
            Limit::Owner(_, name) => Some(format!("owner.{name}")),
        };
        match e {
            apikeys_core::Error::Quota { retry_after, limit, .. } => {
                apikeys_core::Error::Quota { retry_after, limit, name }
            }
            other => other,
        }
    }
}

impl ApiKeyClient {
    /// Counts a check of `cost` units of `key` against one of its limits, from memory when
    /// the limiter can answer so; what it took joins `taken`. A refusal gives back all of
    /// `taken` first (all or nothing), and names the limit.
    async fn count(
        &self,
        key: &ApiKey,
        which: Limit<'_>,
        limit: apikeys_core::RateLimit,
        cost: NonZeroU32,
        taken: &mut Vec<Taken>,
    ) -> Result<()> {
        let limiter = &self.inner.limiter;
        let counted = match which {
            Limit::Key(name) => match limiter.check_in_memory(key, limit, cost, name) {
                Some(counted) => counted,
                None => Box::pin(limiter.check(key, limit, cost, name)).await,
            },
            Limit::Owner(row, name) => match limiter.owner_in_memory(row, name, limit, cost) {
                Some(counted) => counted,
                None => Box::pin(limiter.check_owner(key.org_id, row, name, limit, cost)).await,
            },
        };
        match counted {
            Ok(t) => {
                taken.push(t);
                Ok(())
            }
            Err(e) => {
                Box::pin(limiter.give_back_all(taken)).await;
                Err(which.name_refusal(e))
            }
        }
    }

    /// One check, as a short sequence of the client's parts: read the clock once, find the
    /// key (cache or lookup), decide, rate limit, credits, usage, re-hash.
    async fn check(
        &self,
        plaintext: &str,
        product: Option<ProductId>,
        check: Check<'_>,
    ) -> Result<ApiKey> {
        let inner = &*self.inner;
        let now = self.now();
        let found = inner.keys.find(plaintext, product).await?;
        let requirements = Requirements {
            product: found.product,
            scopes: check.scopes,
            client_ip: check.client_ip,
        };
        decide(&found.key, &requirements, now)?;
        // Each part answers from memory when it can; only what needs the database awaits,
        // boxed, so that a check answered from memory builds no database future (a large
        // one would be copied with the check's own on every call).
        // Every limit in turn (the key's main one, its named ones by name, then its owner's
        // by name), all or nothing: a limit that refuses gets back what those before it took.
        // On the heap, and only for a key with limits: a check's future stays small.
        let key = &found.key;
        let mut taken = Vec::new();
        if let Some(cost) = NonZeroU32::new(check.rate_limit_cost) {
            // Plain loops: a check's future must stay `Send` for any lifetime, which
            // iterator adapters held across its awaits would not allow.
            if let Some(limit) = key.rate_limit {
                self.count(key, Limit::Key(None), limit, cost, &mut taken).await?;
            }
            for (name, limit) in key.rate_limits.iter() {
                self.count(key, Limit::Key(Some(name)), limit, cost, &mut taken).await?;
            }
            if let Some(owner) = found.owner.as_deref() {
                for (name, limit) in owner.limits.iter() {
                    let which = Limit::Owner(owner.row, name);
                    self.count(key, which, limit, cost, &mut taken).await?;
                }
            }
        }
        // The owner's shared credits, then the key's own: a check the key's own refuse gives
        // the owner's back.
        let cost = check.credit_cost;
        let shared = match found.owner.as_deref() {
            Some(owner) if owner.credits && cost > 0 => {
                let balance = Balance::of_owner(owner);
                let spent = match inner.credits.spend_in_memory(&balance, cost) {
                    Some(left) => left.map(|(left, spent)| (Some(left), spent)),
                    None => Box::pin(inner.credits.spend(&balance, cost)).await,
                };
                match spent {
                    Ok((_, spent)) => Some((balance, spent)),
                    Err(e) => {
                        Box::pin(inner.limiter.give_back_all(&taken)).await;
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        let credits_left = match key.credits {
            Some(_) if cost > 0 => {
                let balance = Balance::of_key(key);
                let spent = match inner.credits.spend_in_memory(&balance, cost) {
                    Some(left) => left.map(|(left, _)| Some(left)),
                    None => Box::pin(inner.credits.spend(&balance, cost)).await.map(|(l, _)| l),
                };
                match spent {
                    Ok(left) => left,
                    // All or nothing: a check its credits refuse gives back its units and
                    // the owner's credits.
                    Err(e) => {
                        if let Some((balance, spent)) = shared {
                            Box::pin(inner.credits.give_back(&balance, spent, cost)).await;
                        }
                        Box::pin(inner.limiter.give_back_all(&taken)).await;
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        if check.track_usage && !inner.usage.record_in_memory(found.key.id, naive(now)) {
            Box::pin(inner.usage.record(found.key.id, naive(now))).await?;
        }
        // Nothing at all is written when tracking is off: no count, no re-hash.
        if check.track_usage
            && let Some(rehash) = found.rehash
        {
            Box::pin(inner.keys.rehash(found.key.id, rehash)).await;
        }
        let mut key = Arc::unwrap_or_clone(found.key);
        if let (Some(left), Some(credits)) = (credits_left, key.credits.as_mut()) {
            credits.remaining = left;
        }
        if check.track_usage {
            key.use_count += 1;
            key.last_used_at = Some(now);
        }
        Ok(key)
    }

    /// Checks that `plaintext` is a live key: format and checksum (offline), HMAC, one indexed
    /// lookup, then status. Returns the stored record.
    ///
    /// A key with an IP allowlist is refused here with [`Error::IpNotAllowed`]: the address
    /// is unknown. Use [`verify_key_from`](Self::verify_key_from) with the request's address.
    ///
    /// A key hashed under any signing secret the client knows (current, previous, next) is
    /// found. With usage tracking on (the default) a success adds one to `use_count` and moves
    /// `last_used_at` forward in one atomic `UPDATE`, or, with
    /// [`ClientBuilder::usage_flush_interval`](crate::ClientBuilder::usage_flush_interval), in
    /// memory until the next flush (the returned record counts this use either way); a key
    /// still under a previous secret is then re-hashed to the current one (best effort: a
    /// failed re-hash is logged, never fails the check, and is retried on the next success).
    /// With tracking off, nothing at all is written.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] (malformed or unknown: it does not say which);
    /// [`Error::Revoked`]; [`Error::Expired`]; [`Error::Disabled`]; [`Error::IpNotAllowed`];
    /// [`Error::Unavailable`]; [`Error::Storage`].
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, VerifyOptions, Error};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let issued = client.create_key(org.id, NewKey::new("ci")).await?;
    /// let key = client.verify_key(issued.key.expose_secret(), &VerifyOptions::new()).await?;
    /// assert_eq!((key.id, key.use_count), (issued.record.id, 1));
    ///
    /// let wrong = client.verify_key("sk_not-a-key", &VerifyOptions::new()).await;
    /// assert!(matches!(wrong, Err(Error::InvalidKey)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn verify_key(&self, plaintext: &str, options: &VerifyOptions) -> Result<ApiKey> {
        observe(&self.inner.metrics, Op::Verify, self.verify(plaintext, None, options)).await
    }

    /// [`verify_key`](Self::verify_key) of a request that came from `client_ip` (`None`:
    /// unknown): a key with an IP allowlist is refused with [`Error::IpNotAllowed`] unless
    /// the address is inside it.
    ///
    /// ```
    /// # use apikeys_db::{ApiKeyClient, Error, IpAllowlist, NewKey, VerifyOptions};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let office = IpAllowlist::parse(["203.0.113.0/24"])?;
    /// let issued = client.create_key(org.id, NewKey::new("ci").with_allowed_ips(office)).await?;
    /// let key = issued.key.expose_secret();
    /// let options = VerifyOptions::new();
    /// client.verify_key_from(key, Some("203.0.113.9".parse().unwrap()), &options).await?;
    /// let outside = client.verify_key_from(key, Some("198.51.100.1".parse().unwrap()), &options);
    /// assert!(matches!(outside.await, Err(Error::IpNotAllowed { .. })));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// Those of `verify_key`.
    pub async fn verify_key_from(
        &self,
        plaintext: &str,
        client_ip: Option<IpAddr>,
        options: &VerifyOptions,
    ) -> Result<ApiKey> {
        observe(&self.inner.metrics, Op::Verify, self.verify(plaintext, client_ip, options)).await
    }

    async fn verify(
        &self,
        plaintext: &str,
        client_ip: Option<IpAddr>,
        options: &VerifyOptions,
    ) -> Result<ApiKey> {
        let scopes = Scopes::new();
        let check = Check {
            rate_limit_cost: 0,
            credit_cost: 0,
            track_usage: options.track_usage,
            scopes: &scopes,
            client_ip,
        };
        self.check(plaintext, None, check).await
    }

    /// [`verify_key`](Self::verify_key) plus the request's requirements, in this order: the
    /// IP allowlist (a key with one is refused here: use
    /// [`validate_key_from`](Self::validate_key_from) with the request's address), revoked,
    /// expired, disabled, product, scopes, the key's rate limit, then its usage credits.
    /// All or nothing: a request refused by one of its rate limits or its credits spends
    /// nothing from the others (what they counted is given back right after, except in
    /// [`RateLimitMode::Local`](crate::RateLimitMode::Local), whose in-process GCRA cannot
    /// take units back). Until it is, a concurrent check may find that limit full for a
    /// moment. [`ValidateOptions::cost`] says how many units and credits a request takes.
    ///
    /// A key with usage credits spends [`ValidateOptions::credit_cost`] of them (one by
    /// default). With [`CreditMode::Exact`](crate::CreditMode::Exact) (the default) that is
    /// one atomic statement in the database, whether or not the client caches keys: every
    /// replica sees the same balance, and a key with none left is refused with
    /// [`Error::UsageExhausted`] at once, everywhere. With
    /// [`CreditMode::Leased`](crate::CreditMode::Leased) the credits come from a block
    /// reserved ahead, in memory: never more than the balance is spent across replicas, and
    /// a replica refuses once the balance and the blocks it holds are spent. `verify_key`
    /// neither spends nor checks credits.
    ///
    /// A key deleted while the call runs gives [`Error::InvalidKey`] (or `Ok`, when the
    /// deletion lands after the call's last read); never [`Error::Storage`].
    ///
    /// # Errors
    /// Those of `verify_key`, and [`Error::ProductNotAllowed`],
    /// [`Error::InsufficientScope`] (with the missing scopes), [`Error::Quota`] (with
    /// `retry_after`), [`Error::UsageExhausted`] (with the next refill, if any).
    ///
    /// # Examples
    /// ```
    /// # use apikeys_db::{ApiKeyClient, NewKey, RateLimit, ValidateOptions, Error};
    /// # #[tokio::main]
    /// # async fn main() -> apikeys_db::Result<()> {
    /// # let client = ApiKeyClient::builder().database_url("sqlite::memory:")
    /// #     .signing_secret("a-signing-secret-of-at-least-32-bytes!!").build().await?;
    /// # client.create_tables().await?;
    /// # let (org, _) = client.get_or_create_organization("acme").await?;
    /// let (api, _) = client.get_or_create_product(org.id, "public-api").await?;
    /// let new = NewKey::new("ci").with_scopes(["read"]).with_rate_limit(RateLimit::per_hour(1)?);
    /// let key = client.create_key(org.id, new).await?.key;
    ///
    /// // Once per route, reused for every request.
    /// let route = ValidateOptions::new().for_product(api.id).require_scopes(["read"])?;
    /// client.validate_key(key.expose_secret(), &route).await?;
    /// match client.validate_key(key.expose_secret(), &route).await {
    ///     Err(Error::Quota { retry_after, .. }) => assert!(retry_after.as_secs() <= 3600),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn validate_key(&self, plaintext: &str, options: &ValidateOptions) -> Result<ApiKey> {
        observe(&self.inner.metrics, Op::Validate, self.validate(plaintext, None, options)).await
    }

    /// [`validate_key`](Self::validate_key) of a request that came from `client_ip` (`None`:
    /// unknown). A key with an IP allowlist is refused with [`Error::IpNotAllowed`] unless
    /// the address is inside it, before its rate limit and credits are counted.
    ///
    /// # Errors
    /// Those of `validate_key`.
    pub async fn validate_key_from(
        &self,
        plaintext: &str,
        client_ip: Option<IpAddr>,
        options: &ValidateOptions,
    ) -> Result<ApiKey> {
        let check = self.validate(plaintext, client_ip, options);
        observe(&self.inner.metrics, Op::Validate, check).await
    }

    async fn validate(
        &self,
        plaintext: &str,
        client_ip: Option<IpAddr>,
        options: &ValidateOptions,
    ) -> Result<ApiKey> {
        let check = Check {
            rate_limit_cost: if options.check_rate_limit { options.cost } else { 0 },
            credit_cost: options.credit_cost,
            track_usage: options.track_usage,
            scopes: &options.scopes,
            client_ip,
        };
        self.check(plaintext, options.product, check).await
    }
}
