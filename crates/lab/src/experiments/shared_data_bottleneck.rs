//! Shared data: does the user center's database become the one place every reader waits
//! on? Reader pools (each one service's worth of readers) read accounts, 1, 2, 4 and 8 of
//! them at once, through the users service's interface and through the read-only shared
//! view; the reads per second they get together show where the users database saturates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shopmesh_platform::client::{RequestId, ServiceClient};
use shopmesh_shop::ServiceName;
use shopmesh_users_client::Directory;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, Measured, Meta};
use crate::load::Summary;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{LabShop, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "shared-data.bottleneck",
    group: Group::SharedData,
    claim: "Shared database becomes a single-point bottleneck, hard to scale",
    experiment: "1, 2, 4 and 8 reader pools reading accounts as fast as they can, through the users service's interface and through the shared read-only view: reads per second, and where they stop growing",
    method: "A reader pool stands for one service reading accounts: four readers in a closed loop (each asks again as soon as it is answered) sharing one users directory, either the interface (HTTP to the users service, no cache, so every read reaches it) or the published view (a read-only pool of four connections to the user center's database). 1, 2, 4 and 8 pools run at once for a fixed time per count and way; reads per second are the answers counted over that time. The shop, its database and the readers share this machine's cores, so the plateau found is the users database's read capacity on this machine.",
    rule: "The users database saturates at the first pool count after which doubling the pools adds less than 15% reads per second through the shared view. Holds when it saturates within the counts measured and the most pools read less than half as much again as linear growth from one pool would give (more readers, hardly more reads: the one database is the ceiling); partly when it saturates but reads still grew by at least half of linear; refuted when the view's reads per second grew by at least 15% with every doubling; inconclusive when a way read nothing at one pool or more than 1% of reads failed.",
    shops: &[ShopSpec::SHARED_VIEW],
};

/// Readers per pool, and connections per pool on the shared view (as the orders service's).
const READERS_PER_POOL: usize = 4;
const VIEW_CONNECTIONS: u32 = 4;
/// Accounts read (registered before measuring).
const ACCOUNTS: usize = 8;
/// Doubling the pools must add this share of reads per second to count as scaling.
pub const SCALING_STEP: f64 = 0.15;

pub fn steps(s: &Scale) -> u64 {
    2 * s.reader_pools.len() as u64 + 1
}

/// One pool count of one way.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub pools: usize,
    pub reads: usize,
    pub errors: usize,
    pub reads_per_s: f64,
    pub latency: Summary,
}

/// The two ways of reading accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Interface,
    View,
}

impl Via {
    fn key(self) -> &'static str {
        match self {
            Via::Interface => "interface",
            Via::View => "shared_view",
        }
    }
}

/// A reader pool: its directory, and the view's connections to close after.
struct Pool {
    directory: Arc<Directory>,
    view: Option<shopmesh_platform::db::Db>,
}

async fn pool(shop: &LabShop, via: Via) -> Result<Pool, LabError> {
    Ok(match via {
        Via::Interface => {
            let url = format!("http://{}", shop.service(ServiceName::Users));
            // No cache (a copy is never fresh): every read reaches the users service.
            Pool {
                directory: Arc::new(Directory::with_client(
                    ServiceClient::new("users", url),
                    Duration::ZERO,
                    16,
                )),
                view: None,
            }
        }
        Via::View => {
            let db = shop.users_view(VIEW_CONNECTIONS).await?;
            Pool {
                directory: Arc::new(Directory::shared_database(db.clone())),
                view: Some(db),
            }
        }
    })
}

