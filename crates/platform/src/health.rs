//! Liveness and readiness, as balancers and orchestrators ask for them.
//!
//! `GET /healthz` answers while the process runs. `GET /readyz` answers 200 only while the
//! process should be sent traffic: started, not draining, and every check of its role
//! passing (its storage answers, say); otherwise 503 problem+json naming what failed. On
//! SIGTERM a process first turns not-ready ([`Readiness::drain`]), keeps serving for the
//! pre-stop delay (so that balancers, which poll `/readyz`, stop sending), and only then
//! stops accepting and drains ([`prestop`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::Problem;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Check = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether this process should get traffic. Cheap to clone; every clone is the same state.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Cancelled when draining begins: servers wait on it to tell their clients.
    draining: CancellationToken,
    checks: Mutex<Vec<(String, Check)>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check run on every `/readyz` (bounded by 2 s each).
    pub fn add_check<F, Fut>(&self, name: impl Into<String>, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Check = Arc::new(move || Box::pin(check()));
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.into(), check));
    }

    /// Adds a check that `db` answers (a `SELECT 1`).
    pub fn add_storage_check(&self, name: impl Into<String>, db: crate::db::Db) {
        self.add_check(name, move || {
            let db = db.clone();
            async move { db.ping().await.map_err(|e| e.to_string()) }
        });
    }

    /// Turns not-ready for good: the process is going away.
    pub fn drain(&self) {
        self.inner.draining.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled()
    }

    /// Completes once draining has begun (at once if it has).
    pub async fn draining(&self) {
        self.inner.draining.cancelled().await
    }

    /// Runs the checks: whether the process is ready, and each check's outcome.
    pub async fn check(&self) -> (bool, Map<String, Value>) {
        let checks: Vec<(String, Check)> = self
            .inner
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let results = futures::future::join_all(checks.iter().map(|(name, c)| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, c()).await {
                Ok(r) => r,
                Err(_) => Err("timed out".into()),
            };
            (name.clone(), outcome)
        }))
        .await;
        let mut ready = !self.is_draining();
        let mut out = Map::new();
        for (name, r) in results {
            match r {
                Ok(()) => out.insert(name, json!("ok")),
                Err(e) => {
                    ready = false;
                    tracing::warn!(check = %name, error = %e, "readiness check failed");
                    out.insert(name, json!("failing"))
                }
            };
        }
        (ready, out)
    }

    /// `GET /readyz`.
    pub fn router(&self) -> Router {
        let me = self.clone();
        Router::new().route(
            "/readyz",
            get(move || {
                let me = me.clone();
                async move { me.answer().await }
            }),
        )
    }

    async fn answer(&self) -> Response {
        let (ready, checks) = self.check().await;
        if ready {
            return (
                StatusCode::OK,
                axum::Json(json!({"status": "ready", "checks": checks})),
            )
                .into_response();
        }
        let detail = if self.is_draining() {
            "shutting down: draining in-flight requests"
        } else {
            "a dependency is failing"
        };
        Problem::typed(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .detail(detail)
            .with("checks", Value::Object(checks))
            .into_response()
    }
}

/// What a process does on SIGTERM, before it stops accepting and drains: not-ready at once,
/// then serving on for `prestop`, so that balancers polling `/readyz` stop sending first.
pub async fn prestop(readiness: &Readiness, delay: Duration) {
    readiness.drain();
    if !delay.is_zero() {
        tracing::info!(
            prestop_ms = delay.as_millis() as u64,
            "not ready; serving on for the pre-stop delay"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn ready_until_a_check_fails_or_it_drains() {
        let r = Readiness::new();
        let failing = Arc::new(AtomicBool::new(false));
        let f = failing.clone();
        r.add_check("storage", move || {
            let f = f.clone();
            async move {
                if f.load(Ordering::SeqCst) {
                    Err("down".into())
                } else {
                    Ok(())
                }
            }
        });
        assert!(r.check().await.0);
        failing.store(true, Ordering::SeqCst);
        let (ready, checks) = r.check().await;
        assert!(!ready);
        assert_eq!(checks["storage"], "failing");
        failing.store(false, Ordering::SeqCst);
        assert!(r.check().await.0);
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.draining().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "draining() waits for drain()");
        r.clone().drain();
        assert!(!r.check().await.0, "a clone drains the same state");
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("draining() completes on drain()")
            .unwrap();
        let res = r.answer().await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
