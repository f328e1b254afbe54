//! Proxy: what a request pays for going through the gateway, or through a pair of mesh
//! sidecars, instead of straight to the service, at a fixed rate.

use std::time::Duration;

use shopmesh_gateway::config::ClusterConfig;
use shopmesh_mesh::ca::{Ca, ca_paths, leaf_paths};
use shopmesh_mesh::config::{InboundConfig, MeshTls, OutboundConfig, Rule, SidecarConfig};
use shopmesh_mesh::sidecar::Sidecar;
use shopmesh_shop::ServiceName;

use super::{Ctx, Measured, Meta};
use crate::load::{Phase, Run, Summary, open_loop, percentile};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num, signed};
use crate::shop::{ShopSpec, client};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "proxy.overhead",
    group: Group::Proxy,
    claim: "Introduces additional performance overhead",
    experiment: "a stock lookup straight to the inventory service against the same lookup through the gateway, and through a sidecar hop (the service mesh's form of the pattern), at a fixed rate",
    method: "An open-loop client sends GET /api/inventory/{id} at a fixed rate, in turn straight to the service, through the shop's gateway (routing, identity, limits, balancing, metrics, a pooled upstream connection) and through a sidecar hop as a calling service makes it (plain HTTP to its outbound sidecar, which balances and speaks mutual TLS 1.3 to the inventory's inbound sidecar, which checks the caller's certificate against a policy and calls the service on loopback), so that all see the same machine at the same moments; latency is from sending to the whole answer, after a warm-up on each. The sidecars run in the lab's process with a CA and certificates made for the run.",
    rule: "Holds when the gateway adds to the median at least 20 µs and 5% of the direct median; refuted (not measurable) below that; inconclusive when more than 1% of the requests failed or could not be sent on time. The sidecar hop is reported beside it.",
    shops: &[ShopSpec::MAIN],
};

/// The run in slices (for the progress bar).
const SLICES: usize = 3;
/// Requests in flight at most.
const MAX_IN_FLIGHT: usize = 128;
/// Unrecorded lookups on each side first.
const WARM_UP: Duration = Duration::from_millis(500);
const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

pub fn steps(_: &Scale) -> u64 {
    SLICES as u64
}

/// One side of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    pub summary: Summary,
    /// (percentile, ms) for the chart.
    pub percentiles: Vec<(f64, f64)>,
    pub sent: usize,
    pub failures: usize,
    pub skipped: usize,
}

impl Side {
    /// The calls of `runs` to the `j`th of `k` ways (0: direct, 1: gateway, 2: sidecars).
    fn of(runs: &[Run<()>], j: u64, k: u64) -> Side {
        let mine = || {
            runs.iter()
                .flat_map(|r| r.calls.iter())
                .filter(move |c| c.index % k == j)
        };
        let mut lat: Vec<Duration> = mine()
            .filter(|c| c.outcome.is_some())
            .map(|c| c.service)
            .collect();
        lat.sort();
        let due: usize = runs
            .iter()
            .map(|r| (r.calls.len() + r.skipped + (k - 1 - j) as usize) / k as usize)
            .sum();
        let sent = mine().count();
        Side {
            summary: Summary::of(&lat),
            percentiles: PERCENTILES
                .iter()
                .map(|p| (*p, percentile(&lat, *p).as_secs_f64() * 1e3))
                .collect(),
            sent,
            failures: mine().filter(|c| c.outcome.is_none()).count(),
            skipped: due.saturating_sub(sent),
        }
    }
}

