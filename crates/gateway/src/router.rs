//! Path normalisation and route matching.
//!
//! Every path is normalised before it is matched, and the normalised path is the one
//! forwarded, so the gateway and the upstream always agree on what was asked for:
//! percent-encoded characters that may appear raw are decoded (`%2e` is `.`, `%40` is `@`),
//! dot segments are resolved, repeated slashes merged. Encoded slashes and backslashes
//! (`%2f`, `%5c`, `\`) are refused: upstreams disagree on what they mean. Route literals go
//! through the same normalisation and are compared ignoring ASCII case, ignoring `;params`
//! in segments (servlet containers drop them) and, for exact paths, a trailing slash. So
//! `/API/Admin`, `/api/admin;x` and `/api/%61dmin/` all meet the auth of `/api/admin`.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::RouteMatch;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path holds a malformed percent-encoding")]
    BadEncoding,
    #[error("encoded slashes and backslashes are not accepted in paths")]
    EncodedSlash,
}

/// Escapes decoded by normalisation: every byte a path may carry raw (as the `http` crate
/// accepts it), except `%`, `/` and `\`. So `/api/%40admin` and `/api/@admin` are one path
/// to the router, as they are to most upstreams.
fn decodable(b: u8) -> bool {
    matches!(b, 0x21 | 0x24 | 0x26..=0x2E | 0x30..=0x3B | 0x3D | 0x40..=0x5B | 0x5D..=0x5F
        | 0x61..=0x7A | 0x7C | 0x7E)
}

/// Normalises a request path (RFC 3986 §6.2.2, plus slash merging).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path) {
        return Ok(path.to_owned());
    }
    normalize_slowly(path)
}

/// Whether `path` (absolute) is already what [`normalize`] makes of it: no escape, no
/// backslash, no `;`, no empty, `.` or `..` segment (a trailing slash is kept). The usual
/// request, taken as it is.
fn is_normal(path: &str) -> bool {
    if path.bytes().any(|c| matches!(c, b'%' | b'\\' | b';')) {
        return false;
    }
    if path == "/" {
        return true;
    }
    let body = &path[1..];
    let body = body.strip_suffix('/').unwrap_or(body);
    !body.is_empty()
        && body
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// [`normalize`] worked out in full.
fn normalize_slowly(path: &str) -> Result<String, PathError> {
    // 1. Percent-decoding of unreserved characters; other escapes kept, in upper case.
    let bytes = path.as_bytes();
    // Bytes, not chars: a path may hold raw UTF-8, which must pass through unchanged.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) else {
                    return Err(PathError::BadEncoding);
                };
                let v = (h * 16 + l) as u8;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSlash);
                }
                if decodable(v) {
                    decoded.push(v);
                } else {
                    decoded.push(b'%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase());
                    decoded.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EncodedSlash),
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was added or replaced, so the bytes are still the UTF-8 they came as.
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::BadEncoding)?;
    // 2. Dot segments and empty segments.
    let trailing = decoded.len() > 1 && decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        // `..;x` is `..` to servlet containers: resolve it here, not upstream.
        match seg.split(';').next().unwrap_or("") {
            "" | "." if seg.len() <= 1 || seg.starts_with(".;") || seg.starts_with(';') => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if norm.is_empty() || (trailing && !out.is_empty()) {
        norm.push('/');
    }
    Ok(norm)
}

/// The path as routes see it: `;params` removed from every segment.
pub fn match_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or(""));
    }
    std::borrow::Cow::Owned(out)
}

