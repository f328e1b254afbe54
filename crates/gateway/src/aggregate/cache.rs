//! Per-part answer cache and request coalescing: identical concurrent calls of a part share
//! one backend call (cached or not), and successful answers are kept for their TTL.
//!
//! A call is a `Shared` future driven by the requests waiting for it; the in-flight map holds
//! only a weak handle, so when every waiting request is gone (the client left, the
//! composite's deadline passed) the backend call is dropped with them and its entry removed.
//! Nothing outlives the requests that asked for it, and the map never holds more entries
//! than there are waiting requests.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared, WeakShared};

use super::{Failure, Fetched};
use crate::config::PartCacheConfig;
use crate::worker::{Padded, lock};

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

/// The calls in flight, by key. Keys carry what a client sent (its path, its query), so the
/// hasher is seeded per map.
type Flights = HashMap<Arc<str>, InFlight, foldhash::quality::RandomState>;

/// The calls in flight are kept in this many maps, a key's map chosen by its hash: every
/// worker's part calls take one of these locks twice, and one lock for all of them had the
/// workers wait on each other (a futex wait and wake per composite page, on 2 cores).
const SHARDS: usize = 16;

pub struct PartCache {
    cfg: Option<PartCacheConfig>,
    store: Option<quick_cache::sync::Cache<Arc<str>, Entry, BySize>>,
    inflight: [Padded<Mutex<Flights>>; SHARDS],
    /// Chooses a key's map.
    shard_of: foldhash::quality::RandomState,
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
            inflight: std::array::from_fn(|_| Padded(Mutex::default())),
            shard_of: Default::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The map of calls in flight that holds `key`.
    fn flights(&self, key: &str) -> &Mutex<Flights> {
        use std::hash::BuildHasher;
        &self.inflight[self.shard_of.hash_one(key) as usize % SHARDS]
    }

    /// Whether answers are kept (not only calls shared).
    pub fn stores(&self) -> bool {
        self.store.is_some()
    }

    /// Whether this cache was built for `cfg` (a reload keeps it when unchanged).
    pub fn is_for(&self, cfg: Option<&PartCacheConfig>) -> bool {
        self.cfg.as_ref() == cfg
    }

