//! The gateway's reload history: what each configuration attempt did, and what changed
//! between two configurations (the console and the admin API show both). Plain data over
//! the configuration; the serving gateway keeps the records.

use std::time::SystemTime;

use serde_json::Value;

use crate::config::GatewayConfig;

/// Reload attempts remembered.
pub const RELOADS_KEPT: usize = 50;

/// One configuration attempt: start-up, a reload that applied, or one that was refused.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub seq: u64,
    pub at: SystemTime,
    pub ok: bool,
    /// The version serving after the attempt.
    pub version: u64,
    pub error: Option<String>,
    pub changes: Vec<String>,
}

/// What differs between two configurations, one line per route, cluster or section.
pub fn changes(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let mut out = Vec::new();
    let by_name = |v: Value| -> Vec<(String, Value)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        let name = x
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_owned();
                        (name, x.clone())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (o, n) = (
        serde_json::to_value(old).unwrap_or(Value::Null),
        serde_json::to_value(new).unwrap_or(Value::Null),
    );
    for list in ["routes", "clusters"] {
        let singular = &list[..list.len() - 1];
        let before = by_name(o.get(list).cloned().unwrap_or(Value::Null));
        let after = by_name(n.get(list).cloned().unwrap_or(Value::Null));
        for (name, v) in &after {
            match before.iter().find(|(b, _)| b == name) {
                None => out.push(format!("{singular} {name}: added")),
                Some((_, b)) if b != v => out.push(format!("{singular} {name}: changed")),
                _ => {}
            }
        }
        for (name, _) in &before {
            if !after.iter().any(|(a, _)| a == name) {
                out.push(format!("{singular} {name}: removed"));
            }
        }
        let order = |l: &[(String, Value)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        if out.is_empty() && order(&before) != order(&after) && before.len() == after.len() {
            out.push(format!("{list}: reordered"));
        }
    }
    if let (Some(o), Some(n)) = (o.as_object(), n.as_object()) {
        for (k, v) in n {
            if k != "routes" && k != "clusters" && o.get(k) != Some(v) {
                out.push(format!("{k}: changed"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, RouteConfig};

    #[test]
    fn changes_name_what_moved() {
        let a = GatewayConfig::new(
            vec![ClusterConfig::new("c", vec!["http://127.0.0.1:1".into()])],
            vec![RouteConfig::prefix("r", "/r", "c")],
        );
        let mut b = a.clone();
        b.routes[0].matches.prefix = Some("/s".into());
        b.clusters
            .push(ClusterConfig::new("d", vec!["http://127.0.0.1:2".into()]));
        b.routes.push(RouteConfig::prefix("t", "/t", "d"));
        assert_eq!(
            changes(&a, &b),
            ["route r: changed", "route t: added", "cluster d: added"]
        );
        assert!(changes(&a, &a).is_empty());
        assert_eq!(
            changes(&b, &a),
            ["route r: changed", "route t: removed", "cluster d: removed"]
        );
    }
}