/// A path template: `/api/products/{id}`, `/files/{*rest}`.
#[derive(Debug, Clone)]
pub struct Template {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

impl Template {
    /// The names of its `{param}` and `{*rest}` segments.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    pub fn parse(t: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let parts: Vec<&str> = t.trim_start_matches('/').split('/').collect();
        let mut names = std::collections::HashSet::new();
        for (i, p) in parts.iter().enumerate() {
            if let Some(inner) = p.strip_prefix('{') {
                let inner = inner
                    .strip_suffix('}')
                    .ok_or_else(|| format!("template `{t}`: unclosed `{{` in `{p}`"))?;
                let (rest, name) = match inner.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, inner),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!("template `{t}`: bad parameter name `{p}`"));
                }
                if !names.insert(name.to_owned()) {
                    return Err(format!("template `{t}`: parameter `{name}` used twice"));
                }
                if rest && i + 1 != parts.len() {
                    return Err(format!("template `{t}`: `{{*{name}}}` must come last"));
                }
                segments.push(if rest {
                    Segment::Rest(name.to_owned())
                } else {
                    Segment::Param(name.to_owned())
                });
            } else if p.contains(['{', '}']) {
                return Err(format!(
                    "template `{t}`: braces must enclose a whole segment"
                ));
            } else if !p.is_empty() {
                segments.push(Segment::Literal(p.to_ascii_lowercase()));
            }
        }
        Ok(Self { segments })
    }

    /// Path parameters when `path` (normalised) fits the template.
    pub fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let mut params = BTreeMap::new();
        let trimmed = path.trim_start_matches('/');
        let mut rest = if trimmed.is_empty() {
            Vec::new()
        } else {
            trimmed.split('/').collect::<Vec<_>>()
        };
        if rest.last() == Some(&"") {
            rest.pop();
        }
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => {
                    if !rest.get(i)?.eq_ignore_ascii_case(l) {
                        return None;
                    }
                }
                Segment::Param(n) => {
                    params.insert(n.clone(), (*rest.get(i)?).to_owned());
                }
                Segment::Rest(n) => {
                    params.insert(n.clone(), rest[i.min(rest.len())..].join("/"));
                    return Some(params);
                }
            }
            i += 1;
        }
        (i == rest.len()).then_some(params)
    }
}

#[derive(Debug, Clone)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Template(Template),
}

/// A compiled [`RouteMatch`].
#[derive(Debug, Clone)]
pub struct Matcher {
    path: PathMatch,
    host: Option<String>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty()
        || (path.len() >= p.len()
            && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/'))
}

impl Matcher {
    /// Compiles a match; [`crate::config::GatewayConfig::validate`] has checked it.
    pub fn new(m: &RouteMatch) -> Result<Self, String> {
        let path = match (&m.prefix, &m.exact, &m.template) {
            (Some(p), None, None) => PathMatch::Prefix(normalize(p).map_err(|e| e.to_string())?),
            (None, Some(e), None) => PathMatch::Exact(normalize(e).map_err(|e| e.to_string())?),
            (None, None, Some(t)) => {
                PathMatch::Template(Template::parse(&normalize(t).map_err(|e| e.to_string())?)?)
            }
            _ => return Err("match needs exactly one of `prefix`, `exact`, `template`".into()),
        };
        Ok(Self {
            path,
            host: m.host.as_ref().map(|h| h.to_ascii_lowercase()),
            methods: m
                .methods
                .iter()
                .filter_map(|s| Method::from_bytes(s.to_ascii_uppercase().as_bytes()).ok())
                .collect(),
            headers: m
                .headers
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        })
    }

    /// Whether the request fits, with its path parameters.
    pub fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<BTreeMap<String, String>> {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return None;
        }
        if let Some(want) = &self.host {
            let h = host?;
            let h = h.rsplit_once(':').map_or(h, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(']')
                    || name.ends_with(']')
                {
                    name
                } else {
                    h
                }
            });
            if !h.eq_ignore_ascii_case(want) {
                return None;
            }
        }
        for (n, v) in &self.headers {
            if headers.get(n) != Some(v) {
                return None;
            }
        }
        match &self.path {
            PathMatch::Prefix(p) => prefix_matches(p, path).then(BTreeMap::new),
            PathMatch::Exact(e) => {
                let trim = |p: &str| p.trim_end_matches('/').len();
                (path.as_bytes()[..trim(path)].eq_ignore_ascii_case(&e.as_bytes()[..trim(e)]))
                    .then(BTreeMap::new)
            }
            PathMatch::Template(t) => t.matches(path),
        }
    }

    pub fn describe(&self) -> String {
        match &self.path {
            PathMatch::Prefix(p) => format!("prefix {p}"),
            PathMatch::Exact(e) => format!("exact {e}"),
            PathMatch::Template(_) => "template".into(),
        }
    }
}

/// What a route's path pattern needs of a path, segment by segment (for [`RouteIndex`]).
enum Key<'a> {
    Literal(&'a str),
    Param,
}

