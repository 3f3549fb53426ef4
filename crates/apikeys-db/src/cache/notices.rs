//! Change notices through Redis ([`ClientBuilder::invalidation_through_redis`]): a client
//! publishes a notice on Redis once a change of its own has committed, and every other
//! client's cache polls the change feed as soon as one arrives, instead of at its next tick.
//!
//! # The feed stays the guarantee
//! A notice carries nothing but who sent it: the poll it starts reads the feed, as every
//! tick does. A notice lost (Redis down, a subscriber reconnecting, a publish that timed out)
//! costs nothing but the head start; the timer's polls go on, so `max_staleness` holds
//! whether Redis is there or not, and no check ever waits for Redis. A change made in a
//! transaction the host owns (the `_on` variants) is not announced: the client cannot tell
//! when the host commits; the feed brings it.
//!
//! # Spaced polls
//! Notices that arrive while a poll is due are one poll; a poll a notice starts waits until
//! [`WAKE_GAP`](super::poll::WAKE_GAP) after the one before, so a storm of changes adds at most one feed read per
//! `WAKE_GAP` per replica.
//!
//! [`ClientBuilder::invalidation_through_redis`]: crate::ClientBuilder::invalidation_through_redis

use std::sync::{Arc, Weak};
use std::time::Duration;

use apikeys_core::{Error, Result};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{Notify, mpsc};

use super::CacheState;
use crate::redis_conn::{self, NoAnswer};

/// The channel clients publish their notices on and listen to, unless told another.
pub(crate) const CHANNEL: &str = "apikeys:changes";

/// How often a subscriber pings Redis: a connection that went silent without a reset is
/// replaced after at most this plus the timeout.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The sending side, held by the change feed: [`announce`](Self::announce) after each
/// change of the client's own has ended.
#[derive(Debug)]
pub(crate) struct Notices {
    /// One slot: announcements made while a publish is under way become one more publish.
    due: mpsc::Sender<()>,
}

impl Notices {
    /// Opens Redis at `url` for notices: a background task publishes them (each with
    /// `timeout`), and, when `wake` is given (the client has a cache), another listens to
    /// the others' and wakes the poller. Redis need not be reachable now: both tasks retry
    /// every `interval`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a URL that is not a Redis URL (the URL is not repeated:
    /// it may hold a password), or a password Redis refuses.
    pub(crate) async fn start(
        url: &str,
        channel: String,
        timeout: Duration,
        interval: Duration,
        runtime: &tokio::runtime::Handle,
        wake: Option<Weak<CacheState>>,
    ) -> Result<Self> {
        let (client, config) = redis_conn::client(url, timeout, Some(timeout), interval)?;
        let conn = match redis_conn::connect(&client, &config, timeout).await {
            Ok(conn) => conn,
            Err(e @ Error::Configuration { .. }) => return Err(e),
            Err(e) => {
                let error = std::error::Error::source(&e)
                    .map_or_else(|| e.to_string(), ToString::to_string);
                tracing::warn!(
                    %error,
                    "change notices: Redis cannot be reached; changes reach other replicas \
                     through the change feed's polls meanwhile"
                );
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map_err(|e| Error::configuration(format!("Redis: {}", e.category())))?
            }
        };
        let sender = uuid::Uuid::new_v4().simple().to_string();
        let (due, pending) = mpsc::channel(1);
        let to = Target { channel: Arc::from(channel), sender: Arc::from(sender), timeout };
        if let Some(cache) = wake {
            runtime.spawn(listen(client.clone(), cache, to.clone(), interval));
        }
        runtime.spawn(publish(client, config, conn, pending, to));
        Ok(Self { due })
    }

    /// A change of this client's own has ended: tell the others (in the background; a
    /// notice already due covers this one too).
    pub(crate) fn announce(&self) {
        // Full: a publish is due already, and it is sent after this change ended.
        let _ = self.due.try_send(());
    }
}

