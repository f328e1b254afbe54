//! The console's figures come from the metrics the processes record anyway: the Prometheus
//! registry is rendered once a second while somebody watches, the few families the console
//! draws are read back, and rates and percentiles are the differences between two readings.
//! Nothing is counted twice on the request path.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// Cumulative values of one reading.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub routes: HashMap<String, RouteTotals>,
    pub retries: HashMap<String, f64>,
    pub parts: HashMap<(String, String), PartTotals>,
    pub consumers: HashMap<String, ConsumerTotals>,
    pub published: f64,
    pub brokers: HashMap<String, f64>,
    pub ratelimit_errors: f64,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTotals {
    pub requests: f64,
    pub errors: f64,
    pub variants: HashMap<String, f64>,
    pub endpoints: HashMap<String, f64>,
    pub buckets: Buckets,
    pub limited: f64,
    pub upstream_errors: f64,
    /// Copies sent to the route's shadow, by result (`ok`, `error_status`, `failed`,
    /// `timeout`), counted when the copy is done.
    pub mirrored: HashMap<String, f64>,
    /// Requests drawn for a copy that was not sent (too large a body, no free slot).
    pub mirror_skipped: f64,
}

#[derive(Debug, Clone, Default)]
pub struct PartTotals {
    pub ok: f64,
    pub fallback: f64,
    pub failed: f64,
    pub skipped: f64,
    /// Calls that did not answer in time (served a fallback or failed the request).
    pub timeouts: f64,
    pub hit: f64,
    pub miss: f64,
    pub shared: f64,
    pub buckets: Buckets,
}

#[derive(Debug, Clone, Default)]
pub struct ConsumerTotals {
    pub backlog: f64,
    pub lag: f64,
    /// Deliveries the consumer holds now (taken, not yet acked or handed back).
    pub in_flight: f64,
    pub applied: f64,
    pub retried: f64,
    pub dead: f64,
    pub duplicates: f64,
    pub redelivered: f64,
}

/// A histogram's cumulative bucket counts by upper bound (`f64::INFINITY` last).
#[derive(Debug, Clone, Default)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    fn add(&mut self, le: f64, count: f64) {
        match self.0.iter_mut().find(|(l, _)| *l == le) {
            Some((_, c)) => *c += count,
            None => {
                self.0.push((le, count));
                self.0.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// This minus `earlier`, bound by bound.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|(le, c)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (*le, (c - before).max(0.0))
                })
                .collect(),
        )
    }

    /// The `q` quantile in milliseconds, interpolated within its bucket as Prometheus's
    /// `histogram_quantile` does; `None` without observations.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.0.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, cum) in &self.0 {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lower.0 * 1000.0);
                }
                let span = cum - lower.1;
                let within = if span > 0.0 {
                    (rank - lower.1) / span
                } else {
                    1.0
                };
                return Some((lower.0 + (le - lower.0) * within) * 1000.0);
            }
            lower = (le, cum);
        }
        Some(lower.0 * 1000.0)
    }
}

/// One sample line: name, labels, value.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl Sample<'_> {
    fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

const FAMILIES: &[&str] = &["gateway_", "messaging_"];