impl Matcher {
    /// The pattern's segments, and how it ends: `Some(true)` a prefix, `Some(false)` an
    /// exact end, `None` a `{*rest}`.
    fn index_key(&self) -> (Vec<Key<'_>>, Option<bool>) {
        fn literal(p: &str) -> Vec<Key<'_>> {
            p.split('/')
                .filter(|s| !s.is_empty())
                .map(Key::Literal)
                .collect()
        }
        match &self.path {
            PathMatch::Prefix(p) => (literal(p), Some(true)),
            PathMatch::Exact(e) => (literal(e), Some(false)),
            PathMatch::Template(t) => {
                let mut keys = Vec::with_capacity(t.segments.len());
                for seg in &t.segments {
                    match seg {
                        Segment::Literal(l) => keys.push(Key::Literal(l)),
                        Segment::Param(_) => keys.push(Key::Param),
                        Segment::Rest(_) => return (keys, None),
                    }
                }
                (keys, Some(false))
            }
        }
    }
}

/// The routes' path patterns compiled into a tree of segments, so that finding the routes
/// a path can match costs the path's length, not the number of routes. Lookup keeps the
/// gateway's semantics: the candidates are tried in declaration order with their full
/// match (method, host, headers), and the first that fits wins.
#[derive(Debug, Default)]
pub struct RouteIndex {
    root: IndexNode,
}

#[derive(Debug, Default)]
struct IndexNode {
    /// Literal segments, lower-cased, sorted.
    literals: Vec<(Box<str>, IndexNode)>,
    param: Option<Box<IndexNode>>,
    /// Routes whose pattern is a prefix ending here, or a template ending in `{*rest}`:
    /// any path through this node matches.
    below: Vec<u32>,
    /// Routes whose pattern ends exactly here.
    end: Vec<u32>,
}

impl IndexNode {
    fn child(&mut self, literal: &str) -> &mut IndexNode {
        let key = literal.to_ascii_lowercase();
        let i = match self
            .literals
            .binary_search_by(|(k, _)| k.as_ref().cmp(key.as_str()))
        {
            Ok(i) => i,
            Err(i) => {
                self.literals
                    .insert(i, (key.into_boxed_str(), IndexNode::default()));
                i
            }
        };
        &mut self.literals[i].1
    }

    fn find(&self, segment: &str) -> Option<&IndexNode> {
        self.literals
            .binary_search_by(|(k, _)| {
                let (k, s) = (k.as_bytes(), segment.as_bytes());
                k.iter()
                    .map(|b| b.to_ascii_lowercase())
                    .cmp(s.iter().map(|b| b.to_ascii_lowercase()))
            })
            .ok()
            .map(|i| &self.literals[i].1)
    }

    fn collect(&self, segments: &[&str], out: &mut Vec<u32>) {
        out.extend_from_slice(&self.below);
        let Some((first, rest)) = segments.split_first() else {
            out.extend_from_slice(&self.end);
            return;
        };
        if let Some(c) = self.find(first) {
            c.collect(rest, out);
        }
        if let Some(p) = &self.param {
            p.collect(rest, out);
        }
    }
}

impl RouteIndex {
    /// Indexes matchers in declaration order.
    pub fn new<'a>(matchers: impl IntoIterator<Item = &'a Matcher>) -> Self {
        let mut root = IndexNode::default();
        for (i, m) in matchers.into_iter().enumerate() {
            let (keys, end) = m.index_key();
            let mut node = &mut root;
            for k in keys {
                node = match k {
                    Key::Literal(l) => node.child(l),
                    Key::Param => node.param.get_or_insert_with(Default::default),
                };
            }
            let at = i as u32;
            match end {
                Some(false) => node.end.push(at),
                Some(true) | None => node.below.push(at),
            }
        }
        Self { root }
    }

    /// The indexes of the routes whose path pattern `path` (normalised, `;params` removed)
    /// fits, in declaration order. The routes' other conditions are left to the caller.
    pub fn candidates(&self, path: &str, out: &mut Vec<u32>) {
        out.clear();
        let mut segments: smallvec_like::Segments<'_> = smallvec_like::Segments::default();
        for s in path.split('/').filter(|s| !s.is_empty()) {
            segments.push(s);
        }
        self.root.collect(segments.as_slice(), out);
        out.sort_unstable();
        out.dedup();
    }
}

/// A path's segments without an allocation for the usual depth.
mod smallvec_like {
    const INLINE: usize = 16;

    #[derive(Default)]
    pub struct Segments<'a> {
        inline: [&'a str; INLINE],
        len: usize,
        spilled: Vec<&'a str>,
    }

    impl<'a> Segments<'a> {
        pub fn push(&mut self, s: &'a str) {
            if self.len < INLINE && self.spilled.is_empty() {
                self.inline[self.len] = s;
                self.len += 1;
            } else {
                if self.spilled.is_empty() {
                    self.spilled.extend_from_slice(&self.inline[..self.len]);
                }
                self.spilled.push(s);
            }
        }

