//! The HTML report: one self-contained page (inline CSS and SVG, no script, nothing loaded
//! from elsewhere) with the summary table, then per finding its claim, method, rule,
//! verdict, charts and every figure.

use std::fmt::Write as _;

use crate::LabError;
use crate::chart;
use crate::report::{Finding, Outcome, Report};

/// Text made safe for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h3 { font-size: 1.05em; margin: 1.6em 0 .3em; }
.meta { color: #555; }
table { border-collapse: collapse; width: 100%; margin: .6em 0; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { display: inline-block; padding: 0 .5em; border-radius: .6em; font-weight: 600; font-size: .9em; }
.holds { background: #d9f2e3; color: #0b5d2a; }
.mitigated { background: #dcebfa; color: #0b4a82; }
.partly { background: #fdf1d2; color: #7a5300; }
.refuted { background: #f9dcdc; color: #8a1c1c; }
.inconclusive, .failed { background: #ececec; color: #444; }
.failed { background: #f3c7c7; }
figure { margin: 1em 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
details summary { cursor: pointer; color: #0b4a82; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dt { font-weight: 600; color: #555; }
dd { margin: 0; }
"#;

fn badge(o: Outcome) -> String {
    format!(
        r#"<span class="verdict {0}">{0}</span>"#,
        escape(o.as_str())
    )
}

fn value(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn finding(out: &mut String, f: &Finding) -> Result<(), LabError> {
    let w = |e: std::fmt::Error| LabError::Chart(e.to_string());
    write!(
        out,
        r#"<h3 id="{id}">{claim} {badge}</h3>
<dl>
<dt>Experiment</dt><dd><code>{id}</code>: {experiment}</dd>
<dt>Method</dt><dd>{method}</dd>
<dt>Verdict rule</dt><dd>{rule}</dd>
<dt>Verdict</dt><dd>{badge} {because}</dd>
<dt>Figure</dt><dd>{headline}</dd>
<dt>Took</dt><dd>{secs:.1} s</dd>
</dl>
"#,
        id = escape(f.id),
        claim = escape(f.claim),
        badge = badge(f.verdict.outcome),
        experiment = escape(f.experiment),
        method = escape(f.method),
        rule = escape(f.rule),
        because = escape(&f.verdict.because),
        headline = escape(&f.headline),
        secs = f.seconds,
    )
    .map_err(w)?;
    for c in &f.charts {
        writeln!(out, "<figure>{}</figure>", chart::svg(c)?).map_err(w)?;
    }
    if !f.figures.is_empty() {
        out.push_str("<details><summary>Every figure</summary><table><tr><th>figure</th><th>value</th><th>unit</th></tr>\n");
        for fig in &f.figures.0 {
            writeln!(
                out,
                r#"<tr><td><code>{}</code></td><td class="num">{}</td><td>{}</td></tr>"#,
                escape(&fig.key),
                value(fig.value),
                escape(fig.unit)
            )
            .map_err(w)?;
        }
        out.push_str("</table></details>\n");
    }
    Ok(())
}

/// The whole page.
pub fn render(r: &Report) -> Result<String, LabError> {
    let w = |e: std::fmt::Error| LabError::Chart(e.to_string());
    let mut out = String::new();
    write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shopmesh pattern lab</title>
<style>{STYLE}</style>
</head>
<body>
<h1>shopmesh pattern lab</h1>
<p class="meta">The claims of the design document about four microservice patterns, measured on a running shop.
Run {started}, {secs:.0} s, scale <code>{scale}</code>; {cpus} CPU(s), {os}/{arch}; {storage}, {broker} broker.</p>
<h2>Summary</h2>
<table>
<tr><th>claim</th><th>experiment</th><th>figure</th><th>verdict</th></tr>
"#,
        started = escape(&r.started_at),
        secs = r.seconds,
        scale = escape(r.machine.scale),
        cpus = r.machine.cpus,
        os = escape(r.machine.os),
        arch = escape(r.machine.arch),
        storage = escape(&r.machine.storage),
        broker = escape(&r.machine.broker),
    )
    .map_err(w)?;
    for f in &r.findings {
        writeln!(
            out,
            "<tr><td>{}</td><td><a href=\"#{id}\"><code>{id}</code></a></td><td>{}</td><td>{}</td></tr>",
            escape(f.claim),
            escape(&f.headline),
            badge(f.verdict.outcome),
            id = escape(f.id),
        )
        .map_err(w)?;
    }
    out.push_str("</table>\n");
    for g in crate::report::Group::ALL {
        let of: Vec<&Finding> = r.findings.iter().filter(|f| f.group == g).collect();
        let missing: Vec<_> = r.not_measured.iter().filter(|n| n.group == g).collect();
        if of.is_empty() && missing.is_empty() {
            continue;
        }
        writeln!(out, "<h2>{}</h2>", escape(g.title())).map_err(w)?;
        for f in of {
            finding(&mut out, f)?;
        }
        if !missing.is_empty() {
            out.push_str("<p><strong>Not measured yet:</strong></p><ul>\n");
            for n in missing {
                writeln!(out, "<li>{} — {}</li>", escape(n.claim), escape(n.why)).map_err(w)?;
            }
            out.push_str("</ul>\n");
        }
    }
    out.push_str("</body>\n</html>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Chart, Figures, Group, Machine, Series, Verdict};

    #[test]
    fn the_page_is_self_contained_and_escapes_text() {
        let mut figures = Figures::default();
        figures.push("a.p50_ms", 1.25, "ms");
        let report = Report {
            started_at: "2026-12-07T00:00:00Z".into(),
            seconds: 12.0,
            machine: Machine {
                cpus: 2,
                os: "linux",
                arch: "x86_64",
                storage: "SQLite".into(),
                broker: "embedded".into(),
                scale: "smoke",
            },
            findings: vec![Finding {
                id: "aggregation.round-trips",
                group: Group::Aggregation,
                claim: "Reduces client call count",
                experiment: "x",
                method: "y",
                rule: "z",
                headline: "<script>alert(1)</script>".into(),
                verdict: Verdict::new(Outcome::Holds, "because & so"),
                figures,
                charts: vec![Chart {
                    title: "t".into(),
                    x_label: "x".into(),
                    y_label: "y".into(),
                    series: vec![Series::new("s", vec![(0.0, 1.0), (1.0, 2.0)])],
                }],
                seconds: 1.0,
            }],
            not_measured: crate::experiments::not_measured(),
        };
        let page = render(&report).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(!page.contains("<script"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("because &amp; so"));
        assert!(page.contains("<svg"));
        for external in ["src=", "<link", "@import", "url(", "href=\"http"] {
            assert!(
                !page.contains(external),
                "{external}: nothing is loaded from elsewhere"
            );
        }
        assert!(page.contains("Not measured yet"));
    }
}