fn parse_line(line: &str) -> Option<Sample<'_>> {
    if line.starts_with('#') || !FAMILIES.iter().any(|f| line.starts_with(f)) {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let mut rest = rest;
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let key = &r[..eq];
            let mut chars = r[eq + 1..].char_indices();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            let mut end = None;
            let mut escaped = false;
            for (i, c) in chars {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    (false, c) => value.push(c),
                }
            }
            labels.push((key, value));
            r = &r[end?..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn le(s: &Sample<'_>) -> f64 {
    match s.label("le") {
        "+Inf" => f64::INFINITY,
        v => v.parse().unwrap_or(f64::INFINITY),
    }
}

/// Reads the families the console draws from Prometheus text.
pub fn read(text: &str) -> Totals {
    let mut t = Totals::default();
    for s in text.lines().filter_map(parse_line) {
        let route = || s.label("route").to_owned();
        match s.name {
            "gateway_requests_total" => {
                let r = t.routes.entry(route()).or_default();
                r.requests += s.value;
                if s.label("status").starts_with('5') {
                    r.errors += s.value;
                }
                *r.variants.entry(s.label("variant").to_owned()).or_default() += s.value;
                let endpoint = s.label("endpoint");
                if !endpoint.is_empty() {
                    *r.endpoints.entry(endpoint.to_owned()).or_default() += s.value;
                }
            }
            "gateway_request_duration_seconds_bucket" => {
                t.routes
                    .entry(route())
                    .or_default()
                    .buckets
                    .add(le(&s), s.value);
            }
            "gateway_ratelimit_rejections_total" => {
                t.routes.entry(route()).or_default().limited += s.value;
            }
            "gateway_mirror_requests_total" => {
                *t.routes
                    .entry(route())
                    .or_default()
                    .mirrored
                    .entry(s.label("result").to_owned())
                    .or_default() += s.value;
            }
            "gateway_mirror_skipped_total" => {
                t.routes.entry(route()).or_default().mirror_skipped += s.value;
            }
            "gateway_upstream_errors_total" => {
                t.routes.entry(route()).or_default().upstream_errors += s.value;
            }
            "gateway_retries_total" => {
                *t.retries.entry(s.label("cluster").to_owned()).or_default() += s.value;
            }
            "gateway_ratelimit_errors_total" => t.ratelimit_errors += s.value,
            "gateway_aggregate_parts_total" => {
                let p = t
                    .parts
                    .entry((route(), s.label("part").to_owned()))
                    .or_default();
                match s.label("outcome") {
                    "ok" => p.ok += s.value,
                    "fallback" => p.fallback += s.value,
                    "failed" => p.failed += s.value,
                    _ => p.skipped += s.value,
                }
            }
            "gateway_aggregate_part_timeouts_total" => {
                t.parts
                    .entry((route(), s.label("part").to_owned()))
                    .or_default()
                    .timeouts += s.value;
            }
            "gateway_aggregate_cache_total" => {
                let p = t
                    .parts
                    .entry((route(), s.label("part").to_owned()))
                    .or_default();
                match s.label("result") {
                    "hit" => p.hit += s.value,
                    "shared" => p.shared += s.value,
                    _ => p.miss += s.value,
                }
            }
            "gateway_aggregate_part_duration_seconds_bucket" => {
                t.parts
                    .entry((route(), s.label("part").to_owned()))
                    .or_default()
                    .buckets
                    .add(le(&s), s.value);
            }
            "messaging_backlog" | "messaging_lag_seconds" | "messaging_in_flight" => {
                let c = t
                    .consumers
                    .entry(s.label("consumer").to_owned())
                    .or_default();
                match s.name {
                    "messaging_backlog" => c.backlog = s.value,
                    "messaging_in_flight" => c.in_flight = s.value,
                    _ => c.lag = s.value,
                }
            }
            "messaging_consumed_total" => {
                let c = t
                    .consumers
                    .entry(s.label("consumer").to_owned())
                    .or_default();
                match s.label("outcome") {
                    "applied" => c.applied += s.value,
                    "retry" => c.retried += s.value,
                    "dead_lettered" => c.dead += s.value,
                    _ => c.duplicates += s.value,
                }
            }
            "messaging_redeliveries_total" => {
                t.consumers
                    .entry(s.label("consumer").to_owned())
                    .or_default()
                    .redelivered += s.value;
            }
            "messaging_published_total" => t.published += s.value,
            "messaging_broker_connected" => {
                t.brokers.insert(s.label("broker").to_owned(), s.value);
            }
            _ => {}
        }
    }
    t
}

/// One second's figures, as sent to the page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tick {
    /// Unix milliseconds.
    pub t: i64,
    pub overview: Point,
    pub routes: BTreeMap<String, RouteTick>,
    pub parts: BTreeMap<String, PartTick>,
    pub consumers: BTreeMap<String, ConsumerTick>,
    pub brokers: BTreeMap<String, bool>,
}

