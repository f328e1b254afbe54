//! Aggregation: what does one composite page cost the gateway itself, against the plain
//! requests a client would send instead?

use std::time::Duration;

use super::{Ctx, Measured, Meta};
use crate::cpu::{self, Worker};
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

/// `n` GETs of `path` + a product id, `CLIENTS` at a time; the number that failed.
async fn load(shop: &LabShop, base: &str, path: &str, n: usize, offset: usize) -> usize {
    let ids: Vec<&str> = shop.products.iter().map(|p| p.id.as_str()).collect();
    if ids.is_empty() {
        return n;
    }
    cpu::load(n, CLIENTS, |i| {
        shop.http
            .get(format!("{base}{path}{}", ids[(offset + i) % ids.len()]))
    })
    .await
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let shop = ctx.shop(ShopSpec::MAIN)?;
    let worker = Worker::start(shopmesh_shop::gateway_config(&shop.cfg, |n| {
        shop.service(n)
    }))?;
    let base = worker.base();
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
            let (failed, us) = worker.per(n, load(shop, &base, path, n, warm)).await;
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
}
