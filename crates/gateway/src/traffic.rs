//! Gray releases, A/B tests and shadow traffic: a route's [`Split`] between upstream
//! versions (rules, then a sticky weighted draw) and its [`Mirror`] to a shadow cluster.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::config::{MirrorConfig, SplitConfig, Stickiness, VariantRules};
use crate::wire::Body;

/// The request header that tells an upstream which variant it serves.
pub const VARIANT_HEADER: &str = "x-shopmesh-variant";
/// The request header that marks a shadow copy.
pub const SHADOW_HEADER: &str = "x-shopmesh-shadow";

pub struct Variant {
    pub name: Arc<str>,
    pub cluster: Arc<Cluster>,
    weight: u64,
    when: Option<Rules>,
}

struct Rules {
    headers: Vec<(HeaderName, HeaderValue)>,
    cookies: Vec<(String, String)>,
    query: Vec<(String, String)>,
}

impl Rules {
    fn new(r: &VariantRules) -> Result<Self, String> {
        let headers = r
            .headers
            .iter()
            .map(|(n, v)| {
                Ok((
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| format!("`{n}` is not a header name"))?,
                    HeaderValue::from_str(v).map_err(|_| format!("header `{n}`: bad value"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        Ok(Self {
            headers,
            cookies: pairs(&r.cookies),
            query: pairs(&r.query),
        })
    }

    fn matches(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|h| h == v))
            && self
                .cookies
                .iter()
                .all(|(n, v)| cookie(headers, n).is_some_and(|c| c == *v))
            && self.query.iter().all(|(n, v)| {
                query.is_some_and(|q| {
                    form_urlencoded::parse(q.as_bytes()).any(|(k, val)| k == *n && val == *v)
                })
            })
    }
}

/// A route's traffic divided between variants.
pub struct Split {
    pub variants: Vec<Variant>,
    sticky: Stickiness,
    cookie: String,
    cookie_max_age: u64,
    /// Mixed into the draw so that two splits do not put the same callers in the same
    /// buckets.
    salt: Arc<str>,
}

/// Which variant a request goes to, and the cookie to set when the gateway just named an
/// anonymous caller.
pub struct Assignment<'a> {
    pub variant: &'a Variant,
    pub set_cookie: Option<HeaderValue>,
}

/// The longest caller id taken from a cookie; longer ones are replaced.
const MAX_COOKIE_ID: usize = 64;

impl Split {
    pub fn new(
        cfg: &SplitConfig,
        route: &str,
        find: &dyn Fn(&str) -> Option<Arc<Cluster>>,
    ) -> Result<Self, String> {
        let variants = cfg
            .variants
            .iter()
            .map(|v| {
                Ok(Variant {
                    name: v.name.as_str().into(),
                    cluster: find(&v.cluster)
                        .ok_or_else(|| format!("unknown cluster `{}`", v.cluster))?,
                    weight: u64::from(v.weight),
                    when: v.when.as_ref().map(Rules::new).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            variants,
            sticky: cfg.sticky,
            cookie: cfg.cookie.clone(),
            cookie_max_age: cfg.cookie_max_age_secs,
            salt: route.into(),
        })
    }

    /// Chooses the variant of one request. `subject` is the authenticated caller, if any;
    /// `secure`: the client came over TLS (a cookie set is then `Secure`).
    pub fn assign(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        subject: Option<&str>,
        secure: bool,
    ) -> Assignment<'_> {
        if let Some(v) = self
            .variants
            .iter()
            .find(|v| v.when.as_ref().is_some_and(|r| r.matches(headers, query)))
        {
            return Assignment {
                variant: v,
                set_cookie: None,
            };
        }
        let (key, set_cookie) = match self.sticky {
            Stickiness::None => (format!("random:{}", rand::random::<u64>()), None),
            Stickiness::Caller => {
                let known = subject.map(|s| format!("sub:{s}")).or_else(|| {
                    cookie(headers, &self.cookie)
                        .filter(|c| {
                            !c.is_empty()
                                && c.len() <= MAX_COOKIE_ID
                                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        })
                        .map(|c| format!("cookie:{c}"))
                });
                match known {
                    Some(key) => (key, None),
                    None => {
                        let id = uuid::Uuid::new_v4().simple().to_string();
                        let set = HeaderValue::from_str(&format!(
                            "{}={id}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
                            self.cookie,
                            self.cookie_max_age,
                            if secure { "; Secure" } else { "" }
                        ))
                        .ok();
                        (format!("cookie:{id}"), set)
                    }
                }
            }
        };
        Assignment {
            variant: self.pick(&key),
            set_cookie,
        }
    }

    /// Weighted rendezvous hashing: every weighted variant scores the caller
    /// (`-ln(u) / weight`, `u` a hash of caller and variant, uniform in (0, 1)) and the
    /// lowest score wins. Variant `i` wins with probability `weight_i / Σ weight`; changing
    /// one variant's weight moves callers only into it (when it grows) or out of it (when
    /// it shrinks), never between two others.
    fn pick(&self, key: &str) -> &Variant {
        let mut best: Option<(f64, &Variant)> = None;
        for v in self.variants.iter().filter(|v| v.weight > 0) {
            let h = draw(&self.salt, &v.name, key);
            // 53 random bits, shifted off zero: u in (0, 1).
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -u.ln() / v.weight as f64;
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, v));
            }
        }
        // `new` refuses splits without a weighted variant.
        best.map(|(_, v)| v).unwrap_or(&self.variants[0])
    }
}

