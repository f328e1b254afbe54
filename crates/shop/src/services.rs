//! The seven services by name: how to open one (storage + migrations) and build its app.

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures::FutureExt;
use futures::future::BoxFuture;
use shopmesh_messaging::outbox::{self, Relay};
use shopmesh_messaging::{Broker, Consumer, ConsumerConfig, Handler};
use shopmesh_platform::client::ServiceClient;
use shopmesh_platform::db::{Db, Storage};
use tokio_util::sync::CancellationToken;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceName {
    Catalog,
    Inventory,
    Pricing,
    Promotions,
    Users,
    Orders,
    Payments,
}

impl ServiceName {
    pub const ALL: [ServiceName; 7] = [
        ServiceName::Catalog,
        ServiceName::Inventory,
        ServiceName::Pricing,
        ServiceName::Promotions,
        ServiceName::Users,
        ServiceName::Orders,
        ServiceName::Payments,
    ];

    /// The port `shopmesh service NAME` is usually given (7001 to 7007, in this order), and
    /// that `shopmesh gateway-config` assumes unless told otherwise.
    pub fn default_port(self) -> u16 {
        7001 + Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as u16
    }

    /// The service's database migrations.
    pub fn migrator(self) -> &'static sqlx::migrate::Migrator {
        match self {
            ServiceName::Catalog => &shopmesh_catalog::MIGRATOR,
            ServiceName::Inventory => &shopmesh_inventory::MIGRATOR,
            ServiceName::Pricing => &shopmesh_pricing::MIGRATOR,
            ServiceName::Promotions => &shopmesh_promotions::MIGRATOR,
            ServiceName::Users => &shopmesh_users::MIGRATOR,
            ServiceName::Orders => &shopmesh_orders::MIGRATOR,
            ServiceName::Payments => &shopmesh_payments::MIGRATOR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Catalog => shopmesh_catalog::NAME,
            ServiceName::Inventory => shopmesh_inventory::NAME,
            ServiceName::Pricing => shopmesh_pricing::NAME,
            ServiceName::Promotions => shopmesh_promotions::NAME,
            ServiceName::Users => shopmesh_users::NAME,
            ServiceName::Orders => shopmesh_orders::NAME,
            ServiceName::Payments => shopmesh_payments::NAME,
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ServiceName::ALL.iter().map(|n| n.as_str()).collect();
                format!("unknown service `{s}` (one of: {})", names.join(", "))
            })
    }
}

/// Addresses of the services a service calls.
#[derive(Debug, Clone)]
pub struct Deps {
    pub pricing_url: String,
    pub payments_url: String,
    /// The user center (orders read accounts through its interface).
    pub users_url: String,
    /// How orders read accounts.
    pub users_via: UsersVia,
    /// The mesh sidecar's outbound address (`http://127.0.0.1:PORT`): orders calls pricing,
    /// payments and users through it, by name, over mutual TLS. `None`: straight to the
    /// URLs above.
    pub sidecar: Option<String>,
}

/// The two ways of sharing the user center's data (the shared data pattern).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsersVia {
    /// Its HTTP interface, cached, the cache invalidated by `user.updated` events.
    #[default]
    Interface,
    /// Its published view, read through a read-only connection to its database.
    Database,
}

/// How long the orders service uses a cached account without its `user.updated` event.
const DIRECTORY_TTL: Duration = Duration::from_secs(60);

/// Messaging settings shared by the services that take part in the order saga.
#[derive(Clone)]
pub struct Messaging {
    pub broker: Arc<dyn Broker>,
    /// A participant silent this long after an order was placed cancels it (`timeout`).
    pub saga_deadline: Duration,
    /// Services whose consumer is not started (fault injection: a silent participant).
    pub silent: Vec<ServiceName>,
    /// Told what becomes of each message (the console's order timeline), when kept.
    pub journal: Option<crate::journal::Journal>,
}

