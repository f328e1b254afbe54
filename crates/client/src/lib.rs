//! A typed Rust client of the shop's public API, generated at build time by
//! [progenitor](https://github.com/oxidecomputer/progenitor) from the document the gateway
//! publishes at `GET /openapi.json` (kept in `openapi.json` beside this crate, in its 3.0
//! form, and checked against the live one by the end-to-end suite).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let shop = shopmesh_client::Client::new("http://127.0.0.1:8080");
//! let page = shop.product_list(None, None, None, None, None).await?;
//! println!("{} products", page.total);
//! # Ok(()) }
//! ```
//!
//! Signed-in calls take a client whose requests carry the bearer token:
//! [`Client::new_with_client`] with a `reqwest::Client` built with that default header.

#![allow(clippy::all, missing_docs, unused_imports, unreachable_pub)]

include!(concat!(env!("OUT_DIR"), "/client.rs"));
