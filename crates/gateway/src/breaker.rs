//! A circuit breaker per upstream endpoint.
//!
//! Closed: requests flow; failures are counted (consecutive, and per second over a sliding
//! window). Too many consecutive failures, or a failure rate over the threshold once enough
//! requests were seen → open. Open: the endpoint gets no traffic (the balancer skips it;
//! when every endpoint is open the client gets a fast 503) until `open_ms` passes →
//! half-open: `half_open_requests` probes are let through; all succeed → closed, one fails
//! → open again.
//!
//! The closed state's common case takes no shared lock: the state is read from an atomic
//! copy, a request is counted in its own worker's per-second slots (a cache line no other
//! core writes) and a success clears the consecutive-failure count only when it is not
//! already clear. A failure, a transition and the half-open probes go through one lock; a
//! failure's rate check sums every worker's slots.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;
use crate::worker::{PerWorker, lock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    opened_at: Instant,
    consecutive: u32,
    /// Per-second buckets of failures; `epoch` is the second of `buckets[0]`. (Requests are
    /// counted per worker, in [`Breaker::counts`].)
    buckets: Vec<u32>,
    epoch: u64,
    probes_in_flight: u32,
    probes_ok: u32,
    /// Which half-open round the probes belong to: a late answer from an earlier round
    /// counts for nothing in this one.
    round: u64,
    /// When the state last changed (recorded on transitions only).
    changed_at: Instant,
    /// How many times it opened.
    trips: u64,
}

/// What the operations console shows of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub state: State,
    /// How long it has been in that state.
    pub for_: Duration,
    pub trips: u64,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    start: Instant,
    inner: Mutex<Inner>,
    /// `Inner::state`, as the fast path reads it: written under the lock at every change.
    state: AtomicU8,
    /// Whether `Inner::consecutive` is above 0 (a success then takes the lock to clear it).
    failing: AtomicBool,
    /// Requests per second, per worker (index 0: threads off the workers).
    counts: PerWorker<Counts>,
}

/// One worker's requests per second: `(second, requests)` in slot `second % slots`.
type Counts = Mutex<Vec<(u64, u32)>>;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

fn code(s: State) -> u8 {
    match s {
        State::Closed => CLOSED,
        State::Open => OPEN,
        State::HalfOpen => HALF_OPEN,
    }
}

