//! What the operations console shows of the whole shop (`shopmesh up`): the gateway's view,
//! the services' health, outboxes, dead letters (with the order and customer they concern)
//! and the sagas of the orders, each order with its timeline: the saga's steps merged with
//! what became of each of its messages (published, delivered, retried, dead-lettered,
//! replayed: the [`Journal`]), its dead letters and its events still staged; and its
//! actions: replay a dead letter, validate a gateway configuration. Read only while somebody
//! watches (see [`shopmesh_console`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shopmesh_console::{
    DeadLetterView, Features, Health, Observation, OutboxView, SagaChange, Source,
};
use shopmesh_gateway::Gateway;
use shopmesh_messaging::dlq::DlqError;
use shopmesh_platform::Problem;
use shopmesh_platform::db::Db;
use shopmesh_platform::extract::{Json, Path, Query};
use shopmesh_platform::health::Readiness;
use sqlx::Row;

use crate::dlq::DeadLetters;
use crate::journal::Journal;
use crate::services::ServiceName;

/// Everything the shop's console reads.
#[derive(Clone)]
pub struct ShopSource {
    inner: Arc<Inner>,
}

struct Inner {
    gateway: Gateway,
    dead_letters: DeadLetters,
    readiness: Readiness,
    /// Each service's database (for its outbox).
    dbs: Vec<(ServiceName, Db)>,
    orders: Db,
    users: Db,
    /// What the broker is, for the health strip (`embedded`, `rabbitmq`, …).
    broker: String,
    /// Orders seen pending, with the length of their timeline.
    pending: Mutex<HashMap<String, usize>>,
    /// Customers' names by order (an order's customer never changes; names may, and are
    /// read again when the process restarts).
    names: Mutex<HashMap<String, Option<String>>>,
    /// What became of each order's messages in this process.
    journal: Journal,
    /// The journal's sequence at the previous observation.
    journal_seen: Mutex<u64>,
}

impl ShopSource {
    pub fn new(
        gateway: Gateway,
        dead_letters: DeadLetters,
        readiness: Readiness,
        dbs: Vec<(ServiceName, Db)>,
        broker: String,
        journal: Journal,
    ) -> Self {
        let db = |n: ServiceName| {
            dbs.iter()
                .find(|(m, _)| *m == n)
                .map(|(_, d)| d.clone())
                .expect("every service has a database")
        };
        let (orders, users) = (db(ServiceName::Orders), db(ServiceName::Users));
        Self {
            inner: Arc::new(Inner {
                gateway,
                dead_letters,
                readiness,
                dbs,
                orders,
                users,
                broker,
                pending: Mutex::default(),
                names: Mutex::default(),
                journal_seen: Mutex::new(journal.seq()),
                journal,
            }),
        }
    }
}

fn subject_of(payload: &str) -> Option<String> {
    serde_json::from_str::<Value>(payload)
        .ok()?
        .get("subject")?
        .as_str()
        .map(str::to_owned)
}

const ORDER_COLUMNS: &str = "id, user_id, status, status_reason, total_minor, currency, \
                             created_at, updated_at, timeline, shipping_address, traceparent";

#[derive(Debug, Serialize)]
struct OrderRow {
    id: String,
    user_id: String,
    user_name: Option<String>,
    status: String,
    reason: Option<String>,
    total_minor: i64,
    currency: String,
    created_at: String,
    updated_at: String,
}

