//! The per-request metrics, tallied per core and handed to the shared recorder in batches.
//!
//! Written straight to the process's recorder, every request of every core would write the
//! same cache lines: a handle cache's lock, the counter's atomic, the histogram's sample
//! block. So a request's count and duration go first into its worker's own tally (a lock no
//! other core takes in the steady state, on a cache line of its own, found by the labels'
//! identity: the configuration generation's `Arc<str>`s and the status, a few words hashed,
//! no allocation), and reach the recorder in a batch: when a tally holds [`BATCH`]
//! durations, when its generation goes (reload), and whenever the metrics are read
//! ([`flush_all`] runs before every `telemetry::render`). What a scrape reads is therefore
//! exact; a crash loses at most [`BATCH`] requests' metrics per worker.
//!
//! [`Runtime`]: crate::runtime::Runtime

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use metrics::{Counter, Histogram, SharedString};

use crate::worker::lock;

/// Distinct label sets a worker keeps handles for (each a few dozen bytes); past this its
/// tally is handed over and the handles are looked up in the recorder again.
const CAPACITY: usize = 4096;

/// Durations a worker's tally holds before it hands them over.
const BATCH: usize = 256;

/// The identity of an optional label value: its allocation, or 0 for none.
fn id(v: Option<&Arc<str>>) -> usize {
    v.map_or(0, |a| Arc::as_ptr(a) as *const u8 as usize)
}

fn label(v: Option<&Arc<str>>) -> SharedString {
    match v {
        Some(v) => SharedString::from(v.clone()),
        None => SharedString::const_str(""),
    }
}

/// The labels of one request, as the proxy knows them at the end.
pub(crate) struct Labels<'a> {
    pub route: &'a Arc<str>,
    pub variant: Option<&'a Arc<str>>,
    pub cluster: Option<&'a Arc<str>>,
    pub endpoint: Option<&'a Arc<str>>,
    pub status: u16,
}

/// A handle, what is not yet handed to it, and the label values it was made for: holding
/// them keeps their allocations alive, so an address in a key is never reused by another
/// value while the key exists.
struct Held<T, P> {
    handle: T,
    pending: P,
    _labels: Arc<[Option<Arc<str>>; 4]>,
}

/// Keyed by a few addresses: a fast hash is enough (the keys are not the caller's to choose).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Tally {
    counters: Map<[usize; 5], Held<Counter, u64>>,
    durations: Map<[usize; 2], Held<Histogram, Vec<f64>>>,
    samples: usize,
}

impl Tally {
    /// Hands everything pending to the recorder.
    fn flush(&mut self) {
        for c in self.counters.values_mut() {
            if c.pending > 0 {
                c.handle.increment(std::mem::take(&mut c.pending));
            }
        }
        for h in self.durations.values_mut() {
            for v in h.pending.drain(..) {
                h.handle.record(v);
            }
        }
        self.samples = 0;
    }
}

type Slots = crate::worker::PerWorker<Mutex<Tally>>;

/// Every live generation's tallies, for [`flush_all`].
static LIVE: Mutex<Vec<Weak<Slots>>> = Mutex::new(Vec::new());

/// Hands every worker's tally, of every live generation, to the recorder. Registered with
/// `telemetry::before_render`, so every reading of the metrics is exact.
pub fn flush_all() {
    let live: Vec<Arc<Slots>> = {
        let mut live = lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    for slots in live {
        for t in slots.iter() {
            lock(t).flush();
        }
    }
}

pub(crate) struct RequestMetrics {
    slots: Arc<Slots>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let slots: Arc<Slots> =
            Arc::new(Slots::new(crate::worker::MAX_WORKERS, |_| Mutex::default()));
        let mut live = lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&slots));
        drop(live);
        shopmesh_platform::telemetry::before_render(flush_all);
        Self { slots }
    }
}

impl Drop for RequestMetrics {
    /// A generation's last requests are counted when it goes.
    fn drop(&mut self) {
        for t in self.slots.iter() {
            lock(t).flush();
        }
    }
}

