//! A realistic, deterministic demo catalog: products across twenty categories with stock,
//! prices and a few hundred promotions. Seeding is idempotent (ids derive from SKUs, inserts
//! skip existing rows) and skipped outright when a service already holds its share, so a
//! restart on a seeded data dir costs a few `COUNT(*)`s.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shopmesh_catalog::model::Product;
use shopmesh_platform::db::Db;
use shopmesh_promotions::{PromotionKind, PromotionSeed};
use uuid::Uuid;

use crate::SeedError;

pub const DEFAULT_PRODUCTS: usize = 10_000;

/// Namespace of the seeded ids (`uuid v5(namespace, sku)`).
const NAMESPACE: Uuid = Uuid::from_u128(0x5e0d_5eed_0000_4000_8000_7368_6f70_6d73);

pub const CATEGORIES: [(&str, [&str; 4]); 20] = [
    (
        "electronics",
        ["Headphones", "Speaker", "Charger", "Keyboard"],
    ),
    ("books", ["Novel", "Cookbook", "Atlas", "Biography"]),
    ("kitchen", ["Skillet", "Kettle", "Knife Set", "Blender"]),
    ("garden", ["Hose", "Planter", "Shears", "Lantern"]),
    ("toys", ["Puzzle", "Robot", "Kite", "Building Set"]),
    ("sports", ["Yoga Mat", "Football", "Racket", "Water Bottle"]),
    ("clothing", ["Jacket", "T-Shirt", "Sweater", "Scarf"]),
    ("shoes", ["Sneakers", "Boots", "Sandals", "Loafers"]),
    ("beauty", ["Face Cream", "Shampoo", "Perfume", "Brush"]),
    ("grocery", ["Coffee", "Olive Oil", "Tea", "Chocolate"]),
    ("office", ["Notebook", "Desk Lamp", "Pen Set", "Stapler"]),
    ("pets", ["Dog Bed", "Cat Tree", "Leash", "Bowl"]),
    (
        "automotive",
        ["Dash Cam", "Car Vacuum", "Seat Cover", "Tyre Gauge"],
    ),
    (
        "music",
        ["Guitar Strings", "Ukulele", "Metronome", "Microphone"],
    ),
    ("tools", ["Drill", "Hammer", "Wrench Set", "Tape Measure"]),
    (
        "health",
        ["Thermometer", "Vitamins", "First Aid Kit", "Scale"],
    ),
    ("baby", ["Stroller", "Bottle", "Blanket", "Teether"]),
    ("furniture", ["Chair", "Bookshelf", "Side Table", "Stool"]),
    ("jewelry", ["Necklace", "Ring", "Bracelet", "Earrings"]),
    ("outdoors", ["Tent", "Backpack", "Sleeping Bag", "Headlamp"]),
];
const ADJECTIVES: [&str; 16] = [
    "Classic",
    "Compact",
    "Deluxe",
    "Eco",
    "Ergonomic",
    "Everyday",
    "Heavy-Duty",
    "Lightweight",
    "Modern",
    "Portable",
    "Premium",
    "Rustic",
    "Smart",
    "Sleek",
    "Travel",
    "Vintage",
];
const BRANDS: [&str; 10] = [
    "Acme",
    "Northwind",
    "Contoso",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Hooli",
    "Vandelay",
];
const COLORS: [&str; 8] = [
    "black", "white", "red", "blue", "green", "grey", "oak", "silver",
];

/// One generated product with its stock and price.
pub struct SeedProduct {
    pub product: Product,
    pub on_hand: i64,
    pub price_minor: i64,
}

pub fn product_id(sku: &str) -> String {
    Uuid::new_v5(&NAMESPACE, sku.as_bytes()).to_string()
}

/// The first `n` products of the deterministic catalog.
pub fn products(n: usize) -> Vec<SeedProduct> {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    (0..n)
        .map(|i| {
            let (category, nouns) = CATEGORIES[i % CATEGORIES.len()];
            let noun = nouns[rng.gen_range(0..nouns.len())];
            let adjective = ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())];
            let brand = BRANDS[rng.gen_range(0..BRANDS.len())];
            let color = COLORS[rng.gen_range(0..COLORS.len())];
            let sku = format!("SKU-{:06}", i + 1);
            let name = format!("{brand} {adjective} {noun}");
            let attributes = json!({
                "brand": brand,
                "color": color,
                "weight_g": rng.gen_range(50..5000),
            });
            SeedProduct {
                product: Product {
                    id: product_id(&sku),
                    description: format!(
                        "A {} {} {} from {brand}, in {color}.",
                        adjective.to_lowercase(),
                        noun.to_lowercase(),
                        category
                    ),
                    sku,
                    name,
                    category: category.into(),
                    attributes: attributes.as_object().cloned().unwrap_or_default(),
                    created_at: String::new(),
                },
                on_hand: if rng.gen_bool(0.05) {
                    0
                } else {
                    rng.gen_range(1..=500)
                },
                price_minor: rng.gen_range(199..=49_999),
            }
        })
        .collect()
}

