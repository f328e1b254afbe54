//! The pattern lab (`shopmesh lab`): the design document's claims about the four
//! microservice patterns — aggregation, shared data, proxy, asynchronous messaging — turned
//! into experiments on a running shop, each with its figures and a verdict computed from
//! them by a rule written beside it.
//!
//! # Layout
//! - [`experiments`]: one module per experiment (run, measure, decide), and the catalog of
//!   claims not measured yet.
//! - [`shop`]: the shops experiments run against (`shopmesh up`'s system on ephemeral ports)
//!   and extra gateways built from the shop's own gateway configuration.
//! - [`relay`]: the delaying TCP relay that simulates a client's network.
//! - [`load`]: the open-loop load driver and latency summaries.
//! - [`cpu`]: a gateway on a thread of its own and that thread's CPU time.
//! - [`report`]: findings, figures, verdicts, the table and the JSON; [`html`] and
//!   [`chart`]: the self-contained HTML report with its SVG charts.

#![forbid(unsafe_code)]

pub mod chart;
pub mod cpu;
pub mod experiments;
pub mod html;
pub mod load;
pub mod relay;
pub mod report;
pub mod shop;

use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use report::{Finding, Group, Outcome, Report};
pub use shop::Backend;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the shop did not start: {0}")]
    Start(#[from] shopmesh_shop::Error),
    #[error("the shop answered unexpectedly: {0}")]
    Shop(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Storage(#[from] shopmesh_platform::db::DbError),
    #[error("gateway configuration: {0}")]
    Gateway(#[from] shopmesh_gateway::config::ConfigError),
    #[error("chart: {0}")]
    Chart(String),
    #[error("{0}")]
    Usage(String),
}

/// How much each experiment does. `quick` fits in under three minutes on two cores;
/// `smoke` is the smallest run whose figures still decide (the end-to-end test's).
#[derive(Debug, Clone)]
pub struct Scale {
    pub name: &'static str,
    /// Products seeded in each shop.
    pub products: usize,
    /// Simulated client round trips.
    pub rtts_ms: Vec<u64>,
    /// Product pages per client kind and round trip.
    pub pages: usize,
    /// Added latency of the slowed part, step by step.
    pub slow_steps_ms: Vec<u64>,
    /// Pages per step.
    pub slow_pages: usize,
    /// Offered loads (requests per second) of the composite-against-plain comparison, and
    /// seconds per rate and route.
    pub load_rates: Vec<f64>,
    pub load_secs: f64,
    /// Requests per second, and seconds, per side of the proxy comparison.
    pub proxy_rate: f64,
    pub proxy_secs: f64,
    /// Callers of the gray release, and requests each makes after its first.
    pub gray_callers: usize,
    pub gray_repeats: usize,
    /// Orders per second before and after the burst (the burst is ten times this), and the
    /// length of each of the three phases.
    pub steady_rate: f64,
    pub phase_secs: f64,
    /// Orders of the idempotency and compensation experiments.
    pub saga_orders: usize,
    /// Profile changes per way of reading the user center.
    pub consistency_rounds: usize,
    /// Concurrent reader pools of the shared database experiment, and seconds per count
    /// and way.
    pub reader_pools: Vec<usize>,
    pub reader_secs: f64,
    /// How long inventory stays stopped under orders (the decoupling experiment).
    pub outage_secs: f64,
    /// Seconds of requests of the gateway-loss experiment (an instance is lost halfway).
    pub loss_secs: f64,
    /// Product pages, and as many plain requests, of the gateway CPU experiment; stock
    /// lookups per filter set and round of the filter-cost experiment.
    pub cpu_requests: usize,
    /// How long the broker's connections stay cut mid-burst (the broker outage experiment).
    pub broker_cut_secs: f64,
}

impl Scale {
    pub fn full() -> Self {
        Self {
            name: "full",
            products: 2000,
            rtts_ms: vec![0, 20, 80],
            pages: 60,
            slow_steps_ms: vec![0, 100, 250, 500, 750, 900, 1100, 1500, 2000],
            slow_pages: 24,
            load_rates: vec![100.0, 200.0, 400.0, 600.0, 800.0, 1200.0, 1600.0, 2400.0],
            load_secs: 5.0,
            proxy_rate: 400.0,
            proxy_secs: 20.0,
            gray_callers: 4000,
            gray_repeats: 5,
            steady_rate: 20.0,
            phase_secs: 8.0,
            saga_orders: 400,
            consistency_rounds: 20,
            reader_pools: vec![1, 2, 4, 8],
            reader_secs: 4.0,
            outage_secs: 30.0,
            loss_secs: 10.0,
            cpu_requests: 1500,
            broker_cut_secs: 10.0,
        }
    }

    pub fn quick() -> Self {
        Self {
            name: "quick",
            products: 600,
            rtts_ms: vec![0, 20, 80],
            pages: 15,
            slow_steps_ms: vec![0, 250, 500, 750, 1500, 2000],
            slow_pages: 8,
            load_rates: vec![100.0, 200.0, 400.0, 800.0, 1600.0],
            load_secs: 2.0,
            proxy_rate: 200.0,
            proxy_secs: 6.0,
            gray_callers: 1000,
            gray_repeats: 3,
            steady_rate: 40.0,
            phase_secs: 4.0,
            saga_orders: 90,
            consistency_rounds: 6,
            reader_pools: vec![1, 2, 4, 8],
            reader_secs: 1.5,
            outage_secs: 4.0,
            loss_secs: 4.0,
            cpu_requests: 400,
            broker_cut_secs: 3.0,
        }
    }

    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            products: 400,
            rtts_ms: vec![0, 20, 80],
            pages: 6,
            slow_steps_ms: vec![0, 500, 2000],
            slow_pages: 4,
            load_rates: vec![50.0, 200.0, 800.0],
            load_secs: 1.0,
            proxy_rate: 100.0,
            proxy_secs: 2.0,
            gray_callers: 600,
            gray_repeats: 2,
            steady_rate: 5.0,
            phase_secs: 2.0,
            saga_orders: 30,
            consistency_rounds: 3,
            reader_pools: vec![1, 2, 4, 8],
            reader_secs: 0.75,
            outage_secs: 2.0,
            loss_secs: 2.0,
            cpu_requests: 200,
            broker_cut_secs: 2.0,
        }
    }
}

/// What to run, against what.
#[derive(Debug, Clone)]
pub struct Options {
    pub scale: Scale,
    /// Only these patterns (all when empty).
    pub only: Vec<Group>,
    pub backend: Backend,
    /// Draw a progress bar per experiment (on stderr, when it is a terminal).
    pub progress: bool,
    /// The `shopmesh` executable, for the experiments that run the shop as a process of its
    /// own (`shopmesh lab` gives itself); without it they report that they did not run.
    pub shopmesh: Option<std::path::PathBuf>,
}

/// The experiments of the patterns in `only` (all when empty), in their running order.
pub fn chosen(only: &[Group]) -> Vec<experiments::Kind> {
    experiments::Kind::ALL
        .into_iter()
        .filter(|k| only.is_empty() || only.contains(&k.meta().group))
        .collect()
}

/// Runs the experiments one after the other (they share two cores; running them at once
/// would measure each other) and returns the report. An experiment that fails is reported
/// as failed with its error; the others still run.
pub async fn run(opts: &Options) -> Result<Report, LabError> {
    run_kinds(opts, &chosen(&opts.only)).await
}

/// Runs these experiments, in this order, as [`run`] does.
pub async fn run_kinds(opts: &Options, chosen: &[experiments::Kind]) -> Result<Report, LabError> {
    let started = Instant::now();
    let started_at = shopmesh_platform::millis_to_rfc3339(shopmesh_platform::now_millis());
    let bars = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:<28} [{bar:30}] {pos:>3}/{len:3} {elapsed:>4} {wide_msg}",
    )
    .map_err(|e| LabError::Usage(e.to_string()))?
    .progress_chars("=> ");
    let prepared: Vec<(experiments::Kind, ProgressBar)> = chosen
        .iter()
        .map(|k| {
            let bar = bars.add(ProgressBar::new(k.steps(&opts.scale)));
            bar.set_style(style.clone());
            bar.set_prefix(k.meta().id);
            bar.set_message("waiting");
            (*k, bar)
        })
        .collect();
    let mut shops = shop::Shops::new(opts.backend.clone(), opts.scale.products);
    let mut findings = Vec::new();
    for (i, (kind, bar)) in prepared.iter().enumerate() {
        let meta = kind.meta();
        let t = Instant::now();
        bar.reset_elapsed();
        let measured = match shops.start_all(meta.shops).await {
            Ok(()) => {
                let ctx = experiments::Ctx {
                    shops: &shops,
                    scale: &opts.scale,
                    bar,
                    backend: &opts.backend,
                    shopmesh: opts.shopmesh.as_deref(),
                };
                kind.run(&ctx).await
            }
            Err(e) => Err(e),
        };
        let finding = experiments::finding(meta, measured, t.elapsed().as_secs_f64());
        bar.finish_with_message(format!(
            "{} · {}",
            finding.verdict.outcome, finding.headline
        ));
        findings.push(finding);
        // Stop the shops no later experiment needs.
        for spec in meta.shops {
            let needed_later = prepared[i + 1..]
                .iter()
                .any(|(k, _)| k.meta().shops.contains(spec));
            if !needed_later {
                shops.stop(*spec).await;
            }
        }
    }
    shops.stop_all().await;
    Ok(Report {
        started_at,
        seconds: started.elapsed().as_secs_f64(),
        machine: report::Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            storage: opts.backend.storage_name().into(),
            broker: opts.backend.broker_name(),
            scale: opts.scale.name,
        },
        findings,
        not_measured: experiments::not_measured()
            .into_iter()
            .filter(|n| opts.only.is_empty() || opts.only.contains(&n.group))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_chosen_patterns_run_and_every_pattern_has_an_experiment() {
        assert_eq!(chosen(&[]).len(), experiments::Kind::ALL.len());
        for g in Group::ALL {
            let of = chosen(&[g]);
            assert!(!of.is_empty(), "{g}");
            assert!(of.iter().all(|k| k.meta().group == g));
        }
        let two = chosen(&[Group::Proxy, Group::SharedData]);
        assert_eq!(
            two.len(),
            chosen(&[Group::Proxy]).len() + chosen(&[Group::SharedData]).len()
        );
    }

    #[test]
    fn experiments_have_distinct_ids_and_written_rules() {
        let mut ids: Vec<&str> = experiments::Kind::ALL.iter().map(|k| k.meta().id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), experiments::Kind::ALL.len());
        for k in experiments::Kind::ALL {
            let m = k.meta();
            assert!(m.id.starts_with(m.group.as_str()), "{}", m.id);
            assert!(!m.method.is_empty() && !m.rule.is_empty() && !m.claim.is_empty());
            assert!(k.steps(&Scale::quick()) > 0);
        }
    }
}
