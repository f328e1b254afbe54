//! Validation of a configuration: what its types cannot say (references between clusters
//! and routes, URLs, ranges, exclusive options, templates and composite plans that compile).
//! Kept apart from `config` so that the configuration stays plain data that imports
//! nothing else of the gateway; this layer sits above it and the compilers it borrows
//! (`router`, `aggregate`).

use std::collections::HashSet;

use crate::config::{ConfigError, GatewayConfig, HashOn, LoadBalancer, SplitConfig, parse_cidr};

impl GatewayConfig {
    /// Checks what types cannot: references, URLs, ranges, exclusive options.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(listen) = self.admin.listen
            && !listen.ip().is_loopback()
            && self.admin.token.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError::Invalid(
                "admin: a `token` is required when the admin API listens beyond loopback".into(),
            ));
        }
        if self
            .workers
            .is_some_and(|w| w == 0 || w > crate::worker::MAX_WORKERS)
        {
            return Err(ConfigError::Invalid(format!(
                "workers must be within 1–{}",
                crate::worker::MAX_WORKERS
            )));
        }
        for p in &self.trusted_proxies {
            parse_cidr(p).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "trusted_proxies: `{p}` is not an address or CIDR block"
                ))
            })?;
        }
        let l = &self.limits;
        for (name, value) in [
            ("max_body_bytes", l.max_body_bytes),
            ("max_headers", l.max_headers as u64),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            (
                "max_concurrent_streams",
                u64::from(l.max_concurrent_streams),
            ),
            ("max_connections", l.max_connections as u64),
            ("websocket_idle_timeout_ms", l.websocket_idle_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be positive"
                )));
            }
        }
        if let Some(o) = &self.openapi
            && (!o.path.starts_with('/')
                || crate::router::normalize(&o.path).ok().as_deref() != Some(o.path.as_str()))
        {
            return Err(ConfigError::Invalid(format!(
                "openapi.path `{}` must be a normalised absolute path",
                o.path
            )));
        }
        for c in &self.clusters {
            if let Some(p) = &c.openapi
                && (!p.starts_with('/') || p.contains(['?', '#']))
            {
                return Err(ConfigError::Invalid(format!(
                    "cluster `{}`: openapi `{p}` must be an absolute path",
                    c.name
                )));
            }
        }
        if l.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "limits.max_header_bytes must be at least 8192 (hyper's smallest buffer)".into(),
            ));
        }
        if let Some(j) = &self.jwt {
            http_url(&j.jwks_url)
                .map_err(|r| ConfigError::Invalid(format!("jwt.jwks_url: {r}")))?;
            if let Some(u) = &j.revocations_url {
                http_url(u)
                    .map_err(|r| ConfigError::Invalid(format!("jwt.revocations_url: {r}")))?;
            }
            if j.revocations_poll_ms < 100 || j.jwks_refresh_ms < 100 {
                return Err(ConfigError::Invalid(
                    "jwt.revocations_poll_ms and jwt.jwks_refresh_ms must be at least 100".into(),
                ));
            }
        }
        if let Some(k) = &self.api_keys {
            http::HeaderName::from_bytes(k.header.as_bytes()).map_err(|_| {
                ConfigError::Invalid(format!("api_keys.header: `{}` is not a header", k.header))
            })?;
            let mut names = HashSet::new();
            for key in &k.keys {
                if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ConfigError::Invalid(format!(
                        "api_keys: key `{}`: sha256 must be 64 hex digits",
                        key.name
                    )));
                }
                if !names.insert(&key.name) {
                    return Err(ConfigError::Invalid(format!(
                        "api_keys: duplicate name `{}`",
                        key.name
                    )));
                }
            }
        }
        if let Some(r) = &self.redis
            && !(r.url.starts_with("redis://") || r.url.starts_with("rediss://"))
        {
            return Err(ConfigError::Invalid(
                "redis.url must start with redis:// or rediss://".into(),
            ));
        }

        let mut clusters = HashSet::new();
        for c in &self.clusters {
            let err = |reason: String| ConfigError::Cluster {
                cluster: c.name.clone(),
                reason,
            };
            if !clusters.insert(c.name.as_str()) {
                return Err(err("duplicate name".into()));
            }
            if c.endpoints.is_empty() {
                return Err(err("needs at least one endpoint".into()));
            }
            let mut seen = HashSet::new();
            for e in &c.endpoints {
                check_http_url(e).map_err(|r| err(format!("endpoint `{e}`: {r}")))?;
                if !seen.insert(e) {
                    return Err(err(format!("endpoint `{e}` listed twice")));
                }
            }
            match (c.load_balancer, &c.hash_on) {
                (LoadBalancer::ConsistentHash, None) => {
                    return Err(err("consistent_hash needs `hash_on`".into()));
                }
                (LoadBalancer::ConsistentHash, Some(HashOn::Header(h))) => {
                    http::HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| err(format!("hash_on: `{h}` is not a header name")))?;
                }
                (LoadBalancer::ConsistentHash, Some(HashOn::Cookie(_))) => {}
                (_, Some(_)) => {
                    return Err(err("`hash_on` is only for consistent_hash".into()));
                }
                _ => {}
            }
            if let Some(h) = &c.health_check {
                if !h.path.starts_with('/') {
                    return Err(err("health_check.path must start with `/`".into()));
                }
                if h.interval_ms == 0
                    || h.timeout_ms == 0
                    || h.healthy_threshold == 0
                    || h.unhealthy_threshold == 0
                {
                    return Err(err("health_check values must be positive".into()));
                }
            }
            let b = &c.circuit_breaker;
            if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
                return Err(err("circuit_breaker.failure_rate must be in (0, 1]".into()));
            }
            if b.consecutive_failures == 0
                || b.window_ms < 1000
                || b.open_ms == 0
                || b.half_open_requests == 0
            {
                return Err(err(
                    "circuit_breaker: counts and times must be positive, window_ms ≥ 1000".into(),
                ));
            }
            let t = &c.timeouts;
            if t.connect_ms == 0 || t.request_ms == 0 {
                return Err(err("timeouts must be positive".into()));
            }
            if c.retry.attempts > 5
                || !(0.0..=100.0).contains(&c.retry.budget_percent)
                || c.retry.min_per_sec > 1_000_000
            {
                return Err(err(
                    "retry: at most 5 attempts, budget_percent within 0–100, min_per_sec ≤ 1e6"
                        .into(),
                ));
            }
        }

        let mut names = HashSet::new();
        for r in &self.routes {
            let err = |reason: String| ConfigError::Route {
                route: r.name.clone(),
                reason,
            };
            if !names.insert(r.name.as_str()) {
                return Err(err("duplicate name".into()));
            }
            match (&r.cluster, &r.split, &r.aggregate) {
                (Some(c), None, None) => {
                    if !clusters.contains(c.as_str()) {
                        return Err(err(format!("unknown cluster `{c}`")));
                    }
                }
                (None, Some(split), None) => split.validate(&clusters).map_err(err)?,
                (None, None, Some(a)) => {
                    for (set, key) in [
                        (r.mirror.is_some(), "mirror"),
                        (r.max_body_bytes.is_some(), "max_body_bytes"),
                        (r.websocket, "websocket"),
                    ] {
                        if set {
                            return Err(err(format!(
                                "`{key}` does not apply to an `aggregate` route"
                            )));
                        }
                    }
                    if r.rewrite.is_some() {
                        return Err(err(
                            "`rewrite` does not apply to an `aggregate` route".into()
                        ));
                    }
                    if r.matches
                        .methods
                        .iter()
                        .any(|m| !m.eq_ignore_ascii_case("GET") && !m.eq_ignore_ascii_case("HEAD"))
                    {
                        return Err(err("an `aggregate` route answers only GET and HEAD".into()));
                    }
                    crate::aggregate::Plan::compile(
                        a,
                        &|c| clusters.contains(c),
                        r.matches.template.as_deref(),
                    )
                    .map_err(err)?;
                }
                _ => {
                    return Err(err(
                        "needs exactly one of `cluster`, `split` and `aggregate`".into(),
                    ));
                }
            }
            if let Some(m) = &r.mirror {
                if !clusters.contains(m.cluster.as_str()) {
                    return Err(err(format!("mirror: unknown cluster `{}`", m.cluster)));
                }
                if !(0.0..=100.0).contains(&m.percent) {
                    return Err(err("mirror.percent must be within 0–100".into()));
                }
                if m.max_in_flight == 0 || m.max_in_flight > 100_000 {
                    return Err(err("mirror.max_in_flight must be within 1–100000".into()));
                }
                if m.max_body_bytes > 16 * 1024 * 1024 {
                    return Err(err(
                        "mirror.max_body_bytes is at most 16 MiB (copied bodies are held in memory)"
                            .into(),
                    ));
                }
            }
            if r.max_body_bytes == Some(0) {
                return Err(err("max_body_bytes must be positive".into()));
            }
            let m = &r.matches;
            let kinds = [&m.prefix, &m.exact, &m.template]
                .iter()
                .filter(|k| k.is_some())
                .count();
            if kinds != 1 {
                return Err(err(
                    "match needs exactly one of `prefix`, `exact`, `template`".into(),
                ));
            }
            for p in [&m.prefix, &m.exact, &m.template].into_iter().flatten() {
                if !p.starts_with('/') {
                    return Err(err(format!("path `{p}` must start with `/`")));
                }
            }
            if let Some(t) = &m.template {
                crate::router::Template::parse(t).map_err(err)?;
            }
            for method in &m.methods {
                http::Method::from_bytes(method.as_bytes())
                    .map_err(|_| err(format!("`{method}` is not a method")))?;
            }
            for (name, value) in &m.headers {
                http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| err(format!("`{name}` is not a header name")))?;
                http::HeaderValue::from_str(value)
                    .map_err(|_| err(format!("header `{name}`: value not allowed")))?;
            }
            if let Some(rw) = &r.rewrite {
                if let Some(strip) = &rw.strip_prefix {
                    let pattern = [&m.prefix, &m.exact, &m.template]
                        .into_iter()
                        .flatten()
                        .next()
                        .map(|p| p.to_ascii_lowercase())
                        .unwrap_or_default();
                    let strip = strip.trim_end_matches('/').to_ascii_lowercase();
                    let fits = pattern.starts_with(&strip)
                        && matches!(pattern.as_bytes().get(strip.len()), None | Some(b'/'));
                    if !strip.starts_with('/') || !fits {
                        return Err(err(format!(
                            "rewrite.strip_prefix `{strip}` is not a leading part of the match path"
                        )));
                    }
                }
                if let Some(add) = &rw.add_prefix
                    && !add.starts_with('/')
                {
                    return Err(err("rewrite.add_prefix must start with `/`".into()));
                }
            }
            let needs_auth =
                r.auth.required || !r.auth.roles.is_empty() || !r.auth.scopes.is_empty();
            if needs_auth && self.jwt.is_none() && self.api_keys.is_none() {
                return Err(err(
                    "requires authentication but neither `jwt` nor `api_keys` is configured".into(),
                ));
            }
            if let Some(rl) = &r.rate_limit {
                if !(rl.per_second > 0.0 && rl.per_second.is_finite()) || rl.burst == 0 {
                    return Err(err(
                        "rate_limit: per_second and burst must be positive".into()
                    ));
                }
                if rl.shared && self.redis.is_none() {
                    return Err(err("rate_limit.shared needs a `redis` section".into()));
                }
            }
            if r.timeout_ms == Some(0) {
                return Err(err("timeout_ms must be positive".into()));
            }
        }
        Ok(())
    }
}