/// Stock lookups on the schedule of `phases`, each way of `ways` (a client, a base URL) in
/// turn.
async fn lookups(ways: &[(reqwest::Client, String)], ids: &[String], phases: &[Phase]) -> Run<()> {
    let k = ways.len().max(1) as u64;
    open_loop(phases, MAX_IN_FLIGHT, |i| {
        let (http, base) = &ways[(i % k) as usize];
        let http = http.clone();
        let url = format!(
            "{base}/api/inventory/{}",
            ids[(i / k) as usize % ids.len().max(1)]
        );
        async move {
            let res = http.get(url).send().await.ok()?;
            if !res.status().is_success() {
                return None;
            }
            res.bytes().await.ok().map(|_| ())
        }
    })
    .await
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let inventory = shop.service(ServiceName::Inventory);
    let http = client()?;
    let hop = Hop::start(inventory).await?;
    let ways = [
        (http.clone(), format!("http://{inventory}")),
        (http, shop.base.clone()),
        (
            hop.client.clone(),
            format!("http://{}", ServiceName::Inventory.as_str()),
        ),
    ];
    let k = ways.len() as f64;
    // Each way gets `proxy_rate`: the schedule takes them in turn.
    let phase = [Phase {
        rate: k * ctx.scale.proxy_rate,
        duration: Duration::from_secs_f64(ctx.scale.proxy_secs / SLICES as f64),
    }];
    let ids: Vec<String> = shop.products.iter().map(|p| p.id.clone()).collect();
    // Connections opened and pools filled on every way before anything counts.
    ctx.say("warming up");
    let warm_up = [Phase {
        rate: k * ctx.scale.proxy_rate,
        duration: WARM_UP,
    }];
    lookups(&ways, &ids, &warm_up).await;
    let mut runs = Vec::new();
    for slice in 0..SLICES {
        ctx.say(format!("slice {}", slice + 1));
        runs.push(lookups(&ways, &ids, &phase).await);
        ctx.step(format!("slice {} done", slice + 1));
    }
    hop.stop().await;
    let (d, g, m) = (
        Side::of(&runs, 0, 3),
        Side::of(&runs, 1, 3),
        Side::of(&runs, 2, 3),
    );
    let mut figures = Figures::default();
    figures.push("rate_per_s", ctx.scale.proxy_rate, "requests/s");
    for (name, s) in [("direct", &d), ("gateway", &g), ("sidecars", &m)] {
        figures.push(format!("{name}.p50_ms"), s.summary.p50_ms, "ms");
        figures.push(format!("{name}.p90_ms"), s.summary.p90_ms, "ms");
        figures.push(format!("{name}.p99_ms"), s.summary.p99_ms, "ms");
        figures.push(format!("{name}.requests"), s.sent as f64, "requests");
        figures.push(format!("{name}.failures"), s.failures as f64, "requests");
        figures.push(format!("{name}.skipped"), s.skipped as f64, "requests");
    }
    // What each hop adds over the direct call (the gateway's keys kept as they were).
    for (prefix, s) in [("", &g), ("sidecars.", &m)] {
        let added = |ms: fn(&Summary) -> f64| (ms(&s.summary) - ms(&d.summary)) * 1e3;
        figures.push(format!("{prefix}added.p50_us"), added(|x| x.p50_ms), "µs");
        figures.push(format!("{prefix}added.p99_us"), added(|x| x.p99_ms), "µs");
    }
    let mut verdict = verdict(&d, &g);
    if m.failures + m.skipped > 0 {
        verdict = Verdict::new(
            Outcome::Inconclusive,
            format!(
                "{} of {} requests through the sidecars failed or could not be sent on time",
                m.failures + m.skipped,
                m.sent + m.skipped
            ),
        );
    }
    Ok(Measured {
        headline: format!(
            "gateway {} µs p50 ({} → {} ms), {} µs p99; sidecar hop {} µs p50 ({} ms), {} µs p99; at {} req/s",
            signed((g.summary.p50_ms - d.summary.p50_ms) * 1e3),
            num(d.summary.p50_ms),
            num(g.summary.p50_ms),
            signed((g.summary.p99_ms - d.summary.p99_ms) * 1e3),
            signed((m.summary.p50_ms - d.summary.p50_ms) * 1e3),
            num(m.summary.p50_ms),
            signed((m.summary.p99_ms - d.summary.p99_ms) * 1e3),
            num(ctx.scale.proxy_rate)
        ),
        verdict,
        figures,
        charts: vec![Chart {
            title: format!(
                "Stock lookup latency at {} requests/s: direct, through the gateway, through a sidecar hop",
                num(ctx.scale.proxy_rate)
            ),
            x_label: "percentile".into(),
            y_label: "latency (ms)".into(),
            series: vec![
                Series::new("direct to the service", d.percentiles.clone()),
                Series::new("through the gateway", g.percentiles.clone()),
                Series::new("through two sidecars (mutual TLS)", m.percentiles.clone()),
            ],
        }],
    })
}

/// A sidecar hop in front of the inventory service, as the mesh makes it: the caller's
/// outbound sidecar (identity `orders`) and the inventory's inbound one, with a policy that
/// lets orders look stock up, a CA and certificates of the run's own.
struct Hop {
    /// Sends through the outbound sidecar (an HTTP proxy): `http://inventory/...`.
    client: reqwest::Client,
    sidecars: Vec<Sidecar>,
    _dir: tempfile::TempDir,
}

