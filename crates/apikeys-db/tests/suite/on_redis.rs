//! Shared rate limits counted in Redis (`ClientBuilder::redis`), beyond the SQL cases the
//! suite runs again on Redis (`redis_tests!` in main.rs): windows by Redis's clock whatever
//! the clients' clocks, failing closed while Redis is out of reach and recovering after,
//! and a Redis URL's password never printed.

use std::net::ToSocketAddrs;
use std::time::Duration;

use apikeys_db::{ApiKeyClient, Error, NewKey, RateLimit, RateLimitMode, ValidateOptions};
use apikeys_testing::proxy::{Chaos, Mode, Proxy};
use apikeys_testing::{SECRET, TestDb};
use chrono::{TimeDelta, Utc};

type RedisConn = ::redis::aio::MultiplexedConnection;

async fn redis_conn(url: &str) -> RedisConn {
    let client = ::redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Redis's clock, in Unix milliseconds.
async fn redis_now_ms(conn: &mut RedisConn) -> i64 {
    let (s, us): (i64, i64) = ::redis::cmd("TIME").query_async(conn).await.unwrap();
    s * 1_000 + us / 1_000
}

async fn limited_key(client: &ApiKeyClient, name: &str, limit: RateLimit) -> String {
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new(name).with_rate_limit(limit);
    client.create_key(org.id, new).await.unwrap().key.expose_secret().to_owned()
}

/// Whether a check was admitted; a refusal must be `Quota`.
async fn admitted(client: &ApiKeyClient, key: &str) -> bool {
    match client.validate_key(key, &ValidateOptions::new()).await {
        Ok(_) => true,
        Err(Error::Quota { .. }) => false,
        Err(e) => panic!("{e:?}"),
    }
}

/// Three replicas whose clocks are 30 s behind, right and 30 s ahead hammer a key limited to
/// 5 a second for about 1.5 s, in both shared modes: every check falls in a window of
/// Redis's clock, and across the replicas no more than 5 are admitted per window (client
/// clocks 30 s apart would each count in a window of their own: 15 a second).
pub async fn windows_by_redis_clock_under_skewed_clients(db: TestDb) {
    let url = db.redis.clone().unwrap();
    for mode in [RateLimitMode::Shared, RateLimitMode::Leased] {
        let mut clients = Vec::new();
        for skew in [-30, 0, 30] {
            let skew = TimeDelta::seconds(skew);
            let b = |b: apikeys_db::ClientBuilder| {
                b.clock(move || Utc::now() + skew).rate_limit_mode(mode)
            };
            clients.push(db.client_with(b).await);
        }
        let key =
            limited_key(&clients[0], &format!("{mode:?}"), RateLimit::per_second(5).unwrap()).await;
        let start = redis_now_ms(&mut redis_conn(&url).await).await;
        let mut tasks = Vec::new();
        for client in &clients {
            for _ in 0..2 {
                let (client, key, url) = (client.clone(), key.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let mut conn = redis_conn(&url).await;
                    // (window of the check, admitted): only checks whose readings of Redis's
                    // clock before and after fall in one second are placed in it.
                    let mut seen = Vec::new();
                    while redis_now_ms(&mut conn).await < start + 1_500 {
                        let before = redis_now_ms(&mut conn).await;
                        let ok = admitted(&client, &key).await;
                        let after = redis_now_ms(&mut conn).await;
                        seen.push((before / 1_000, after / 1_000, ok));
                    }
                    seen
                }));
            }
        }
        let mut per_window = std::collections::BTreeMap::<i64, u32>::new();
        let (mut placed, mut total) = (0, 0);
        for t in tasks {
            for (before, after, ok) in t.await.unwrap() {
                total += u32::from(ok);
                if before == after && ok {
                    *per_window.entry(before).or_default() += 1;
                    placed += 1;
                }
            }
        }
        for (window, n) in &per_window {
            assert!(*n <= 5, "{mode:?}: {n} admitted in the second {window} of Redis's clock");
        }
        // At most three windows were touched in 1.5 s: never more than 3 limits.
        assert!(total <= 15, "{mode:?}: {total} admitted");
        assert!(placed > 0, "{mode:?}: no admitted check could be placed: {per_window:?}");
        for c in clients {
            c.shutdown().await.unwrap();
        }
    }
}

