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

/// Marks the calling thread as worker `index` (1-based); the server calls it once per
/// worker thread before it serves.
pub(crate) fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// What the gateway knows of the connection a request came on (a request extension).
#[derive(Clone)]
pub struct ConnInfo {
    /// The client spoke TLS.
    pub tls: bool,
    /// The connection's place under `limits.max_connections`, held as long as any clone
    /// lives: an upgraded connection (a WebSocket tunnel) keeps it.
    pub slot: Arc<OwnedSemaphorePermit>,
}