        pub fn as_slice(&self) -> &[&'a str] {
            if self.spilled.is_empty() {
                &self.inline[..self.len]
            } else {
                &self.spilled
            }
        }
    }
}

/// Applies a rewrite to a normalised path.
pub fn rewrite(path: &str, strip: Option<&str>, add: Option<&str>) -> String {
    let mut p = path;
    if let Some(s) = strip {
        let s = s.trim_end_matches('/');
        if prefix_matches(s, p) {
            p = &p[s.len()..];
        }
    }
    let add = add.map(|a| a.trim_end_matches('/')).unwrap_or("");
    let mut out = String::with_capacity(add.len() + p.len() + 1);
    out.push_str(add);
    if !p.starts_with('/') {
        out.push('/');
    }
    out.push_str(p);
    out
}

#[cfg(test)]
mod tests {
    /// The index finds exactly the routes a linear scan finds, first match first, over
    /// many random tables and paths (prefixes, exact paths, templates with parameters and
    /// `{*rest}`, mixed case, trailing slashes).
    #[test]
    fn the_index_agrees_with_a_linear_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let words = ["a", "B", "c", "api", "Orders"];
        let mut checked = 0;
        for _ in 0..300 {
            let n = rng.gen_range(1..30);
            let mut matchers = Vec::new();
            for _ in 0..n {
                let depth = rng.gen_range(0..4);
                let mut path = String::new();
                let kind = rng.gen_range(0..3);
                for d in 0..depth {
                    let w = if kind == 2 && rng.gen_bool(0.3) {
                        if d + 1 == depth && rng.gen_bool(0.3) {
                            format!("{{*r{d}}}")
                        } else {
                            format!("{{p{d}}}")
                        }
                    } else {
                        words[rng.gen_range(0..words.len())].to_owned()
                    };
                    path.push('/');
                    path.push_str(&w);
                }
                if path.is_empty() || rng.gen_bool(0.1) {
                    path.push('/');
                }
                let m = match kind {
                    0 => RouteMatch {
                        prefix: Some(path),
                        ..Default::default()
                    },
                    1 => RouteMatch {
                        exact: Some(path),
                        ..Default::default()
                    },
                    _ => RouteMatch {
                        template: Some(path),
                        ..Default::default()
                    },
                };
                if let Ok(m) = Matcher::new(&m) {
                    matchers.push(m);
                }
            }
            let index = RouteIndex::new(&matchers);
            let mut found = Vec::new();
            for _ in 0..40 {
                let depth = rng.gen_range(0..5);
                let mut path = String::new();
                for _ in 0..depth {
                    path.push('/');
                    let w = words[rng.gen_range(0..words.len())];
                    path.push_str(&if rng.gen_bool(0.5) {
                        w.to_ascii_uppercase()
                    } else {
                        w.to_owned()
                    });
                }
                if path.is_empty() || rng.gen_bool(0.2) {
                    path.push('/');
                }
                let linear: Vec<u32> = matchers
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| {
                        m.matches(&Method::GET, None, &path, &HeaderMap::new())
                            .is_some()
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                index.candidates(&path, &mut found);
                let indexed: Vec<u32> = found
                    .iter()
                    .copied()
                    .filter(|&i| {
                        matchers[i as usize]
                            .matches(&Method::GET, None, &path, &HeaderMap::new())
                            .is_some()
                    })
                    .collect();
                assert_eq!(indexed, linear, "{path} against {matchers:?}");
                // Every route the scan matches is a candidate.
                assert!(linear.iter().all(|i| found.contains(i)));
                checked += 1;
            }
        }
        assert_eq!(checked, 12_000);
    }

    use super::*;

    /// The shortcut for paths already normal gives what the full work gives, over every
    /// path of up to four segments from a set of tricky ones, with and without a trailing
    /// slash.
    #[test]
    fn the_shortcut_agrees_with_the_full_normalisation() {
        let segs = ["a", "", ".", "..", "b;c", "%2e", "x%41", "%2F", "..;x", "C"];
        let mut paths = vec!["/".to_owned()];
        let mut level = vec![String::new()];
        for _ in 0..4 {
            level = level
                .iter()
                .flat_map(|p| segs.iter().map(move |s| format!("{p}/{s}")))
                .collect();
            paths.extend(level.iter().cloned());
            paths.extend(level.iter().map(|p| format!("{p}/")));
        }
        let mut shortcut = 0;
        for p in &paths {
            shortcut += usize::from(super::is_normal(p));
            assert_eq!(
                super::normalize(p).ok(),
                super::normalize_slowly(p).ok(),
                "{p}"
            );
        }
        assert!(shortcut > 50, "the shortcut was taken {shortcut} times");
    }