/// The overview's figures for one second (`None`: nothing to measure).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Point {
    pub rps: f64,
    /// Share of answers that were 5xx, 0 to 1.
    pub err: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub backlog: f64,
    pub published: f64,
    pub consumed: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteTick {
    pub rps: f64,
    /// Requests per second over the last ten seconds.
    pub rps_10s: f64,
    pub err: f64,
    /// Latency percentiles in milliseconds over the last ten seconds.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// p99 of this second alone (the sparkline's).
    pub p99_now: Option<f64>,
    pub limited: f64,
    pub retries: f64,
    pub upstream_errors: f64,
    /// Share of the last ten seconds' requests per variant.
    pub variants: BTreeMap<String, f64>,
    /// Requests per second per endpoint.
    pub endpoints: BTreeMap<String, f64>,
    /// The share of the last ten seconds' requests copied to the shadow (drawn: sent or
    /// skipped), against the configured percent; `None` without requests or a mirror.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorTick>,
}

/// A mirror's observed rate over ten seconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MirrorTick {
    /// Requests drawn for a copy (sent or skipped) per request, 0 to 1.
    pub drawn: f64,
    /// Copies sent per request.
    pub sent: f64,
    /// Copies sent per second.
    pub rps: f64,
    /// Of the copies sent, the share the shadow answered without a 5xx in time.
    pub ok: Option<f64>,
    /// Drawn but not sent per second (body too large, every slot busy).
    pub skipped: f64,
}

