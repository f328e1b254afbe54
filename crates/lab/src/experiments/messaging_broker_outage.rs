//! Asynchronous messaging: a real broker gone mid-burst (every connection to it dropped, none
//! accepted) and back a few seconds later — does the shop keep accepting orders, is anything
//! lost, doubled or stuck, and how long until every order is settled after it returns?

use std::net::SocketAddr;
use std::time::Duration;

use shopmesh_platform::db::Db;
use tokio::time::Instant;

use super::burst::Burst;
use super::saga::{Audit, SagaDbs, Setup, audit, audit_figures, settled_count};
use super::{Ctx, Measured, Meta};
use crate::relay::Relay;
use crate::report::{Chart, Figures, Group, Outcome, Series, Verdict, num};
use crate::shop::{Backend, LabShop, ShopSpec};
use crate::{LabError, Scale};

pub const META: Meta = Meta {
    id: "messaging.broker-outage",
    group: Group::Messaging,
    claim: "Reliable MQ system required: the broker restarted mid-burst",
    experiment: "a real broker's connections cut mid-burst for a few seconds (3 s; 10 s at full scale), as its restart does to its clients: orders accepted meanwhile, lost, stuck, doubled, the publish backlog, time from its return until every order is settled",
    method: "Real broker mode only (--broker amqp:// or nats://). The lab's shop reaches the broker through a TCP relay the lab controls. Eight clients place orders of the compensation experiment's mix at a steady pace, each with an Idempotency-Key, retried with it when a request fails. A second in, the relay drops every open connection to the broker (both sides closed) and stops listening, so that new ones are refused, for the cut's length; then it listens on the same port again. The broker itself keeps running, so what it stored survives as on the restart of a durable broker; it is its connections that go. The outbox tables are counted during the cut (the publish backlog), and the services' databases are read after it until every accepted order is decided and every effect settled.",
    rule: "Mitigated when, with the broker gone mid-burst, orders were still accepted while it was gone, no accepted order is lost or pending, every order offered was answered, the databases hold no order a client was not told of, none has two payments or a second charge, money and stock are exact and everything settles after the broker returns (the outbox, the retries and the consumers' inboxes carry the shop across); partly when all that holds but no order was accepted while the broker was gone; holds when anything was lost, doubled or left unsettled; inconclusive in embedded mode (the embedded broker's restart is messaging.crash), with Kafka (its clients reach the addresses it advertises, not the relay), or when no broker connection was cut or no order was accepted before the cut.",
    shops: &[],
};

/// Concurrent clients of the burst.
const CLIENTS: usize = 8;
/// Orders placed before the cut, and after the broker returns, in seconds.
const LEAD_SECS: f64 = 1.0;
const TAIL_SECS: f64 = 1.0;
/// How long a client keeps retrying an order whose request failed.
const RETRY_LIMIT: Duration = Duration::from_secs(60);
/// How long the orders may take to settle after the broker returns.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// How often the outbox is counted during the cut.
const OUTBOX_EVERY: Duration = Duration::from_millis(100);

pub fn steps(_: &Scale) -> u64 {
    5
}

/// When an order was accepted, against the cut.
const BEFORE: usize = 0;
const DURING: usize = 1;
const AFTER: usize = 2;

/// What the outage did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outage {
    /// Why the cut was not made (embedded broker, Kafka); `None` when it was.
    pub not_cut: Option<String>,
    /// How long the broker was unreachable.
    pub cut_ms: f64,
    /// Broker connections open through the relay at the cut, and new ones turned away.
    pub connections_cut: u64,
    pub connections_turned_away: u64,
    /// Orders the clients set out to place.
    pub offered: usize,
    /// Accepted before the cut, while the broker was gone, after it returned.
    pub accepted_before_cut: usize,
    pub accepted_during_cut: usize,
    pub accepted_after_restore: usize,
    /// Answered with a refusal (4xx).
    pub refused: usize,
    /// Neither accepted nor refused within the retry limit.
    pub unanswered: usize,
    /// Requests that failed (no answer, 5xx) and were sent again with the same key.
    pub retried: usize,
    /// Orders of the lab's customers in the database beyond those accepted.
    pub unacknowledged: usize,
    /// Events staged in the services' outboxes, not yet published: most seen during the cut,
    /// and at its end.
    pub outbox_max: i64,
    pub outbox_at_restore: i64,
    /// From the broker's return until the outboxes were empty.
    pub outbox_empty_after_ms: Option<f64>,
    /// From the broker's return until every order accepted before it returned was settled,
    /// and until every order of the burst was.
    pub recovered_after_ms: Option<f64>,
    pub all_settled_after_ms: Option<f64>,
    pub audit: Audit,
}

