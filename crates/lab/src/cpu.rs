//! A gateway on a worker thread of its own, and the CPU time the kernel accounts to that
//! thread: how the experiments that price the gateway's work (`aggregation.cpu`,
//! `proxy.filters`) read it; `proxy.single-point` starts and loses its instances the same
//! way. Linux only (`/proc/self/task/TID/schedstat`); elsewhere the time is `None` and
//! those experiments say so.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shopmesh_gateway::{Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

use crate::LabError;

/// The gateway on its worker thread, and that thread's id.
pub struct Worker {
    pub addr: SocketAddr,
    tid: Option<u32>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Serves `cfg` on one worker thread (as `shopmesh gateway` runs each worker), on an
    /// ephemeral port of 127.0.0.1; the admin listener is left off.
    pub fn start(cfg: GatewayConfig) -> Result<Worker, LabError> {
        Self::serve(
            cfg,
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Duration::from_secs(1),
        )
    }

    /// The same on `addr` (port 0: any; a bound port: joining its `SO_REUSEPORT` group),
    /// draining for `drain` when stopped (zero: stopping it is losing it).
    pub fn serve(
        mut cfg: GatewayConfig,
        addr: SocketAddr,
        drain: Duration,
    ) -> Result<Worker, LabError> {
        cfg.listen = addr;
        cfg.admin.listen = None;
        let gateway = Gateway::new(cfg)?;
        let stop = CancellationToken::new();
        let before = threads();
        let (addr, thread) =
            shopmesh_gateway::server::serve_workers(addr, gateway, stop.clone(), drain, 1)?;
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

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CPU time the thread has had so far (ns).
    pub fn cpu_ns(&self) -> Option<u64> {
        let t = self.tid?;
        let text = std::fs::read_to_string(format!("/proc/self/task/{t}/schedstat")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// Runs `work` and gives the thread's CPU time per `n` (µs), with what `work` returned.
    pub async fn per<T>(&self, n: usize, work: impl Future<Output = T>) -> (T, Option<f64>) {
        let before = self.cpu_ns();
        let out = work.await;
        let after = self.cpu_ns();
        let us = match (before, after) {
            (Some(b), Some(a)) if n > 0 => Some(a.saturating_sub(b) as f64 / 1e3 / n as f64),
            _ => None,
        };
        (out, us)
    }

    /// Closes its listener and stops its runtime (with every connection on it, at once when
    /// it was started with no drain).
    pub async fn stop(mut self) {
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

/// `n` requests, `clients` at a time, the `i`th built by `request(i)`; the number that
/// failed (a transport error, a status other than 2xx, or a body that did not arrive).
pub async fn load(
    n: usize,
    clients: usize,
    request: impl Fn(usize) -> reqwest::RequestBuilder,
) -> usize {
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let client = || async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let ok = match request(i).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            if !ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    futures::future::join_all((0..clients).map(|_| client())).await;
    failed.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

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