/// A stable, well-mixed 64-bit hash of a caller for one variant of one route: FNV-1a,
/// then the SplitMix64 finaliser. The same in every gateway instance and version.
fn draw(salt: &str, variant: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt
        .bytes()
        .chain([0])
        .chain(variant.bytes())
        .chain([0])
        .chain(key.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The value of cookie `name`, if the request carries it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_owned())
        })
}

/// Shadow traffic of one route.
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    fraction: f64,
    pub max_body: u64,
    slots: Arc<Semaphore>,
    route: Arc<str>,
}

/// A copy about to be sent, holding its slot.
pub struct Shadow {
    permit: tokio::sync::OwnedSemaphorePermit,
    cluster: Arc<Cluster>,
    route: Arc<str>,
}

impl Mirror {
    pub fn new(cfg: &MirrorConfig, route: &str, cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            fraction: cfg.percent / 100.0,
            max_body: cfg.max_body_bytes,
            slots: Arc::new(Semaphore::new(cfg.max_in_flight)),
            route: route.into(),
        }
    }

    /// Whether this request is to be copied: sampled, and of a size that may be copied.
    pub fn sample(&self, content_length: Option<u64>, bodiless: bool) -> bool {
        if self.fraction <= 0.0 || rand::random::<f64>() >= self.fraction {
            return false;
        }
        if !bodiless && content_length.is_none_or(|n| n > self.max_body) {
            metrics::counter!("gateway_mirror_skipped_total", "route" => self.route.clone(), "reason" => "body").increment(1);
            return false;
        }
        true
    }

    /// A slot for one copy, if one is free.
    pub fn slot(&self) -> Option<Shadow> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Shadow {
                permit,
                cluster: self.cluster.clone(),
                route: self.route.clone(),
            }),
            Err(_) => {
                metrics::counter!("gateway_mirror_skipped_total", "route" => self.route.clone(), "reason" => "busy").increment(1);
                None
            }
        }
    }
}

impl Shadow {
    /// Sends the copy in the background; its answer is read and dropped. Nothing of it
    /// reaches the client.
    pub fn send(
        self,
        method: Method,
        path_and_query: http::uri::PathAndQuery,
        mut headers: HeaderMap,
        body: Option<Bytes>,
        timeout: std::time::Duration,
    ) {
        headers.insert(SHADOW_HEADER, HeaderValue::from_static("true"));
        tokio::spawn(async move {
            let _permit = self.permit;
            let result = tokio::time::timeout(timeout, async {
                let lease = self.cluster.pick(None, None).ok_or("no endpoint")?;
                let uri = Uri::builder()
                    .scheme(lease.endpoint.scheme.clone())
                    .authority(lease.endpoint.authority.clone())
                    .path_and_query(path_and_query)
                    .build()
                    .map_err(|_| "bad uri")?;
                let body = match body {
                    Some(b) => http_body_util::Full::new(b)
                        .map_err(|never| match never {})
                        .boxed(),
                    None => crate::wire::empty(),
                };
                let mut req = Request::new(body);
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.headers_mut() = headers;
                *req.version_mut() = self.cluster.version();
                match self.cluster.client().request(req).await {
                    Ok(res) => {
                        let ok = !res.status().is_server_error();
                        lease.finish(ok);
                        // Read to the end so the connection goes back to the pool.
                        let _ = res.into_body().collect().await;
                        Ok(ok)
                    }
                    Err(_) => {
                        lease.finish(false);
                        Err("unreachable")
                    }
                }
            })
            .await;
            let result = match result {
                Ok(Ok(true)) => "ok",
                Ok(Ok(false)) => "error_status",
                Ok(Err(_)) => "failed",
                Err(_) => "timeout",
            };
            metrics::counter!("gateway_mirror_requests_total", "route" => self.route, "result" => result).increment(1);
        });
    }
}