pub async fn run(ctx: &Ctx<'_>) -> Result<Measured, LabError> {
    let url = match ctx.backend.broker.as_deref() {
        Some(url) if url != "embedded" => url.to_owned(),
        _ => {
            return Ok(not_run(
                "needs --broker: the embedded broker's restart is messaging.crash",
            ));
        }
    };
    if url.starts_with("kafka") {
        return Ok(not_run(
            "not run on Kafka: its clients connect to the addresses the broker advertises, not through the lab's relay",
        ));
    }
    let no_host = || LabError::Usage(format!("--broker {url}: no single host to relay to"));
    let (_, upstream_at) = relayed_url(&url, ([127, 0, 0, 1], 0).into()).ok_or_else(no_host)?;
    let upstream = tokio::net::lookup_host(&upstream_at)
        .await?
        .next()
        .ok_or_else(|| LabError::Usage(format!("--broker: {upstream_at} does not resolve")))?;
    let relay = Relay::start(upstream, Duration::ZERO).await?;
    let (relayed, _) = relayed_url(&url, relay.addr()).ok_or_else(no_host)?;
    let backend = Backend {
        database: ctx.backend.database.clone(),
        broker: Some(relayed),
    };
    ctx.say("starting a shop on the relayed broker");
    let shop = LabShop::start(ShopSpec::MAIN, &backend, ctx.scale.products).await?;
    let result = measure(ctx, &shop, &relay).await;
    // The broker back for the shop's shutdown, whatever happened.
    relay.restore();
    shop.stop().await;
    let (o, pending_curve) = result?;
    Ok(measured(o, pending_curve))
}

fn not_run(why: &str) -> Measured {
    measured(
        Outage {
            not_cut: Some(why.to_owned()),
            ..Outage::default()
        },
        Vec::new(),
    )
}

