//! The experiments: one module each, with the same parts — `META` (the claim, the method
//! and the verdict's rule, in words), `steps` (for its progress bar), `run` (measure) and
//! `verdict` (a pure function of the measurements, unit-tested on its own).

pub mod aggregation_cpu;
pub mod aggregation_load;
pub mod aggregation_rtt;
pub mod aggregation_slow_part;
pub mod burst;
pub mod messaging_broker_outage;
pub mod messaging_burst;
pub mod messaging_compensation;
pub mod messaging_crash;
pub mod messaging_decoupling;
pub mod messaging_duplicates;
pub mod proxy_filters;
pub mod proxy_gray;
pub mod proxy_overhead;
pub mod proxy_single_point;
pub mod saga;
pub mod shared_data_bottleneck;
pub mod shared_data_consistency;
pub mod shared_data_coupling;

use indicatif::ProgressBar;

use crate::report::{Chart, Figures, Finding, Group, NotMeasured, Outcome, Verdict};
use crate::shop::{LabShop, ShopSpec, Shops};
use crate::{LabError, Scale};

/// What an experiment is about, fixed in code.
#[derive(Debug)]
pub struct Meta {
    pub id: &'static str,
    pub group: Group,
    pub claim: &'static str,
    pub experiment: &'static str,
    pub method: &'static str,
    pub rule: &'static str,
    /// The shops it runs against (none: it brings its own servers).
    pub shops: &'static [ShopSpec],
}

/// What an experiment hands back: its figures, charts, headline and verdict.
#[derive(Debug)]
pub struct Measured {
    pub headline: String,
    pub verdict: Verdict,
    pub figures: Figures,
    pub charts: Vec<Chart>,
}

/// What an experiment may use while it runs.
pub struct Ctx<'a> {
    pub shops: &'a Shops,
    pub scale: &'a Scale,
    pub bar: &'a ProgressBar,
    /// Where shops keep their data (for an experiment that starts its own).
    pub backend: &'a crate::shop::Backend,
    /// The `shopmesh` executable, when given.
    pub shopmesh: Option<&'a std::path::Path>,
}

impl Ctx<'_> {
    pub fn shop(&self, spec: ShopSpec) -> Result<&LabShop, LabError> {
        self.shops.running(spec)
    }

    /// One step done; `msg` says what runs next.
    pub fn step(&self, msg: impl Into<String>) {
        self.bar.inc(1);
        self.bar.set_message(msg.into());
    }

    pub fn say(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }
}

