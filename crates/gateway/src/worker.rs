//! What a worker thread and a connection are, as the request path sees them: a leaf that
//! imports nothing else of the gateway, so that the configuration, the clusters and the
//! phases can read it without reaching up into the server.
//!
//! A gateway worker is one OS thread with its own current-thread runtime, listener and
//! pools ([`crate::server`] starts them); state kept per worker is indexed by
//! [`worker_index`].

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

/// Most worker threads a gateway starts.
pub const MAX_WORKERS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The worker thread the caller runs on (1..=workers), or 0 off the workers.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// [`worker_index`] as a metric label, without allocating.
pub fn worker_label() -> &'static str {
    const LABELS: [&str; MAX_WORKERS + 1] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    LABELS[worker_index().min(MAX_WORKERS)]
}

/// How far ahead a worker's runtime always has a timer armed ([`timer_floor`]).
pub(crate) const TIMER_FLOOR: std::time::Duration = std::time::Duration::from_millis(50);

/// Keeps a timer armed at most [`TIMER_FLOOR`] ahead on the calling runtime, for as long
/// as it runs.
///
/// tokio's time driver wakes its own thread (a write to an eventfd, then one more turn
/// through epoll) whenever a timer is registered that expires before the earliest timer it
/// planned its last sleep for, or when it planned with no timer at all. A worker whose
/// requests finish quickly often has no timer left when it parks, so each request's
/// timeouts (the header read, the upstream call, every part of a composite) paid for that
/// wake-up: 1.4 of a composite page's 12.6 system calls, 0.4 of a proxied request's 5.4
/// (`perf stat` on the syscall tracepoints, `wrk -c8`). With a timer always nearer than
/// any request's timeout, registering one does not wake the thread; a timeout shorter
/// than [`TIMER_FLOOR`] still does, as it must. The cost: 20 wake-ups a second. (On a
/// runtime with paused time, as a test may use, the clock would jump 50 ms at every idle.)
pub(crate) async fn timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Marks the calling thread as worker `index` (1-based); the server calls it once per
/// worker thread before it serves.
pub(crate) fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// A value alone on its cache lines (128 bytes: two lines, as adjacent-line prefetching
/// pairs them), so that one worker's writes never invalidate another's.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One `T` per worker (index 0: threads off the workers), each on cache lines of its own.
#[derive(Debug)]
pub struct PerWorker<T>(Box<[Padded<T>]>);

impl<T> PerWorker<T> {
    /// For `workers` workers (at most [`MAX_WORKERS`]) and the threads off them: `make`
    /// gets each one's index.
    pub fn new(workers: usize, make: impl FnMut(usize) -> T) -> Self {
        Self(
            (0..=workers.min(MAX_WORKERS))
                .map(make)
                .map(Padded)
                .collect(),
        )
    }

    /// The calling worker's own.
    pub fn mine(&self) -> &T {
        self.at(worker_index())
    }

    /// Worker `index`'s (a worker beyond those made for shares the last one's).
    pub fn at(&self, index: usize) -> &T {
        &self.0[index.min(self.0.len() - 1)]
    }

    /// Every worker's.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }
}

/// A lock that a panic elsewhere does not poison for good (what it guards stays usable).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the gateway knows of the connection a request came on (a request extension).
#[derive(Clone)]
pub struct ConnInfo {
    /// The connection's peer.
    pub peer: std::net::SocketAddr,
    /// The client spoke TLS.
    pub tls: bool,
    /// The connection's place under `limits.max_connections`, held as long as any clone
    /// lives: an upgraded connection (a WebSocket tunnel) keeps it.
    pub slot: Arc<OwnedSemaphorePermit>,
    /// The peer's address as a header value, made once per connection (the client's
    /// address header whenever the peer is not a trusted proxy).
    pub peer_ip: Option<http::HeaderValue>,
}