fn measured(o: Outage, pending_curve: Vec<(f64, f64)>) -> Measured {
    let mut f = Figures::default();
    f.push("cuts", if o.not_cut.is_some() { 0.0 } else { 1.0 }, "times");
    let verdict = verdict(&o);
    if let Some(why) = &o.not_cut {
        return Measured {
            headline: format!("not run: {why}"),
            verdict,
            figures: f,
            charts: Vec::new(),
        };
    }
    f.push("clients", CLIENTS as f64, "clients");
    f.push("cut_ms", o.cut_ms, "ms");
    f.push("connections.cut", o.connections_cut as f64, "connections");
    f.push(
        "connections.turned_away",
        o.connections_turned_away as f64,
        "connections",
    );
    f.push("orders.offered", o.offered as f64, "orders");
    f.push(
        "orders.accepted_before_cut",
        o.accepted_before_cut as f64,
        "orders",
    );
    f.push(
        "orders.accepted_during_cut",
        o.accepted_during_cut as f64,
        "orders",
    );
    f.push(
        "orders.accepted_after_restore",
        o.accepted_after_restore as f64,
        "orders",
    );
    f.push("orders.refused", o.refused as f64, "orders");
    f.push("orders.unanswered", o.unanswered as f64, "orders");
    f.push("requests.retried", o.retried as f64, "requests");
    f.push("orders.unacknowledged", o.unacknowledged as f64, "orders");
    f.push("outbox.max", o.outbox_max as f64, "events");
    f.push("outbox.at_restore", o.outbox_at_restore as f64, "events");
    if let Some(ms) = o.outbox_empty_after_ms {
        f.push("outbox_empty_after_restore_ms", ms, "ms");
    }
    if let Some(ms) = o.recovered_after_ms {
        f.push("recovered_after_restore_ms", ms, "ms");
    }
    if let Some(ms) = o.all_settled_after_ms {
        f.push("all_settled_after_restore_ms", ms, "ms");
    }
    audit_figures(&o.audit, &mut f);
    let a = &o.audit;
    Measured {
        headline: format!(
            "broker gone {} s mid-burst: {} orders accepted meanwhile ({} events waiting in the outboxes); recovered {}; {} lost, {} pending, {} double authorizations, {} double charges, stock off by {}",
            num(o.cut_ms / 1e3),
            o.accepted_during_cut,
            o.outbox_at_restore,
            o.recovered_after_ms
                .map_or("not within 120 s".into(), |ms| format!(
                    "{} s after its return",
                    num(ms / 1e3)
                )),
            a.lost,
            a.pending,
            a.double_authorizations,
            a.double_charges,
            a.stock_difference,
        ),
        verdict,
        figures: f,
        charts: vec![Chart {
            title: "Accepted orders not yet settled after the broker returned".into(),
            x_label: "seconds since the broker returned".into(),
            y_label: "orders not settled".into(),
            series: vec![Series::new("orders not settled", pending_curve)],
        }],
    }
}

/// The broker URL pointed at `to` instead (credentials, path and query kept), and the
/// address it named (the scheme's default port added when none is written).
fn relayed_url(url: &str, to: SocketAddr) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    if host_port.is_empty() || host_port.contains(',') {
        return None;
    }
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let at = if has_port {
        host_port.to_owned()
    } else {
        let port = match scheme {
            "amqp" => 5672,
            "amqps" => 5671,
            "nats" => 4222,
            _ => return None,
        };
        format!("{host_port}:{port}")
    };
    Some((format!("{scheme}://{userinfo}{to}{tail}"), at))
}

