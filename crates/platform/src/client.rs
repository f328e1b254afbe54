//! Service-to-service HTTP: bounded timeouts, the request id carried along, upstream failures
//! turned into problems that name the dependency without leaking its internals.

use std::time::Duration;

use axum::extract::FromRequestParts;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::REQUEST_ID_HEADER;
use crate::problem::Problem;

/// What a downstream call carries from the request being handled: its request id and its
/// W3C trace context.
#[derive(Debug, Clone, Default)]
pub struct RequestId {
    pub id: Option<String>,
    pub traceparent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(RequestId {
            id: header(REQUEST_ID_HEADER),
            traceparent: header("traceparent"),
        })
    }
}

/// A client for one downstream service.
#[derive(Clone, Debug)]
pub struct ServiceClient {
    name: &'static str,
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0} answered 404")]
    NotFound(&'static str),
    #[error("{service} is unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
    },
}

/// A mesh sidecar address that cannot be used as an HTTP proxy.
#[derive(Debug, thiserror::Error)]
#[error("the sidecar address `{0}` is not an http:// URL")]
pub struct InvalidSidecar(pub String);

impl From<CallError> for Problem {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound(s) => Problem::not_found(format!("not found in {s}")),
            CallError::Unavailable { service, reason } => {
                tracing::warn!(service, reason, "dependency call failed");
                Problem::unavailable(format!("a dependency ({service}) is unavailable"))
            }
        }
    }
}

/// The identity headers the gateway set for `caller`, passed on to the next service.
fn as_caller(
    req: reqwest::RequestBuilder,
    caller: &crate::identity::Caller,
) -> reqwest::RequestBuilder {
    req.header(crate::USER_ID_HEADER, &caller.user_id)
        .header(crate::USER_ROLES_HEADER, caller.roles.join(","))
}

/// The settings every service-to-service client shares.
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(32)
}

impl ServiceClient {
    pub fn new(name: &'static str, base: impl Into<String>) -> Self {
        let http = builder().build().expect("static client settings are valid");
        Self {
            name,
            base: base.into().trim_end_matches('/').to_owned(),
            http,
        }
    }

    /// A client for the service `name` through the local mesh sidecar's outbound listener
    /// (`sidecar`, `http://127.0.0.1:PORT`): requests go to the sidecar as to an HTTP proxy,
    /// `GET http://NAME/path` with `Host: NAME`, and the sidecar finds an instance of `NAME`
    /// and calls it over mutual TLS. `None`: straight to `base`.
    pub fn through(
        name: &'static str,
        base: impl Into<String>,
        sidecar: Option<&str>,
    ) -> Result<Self, InvalidSidecar> {
        let Some(sidecar) = sidecar else {
            return Ok(Self::new(name, base));
        };
        let invalid = |_| InvalidSidecar(sidecar.to_owned());
        let http = builder()
            .proxy(reqwest::Proxy::http(sidecar).map_err(invalid)?)
            .build()
            .map_err(invalid)?;
        Ok(Self {
            name,
            base: format!("http://{name}"),
            http,
        })
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        rid: &RequestId,
    ) -> Result<T, CallError> {
        let req = self.http.get(format!("{}{}", self.base, path_and_query));
        self.send(req, rid).await
    }

    /// `GET` on behalf of `caller` (its identity headers are passed on).
    pub async fn get_json_as<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        caller: &crate::identity::Caller,
        rid: &RequestId,
    ) -> Result<T, CallError> {
        let req = self.http.get(format!("{}{}", self.base, path_and_query));
        self.send(as_caller(req, caller), rid).await
    }

    /// `POST` a JSON body on behalf of `caller` (its identity headers are passed on, as the
    /// gateway set them).
    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        caller: &crate::identity::Caller,
        rid: &RequestId,
    ) -> Result<T, CallError> {
        let req = self.http.post(format!("{}{}", self.base, path)).json(body);
        self.send(as_caller(req, caller), rid).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        mut req: reqwest::RequestBuilder,
        rid: &RequestId,
    ) -> Result<T, CallError> {
        if let Some(id) = &rid.id {
            req = req.header(REQUEST_ID_HEADER, id);
        }
        if let Some(tp) = &rid.traceparent {
            req = req.header("traceparent", tp);
        }
        let unavailable = |reason: String| CallError::Unavailable {
            service: self.name,
            reason,
        };
        let res = req.send().await.map_err(|e| unavailable(e.to_string()))?;
        match res.status() {
            s if s.is_success() => res.json().await.map_err(|e| unavailable(e.to_string())),
            http::StatusCode::NOT_FOUND => Err(CallError::NotFound(self.name)),
            s => Err(unavailable(format!("status {s}"))),
        }
    }
}