/// Where notices go and who sends them.
#[derive(Clone, Debug)]
struct Target {
    channel: Arc<str>,
    /// This client's id, the payload of its notices: it does not wake itself.
    sender: Arc<str>,
    /// Each call's.
    timeout: Duration,
}

/// Publishes one notice per announcement (several waiting make one), until the client is
/// dropped. A publish that fails or goes unanswered replaces the connection (a connection
/// gone silent, or one whose reconnect failed while Redis was away, would otherwise lose
/// the next notices too) and is tried once more on the new one: a notice sent twice costs
/// one poll more.
async fn publish(
    client: redis::Client,
    config: ConnectionManagerConfig,
    mut conn: ConnectionManager,
    mut due: mpsc::Receiver<()>,
    to: Target,
) {
    let mut failing = false;
    while due.recv().await.is_some() {
        let mut error = None;
        for attempt in 0..2 {
            if attempt > 0 {
                match ConnectionManager::new_lazy_with_config(client.clone(), config.clone()) {
                    Ok(fresh) => conn = fresh,
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&*to.channel).arg(&*to.sender);
            match tokio::time::timeout(to.timeout, cmd.query_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {
                    error = None;
                    break;
                }
                Ok(Err(e)) => error = Some(e.to_string()),
                Err(_) => error = Some(NoAnswer(to.timeout).to_string()),
            }
        }
        match error {
            None if failing => {
                tracing::info!("change notices: publishing on Redis again");
                failing = false;
            }
            Some(error) if !failing => {
                failing = true;
                tracing::warn!(
                    %error,
                    "change notices: publishing on Redis failed; other replicas see changes at \
                     their next poll"
                );
            }
            _ => {}
        }
    }
}

/// Listens to the notices of other clients and wakes `cache`'s poller at each, until the
/// cache is dropped; reconnects every `interval` while Redis cannot be reached.
async fn listen(client: redis::Client, cache: Weak<CacheState>, to: Target, interval: Duration) {
    let Some(wake) = cache.upgrade().map(|c| Arc::clone(&c.wake)) else { return };
    let mut failing = false;
    let mut first = true;
    loop {
        if cache.strong_count() == 0 {
            return;
        }
        let catch_up = !first;
        first = false;
        match subscribe(&client, &to).await {
            Ok((sink, stream)) => {
                if failing {
                    tracing::info!("change notices: listening on Redis again");
                    failing = false;
                }
                // Notices may have been missed while not listening: one poll catches up.
                if catch_up {
                    wake.notify_one();
                }
                if !relay(sink, stream, &cache, &wake, &to).await {
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    failing = true;
                    tracing::warn!(error = %e, "change notices: cannot listen on Redis; this replica sees other replicas' changes at its polls");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// A subscription to the channel.
async fn subscribe(
    client: &redis::Client,
    to: &Target,
) -> std::result::Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), String> {
    let connect = async {
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(&*to.channel).await?;
        Ok::<_, redis::RedisError>((sink, stream))
    };
    match tokio::time::timeout(to.timeout, connect).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(NoAnswer(to.timeout).to_string()),
    }
}

/// Wakes the poller at each notice not sent by this client, until the connection ends or
/// stops answering pings (`true`: reconnect) or the cache is dropped (`false`).
async fn relay(
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
    cache: &Weak<CacheState>,
    wake: &Notify,
    to: &Target,
) -> bool {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => {
                    if msg.get_payload_bytes() != to.sender.as_bytes() {
                        wake.notify_one();
                    }
                }
                None => {
                    tracing::warn!("change notices: the connection to Redis ended; reconnecting");
                    return true;
                }
            },
            _ = heartbeat.tick() => {
                if cache.strong_count() == 0 {
                    return false;
                }
                let ping = tokio::time::timeout(to.timeout, sink.ping::<redis::Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    tracing::warn!("change notices: Redis did not answer a ping; reconnecting");
                    return true;
                }
            }
        }
    }
}
