//! The message journal: what became of each subject's messages in this process (published
//! by a relay; applied, skipped as a duplicate, retried or dead-lettered by a consumer;
//! replayed by an operator), with times, for the operations console's order timeline.
//!
//! It is told by the relays' and consumers' observers after each batch, and keeps the most
//! recent subjects only: at most [`SUBJECTS`] subjects and [`PER_SUBJECT`] entries each, in
//! memory (a restart forgets it; what lasts — the order's saga steps, dead letters, staged
//! events — is read from the services' databases). Recording costs one short lock per
//! message and no I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use shopmesh_messaging::consumer::{self, Handled};
use shopmesh_messaging::outbox::{self, Published};

/// Subjects remembered (the oldest is forgotten first).
pub const SUBJECTS: usize = 4096;
/// Entries kept per subject (the oldest go first).
pub const PER_SUBJECT: usize = 64;
/// Touches remembered for [`Journal::touched_since`].
const TOUCHES: usize = 2048;

/// One thing that happened to one message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    /// Unix milliseconds.
    pub at: i64,
    /// `published`, `applied`, `duplicate`, `retry`, `dead_lettered` or `replayed`.
    pub event: &'static str,
    /// The service whose relay or consumer it was.
    pub service: &'static str,
    pub topic: String,
    /// The message's type (`shop.order.placed`).
    pub kind: Option<String>,
    pub message_id: Option<String>,
    /// The consumer (all but `published`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Which delivery it was, from 1 (consumers' entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Why it was not applied; for `published`, how long it waited in the outbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Default)]
struct State {
    subjects: HashMap<Arc<str>, VecDeque<Entry>>,
    /// Subjects in the order they were first seen (eviction order).
    order: VecDeque<Arc<str>>,
    /// The newest touches: (sequence, subject).
    touches: VecDeque<(u64, Arc<str>)>,
    seq: u64,
}

/// The journal of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Journal {
    state: Arc<Mutex<State>>,
}

impl Journal {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `entry` under `subject`.
    pub fn record(&self, subject: &str, entry: Entry) {
        let mut st = self.lock();
        st.seq += 1;
        let seq = st.seq;
        let key: Arc<str> = match st.subjects.get_key_value(subject) {
            Some((k, _)) => {
                let k = k.clone();
                if let Some(entries) = st.subjects.get_mut(&k) {
                    if entries.len() >= PER_SUBJECT {
                        entries.pop_front();
                    }
                    entries.push_back(entry);
                }
                k
            }
            None => {
                if st.order.len() >= SUBJECTS
                    && let Some(old) = st.order.pop_front()
                {
                    st.subjects.remove(&old);
                }
                let k: Arc<str> = subject.into();
                st.order.push_back(k.clone());
                st.subjects.insert(k.clone(), VecDeque::from([entry]));
                k
            }
        };
        if st.touches.len() >= TOUCHES {
            st.touches.pop_front();
        }
        st.touches.push_back((seq, key));
    }

    /// What is known of `subject`'s messages, oldest first.
    pub fn entries(&self, subject: &str) -> Vec<Entry> {
        self.lock()
            .subjects
            .get(subject)
            .map(|e| e.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The sequence of the newest entry (0 before the first).
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// The subjects that got entries after sequence `seq` (as far as the recent touches
    /// tell), and the sequence now.
    pub fn touched_since(&self, seq: u64) -> (Vec<String>, u64) {
        let st = self.lock();
        let mut seen = HashSet::new();
        let subjects = st
            .touches
            .iter()
            .rev()
            .take_while(|(s, _)| *s > seq)
            .filter(|(_, k)| seen.insert(k.clone()))
            .map(|(_, k)| k.to_string())
            .collect();
        (subjects, st.seq)
    }

    /// The observer for `service`'s consumers.
    pub fn consumer_observer(&self, service: &'static str) -> consumer::Observer {
        let journal = self.clone();
        Arc::new(move |h: &Handled<'_>| {
            let Some(subject) = h.subject.filter(|s| !s.is_empty()) else {
                return;
            };
            let event = h.outcome.label();
            journal.record(
                subject,
                Entry {
                    at: shopmesh_platform::now_millis(),
                    event,
                    service,
                    topic: h.topic.to_owned(),
                    kind: h.kind.map(str::to_owned),
                    message_id: h.message_id.map(str::to_owned),
                    consumer: Some(h.consumer.to_owned()),
                    attempt: Some(h.attempt),
                    detail: h.reason.map(str::to_owned),
                },
            );
        })
    }

    /// The observer for `service`'s outbox relay.
    pub fn relay_observer(&self, service: &'static str) -> outbox::Observer {
        let journal = self.clone();
        Arc::new(move |p: &Published<'_>| {
            let env = p.envelope;
            if env.subject.is_empty() {
                return;
            }
            let at = shopmesh_platform::now_millis();
            journal.record(
                &env.subject,
                Entry {
                    at,
                    event: "published",
                    service,
                    topic: p.topic.to_owned(),
                    kind: Some(env.kind.clone()),
                    message_id: Some(env.id.clone()),
                    consumer: None,
                    attempt: None,
                    detail: Some(format!("staged {} ms before", (at - p.staged_at).max(0))),
                },
            );
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: &'static str) -> Entry {
        Entry {
            at: 1,
            event,
            service: "orders",
            topic: "t".into(),
            kind: None,
            message_id: None,
            consumer: None,
            attempt: None,
            detail: None,
        }
    }

    #[test]
    fn keeps_entries_per_subject_in_order_and_bounded() {
        let j = Journal::new();
        j.record("a", entry("published"));
        j.record("b", entry("applied"));
        j.record("a", entry("retry"));
        let a: Vec<&str> = j.entries("a").iter().map(|e| e.event).collect();
        assert_eq!(a, ["published", "retry"]);
        for _ in 0..PER_SUBJECT + 5 {
            j.record("a", entry("duplicate"));
        }
        let a = j.entries("a");
        assert_eq!(a.len(), PER_SUBJECT);
        assert!(a.iter().all(|e| e.event == "duplicate"), "the oldest went");
        // The oldest subject is forgotten first.
        for n in 0..SUBJECTS {
            j.record(&format!("s{n}"), entry("applied"));
        }
        assert!(j.entries("a").is_empty());
        assert!(j.entries("b").is_empty());
        assert_eq!(j.entries(&format!("s{}", SUBJECTS - 1)).len(), 1);
    }

    #[test]
    fn tells_which_subjects_moved() {
        let j = Journal::new();
        j.record("a", entry("published"));
        let seq = j.seq();
        j.record("b", entry("applied"));
        j.record("c", entry("applied"));
        j.record("b", entry("applied"));
        let (mut moved, now) = j.touched_since(seq);
        moved.sort();
        assert_eq!(moved, ["b", "c"]);
        assert_eq!(now, seq + 3);
        assert!(j.touched_since(now).0.is_empty());
    }
}
