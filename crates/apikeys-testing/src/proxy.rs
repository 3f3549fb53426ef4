//! A fault-injecting TCP proxy on loopback: the soak's replicas, and the partition tests,
//! reach the database only through it.
//!
//! Every accepted connection gets one [`Fault`], chosen by the proxy's [`Mode`]: in
//! [`Mode::Chaos`] drawn from a seeded generator ([`Chaos::draw`]), so a run's schedule of
//! faults is the seed's; otherwise the mode's own. On top of that the whole proxy can be
//! told to [`cut`](Proxy::cut) every open connection (as a restarted server or a reset
//! network does), or to [`freeze`](Proxy::freeze) them (a partition: nothing passes, nothing
//! closes) until the next cut.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything.
    Pass,
    /// Forwards everything, each chunk after `ms` milliseconds (both ways).
    Delay {
        /// The wait before each chunk.
        ms: u64,
    },
    /// Forwards `bytes` bytes (both ways together), then closes both sides mid-stream.
    DropAfter {
        /// The bytes that pass before the cut.
        bytes: u64,
    },
    /// Accepts the connection and closes it at once, before anything reaches the server.
    Refuse,
    /// Forwards `bytes` bytes (both ways together), then forwards nothing more and closes
    /// nothing: the peer waits until its own time limit (or the next [`Proxy::cut`]).
    BlackHoleAfter {
        /// The bytes that pass before the connection goes silent.
        bytes: u64,
    },
}

impl Fault {
    /// The fault's kind, for counting.
    #[must_use]
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Delay { .. } => "delay",
            Fault::DropAfter { .. } => "drop",
            Fault::Refuse => "refuse",
            Fault::BlackHoleAfter { .. } => "black_hole",
        }
    }
}

/// How the proxy chooses each new connection's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// [`Fault::Pass`] for every connection.
    Pass,
    /// A fault drawn from the seeded schedule ([`Chaos::draw`]).
    Chaos,
    /// [`Fault::Refuse`] for every connection: the server looks down.
    Down,
    /// [`Fault::BlackHoleAfter`] `0` for every connection: a partition.
    BlackHole,
}

/// The odds of each fault in [`Mode::Chaos`] (the rest pass).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chaos {
    /// Odds of [`Fault::Delay`] (1–40 ms a chunk).
    pub delay: f64,
    /// Odds of [`Fault::DropAfter`] (after 0 to 256 KiB, log-uniform).
    pub drop: f64,
    /// Odds of [`Fault::Refuse`].
    pub refuse: f64,
    /// Odds of [`Fault::BlackHoleAfter`] (after 0 to 64 KiB, log-uniform).
    pub black_hole: f64,
}

impl Default for Chaos {
    /// A schedule under which most connections still work: 20 % delayed, 25 % cut
    /// mid-stream, 10 % refused, 5 % black-holed.
    fn default() -> Self {
        Chaos { delay: 0.20, drop: 0.25, refuse: 0.10, black_hole: 0.05 }
    }
}

impl Chaos {
    /// The next connection's fault, from `rng`: the same generator state gives the same fault.
    pub fn draw(&self, rng: &mut impl Rng) -> Fault {
        let x: f64 = rng.random();
        let mut edge = self.delay;
        if x < edge {
            return Fault::Delay { ms: rng.random_range(1..=40) };
        }
        edge += self.drop;
        if x < edge {
            return Fault::DropAfter { bytes: log_uniform(rng, 256 * 1024) };
        }
        edge += self.refuse;
        if x < edge {
            return Fault::Refuse;
        }
        edge += self.black_hole;
        if x < edge {
            return Fault::BlackHoleAfter { bytes: log_uniform(rng, 64 * 1024) };
        }
        Fault::Pass
    }
}

/// A byte count between 0 and `max`, each power of two about as likely as the next (so that
/// cuts land in handshakes as often as in long results).
fn log_uniform(rng: &mut impl Rng, max: u64) -> u64 {
    let bits = rng.random_range(0..=u64::BITS - max.leading_zeros());
    if bits == 0 { 0 } else { rng.random_range(0..(1u64 << bits)).min(max) }
}

