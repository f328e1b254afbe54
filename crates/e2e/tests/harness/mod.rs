//! What the gateway tests share: real upstream servers and a standalone gateway on a
//! config file of its own.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shopmesh_gateway::server::Standalone;
use tokio::net::TcpListener;

/// One request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub user: Option<String>,
    pub api_key_header: bool,
    /// The `x-shopmesh-shadow` header: a mirrored copy.
    pub shadow: bool,
}

/// A gateway config that sends every request to `up`.
pub fn proxy_config(up: &Upstream) -> String {
    format!(
        r#"
clusters:
  - {{ name: up, endpoints: ["{}"] }}
routes:
  - {{ name: all, match: {{ prefix: / }}, cluster: up }}
"#,
        up.url()
    )
}

/// A real HTTP upstream that records what reaches it.
#[derive(Clone)]
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub healthy: Arc<AtomicBool>,
    /// Status every request gets (200 unless set).
    pub status: Arc<AtomicU16>,
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            name,
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            status: Arc::new(AtomicU16::new(200)),
        };
        let app = Router::new()
            .route(
                "/healthz",
                get(|State(u): State<Upstream>| async move {
                    if u.healthy.load(Ordering::SeqCst) {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }),
            )
            .fallback(|State(u): State<Upstream>, req: Request| async move {
                let h = req.headers();
                let seen = Seen {
                    method: req.method().to_string(),
                    path: req.uri().path().to_owned(),
                    user: h
                        .get("x-shopmesh-user-id")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    api_key_header: h.contains_key("x-api-key"),
                    shadow: h.contains_key("x-shopmesh-shadow"),
                };
                u.seen.lock().unwrap().push(seen.clone());
                if seen.path == "/slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return "slow".into_response();
                }
                let status = StatusCode::from_u16(u.status.load(Ordering::SeqCst)).unwrap();
                let body = json!({
                    "upstream": u.name,
                    "method": seen.method,
                    "path": seen.path,
                    "query": req.uri().query(),
                    "user": seen.user,
                    "roles": h.get("x-shopmesh-user-roles").map(|v| v.to_str().unwrap()),
                    "xff": h.get("x-forwarded-for").map(|v| v.to_str().unwrap()),
                    "proto": h.get("x-forwarded-proto").map(|v| v.to_str().unwrap()),
                    "variant": h.get("x-shopmesh-variant").map(|v| v.to_str().unwrap()),
                });
                (status, axum::Json(body)).into_response()
            })
            .with_state(up.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        up
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }
}

/// A standalone gateway on a config file of its own.
pub struct Gw {
    pub inner: Option<Standalone>,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
}

impl Gw {
    pub async fn start(yaml: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), yaml).await
    }

    /// Starts with the configuration file in `dir` (where relative paths in it start).
    pub async fn start_in(dir: tempfile::TempDir, yaml: &str) -> Self {
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, with_listeners(yaml)).unwrap();
        let inner = Standalone::start(path, Duration::from_millis(50))
            .await
            .expect("the gateway starts");
        Gw {
            base: format!("http://{}", inner.addr),
            admin: format!("http://{}", inner.admin.unwrap()),
            inner: Some(inner),
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    pub fn rewrite(&self, yaml: &str) {
        // Write then rename, as editors and ConfigMaps do.
        let tmp = self.dir.path().join("gateway.yaml.tmp");
        std::fs::write(&tmp, with_listeners(yaml)).unwrap();
        std::fs::rename(tmp, self.path()).unwrap();
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_json(&self, path: &str) -> Value {
        self.admin_get(path).await.json().await.unwrap()
    }

    /// The admin API's Prometheus text.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text().await.unwrap()
    }

    pub async fn version(&self) -> u64 {
        self.admin_json("/config").await["status"]["version"]
            .as_u64()
            .unwrap()
    }

    pub async fn wait_version(&self, v: u64) {
        for _ in 0..100 {
            if self.version().await >= v {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("configuration version {v} never applied");
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.inner.take() {
            s.shutdown().await;
        }
    }
}

pub fn with_listeners(yaml: &str) -> String {
    format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\n{yaml}")
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub async fn body(res: reqwest::Response) -> Value {
    res.json().await.unwrap()
}
