//! Asynchronous messaging: the shop's own process killed (`kill -9`) in the middle of a burst
//! of orders and started again on its data — is any accepted order lost, reserved or charged
//! twice, and how long until the shop serves again and every order is settled?

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shopmesh_platform::db::{Db, Storage};
use shopmesh_shop::ServiceName;
use tokio::time::Instant;

use super::burst::{Burst, Mix};
use super::saga::{Audit, Customer, SagaDbs, audit, audit_figures, settled_count, stock};
use super::{Ctx, Measured, Meta};
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{Product, register_at, sign_in_at};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "messaging.crash",
    group: Group::Messaging,
    claim: "Higher operational cost; reliable MQ system required (a crash may lose or repeat messages; idempotency needed)",
    experiment: "the shop's process killed (kill -9) mid-burst and started again on its data: orders lost or stuck, double reservations and charges, time to serve again and until every order is settled",
    method: "A `shopmesh up` process of its own (the services, their databases and, embedded, the broker's file, all in that one process) takes a burst of orders of the compensation experiment's mix from eight concurrent clients, each order with an Idempotency-Key. Once half are accepted the process is killed with SIGKILL and started again on the same data; a client whose request failed meanwhile retries it with the same key until accepted. Then the services' databases are read until every accepted order is decided and every effect settled (a reservation taken twice shows as stock off). The dead process's databases are read between the kill and the restart, which the time to serve again leaves out. With --database or --broker the process uses them; a real broker then outlives the kill.",
    rule: "Mitigated when, with the process killed mid-burst and started again, no accepted order is lost or pending, every order offered was accepted or refused, the databases hold no order a client was not told of, none has two payments or a second charge, and money and stock are exact (the outbox, the broker's durable queue and the consumers' inboxes carry the messages across the crash); holds when any loss, duplicate effect or unsettled order shows; inconclusive when the process was not killed with orders accepted on both sides of the kill (or no shopmesh executable was given).",
    shops: &[],
};

/// Concurrent clients of the burst.
const CLIENTS: usize = 8;
/// The burst's phases: acceptances before the kill, and after it (only the new process can
/// answer those).
const BEFORE_KILL: usize = 0;
const AFTER_KILL: usize = 1;
/// Products seeded in the process's shop.
const PRODUCTS: usize = 400;
/// How long the process may take to answer after a start.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long a client keeps retrying an order whose request failed.
const RETRY_LIMIT: Duration = Duration::from_secs(60);
/// How long the orders may take to settle after the restart.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

pub fn steps(_: &Scale) -> u64 {
    5
}

