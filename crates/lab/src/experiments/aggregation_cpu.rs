//! Aggregation: what does one composite page cost the gateway itself, against the plain
//! requests a client would send instead?

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use shopmesh_gateway::Gateway;
use tokio_util::sync::CancellationToken;

use super::{Ctx, Measured, Meta};
use crate::report::{Figures, Group, Outcome, Verdict, num};
use crate::shop::{LabShop, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "aggregation.cpu",
    group: Group::Aggregation,
    claim: "The aggregation layer can become a performance bottleneck (its CPU per page)",
    experiment: "the gateway's own CPU time per composite product page against per plain proxied request, the gateway alone on a thread of its own",
    method: "A gateway built from the shop's own configuration runs on one worker thread of its own (as `shopmesh gateway` runs each worker), in front of the shop's services. Four clients at a time load product pages (the composite: four part calls, the product part cached 2 s as the shop configures it), then as many plain stock lookups (one upstream call each), each after a warm-up on other products, so that the pages measured meet no cached part. The CPU time the kernel accounts to that thread (/proc/self/task/TID/schedstat: user and system, nanoseconds) is divided by the requests it answered; the services and the clients run on other threads and are not counted.",
    rule: "Mitigated when a page costs the gateway less CPU than the four plain requests a client would send instead (the layer does less work than it saves the client); holds when it costs as much or more; inconclusive when the thread's CPU cannot be read (not Linux) or a request failed.",
    shops: &[ShopSpec::MAIN],
};

/// The plain requests a client sends instead of one page: product, stock, price, promotions.
pub const CALLS_PER_PAGE: f64 = 4.0;
/// Requests in flight at once.
const CLIENTS: usize = 4;
/// Longer than the shop's composite keeps a product part.
const CACHE_FORGETS: Duration = Duration::from_millis(2100);

pub fn steps(_: &Scale) -> u64 {
    2
}

/// What was measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    pub pages: usize,
    pub plain: usize,
    pub failed: usize,
    /// CPU time of the gateway's thread per page and per plain request (µs); `None` when
    /// it could not be read.
    pub page_us: Option<f64>,
    pub plain_us: Option<f64>,
}

impl Cost {
    /// A page's CPU in plain requests.
    pub fn ratio(&self) -> Option<f64> {
        match (self.page_us, self.plain_us) {
            (Some(p), Some(q)) if q > 0.0 => Some(p / q),
            _ => None,
        }
    }
}

/// The gateway on its worker thread, and that thread's id.
struct Worker {
    addr: SocketAddr,
    tid: Option<u32>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(shop: &LabShop) -> Result<Worker, LabError> {
        let mut g = shopmesh_shop::gateway_config(&shop.cfg, |n| shop.service(n));
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        g.listen = any;
        g.admin.listen = None;
        let gateway = Gateway::new(g)?;
        let stop = CancellationToken::new();
        let before = threads();
        let (addr, thread) = shopmesh_gateway::server::serve_workers(
            any,
            gateway,
            stop.clone(),
            Duration::from_secs(1),
            1,
        )?;
        // The worker thread names itself `gateway-1` as it starts.
        let mut tid = None;
        for _ in 0..100 {
            tid = threads()
                .difference(&before)
                .copied()
                .find(|t| comm(*t).is_some_and(|c| c == "gateway-1"));
            if tid.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Worker {
            addr,
            tid,
            stop,
            thread: Some(thread),
        })
    }