/// What [`Breaker::try_acquire`] granted: a normal request, or one of the probes of a
/// half-open round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Normal,
    Probe(u64),
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        let slots = (cfg.window_ms.div_ceil(1000)).max(1) as usize;
        let now = Instant::now();
        Self {
            cfg,
            start: now,
            state: AtomicU8::new(CLOSED),
            failing: AtomicBool::new(false),
            counts: PerWorker::new(crate::worker::MAX_WORKERS, |_| {
                Mutex::new(vec![(u64::MAX, 0); slots])
            }),
            inner: Mutex::new(Inner {
                state: State::Closed,
                opened_at: now,
                consecutive: 0,
                buckets: vec![0; slots],
                epoch: 0,
                probes_in_flight: 0,
                probes_ok: 0,
                round: 0,
                changed_at: now,
                trips: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Sets the state (under the lock) and its atomic copy.
    fn set(&self, g: &mut Inner, s: State) {
        g.state = s;
        self.state.store(code(s), Ordering::Release);
    }

    /// Counts one request in the calling worker's slot for `sec`.
    fn count(&self, sec: u64) {
        let mut slots = lock(self.counts.mine());
        let n = slots.len() as u64;
        let s = &mut slots[(sec % n) as usize];
        if s.0 != sec {
            *s = (sec, 0);
        }
        s.1 = s.1.saturating_add(1);
    }

    /// Requests counted by every worker in the window ending at second `sec`.
    fn requests(&self, sec: u64) -> u64 {
        self.counts
            .iter()
            .map(|c| {
                let slots = lock(c);
                let n = slots.len() as u64;
                slots
                    .iter()
                    .filter(|(s, _)| *s <= sec && sec - *s < n)
                    .map(|(_, r)| u64::from(*r))
                    .sum::<u64>()
            })
            .sum()
    }

    fn forget_requests(&self) {
        for c in self.counts.iter() {
            let mut slots = lock(c);
            slots.iter_mut().for_each(|s| *s = (u64::MAX, 0));
        }
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.cfg.open_ms)
    }

    /// The state as the balancer sees it now (an expired open state reads as half-open).
    pub fn state(&self) -> State {
        let g = self.lock();
        match g.state {
            State::Open if g.opened_at.elapsed() >= self.open_for() => State::HalfOpen,
            s => s,
        }
    }

    /// The state as [`Self::state`] reads it, how long it has held and the trips so far.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let (state, since) = match g.state {
            // Expired: half-open since the moment it expired.
            State::Open if g.opened_at.elapsed() >= self.open_for() => {
                (State::HalfOpen, g.opened_at + self.open_for())
            }
            s => (s, g.changed_at),
        };
        Snapshot {
            state,
            for_: since.elapsed(),
            trips: g.trips,
        }
    }

    /// Whether a request may go to this endpoint now, without taking a probe slot.
    pub fn is_available(&self) -> bool {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return true;
        }
        let g = self.lock();
        match g.state {
            State::Closed => true,
            State::Open => g.opened_at.elapsed() >= self.open_for(),
            State::HalfOpen => g.probes_in_flight < self.cfg.half_open_requests,
        }
    }

    /// Takes permission for one request, or `None` when the breaker refuses it.
    pub fn try_acquire(&self) -> Option<Permit> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Some(Permit::Normal);
        }
        let mut g = self.lock();
        if g.state == State::Open {
            if g.opened_at.elapsed() < self.open_for() {
                return None;
            }
            self.set(&mut g, State::HalfOpen);
            g.changed_at = g.opened_at + self.open_for();
            g.probes_in_flight = 0;
            g.probes_ok = 0;
            g.round += 1;
        }
        match g.state {
            State::Closed => Some(Permit::Normal),
            _ if g.probes_in_flight < self.cfg.half_open_requests => {
                g.probes_in_flight += 1;
                Some(Permit::Probe(g.round))
            }
            _ => None,
        }
    }

    /// Gives back a permit whose request ended without an outcome (the client went away, or
    /// the failure was the client's): a probe slot is freed, nothing is counted.
    pub fn release(&self, permit: Permit) {
        if let Permit::Probe(round) = permit {
            let mut g = self.lock();
            if g.state == State::HalfOpen && g.round == round {
                g.probes_in_flight = g.probes_in_flight.saturating_sub(1);
            }
        }
    }

    /// Records the outcome of a request granted by [`Self::try_acquire`]. Returns the new
    /// state when it changed.
    pub fn record(&self, permit: Permit, success: bool) -> Option<State> {
        let now_sec = self.start.elapsed().as_secs();
        if permit == Permit::Normal {
            if self.state.load(Ordering::Acquire) != CLOSED {
                // A late answer from before the state changed: it says nothing about now.
                return None;
            }
            self.count(now_sec);
            if success {
                if self.failing.load(Ordering::Relaxed) {
                    let mut g = self.lock();
                    g.consecutive = 0;
                    self.failing.store(false, Ordering::Relaxed);
                }
                return None;
            }
        }
        let mut g = self.lock();
        let before = g.state;
        match (permit, g.state) {
            (Permit::Probe(round), State::HalfOpen) if round == g.round => {
                g.probes_in_flight = g.probes_in_flight.saturating_sub(1);
                if success {
                    g.probes_ok += 1;
                    if g.probes_ok >= self.cfg.half_open_requests {
                        self.set(&mut g, State::Closed);
                        g.consecutive = 0;
                        self.failing.store(false, Ordering::Relaxed);
                        g.buckets.iter_mut().for_each(|b| *b = 0);
                        self.forget_requests();
                    }
                } else {
                    self.set(&mut g, State::Open);
                    g.opened_at = Instant::now();
                }
            }
            // A failure (successes in the closed state ended above).
            (Permit::Normal, State::Closed) => {
                advance(&mut g, now_sec);
                let slot = (now_sec % g.buckets.len() as u64) as usize;
                g.buckets[slot] += 1;
                g.consecutive += 1;
                self.failing.store(true, Ordering::Relaxed);
                let fails: u64 = g.buckets.iter().map(|f| u64::from(*f)).sum();
                let reqs = self.requests(now_sec);
                let rate_trips = reqs >= self.cfg.min_requests as u64
                    && fails as f64 >= self.cfg.failure_rate * reqs as f64;
                if g.consecutive >= self.cfg.consecutive_failures || rate_trips {
                    self.set(&mut g, State::Open);
                    g.opened_at = Instant::now();
                }
            }
            // A late answer from before the state changed: it says nothing about now.
            _ => {}
        }
        if g.state != before {
            g.changed_at = Instant::now();
            if g.state == State::Open {
                g.trips += 1;
            }
        }
        (g.state != before).then_some(g.state)
    }
}