#[derive(Debug, Serialize)]
struct Step {
    step: String,
    at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn steps(raw: &str) -> Vec<Step> {
    #[derive(Deserialize)]
    struct Line {
        step: String,
        at: i64,
        detail: Option<String>,
    }
    raw.lines()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .map(|l| Step {
            step: l.step,
            at: l.at,
            detail: l.detail,
        })
        .collect()
}

impl Inner {
    /// Users' names by id (one query for all of them).
    async fn user_names(&self, ids: &[String]) -> HashMap<String, String> {
        let ids: Vec<&String> = ids.iter().collect::<HashSet<_>>().into_iter().collect();
        if ids.is_empty() {
            return HashMap::new();
        }
        let sql = format!(
            "SELECT id, name FROM users WHERE id IN ({})",
            shopmesh_platform::db::placeholders(1, ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in &ids {
            q = q.bind(id.as_str());
        }
        match q.fetch_all(&self.users.pool).await {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| Some((r.try_get("id").ok()?, r.try_get("name").ok()?)))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "console: user names unread");
                HashMap::new()
            }
        }
    }

    /// The customer's name of each order (cached).
    async fn customers(&self, orders: &[String]) -> HashMap<String, Option<String>> {
        let missing: Vec<String> = {
            let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            orders
                .iter()
                .filter(|o| !names.contains_key(*o))
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        if !missing.is_empty() {
            let sql = format!(
                "SELECT id, user_id FROM orders WHERE id IN ({})",
                shopmesh_platform::db::placeholders(1, missing.len())
            );
            let mut q = sqlx::query(&sql);
            for id in &missing {
                q = q.bind(id.as_str());
            }
            let owners: Vec<(String, String)> = q
                .fetch_all(&self.orders.pool)
                .await
                .map(|rows| {
                    rows.iter()
                        .filter_map(|r| Some((r.try_get("id").ok()?, r.try_get("user_id").ok()?)))
                        .collect()
                })
                .unwrap_or_default();
            let users: Vec<String> = owners.iter().map(|(_, u)| u.clone()).collect();
            let names = self.user_names(&users).await;
            let mut cache = self.names.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.clear();
            }
            for id in missing {
                let name = owners
                    .iter()
                    .find(|(o, _)| *o == id)
                    .and_then(|(_, u)| names.get(u).cloned());
                cache.insert(id, name);
            }
        }
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        orders
            .iter()
            .map(|o| (o.clone(), names.get(o).cloned().flatten()))
            .collect()
    }

    async fn health(&self) -> Vec<Health> {
        let (_, checks) = self.readiness.check().await;
        let mut out: Vec<Health> = checks
            .iter()
            .map(|(name, v)| Health {
                name: name.replace(".storage", " db"),
                status: if v == "ok" { "ok" } else { "down" },
                detail: None,
            })
            .collect();
        out.push(Health {
            name: format!("broker ({})", self.broker),
            status: "ok",
            detail: None,
        });
        out
    }

    async fn dead_letters(&self) -> Option<Vec<DeadLetterView>> {
        let entries = self.dead_letters.list(500).await.ok()?;
        let subjects: Vec<Option<String>> = entries
            .iter()
            .map(|e| subject_of(&e.letter.payload))
            .collect();
        let orders: Vec<String> = subjects.iter().flatten().cloned().collect();
        let customers = self.customers(&orders).await;
        Some(
            entries
                .into_iter()
                .zip(subjects)
                .map(|(e, subject)| DeadLetterView {
                    user: subject
                        .as_ref()
                        .and_then(|s| customers.get(s).cloned().flatten()),
                    id: e.letter.id,
                    service: e.service.to_owned(),
                    consumer: e.letter.consumer,
                    topic: e.letter.topic,
                    reason: e.letter.reason,
                    attempts: e.letter.attempts,
                    failed_at: e.letter.failed_at,
                    subject,
                })
                .collect(),
        )
    }

    async fn outboxes(&self) -> Vec<OutboxView> {
        let now = shopmesh_platform::now_millis();
        let mut out = Vec::new();
        for (name, db) in &self.dbs {
            // Services that publish nothing have no outbox.
            let Ok(row) =
                sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox")
                    .fetch_one(&db.pool)
                    .await
            else {
                continue;
            };
            let pending: i64 = row.try_get("n").unwrap_or(0);
            let oldest: Option<i64> = row.try_get("oldest").ok().flatten();
            out.push(OutboxView {
                service: name.as_str().to_owned(),
                pending,
                oldest_ms: oldest.filter(|_| pending > 0).map(|o| (now - o).max(0)),
            });
        }
        out
    }

