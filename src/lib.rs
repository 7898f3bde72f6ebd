//! NetSel: service registration and discovery.
//!
//! Services register (from [`client::ServiceClient`], the line protocol, or HTTP), receive
//! a stable virtual IP for their name, and heartbeat. Everyone else finds them through
//! NetSel's DNS server or connects through its TCP and HTTP proxies, which balance across
//! healthy instances. Dead instances drop out when their lease runs out.
//!
//! The pieces, around one [`catalog::Catalog`]:
//!
//! * [`catalog`]: services, instances, leases and VIPs; snapshots for readers, change
//!   events for watchers, every write through it.
//! * [`network`]: the VIP pool and the port pool.
//! * [`registry`]: the seed-compatible line protocol on port 9000 ([`protocol`] holds its
//!   grammar).
//! * [`dns`]: the authoritative DNS server for the NetSel domain.
//! * [`store`]: persistence behind a trait.
//! * [`server`]: [`NetSelServer`], which wires it all together.
//! * [`client`]: the client library.
//! * [`api`]: the HTTP/JSON API, watches, `/metrics` and the web UI.
//!
//! Build with `default-features = false, features = ["client"]` for the client alone.
//!
//! ```no_run
//! use tokio::signal;
//! use netsel::NetSelServer;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let server = NetSelServer::new();
//!     server.start().await?;
//!     signal::ctrl_c().await?;
//!     server.shutdown().await;
//!     Ok(())
//! }
//! ```

pub mod client;
pub mod model;
pub mod protocol;

#[cfg(feature = "server")]
mod accept;
#[cfg(feature = "server")]
pub mod acl;
#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod catalog;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod dns;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod network;
#[cfg(feature = "server")]
pub mod proxy;
#[cfg(feature = "server")]
pub mod registry;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
mod stall;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
mod sys;
#[cfg(feature = "server")]
pub mod traffic;

pub use client::ServiceClient;
#[cfg(feature = "server")]
pub use config::{NetSelConfig, Settings};
#[cfg(feature = "server")]
pub use server::NetSelServer;

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