/// `pools` pools of readers reading `ids` for `secs`.
async fn measure(
    shop: &LabShop,
    via: Via,
    pools: usize,
    ids: &Arc<Vec<String>>,
    secs: f64,
) -> Result<Point, LabError> {
    let mut opened = Vec::new();
    for _ in 0..pools {
        opened.push(pool(shop, via).await?);
    }
    // Every pool's first read before the clock starts (connections opened).
    for p in &opened {
        let _ = p.directory.get(&ids[0], &RequestId::default()).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = JoinSet::new();
    let started = Instant::now();
    for (p, pool) in opened.iter().enumerate() {
        for r in 0..READERS_PER_POOL {
            let (dir, ids, stop) = (pool.directory.clone(), ids.clone(), stop.clone());
            readers.spawn(async move {
                let (mut ok, mut errors, mut lat) = (0usize, 0usize, Vec::new());
                let mut i = p * READERS_PER_POOL + r;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match dir.get(&ids[i % ids.len()], &RequestId::default()).await {
                        Ok(Some(_)) => {
                            ok += 1;
                            lat.push(t.elapsed());
                        }
                        _ => errors += 1,
                    }
                    i += 1;
                }
                (ok, errors, lat)
            });
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads, mut errors, mut lat) = (0, 0, Vec::new());
    while let Some(done) = readers.join_next().await {
        if let Ok((o, e, l)) = done {
            reads += o;
            errors += e;
            lat.extend(l);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    for p in opened {
        if let Some(db) = p.view {
            db.pool.close().await;
        }
    }
    Ok(Point {
        pools,
        reads,
        errors,
        reads_per_s: reads as f64 / elapsed.max(1e-9),
        latency: Summary::of(&lat),
    })
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::SHARED_VIEW)?;
    ctx.say("registering the accounts read");
    let mut ids = Vec::new();
    for _ in 0..ACCOUNTS {
        ids.push(shop.user().await?.0);
    }
    let ids = Arc::new(ids);
    ctx.step("reading");
    let mut interface = Vec::new();
    let mut view = Vec::new();
    for &pools in &ctx.scale.reader_pools {
        for via in [Via::Interface, Via::View] {
            ctx.say(format!("{}: {pools} pool(s)", via.key()));
            let point = measure(shop, via, pools, &ids, ctx.scale.reader_secs).await?;
            match via {
                Via::Interface => interface.push(point),
                Via::View => view.push(point),
            }
            ctx.step(format!("{}: {pools} pool(s) done", via.key()));
        }
    }
    let mut f = Figures::default();
    f.push(
        "cpus",
        std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        "cores",
    );
    f.push("readers_per_pool", READERS_PER_POOL as f64, "readers");
    for (via, points) in [(Via::Interface, &interface), (Via::View, &view)] {
        let k = via.key();
        for p in points {
            let pk = format!("{k}.pools_{}", p.pools);
            f.push(format!("{pk}.reads_per_s"), p.reads_per_s, "reads/s");
            f.push(format!("{pk}.p50_ms"), p.latency.p50_ms, "ms");
            f.push(format!("{pk}.p99_ms"), p.latency.p99_ms, "ms");
            f.push(format!("{pk}.errors"), p.errors as f64, "reads");
        }
        f.push(format!("{k}.scaling"), scaling(points), "×");
        f.push(format!("{k}.peak_reads_per_s"), peak(points), "reads/s");
        f.push(
            format!("{k}.saturation_pools"),
            saturation(points).map_or(0.0, |n| n as f64),
            "pools",
        );
    }
    let line = |points: &[Point]| {
        points
            .iter()
            .map(|p| (p.pools as f64, p.reads_per_s))
            .collect::<Vec<_>>()
    };
    let mut series = vec![
        Series::new("through the interface (users service)", line(&interface)),
        Series::new("through the shared read-only view", line(&view)),
    ];
    if let Some(first) = view.first() {
        series.push(Series::reference(
            "shared view, if reads grew with the pools",
            view.iter()
                .map(|p| {
                    (
                        p.pools as f64,
                        first.reads_per_s * p.pools as f64 / first.pools.max(1) as f64,
                    )
                })
                .collect(),
        ));
    }
    let at = |points: &[Point]| {
        let first = points.first().map_or(0.0, |p| p.reads_per_s);
        let last = points.last().map_or(0.0, |p| p.reads_per_s);
        let pools = points.last().map_or(0, |p| p.pools);
        format!("{} → {} reads/s at {pools} pools", num(first), num(last))
    };
    Ok(Measured {
        headline: format!("shared view {}, interface {}", at(&view), at(&interface)),
        verdict: verdict(&interface, &view),
        figures: f,
        charts: vec![Chart {
            title: "Account reads per second against concurrent reader pools".into(),
            x_label: "reader pools".into(),
            y_label: "reads per second".into(),
            series,
        }],
    })
}

/// Reads per second at the most pools over those at the fewest.
pub fn scaling(points: &[Point]) -> f64 {
    match (points.first(), points.last()) {
        (Some(a), Some(b)) if a.reads_per_s > 0.0 => b.reads_per_s / a.reads_per_s,
        _ => 0.0,
    }
}

pub fn peak(points: &[Point]) -> f64 {
    points.iter().map(|p| p.reads_per_s).fold(0.0, f64::max)
}

/// The first pool count after which the next (more) pools add less than
/// [`SCALING_STEP`] reads per second; `None` when every step added at least that.
pub fn saturation(points: &[Point]) -> Option<usize> {
    points
        .windows(2)
        .find(|w| w[1].reads_per_s < w[0].reads_per_s * (1.0 + SCALING_STEP))
        .map(|w| w[0].pools)
}

/// The rule of [`META`], applied to both ways' points (in increasing pool counts).
pub fn verdict(interface: &[Point], view: &[Point]) -> Verdict {
    let describe = |points: &[Point]| {
        let cap = match saturation(points) {
            Some(n) => format!("saturating from {n} pool(s)"),
            None => "still growing".into(),
        };
        format!(
            "{} reads/s at {} pool(s), {} at {} ({}×, {cap}, p50 {} → {} ms)",
            num(points.first().map_or(0.0, |p| p.reads_per_s)),
            points.first().map_or(0, |p| p.pools),
            num(points.last().map_or(0.0, |p| p.reads_per_s)),
            points.last().map_or(0, |p| p.pools),
            num(scaling(points)),
            num(points.first().map_or(0.0, |p| p.latency.p50_ms)),
            num(points.last().map_or(0.0, |p| p.latency.p50_ms)),
        )
    };
    let because = format!(
        "through the shared view {}; through the interface {}",
        describe(view),
        describe(interface)
    );
    let failed = |points: &[Point]| {
        let (reads, errors) = points
            .iter()
            .fold((0, 0), |(r, e), p| (r + p.reads, e + p.errors));
        errors as f64 > 0.01 * (reads + errors) as f64
    };
    let empty = |points: &[Point]| points.len() < 2 || points[0].reads == 0;
    if empty(view) || empty(interface) || failed(view) || failed(interface) {
        return Verdict::new(
            Outcome::Inconclusive,
            format!("{because}; too few reads, or more than 1% failed"),
        );
    }
    if saturation(view).is_none() {
        return Verdict::new(Outcome::Refuted, because);
    }
    if scaling(view) < 0.5 * linear(view) {
        Verdict::new(Outcome::Holds, because)
    } else {
        Verdict::new(Outcome::Partly, because)
    }
}

/// How many times more reads the most pools would give than the fewest, if reads grew with
/// the pools.
pub fn linear(points: &[Point]) -> f64 {
    match (points.first(), points.last()) {
        (Some(a), Some(b)) if a.pools > 0 => b.pools as f64 / a.pools as f64,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(rates: &[f64]) -> Vec<Point> {
        rates
            .iter()
            .enumerate()
            .map(|(i, r)| Point {
                pools: 1 << i,
                reads: (*r * 2.0) as usize,
                errors: 0,
                reads_per_s: *r,
                latency: Summary::default(),
            })
            .collect()
    }

    #[test]
    fn saturation_is_where_doubling_stops_paying() {
        assert_eq!(
            saturation(&points(&[1000.0, 1900.0, 2100.0, 2150.0])),
            Some(2)
        );
        assert_eq!(
            saturation(&points(&[1000.0, 1100.0, 1150.0, 1150.0])),
            Some(1)
        );
        assert_eq!(saturation(&points(&[1000.0, 1900.0, 3600.0, 7000.0])), None);
        assert_eq!(scaling(&points(&[1000.0, 1900.0, 3600.0, 7000.0])), 7.0);
        assert_eq!(peak(&points(&[1000.0, 1900.0, 1800.0])), 1900.0);
    }

    #[test]
    fn the_verdict_follows_the_view_s_curve() {
        let iface = points(&[800.0, 900.0, 950.0, 950.0]);
        assert_eq!(
            verdict(&iface, &points(&[2000.0, 2600.0, 2700.0, 2700.0])).outcome,
            Outcome::Holds
        );
        assert_eq!(
            verdict(&iface, &points(&[2000.0, 3900.0, 7600.0, 15000.0])).outcome,
            Outcome::Refuted
        );
        // A plateau on the way, but 8 pools still read 5 times what one did.
        assert_eq!(
            verdict(&iface, &points(&[2000.0, 2100.0, 5000.0, 10000.0])).outcome,
            Outcome::Partly
        );
        let mut failing = points(&[2000.0, 2600.0, 2700.0, 2700.0]);
        failing[3].errors = failing[3].reads;
        assert_eq!(verdict(&iface, &failing).outcome, Outcome::Inconclusive);
        assert_eq!(
            verdict(&iface, &points(&[0.0, 0.0])).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            verdict(&iface, &points(&[2000.0])).outcome,
            Outcome::Inconclusive
        );
    }
}
