//! The TCP proxy's metrics, per service (`netsel_tcp_proxy_*`).
//!
//! Labels are service names from the catalog or fixed words, never client input, so the
//! number of series stays bounded by the number of services.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `service="..."`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// The service name.
    pub service: String,
}

/// Which way bytes went (`to_instance`, `to_client`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the instance.
    ToInstance,
    /// From the instance to the client.
    ToClient,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::ToInstance => "to_instance",
            Direction::ToClient => "to_client",
        })
    }
}

/// `service="...",direction="..."`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    /// The service name.
    pub service: String,
    /// Which way.
    pub direction: Direction,
}

/// `reason="..."`: why a client connection got no relay.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A fixed word (see `GatewayError::reason`).
    pub reason: &'static str,
}

/// Metric families of the TCP proxy. Cheap to clone; clones share values.
#[derive(Clone, Debug, Default)]
pub struct TcpProxyMetrics {
    connections: Family<ServiceLabel, Counter>,
    active: Family<ServiceLabel, Gauge>,
    bytes: Family<BytesLabel, Counter>,
    connect_failures: Family<ServiceLabel, Counter>,
    ejections: Family<ServiceLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    vip_bind_failed: Family<ServiceLabel, Gauge>,
}

/// The handles for one service, looked up once per connection.
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    /// Connections relayed.
    pub connections: Counter,
    /// Connections being relayed now.
    pub active: Gauge,
    /// Bytes from clients to instances.
    pub to_instance: Counter,
    /// Bytes from instances to clients.
    pub to_client: Counter,
    /// Failed connection attempts to instances.
    pub connect_failures: Counter,
    /// Instances ejected after a failed attempt.
    pub ejections: Counter,
}

impl TcpProxyMetrics {
    /// Fresh families, registered on `metrics_registry` when one is given.
    pub fn new(metrics_registry: Option<&mut Registry>) -> Self {
        let m = TcpProxyMetrics::default();
        if let Some(r) = metrics_registry {
            let r = r.sub_registry_with_prefix("tcp_proxy");
            r.register(
                "connections",
                "Client connections relayed to an instance",
                m.connections.clone(),
            );
            r.register(
                "active_connections",
                "Client connections being relayed now",
                m.active.clone(),
            );
            r.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
            r.register(
                "connect_failures",
                "Connection attempts to instances that failed (refused or timed out)",
                m.connect_failures.clone(),
            );
            r.register(
                "ejections",
                "Instances ejected from rotation after a failed connection attempt",
                m.ejections.clone(),
            );
            r.register(
                "refused",
                "Client connections closed without a relay, by reason",
                m.refused.clone(),
            );
            r.register(
                "vip_bind_failed",
                "1 while a service's VIP:port listener cannot be bound",
                m.vip_bind_failed.clone(),
            );
        }
        m
    }

    /// The handles for `service`.
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let label = ServiceLabel {
            service: service.to_string(),
        };
        let bytes = |direction| BytesLabel {
            service: service.to_string(),
            direction,
        };
        // One statement per lookup: a family's lock guard lives until the end of its
        // statement, and a second lookup in the same family would wait for it forever.
        let connections = self.connections.get_or_create(&label).clone();
        let active = self.active.get_or_create(&label).clone();
        let to_instance = self
            .bytes
            .get_or_create(&bytes(Direction::ToInstance))
            .clone();
        let to_client = self
            .bytes
            .get_or_create(&bytes(Direction::ToClient))
            .clone();
        let connect_failures = self.connect_failures.get_or_create(&label).clone();
        let ejections = self.ejections.get_or_create(&label).clone();
        ServiceMetrics {
            connections,
            active,
            to_instance,
            to_client,
            connect_failures,
            ejections,
        }
    }

    /// `service`'s totals so far, for the traffic sampler: connections relayed and failed
    /// connection attempts. Read without creating series.
    pub(crate) fn totals(&self, service: &str) -> (u64, u64) {
        let label = ServiceLabel {
            service: service.to_string(),
        };
        // One statement per lookup (see `service`).
        let connections = self.connections.get(&label).map_or(0, |c| c.get());
        let failures = self.connect_failures.get(&label).map_or(0, |c| c.get());
        (connections, failures)
    }

    /// Counts a client connection that got no relay.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Sets or clears the bind-failure mark of a service.
    pub fn set_vip_bind_failed(&self, service: &str, failed: bool) {
        let label = ServiceLabel {
            service: service.to_string(),
        };
        if failed {
            self.vip_bind_failed.get_or_create(&label).set(1);
        } else {
            self.vip_bind_failed.remove(&label);
        }
    }
}