/// Promotions: one on every 30th product and three per category, with validity windows
/// around `now` (some past, most current, some future).
pub fn promotions(products: &[SeedProduct], now_ms: i64) -> Vec<PromotionSeed> {
    const DAY: i64 = 24 * 3600 * 1000;
    let mut rng = SmallRng::seed_from_u64(0x9e0);
    let mut out = Vec::new();
    let window = |rng: &mut SmallRng| {
        let start = now_ms + rng.gen_range(-30..=5) * DAY;
        (start, start + rng.gen_range(7..=60) * DAY)
    };
    for (i, p) in products.iter().enumerate().filter(|(i, _)| i % 30 == 0) {
        let (starts_at, ends_at) = window(&mut rng);
        let pct = rng.gen_range(5..=40);
        out.push(PromotionSeed {
            id: Uuid::new_v5(&NAMESPACE, format!("promo-product-{i}").as_bytes()).to_string(),
            name: format!("{pct}% off {}", p.product.name),
            description: format!("Save {pct}% on {}.", p.product.name),
            kind: PromotionKind::PercentOff,
            value: pct,
            currency: None,
            product_id: Some(p.product.id.clone()),
            category: None,
            starts_at,
            ends_at,
        });
    }
    for (category, _) in CATEGORIES {
        for k in 0..3 {
            let (starts_at, ends_at) = window(&mut rng);
            let amount = rng.gen_range(2..=20) * 100;
            out.push(PromotionSeed {
                id: Uuid::new_v5(&NAMESPACE, format!("promo-{category}-{k}").as_bytes())
                    .to_string(),
                name: format!("{} off {category}", amount / 100),
                description: format!("Take {}.00 USD off anything in {category}.", amount / 100),
                kind: PromotionKind::AmountOff,
                value: amount,
                currency: Some("USD".into()),
                product_id: None,
                category: Some(category.into()),
                starts_at,
                ends_at,
            });
        }
    }
    out
}

pub struct Dbs {
    pub catalog: Db,
    pub inventory: Db,
    pub pricing: Db,
    pub promotions: Db,
}

fn err(service: &str) -> impl Fn(sqlx::Error) -> SeedError + '_ {
    move |e| SeedError(format!("{service}: {e}"))
}

/// Seeds `n` products into the four catalog-side services, skipping each that already has
/// its share.
pub async fn seed(dbs: &Dbs, n: usize) -> Result<(), SeedError> {
    let want = n as i64;
    let have = (
        shopmesh_catalog::store::count(&dbs.catalog)
            .await
            .map_err(err("catalog"))?,
        shopmesh_inventory::count(&dbs.inventory)
            .await
            .map_err(err("inventory"))?,
        shopmesh_pricing::count(&dbs.pricing)
            .await
            .map_err(err("pricing"))?,
        shopmesh_promotions::count(&dbs.promotions)
            .await
            .map_err(err("promotions"))?,
    );
    let want_promos = (n.div_ceil(30) + CATEGORIES.len() * 3) as i64;
    if have.0 >= want && have.1 >= want && have.2 >= want && have.3 >= want_promos {
        tracing::info!(products = have.0, "catalog already seeded");
        return Ok(());
    }
    let started = std::time::Instant::now();
    let generated = products(n);
    if have.0 < want {
        let items: Vec<Product> = generated.iter().map(|p| p.product.clone()).collect();
        shopmesh_catalog::store::insert_many(&dbs.catalog, &items)
            .await
            .map_err(err("catalog"))?;
    }
    if have.1 < want {
        let levels: Vec<(String, i64)> = generated
            .iter()
            .map(|p| (p.product.id.clone(), p.on_hand))
            .collect();
        shopmesh_inventory::seed(&dbs.inventory, &levels)
            .await
            .map_err(err("inventory"))?;
    }
    if have.2 < want {
        let prices: Vec<(String, i64, String)> = generated
            .iter()
            .map(|p| (p.product.id.clone(), p.price_minor, "USD".to_owned()))
            .collect();
        shopmesh_pricing::seed(&dbs.pricing, &prices)
            .await
            .map_err(err("pricing"))?;
    }
    if have.3 < want_promos {
        let promos = promotions(&generated, shopmesh_platform::now_millis());
        shopmesh_promotions::seed(&dbs.promotions, &promos)
            .await
            .map_err(err("promotions"))?;
    }
    tracing::info!(
        products = n,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "catalog seeded"
    );
    Ok(())
}

/// Seeds `n` products into the catalog-side services' databases of `storage` (creating their
/// tables first if needed): what `shopmesh up` does on first start, for services run as
/// separate processes (`shopmesh seed`).
pub async fn seed_storage(
    storage: &shopmesh_platform::db::Storage,
    n: usize,
) -> Result<(), crate::Error> {
    use crate::ServiceName;
    let open = |name: ServiceName| async move {
        Db::connect(&storage.for_service(name.as_str()), 2, name.migrator()).await
    };
    let dbs = Dbs {
        catalog: open(ServiceName::Catalog).await?,
        inventory: open(ServiceName::Inventory).await?,
        pricing: open(ServiceName::Pricing).await?,
        promotions: open(ServiceName::Promotions).await?,
    };
    seed(&dbs, n).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unique() {
        let a = products(300);
        let b = products(300);
        assert_eq!(a[17].product.id, b[17].product.id);
        assert_eq!(a[17].product.name, b[17].product.name);
        let ids: std::collections::HashSet<_> = a.iter().map(|p| &p.product.id).collect();
        assert_eq!(ids.len(), 300);
        let promos = promotions(&a, 0);
        assert_eq!(promos.len(), 10 + 60);
        assert!(promos.iter().all(|p| p.starts_at < p.ends_at));
    }
}