/// One connection the proxy accepted: when (milliseconds since the Unix epoch, the host's
/// clock), its number and its fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// When it was accepted.
    pub at_ms: i64,
    /// Its number, from 0.
    pub n: u64,
    /// What the proxy did to it.
    pub fault: Fault,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    chaos: Chaos,
    rng: Mutex<Xoshiro256PlusPlus>,
    accepted: Mutex<Vec<Accepted>>,
    /// Bumped by [`Proxy::cut`]: every connection task ends, closing both of its sockets.
    cut: watch::Sender<u64>,
    /// `true` while [`Proxy::freeze`] holds every open connection silent.
    frozen: watch::Sender<bool>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The proxy: listening on an ephemeral loopback port until dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("upstream", &self.upstream)
            .field("mode", &*locked(&self.mode))
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`, starting in `mode`; the faults
    /// of [`Mode::Chaos`] are drawn by `chaos` from a generator seeded with `seed`.
    ///
    /// # Errors
    /// If the listener cannot be bound.
    pub async fn start(
        upstream: SocketAddr,
        mode: Mode,
        chaos: Chaos,
        seed: u64,
    ) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(mode),
            chaos,
            rng: Mutex::new(Xoshiro256PlusPlus::seed_from_u64(seed)),
            accepted: Mutex::new(Vec::new()),
            cut: watch::channel(0).0,
            frozen: watch::channel(false).0,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Proxy { addr, shared, accept })
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets how new connections are treated (open ones keep their fault).
    pub fn set_mode(&self, mode: Mode) {
        *locked(&self.shared.mode) = mode;
    }

    /// Closes every open connection now (both sides), and ends a [`freeze`](Self::freeze).
    pub fn cut(&self) {
        self.shared.frozen.send_replace(false);
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Every open connection stops forwarding, without closing, until the next
    /// [`cut`](Self::cut); so do connections accepted until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Ends a [`freeze`](Self::freeze) for the connections accepted from now on; those it
    /// silenced stay silent, open, until the next [`cut`](Self::cut): a dead host or a
    /// moved address that sent no reset, beside a path that works again.
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Every connection accepted so far, in order.
    #[must_use]
    pub fn accepted(&self) -> Vec<Accepted> {
        locked(&self.shared.accepted).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut.send_modify(|n| *n += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut n = 0;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let fault = match *locked(&shared.mode) {
            Mode::Pass => Fault::Pass,
            Mode::Down => Fault::Refuse,
            Mode::BlackHole => Fault::BlackHoleAfter { bytes: 0 },
            Mode::Chaos => shared.chaos.draw(&mut *locked(&shared.rng)),
        };
        let at_ms = chrono::Utc::now().timestamp_millis();
        locked(&shared.accepted).push(Accepted { at_ms, n, fault });
        n += 1;
        let (cut, frozen) = (shared.cut.subscribe(), shared.frozen.subscribe());
        tokio::spawn(serve(client, shared.upstream, fault, cut, frozen));
    }
}

/// One connection, until either side closes, its fault ends it, or the proxy cuts it.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    mut cut: watch::Receiver<u64>,
    mut frozen: watch::Receiver<bool>,
) {
    if fault == Fault::Refuse {
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let budget = match fault {
        Fault::DropAfter { bytes } | Fault::BlackHoleAfter { bytes } => bytes,
        _ => u64::MAX,
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut passed = 0u64;
    let silent = loop {
        let frozen_now = *frozen.borrow_and_update();
        if passed >= budget || frozen_now {
            // A drop closes; a black hole (or a freeze) goes silent.
            break frozen_now || !matches!(fault, Fault::DropAfter { .. });
        }
        let (n, to_server) = tokio::select! {
            biased;
            _ = cut.changed() => return,
            _ = frozen.changed() => continue,
            r = cr.read(&mut up) => match r { Ok(0) | Err(_) => return, Ok(n) => (n, true) },
            r = sr.read(&mut down) => match r { Ok(0) | Err(_) => return, Ok(n) => (n, false) },
        };
        if let Fault::Delay { ms } = fault {
            tokio::select! {
                _ = cut.changed() => return,
                () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            }
        }
        let allowed = usize::try_from(budget - passed).map_or(n, |left| left.min(n));
        let write = async {
            if to_server {
                sw.write_all(&up[..allowed]).await
            } else {
                cw.write_all(&down[..allowed]).await
            }
        };
        // A cut also ends a write blocked on a full buffer.
        let written = tokio::select! {
            biased;
            _ = cut.changed() => return,
            w = write => w,
        };
        if written.is_err() {
            return;
        }
        passed += allowed as u64;
    };
    if !silent {
        return;
    }
    // Silent: the client's bytes are read and dropped (so that it is never blocked on a full
    // buffer, as on a network that lost them), nothing is forwarded, nothing closes.
    loop {
        tokio::select! {
            _ = cut.changed() => return,
            r = cr.read(&mut up) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// An echo server counting the connections it accepted and the bytes it received.
    struct Echo {
        addr: SocketAddr,
        connections: Arc<AtomicU64>,
        received: Arc<AtomicU64>,
    }

    async fn echo() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&received));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                r.fetch_add(n as u64, Ordering::SeqCst);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Echo { addr, connections, received }
    }

    async fn proxy(to: &Echo, mode: Mode) -> Proxy {
        Proxy::start(to.addr, mode, Chaos::default(), 1).await.unwrap()
    }

    /// Reads until the connection closes; what arrived.
    async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got
    }

    #[tokio::test]
    async fn pass_forwards_everything_both_ways() {
        let echo = echo().await;
        let proxy = proxy(&echo, Mode::Pass).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.split();
        let (_, got) = tokio::join!(async { w.write_all(&sent).await.unwrap() }, async {
            let mut got = vec![0u8; sent.len()];
            r.read_exact(&mut got).await.unwrap();
            got
        });
        assert_eq!(got, sent);
        assert_eq!(proxy.accepted()[0].fault, Fault::Pass);
    }

    #[tokio::test]
    async fn a_drop_passes_its_bytes_then_closes_both_sides() {
        let echo = echo().await;
        for budget in [0u64, 1, 1000, 5000] {
            let before = echo.received.load(Ordering::SeqCst);
            let fault = Fault::DropAfter { bytes: budget };
            let (cut, tx) = watch::channel(0);
            let (frozen, rx) = watch::channel(false);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let upstream = echo.addr;
            tokio::spawn(async move {
                let (c, _) = listener.accept().await.unwrap();
                serve(c, upstream, fault, tx, rx).await;
                drop((cut, frozen));
            });
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&[7u8; 3000]).await.unwrap();
            let got = read_to_end(&mut s).await;
            let to_server = echo.received.load(Ordering::SeqCst) - before;
            assert_eq!(got.len() as u64 + to_server, budget.min(6000), "budget {budget}");
            assert!((got.len() as u64) < 3000, "the cut came before the whole echo");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_never_reaches_the_server() {
        let echo = echo().await;
        let proxy = proxy(&echo, Mode::Down).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = s.write_all(b"hello").await;
        assert!(read_to_end(&mut s).await.is_empty());
        assert_eq!(echo.connections.load(Ordering::SeqCst), 0);
        assert_eq!(proxy.accepted()[0].fault, Fault::Refuse);
        // Back up: the next connection passes.
        proxy.set_mode(Mode::Pass);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn a_black_hole_forwards_nothing_and_closes_only_when_cut() {
        let echo = echo().await;
        let proxy = proxy(&echo, Mode::BlackHole).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(&[1u8; 10_000]).await.unwrap();
        // Accepted (so that its task is told of the cut) before the cut.
        while proxy.accepted().is_empty() {
            tokio::task::yield_now().await;
        }
        proxy.cut();
        assert!(read_to_end(&mut s).await.is_empty());
        assert_eq!(echo.received.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_freeze_silences_open_connections_until_the_cut() {
        let echo = echo().await;
        let proxy = proxy(&echo, Mode::Pass).await;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        let before = echo.received.load(Ordering::SeqCst);
        // The connection's task sees the freeze before the bytes that follow it (its select
        // is biased towards the freeze).
        proxy.freeze();
        s.write_all(b"lost").await.unwrap();
        proxy.cut();
        assert!(read_to_end(&mut s).await.is_empty());
        assert_eq!(echo.received.load(Ordering::SeqCst), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_each_chunk() {
        let echo = echo().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, frozen) = (watch::channel(0).0, watch::channel(false).0);
        let (c, f) = (cut.subscribe(), frozen.subscribe());
        let upstream = echo.addr;
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve(s, upstream, Fault::Delay { ms: 30 }, c, f).await;
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let start = tokio::time::Instant::now();
        s.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        s.read_exact(&mut got).await.unwrap();
        // Paused time: it moves only through the proxy's sleeps, one each way.
        assert!(start.elapsed() >= Duration::from_millis(60), "{:?}", start.elapsed());
    }

    #[test]
    fn the_schedule_is_the_seeds() {
        let chaos = Chaos::default();
        let draws = |seed| {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
            (0..2000).map(|_| chaos.draw(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(5), draws(5));
        assert_ne!(draws(5), draws(6));
        let faults = draws(5);
        for kind in ["pass", "delay", "drop", "refuse", "black_hole"] {
            let n = faults.iter().filter(|f| f.kind() == kind).count();
            assert!(n > 50, "{kind} drawn {n} times in 2000");
        }
        assert!(faults.iter().all(|f| match *f {
            Fault::DropAfter { bytes } => bytes <= 256 * 1024,
            Fault::BlackHoleAfter { bytes } => bytes <= 64 * 1024,
            Fault::Delay { ms } => (1..=40).contains(&ms),
            _ => true,
        }));
    }
}
