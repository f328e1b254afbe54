//! A delaying TCP relay: the network between a client and a server, simulated on loopback.
//!
//! Every chunk read from one side is written to the other `one_way` later (so a 20 ms round
//! trip is a 10 ms one-way delay), in order, as `tc netem` would delay packets; a new
//! connection's first bytes leave one round trip after it was accepted, as a TCP handshake
//! costs; and the bytes are counted in each direction. The queue between the reading and the
//! writing side of a direction is bounded (backpressure reaches the sender), and so is the
//! number of connections. [`Relay::cut`] drops every open connection (both sides closed) and
//! stops listening (new connections are refused) until [`Relay::restore`] listens again on
//! the same port: a server restarting, to its clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction of a connection (at most 1 MiB).
const QUEUED_CHUNKS: usize = 64;
/// Connections relayed at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;

/// What crossed the relay since it started or was last [`Relay::reset`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Client to server.
    pub bytes_up: u64,
    /// Server to client.
    pub bytes_down: u64,
    /// Connections accepted.
    pub connections: u64,
}

impl Traffic {
    pub fn bytes(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
}

#[derive(Default)]
struct Shared {
    one_way_us: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    /// Connections being relayed now.
    open: AtomicU64,
    /// Set while cut: nothing listens, new connections are refused.
    cut: AtomicBool,
    /// Wakes the accept loop when the cut is made or lifted.
    changed: Notify,
    /// Connections accepted just as the cut was made, and closed at once.
    turned_away: AtomicU64,
    /// Cancelled by a cut: every connection accepted before it ends.
    epoch: Mutex<CancellationToken>,
}

impl Shared {
    fn one_way(&self) -> Duration {
        Duration::from_micros(self.one_way_us.load(Ordering::Relaxed))
    }
}

/// A running relay; stops when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr, one_way: Duration) -> std::io::Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared
            .one_way_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            shared.clone(),
            stop.clone(),
        ));
        Ok(Relay { addr, shared, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the one-way delay for every chunk read from now on (connections stay open).
    pub fn set_one_way(&self, d: Duration) {
        self.shared
            .one_way_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            bytes_up: self.shared.up.load(Ordering::Relaxed),
            bytes_down: self.shared.down.load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }

    /// Drops every open connection (both sides closed) and stops listening, so that new
    /// connections are refused, until [`Relay::restore`]; returns how many were open.
    pub fn cut(&self) -> u64 {
        // The flag first: a connection accepted from here on is turned away, and one accepted
        // before holds the epoch cancelled below.
        self.shared.cut.store(true, Ordering::SeqCst);
        let open = self.shared.open.load(Ordering::SeqCst);
        if let Ok(mut epoch) = self.shared.epoch.lock() {
            std::mem::replace(&mut *epoch, CancellationToken::new()).cancel();
        }
        self.shared.changed.notify_one();
        open
    }

    /// Listens (on the same port) and relays new connections again after a [`Relay::cut`].
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.changed.notify_one();
    }

    /// Connections accepted just as a cut was made, and closed at once.
    pub fn turned_away(&self) -> u64 {
        self.shared.turned_away.load(Ordering::Relaxed)
    }

    /// Zeroes the counters.
    pub fn reset(&self) {
        self.shared.up.store(0, Ordering::Relaxed);
        self.shared.down.store(0, Ordering::Relaxed);
        self.shared.connections.store(0, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    let mut listener = Some(listener);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if shared.cut.load(Ordering::SeqCst) {
            // Cut: nobody listens on the port (connections are refused) until restored.
            listener = None;
            while shared.cut.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = shared.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(addr).await {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.changed.notified() => continue,
            a = l.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // The epoch before the flag (see `Relay::cut`).
        let epoch = match shared.epoch.lock() {
            Ok(e) => e.clone(),
            Err(_) => return,
        };
        if shared.cut.load(Ordering::SeqCst) {
            shared.turned_away.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = epoch.cancelled() => {}
                _ = relay(client, upstream, shared.clone()) => {}
            }
            shared.open.fetch_sub(1, Ordering::SeqCst);
            drop(slot);
        });
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let accepted = Instant::now();
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // The handshake: the client's first bytes cannot leave before one round trip.
    let not_before = accepted + 2 * shared.one_way();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    futures::future::join(
        pipe(
            client_read,
            server_write,
            shared.clone(),
            Direction::Up,
            not_before,
        ),
        pipe(server_read, client_write, shared, Direction::Down, accepted),
    )
    .await;
}

/// Copies `from` to `to`, each chunk `one_way` after it was read (and not before
/// `not_before` + `one_way`); an end of stream is passed on the same way.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dir: Direction,
    not_before: Instant,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUED_CHUNKS);
    let due = {
        let shared = shared.clone();
        move || Instant::now().max(not_before) + shared.one_way()
    };
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let counter = match dir {
            Direction::Up => &shared.up,
            Direction::Down => &shared.down,
        };
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            if tx.send((due(), Some(buf[..n].to_vec()))).await.is_err() {
                return;
            }
        }
        let _ = tx.send((due(), None)).await;
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            match chunk {
                Some(c) => {
                    if to.write_all(&c).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    break;
                }
            }
        }
    };
    futures::future::join(reader, writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> Duration {
        let t = std::time::Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        t.elapsed()
    }

    #[tokio::test]
    async fn a_round_trip_costs_twice_the_one_way_delay_and_bytes_are_counted() {
        let echo = echo_server().await;
        let relay = Relay::start(echo, Duration::from_millis(15)).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        // The first exchange also pays the handshake's round trip.
        let first = round_trip(&mut s).await;
        assert!(first >= Duration::from_millis(60), "{first:?}");
        let rtt = round_trip(&mut s).await;
        assert!(
            rtt >= Duration::from_millis(30) && rtt < Duration::from_millis(60),
            "{rtt:?}"
        );
        relay.set_one_way(Duration::ZERO);
        let fast = round_trip(&mut s).await;
        assert!(fast < Duration::from_millis(15), "{fast:?}");
        let t = relay.traffic();
        assert_eq!((t.bytes_up, t.bytes_down, t.connections), (12, 12, 1));
        relay.reset();
        assert_eq!(relay.traffic().bytes(), 0);
    }

    #[tokio::test]
    async fn a_cut_drops_open_connections_and_refuses_new_ones_until_restored() {
        let echo = echo_server().await;
        let relay = Relay::start(echo, Duration::ZERO).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        round_trip(&mut s).await;
        assert_eq!(relay.cut(), 1);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the cut closes the client's side");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(relay.addr()).await.is_err(), "refused");
        relay.restore();
        let mut again = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match TcpStream::connect(relay.addr()).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await
        .expect("the relay listens again on its port");
        round_trip(&mut again).await;
        assert_eq!(relay.traffic().connections, 2);
    }

    #[tokio::test]
    async fn an_end_of_stream_is_passed_on() {
        let echo = echo_server().await;
        let relay = Relay::start(echo, Duration::from_millis(1)).await.unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
            .await
            .expect("the echo server closes after the client did")
            .unwrap();
        assert_eq!(all, b"bye");
    }
}