/// Every experiment, in the order they run (those on the same shop together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AggregationRtt,
    AggregationSlowPart,
    AggregationLoad,
    AggregationCpu,
    ProxyOverhead,
    ProxyFilters,
    ProxySinglePoint,
    ProxyGray,
    SharedDataConsistency,
    SharedDataBottleneck,
    SharedDataCoupling,
    MessagingBurst,
    MessagingCompensation,
    MessagingDecoupling,
    MessagingDuplicates,
    MessagingCrash,
    MessagingBrokerOutage,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::AggregationRtt,
        Kind::AggregationSlowPart,
        Kind::AggregationLoad,
        Kind::AggregationCpu,
        Kind::ProxyOverhead,
        Kind::ProxyFilters,
        Kind::ProxySinglePoint,
        Kind::ProxyGray,
        Kind::SharedDataConsistency,
        Kind::SharedDataBottleneck,
        Kind::SharedDataCoupling,
        Kind::MessagingBurst,
        Kind::MessagingCompensation,
        Kind::MessagingDecoupling,
        Kind::MessagingDuplicates,
        Kind::MessagingCrash,
        Kind::MessagingBrokerOutage,
    ];

    pub fn meta(self) -> &'static Meta {
        match self {
            Kind::AggregationRtt => &aggregation_rtt::META,
            Kind::AggregationSlowPart => &aggregation_slow_part::META,
            Kind::AggregationLoad => &aggregation_load::META,
            Kind::AggregationCpu => &aggregation_cpu::META,
            Kind::ProxyOverhead => &proxy_overhead::META,
            Kind::ProxyFilters => &proxy_filters::META,
            Kind::ProxySinglePoint => &proxy_single_point::META,
            Kind::ProxyGray => &proxy_gray::META,
            Kind::SharedDataConsistency => &shared_data_consistency::META,
            Kind::SharedDataBottleneck => &shared_data_bottleneck::META,
            Kind::SharedDataCoupling => &shared_data_coupling::META,
            Kind::MessagingBurst => &messaging_burst::META,
            Kind::MessagingCompensation => &messaging_compensation::META,
            Kind::MessagingDecoupling => &messaging_decoupling::META,
            Kind::MessagingDuplicates => &messaging_duplicates::META,
            Kind::MessagingCrash => &messaging_crash::META,
            Kind::MessagingBrokerOutage => &messaging_broker_outage::META,
        }
    }

    pub fn steps(self, s: &Scale) -> u64 {
        match self {
            Kind::AggregationRtt => aggregation_rtt::steps(s),
            Kind::AggregationSlowPart => aggregation_slow_part::steps(s),
            Kind::AggregationLoad => aggregation_load::steps(s),
            Kind::AggregationCpu => aggregation_cpu::steps(s),
            Kind::ProxyOverhead => proxy_overhead::steps(s),
            Kind::ProxyFilters => proxy_filters::steps(s),
            Kind::ProxySinglePoint => proxy_single_point::steps(s),
            Kind::ProxyGray => proxy_gray::steps(s),
            Kind::SharedDataConsistency => shared_data_consistency::steps(s),
            Kind::SharedDataBottleneck => shared_data_bottleneck::steps(s),
            Kind::SharedDataCoupling => shared_data_coupling::steps(s),
            Kind::MessagingBurst => messaging_burst::steps(s),
            Kind::MessagingCompensation => messaging_compensation::steps(s),
            Kind::MessagingDecoupling => messaging_decoupling::steps(s),
            Kind::MessagingDuplicates => messaging_duplicates::steps(s),
            Kind::MessagingCrash => messaging_crash::steps(s),
            Kind::MessagingBrokerOutage => messaging_broker_outage::steps(s),
        }
    }

    pub async fn run(self, ctx: &Ctx<'_>) -> Result<Measured, LabError> {
        match self {
            Kind::AggregationRtt => aggregation_rtt::run(ctx).await,
            Kind::AggregationSlowPart => aggregation_slow_part::run(ctx).await,
            Kind::AggregationLoad => aggregation_load::run(ctx).await,
            Kind::AggregationCpu => aggregation_cpu::run(ctx).await,
            Kind::ProxyOverhead => proxy_overhead::run(ctx).await,
            Kind::ProxyFilters => proxy_filters::run(ctx).await,
            Kind::ProxySinglePoint => proxy_single_point::run(ctx).await,
            Kind::ProxyGray => proxy_gray::run(ctx).await,
            Kind::SharedDataConsistency => shared_data_consistency::run(ctx).await,
            Kind::SharedDataBottleneck => shared_data_bottleneck::run(ctx).await,
            Kind::SharedDataCoupling => shared_data_coupling::run(ctx).await,
            Kind::MessagingBurst => messaging_burst::run(ctx).await,
            Kind::MessagingCompensation => messaging_compensation::run(ctx).await,
            Kind::MessagingDecoupling => messaging_decoupling::run(ctx).await,
            Kind::MessagingDuplicates => messaging_duplicates::run(ctx).await,
            Kind::MessagingCrash => messaging_crash::run(ctx).await,
            Kind::MessagingBrokerOutage => messaging_broker_outage::run(ctx).await,
        }
    }
}

/// The finding of an experiment: its measurements, or its error as a failed verdict.
pub fn finding(meta: &'static Meta, measured: Result<Measured, LabError>, seconds: f64) -> Finding {
    let m = measured.unwrap_or_else(|e| Measured {
        headline: "did not complete".into(),
        verdict: Verdict::new(Outcome::Failed, e.to_string()),
        figures: Figures::default(),
        charts: Vec::new(),
    });
    Finding {
        id: meta.id,
        group: meta.group,
        claim: meta.claim,
        experiment: meta.experiment,
        method: meta.method,
        rule: meta.rule,
        headline: m.headline,
        verdict: m.verdict,
        figures: m.figures,
        charts: m.charts,
        seconds,
    }
}

/// The design document's claims this version of the lab does not measure, and why.
pub fn not_measured() -> Vec<NotMeasured> {
    vec![
        NotMeasured {
            group: Group::Aggregation,
            claim: "High availability of the aggregation layer must be ensured",
            why: "the aggregation layer is the gateway: proxy.single-point loses one of its instances under plain requests; the same loss under composite pages is not run on its own",
        },
        NotMeasured {
            group: Group::SharedData,
            claim: "Reduces service autonomy, increasing coupling (to the user center's schema)",
            why: "shared-data.coupling measures the run-time side (the users service stopped); what a change to the user center's tables costs its readers is a matter of code and migrations, not a figure the running shop gives",
        },
        NotMeasured {
            group: Group::Messaging,
            claim: "Reliable MQ system required: a Kafka broker gone mid-burst",
            why: "messaging.broker-outage cuts a RabbitMQ or NATS broker's connections through a relay the lab controls; Kafka's clients reach the addresses the broker advertises, not the relay, and restarting the broker itself is its operator's tool (docker, systemctl), not the lab's",
        },
    ]
}

/// Product ids for `n` pages starting at `offset` of the seeded products, so that no two
/// measurements meet each other's cached answers.
pub fn product_window(shop: &LabShop, offset: usize, n: usize) -> Vec<crate::shop::Product> {
    let all = &shop.products;
    if all.is_empty() {
        return Vec::new();
    }
    (0..n)
        .map(|i| all[(offset + i) % all.len()].clone())
        .collect()
}
