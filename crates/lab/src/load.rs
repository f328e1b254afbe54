//! Load and statistics: an open-loop driver that starts calls on a schedule whatever the
//! answers do (latency counted from when a call was due, so a stall is not hidden by the
//! calls it delayed), and latency summaries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A stretch of the schedule: `rate` calls per second for `duration`.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub rate: f64,
    pub duration: Duration,
}

/// One call of an open-loop run.
#[derive(Debug, Clone)]
pub struct Call<T> {
    /// Its place in the schedule (0, 1, …; skipped calls keep theirs).
    pub index: u64,
    /// When it was due, from the start of the run.
    pub due: Duration,
    /// From when it was due to its answer.
    pub latency: Duration,
    /// From when it was sent to its answer (the latency without the driver's own lateness:
    /// for comparing two targets at a rate the machine keeps easily).
    pub service: Duration,
    /// What the call returned; `None` for a failure.
    pub outcome: Option<T>,
}

#[derive(Debug)]
pub struct Run<T> {
    pub started: Instant,
    pub calls: Vec<Call<T>>,
    /// Calls not started because `max_in_flight` were still running.
    pub skipped: usize,
}

impl<T> Run<T> {
    pub fn failures(&self) -> usize {
        self.calls.iter().filter(|c| c.outcome.is_none()).count()
    }

    /// Latencies of the successful calls.
    pub fn latencies(&self) -> Vec<Duration> {
        self.calls
            .iter()
            .filter(|c| c.outcome.is_some())
            .map(|c| c.latency)
            .collect()
    }
}

/// Starts `call(i)` for the i-th call of `phases` at its due time, at most `max_in_flight`
/// at once (a call due when none is free is skipped and counted), and waits for all.
pub async fn open_loop<T, F, Fut>(phases: &[Phase], max_in_flight: usize, mut call: F) -> Run<T>
where
    T: Send + 'static,
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Option<T>> + Send + 'static,
{
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut set = JoinSet::new();
    let mut calls = Vec::new();
    let mut skipped = 0;
    let mut phase_start = Duration::ZERO;
    let mut i = 0u64;
    for phase in phases {
        let n = (phase.rate * phase.duration.as_secs_f64()).round() as u64;
        for k in 0..n {
            let due = phase_start + Duration::from_secs_f64(k as f64 / phase.rate);
            tokio::time::sleep_until(started + due).await;
            while let Some(done) = set.try_join_next() {
                if let Ok(c) = done {
                    calls.push(c);
                }
            }
            let index = i;
            i += 1;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let fut = call(index);
            set.spawn(async move {
                let sent = Instant::now();
                let outcome = fut.await;
                drop(slot);
                Call {
                    index,
                    due,
                    latency: (started + due).elapsed(),
                    service: sent.elapsed(),
                    outcome,
                }
            });
        }
        phase_start += phase.duration;
    }
    while let Some(done) = set.join_next().await {
        if let Ok(c) = done {
            calls.push(c);
        }
    }
    calls.sort_by_key(|c| c.due);
    Run {
        started,
        calls,
        skipped,
    }
}

/// Latency percentiles, in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// All zero when there are no samples (`n` says so).
    pub fn of(samples: &[Duration]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut v = samples.to_vec();
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Summary {
            n: v.len(),
            p50_ms: ms(percentile(&v, 50.0)),
            p90_ms: ms(percentile(&v, 90.0)),
            p99_ms: ms(percentile(&v, 99.0)),
            max_ms: ms(v[v.len() - 1]),
            mean_ms: v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64,
        }
    }
}

/// The nearest-rank percentile of sorted samples (`p` in 0–100); zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
        let s = Summary::of(&v);
        assert_eq!((s.n, s.p50_ms, s.max_ms), (100, 50.0, 100.0));
        assert_eq!(Summary::of(&[]).n, 0);
    }

    #[tokio::test]
    async fn an_open_loop_keeps_its_schedule_and_skips_beyond_its_bound() {
        let phases = [
            Phase {
                rate: 100.0,
                duration: Duration::from_millis(200),
            },
            Phase {
                rate: 500.0,
                duration: Duration::from_millis(200),
            },
        ];
        let t = std::time::Instant::now();
        let run = open_loop(&phases, 1000, |i| async move { Some(i) }).await;
        assert_eq!(run.calls.len(), 20 + 100);
        assert_eq!(run.skipped, 0);
        assert!(
            t.elapsed() >= Duration::from_millis(390),
            "{:?}",
            t.elapsed()
        );
        // The second phase's calls are due in its window.
        assert!(run.calls[20].due >= Duration::from_millis(200));
        // One slot, calls that take longer than the interval: most are skipped.
        let slow = [Phase {
            rate: 100.0,
            duration: Duration::from_millis(200),
        }];
        let run = open_loop(&slow, 1, |_| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some(())
        })
        .await;
        assert!(run.skipped >= 10, "skipped {}", run.skipped);
        assert_eq!(run.calls.len() + run.skipped, 20);
        assert!(
            run.calls
                .iter()
                .all(|c| c.service <= c.latency && c.index < 20)
        );
    }
}
