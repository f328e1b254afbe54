//! What a host shows the console: plain data, filled by the gateway and the shop from state
//! they keep anyway, sent to the page as JSON. Instants are Unix milliseconds.

use serde::Serialize;
use serde_json::Value;

/// What the host has: the page shows the views these allow.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Features {
    /// Routes, clusters, composites, configuration (every host with a gateway).
    pub gateway: bool,
    /// `POST /console/api/config/reload` reloads a configuration file.
    pub reload: bool,
    /// Dead letters, outboxes, consumers.
    pub messaging: bool,
    /// Orders and their sagas.
    pub orders: bool,
}

/// The state of the system at one instant, as the host sees it. Cheap to produce: it reads
/// state the host keeps anyway, and only while somebody watches.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Observation {
    pub gateway: Option<GatewayView>,
    /// The health strip: each service, broker, database, cache.
    pub health: Vec<Health>,
    /// The dead letters (newest last), when the host keeps them.
    pub dead_letters: Option<Vec<DeadLetterView>>,
    /// Each outbox's backlog.
    pub outboxes: Vec<OutboxView>,
    /// Sagas that moved since the previous observation (not kept: sent as events).
    #[serde(skip)]
    pub sagas: Vec<SagaChange>,
    /// Subjects (orders) whose messages moved since the previous observation: delivered,
    /// retried, dead-lettered, replayed (not kept: sent as one `messages` event).
    #[serde(skip)]
    pub messages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Health {
    pub name: String,
    /// `ok`, `degraded` or `down`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GatewayView {
    pub version: u64,
    pub loaded_at: i64,
    /// Where the configuration comes from (a file), if anywhere.
    pub source: Option<String>,
    /// The last reload's error, while the previous configuration serves on.
    pub last_error: Option<String>,
    /// The effective configuration, secrets masked.
    pub config: Value,
    pub reloads: Vec<ReloadView>,
    pub routes: Vec<RouteView>,
    pub clusters: Vec<ClusterView>,
    /// The key ids of the JWKS the gateway verifies tokens with (a new one: a rotation).
    pub signing_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReloadView {
    /// Increases by one per attempt.
    pub seq: u64,
    pub at: i64,
    pub ok: bool,
    /// The version now serving (the new one, or the kept one after a refusal).
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What changed, one line each (`route orders: changed`, `cluster shadow: added`).
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteView {
    pub name: String,
    /// How requests are matched, in words (`prefix /api/orders`, `GET template /x/{id}`).
    pub matches: String,
    /// `cluster`, `split`, `aggregate` or `document`.
    pub kind: &'static str,
    /// The cluster (kind `cluster`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The variants (kind `split`): name, cluster and configured weight.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantView>,
    /// The parts (kind `aggregate`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorView>,
    pub auth: bool,
    pub rate_limited: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VariantView {
    pub name: String,
    pub cluster: String,
    pub weight: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartView {
    pub name: String,
    pub cluster: String,
    pub required: bool,
    pub timeout_ms: Option<u64>,
    pub cached: bool,
    /// Parts whose answers this one reads.
    pub after: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MirrorView {
    pub cluster: String,
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView {
    pub name: String,
    pub load_balancer: String,
    pub health_checked: bool,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointView {
    pub url: String,
    pub healthy: bool,
    /// When the last active health check answered (none without checks).
    pub last_check: Option<i64>,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Since when the breaker is in that state.
    pub breaker_since: i64,
    /// How often it opened.
    pub trips: u64,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetterView {
    pub id: String,
    /// The service that keeps it.
    pub service: String,
    pub consumer: String,
    pub topic: String,
    pub reason: String,
    pub attempts: i64,
    pub failed_at: String,
    /// The message's subject (the order, for the saga's messages).
    pub subject: Option<String>,
    /// Who it concerns, when the host can tell (the order's customer).
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxView {
    pub service: String,
    pub pending: i64,
    /// Age of the oldest staged event, in milliseconds.
    pub oldest_ms: Option<i64>,
}

/// An order whose saga moved.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SagaChange {
    pub order: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The newest step of its timeline.
    pub step: String,
    pub at: i64,
}