    /// CPU time the thread has had so far (ns).
    fn cpu_ns(&self) -> Option<u64> {
        let t = self.tid?;
        let text = std::fs::read_to_string(format!("/proc/self/task/{t}/schedstat")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// This process's thread ids (empty where /proc is not there).
fn threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn comm(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `n` GETs of `path` + a product id, `CLIENTS` at a time; the number that failed.
async fn load(shop: &LabShop, base: &str, path: &str, n: usize, offset: usize) -> usize {
    let ids: Vec<&str> = shop.products.iter().map(|p| p.id.as_str()).collect();
    if ids.is_empty() {
        return n;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let client = || async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                break;
            }
            let url = format!("{base}{path}{}", ids[(offset + i) % ids.len()]);
            let ok = match shop.http.get(url).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            if !ok {
                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    futures::future::join_all((0..CLIENTS).map(|_| client())).await;
    failed.into_inner()
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let worker = Worker::start(shop)?;
    let base = format!("http://{}", worker.addr);
    // Connections opened, caches and pools filled, before anything counts; then products
    // the warm-up did not ask for, once each (the product part is cached 2 s), after the
    // cache has forgotten what earlier experiments asked.
    let total = shop.products.len();
    let n = ctx.scale.cpu_requests.min(total * 3 / 4);
    let warm = (n / 4 + CLIENTS).min(total - n);
    let measure = |path: &'static str| {
        let (base, worker) = (base.clone(), &worker);
        async move {
            let failed_warm = load(shop, &base, path, warm, 0).await;
            tokio::time::sleep(CACHE_FORGETS).await;
            let before = worker.cpu_ns();
            let failed = load(shop, &base, path, n, warm).await;
            let after = worker.cpu_ns();
            let us = match (before, after) {
                (Some(b), Some(a)) if n > 0 => Some(a.saturating_sub(b) as f64 / 1e3 / n as f64),
                _ => None,
            };
            (failed_warm + failed, us)
        }
    };
    ctx.say("composite product pages");
    let (failed_pages, page_us) = measure("/api/products/").await;
    ctx.step("plain stock lookups");
    let (failed_plain, plain_us) = measure("/api/inventory/").await;
    ctx.step("done");
    worker.stop().await;
    let cost = Cost {
        pages: n,
        plain: n,
        failed: failed_pages + failed_plain,
        page_us,
        plain_us,
    };

    let mut f = Figures::default();
    if let Some(p) = cost.page_us {
        f.push("gateway.cpu_per_page", p, "µs");
    }
    if let Some(q) = cost.plain_us {
        f.push("gateway.cpu_per_plain_request", q, "µs");
    }
    if let Some(r) = cost.ratio() {
        f.push("page_over_plain", r, "plain requests");
    }
    f.push("requests_each", n as f64, "requests");
    f.push("failed", cost.failed as f64, "requests");
    let headline = match (cost.page_us, cost.plain_us, cost.ratio()) {
        (Some(p), Some(q), Some(r)) => format!(
            "a page costs the gateway {} µs of CPU, a plain request {} µs: {} plain requests (a client would send {CALLS_PER_PAGE})",
            num(p),
            num(q),
            num(r)
        ),
        _ => "the gateway thread's CPU time could not be read".into(),
    };
    Ok(Measured {
        headline,
        verdict: verdict(&cost),
        figures: f,
        charts: Vec::new(),
    })
}

/// The rule of [`META`].
pub fn verdict(c: &Cost) -> Verdict {
    let Some(r) = c.ratio() else {
        return Verdict::new(
            Outcome::Inconclusive,
            "the CPU time of the gateway's thread could not be read (/proc/self/task)",
        );
    };
    if c.failed > 0 {
        return Verdict::new(
            Outcome::Inconclusive,
            format!("{} requests failed", c.failed),
        );
    }
    let because = format!(
        "a page cost the gateway {} plain requests' CPU, against the {CALLS_PER_PAGE} requests a client would send instead",
        num(r)
    );
    if r < CALLS_PER_PAGE {
        Verdict::new(Outcome::Mitigated, because)
    } else {
        Verdict::new(Outcome::Holds, because)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_compares_a_page_with_the_calls_it_replaces() {
        let c = |page, plain, failed| Cost {
            pages: 100,
            plain: 100,
            failed,
            page_us: page,
            plain_us: plain,
        };
        assert_eq!(
            verdict(&c(Some(150.0), Some(50.0), 0)).outcome,
            Outcome::Mitigated
        );
        assert_eq!(
            verdict(&c(Some(250.0), Some(50.0), 0)).outcome,
            Outcome::Holds
        );
        assert_eq!(
            verdict(&c(None, Some(50.0), 0)).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            verdict(&c(Some(150.0), Some(50.0), 1)).outcome,
            Outcome::Inconclusive
        );
    }

    #[test]
    fn this_threads_cpu_time_is_read_from_proc() {
        let me = threads();
        assert!(
            !me.is_empty(),
            "/proc/self/task lists this process's threads"
        );
        let worker = Worker {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tid: me.iter().copied().min(),
            stop: CancellationToken::new(),
            thread: None,
        };
        assert!(worker.cpu_ns().is_some_and(|ns| ns > 0));
    }
}
