//! Per-part answer cache and request coalescing: identical concurrent calls of a part share
//! one backend call (cached or not), and successful answers are kept for their TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::{Failure, Fetched};
use crate::config::PartCacheConfig;

type Flight = Shared<BoxFuture<'static, Result<Fetched, Failure>>>;

#[derive(Clone)]
struct Entry {
    fetched: Fetched,
    expires: Instant,
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

pub struct PartCache {
    cfg: Option<PartCacheConfig>,
    store: Option<quick_cache::sync::Cache<Arc<str>, Entry>>,
    inflight: Mutex<HashMap<Arc<str>, Flight>>,
}

impl PartCache {
    pub fn new(cfg: Option<&PartCacheConfig>) -> Self {
        Self {
            cfg: cfg.cloned(),
            store: cfg.map(|c| quick_cache::sync::Cache::new(c.max_entries)),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this cache was built for `cfg` (a reload keeps it when unchanged).
    pub fn is_for(&self, cfg: Option<&PartCacheConfig>) -> bool {
        self.cfg.as_ref() == cfg
    }

    /// The answer for `key`: from the cache, from a call in flight, or from `call`, which
    /// runs as its own task so that it completes (and fills the cache) even when the
    /// request that started it goes away.
    pub async fn get(
        self: &Arc<Self>,
        key: Arc<str>,
        call: impl FnOnce() -> BoxFuture<'static, Result<Fetched, Failure>>,
    ) -> (Result<Fetched, Failure>, Via) {
        if let Some(store) = &self.store
            && let Some(e) = store.get(&key)
        {
            if e.expires > Instant::now() {
                return (Ok(e.fetched), Via::Hit);
            }
            store.remove(&key);
        }
        let (flight, via) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key) {
                Some(f) => (f.clone(), Via::Shared),
                None => {
                    let this = self.clone();
                    let k = key.clone();
                    let fut = call();
                    // Spawned while the lock is held: the task's own removal of the entry
                    // cannot come before the entry is inserted.
                    let task = tokio::spawn(async move {
                        let result = fut.await;
                        if let (Ok(f), Some(store), Some(cfg)) = (&result, &this.store, &this.cfg)
                            && let Some(max_age) = f.max_age
                        {
                            let ttl = Duration::from_millis(cfg.ttl_ms).min(max_age);
                            if !ttl.is_zero() {
                                store.insert(
                                    k.clone(),
                                    Entry {
                                        fetched: f.clone(),
                                        expires: Instant::now() + ttl,
                                    },
                                );
                            }
                        }
                        this.inflight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&k);
                        result
                    });
                    let flight = async move { task.await.unwrap_or(Err(Failure::Unreachable)) }
                        .boxed()
                        .shared();
                    inflight.insert(key, flight.clone());
                    (flight, Via::Miss)
                }
            }
        };
        (flight.await, via)
    }
}