/// A proxy in front of the Redis at `url`, starting in `mode` (faults seeded by `seed`), and
/// the URL that goes through it.
async fn proxied(url: &str, mode: Mode, seed: u64) -> (Proxy, url::Url) {
    let parsed = url::Url::parse(url).unwrap();
    let upstream = (parsed.host_str().unwrap(), parsed.port().unwrap_or(6379))
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(upstream, mode, Chaos::default(), seed).await.unwrap();
    let mut through = parsed;
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.addr().port())).unwrap();
    (proxy, through)
}

/// Redis out of reach: a check fails with `Unavailable` (never admitted), at once once the
/// breaker is open; after Redis is back, checks are answered again, and the window never
/// admitted more than its limit across the outage.
pub async fn fails_closed_while_redis_is_out_of_reach_and_recovers(db: TestDb) {
    let url = db.redis.clone().unwrap();
    let (proxy, through) = proxied(&url, Mode::Pass, 7).await;
    let client = ApiKeyClient::builder()
        .database_url(&db.url)
        .signing_secret(SECRET)
        .redis(through.as_str())
        .statement_timeout(Duration::from_secs(1))
        .reconnect_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    client.create_tables().await.unwrap();
    let key = limited_key(&client, "outage", RateLimit::per_hour(20).unwrap()).await;
    apikeys_testing::leave_room(&client, apikeys_db::Window::Hour, Duration::from_secs(120)).await;
    let mut ok = 0;
    for _ in 0..5 {
        ok += usize::from(admitted(&client, &key).await);
    }
    assert_eq!(ok, 5);
    // Down: refused connections. Partitioned: new connections black-holed. Silent: every
    // connection goes quiet without a reset (a dead host, a moved address), then new ones
    // pass again while the old stay silent: the client must give up on those, not wait for
    // TCP.
    for (mode, name) in
        [(Mode::Down, "down"), (Mode::BlackHole, "partitioned"), (Mode::Pass, "silent")]
    {
        proxy.set_mode(mode);
        if mode == Mode::Pass {
            proxy.freeze();
        } else {
            proxy.cut();
        }
        let mut fast = 0;
        for _ in 0..5 {
            match client.validate_key(&key, &ValidateOptions::new()).await {
                Err(e @ Error::Unavailable { .. }) => {
                    let source = std::error::Error::source(&e).map(ToString::to_string);
                    fast += usize::from(source.is_some_and(|s| s.contains("failing fast")));
                }
                Ok(_) if mode == Mode::Pass => {
                    ok += 1;
                    break;
                }
                other => panic!("Redis {name}: {other:?}"),
            }
        }
        if mode == Mode::Down {
            // The breaker opened at the first refusal: the next calls did not try Redis.
            assert!(fast >= 3, "Redis down: {fast} of 5 calls failed fast");
        }
        proxy.set_mode(Mode::Pass);
        // New connections pass again; the silenced ones stay open and silent.
        proxy.thaw();
        let mut answered = false;
        for _ in 0..200 {
            match client.validate_key(&key, &ValidateOptions::new()).await {
                Ok(_) => {
                    ok += 1;
                    answered = true;
                    break;
                }
                Err(Error::Unavailable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("after Redis was {name}: {e:?}"),
            }
        }
        assert!(answered, "no answer after Redis was {name} and came back");
    }
    while admitted(&client, &key).await {
        ok += 1;
    }
    assert_eq!(ok, 20, "exactly the limit across the outages");
}

/// A Redis URL's password appears neither in the builder's Debug output nor in the error of
/// a build that cannot reach that Redis, nor in that of a malformed URL.
pub async fn redis_url_password_is_never_printed(db: TestDb) {
    let password = "redis-pass-4f1c9e";
    let unreachable = format!("redis://:{password}@127.0.0.1:1/0");
    let malformed = format!("redis://:{password}@127.0.0.1:notaport/0");
    for url in [unreachable, malformed] {
        let builder = db.builder().redis(&url).statement_timeout(Duration::from_secs(1));
        assert!(!format!("{builder:?}").contains(password), "{builder:?}");
        let e = builder.build().await.unwrap_err();
        let mut text = format!("{e} {e:?}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(!text.contains(password), "{text}");
        assert!(matches!(e, Error::Unavailable { .. } | Error::Configuration { .. }), "{e:?}");
    }
    // Local mode counts in the process: Redis has nothing to count.
    let e = db.builder().redis("redis://127.0.0.1/").rate_limit_mode(RateLimitMode::Local);
    assert!(matches!(e.build().await, Err(Error::Configuration { .. })));
}

/// The hash that counts `key`'s windows (see `rate_limit/redis.rs`).
fn hash_of(key: &apikeys_db::ApiKey) -> String {
    format!("apikeys:{{{}}}:k:{}", key.org_id, key.id)
}

/// A roll or delete made by a client that counts in Redis hands the budget on at once,
/// along any chain. A spends its 10 of 10 an hour and is rolled to B, B to C, with no check
/// in between: C is refused. Then a fresh lineage A → B → C whose newest key C spends the 10
/// and is deleted (after B, or with B left): the keys left are refused.
pub async fn lineage_holds_along_chains_of_rolls_and_deletes(db: TestDb) {
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let limit = RateLimit::per_hour(10).unwrap();
    apikeys_testing::leave_room(&client, apikeys_db::Window::Hour, Duration::from_secs(120)).await;
    let hour = Duration::from_secs(3600);
    let chain = async |spend_first: bool| {
        let a = client.create_key(org.id, NewKey::new("a").with_rate_limit(limit)).await.unwrap();
        if spend_first {
            for _ in 0..10 {
                assert!(admitted(&client, a.key.expose_secret()).await);
            }
        }
        let b = client.roll_key(a.record.id, hour).await.unwrap();
        let c = client.roll_key(b.record.id, hour).await.unwrap();
        (a, b, c)
    };
    let (_, _, c) = chain(true).await;
    assert!(!admitted(&client, c.key.expose_secret()).await, "a chain of rolls reset the budget");
    for delete_middle in [false, true] {
        let (a, b, c) = chain(false).await;
        for _ in 0..10 {
            assert!(admitted(&client, c.key.expose_secret()).await);
        }
        if delete_middle {
            client.delete_key(b.record.id).await.unwrap();
        }
        client.delete_key(c.record.id).await.unwrap();
        let left = if delete_middle { vec![&a] } else { vec![&a, &b] };
        for k in left {
            let refused = !admitted(&client, k.key.expose_secret()).await;
            assert!(refused, "delete_middle {delete_middle}: the delete reset the budget");
        }
    }
}

/// A window never goes back: when the hash already counts in a later window than Redis's
/// clock says (its clock stepped back, or a failover moved to a host whose clock is
/// behind), requests count in that later window and are refused once it is full, instead of
/// an earlier window starting afresh.
pub async fn a_window_never_goes_back_when_the_redis_clock_does(db: TestDb) {
    let url = db.redis.clone().unwrap();
    let client = db.client().await;
    let (org, _) = client.get_or_create_organization("acme").await.unwrap();
    let new = NewKey::new("stepped").with_rate_limit(RateLimit::per_minute(5).unwrap());
    let issued = client.create_key(org.id, new).await.unwrap();
    let mut conn = redis_conn(&url).await;
    let now = redis_now_ms(&mut conn).await;
    // The next minute's window, already full: as if the clock had been a minute ahead.
    let later = now - now % 60_000 + 60_000;
    let _: () = ::redis::cmd("HSET")
        .arg(hash_of(&issued.record))
        .arg("w60000")
        .arg(later)
        .arg("c60000")
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !admitted(&client, issued.key.expose_secret()).await,
        "an earlier window started afresh"
    );
}

/// A channel of the test's own: the notices of tests running beside it wake none of its
/// clients.
fn channel(name: &str) -> String {
    format!("apikeys:test:{name}:{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `n` clients listen on `channel` (a notice published before is lost).
async fn listening(url: &str, channel: &str, n: i64) {
    let mut conn = redis_conn(url).await;
    for _ in 0..500 {
        let (_, count): (String, i64) =
            ::redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut conn).await.unwrap();
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} clients never listened on {channel}");
}

/// Checks `key` on `client` until it is refused as revoked; panics after `within`.
async fn until_revoked(client: &ApiKeyClient, key: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match client.verify_key(key, &apikeys_db::VerifyOptions::new()).await {
            Ok(_) => {}
            Err(Error::Revoked { .. }) => return,
            Err(e) => panic!("{e:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "still accepted after {within:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A subscriber of the test's own: what the clients published, in Redis's order.
struct Tap {
    _sink: ::redis::aio::PubSubSink,
    stream: ::redis::aio::PubSubStream,
}

impl Tap {
    async fn on(url: &str, channel: &str) -> Tap {
        let client = ::redis::Client::open(url).unwrap();
        let (mut sink, stream) = client.get_async_pubsub().await.unwrap().split();
        sink.subscribe(channel).await.unwrap();
        Tap { _sink: sink, stream }
    }

    /// The sender of the next notice (a client's random id).
    async fn next(&mut self) -> Vec<u8> {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(20), self.stream.next()).await;
        msg.expect("no notice within 20 s")
            .expect("the tap's connection ended")
            .get_payload_bytes()
            .to_vec()
    }
}

/// Waits until `client`'s cache has counted more than `than` woken polls; returns the count.
async fn woken_beyond(client: &ApiKeyClient, than: u64) -> u64 {
    for _ in 0..2_000 {
        let now = client.cache_stats().unwrap().woken_polls;
        if now > than {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no poll woken beyond {than} within 20 s");
}

/// Invalidation through Redis: each revocation made on replica A is published once and
/// wakes replica B's poller once (counted in `woken_polls`, which nothing else on the
/// test's channel can move: the keys are issued by a client without notices), and B
/// refuses each revoked key. B's subscription outlives its heartbeat without a reconnect (a
/// reconnect wakes a poll to catch up), and B's own change does not wake B.
pub async fn change_notices_wake_other_replicas(db: TestDb) {
    let url = db.redis.clone().unwrap();
    let chan = channel("wake");
    let mut tap = Tap::on(&url, &chan).await;
    let setup = db.client().await;
    let with_notices = |b: apikeys_db::ClientBuilder| {
        b.invalidation_through_redis(&url).change_notice_channel(&chan)
    };
    let a = with_notices(db.builder()).build().await.unwrap();
    let b = with_notices(db.builder())
        .cache(apikeys_db::KeyCache::new().max_staleness(Duration::from_secs(4)))
        .reconnect_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    listening(&url, &chan, 2).await;
    let (org, _) = setup.get_or_create_organization("acme").await.unwrap();
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(setup.create_key(org.id, NewKey::new(format!("k{i}"))).await.unwrap());
    }
    for issued in &keys {
        b.verify_key(issued.key.expose_secret(), &apikeys_db::VerifyOptions::new()).await.unwrap();
    }
    assert_eq!(b.cache_stats().unwrap().woken_polls, 0, "woken before any notice");
    let mut woken = 0;
    let mut a_id = None;
    for issued in &keys {
        a.revoke_key(issued.record.id).await.unwrap();
        let sender = tap.next().await;
        assert_eq!(a_id.get_or_insert_with(|| sender.clone()), &sender, "one sender");
        woken = woken_beyond(&b, woken).await;
        until_revoked(&b, issued.key.expose_secret(), Duration::from_secs(10)).await;
    }
    // One wake per notice, each waited for before the next revocation.
    assert_eq!(woken, 5);
    // Past a heartbeat (every 5 s): the subscription was kept (a ping answer it once
    // misread made it reconnect every 5 s, and miss the notices meanwhile).
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    assert_eq!(b.cache_stats().unwrap().woken_polls, 5, "the subscription was renewed");
    // B's own change: its cache forgets at once, and its notice (seen by the tap, so
    // delivered to B's subscription too) does not wake it.
    let own = setup.create_key(org.id, NewKey::new("own")).await.unwrap();
    b.revoke_key(own.record.id).await.unwrap();
    let refused = b.verify_key(own.key.expose_secret(), &apikeys_db::VerifyOptions::new()).await;
    assert!(matches!(refused, Err(Error::Revoked { .. })), "{refused:?}");
    assert_ne!(Some(tap.next().await), a_id, "B's notice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.cache_stats().unwrap().woken_polls, 5, "B was woken by its own notice");
}

/// A lost notice costs nothing: with Redis out of reach, `build()` succeeds, changes succeed,
/// and another replica still refuses a revoked key through the change feed, with no poll
/// woken. Once Redis is back, B listens again and A's next notice reaches it; and when
/// every connection to Redis goes silent (no reset), B's heartbeat replaces its
/// subscription and A's publish replaces its connection, so notices flow again.
pub async fn lost_notices_cost_nothing(db: TestDb) {
    let url = db.redis.clone().unwrap();
    let (proxy, through) = proxied(&url, Mode::Down, 11).await;
    let chan = channel("lost");
    let mut tap = Tap::on(&url, &chan).await;
    let with_notices = |b: apikeys_db::ClientBuilder| {
        b.invalidation_through_redis(through.as_str())
            .change_notice_channel(&chan)
            .statement_timeout(Duration::from_secs(1))
            .reconnect_interval(Duration::from_millis(100))
    };
    let setup = db.client().await;
    let a = with_notices(db.builder()).build().await.unwrap();
    let bound = Duration::from_millis(400);
    let b = with_notices(db.builder())
        .cache(apikeys_db::KeyCache::new().max_staleness(bound))
        .build()
        .await
        .unwrap();
    let (org, _) = setup.get_or_create_organization("acme").await.unwrap();
    let revoke_and_refuse = async |name: &str| {
        let issued = setup.create_key(org.id, NewKey::new(name)).await.unwrap();
        b.verify_key(issued.key.expose_secret(), &apikeys_db::VerifyOptions::new()).await.unwrap();
        a.revoke_key(issued.record.id).await.unwrap();
        // The feed's bound, with room for a slow poll on a loaded machine.
        until_revoked(&b, issued.key.expose_secret(), bound * 10).await;
    };
    revoke_and_refuse("while-down").await;
    assert_eq!(b.cache_stats().unwrap().woken_polls, 0);
    // Redis back: B listens again, and wakes a poll to catch up on what it missed.
    proxy.set_mode(Mode::Pass);
    listening(&url, &chan, 2).await;
    let woken = woken_beyond(&b, 0).await;
    revoke_and_refuse("back").await;
    tap.next().await;
    let woken = woken_beyond(&b, woken).await;
    // Every connection through the proxy goes silent; new ones pass.
    proxy.freeze();
    // Each connection reads the freeze when it next wakes: let them, before new ones pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.thaw();
    // B's heartbeat (every 5 s) finds its subscription silent and replaces it.
    let woken = woken_beyond(&b, woken).await;
    // A's publish on its silent connection times out; it replaces it and publishes again.
    revoke_and_refuse("after-silence").await;
    tap.next().await;
    woken_beyond(&b, woken).await;
}

/// The notice settings: a malformed URL or an empty channel is a `Configuration` error that
/// does not print the URL's password, nor does the builder's Debug output; a channel without
/// notices is refused too.
pub async fn notice_settings_are_checked_and_never_print_the_password(db: TestDb) {
    let password = "notice-pass-9d2e";
    let malformed = format!("redis://:{password}@127.0.0.1:notaport/0");
    let builder = db.builder().invalidation_through_redis(&malformed);
    assert!(!format!("{builder:?}").contains(password), "{builder:?}");
    let e = builder.build().await.unwrap_err();
    assert!(matches!(e, Error::Configuration { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains(password), "{e:?}");
    let url = db.redis.clone().unwrap();
    let empty = db.builder().invalidation_through_redis(&url).change_notice_channel("");
    assert!(matches!(empty.build().await, Err(Error::Configuration { .. })));
    let alone = db.builder().change_notice_channel("x");
    assert!(matches!(alone.build().await, Err(Error::Configuration { .. })));
}