/// What the crash did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Crash {
    /// Orders the clients set out to place.
    pub offered: usize,
    /// Accepted before the kill, and after it (by the restarted process).
    pub accepted_before_kill: usize,
    pub accepted_after_kill: usize,
    /// Answered with a refusal (4xx).
    pub refused: usize,
    /// Neither accepted nor refused within the retry limit.
    pub unanswered: usize,
    /// Requests that failed (no answer, 5xx) and were sent again with the same key.
    pub retried: usize,
    /// Orders of the lab's customers in the database beyond those accepted.
    pub unacknowledged: usize,
    /// Accepted orders not yet settled when the process was killed.
    pub unsettled_at_kill: usize,
    /// From the kill until the gateway answered again (the audit in between left out).
    pub serving_again_ms: f64,
    /// From the restart until every accepted order was settled; `None` when not within the
    /// limit.
    pub settled_after_ms: Option<f64>,
    pub audit: Audit,
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let Some(bin) = ctx.shopmesh else {
        let mut f = Figures::default();
        f.push("kills", 0.0, "times");
        return Ok(Measured {
            headline: "not run: no shopmesh binary given".into(),
            verdict: Verdict::new(
                Outcome::Inconclusive,
                "not run: no shopmesh binary given (`shopmesh lab` gives itself)",
            ),
            figures: f,
            charts: Vec::new(),
        });
    };
    let dir = tempfile::tempdir()?;
    let ns = crate::shop::namespace();
    let storage = ctx.backend.storage(&ns, &dir.path().join("data"));
    let mut shop = Process::new(bin, dir.path(), &ns, ctx.backend)?;
    let result = measure(ctx, &mut shop, &storage).await;
    shop.kill();
    crate::shop::drop_schemas(&storage).await;
    let (crash, pending_curve) = result?;
    let mut f = Figures::default();
    f.push("kills", 1.0, "times");
    f.push("clients", CLIENTS as f64, "clients");
    f.push("orders.offered", crash.offered as f64, "orders");
    f.push(
        "orders.accepted_before_kill",
        crash.accepted_before_kill as f64,
        "orders",
    );
    f.push(
        "orders.accepted_after_kill",
        crash.accepted_after_kill as f64,
        "orders",
    );
    f.push("orders.refused", crash.refused as f64, "orders");
    f.push("orders.unanswered", crash.unanswered as f64, "orders");
    f.push("requests.retried", crash.retried as f64, "requests");
    f.push(
        "orders.unacknowledged",
        crash.unacknowledged as f64,
        "orders",
    );
    f.push(
        "orders.unsettled_at_kill",
        crash.unsettled_at_kill as f64,
        "orders",
    );
    f.push("kill_to_serving_ms", crash.serving_again_ms, "ms");
    if let Some(ms) = crash.settled_after_ms {
        f.push("all_settled_after_restart_ms", ms, "ms");
    }
    audit_figures(&crash.audit, &mut f);
    let a = &crash.audit;
    Ok(Measured {
        headline: format!(
            "kill -9 with {} of {} accepted orders unsettled: serving again after {} s, all settled {}; {} lost, {} pending, {} double authorizations, {} double charges, stock off by {}",
            crash.unsettled_at_kill,
            crash.accepted_before_kill,
            num(crash.serving_again_ms / 1e3),
            crash
                .settled_after_ms
                .map_or("not within 120 s".into(), |ms| format!(
                    "{} s after the restart",
                    num(ms / 1e3)
                )),
            a.lost,
            a.pending,
            a.double_authorizations,
            a.double_charges,
            a.stock_difference,
        ),
        verdict: verdict(&crash),
        figures: f,
        charts: vec![Chart {
            title: "Accepted orders not yet settled after the restart".into(),
            x_label: "seconds since the restart".into(),
            y_label: "orders not settled".into(),
            series: vec![Series::new("orders not settled", pending_curve)],
        }],
    })
}