    /// Orders that moved since the last call: pending ones whose timeline grew, and those
    /// that left PENDING. Reads pending orders by the status index, and the ones that left
    /// by their key: never the whole table.
    async fn sagas(&self) -> Vec<SagaChange> {
        let Ok(rows) = sqlx::query(
            "SELECT id, status, status_reason, timeline FROM orders WHERE status = 'PENDING' \
             ORDER BY created_at LIMIT 1000",
        )
        .fetch_all(&self.orders.pool)
        .await
        else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        let mut now_pending = HashMap::new();
        let before = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let change = |row: &sqlx::any::AnyRow| -> Option<(SagaChange, usize)> {
            let timeline: String = row.try_get("timeline").ok()?;
            let steps = steps(&timeline);
            let last = steps.last()?;
            Some((
                SagaChange {
                    order: row.try_get("id").ok()?,
                    status: row.try_get("status").ok()?,
                    reason: row.try_get("status_reason").ok()?,
                    step: last.step.clone(),
                    at: last.at,
                },
                steps.len(),
            ))
        };
        for row in &rows {
            if let Some((c, n)) = change(row) {
                now_pending.insert(c.order.clone(), n);
                if before.get(&c.order).is_none_or(|m| *m != n) {
                    changes.push(c);
                }
            }
        }
        let left: Vec<&String> = before
            .keys()
            .filter(|k| !now_pending.contains_key(*k))
            .collect();
        for chunk in left.chunks(100) {
            let sql = format!(
                "SELECT id, status, status_reason, timeline FROM orders WHERE id IN ({})",
                shopmesh_platform::db::placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            if let Ok(rows) = q.fetch_all(&self.orders.pool).await {
                changes.extend(rows.iter().filter_map(|r| change(r).map(|(c, _)| c)));
            }
        }
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = now_pending;
        changes
    }
}

impl Source for ShopSource {
    fn features(&self) -> Features {
        Features {
            gateway: true,
            reload: false,
            messaging: true,
            orders: true,
        }
    }

    fn observe(&self) -> futures::future::BoxFuture<'_, Observation> {
        Box::pin(async move {
            let i = &self.inner;
            let (mut health, dead_letters, outboxes, sagas, gateway_health) = tokio::join!(
                i.health(),
                i.dead_letters(),
                i.outboxes(),
                i.sagas(),
                shopmesh_gateway::console::health(&i.gateway)
            );
            health.extend(gateway_health);
            let messages = {
                let mut seen = i.journal_seen.lock().unwrap_or_else(|p| p.into_inner());
                let (moved, now) = i.journal.touched_since(*seen);
                *seen = now;
                moved
            };
            Observation {
                gateway: Some(shopmesh_gateway::console::view(&i.gateway, None)),
                health,
                dead_letters,
                outboxes,
                sagas,
                messages,
            }
        })
    }