/// The burst, the cut, the broker's return and the settling.
async fn measure(
    ctx: &Ctx<'_>,
    shop: &LabShop,
    relay: &Relay,
) -> Result<(Outage, Vec<(f64, f64)>), LabError> {
    ctx.step("registering customers");
    let setup = Setup::new(shop, 0).await?;
    let cut_for = Duration::from_secs_f64(ctx.scale.broker_cut_secs.max(0.5));
    let n = ctx.scale.saga_orders.max(CLIENTS * 2);
    let span = LEAD_SECS + cut_for.as_secs_f64() + TAIL_SECS;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(span) + RETRY_LIMIT;
    let burst = Burst::new(&shop.http, &shop.base, setup.mix(), n, "lab-outage", until)
        .paced(start, Duration::from_secs_f64(span / n as f64));
    ctx.step("orders placed, the broker's connections cut and restored");
    let controller = async {
        tokio::time::sleep_until(start + Duration::from_secs_f64(LEAD_SECS)).await;
        let cut_at = Instant::now();
        let connections_cut = relay.cut();
        burst.set_phase(DURING);
        let (mut outbox_max, mut outbox_last) = (0, 0);
        while cut_at.elapsed() < cut_for {
            if let Ok(c) = outbox(&setup.dbs).await {
                outbox_max = outbox_max.max(c);
                outbox_last = c;
            }
            tokio::time::sleep(OUTBOX_EVERY.min(cut_for.saturating_sub(cut_at.elapsed()))).await;
        }
        // An answer counted as during the cut was sent before the broker returned.
        burst.set_phase(AFTER);
        relay.restore();
        let restored = Instant::now();
        let cut_ms = cut_at.elapsed().as_secs_f64() * 1e3;
        // Recovery: every order accepted before the return settled.
        let before_return = burst.placed();
        let mut recovered_after_ms = None;
        let mut outbox_empty_after_ms = None;
        while restored.elapsed() < SETTLE_LIMIT {
            let a = audit(&setup.dbs, &before_return, &setup.before).await?;
            if outbox_empty_after_ms.is_none() && outbox(&setup.dbs).await? == 0 {
                outbox_empty_after_ms = Some(restored.elapsed().as_secs_f64() * 1e3);
            }
            if a.pending == 0 && a.unsettled == 0 && a.lost == 0 {
                recovered_after_ms = Some(restored.elapsed().as_secs_f64() * 1e3);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok::<_, LabError>((
            restored,
            cut_ms,
            connections_cut,
            outbox_max,
            outbox_last,
            recovered_after_ms,
            outbox_empty_after_ms,
        ))
    };
    let (_, cut) = tokio::join!(burst.run(CLIENTS), controller);
    let (
        restored,
        cut_ms,
        connections_cut,
        outbox_max,
        outbox_at_restore,
        recovered_after_ms,
        mut outbox_empty_after_ms,
    ) = cut?;
    let placed = burst.placed();
    let tally = burst.into_tally()?;

    ctx.step("waiting until every order is settled");
    let mut pending_curve = Vec::new();
    let mut all_settled_after_ms = None;
    let a = loop {
        let a = audit(&setup.dbs, &placed, &setup.before).await?;
        let t = restored.elapsed();
        pending_curve.push((
            t.as_secs_f64(),
            a.placed.saturating_sub(a.settle_ms.len()) as f64,
        ));
        if outbox_empty_after_ms.is_none() && outbox(&setup.dbs).await? == 0 {
            outbox_empty_after_ms = Some(t.as_secs_f64() * 1e3);
        }
        if a.pending == 0 && a.unsettled == 0 {
            all_settled_after_ms = Some(t.as_secs_f64() * 1e3);
        }
        if all_settled_after_ms.is_some() || t >= SETTLE_LIMIT {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let users: Vec<String> = setup.customers.iter().map(|c| c.id.clone()).collect();
    let (_, in_db) = settled_count(&setup.dbs.orders, &users).await?;
    ctx.step("done");
    Ok((
        Outage {
            not_cut: None,
            cut_ms,
            connections_cut,
            connections_turned_away: relay.turned_away(),
            offered: n,
            accepted_before_cut: tally.accepted[BEFORE],
            accepted_during_cut: tally.accepted[DURING],
            accepted_after_restore: tally.accepted[AFTER],
            refused: tally.refused,
            unanswered: tally.unanswered,
            retried: tally.retried,
            unacknowledged: in_db.saturating_sub(placed.len()),
            outbox_max,
            outbox_at_restore,
            outbox_empty_after_ms,
            recovered_after_ms,
            all_settled_after_ms,
            audit: a,
        },
        pending_curve,
    ))
}

/// Events staged and not yet published, over the saga's services.
async fn outbox(dbs: &SagaDbs) -> Result<i64, LabError> {
    let mut n = 0;
    for db in [&dbs.orders, &dbs.payments, &dbs.inventory] {
        n += count(db).await?;
    }
    Ok(n)
}

async fn count(db: &Db) -> Result<i64, LabError> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    Ok(n)
}

/// The rule of [`META`], applied to the outage.
pub fn verdict(o: &Outage) -> Verdict {
    if let Some(why) = &o.not_cut {
        return Verdict::new(Outcome::Inconclusive, why.clone());
    }
    let a = &o.audit;
    let because = format!(
        "the broker's {} connections cut for {} ms ({} more closed as the cut was made): {} orders accepted before, {} while it was gone, {} after; {} requests failed and were retried with their key, {} never answered, {} in the database unacknowledged; {} events waited in the outboxes at its return; {} lost, {} pending, {} with two payments, {} charged twice, money off by {}, stock off by {} units, {} units left reserved, {} with the wrong outcome; the orders accepted until its return settled {}, all {}",
        o.connections_cut,
        num(o.cut_ms),
        o.connections_turned_away,
        o.accepted_before_cut,
        o.accepted_during_cut,
        o.accepted_after_restore,
        o.retried,
        o.unanswered,
        o.unacknowledged,
        o.outbox_at_restore,
        a.lost,
        a.pending,
        a.double_authorizations,
        a.double_charges,
        a.money_difference_minor,
        a.stock_difference,
        a.reserved_left,
        a.wrong_outcome,
        after(o.recovered_after_ms),
        after(o.all_settled_after_ms),
    );
    if o.connections_cut == 0 || o.accepted_before_cut == 0 {
        return Verdict::new(Outcome::Inconclusive, because);
    }
    let survived = a.exact()
        && o.unanswered == 0
        && o.unacknowledged == 0
        && o.recovered_after_ms.is_some()
        && o.all_settled_after_ms.is_some();
    match (survived, o.accepted_during_cut > 0) {
        (true, true) => Verdict::new(Outcome::Mitigated, because),
        (true, false) => Verdict::new(Outcome::Partly, because),
        (false, _) => Verdict::new(Outcome::Holds, because),
    }
}

fn after(ms: Option<f64>) -> String {
    ms.map_or("not within 120 s".into(), |ms| {
        format!("{} ms after it returned", num(ms))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage(before: usize, during: usize, after: usize) -> Outage {
        let all = before + during + after;
        Outage {
            cut_ms: 3000.0,
            connections_cut: 3,
            offered: all,
            accepted_before_cut: before,
            accepted_during_cut: during,
            accepted_after_restore: after,
            outbox_max: 40,
            outbox_at_restore: 40,
            recovered_after_ms: Some(1200.0),
            all_settled_after_ms: Some(1500.0),
            audit: Audit {
                placed: all,
                confirmed: all,
                ..Audit::default()
            },
            ..Outage::default()
        }
    }

    #[test]
    fn the_verdict_follows_the_audit_across_the_outage() {
        assert_eq!(verdict(&outage(20, 50, 20)).outcome, Outcome::Mitigated);
        let mut lost = outage(20, 50, 20);
        lost.audit.lost = 1;
        assert_eq!(verdict(&lost).outcome, Outcome::Holds);
        let mut doubled = outage(20, 50, 20);
        doubled.audit.double_authorizations = 1;
        assert_eq!(verdict(&doubled).outcome, Outcome::Holds);
        let mut stuck = outage(20, 50, 20);
        stuck.recovered_after_ms = None;
        stuck.all_settled_after_ms = None;
        stuck.audit.pending = 3;
        assert_eq!(verdict(&stuck).outcome, Outcome::Holds);
        let mut unanswered = outage(20, 50, 20);
        unanswered.unanswered = 1;
        assert_eq!(verdict(&unanswered).outcome, Outcome::Holds);
        assert_eq!(verdict(&outage(20, 0, 70)).outcome, Outcome::Partly);
        assert_eq!(verdict(&outage(0, 50, 40)).outcome, Outcome::Inconclusive);
        let mut nothing_cut = outage(20, 50, 20);
        nothing_cut.connections_cut = 0;
        assert_eq!(verdict(&nothing_cut).outcome, Outcome::Inconclusive);
        let embedded = Outage {
            not_cut: Some("needs --broker".into()),
            ..Outage::default()
        };
        assert_eq!(verdict(&embedded).outcome, Outcome::Inconclusive);
    }

    #[test]
    fn the_broker_url_is_pointed_at_the_relay() {
        let relay: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f?queue_type=classic";
        assert_eq!(
            relayed_url(url, relay).unwrap(),
            (
                "amqp://guest:guest@127.0.0.1:40000/%2f?queue_type=classic".to_owned(),
                "127.0.0.1:5672".to_owned()
            )
        );
        assert_eq!(
            relayed_url("nats://localhost", relay).unwrap(),
            (
                "nats://127.0.0.1:40000".to_owned(),
                "localhost:4222".to_owned()
            )
        );
        assert!(relayed_url("kafka://a:9092,b:9092", relay).is_none());
    }
}
