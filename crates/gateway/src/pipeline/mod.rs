//! The request path as a pipeline of named phases, each a small module with one job. A
//! phase receives what earlier phases decided (typed: the normalised path, the route, the
//! caller, …) and either hands on what it decided or ends the request with an answer.
//! Statically dispatched: plain function calls in the order below, nothing boxed per
//! request. A new filter is one new file and one line in [`run`].
//!
//! ```text
//!  request ─▶ identity ─▶ normalise ─▶ route ─▶ authenticate ─▶ authorise ─▶ limit
//!                              │          │          │               │          │
//!                             400        404        401            401/403     429
//!        ─▶ bound_body ─▶ answer ─▶ variant ─▶ forward ─▶ response ─▶ (log, in proxy.rs)
//!               │           │                     │
//!              413    composite / document    502/503/504, the upstream's answer, a tunnel
//! ```

mod answer;
mod authenticate;
mod authorise;
mod bound_body;
mod forward;
mod identity;
mod limit;
pub(crate) mod log;
mod normalise;
mod route;
mod tunnel;
mod variant;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response};

use crate::runtime::Runtime;
use crate::wire::{Body, names};

pub(crate) use authenticate::Caller;

/// What one request did, for metrics and the access log.
pub(crate) struct Outcome {
    pub route: Arc<str>,
    pub cluster: Option<Arc<str>>,
    pub variant: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub caller: Option<String>,
    pub attempts: u32,
}

impl Outcome {
    pub fn new(route: Arc<str>) -> Self {
        Self {
            route,
            cluster: None,
            variant: None,
            endpoint: None,
            caller: None,
            attempts: 0,
        }
    }
}

/// Who sent a request: the connection's peer, whether it is a trusted proxy, and the
/// client's address (worked out once per request).
#[derive(Clone, Copy)]
pub(crate) struct Sender {
    pub peer: IpAddr,
    pub trusted: bool,
    pub ip: IpAddr,
}

impl Sender {
    pub fn of(rt: &Runtime, peer: IpAddr, headers: &HeaderMap) -> Self {
        let trusted = rt.is_trusted(peer);
        let ip = if trusted {
            client_ip(rt, peer, headers)
        } else {
            peer
        };
        Sender { peer, trusted, ip }
    }
}

/// Behind a trusted proxy, the first address from the right of `X-Forwarded-For` that is not
/// a trusted proxy.
fn client_ip(rt: &Runtime, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut ip = peer;
    let hops: Vec<&str> = headers
        .get_all(&names::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let hop = hop.trim();
        let parsed = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()));
        match parsed {
            Ok(addr) => {
                ip = addr;
                if !rt.is_trusted(addr) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ip
}

/// What every phase may read, and the outcome the phases fill in.
pub(crate) struct Ctx<'rt> {
    pub rt: &'rt Runtime,
    pub client: Option<Sender>,
    /// The request asks for a WebSocket (honoured only where the route allows it).
    pub websocket: bool,
    /// The client spoke TLS.
    pub tls: bool,
    /// The client's address as a header value, made once (it is also the whole
    /// `X-Forwarded-For` whenever the peer is not a trusted proxy).
    pub client_ip_value: Option<HeaderValue>,
    pub outcome: Outcome,
}

/// A phase's verdict: what it hands on, or the answer that ends the request.
pub(crate) type Flow<T> = Result<T, Ended>;

/// The answer of a phase that ends the request early (boxed: an early end is the rare path,
/// and the hand-offs stay small).
pub(crate) struct Ended(Box<Response<Body>>);

impl From<Response<Body>> for Ended {
    fn from(res: Response<Body>) -> Self {
        Ended(Box::new(res))
    }
}

/// Runs the phases in order; the first to answer ends the request.
pub(crate) async fn run(
    rt: &Runtime,
    mut req: Request<Body>,
    client: Option<Sender>,
    websocket: bool,
) -> (Outcome, Response<Body>) {
    let mut ctx = Ctx {
        rt,
        client,
        websocket,
        tls: req
            .extensions()
            .get::<crate::worker::ConnInfo>()
            .is_some_and(|c| c.tls),
        client_ip_value: None,
        outcome: Outcome::new(rt.unmatched.clone()),
    };
    macro_rules! phase {
        ($p:expr) => {
            match $p {
                Ok(v) => v,
                Err(Ended(res)) => return (ctx.outcome, *res),
            }
        };
    }
    identity::run(&mut req);
    let path = phase!(normalise::run(&req));
    let (route, params) = phase!(route::run(&mut ctx, &path, &req));
    let caller = phase!(authenticate::run(&ctx, route, &mut req).await);
    phase!(authorise::run(&mut ctx, route, caller.as_ref(), &mut req));
    let limit = phase!(limit::run(&ctx, route, caller.as_ref()).await);
    let content_length = phase!(bound_body::run(route, &req));
    let upstream = phase!(answer::run(route, params, caller.as_ref(), &req, limit.as_ref()).await);
    let chosen = variant::run(&mut ctx, upstream, caller.as_ref(), &mut req);
    let res = forward::run(
        &mut ctx,
        forward::Forward {
            route,
            chosen,
            path,
            content_length,
            limit,
        },
        req,
    )
    .await;
    (ctx.outcome, res)
}
