//! Per-part answer cache and request coalescing: identical concurrent calls of a part share
//! one backend call (cached or not), and successful answers are kept for their TTL.
//!
//! A call is a `Shared` future driven by the requests waiting for it; the in-flight map holds
//! only a weak handle, so when every waiting request is gone (the client left, the
//! composite's deadline passed) the backend call is dropped with them and its entry removed.
//! Nothing outlives the requests that asked for it, and the map never holds more entries
//! than there are waiting requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

use super::{Failure, Fetched};
use crate::config::PartCacheConfig;

type Call = BoxFuture<'static, Result<Fetched, Failure>>;

#[derive(Clone)]
struct Entry {
    fetched: Fetched,
    expires: Instant,
}

/// Weighs a cached answer by its size, so `max_bytes` bounds the memory.
#[derive(Clone)]
struct BySize;

impl quick_cache::Weighter<Arc<str>, Entry> for BySize {
    fn weight(&self, key: &Arc<str>, val: &Entry) -> u64 {
        // Bookkeeping (the entry, the map slot) is counted as a flat 128 bytes.
        (key.len() + val.fetched.size + 128) as u64
    }
}

/// How an answer was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A backend call made for this request.
    Miss = 0,
    /// Another request's backend call, already in flight.
    Shared = 1,
    /// The cache.
    Hit = 2,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Miss => "miss",
            Via::Shared => "shared",
            Via::Hit => "hit",
        }
    }
}

struct InFlight {
    id: u64,
    call: WeakShared<Call>,
}

pub struct PartCache {
    cfg: Option<PartCacheConfig>,
    store: Option<quick_cache::sync::Cache<Arc<str>, Entry, BySize>>,
    inflight: Mutex<HashMap<Arc<str>, InFlight>>,
    next_id: AtomicU64,
}

impl PartCache {
    pub fn new(cfg: Option<&PartCacheConfig>) -> Self {
        Self {
            cfg: cfg.cloned(),
            store: cfg.map(|c| {
                let estimated = (c.max_bytes / 1024).clamp(16, 1_000_000) as usize;
                quick_cache::sync::Cache::with_weighter(estimated, c.max_bytes, BySize)
            }),
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Whether this cache was built for `cfg` (a reload keeps it when unchanged).
    pub fn is_for(&self, cfg: Option<&PartCacheConfig>) -> bool {
        self.cfg.as_ref() == cfg
    }

    /// The answer for `key`: from the cache, from a call in flight, or from `call`.
    pub async fn get(
        self: &Arc<Self>,
        key: Arc<str>,
        call: impl FnOnce() -> Call,
    ) -> (Result<Fetched, Failure>, Via) {
        if let Some(store) = &self.store
            && let Some(e) = store.get(&key)
        {
            if e.expires > Instant::now() {
                return (Ok(e.fetched), Via::Hit);
            }
            store.remove(&key);
        }
        let (flight, via, id) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight
                .get(&key)
                .and_then(|f| Some((f.call.upgrade()?, f.id)))
            {
                Some((flight, id)) => (flight, Via::Shared, id),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let this = self.clone();
                    let k = key.clone();
                    let fut = call();
                    let flight: Shared<Call> = async move {
                        let result = fut.await;
                        this.keep(&k, &result);
                        result
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = flight.downgrade() {
                        inflight.insert(key.clone(), InFlight { id, call: weak });
                    }
                    (flight, Via::Miss, id)
                }
            }
        };
        let mut waiter = Waiter {
            cache: self,
            key,
            id,
            flight: Some(flight.clone()),
            done: false,
        };
        let result = flight.await;
        waiter.done = true;
        (result, via)
    }

    /// Caches a successful answer the backend allows to be cached.
    fn keep(&self, key: &Arc<str>, result: &Result<Fetched, Failure>) {
        if let (Ok(f), Some(store), Some(cfg)) = (result, &self.store, &self.cfg)
            && let Some(max_age) = f.max_age
        {
            let ttl = Duration::from_millis(cfg.ttl_ms).min(max_age);
            if !ttl.is_zero() {
                store.insert(
                    key.clone(),
                    Entry {
                        fetched: f.clone(),
                        expires: Instant::now() + ttl,
                    },
                );
            }
        }
    }
}

/// One request waiting for a call. When it goes, the call's entry goes too if the call
/// has finished or nobody else waits for it.
struct Waiter<'a> {
    cache: &'a PartCache,
    key: Arc<str>,
    id: u64,
    flight: Option<Shared<Call>>,
    done: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Ours goes first: if it was the last, the call is dropped (cancelled) here.
        drop(self.flight.take());
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inflight.get(&self.key)
            && e.id == self.id
            && (self.done || e.call.upgrade().is_none())
        {
            inflight.remove(&self.key);
        }
    }
}
