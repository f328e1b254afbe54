//! Crash points for crash tests. With `SHOPMESH_FAILPOINTS=name=probability,…` in the
//! environment, reaching a named point aborts the process with that probability — as abrupt
//! as `kill -9`: no destructor runs, no buffer is flushed. Without the variable a point costs
//! one branch on a value read once.
//!
//! Points: `relay.before_publish` (events committed, not yet published),
//! `relay.after_publish` (published, not yet removed from the outbox),
//! `consumer.after_commit` (effect committed, message not yet acked).

use std::sync::LazyLock;

use rand::Rng;

static POINTS: LazyLock<Vec<(String, f64)>> = LazyLock::new(|| {
    std::env::var("SHOPMESH_FAILPOINTS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| {
            let (name, prob) = p.split_once('=')?;
            Some((name.trim().to_owned(), prob.trim().parse().ok()?))
        })
        .collect()
});

/// Aborts the process here with the configured probability.
pub fn hit(name: &str) {
    if POINTS.is_empty() {
        return;
    }
    if let Some((_, p)) = POINTS.iter().find(|(n, _)| n == name)
        && rand::thread_rng().gen_bool(p.clamp(0.0, 1.0))
    {
        eprintln!("failpoint `{name}` hit: aborting");
        std::process::abort();
    }
}