/// A small whole body, for a request that is both forwarded and copied. `None` when it
/// cannot be read or is longer than `max`.
///
/// (Not `Limited::collect`: awaiting its boxed-error conversion inside the gateway's service
/// future trips rustc's higher-ranked `Send` check.)
pub async fn buffer(mut body: Body, max: u64) -> Option<Bytes> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if (out.len() + data.len()) as u64 > max {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, VariantConfig};

    fn split(weights: &[(&str, u32)], sticky: Stickiness) -> Split {
        let cfg = SplitConfig {
            variants: weights
                .iter()
                .map(|(n, w)| VariantConfig {
                    name: (*n).into(),
                    cluster: "c".into(),
                    weight: *w,
                    when: None,
                })
                .collect(),
            sticky,
            cookie: "v".into(),
            cookie_max_age_secs: 60,
        };
        let c = Arc::new(
            Cluster::new(
                &ClusterConfig::new("c", vec!["http://127.0.0.1:1".into()]),
                None,
                1,
            )
            .unwrap(),
        );
        Split::new(&cfg, "r", &|_| Some(c.clone())).unwrap()
    }

    #[tokio::test]
    async fn weights_are_honoured_and_callers_stick() {
        let s = split(&[("stable", 90), ("canary", 10)], Stickiness::Caller);
        let h = HeaderMap::new();
        let mut canary = 0;
        for i in 0..20_000 {
            let sub = format!("user-{i}");
            let a = s.assign(&h, None, Some(&sub), false);
            assert!(a.set_cookie.is_none());
            let again = s.assign(&h, None, Some(&sub), false);
            assert_eq!(a.variant.name, again.variant.name);
            if &*a.variant.name == "canary" {
                canary += 1;
            }
        }
        let share = canary as f64 / 20_000.0;
        assert!((share - 0.10).abs() < 0.01, "{share}");
    }

    #[tokio::test]
    async fn growing_a_variant_moves_callers_only_into_it() {
        let before = split(&[("a", 90), ("b", 5), ("c", 5)], Stickiness::Caller);
        let after = split(&[("a", 90), ("b", 20), ("c", 5)], Stickiness::Caller);
        let h = HeaderMap::new();
        let mut moved = 0;
        for i in 0..10_000 {
            let sub = format!("u{i}");
            let b = before
                .assign(&h, None, Some(&sub), false)
                .variant
                .name
                .clone();
            let a = after
                .assign(&h, None, Some(&sub), false)
                .variant
                .name
                .clone();
            if a != b {
                assert_eq!(&*a, "b", "caller {sub} moved from {b} to {a}, not into b");
                moved += 1;
            }
        }
        // b goes from 5% to 20/115 ≈ 17.4% of the traffic: about 12% of callers move.
        assert!((1_000..1_500).contains(&moved), "{moved}");
    }

    #[tokio::test]
    async fn anonymous_callers_get_a_cookie_that_keeps_them() {
        let s = split(&[("a", 50), ("b", 50)], Stickiness::Caller);
        let first = s.assign(&HeaderMap::new(), None, None, true);
        let set = first.set_cookie.clone().unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("v=") && set.contains("HttpOnly"), "{set}");
        assert!(set.ends_with("; Secure"), "{set}");
        let pair = set.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(pair).unwrap());
        for _ in 0..20 {
            let a = s.assign(&h, None, None, false);
            assert!(a.set_cookie.is_none());
            assert_eq!(a.variant.name, first.variant.name);
        }
        // A cookie that is not one of ours is replaced.
        h.insert(header::COOKIE, HeaderValue::from_static("v=<script>"));
        assert!(s.assign(&h, None, None, false).set_cookie.is_some());
    }

    #[tokio::test]
    async fn rules_come_first_in_order() {
        let mut s = split(&[("stable", 100), ("b", 0), ("beta", 0)], Stickiness::None);
        s.variants[1].when = Some(
            Rules::new(&VariantRules {
                headers: [("x-variant".to_owned(), "b".to_owned())].into(),
                ..Default::default()
            })
            .unwrap(),
        );
        s.variants[2].when = Some(
            Rules::new(&VariantRules {
                cookies: [("beta".to_owned(), "1".to_owned())].into(),
                query: [("beta".to_owned(), "yes".to_owned())].into(),
                ..Default::default()
            })
            .unwrap(),
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            &*s.assign(&h, Some("beta=yes"), None, false).variant.name,
            "stable"
        );
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; beta=1"));
        assert_eq!(
            &*s.assign(&h, Some("beta=yes"), None, false).variant.name,
            "beta"
        );
        assert_eq!(
            &*s.assign(&h, Some("beta=no"), None, false).variant.name,
            "stable"
        );
        h.insert("x-variant", HeaderValue::from_static("b"));
        assert_eq!(
            &*s.assign(&h, Some("beta=yes"), None, false).variant.name,
            "b"
        );
    }
}
