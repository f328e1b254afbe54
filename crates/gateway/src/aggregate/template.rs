//! Templates of a composite's backend requests: literal text with `{source.steps}`
//! placeholders, parsed and checked once when the configuration loads.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};
use smallvec::{SmallVec, smallvec};

/// Everything but RFC 3986's unreserved characters is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A parameter of the route's path template.
    Path(String),
    /// A query parameter of the client's request.
    Query(String),
    /// A header of the client's request.
    Header(HeaderName),
    /// A claim of the caller's verified token.
    Claims,
    /// The answer of another part (by index).
    Part(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Key(String),
    /// Every element of an array.
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    pub source: Source,
    pub steps: Vec<Step>,
    /// As written, for error messages.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
    /// The length of the literal text, counted once: what a rendering reserves first.
    literal: usize,
}

/// Why a template could not be filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum Unresolved {
    /// The value is absent, null, not a string, number or boolean, or not usable where it
    /// goes (a `.` or `..` path segment). `client`: it came from the client's request (its
    /// path, query or headers), so the client can correct it.
    Missing { what: String, client: bool },
    /// A `*` step found no elements: there is nothing to ask for.
    Empty,
}

/// What templates are filled from.
pub struct Context<'a> {
    /// The route template's parameters, percent-decoded.
    pub params: &'a BTreeMap<String, String>,
    /// The client's query, decoded.
    pub query: &'a [(String, String)],
    pub headers: &'a HeaderMap,
    pub claims: Option<&'a Map<String, Value>>,
    /// The answers of the parts that have finished (their fallback when they failed).
    pub parts: &'a [Option<Arc<Value>>],
}

/// How a filled-in value is written.
#[derive(Clone, Copy, PartialEq)]
pub enum Encoding {
    /// As a path segment: percent-encoded.
    Path,
    /// Raw (query values go through the form encoder afterwards; header values are checked).
    Raw,
}

