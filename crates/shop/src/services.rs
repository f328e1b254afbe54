//! The seven services by name: how to open one (storage + migrations) and build its app.

use std::fmt;
use std::str::FromStr;

use axum::Router;
use shopmesh_platform::db::{Db, Storage};

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
}

pub struct Built {
    pub name: ServiceName,
    pub db: Db,
    pub router: Router,
}

const POOL_SIZE: u32 = 8;

/// Opens the service's storage (running its migrations) and builds its HTTP app.
pub async fn open(
    name: ServiceName,
    storage: &Storage,
    deps: &Deps,
    token_ttl: std::time::Duration,
) -> Result<Built, Error> {
    let cfg = storage.for_service(name.as_str());
    let migrator = match name {
        ServiceName::Catalog => &shopmesh_catalog::MIGRATOR,
        ServiceName::Inventory => &shopmesh_inventory::MIGRATOR,
        ServiceName::Pricing => &shopmesh_pricing::MIGRATOR,
        ServiceName::Promotions => &shopmesh_promotions::MIGRATOR,
        ServiceName::Users => &shopmesh_users::MIGRATOR,
        ServiceName::Orders => &shopmesh_orders::MIGRATOR,
        ServiceName::Payments => &shopmesh_payments::MIGRATOR,
    };
    let db = Db::connect(&cfg, POOL_SIZE, migrator).await?;
    let router = match name {
        ServiceName::Catalog => shopmesh_catalog::app(db.clone()),
        ServiceName::Inventory => shopmesh_inventory::app(db.clone()),
        ServiceName::Pricing => shopmesh_pricing::app(db.clone()),
        ServiceName::Promotions => shopmesh_promotions::app(db.clone()),
        ServiceName::Users => shopmesh_users::app(
            db.clone(),
            shopmesh_users::Settings {
                access_ttl: token_ttl,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::Service {
            service: shopmesh_users::NAME,
            reason: e.to_string(),
        })?,
        ServiceName::Orders => shopmesh_orders::app(
            db.clone(),
            shopmesh_orders::Deps {
                pricing_url: deps.pricing_url.clone(),
            },
        ),
        ServiceName::Payments => shopmesh_payments::app(db.clone()),
    };
    Ok(Built { name, db, router })
}
