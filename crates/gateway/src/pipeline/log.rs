//! Phase `log`: what the request did, counted and written down, after the answer is made.
//!
//! Reads the outcome the phases filled in (route, variant, cluster, endpoint, attempts,
//! caller) and the answer's status; records the request metrics (per-route handles cached
//! by label identity) and, when `access_log` is on, one access log line (target
//! `shopmesh::access`, written by [`crate::access`]: a per-thread buffer flushed on size or
//! time). Never changes the answer.

use std::net::IpAddr;
use std::time::Duration;

use http::Method;
use http::header::HeaderValue;

use super::Outcome;
use crate::runtime::Runtime;

/// The request's own facts, as the access log reports them.
pub(crate) struct Request<'a> {
    pub client_ip: Option<IpAddr>,
    pub method: &'a Method,
    /// The path as the client sent it.
    pub path: &'a str,
    pub status: u16,
    pub elapsed: Duration,
    pub request_id: &'a HeaderValue,
    pub trace_id: &'a str,
}

pub(crate) fn run(rt: &Runtime, outcome: &Outcome, r: &Request<'_>) {
    rt.request_metrics.record(
        &crate::observe::Labels {
            route: &outcome.route,
            variant: outcome.variant.as_ref(),
            cluster: outcome.cluster.as_ref(),
            endpoint: outcome.endpoint.as_ref(),
            status: r.status,
        },
        r.elapsed.as_secs_f64(),
    );
    if rt.config.access_log {
        crate::access::log(&crate::access::Line {
            client: r.client_ip,
            method: r.method.as_str(),
            path: r.path,
            status: r.status,
            route: &outcome.route,
            variant: outcome.variant.as_deref().unwrap_or(""),
            cluster: outcome.cluster.as_deref().unwrap_or(""),
            endpoint: outcome.endpoint.as_deref().unwrap_or(""),
            attempts: outcome.attempts,
            caller: outcome.caller.as_deref().unwrap_or(""),
            duration_ms: r.elapsed.as_secs_f64() * 1e3,
            request_id: r.request_id.to_str().unwrap_or(""),
            trace_id: r.trace_id,
        });
    }
}