impl Template {
    /// Parses `text`. `part` resolves a part name to its index, `params` are the route
    /// template's parameter names.
    pub fn parse(
        text: &str,
        part: &dyn Fn(&str) -> Option<usize>,
        params: &[&str],
    ) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    pieces.push(Piece::Lit(rest.to_owned()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("`{text}`: `}}` without `{{`"));
                }
                Some(i) => {
                    if i > 0 {
                        pieces.push(Piece::Lit(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| format!("`{text}`: `{{` without `}}`"))?;
                    let inner = &after[..end];
                    if inner.contains('{') {
                        return Err(format!("`{text}`: nested `{{`"));
                    }
                    pieces.push(Piece::Var(parse_var(inner, part, params)?));
                    rest = &after[end + 1..];
                }
            }
        }
        let literal = pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.len(),
                Piece::Var(_) => 0,
            })
            .sum();
        Ok(Self { pieces, literal })
    }

    /// Whether every value comes from the client's query or headers (optional inputs: a
    /// query parameter built only from them is left out when they are absent).
    pub fn client_only(&self) -> bool {
        self.pieces.iter().all(|p| match p {
            Piece::Lit(_) => true,
            Piece::Var(v) => matches!(v.source, Source::Query(_) | Source::Header(_)),
        })
    }

    /// The parts this template reads from.
    pub fn parts(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(Var {
                source: Source::Part(i),
                ..
            }) => Some(*i),
            _ => None,
        })
    }

    /// Fills the template in.
    pub fn render(&self, cx: &Context<'_>, enc: Encoding) -> Result<String, Unresolved> {
        // The literal text, and room for a value or two, so the string is rarely grown.
        let mut out = String::with_capacity(self.literal + 32);
        for piece in &self.pieces {
            match piece {
                Piece::Lit(l) => out.push_str(l),
                Piece::Var(v) => {
                    let values = resolve(v, cx)?;
                    for (n, value) in values.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        match enc {
                            Encoding::Path => {
                                // A value must not climb out of the configured path.
                                if value == "." || value == ".." {
                                    return Err(Unresolved::Missing {
                                        what: format!("{} (a dot segment)", v.text),
                                        client: v.is_client(),
                                    });
                                }
                                out.extend(utf8_percent_encode(value, SEGMENT));
                            }
                            Encoding::Raw => out.push_str(value),
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_var(
    inner: &str,
    part: &dyn Fn(&str) -> Option<usize>,
    params: &[&str],
) -> Result<Var, String> {
    let mut it = inner.split('.');
    let head = it.next().unwrap_or_default().trim();
    let steps: Vec<&str> = it.collect();
    if steps.iter().any(|s| s.is_empty()) || head.is_empty() {
        return Err(format!("`{{{inner}}}`: empty step"));
    }
    let one = |kind: &str| -> Result<String, String> {
        match steps.as_slice() {
            [name] if *name != "*" => Ok((*name).to_owned()),
            _ => Err(format!("`{{{inner}}}`: write `{{{kind}.NAME}}`")),
        }
    };
    let (source, steps) = match head {
        "path" => {
            let name = one("path")?;
            if !params.contains(&name.as_str()) {
                return Err(format!(
                    "`{{{inner}}}`: the route's template has no parameter `{name}`"
                ));
            }
            (Source::Path(name), Vec::new())
        }
        "query" => (Source::Query(one("query")?), Vec::new()),
        "header" => {
            let name = one("header")?;
            let h = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{{{inner}}}`: `{name}` is not a header name"))?;
            (Source::Header(h), Vec::new())
        }
        "claims" => {
            if steps.is_empty() {
                return Err(format!("`{{{inner}}}`: write `{{claims.NAME}}`"));
            }
            (Source::Claims, steps)
        }
        name => {
            let i = part(name).ok_or_else(|| {
                format!(
                    "`{{{inner}}}`: `{name}` is neither a part nor one of path, query, header, claims"
                )
            })?;
            if steps.is_empty() {
                return Err(format!(
                    "`{{{inner}}}`: name a field of the part, e.g. `{{{name}.id}}`"
                ));
            }
            (Source::Part(i), steps)
        }
    };
    Ok(Var {
        source,
        steps: steps
            .into_iter()
            .map(|s| {
                if s == "*" {
                    Step::All
                } else {
                    Step::Key(s.to_owned())
                }
            })
            .collect(),
        text: format!("{{{inner}}}"),
    })
}

impl Var {
    fn is_client(&self) -> bool {
        matches!(
            self.source,
            Source::Path(_) | Source::Query(_) | Source::Header(_)
        )
    }
}

/// A variable's values, borrowed from the request and the parts' answers where they are text
/// already (one value, without a list allocated, in the common case).
type Values<'c> = SmallVec<[Cow<'c, str>; 1]>;

fn resolve<'c>(v: &Var, cx: &Context<'c>) -> Result<Values<'c>, Unresolved> {
    let missing = || Unresolved::Missing {
        what: v.text.clone(),
        client: v.is_client(),
    };
    let root: &Value = match &v.source {
        Source::Path(name) => {
            return cx
                .params
                .get(name)
                .map(|p| smallvec![Cow::Borrowed(p.as_str())])
                .ok_or_else(missing);
        }
        Source::Query(name) => {
            return cx
                .query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, value)| smallvec![Cow::Borrowed(value.as_str())])
                .ok_or_else(missing);
        }
        Source::Header(name) => {
            return cx
                .headers
                .get(name)
                .and_then(|h| h.to_str().ok())
                .map(|h| smallvec![Cow::Borrowed(h)])
                .ok_or_else(missing);
        }
        Source::Claims => {
            let Some(Step::Key(first)) = v.steps.first() else {
                return Err(missing());
            };
            let value = cx.claims.and_then(|c| c.get(first)).ok_or_else(missing)?;
            let mut out = Values::new();
            walk(value, &v.steps[1..], &mut out).ok_or_else(missing)?;
            return finish(v, out);
        }
        Source::Part(i) => cx
            .parts
            .get(*i)
            .and_then(Option::as_deref)
            .ok_or_else(missing)?,
    };
    let mut out = Values::new();
    walk(root, &v.steps, &mut out).ok_or_else(missing)?;
    finish(v, out)
}

fn finish<'c>(v: &Var, out: Values<'c>) -> Result<Values<'c>, Unresolved> {
    if out.is_empty() && v.steps.contains(&Step::All) {
        return Err(Unresolved::Empty);
    }
    Ok(out)
}

/// Collects the scalar values `steps` lead to; `None` when a step finds nothing or the
/// value is not a scalar.
fn walk<'c>(value: &'c Value, steps: &[Step], out: &mut Values<'c>) -> Option<()> {
    match steps.split_first() {
        None => {
            out.push(match value {
                Value::String(s) => Cow::Borrowed(s.as_str()),
                Value::Number(n) => Cow::Owned(n.to_string()),
                Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
                _ => return None,
            });
            Some(())
        }
        Some((Step::All, rest)) => {
            for item in value.as_array()? {
                walk(item, rest, out)?;
            }
            Some(())
        }
        Some((Step::Key(k), rest)) => {
            let next = match value {
                Value::Object(m) => m.get(k)?,
                Value::Array(a) => a.get(k.parse::<usize>().ok()?)?,
                _ => return None,
            };
            walk(next, rest, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(name: &str) -> Option<usize> {
        ["product", "page"].iter().position(|p| *p == name)
    }

    #[test]
    fn parses_and_renders() {
        let t = Template::parse("/api/items/{path.id}/x", &parts, &["id"]).unwrap();
        let params = BTreeMap::from([("id".to_owned(), "a b/c".to_owned())]);
        let headers = HeaderMap::new();
        let cx = Context {
            params: &params,
            query: &[],
            headers: &headers,
            claims: None,
            parts: &[],
        };
        assert_eq!(
            t.render(&cx, Encoding::Path).unwrap(),
            "/api/items/a%20b%2Fc/x"
        );
        for dots in [".", ".."] {
            let params = BTreeMap::from([("id".to_owned(), dots.to_owned())]);
            let cx = Context {
                params: &params,
                query: &[],
                headers: &headers,
                claims: None,
                parts: &[],
            };
            assert!(matches!(
                t.render(&cx, Encoding::Path),
                Err(Unresolved::Missing { client: true, .. })
            ));
        }
        assert_eq!(t.parts().count(), 0);
    }

    #[test]
    fn part_fields_and_arrays() {
        let t = Template::parse("{page.items.*.id}", &parts, &[]).unwrap();
        assert_eq!(t.parts().collect::<Vec<_>>(), vec![1]);
        let page = Arc::new(json!({"items": [{"id": "a"}, {"id": 2}]}));
        let empty = Arc::new(json!({"items": []}));
        let headers = HeaderMap::new();
        let params = BTreeMap::new();
        let cx = |p: &Arc<Value>| {
            t.render(
                &Context {
                    params: &params,
                    query: &[],
                    headers: &headers,
                    claims: None,
                    parts: &[None, Some(p.clone())],
                },
                Encoding::Raw,
            )
        };
        assert_eq!(cx(&page).unwrap(), "a,2");
        assert_eq!(cx(&empty), Err(Unresolved::Empty));
        let t2 = Template::parse("{product.category}", &parts, &[]).unwrap();
        let cx2 = Context {
            params: &params,
            query: &[],
            headers: &headers,
            claims: None,
            parts: &[Some(Arc::new(json!({"name": "x"})))],
        };
        assert_eq!(
            t2.render(&cx2, Encoding::Raw),
            Err(Unresolved::Missing {
                what: "{product.category}".into(),
                client: false
            })
        );
    }

    #[test]
    fn claims_query_header() {
        let t = Template::parse("{claims.sub}:{query.q}:{header.x-a}", &parts, &[]).unwrap();
        let claims = json!({"sub": "u1"});
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "h".parse().unwrap());
        let params = BTreeMap::new();
        let query = [("q".to_owned(), "v".to_owned())];
        let cx = Context {
            params: &params,
            query: &query,
            headers: &headers,
            claims: claims.as_object(),
            parts: &[],
        };
        assert_eq!(t.render(&cx, Encoding::Raw).unwrap(), "u1:v:h");
    }

    #[test]
    fn bad_templates_are_refused() {
        for (text, want) in [
            ("/a/{nope.x}", "neither a part"),
            ("/a/{path.id}", "no parameter `id`"),
            ("/a/{product}", "name a field"),
            ("/a/{product.x", "without `}`"),
            ("/a/}", "without `{`"),
            ("/a/{query.*}", "write `{query.NAME}`"),
            ("/a/{product..x}", "empty step"),
            ("/a/{header.bad header}", "not a header name"),
        ] {
            let e = Template::parse(text, &parts, &[]).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
