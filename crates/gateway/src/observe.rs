//! The per-request metric handles, looked up once per label set and then reused.
//!
//! `metrics::counter!` with labels builds a `Key` (a vector of label strings), hashes it and
//! searches the recorder's registry on every call. The request metrics' labels are this
//! configuration generation's own `Arc<str>`s (route, variant, cluster and endpoint names)
//! and a status code, so a handle can be found by the labels' identity instead: a few
//! pointer-sized words hashed, no allocation. The cache lives in the [`Runtime`] and goes
//! with it on reload; it is bounded, and a miss falls back to the recorder, which returns
//! the same underlying metric.
//!
//! [`Runtime`]: crate::runtime::Runtime

use std::sync::Arc;

use metrics::{Counter, Histogram, SharedString};

/// Distinct label sets kept (each a few dozen bytes); beyond this the least used go and are
/// looked up in the recorder again when they come back.
const CAPACITY: usize = 4096;

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

/// A handle and the label values it was made for: holding them keeps their allocations
/// alive, so an address in a key is never reused by another value while the key exists.
#[derive(Clone)]
struct Held<T> {
    handle: T,
    _labels: Arc<[Option<Arc<str>>; 4]>,
}

pub(crate) struct RequestMetrics {
    counters: quick_cache::sync::Cache<[usize; 5], Held<Counter>>,
    durations: quick_cache::sync::Cache<[usize; 2], Held<Histogram>>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            counters: quick_cache::sync::Cache::new(CAPACITY),
            durations: quick_cache::sync::Cache::new(CAPACITY),
        }
    }
}

impl RequestMetrics {
    /// Counts the request in `gateway_requests_total` and records its duration in
    /// `gateway_request_duration_seconds`.
    pub(crate) fn record(&self, l: &Labels<'_>, seconds: f64) {
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
        let counter = match self.counters.get(&ckey) {
            Some(c) => c.handle,
            None => {
                let handle = metrics::counter!("gateway_requests_total",
                    "route" => l.route.clone(),
                    "variant" => label(l.variant),
                    "cluster" => label(l.cluster),
                    "endpoint" => label(l.endpoint),
                    "status" => status_label(l.status));
                self.counters.insert(
                    ckey,
                    Held {
                        handle: handle.clone(),
                        _labels: held(),
                    },
                );
                handle
            }
        };
        counter.increment(1);
        let hkey = [id(Some(l.route)), id(l.variant)];
        let histogram = match self.durations.get(&hkey) {
            Some(h) => h.handle,
            None => {
                let handle = metrics::histogram!("gateway_request_duration_seconds",
                    "route" => l.route.clone(), "variant" => label(l.variant));
                self.durations.insert(
                    hkey,
                    Held {
                        handle: handle.clone(),
                        _labels: held(),
                    },
                );
                handle
            }
        };
        histogram.record(seconds);
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
            assert_eq!(m.counters.len(), 5, "one cached handle per label identity");
            assert_eq!(m.durations.len(), 1);
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