    fn api(&self) -> Router {
        Router::new()
            .route("/orders", get(orders))
            .route("/orders/{id}", get(order))
            .route("/orders/{id}/messages", get(order_messages))
            .route("/dead-letters/{id}", get(dead_letter))
            .route("/dead-letters/{id}/replay", post(replay))
            .with_state(self.clone())
            .merge(shopmesh_gateway::console::api(
                self.inner.gateway.clone(),
                None,
            ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersQuery {
    status: Option<String>,
    reason: Option<String>,
    /// Pending for longer than this many seconds.
    stuck_secs: Option<i64>,
    /// An order id or a user id (prefix).
    q: Option<String>,
    limit: Option<i64>,
}

fn internal(e: &dyn std::fmt::Display) -> Problem {
    Problem::internal(&e.to_string())
}

async fn orders(
    State(s): State<ShopSource>,
    Query(q): Query<OrdersQuery>,
) -> Result<Json<Value>, Problem> {
    let limit = q.limit.unwrap_or(100).clamp(1, 500);
    let mut clauses = Vec::new();
    let mut binds: Vec<Value> = Vec::new();
    let status = match q.stuck_secs {
        Some(_) => Some("PENDING".to_owned()),
        None => q.status.filter(|s| !s.is_empty()),
    };
    if let Some(st) = status {
        binds.push(json!(st));
        clauses.push(format!("status = ${}", binds.len()));
    }
    if let Some(r) = q.reason.filter(|r| !r.is_empty()) {
        binds.push(json!(r));
        clauses.push(format!("status_reason = ${}", binds.len()));
    }
    if let Some(secs) = q.stuck_secs {
        binds.push(json!(shopmesh_platform::now_millis() - secs.max(0) * 1000));
        clauses.push(format!("created_at < ${}", binds.len()));
    }
    if let Some(text) = q.q.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) {
        binds.push(json!(format!("{text}%")));
        clauses.push(format!(
            "(id LIKE ${n} OR user_id LIKE ${n})",
            n = binds.len()
        ));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    binds.push(json!(limit));
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders {filter} ORDER BY created_at DESC, id DESC LIMIT ${}",
        binds.len()
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = match b {
            Value::Number(n) => query.bind(n.as_i64().unwrap_or(0)),
            other => query.bind(other.as_str().unwrap_or("").to_owned()),
        };
    }
    let rows = query
        .fetch_all(&s.inner.orders.pool)
        .await
        .map_err(|e| internal(&e))?;
    let users: Vec<String> = rows
        .iter()
        .filter_map(|r| r.try_get("user_id").ok())
        .collect();
    let names = s.inner.user_names(&users).await;
    let items: Vec<OrderRow> = rows
        .iter()
        .filter_map(|r| {
            let user_id: String = r.try_get("user_id").ok()?;
            Some(OrderRow {
                id: r.try_get("id").ok()?,
                user_name: names.get(&user_id).cloned(),
                user_id,
                status: r.try_get("status").ok()?,
                reason: r.try_get("status_reason").ok()?,
                total_minor: r.try_get("total_minor").ok()?,
                currency: r.try_get("currency").ok()?,
                created_at: shopmesh_platform::millis_to_rfc3339(r.try_get("created_at").ok()?),
                updated_at: shopmesh_platform::millis_to_rfc3339(r.try_get("updated_at").ok()?),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn order(
    State(s): State<ShopSource>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let row = sqlx::query(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
        .bind(&id)
        .fetch_optional(&s.inner.orders.pool)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| Problem::not_found(format!("no order `{id}`")))?;
    let get = |c: &str| row.try_get::<String, _>(c).unwrap_or_default();
    let user_id = get("user_id");
    let name = s.inner.user_names(std::slice::from_ref(&user_id)).await;
    let ship_to: Option<Value> = row
        .try_get::<Option<String>, _>("shipping_address")
        .ok()
        .flatten()
        .and_then(|a| serde_json::from_str(&a).ok());
    Ok(Json(json!({
        "id": get("id"),
        "user_id": user_id,
        "user_name": name.get(&user_id),
        "status": get("status"),
        "reason": row.try_get::<Option<String>, _>("status_reason").ok().flatten(),
        "total_minor": row.try_get::<i64, _>("total_minor").unwrap_or(0),
        "currency": get("currency"),
        "created_at": shopmesh_platform::millis_to_rfc3339(row.try_get("created_at").unwrap_or(0)),
        "ship_to": ship_to,
        "trace_id": row.try_get::<Option<String>, _>("traceparent").ok().flatten()
            .and_then(|t| t.split('-').nth(1).map(str::to_owned)),
        "steps": steps(&get("timeline")),
        "messages": messages_of(&s, &id).await?,
    })))
}

/// Events of `subject` still staged in each service's outbox (not yet published).
async fn staged(dbs: &[(ServiceName, Db)], subject: &str) -> Vec<Value> {
    let literal = serde_json::to_string(subject).unwrap_or_default();
    let mut out = Vec::new();
    for (name, db) in dbs {
        // Services that publish nothing have no outbox. LIKE narrows, the envelope decides.
        let Ok(rows) = sqlx::query(
            "SELECT topic, envelope, created_at FROM outbox WHERE envelope LIKE $1 \
             ORDER BY id LIMIT 100",
        )
        .bind(format!("%\"subject\":{literal}%"))
        .fetch_all(&db.pool)
        .await
        else {
            continue;
        };
        for r in &rows {
            let (Ok(topic), Ok(raw), Ok(at)) = (
                r.try_get::<String, _>("topic"),
                r.try_get::<String, _>("envelope"),
                r.try_get::<i64, _>("created_at"),
            ) else {
                continue;
            };
            let Ok(env) = shopmesh_messaging::Envelope::from_json(&raw) else {
                continue;
            };
            if env.subject == subject {
                out.push(json!({
                    "at": at,
                    "event": "staged",
                    "service": name.as_str(),
                    "topic": topic,
                    "kind": env.kind,
                    "message_id": env.id,
                }));
            }
        }
    }
    out
}

/// What became of one order's messages: the journal's entries (this process, since it
/// started: published, applied, duplicate, retry, dead_lettered, replayed), the events still
/// staged in an outbox, and the dead letters kept for it (which outlive a restart), each with
/// the time it happened, oldest first.
async fn messages_of(s: &ShopSource, id: &str) -> Result<Vec<Value>, Problem> {
    let mut out: Vec<Value> = s
        .inner
        .journal
        .entries(id)
        .into_iter()
        .map(|e| json!(e))
        .collect();
    out.extend(staged(&s.inner.dbs, id).await);
    let letters = s
        .inner
        .dead_letters
        .for_subject(id)
        .await
        .map_err(|e| internal(&e))?;
    for e in letters {
        out.push(json!({
            "at": e.letter.failed_at_ms,
            "event": "dead_letter",
            "service": e.service,
            "topic": e.letter.topic,
            "consumer": e.letter.consumer,
            "message_id": e.letter.message_id,
            "attempt": e.letter.attempts,
            "detail": e.letter.reason,
            "dead_letter": e.letter.id,
        }));
    }
    out.sort_by_key(|v| v["at"].as_i64().unwrap_or(0));
    Ok(out)
}

async fn order_messages(
    State(s): State<ShopSource>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    Ok(Json(json!({ "items": messages_of(&s, &id).await? })))
}

fn dlq_problem(e: DlqError) -> Problem {
    match e {
        DlqError::NotFound(id) => Problem::not_found(format!("no dead letter `{id}`")),
        DlqError::Unreplayable(id) => {
            Problem::unprocessable(format!("dead letter `{id}` is not a readable message"))
        }
        other => Problem::internal(&other),
    }
}

/// One dead letter with its payload (a peek: nothing changes).
async fn dead_letter(
    State(s): State<ShopSource>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let e = s.inner.dead_letters.get(&id).await.map_err(dlq_problem)?;
    Ok(Json(json!({
        "id": e.letter.id,
        "service": e.service,
        "consumer": e.letter.consumer,
        "topic": e.letter.topic,
        "message_id": e.letter.message_id,
        "reason": e.letter.reason,
        "attempts": e.letter.attempts,
        "failed_at": e.letter.failed_at,
        "payload": e.letter.payload,
    })))
}

async fn replay(
    State(s): State<ShopSource>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let e = s
        .inner
        .dead_letters
        .replay(&id)
        .await
        .map_err(dlq_problem)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": e.letter.id, "service": e.service, "consumer": e.letter.consumer })),
    ))
}
