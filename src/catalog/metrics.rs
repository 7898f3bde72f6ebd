//! The catalog's Prometheus metrics: counters bumped by writes, and a collector that
//! reads instance counts per service and health from the current snapshot at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{Catalog, Health};

/// Counters of catalog writes. Cheap clones sharing their values; always recorded (one
/// atomic add), exported once [`Catalog::register_metrics`] is called.
#[derive(Debug, Clone, Default)]
pub struct CatalogMetrics {
    /// Successful registrations (new or renewed).
    pub(crate) registrations: Counter,
    /// Accepted heartbeats (lease renewals).
    pub(crate) heartbeats: Counter,
    /// Instances removed because their lease ran out.
    pub(crate) expiries: Counter,
    /// Instances removed by deregistration.
    pub(crate) deregistrations: Counter,
    /// Health changes this node wrote (active checks, Consul check updates), by new state.
    health_transitions: Family<[(&'static str, &'static str); 1], Counter>,
}

impl CatalogMetrics {
    /// Counts one instance changing health to `to`.
    pub(crate) fn health_transition(&self, to: Health) {
        self.health_transitions
            .get_or_create(&[("to", to.as_str())])
            .inc();
    }
}

impl CatalogMetrics {
    pub(crate) fn register(&self, metrics_registry: &mut Registry, catalog: Catalog) {
        metrics_registry.register(
            "registrations",
            "Successful registrations (new or renewed)",
            self.registrations.clone(),
        );
        metrics_registry.register(
            "heartbeats",
            "Accepted heartbeats (lease renewals)",
            self.heartbeats.clone(),
        );
        metrics_registry.register(
            "expiries",
            "Instances removed because their lease ran out",
            self.expiries.clone(),
        );
        metrics_registry.register(
            "deregistrations",
            "Instances removed by deregistration",
            self.deregistrations.clone(),
        );
        // Both states exist from the start, so a rate() over them is defined at once.
        for to in [Health::Passing, Health::Critical] {
            let _ = self
                .health_transitions
                .get_or_create(&[("to", to.as_str())]);
        }
        metrics_registry.register(
            "health_transitions",
            "Instances changing health (active checks), by the state they changed to",
            self.health_transitions.clone(),
        );
        catalog.register_store_metrics(metrics_registry);
        metrics_registry.register_collector(Box::new(InstanceCollector { catalog }));
    }
}

/// `netsel_instances{service, health}` and `netsel_services`, read from the snapshot.
struct InstanceCollector {
    catalog: Catalog,
}

impl std::fmt::Debug for InstanceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstanceCollector")
    }
}

impl Collector for InstanceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.catalog.snapshot();
        let services = ConstGauge::new(snap.service_count() as i64);
        services.encode(encoder.encode_descriptor(
            "services",
            "Registered services",
            None,
            services.metric_type(),
        )?)?;
        let index = ConstGauge::new(i64::try_from(snap.index).unwrap_or(i64::MAX));
        index.encode(encoder.encode_descriptor(
            "catalog_index",
            "Catalog index of this node's view (in a cluster, the etcd revision it applied)",
            None,
            index.metric_type(),
        )?)?;
        let health = self.catalog.store_health();
        let degraded = ConstGauge::new(i64::from(health.degraded));
        degraded.encode(encoder.encode_descriptor(
            "store_degraded",
            "1 while the store cannot take writes (a cluster store without quorum or out of reach)",
            None,
            degraded.metric_type(),
        )?)?;
        if let Some(age) = health.view_age {
            let age = ConstGauge::new(age.as_secs_f64());
            age.encode(encoder.encode_descriptor(
                "store_view_age_seconds",
                "Seconds since this node last heard from the cluster store",
                None,
                age.metric_type(),
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "instances",
            "Registered instances per service and health state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for svc in snap.services() {
            let passing = svc.healthy_count();
            let critical = svc.instances.len() - passing;
            for (health, n) in [(Health::Passing, passing), (Health::Critical, critical)] {
                let labels = [("service", svc.name.as_str()), ("health", health.as_str())];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
