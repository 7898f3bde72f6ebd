//! Metrics: one `prometheus-client` registry per server, filled by each part at start-up.
//!
//! A part that records metrics defines its own metric handles in its own module and
//! registers them on the [`Registry`] passed to it while the server starts (see
//! `server.rs`). Handles are cheap clones that share their values; recording is lock-free.
//! The API serves the registry as Prometheus text at `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;

/// The finished registry, shared read-only once the server has started.
#[derive(Clone)]
pub struct MetricsRegistry(Arc<Registry>);

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

impl MetricsRegistry {
    /// Freezes a registry that every part has registered on.
    pub fn new(registry: Registry) -> Self {
        MetricsRegistry(Arc::new(registry))
    }

    /// The registry in Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.0);
        out
    }
}

/// A fresh registry with NetSel's metric prefix (`netsel_`).
pub fn new_registry() -> Registry {
    Registry::with_prefix("netsel")
}
