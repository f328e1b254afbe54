//! The sidecar's configuration (YAML, unknown keys refused, as the gateway's).
//!
//! ```yaml
//! service: payments                 # this sidecar's service (its certificate must say so)
//! inbound:                          # mutual TLS from other sidecars → the local service
//!   listen: 0.0.0.0:15006
//!   local: http://127.0.0.1:8087    # plain HTTP on loopback
//! outbound:                         # the local service → other services' sidecars
//!   listen: 127.0.0.1:15001         # plain HTTP; the Host header names the target service
//! admin:
//!   listen: 127.0.0.1:15020         # /metrics, /healthz
//! tls: { ca_file: mesh/ca.pem, cert_file: mesh/payments.pem, key_file: mesh/payments-key.pem }
//! targets:                          # the gateway's cluster configuration; name = service
//!   - name: users
//!     endpoints: [https://127.0.0.1:15106]
//! policy:                           # who may call this service; absent: any mesh peer
//!   - from: orders
//!     paths: [/api/payment-methods, /internal/]   # prefixes, on segment boundaries
//!     methods: [GET, POST]          # absent: any
//! ```

use serde::{Deserialize, Serialize};
use shopmesh_gateway::config::ClusterConfig;

use crate::ca::valid_service_name;
use crate::error::MeshError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    pub tls: MeshTls,
    #[serde(default)]
    pub targets: Vec<ClusterConfig>,
    /// Present: default deny, only what a rule allows. Absent: every mesh peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    pub listen: String,
    /// The local service's base URL (`http://127.0.0.1:PORT`).
    pub local: String,
    /// How long the local service may take to answer.
    #[serde(default = "default_local_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_local_timeout_ms() -> u64 {
    15_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeshTls {
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The calling service.
    pub from: String,
    /// Path prefixes (matched on segment boundaries); empty or absent: every path.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Methods (upper case); empty or absent: every method.
    #[serde(default)]
    pub methods: Vec<String>,
}