fn mirror_tick(now: &RouteTotals, w: &RouteTotals, requests: f64, secs: f64) -> Option<MirrorTick> {
    if now.mirrored.is_empty() && now.mirror_skipped == 0.0 {
        return None;
    }
    let sum = |r: &RouteTotals| r.mirrored.values().sum::<f64>();
    let ok = |r: &RouteTotals| r.mirrored.get("ok").copied().unwrap_or(0.0);
    let sent = (sum(now) - sum(w)).max(0.0);
    let skipped = (now.mirror_skipped - w.mirror_skipped).max(0.0);
    let share = |n: f64| {
        if requests > 0.0 {
            (n / requests).min(1.0)
        } else {
            0.0
        }
    };
    Some(MirrorTick {
        drawn: share(sent + skipped),
        sent: share(sent),
        rps: sent / secs,
        ok: (sent > 0.0).then(|| ((ok(now) - ok(w)).max(0.0) / sent).min(1.0)),
        skipped: skipped / secs,
    })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PartTick {
    pub route: String,
    pub part: String,
    /// Calls, fallbacks and failures per second over the last ten seconds.
    pub calls: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub fallbacks: f64,
    pub failures: f64,
    /// Calls per second that did not answer in time (a part's timeout or the composite's
    /// deadline), counted apart from fallbacks: a timeout is served a fallback (optional
    /// parts) or fails the request (required ones), and a fallback has other causes too.
    pub timeouts: f64,
    /// Share of calls answered from the cache or a shared call, over ten seconds.
    pub cache_hit: Option<f64>,
    /// Cumulative counts since the process started.
    pub total_fallbacks: f64,
    pub total_timeouts: f64,
    pub total_calls: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumerTick {
    pub backlog: f64,
    pub lag_s: f64,
    /// Deliveries the consumer holds at this instant.
    pub in_flight: f64,
    pub applied: f64,
    pub retried: f64,
    pub dead: f64,
    pub redelivered: f64,
    pub total_dead: f64,
}

fn per_sec(now: f64, before: f64, secs: f64) -> f64 {
    ((now - before) / secs).max(0.0)
}

/// The figures between `prev` (`secs` ago) and `now`, with `window` (`window_secs` ago,
/// about ten) for the percentiles, shares and averages.
pub fn tick(
    t: i64,
    now: &Totals,
    prev: &Totals,
    (window, window_secs): (&Totals, f64),
    secs: f64,
) -> Tick {
    let secs = secs.max(0.001);
    let mut out = Tick {
        t,
        ..Default::default()
    };
    let empty = RouteTotals::default();
    let mut all_now = Buckets::default();
    let (mut requests, mut errors) = (0.0, 0.0);
    for (name, r) in &now.routes {
        let p = prev.routes.get(name).unwrap_or(&empty);
        let w = window.routes.get(name).unwrap_or(&empty);
        let d_req = (r.requests - p.requests).max(0.0);
        let d_err = (r.errors - p.errors).max(0.0);
        requests += d_req;
        errors += d_err;
        let second = r.buckets.since(&p.buckets);
        for (le, c) in &second.0 {
            all_now.add(*le, *c);
        }
        let ten = r.buckets.since(&w.buckets);
        let w_req = (r.requests - w.requests).max(0.0);
        out.routes.insert(
            name.clone(),
            RouteTick {
                rps: d_req / secs,
                rps_10s: w_req / window_secs.max(secs),
                err: if d_req > 0.0 { d_err / d_req } else { 0.0 },
                p50: ten.quantile_ms(0.5),
                p95: ten.quantile_ms(0.95),
                p99: ten.quantile_ms(0.99),
                p99_now: second.quantile_ms(0.99),
                limited: per_sec(r.limited, p.limited, secs),
                retries: 0.0,
                upstream_errors: per_sec(r.upstream_errors, p.upstream_errors, secs),
                variants: r
                    .variants
                    .iter()
                    .filter(|(v, _)| !v.is_empty())
                    .map(|(v, n)| {
                        let before = w.variants.get(v).copied().unwrap_or(0.0);
                        let share = if w_req > 0.0 {
                            (n - before).max(0.0) / w_req
                        } else {
                            0.0
                        };
                        (v.clone(), share)
                    })
                    .collect(),
                endpoints: r
                    .endpoints
                    .iter()
                    .map(|(e, n)| {
                        let before = p.endpoints.get(e).copied().unwrap_or(0.0);
                        (e.clone(), per_sec(*n, before, secs))
                    })
                    .collect(),
                mirror: mirror_tick(r, w, w_req, window_secs.max(secs)),
            },
        );
    }
    // Retries are counted per cluster: each route gets its cluster's.
    out.overview.rps = requests / secs;
    out.overview.err = if requests > 0.0 {
        errors / requests
    } else {
        0.0
    };
    out.overview.p50 = all_now.quantile_ms(0.5);
    out.overview.p99 = all_now.quantile_ms(0.99);
    let empty_part = PartTotals::default();
    for ((route, part), x) in &now.parts {
        let key = (route.clone(), part.clone());
        let w = window.parts.get(&key).unwrap_or(&empty_part);
        let wsecs = window_secs.max(secs);
        let ten = x.buckets.since(&w.buckets);
        let lookups = (x.hit + x.shared + x.miss) - (w.hit + w.shared + w.miss);
        let calls = |t: &PartTotals| t.ok + t.fallback + t.failed;
        out.parts.insert(
            format!("{route}/{part}"),
            PartTick {
                route: route.clone(),
                part: part.clone(),
                calls: per_sec(calls(x), calls(w), wsecs),
                p50: ten.quantile_ms(0.5),
                p99: ten.quantile_ms(0.99),
                fallbacks: per_sec(x.fallback, w.fallback, wsecs),
                failures: per_sec(x.failed, w.failed, wsecs),
                timeouts: per_sec(x.timeouts, w.timeouts, wsecs),
                cache_hit: (lookups > 0.0)
                    .then(|| ((x.hit + x.shared) - (w.hit + w.shared)).max(0.0) / lookups),
                total_fallbacks: x.fallback,
                total_timeouts: x.timeouts,
                total_calls: calls(x),
            },
        );
    }
    let empty_consumer = ConsumerTotals::default();
    let mut consumed = 0.0;
    for (name, c) in &now.consumers {
        let p = prev.consumers.get(name).unwrap_or(&empty_consumer);
        out.overview.backlog += c.backlog;
        let applied = per_sec(c.applied, p.applied, secs);
        consumed += applied;
        out.consumers.insert(
            name.clone(),
            ConsumerTick {
                backlog: c.backlog,
                lag_s: c.lag,
                in_flight: c.in_flight,
                applied,
                retried: per_sec(c.retried, p.retried, secs),
                dead: per_sec(c.dead, p.dead, secs),
                redelivered: per_sec(c.redelivered, p.redelivered, secs),
                total_dead: c.dead,
            },
        );
    }
    out.overview.consumed = consumed;
    out.overview.published = per_sec(now.published, prev.published, secs);
    out.brokers = now
        .brokers
        .iter()
        .map(|(b, v)| (b.clone(), *v > 0.0))
        .collect();
    out
}

/// Spreads each cluster's retries per second over the routes that send to it.
pub fn attribute_retries(
    tick: &mut Tick,
    now: &Totals,
    prev: &Totals,
    secs: f64,
    cluster_of: &dyn Fn(&str) -> Option<String>,
) {
    for (route, r) in tick.routes.iter_mut() {
        if let Some(c) = cluster_of(route) {
            let n = now.retries.get(&c).copied().unwrap_or(0.0);
            let p = prev.retries.get(&c).copied().unwrap_or(0.0);
            r.retries = per_sec(n, p, secs.max(0.001));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE gateway_requests_total counter
gateway_requests_total{route="orders",variant="",cluster="orders",endpoint="http://a",status="200"} 90
gateway_requests_total{route="orders",variant="",cluster="orders",endpoint="http://a",status="503"} 10
gateway_requests_total{route="we\"ird\\",variant="",cluster="c",endpoint="",status="200"} 1
gateway_request_duration_seconds_bucket{route="orders",variant="",le="0.001"} 50
gateway_request_duration_seconds_bucket{route="orders",variant="",le="0.01"} 99
gateway_request_duration_seconds_bucket{route="orders",variant="",le="+Inf"} 100
gateway_request_duration_seconds_sum{route="orders",variant=""} 0.5
gateway_aggregate_parts_total{route="page",part="stock",outcome="fallback"} 6
gateway_aggregate_parts_total{route="page",part="stock",outcome="ok"} 14
gateway_aggregate_part_timeouts_total{route="page",part="stock"} 4
gateway_aggregate_parts_total{route="page",part="price",outcome="fallback"} 2
gateway_mirror_requests_total{route="orders",result="ok"} 8
gateway_mirror_requests_total{route="orders",result="timeout"} 2
gateway_mirror_skipped_total{route="orders",reason="busy"} 5
messaging_backlog{consumer="inventory"} 7
messaging_in_flight{consumer="inventory"} 3
messaging_consumed_total{consumer="inventory",outcome="applied"} 40
http_server_requests_total{service="x"} 5
"#;

    #[test]
    fn reads_the_families_it_draws() {
        let t = read(TEXT);
        let r = &t.routes["orders"];
        assert_eq!((r.requests, r.errors), (100.0, 10.0));
        assert_eq!(r.endpoints["http://a"], 100.0);
        assert_eq!(r.buckets.0.len(), 3);
        assert!(t.routes.contains_key("we\"ird\\"), "escapes are read");
        assert_eq!(t.consumers["inventory"].backlog, 7.0);
        assert_eq!(t.consumers["inventory"].in_flight, 3.0);
        assert_eq!(t.consumers["inventory"].applied, 40.0);
    }

    #[test]
    fn rates_and_percentiles_are_differences() {
        let now = read(TEXT);
        let tick = tick(0, &now, &Totals::default(), (&Totals::default(), 2.0), 2.0);
        let r = &tick.routes["orders"];
        assert_eq!(r.rps, 50.0);
        assert!((r.err - 0.1).abs() < 1e-9);
        // Half of the observations are under 1 ms: the median is the first bound.
        assert!((r.p50.unwrap() - 1.0).abs() < 1e-9, "{:?}", r.p50);
        let p99 = r.p99.unwrap();
        assert!(p99 > 1.0 && p99 <= 10.0 + 1e-9, "{p99}");
        assert_eq!(tick.overview.backlog, 7.0);
        assert_eq!(tick.consumers["inventory"].applied, 20.0);
        // The mirror: 15 of 100 requests drawn, 10 sent, 8 of them answered well.
        assert_eq!(
            r.mirror,
            Some(MirrorTick {
                drawn: 0.15,
                sent: 0.1,
                rps: 5.0,
                ok: Some(0.8),
                skipped: 2.5,
            })
        );
        assert_eq!(
            tick.routes["we\"ird\\"].mirror, None,
            "no mirror, no figures"
        );
        // Timeouts apart from fallbacks, per part.
        let stock = &tick.parts["page/stock"];
        assert_eq!(
            (stock.fallbacks, stock.timeouts, stock.calls),
            (3.0, 2.0, 10.0)
        );
        assert_eq!((stock.total_fallbacks, stock.total_timeouts), (6.0, 4.0));
        let price = &tick.parts["page/price"];
        assert_eq!((price.fallbacks, price.timeouts), (1.0, 0.0));
        // Nothing new: no rate, no percentile.
        let still = super::tick(0, &now, &now, (&now, 1.0), 1.0);
        assert_eq!(still.routes["orders"].rps, 0.0);
        assert_eq!(still.routes["orders"].p50, None);
    }
}