/// Clears the buckets of seconds that slid out of the window.
fn advance(g: &mut Inner, now_sec: u64) {
    let n = g.buckets.len() as u64;
    let newest = g.epoch + n - 1;
    if now_sec <= newest {
        return;
    }
    let stale = (now_sec - newest).min(n);
    for i in 0..stale {
        let slot = ((newest + 1 + i) % n) as usize;
        g.buckets[slot] = 0;
    }
    g.epoch = now_sec + 1 - n;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window_ms: 10_000,
            open_ms: 50,
            half_open_requests: 2,
        }
    }

    #[test]
    fn consecutive_failures_open_then_probes_close() {
        let b = Breaker::new(cfg());
        for _ in 0..2 {
            let p = b.try_acquire().unwrap();
            assert_eq!(b.record(p, false), None);
        }
        let p = b.try_acquire().unwrap();
        assert_eq!(b.record(p, false), Some(State::Open));
        assert!(b.try_acquire().is_none());
        assert!(!b.is_available());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), State::HalfOpen);
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert!(matches!(p1, Permit::Probe(_)));
        assert!(b.try_acquire().is_none(), "only two probes at once");
        assert_eq!(b.record(p1, true), None);
        assert_eq!(b.record(p2, true), Some(State::Closed));
        assert_eq!(b.try_acquire(), Some(Permit::Normal));
        let s = b.snapshot();
        assert_eq!((s.state, s.trips), (State::Closed, 1));
        assert!(s.for_ < Duration::from_millis(50));
    }

    #[test]
    fn a_released_probe_frees_its_slot() {
        let b = Breaker::new(BreakerConfig {
            half_open_requests: 1,
            ..cfg()
        });
        for _ in 0..3 {
            let p = b.try_acquire().unwrap();
            b.record(p, false);
        }
        std::thread::sleep(Duration::from_millis(60));
        let p = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        b.release(p);
        let p = b.try_acquire().expect("the slot is free again");
        assert_eq!(b.record(p, true), Some(State::Closed));
    }

    #[test]
    fn a_late_probe_of_an_earlier_round_counts_for_nothing() {
        let b = Breaker::new(BreakerConfig {
            half_open_requests: 2,
            ..cfg()
        });
        for _ in 0..3 {
            let p = b.try_acquire().unwrap();
            b.record(p, false);
        }
        std::thread::sleep(Duration::from_millis(60));
        let slow = b.try_acquire().unwrap();
        let fast = b.try_acquire().unwrap();
        assert_eq!(b.record(fast, false), Some(State::Open), "round 1 fails");
        std::thread::sleep(Duration::from_millis(60));
        let p = b.try_acquire().unwrap();
        // Round 1's slow probe succeeds now: it must not count toward round 2.
        assert_eq!(b.record(slow, true), None);
        b.release(slow);
        assert_eq!(b.record(p, true), None, "one success of two needed");
        let q = b.try_acquire().unwrap();
        assert_eq!(b.record(q, true), Some(State::Closed));
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(cfg());
        for _ in 0..3 {
            let p = b.try_acquire().unwrap();
            b.record(p, false);
        }
        std::thread::sleep(Duration::from_millis(60));
        let p = b.try_acquire().unwrap();
        assert_eq!(b.record(p, false), Some(State::Open));
        assert!(b.try_acquire().is_none());
    }

    #[test]
    fn failure_rate_opens_once_enough_requests() {
        let b = Breaker::new(cfg());
        // Alternate success and failure: never 3 in a row, but a 50% rate.
        for i in 0..9 {
            let p = b.try_acquire().unwrap();
            assert_eq!(b.record(p, i % 2 == 0), None, "request {i}");
        }
        let p = b.try_acquire().unwrap();
        assert_eq!(b.record(p, false), Some(State::Open));
    }

    #[test]
    fn successes_reset_the_consecutive_count() {
        let b = Breaker::new(cfg());
        let mut sent = 0;
        'outer: for _ in 0..5 {
            for ok in [false, false, true] {
                let Some(p) = b.try_acquire() else {
                    break 'outer;
                };
                sent += 1;
                b.record(p, ok);
            }
        }
        assert_eq!(b.state(), State::Open, "10+ requests at 66% failure");
        assert_eq!(sent, 10, "opens at the 10th request, a failure");
        let b = Breaker::new(BreakerConfig {
            min_requests: 1000,
            ..cfg()
        });
        for _ in 0..20 {
            for ok in [false, false, true] {
                let p = b.try_acquire().unwrap();
                b.record(p, ok);
            }
        }
        assert_eq!(b.state(), State::Closed);
    }

    /// Requests are counted per worker; the failure rate is over all of them.
    #[test]
    fn every_workers_requests_count_toward_the_failure_rate() {
        // Alternating failures and successes on this thread (worker 0): half fail, so
        // alone they trip the rate once 10 requests were seen.
        let alternate = |b: &Breaker| {
            for _ in 0..8 {
                for ok in [false, true] {
                    let Some(p) = b.try_acquire() else { return };
                    b.record(p, ok);
                }
            }
        };
        let alone = Breaker::new(cfg());
        alternate(&alone);
        assert_eq!(alone.state(), State::Open);
        // With 10 successes on worker 1 in the same window the rate stays under half.
        let shared = Breaker::new(cfg());
        std::thread::scope(|s| {
            s.spawn(|| {
                crate::worker::enter_worker(1);
                for _ in 0..10 {
                    let p = shared.try_acquire().unwrap();
                    shared.record(p, true);
                }
            });
        });
        alternate(&shared);
        assert_eq!(shared.state(), State::Closed);
    }
}