    /// The answer for `key`: from the cache, from a call in flight, or from `call`.
    pub async fn get<F>(
        self: &Arc<Self>,
        key: Arc<str>,
        call: impl FnOnce() -> F,
    ) -> (Result<Fetched, Failure>, Via)
    where
        F: Future<Output = Result<Fetched, Failure>> + Send + 'static,
    {
        if let Some(store) = &self.store
            && let Some(e) = store.get(&key)
        {
            if e.expires > Instant::now() {
                return (Ok(e.fetched), Via::Hit);
            }
            store.remove(&key);
        }
        let (flight, via, id) = {
            let mut inflight = lock(self.flights(&key));
            // One look-up of the key, whether the call is joined or made.
            let slot = inflight.entry(key.clone());
            let joined = match &slot {
                Slot::Occupied(f) => f.get().call.upgrade().map(|c| (c, f.get().id)),
                Slot::Vacant(_) => None,
            };
            match joined {
                Some((flight, id)) => (flight, Via::Shared, id),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let flight: Shared<Call> = call().boxed().shared();
                    if let Some(weak) = flight.downgrade() {
                        slot.insert_entry(InFlight { id, call: weak });
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
        // The first request to see the call end retires it, holding its handle meanwhile:
        // until the entry goes, a request for the same key joins the ended call (another
        // thread's may come at any moment), and once it has gone, the answer is in the store.
        waiter.done = true;
        self.retire(&waiter.key, id, &result);
        (result, via)
    }

    /// Caches the answer of call `id` and takes it out of the calls in flight, if it is
    /// still there (the first request to see it end).
    fn retire(&self, key: &Arc<str>, id: u64, result: &Result<Fetched, Failure>) {
        let mut inflight = lock(self.flights(key));
        if let Slot::Occupied(e) = inflight.entry(key.clone())
            && e.get().id == id
        {
            self.keep(key, result);
            e.remove();
        }
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

/// One request waiting for a call. When it goes before the call ends (the client left, the
/// deadline passed), the call's entry goes too if nobody else waits for it.
struct Waiter<'a> {
    cache: &'a PartCache,
    key: Arc<str>,
    id: u64,
    flight: Option<Shared<Call>>,
    done: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Ours goes first: if it was the last, the call is dropped (cancelled) here.
        drop(self.flight.take());
        let mut inflight = lock(self.cache.flights(&self.key));
        if let Slot::Occupied(e) = inflight.entry(self.key.clone())
            && e.get().id == self.id
            && e.get().call.upgrade().is_none()
        {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::FutureExt;
    use serde_json::value::RawValue;

    use super::*;
    use crate::aggregate::Answer;

    fn answer() -> Result<Fetched, Failure> {
        Ok(Fetched {
            status: 200,
            answer: Answer::Raw(Arc::from(
                RawValue::from_string("{\"ok\":true}".into()).expect("json"),
            )),
            size: 11,
            max_age: Some(Duration::MAX),
        })
    }

    fn in_flight(cache: &PartCache) -> usize {
        cache.inflight.iter().map(|m| lock(m).len()).sum()
    }

    /// A call that answers when `gate` opens, counting how often it is made.
    fn gated(
        calls: &Arc<AtomicUsize>,
        gate: &futures::future::Shared<tokio::sync::oneshot::Receiver<()>>,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<Fetched, Failure>> {
        let calls = calls.clone();
        let gate = gate.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = gate.await;
                answer()
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_call_and_the_first_to_see_it_end_caches_it() {
        let cfg = PartCacheConfig {
            ttl_ms: 60_000,
            max_bytes: 1 << 20,
        };
        let cache = Arc::new(PartCache::new(Some(&cfg)));
        let calls = Arc::new(AtomicUsize::new(0));
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let gate = gate.shared();
        let key: Arc<str> = "/api/products/p1".into();
        let first = cache.get(key.clone(), gated(&calls, &gate));
        let second = cache.get(key.clone(), gated(&calls, &gate));
        let both = futures::future::join(first, second);
        let opener = async {
            tokio::task::yield_now().await;
            let _ = open.send(());
        };
        let ((a, via_a), (b, via_b)) = futures::future::join(both, opener).await.0;
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one backend call for both");
        assert_eq!((via_a, via_b), (Via::Miss, Via::Shared));
        assert_eq!(in_flight(&cache), 0, "the call is retired once it ended");
        // Cached by the request that retired it: no call, a hit.
        let (c, via_c) = cache.get(key, gated(&calls, &gate)).await;
        assert!(c.is_ok());
        assert_eq!(via_c, Via::Hit);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_call_nobody_waits_for_any_more_is_dropped_and_forgotten() {
        let cache = Arc::new(PartCache::new(None));
        let calls = Arc::new(AtomicUsize::new(0));
        // A call that never answers: it can only end by being dropped.
        let (_open, gate) = tokio::sync::oneshot::channel::<()>();
        let gate = gate.shared();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let key: Arc<str> = "/api/prices/p1".into();
        {
            let call = gated(&calls, &gate);
            let guard = Dropped(dropped.clone());
            let waiting = cache.get(key.clone(), move || {
                let inner = call();
                async move {
                    let _guard = guard;
                    inner.await
                }
                .boxed()
            });
            // Started, then abandoned (the client left, the deadline passed).
            let gone = tokio::time::timeout(Duration::from_millis(10), waiting).await;
            assert!(gone.is_err());
        }
        assert_eq!(in_flight(&cache), 0, "no entry outlives its waiters");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the backend call is dropped with its last waiter"
        );
        // The next request makes a new call, which nothing caches (no store).
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let gate = gate.shared();
        let _ = open.send(());
        let (r, via) = cache.get(key.clone(), gated(&calls, &gate)).await;
        assert!(r.is_ok());
        assert_eq!(via, Via::Miss);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let (_, via) = cache.get(key, gated(&calls, &gate)).await;
        assert_eq!(
            via,
            Via::Miss,
            "without a store, an ended call is not reused"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(in_flight(&cache), 0);
    }
}