    #[test]
    fn normalisation_resolves_tricks() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/orders", "/api/orders"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("//admin", "/admin"),
            ("/api//orders///1", "/api/orders/1"),
            ("/./api/./x", "/api/x"),
            ("/../../etc", "/etc"),
            ("/api/orders/", "/api/orders/"),
            ("/%61dmin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/api/%40admin", "/api/@admin"),
            ("/api/..;/admin", "/admin"),
            ("/api/.;x/admin", "/api/admin"),
            ("/api/;x/admin", "/api/admin"),
            ("/a%25b", "/a%25b"),
            ("/a%23b", "/a%23b"),
            ("/caf\u{e9}/%2e%2e/na\u{ef}ve", "/na\u{ef}ve"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a\\b"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEncoding));
        assert_eq!(normalize("a"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn matrix_parameters_are_ignored_for_matching() {
        assert_eq!(match_path("/api/admin;x"), "/api/admin");
        assert_eq!(match_path("/api;a=1/admin;b/x"), "/api/admin/x");
        assert_eq!(match_path("/plain"), "/plain");
        let m = Matcher::new(&RouteMatch {
            exact: Some("/api/admin".into()),
            ..Default::default()
        })
        .unwrap();
        let h = HeaderMap::new();
        assert!(m.matches(&Method::GET, None, "/api/admin/", &h).is_some());
        assert!(m.matches(&Method::GET, None, "/api/admins", &h).is_none());
        let p = Matcher::new(&RouteMatch {
            prefix: Some("/api/%40admin".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(p.matches(&Method::GET, None, "/api/@admin/x", &h).is_some());
    }

    #[test]
    fn templates_bind_parameters() {
        let t = Template::parse("/api/products/{id}").unwrap();
        let p = t.matches("/api/products/42").unwrap();
        assert_eq!(p["id"], "42");
        assert!(t.matches("/API/Products/42").is_some());
        assert!(t.matches("/api/products").is_none());
        assert!(t.matches("/api/products/42/x").is_none());
        let r = Template::parse("/files/{*rest}").unwrap();
        assert_eq!(r.matches("/files/a/b/c").unwrap()["rest"], "a/b/c");
        assert_eq!(r.matches("/files").unwrap()["rest"], "");
        assert!(Template::parse("/a/{id").is_err());
        assert!(Template::parse("/a/{*x}/b").is_err());
        assert!(Template::parse("/a/x{id}").is_err());
        assert!(Template::parse("/a/{id}/{id}").is_err());
    }

    fn matcher(yaml_like: RouteMatch) -> Matcher {
        Matcher::new(&yaml_like).unwrap()
    }

    #[test]
    fn matchers_check_method_host_headers_and_case() {
        let m = matcher(RouteMatch {
            prefix: Some("/api/orders".into()),
            host: Some("shop.example".into()),
            methods: vec!["post".into()],
            headers: [("x-env".to_owned(), "beta".to_owned())].into(),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        h.insert("x-env", HeaderValue::from_static("beta"));
        let ok = |method: &Method, host: &str, path: &str, h: &HeaderMap| {
            m.matches(method, Some(host), path, h).is_some()
        };
        assert!(ok(&Method::POST, "shop.example", "/api/orders/1", &h));
        assert!(ok(&Method::POST, "SHOP.example:8080", "/API/Orders", &h));
        assert!(!ok(&Method::GET, "shop.example", "/api/orders", &h));
        assert!(!ok(&Method::POST, "other", "/api/orders", &h));
        assert!(!ok(&Method::POST, "shop.example", "/api/ordersx", &h));
        assert!(!ok(
            &Method::POST,
            "shop.example",
            "/api/orders",
            &HeaderMap::new()
        ));
    }

    #[test]
    fn rewrites_strip_and_add() {
        assert_eq!(rewrite("/api/orders/1", Some("/api"), None), "/orders/1");
        assert_eq!(rewrite("/api", Some("/api"), None), "/");
        assert_eq!(rewrite("/API/x", Some("/api"), Some("/v1/")), "/v1/x");
        assert_eq!(rewrite("/x", None, Some("/v2")), "/v2/x");
    }
}
