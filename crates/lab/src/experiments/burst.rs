//! The burst of orders the failure experiments (`messaging.crash`,
//! `messaging.broker-outage`) drive through a failure: clients placing orders of the saga
//! mix, each with an Idempotency-Key, a failed request retried with the same key until
//! answered or [`Burst`]'s deadline, every acceptance counted in the phase the experiment
//! had set when the answer came (before, during, after the failure).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::saga::{Customer, DECLINED_CARD, GOOD_CARD, OrderKind, Placed};
use crate::LabError;
use crate::shop::Product;

/// Phases an experiment may count acceptances in.
pub const PHASES: usize = 3;
/// A request's own limit: one with no answer by then is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between a failed request and its retry.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Who orders what: the saga mix's customers and products.
#[derive(Clone, Copy)]
pub struct Mix<'a> {
    pub customers: &'a [Customer],
    pub products: &'a [Product],
    /// Sold out: the out-of-stock orders' products.
    pub none_left: &'a [Product],
}

/// What the clients were told.
#[derive(Debug, Default)]
pub struct Tally {
    pub placed: Vec<Placed>,
    /// Acceptances by the phase they came in.
    pub accepted: [usize; PHASES],
    pub refused: usize,
    /// Given up at the deadline.
    pub unanswered: usize,
    pub retried: usize,
}

/// The burst's clients and what they share.
pub struct Burst<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    mix: Mix<'a>,
    n: usize,
    /// The Idempotency-Keys' prefix.
    label: &'static str,
    /// `(start, pace)`: order `i` is due at `start + i × pace`; none: as soon as a client
    /// is free.
    pace: Option<(Instant, Duration)>,
    /// Retries stop here.
    until: Instant,
    next: AtomicUsize,
    accepted: AtomicUsize,
    done: AtomicUsize,
    phase: AtomicU8,
    tally: Mutex<Tally>,
}

/// A placing's answer.
enum Answer {
    Accepted(String),
    Refused,
    /// No answer, or the shop's failure: to retry with the same key.
    Failed,
}

impl<'a> Burst<'a> {
    /// `n` orders to the shop at `base`, retried until `until`.
    pub fn new(
        http: &'a reqwest::Client,
        base: &'a str,
        mix: Mix<'a>,
        n: usize,
        label: &'static str,
        until: Instant,
    ) -> Self {
        Self {
            http,
            base,
            mix,
            n,
            label,
            pace: None,
            until,
            next: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            phase: AtomicU8::new(0),
            tally: Mutex::new(Tally::default()),
        }
    }

    /// Order `i` placed no earlier than `start + i × pace`.
    pub fn paced(mut self, start: Instant, pace: Duration) -> Self {
        self.pace = Some((start, pace));
        self
    }

    /// Acceptances from now on count in `phase` (below [`PHASES`]).
    pub fn set_phase(&self, phase: usize) {
        self.phase
            .store(phase.min(PHASES - 1) as u8, Ordering::SeqCst);
    }

    /// Orders accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Clients that have finished.
    pub fn clients_done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// The orders accepted so far.
    pub fn placed(&self) -> Vec<Placed> {
        self.tally
            .lock()
            .map(|t| t.placed.clone())
            .unwrap_or_default()
    }

    pub fn into_tally(self) -> Result<Tally, LabError> {
        self.tally
            .into_inner()
            .map_err(|_| LabError::Shop("a client panicked".into()))
    }

    /// `clients` clients until the burst's orders are all taken.
    pub async fn run(&self, clients: usize) {
        futures::future::join_all((0..clients).map(|c| self.client(c))).await;
    }

    fn record(&self, f: impl FnOnce(&mut Tally)) {
        if let Ok(mut t) = self.tally.lock() {
            f(&mut t);
        }
    }

    /// Places orders of the mix, one at a time, until the burst's are all taken.
    async fn client(&self, c: usize) {
        let m = self.mix;
        let customer = &m.customers[c % m.customers.len()];
        loop {
            let i = self.next.fetch_add(1, Ordering::SeqCst);
            if i >= self.n {
                break;
            }
            if let Some((start, pace)) = self.pace {
                tokio::time::sleep_until(start + pace * i as u32).await;
            }
            let kind = OrderKind::of_mix(i);
            let (product, card): (&Product, &str) = match kind {
                OrderKind::Good => (&m.products[i % m.products.len()], GOOD_CARD),
                OrderKind::Declined => (&m.products[i % m.products.len()], DECLINED_CARD),
                OrderKind::OutOfStock => (&m.none_left[i % m.none_left.len()], GOOD_CARD),
            };
            let quantity = 1 + (i % 3) as i64;
            let key = format!("{}-{i}-{}", self.label, uuid::Uuid::new_v4().simple());
            loop {
                match self
                    .place(&customer.token, &key, &product.id, quantity, card)
                    .await
                {
                    Answer::Accepted(id) => {
                        let phase = usize::from(self.phase.load(Ordering::SeqCst));
                        self.accepted.fetch_add(1, Ordering::SeqCst);
                        self.record(|t| {
                            t.accepted[phase] += 1;
                            t.placed.push(Placed {
                                id,
                                kind,
                                product: product.id.clone(),
                                quantity,
                            });
                        });
                        break;
                    }
                    Answer::Refused => {
                        self.record(|t| t.refused += 1);
                        break;
                    }
                    Answer::Failed if Instant::now() >= self.until => {
                        self.record(|t| t.unanswered += 1);
                        break;
                    }
                    Answer::Failed => {
                        self.record(|t| t.retried += 1);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    async fn place(
        &self,
        token: &str,
        key: &str,
        product: &str,
        quantity: i64,
        card: &str,
    ) -> Answer {
        let sent = self
            .http
            .post(format!("{}/api/orders", self.base))
            .timeout(REQUEST_TIMEOUT)
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&json!({"items": [{"product_id": product, "quantity": quantity}], "card": card}))
            .send()
            .await;
        let Ok(res) = sent else {
            return Answer::Failed;
        };
        let status = res.status();
        if status.is_server_error() || status == 429 {
            return Answer::Failed;
        }
        if !status.is_success() {
            return Answer::Refused;
        }
        match res.json::<Value>().await {
            Ok(o) => o["id"]
                .as_str()
                .map_or(Answer::Failed, |id| Answer::Accepted(id.to_owned())),
            Err(_) => Answer::Failed,
        }
    }
}
