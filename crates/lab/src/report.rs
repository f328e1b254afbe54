//! What the lab found: a finding per experiment (its claim, method, rule, every figure it
//! measured, its charts' data and the verdict computed from the figures), the table printed
//! at the end, and the JSON written beside the HTML report.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The four patterns of the design document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Group {
    Aggregation,
    SharedData,
    Proxy,
    Messaging,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::Aggregation,
        Group::SharedData,
        Group::Proxy,
        Group::Messaging,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Group::Aggregation => "aggregation",
            Group::SharedData => "shared-data",
            Group::Proxy => "proxy",
            Group::Messaging => "messaging",
        }
    }

    /// The pattern's name in the design document.
    pub fn title(self) -> &'static str {
        match self {
            Group::Aggregation => "Aggregation",
            Group::SharedData => "Shared data",
            Group::Proxy => "Proxy",
            Group::Messaging => "Asynchronous messaging",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Group {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Group::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown pattern `{s}` (one of: aggregation, shared-data, proxy, messaging)"
                )
            })
    }
}

/// How a claim fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The measurements show what the claim says.
    Holds,
    /// The effect the claim warns of is there, and the system bounds or absorbs it.
    Mitigated,
    /// Some of the claim's conditions held, others did not.
    Partly,
    /// The measurements contradict the claim.
    Refuted,
    /// The measurements cannot decide (too few, or the effect did not show).
    Inconclusive,
    /// The experiment did not complete.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Holds => "holds",
            Outcome::Mitigated => "mitigated",
            Outcome::Partly => "partly",
            Outcome::Refuted => "refuted",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Failed => "failed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verdict and the figures it was computed from, in words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    pub because: String,
}

impl Verdict {
    pub fn new(outcome: Outcome, because: impl Into<String>) -> Self {
        Self {
            outcome,
            because: because.into(),
        }
    }
}

/// One measured number.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// Dotted, stable key: `rtt_20ms.composite.p50_ms`.
    pub key: String,
    pub value: f64,
    pub unit: &'static str,
}

/// The figures of one experiment, in the order measured.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Figures(pub Vec<Figure>);

impl Figures {
    pub fn push(&mut self, key: impl Into<String>, value: f64, unit: &'static str) {
        self.0.push(Figure {
            key: key.into(),
            value,
            unit,
        });
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.iter().find(|f| f.key == key).map(|f| f.value)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A line of a chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed and without markers: a reference (a timeout, the ideal), not a measure.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reference: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            reference: false,
        }
    }

    pub fn reference(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            reference: true,
        }
    }
}

/// A chart's data; the HTML report draws it (SVG).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// What one experiment found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: &'static str,
    pub group: Group,
    /// The claim, as the design document words it.
    pub claim: &'static str,
    /// What was done, in a line.
    pub experiment: &'static str,
    /// How, in a sentence or two.
    pub method: &'static str,
    /// How the verdict is computed from the figures.
    pub rule: &'static str,
    /// The figure the table shows.
    pub headline: String,
    pub verdict: Verdict,
    pub figures: Figures,
    pub charts: Vec<Chart>,
    pub seconds: f64,
}

/// A claim of the design document the lab does not measure yet.
#[derive(Debug, Clone, Serialize)]
pub struct NotMeasured {
    pub group: Group,
    pub claim: &'static str,
    pub why: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub os: &'static str,
    pub arch: &'static str,
    /// `SQLite` or `PostgreSQL`.
    pub storage: String,
    pub broker: String,
    /// `quick`, `full` or `smoke`.
    pub scale: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// RFC 3339.
    pub started_at: String,
    pub seconds: f64,
    pub machine: Machine,
    pub findings: Vec<Finding>,
    pub not_measured: Vec<NotMeasured>,
}

impl Report {
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// The table: claim · experiment · figure · verdict, then each verdict's reason.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .findings
            .iter()
            .map(|f| {
                [
                    f.claim.to_owned(),
                    f.id.to_owned(),
                    f.headline.clone(),
                    f.verdict.outcome.to_string(),
                ]
            })
            .collect();
        let head = [
            "claim".to_owned(),
            "experiment".to_owned(),
            "figure".to_owned(),
            "verdict".to_owned(),
        ];
        let limits = [44, 28, 70, 12];
        let width = |i: usize| {
            rows.iter()
                .chain(std::iter::once(&head))
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .min(limits[i])
        };
        let widths = [width(0), width(1), width(2), width(3)];
        let cell = |s: &str, w: usize| {
            let n = s.chars().count();
            if n <= w {
                format!("{s}{}", " ".repeat(w - n))
            } else {
                let cut: String = s.chars().take(w.saturating_sub(1)).collect();
                format!("{cut}…")
            }
        };
        let line = |r: &[String; 4]| {
            let cells: Vec<String> = r.iter().zip(widths).map(|(s, w)| cell(s, w)).collect();
            cells.join("  ").trim_end().to_owned()
        };
        let mut out = String::new();
        out.push_str(&line(&head));
        out.push('\n');
        let rule: usize = widths.iter().sum::<usize>() + 6;
        out.push_str(&"─".repeat(rule));
        out.push('\n');
        for r in &rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out.push('\n');
        for f in &self.findings {
            out.push_str(&format!(
                "{} — {}: {}\n",
                f.id, f.verdict.outcome, f.verdict.because
            ));
        }
        if !self.not_measured.is_empty() {
            out.push_str("\nnot measured yet:\n");
            for n in &self.not_measured {
                out.push_str(&format!("  {} · {} ({})\n", n.group, n.claim, n.why));
            }
        }
        out
    }
}

/// `1234.5` → `1,234.5`-style short numbers for headlines: 3 significant digits below 100.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// [`num`] with its sign: `+1.25`, `−3.40`.
pub fn signed(v: f64) -> String {
    if v.is_finite() && v < 0.0 {
        format!("−{}", num(-v))
    } else if v.is_finite() {
        format!("+{}", num(v))
    } else {
        num(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_by_their_cli_names() {
        for g in Group::ALL {
            assert_eq!(g.as_str().parse::<Group>(), Ok(g));
        }
        assert!("aggregate".parse::<Group>().is_err());
    }

    #[test]
    fn figures_are_found_by_key_and_numbers_are_short() {
        let mut f = Figures::default();
        f.push("a.p50_ms", 1.5, "ms");
        assert_eq!(f.get("a.p50_ms"), Some(1.5));
        assert_eq!(f.get("b"), None);
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(0.1234), "0.12");
        assert_eq!(num(f64::NAN), "n/a");
        assert_eq!(signed(-25.5), "−25.5");
        assert_eq!(signed(0.5), "+0.50");
    }
}
