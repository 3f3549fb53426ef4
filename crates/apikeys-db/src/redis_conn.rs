//! Opening Redis, for both parts that use it: the rate limiter's windows
//! (the Redis store of `rate_limit`) and the cache's change notices. One place decides
//! what a bad URL or a refused login becomes, and that neither repeats the URL (it may hold
//! a password).

use std::time::Duration;

use apikeys_core::{Error, Result};
use redis::ErrorKind;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A call Redis did not answer within the client's statement timeout.
#[derive(Debug, thiserror::Error)]
#[error("no answer from Redis within {0:?}")]
pub(crate) struct NoAnswer(pub(crate) Duration);

/// A client for `url`, and the settings of its connections: `timeout` to connect, calls
/// answered within `response` (`None`: the caller times them itself), one retry, and
/// reconnects backing off up to `interval`.
///
/// # Errors
/// [`Error::Configuration`] for a URL that is not a Redis URL (the URL is not repeated).
pub(crate) fn client(
    url: &str,
    timeout: Duration,
    response: Option<Duration>,
    interval: Duration,
) -> Result<(redis::Client, ConnectionManagerConfig)> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::configuration(format!("invalid Redis url: {}", e.category())))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(response)
        .set_number_of_retries(1)
        .set_max_delay(interval);
    Ok((client, config))
}

/// A connection, made within `timeout`.
///
/// # Errors
/// [`Error::Configuration`] when Redis refuses the login; [`Error::Unavailable`] when it
/// cannot be reached (its source: Redis's error, or [`NoAnswer`]).
pub(crate) async fn connect(
    client: &redis::Client,
    config: &ConnectionManagerConfig,
    timeout: Duration,
) -> Result<ConnectionManager> {
    let connect = ConnectionManager::new_with_config(client.clone(), config.clone());
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) if e.kind() == ErrorKind::AuthenticationFailed => {
            Err(Error::configuration(format!("Redis refused the login: {e}")))
        }
        Ok(Err(e)) => Err(Error::unavailable(e)),
        Err(_) => Err(Error::unavailable(NoAnswer(timeout))),
    }
}