impl SidecarConfig {
    pub fn from_yaml(text: &str) -> Result<Self, MeshError> {
        let cfg: Self =
            serde_saphyr::from_str(text).map_err(|e| MeshError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &str) -> Result<Self, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|error| MeshError::Io {
            path: path.into(),
            error,
        })?;
        Self::from_yaml(&text).map_err(|e| MeshError::InFile {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    pub fn validate(&self) -> Result<(), MeshError> {
        self.check().map_err(MeshError::Invalid)
    }

    fn check(&self) -> Result<(), String> {
        if !valid_service_name(&self.service) {
            return Err(format!("service `{}` is not a service name", self.service));
        }
        if self.inbound.is_none() && self.outbound.is_none() {
            return Err("neither inbound nor outbound: nothing to do".into());
        }
        if let Some(i) = &self.inbound {
            let uri: http::Uri = i
                .local
                .parse()
                .map_err(|_| format!("inbound.local `{}` is not a URL", i.local))?;
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                return Err(format!(
                    "inbound.local `{}`: an http://host:port URL",
                    i.local
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.targets {
            if !valid_service_name(&t.name) {
                return Err(format!("target `{}` is not a service name", t.name));
            }
            if !seen.insert(&t.name) {
                return Err(format!("target `{}` appears twice", t.name));
            }
            if t.endpoints.is_empty() {
                return Err(format!("target `{}` has no endpoints", t.name));
            }
            for e in &t.endpoints {
                if !e.starts_with("https://") {
                    return Err(format!(
                        "target `{}`: endpoint `{e}` must be https:// (another sidecar's inbound)",
                        t.name
                    ));
                }
            }
            if t.health_check.is_some() {
                return Err(format!(
                    "target `{}`: no health_check in the mesh (endpoints are judged by their breakers)",
                    t.name
                ));
            }
            if t.protocol != Default::default() {
                return Err(format!("target `{}`: sidecars speak http1", t.name));
            }
        }
        for r in self.policy.iter().flatten() {
            if !valid_service_name(&r.from) {
                return Err(format!("policy: `{}` is not a service name", r.from));
            }
            if let Some(p) = r.paths.iter().find(|p| !p.starts_with('/')) {
                return Err(format!("policy: path prefix `{p}` must start with /"));
            }
            if let Some(m) = r
                .methods
                .iter()
                .find(|m| m.parse::<http::Method>().is_err() || m.to_uppercase() != **m)
            {
                return Err(format!("policy: `{m}` is not an upper-case method"));
            }
        }
        Ok(())
    }
}

/// The authorization policy of one sidecar's inbound side.
#[derive(Debug, Clone)]
pub struct Policy(Option<Vec<Rule>>);

impl Policy {
    pub fn new(rules: Option<Vec<Rule>>) -> Self {
        Self(rules)
    }

    /// Whether `from` may call `method path` (`path` already normalised).
    pub fn allows(&self, from: &str, method: &http::Method, path: &str) -> bool {
        let Some(rules) = &self.0 else {
            return true;
        };
        rules.iter().any(|r| {
            r.from == from
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == method.as_str()))
                && (r.paths.is_empty() || r.paths.iter().any(|p| prefix_matches(p, path)))
        })
    }
}

/// `/api/x` matches `/api/x` and `/api/x/…`, not `/api/xy`; `/internal/` matches below it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
service: payments
inbound: { listen: "127.0.0.1:0", local: "http://127.0.0.1:8087" }
outbound: { listen: "127.0.0.1:0" }
tls: { ca_file: ca.pem, cert_file: p.pem, key_file: p-key.pem }
targets:
  - name: users
    endpoints: ["https://127.0.0.1:15106"]
policy:
  - from: orders
    paths: [/api/payment-methods, /internal/]
    methods: [GET, POST]
  - from: gateway
"#;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let cfg = SidecarConfig::from_yaml(YAML).unwrap();
        assert_eq!(cfg.targets[0].name, "users");
        let bad = YAML.replace("outbound:", "outbund:");
        assert!(SidecarConfig::from_yaml(&bad).is_err());
        let bad = YAML.replace("methods: [GET, POST]", "methods: [GET]\n    hosts: [x]");
        assert!(SidecarConfig::from_yaml(&bad).is_err());
        let bad = YAML.replace("https://127.0.0.1:15106", "http://127.0.0.1:15106");
        assert!(
            SidecarConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("https")
        );
        let bad = YAML.replace("methods: [GET, POST]", "methods: [get]");
        assert!(SidecarConfig::from_yaml(&bad).is_err());
    }

    #[test]
    fn errors_name_the_file_and_keep_the_cause() {
        let e = SidecarConfig::load("/nonexistent/sidecar.yaml").unwrap_err();
        assert!(matches!(e, MeshError::Io { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("/nonexistent/sidecar.yaml: "),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.yaml");
        std::fs::write(&path, YAML.replace("outbound:", "outbund:")).unwrap();
        let e = SidecarConfig::load(path.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(&e, MeshError::InFile { error, .. } if matches!(**error, MeshError::Parse(_))),
            "{e:?}"
        );
        assert!(e.to_string().contains("outbund"), "{e}");
        let e =
            SidecarConfig::from_yaml(&YAML.replace("from: gateway", "from: Gateway")).unwrap_err();
        assert!(matches!(e, MeshError::Invalid(_)), "{e:?}");
        assert_eq!(e.to_string(), "policy: `Gateway` is not a service name");
    }

    #[test]
    fn policy_is_default_deny_when_present() {
        let cfg = SidecarConfig::from_yaml(YAML).unwrap();
        let p = Policy::new(cfg.policy);
        let (get, post, del) = (http::Method::GET, http::Method::POST, http::Method::DELETE);
        assert!(p.allows("orders", &post, "/api/payment-methods"));
        assert!(p.allows("orders", &get, "/api/payment-methods/pm_1"));
        assert!(p.allows("orders", &get, "/internal/x"));
        assert!(!p.allows("orders", &get, "/internal"));
        assert!(!p.allows("orders", &get, "/api/payment-methodsX"));
        assert!(!p.allows("orders", &del, "/api/payment-methods"));
        assert!(!p.allows("catalog", &get, "/api/payment-methods"));
        assert!(p.allows("gateway", &del, "/anything"));
        assert!(
            Policy::new(None).allows("catalog", &get, "/x"),
            "no policy: any peer"
        );
        assert!(!Policy::new(Some(vec![])).allows("orders", &get, "/x"));
    }
}
