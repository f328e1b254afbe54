//! The dead letters of the saga's consumers, across the services that keep them: one place
//! used by `shopmesh dlq` and by the admin API (`/dlq`).

use std::sync::Arc;

use serde::Serialize;
use shopmesh_messaging::dlq::{self, DeadLetter, DlqError};
use shopmesh_messaging::{Broker, Envelope, outbox};
use shopmesh_platform::db::{Db, Storage};

use crate::journal::{self, Journal};
use crate::services::ServiceName;

/// The services whose consumers keep dead letters.
pub const CONSUMING: [ServiceName; 3] = [
    ServiceName::Inventory,
    ServiceName::Payments,
    ServiceName::Orders,
];

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub service: &'static str,
    #[serde(flatten)]
    pub letter: DeadLetter,
}

#[derive(Clone)]
pub struct DeadLetters {
    dbs: Vec<(ServiceName, Db)>,
    broker: Arc<dyn Broker>,
    journal: Option<Journal>,
}

impl DeadLetters {
    pub fn new(dbs: Vec<(ServiceName, Db)>, broker: Arc<dyn Broker>) -> Self {
        Self {
            dbs,
            broker,
            journal: None,
        }
    }

    /// Replays are written in `journal` (the console's order timeline).
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// The dead letters kept for messages of `subject` (an order), oldest first.
    pub async fn for_subject(&self, subject: &str) -> Result<Vec<Entry>, DlqError> {
        let mut out = Vec::new();
        for (name, db) in &self.dbs {
            for letter in dlq::for_subject(db, subject, 100).await? {
                out.push(Entry {
                    service: name.as_str(),
                    letter,
                });
            }
        }
        out.sort_by_key(|e| e.letter.failed_at_ms);
        Ok(out)
    }

    /// Opens the consuming services' databases directly (for the CLI).
    pub async fn open(storage: &Storage, broker: Arc<dyn Broker>) -> Result<Self, crate::Error> {
        let mut dbs = Vec::new();
        for name in CONSUMING {
            let db = Db::open(&storage.for_service(name.as_str()), 2).await?;
            outbox::install(&db)
                .await
                .map_err(|e| crate::Error::Service {
                    service: name.as_str(),
                    reason: e.to_string(),
                })?;
            dbs.push((name, db));
        }
        Ok(Self::new(dbs, broker))
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<Entry>, DlqError> {
        let mut out = Vec::new();
        for (name, db) in &self.dbs {
            for letter in dlq::list(db, limit).await? {
                out.push(Entry {
                    service: name.as_str(),
                    letter,
                });
            }
        }
        out.sort_by_key(|e| e.letter.failed_at_ms);
        out.truncate(limit.max(0) as usize);
        Ok(out)
    }

    async fn find(&self, id: &str) -> Result<(&Db, Entry), DlqError> {
        for (name, db) in &self.dbs {
            if let Some(letter) = dlq::get(db, id).await? {
                return Ok((
                    db,
                    Entry {
                        service: name.as_str(),
                        letter,
                    },
                ));
            }
        }
        Err(DlqError::NotFound(id.into()))
    }

    pub async fn get(&self, id: &str) -> Result<Entry, DlqError> {
        self.find(id).await.map(|(_, e)| e)
    }

    pub async fn replay(&self, id: &str) -> Result<Entry, DlqError> {
        let (db, entry) = self.find(id).await?;
        dlq::replay(db, self.broker.as_ref(), id).await?;
        if let Some(journal) = &self.journal
            && let Ok(env) = Envelope::from_json(&entry.letter.payload)
        {
            journal.record(
                &env.subject,
                journal::Entry {
                    at: shopmesh_platform::now_millis(),
                    event: "replayed",
                    service: entry.service,
                    topic: entry.letter.topic.clone(),
                    kind: Some(env.kind.clone()),
                    message_id: Some(env.id.clone()),
                    consumer: Some(entry.letter.consumer.clone()),
                    attempt: None,
                    detail: Some(format!("dead letter {}", entry.letter.id)),
                },
            );
        }
        Ok(entry)
    }

    /// Deletes one dead letter, or all with `None`.
    pub async fn purge(&self, id: Option<&str>) -> Result<u64, DlqError> {
        match id {
            Some(id) => {
                let (db, _) = self.find(id).await?;
                Ok(dlq::purge(db, Some(id)).await?)
            }
            None => {
                let mut n = 0;
                for (_, db) in &self.dbs {
                    n += dlq::purge(db, None).await?;
                }
                Ok(n)
            }
        }
    }
}