impl Hop {
    async fn start(inventory: std::net::SocketAddr) -> Result<Self, LabError> {
        let mesh = |e: shopmesh_mesh::error::MeshError| LabError::Shop(format!("mesh: {e}"));
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate(1).map_err(mesh)?;
        ca.save(dir.path()).map_err(mesh)?;
        let (caller, callee) = (
            ServiceName::Orders.as_str(),
            ServiceName::Inventory.as_str(),
        );
        for name in [caller, callee] {
            ca.issue(name, Duration::from_secs(3600))
                .and_then(|leaf| leaf.save(dir.path(), name))
                .map_err(mesh)?;
        }
        let tls = |name: &str| {
            let ((ca, _), (cert, key)) = (ca_paths(dir.path()), leaf_paths(dir.path(), name));
            MeshTls {
                ca_file: ca.to_string_lossy().into_owned(),
                cert_file: cert.to_string_lossy().into_owned(),
                key_file: key.to_string_lossy().into_owned(),
            }
        };
        let any = "127.0.0.1:0".to_owned();
        let inbound = Sidecar::start(SidecarConfig {
            service: callee.to_owned(),
            inbound: Some(InboundConfig {
                listen: any.clone(),
                local: format!("http://{inventory}"),
                timeout_ms: 15_000,
            }),
            outbound: None,
            admin: None,
            tls: tls(callee),
            targets: Vec::new(),
            policy: Some(vec![Rule {
                from: caller.to_owned(),
                paths: vec!["/api/inventory".into()],
                methods: vec!["GET".into()],
            }]),
        })
        .await
        .map_err(mesh)?;
        let at = inbound
            .inbound_addr
            .ok_or_else(|| LabError::Shop("the inbound sidecar has no address".into()))?;
        let outbound = Sidecar::start(SidecarConfig {
            service: caller.to_owned(),
            inbound: None,
            outbound: Some(OutboundConfig { listen: any }),
            admin: None,
            tls: tls(caller),
            targets: vec![ClusterConfig::new(callee, vec![format!("https://{at}")])],
            policy: None,
        })
        .await
        .map_err(mesh)?;
        let proxy = outbound
            .outbound_addr
            .ok_or_else(|| LabError::Shop("the outbound sidecar has no address".into()))?;
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{proxy}"))?)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            sidecars: vec![inbound, outbound],
            _dir: dir,
        })
    }

    async fn stop(self) {
        for s in &self.sidecars {
            s.shutdown();
        }
        for s in &self.sidecars {
            s.stopped().await;
        }
    }
}

/// The rule of [`META`], applied to the measurements.
pub fn verdict(direct: &Side, gateway: &Side) -> Verdict {
    let lost = |s: &Side| s.failures + s.skipped;
    let total = direct.sent + direct.skipped + gateway.sent + gateway.skipped;
    if total == 0 || (lost(direct) + lost(gateway)) as f64 > 0.01 * total as f64 {
        return Verdict::new(
            Outcome::Inconclusive,
            format!(
                "{} of {total} requests failed or could not be sent on time",
                lost(direct) + lost(gateway)
            ),
        );
    }
    let added = gateway.summary.p50_ms - direct.summary.p50_ms;
    let because = format!(
        "the gateway added {} µs to the median ({} → {} ms, {}%) and {} µs to the p99",
        signed(added * 1e3),
        num(direct.summary.p50_ms),
        num(gateway.summary.p50_ms),
        signed(added / direct.summary.p50_ms.max(f64::EPSILON) * 100.0),
        signed((gateway.summary.p99_ms - direct.summary.p99_ms) * 1e3),
    );
    if added >= 0.020 && added >= 0.05 * direct.summary.p50_ms {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Refuted, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(p50: f64, failures: usize) -> Side {
        Side {
            summary: Summary {
                n: 100,
                p50_ms: p50,
                p90_ms: p50,
                p99_ms: p50 * 2.0,
                max_ms: p50 * 3.0,
                mean_ms: p50,
            },
            percentiles: Vec::new(),
            sent: 100,
            failures,
            skipped: 0,
        }
    }

    #[test]
    fn the_verdict_follows_the_measured_medians() {
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.7, 0)).outcome,
            Outcome::Holds
        );
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.505, 0)).outcome,
            Outcome::Refuted
        );
        assert_eq!(
            verdict(&side(0.5, 0), &side(0.7, 5)).outcome,
            Outcome::Inconclusive
        );
    }
}