impl SplitConfig {
    fn validate(&self, clusters: &HashSet<&str>) -> Result<(), String> {
        if self.variants.is_empty() {
            return Err("split needs at least one variant".into());
        }
        let mut names = HashSet::new();
        let mut total: u64 = 0;
        for v in &self.variants {
            if !names.insert(v.name.as_str()) {
                return Err(format!("split: variant `{}` listed twice", v.name));
            }
            if v.name.is_empty() || !v.name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "split: variant name `{}` must be printable ASCII",
                    v.name
                ));
            }
            if !clusters.contains(v.cluster.as_str()) {
                return Err(format!(
                    "split: variant `{}`: unknown cluster `{}`",
                    v.name, v.cluster
                ));
            }
            if v.weight > 1_000_000 {
                return Err(format!(
                    "split: variant `{}`: weight at most 1000000",
                    v.name
                ));
            }
            total += u64::from(v.weight);
            if let Some(w) = &v.when {
                if w.headers.is_empty() && w.cookies.is_empty() && w.query.is_empty() {
                    return Err(format!("split: variant `{}`: `when` is empty", v.name));
                }
                for (name, value) in &w.headers {
                    http::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("split: `{name}` is not a header name"))?;
                    if name
                        .to_ascii_lowercase()
                        .starts_with(shopmesh_platform::TRUSTED_HEADER_PREFIX)
                    {
                        return Err(format!(
                            "split: `{name}` is removed from every client request; a rule on it never holds"
                        ));
                    }
                    http::HeaderValue::from_str(value)
                        .map_err(|_| format!("split: header `{name}`: value not allowed"))?;
                }
            }
        }
        if total == 0 {
            return Err("split: the weights add up to 0; give some variant a weight".into());
        }
        if self.cookie_max_age_secs == 0 {
            return Err("split.cookie_max_age_secs must be positive".into());
        }
        let cookie_ok = !self.cookie.is_empty()
            && self
                .cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !cookie_ok {
            return Err(format!("split: `{}` is not a cookie name", self.cookie));
        }
        Ok(())
    }
}

/// An `http://host:port…` URL.
fn http_url(url: &str) -> Result<http::Uri, &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a valid URL")?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err("must be an http://host:port URL");
    }
    Ok(uri)
}

/// An endpoint's base URL: `http://host:port`, no path.
fn check_http_url(url: &str) -> Result<(), &'static str> {
    let uri = http_url(url)?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("must not have a path");
    }
    Ok(())
}