impl Messaging {
    /// `c`, telling the journal (when one is kept) what became of each message.
    fn observed(&self, c: Consumer, service: ServiceName) -> Consumer {
        match &self.journal {
            Some(j) => c.observe(j.consumer_observer(service.as_str())),
            None => c,
        }
    }
}

/// A background task of a service (outbox relay, consumer, sweeper).
pub type Task = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

pub struct Built {
    pub name: ServiceName,
    pub db: Db,
    pub router: Router,
    pub tasks: Vec<Task>,
}

/// Declares every subscription of the shop on the broker, before anything publishes.
pub async fn declare(broker: &dyn Broker) -> Result<(), Error> {
    for (group, topics) in shopmesh_events::SUBSCRIPTIONS {
        broker
            .declare(group, topics)
            .await
            .map_err(|e| Error::Service {
                service: "broker",
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// The relay and (unless silenced) the consumer of a saga participant.
async fn saga_tasks(
    name: ServiceName,
    consumer: &str,
    topics: &[&str],
    db: &Db,
    m: &Messaging,
    relay: &Relay,
    handler: Arc<dyn Handler>,
) -> Result<Vec<Task>, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Service {
        service: name.as_str(),
        reason: e.to_string(),
    };
    let mut tasks: Vec<Task> = Vec::new();
    let r = relay.clone();
    tasks.push(Box::new(move |t| r.run(t).boxed()));
    if !m.silent.contains(&name) {
        let c = Consumer::new(
            ConsumerConfig::new(consumer, topics),
            db.clone(),
            m.broker.as_ref(),
            handler,
        )
        .await
        .map_err(|e| err(&e))?;
        let waker = relay.waker();
        let c = m.observed(c.after_commit(Arc::new(move || waker.notify_one())), name);
        tasks.push(Box::new(move |t| c.run(t).boxed()));
    }
    Ok(tasks)
}

const POOL_SIZE: u32 = 8;

/// Connections per service. SQLite admits one writer at a time and makes the others poll
/// with sleeps (busy timeout); for the write-heavy saga services one connection, whose
/// async wait queue serializes writers without sleeping, is faster than several.
fn pool_size(name: ServiceName, storage: &Storage) -> u32 {
    let write_heavy = matches!(
        name,
        ServiceName::Orders | ServiceName::Inventory | ServiceName::Payments
    );
    match storage {
        Storage::Sqlite { .. } if write_heavy => std::env::var("SHOPMESH_SQLITE_WRITER_POOL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        _ => POOL_SIZE,
    }
}

/// Opens the service's storage (running its migrations) and builds its HTTP app.
pub async fn open(
    name: ServiceName,
    storage: &Storage,
    deps: &Deps,
    users: &shopmesh_users::Settings,
    m: &Messaging,
) -> Result<Built, Error> {
    let cfg = storage.for_service(name.as_str());
    let db = Db::connect(&cfg, pool_size(name, storage), name.migrator()).await?;
    let mut tasks = Vec::new();
    let mut relay = Relay::new(db.clone(), m.broker.clone());
    if let Some(j) = &m.journal {
        relay = relay.observe(j.relay_observer(name.as_str()));
    }
    // The user center's interface (or view), opened for the orders service only.
    let mut orders_directory = None;
    if matches!(
        name,
        ServiceName::Inventory | ServiceName::Payments | ServiceName::Orders | ServiceName::Users
    ) {
        outbox::install(&db).await.map_err(|e| Error::Service {
            service: name.as_str(),
            reason: e.to_string(),
        })?;
    }
    use shopmesh_events as ev;
    match name {
        ServiceName::Inventory => {
            let h = Arc::new(shopmesh_inventory::saga::InventorySaga);
            tasks = saga_tasks(
                name,
                ev::CONSUMER_INVENTORY,
                &[ev::TOPIC_ORDERS],
                &db,
                m,
                &relay,
                h,
            )
            .await?;
        }
        ServiceName::Payments => {
            let h = Arc::new(shopmesh_payments::saga::PaymentsSaga::new(db.clone()));
            tasks = saga_tasks(
                name,
                ev::CONSUMER_PAYMENTS,
                &[ev::TOPIC_ORDERS],
                &db,
                m,
                &relay,
                h,
            )
            .await?;
        }
        ServiceName::Orders => {
            let h = Arc::new(shopmesh_orders::saga::OrderSaga);
            let topics = [ev::TOPIC_INVENTORY, ev::TOPIC_PAYMENTS];
            tasks = saga_tasks(name, ev::CONSUMER_ORDERS, &topics, &db, m, &relay, h).await?;
            let directory = Arc::new(match deps.users_via {
                UsersVia::Interface => shopmesh_users_client::Directory::with_client(
                    ServiceClient::through(
                        "users",
                        deps.users_url.clone(),
                        deps.sidecar.as_deref(),
                    )
                    .map_err(|e| Error::Service {
                        service: name.as_str(),
                        reason: e.to_string(),
                    })?,
                    DIRECTORY_TTL,
                    100_000,
                ),
                UsersVia::Database => shopmesh_users_client::Directory::shared_database(
                    Db::open_read_only(
                        &storage.for_service(ServiceName::Users.as_str()),
                        4,
                        shopmesh_users::DIRECTORY_READER,
                    )
                    .await?,
                ),
            });
            orders_directory = Some(directory.clone());
            // Account changes drop the directory's cached copies.
            let invalidator = Arc::new(shopmesh_users_client::Invalidator(directory.clone()));
            let c = Consumer::new(
                ConsumerConfig::new(ev::CONSUMER_ORDERS_USERS, &[ev::TOPIC_USERS]),
                db.clone(),
                m.broker.as_ref(),
                invalidator,
            )
            .await
            .map_err(|e| Error::Service {
                service: name.as_str(),
                reason: e.to_string(),
            })?;
            let c = m.observed(c, name);
            tasks.push(Box::new(move |t| c.run(t).boxed()));
            let sweeper = shopmesh_orders::saga::TimeoutSweeper {
                db: db.clone(),
                relay: relay.clone(),
                deadline: m.saga_deadline,
                every: Duration::from_millis(500).min(m.saga_deadline / 2),
            };
            tasks.push(Box::new(move |t| sweeper.run(t).boxed()));
        }
        ServiceName::Users => {
            // Publishes `user.updated`.
            let r = relay.clone();
            tasks.push(Box::new(move |t| r.run(t).boxed()));
            // Forgets refresh tokens expired for more than a day, hourly.
            let purge_db = db.clone();
            tasks.push(Box::new(move |stop: CancellationToken| {
                async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(3600));
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tick.tick() => match shopmesh_users::tokens::purge(&purge_db).await {
                                Ok(n) if n > 0 => tracing::info!(purged = n, "expired refresh tokens purged"),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "refresh token purge failed"),
                            },
                        }
                    }
                }
                .boxed()
            }));
        }
        _ => {}
    }
    let router = match name {
        ServiceName::Catalog => shopmesh_catalog::app(db.clone()),
        ServiceName::Inventory => shopmesh_inventory::app(db.clone()),
        ServiceName::Pricing => shopmesh_pricing::app(db.clone()),
        ServiceName::Promotions => shopmesh_promotions::app(db.clone()),
        ServiceName::Users => shopmesh_users::app(db.clone(), users.clone(), relay.clone())
            .await
            .map_err(|e| Error::Service {
                service: shopmesh_users::NAME,
                reason: e.to_string(),
            })?,
        ServiceName::Orders => shopmesh_orders::app(
            db.clone(),
            shopmesh_orders::Deps {
                pricing_url: deps.pricing_url.clone(),
                payments_url: deps.payments_url.clone(),
                directory: orders_directory.expect("opened with the orders consumers above"),
                sidecar: deps.sidecar.clone(),
            },
            relay,
        )
        .map_err(|e| Error::Service {
            service: shopmesh_orders::NAME,
            reason: e.to_string(),
        })?,
        ServiceName::Payments => shopmesh_payments::app(db.clone()),
    };
    Ok(Built {
        name,
        db,
        router,
        tasks,
    })
}