impl RequestMetrics {
    /// Counts the request in `gateway_requests_total` and records its duration in
    /// `gateway_request_duration_seconds` (in the calling worker's tally).
    pub(crate) fn record(&self, l: &Labels<'_>, seconds: f64) {
        let mut t = lock(self.slots.mine());
        if t.counters.len() >= CAPACITY || t.durations.len() >= CAPACITY {
            t.flush();
            t.counters.clear();
            t.durations.clear();
        }
        let held = || {
            Arc::new([
                Some(l.route.clone()),
                l.variant.cloned(),
                l.cluster.cloned(),
                l.endpoint.cloned(),
            ])
        };
        let ckey = [
            id(Some(l.route)),
            id(l.variant),
            id(l.cluster),
            id(l.endpoint),
            usize::from(l.status),
        ];
        t.counters
            .entry(ckey)
            .or_insert_with(|| Held {
                handle: metrics::counter!("gateway_requests_total",
                    "route" => l.route.clone(),
                    "variant" => label(l.variant),
                    "cluster" => label(l.cluster),
                    "endpoint" => label(l.endpoint),
                    "status" => status_label(l.status)),
                pending: 0,
                _labels: held(),
            })
            .pending += 1;
        let hkey = [id(Some(l.route)), id(l.variant)];
        t.durations
            .entry(hkey)
            .or_insert_with(|| Held {
                handle: metrics::histogram!("gateway_request_duration_seconds",
                    "route" => l.route.clone(), "variant" => label(l.variant)),
                pending: Vec::new(),
                _labels: held(),
            })
            .pending
            .push(seconds);
        t.samples += 1;
        if t.samples >= BATCH {
            t.flush();
        }
    }
}

/// The status as a metric label, without allocating for the statuses a gateway gives.
pub(crate) fn status_label(status: u16) -> SharedString {
    let s = match status {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        413 => "413",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return SharedString::from(other.to_string()),
    };
    SharedString::const_str(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn series(text: &str, name: &str) -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn handles_are_reused_and_counts_land_on_the_right_series() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let route: Arc<str> = "r".into();
        let cluster: Arc<str> = "c".into();
        let a: Arc<str> = "http://a".into();
        // The same text in another allocation (a reload's copy) is the same series.
        let a_again: Arc<str> = "http://a".into();
        let b: Arc<str> = "http://b".into();
        metrics::with_local_recorder(&recorder, || {
            let m = RequestMetrics::default();
            let at = |endpoint: &Arc<str>, status| {
                m.record(
                    &Labels {
                        route: &route,
                        variant: None,
                        cluster: Some(&cluster),
                        endpoint: Some(endpoint),
                        status,
                    },
                    0.001,
                )
            };
            at(&a, 200);
            at(&a, 200);
            at(&a, 503);
            at(&b, 200);
            at(&a_again, 200);
            at(&a, 418);
            let t = lock(m.slots.at(0));
            assert_eq!(t.counters.len(), 5, "one cached handle per label identity");
            assert_eq!(t.durations.len(), 1);
            drop(t);
            // Nothing reaches the recorder before the tally is handed over.
            let before = series(&handle.render(), "gateway_requests_total");
            assert!(before.iter().all(|l| l.ends_with(" 0")), "{before:?}");
            flush_all();
        });
        let text = handle.render();
        assert_eq!(
            series(&text, "gateway_requests_total"),
            vec![
                r#"gateway_requests_total{route="r",variant="",cluster="c",endpoint="http://a",status="200"} 3"#,
                r#"gateway_requests_total{route="r",variant="",cluster="c",endpoint="http://a",status="418"} 1"#,
                r#"gateway_requests_total{route="r",variant="",cluster="c",endpoint="http://a",status="503"} 1"#,
                r#"gateway_requests_total{route="r",variant="",cluster="c",endpoint="http://b",status="200"} 1"#,
            ]
        );
        assert!(
            series(&text, "gateway_request_duration_seconds_count").contains(
                &r#"gateway_request_duration_seconds_count{route="r",variant=""} 6"#.to_owned()
            ),
            "{text}"
        );
    }
}