/// The burst, the kill, the restart and the settling, on a process started here.
async fn measure(
    ctx: &Ctx<'_>,
    shop: &mut Process,
    storage: &Storage,
) -> Result<(Crash, Vec<(f64, f64)>), LabError> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(5))
        .build()?;
    ctx.say("starting shopmesh up");
    shop.spawn()?;
    shop.ready(&http).await?;
    let base = shop.base.clone();
    ctx.step("registering customers");
    let mut customers = Vec::new();
    for _ in 0..4 {
        let (email, id) = register_at(&http, &base).await?;
        let token = sign_in_at(&http, &base, &email)
            .await?
            .ok_or_else(|| LabError::Shop("sign-in refused".into()))?;
        customers.push(Customer { id, token });
    }
    let catalog = crate::shop::seeded(PRODUCTS);
    let products: Vec<Product> = catalog
        .iter()
        .filter(|p| p.on_hand >= 300)
        .take(30)
        .cloned()
        .collect();
    let none_left: Vec<Product> = catalog.iter().filter(|p| p.on_hand == 0).cloned().collect();
    if products.is_empty() || none_left.is_empty() {
        return Err(LabError::Shop(
            "the seeded catalog has no well-stocked or no sold-out product".into(),
        ));
    }
    let dbs = SagaDbs {
        orders: open(storage, ServiceName::Orders).await?,
        payments: open(storage, ServiceName::Payments).await?,
        inventory: open(storage, ServiceName::Inventory).await?,
    };
    let ids: Vec<String> = products
        .iter()
        .chain(none_left.iter())
        .map(|p| p.id.clone())
        .collect();
    let before = stock(&dbs.inventory, &ids).await?;

    ctx.step("orders placed, the process killed and started again");
    let n = ctx.scale.saga_orders.max(2);
    let mix = Mix {
        customers: &customers,
        products: &products,
        none_left: &none_left,
    };
    let burst = Burst::new(
        &http,
        &base,
        mix,
        n,
        "lab-crash",
        Instant::now() + RETRY_LIMIT,
    );
    let controller = async {
        // Half the burst accepted (or every client finished, which leaves nothing after).
        while burst.accepted() < n / 2 && burst.clients_done() < CLIENTS {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let killing = Instant::now();
        shop.kill();
        // After the kill: an answer counted after it can only come from the new process.
        burst.set_phase(AFTER_KILL);
        let reaped_ms = killing.elapsed().as_secs_f64() * 1e3;
        // What the crash left: accepted orders whose saga was still under way.
        let placed_so_far = burst.placed();
        let at_kill = audit(&dbs, &placed_so_far, &before).await?;
        let restarting = Instant::now();
        shop.spawn()?;
        shop.ready(&http).await?;
        let serving_ms = reaped_ms + restarting.elapsed().as_secs_f64() * 1e3;
        Ok::<_, LabError>((restarting, serving_ms, not_settled(&at_kill)))
    };
    let (_, kill) = tokio::join!(burst.run(CLIENTS), controller);
    let (restarted, serving_again_ms, unsettled_at_kill) = kill?;
    let placed = burst.placed();
    let tally = burst.into_tally()?;

    ctx.step("waiting until every order is settled");
    let mut pending_curve = Vec::new();
    let mut settled_after_ms = None;
    let a = loop {
        let a = audit(&dbs, &placed, &before).await?;
        let t = restarted.elapsed();
        pending_curve.push((t.as_secs_f64(), not_settled(&a) as f64));
        if a.pending == 0 && a.unsettled == 0 {
            settled_after_ms = Some(t.as_secs_f64() * 1e3);
        }
        if settled_after_ms.is_some() || t >= SETTLE_LIMIT {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let users: Vec<String> = customers.iter().map(|c| c.id.clone()).collect();
    let (_, in_db) = settled_count(&dbs.orders, &users).await?;
    ctx.step("done");
    let accepted_before_kill = tally.accepted[BEFORE_KILL];
    Ok((
        Crash {
            offered: n,
            accepted_before_kill,
            accepted_after_kill: placed.len() - accepted_before_kill,
            refused: tally.refused,
            unanswered: tally.unanswered,
            retried: tally.retried,
            unacknowledged: in_db.saturating_sub(placed.len()),
            unsettled_at_kill,
            serving_again_ms,
            settled_after_ms,
            audit: a,
        },
        pending_curve,
    ))
}

/// Orders of the audit not settled (pending, effects under way, or not found).
fn not_settled(a: &Audit) -> usize {
    a.placed.saturating_sub(a.settle_ms.len())
}

async fn open(storage: &Storage, name: ServiceName) -> Result<Db, LabError> {
    Ok(Db::open(&storage.for_service(name.as_str()), 2).await?)
}

/// The rule of [`META`], applied to the crash.
pub fn verdict(c: &Crash) -> Verdict {
    let a = &c.audit;
    let because = format!(
        "killed with {} orders accepted ({} not yet settled), {} accepted after; {} requests failed and were retried with their key, {} orders never answered, {} in the databases unacknowledged; {} lost, {} pending, {} with two payments, {} charged twice, money off by {}, stock off by {} units, {} units left reserved, {} with the wrong outcome; serving again {} ms after the kill, every order settled {}",
        c.accepted_before_kill,
        c.unsettled_at_kill,
        c.accepted_after_kill,
        c.retried,
        c.unanswered,
        c.unacknowledged,
        a.lost,
        a.pending,
        a.double_authorizations,
        a.double_charges,
        a.money_difference_minor,
        a.stock_difference,
        a.reserved_left,
        a.wrong_outcome,
        num(c.serving_again_ms),
        c.settled_after_ms
            .map_or("not within 120 s".into(), |ms| format!(
                "{} ms after the restart",
                num(ms)
            )),
    );
    if c.accepted_before_kill == 0 || c.accepted_after_kill == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    if a.exact() && c.unanswered == 0 && c.unacknowledged == 0 && c.settled_after_ms.is_some() {
        Verdict::new(Outcome::Mitigated, because)
    } else {
        Verdict::new(Outcome::Holds, because)
    }
}

/// `shopmesh up` as a child process on fixed ports and a data directory of its own.
struct Process {
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    base: String,
    child: Option<Child>,
}

impl Process {
    fn new(
        bin: &Path,
        dir: &Path,
        ns: &str,
        backend: &crate::shop::Backend,
    ) -> Result<Process, LabError> {
        let (port, admin) = (free_port()?, free_port()?);
        let mut args: Vec<OsString> = vec!["up".into(), "--data-dir".into()];
        args.push(dir.join("data").into_os_string());
        for (k, v) in [
            ("--port", port.to_string()),
            ("--admin-port", admin.to_string()),
            ("--seed-products", PRODUCTS.to_string()),
            ("--login-per-account", "1000".into()),
            ("--login-per-ip", "100000".into()),
        ] {
            args.push(k.into());
            args.push(v.into());
        }
        if let Some(url) = &backend.database {
            args.extend(["--database".into(), url.into()]);
            args.extend(["--schema-prefix".into(), format!("{ns}_").into()]);
        }
        if let Some(url) = backend.broker_arg(ns) {
            args.extend(["--broker".into(), url.into()]);
        }
        Ok(Process {
            bin: bin.to_owned(),
            args,
            log: dir.join("up.log"),
            base: format!("http://127.0.0.1:{port}"),
            child: None,
        })
    }

    fn spawn(&mut self) -> Result<(), LabError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Only the arguments decide: no setting of the lab's own environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SHOPMESH_") {
                cmd.env_remove(k);
            }
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Waits until the gateway serves the catalog.
    async fn ready(&mut self, http: &reqwest::Client) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_LIMIT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(LabError::Shop(format!(
                    "shopmesh up exited ({status}); see {}",
                    self.log.display()
                )));
            }
            if let Ok(r) = http
                .get(format!("{}/api/products?limit=1", self.base))
                .send()
                .await
                && r.status() == 200
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(LabError::Shop(format!(
            "shopmesh up did not serve within {} s",
            READY_LIMIT.as_secs()
        )))
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reaped.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, LabError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash(before: usize, after: usize) -> Crash {
        Crash {
            offered: before + after,
            accepted_before_kill: before,
            accepted_after_kill: after,
            serving_again_ms: 300.0,
            settled_after_ms: Some(900.0),
            audit: Audit {
                placed: before + after,
                confirmed: before + after,
                ..Audit::default()
            },
            ..Crash::default()
        }
    }

    #[test]
    fn the_verdict_follows_the_audit_across_the_crash() {
        assert_eq!(verdict(&crash(40, 40)).outcome, Outcome::Mitigated);
        let mut lost = crash(40, 40);
        lost.audit.lost = 1;
        assert_eq!(verdict(&lost).outcome, Outcome::Holds);
        let mut doubled = crash(40, 40);
        doubled.audit.double_charges = 1;
        assert_eq!(verdict(&doubled).outcome, Outcome::Holds);
        let mut extra = crash(40, 40);
        extra.unacknowledged = 1;
        assert_eq!(verdict(&extra).outcome, Outcome::Holds);
        let mut stuck = crash(40, 40);
        stuck.settled_after_ms = None;
        stuck.audit.pending = 2;
        assert_eq!(verdict(&stuck).outcome, Outcome::Holds);
        assert_eq!(verdict(&crash(0, 40)).outcome, Outcome::Inconclusive);
        assert_eq!(verdict(&crash(40, 0)).outcome, Outcome::Inconclusive);
    }
}
