//! The HTTP proxy's metrics, per service: requests by status class, latency, and whether
//! each upstream request went out on a reused connection.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::catalog::ServiceName;

/// A service label: the catalog's name (a cheap clone), or `-` for requests that named no
/// known service (kept to one value so unknown hosts cannot grow the label set).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ServiceLabel(pub Option<ServiceName>);

impl EncodeLabelValue for ServiceLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_ref().map_or("-", |n| n.as_str()))
    }
}

/// Status class of a response (`2xx`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Class(u8);

impl EncodeLabelValue for Class {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}xx", self.0)
    }
}

impl Class {
    pub(crate) fn of(status: u16) -> Class {
        Class((status / 100).clamp(1, 5) as u8)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    service: ServiceLabel,
    class: Class,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceOnly {
    service: ServiceLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    service: ServiceLabel,
    reused: bool,
}

/// Finite upper bounds of the latency buckets, in seconds.
pub(crate) const LATENCY_BUCKETS: usize = 18;

/// The upper bound of latency bucket `i` in seconds: 100 µs .. ~13 s, doubling.
pub(crate) fn latency_bound(i: usize) -> f64 {
    // Doubling is exact in floating point: the same values as `exponential_buckets`.
    0.0001 * f64::from(1u32 << i.min(31))
}

/// Request latency: the Prometheus histogram, plus the same buckets as plain atomics the
/// traffic sampler can read (`prometheus-client` keeps its buckets to itself). Clones
/// share values.
#[derive(Debug, Clone)]
pub(crate) struct LatencyHistogram {
    prom: Histogram,
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: Arc<[AtomicU64; LATENCY_BUCKETS + 1]>,
}

impl LatencyHistogram {
    fn new() -> Self {
        LatencyHistogram {
            // 100 µs .. ~13 s.
            prom: Histogram::new(exponential_buckets(0.0001, 2.0, LATENCY_BUCKETS as u16)),
            counts: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    fn observe(&self, secs: f64) {
        self.prom.observe(secs);
        let i = (0..LATENCY_BUCKETS)
            .find(|&i| secs <= latency_bound(i))
            .unwrap_or(LATENCY_BUCKETS);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far, per bucket (the last is `+Inf`).
    pub(crate) fn counts(&self) -> [u64; LATENCY_BUCKETS + 1] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.prom.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::new()
}

/// One service's totals so far, for the traffic sampler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HttpTotals {
    /// Requests answered (every status).
    pub requests: u64,
    /// Of which answered 5xx (by the instance or by the proxy).
    pub errors: u64,
    /// Latency observations per bucket (the last is `+Inf`).
    pub latency: [u64; LATENCY_BUCKETS + 1],
}

/// Metric handles (cheap clones sharing values).
#[derive(Debug, Clone)]
pub(crate) struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<ServiceOnly, LatencyHistogram, fn() -> LatencyHistogram>,
    upstream: Family<UpstreamLabels, Counter>,
    retries: Family<ServiceOnly, Counter>,
    pub(crate) open_connections: Gauge<i64, AtomicI64>,
    /// Client connections handed from the HTTP/1.1 fast path to hyper.
    pub(crate) hyper_connections: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            upstream: Family::default(),
            retries: Family::default(),
            open_connections: Gauge::default(),
            hyper_connections: Counter::default(),
        }
    }
}

/// One service's metric handles, resolved once per worker so recording takes no lock
/// on the metric families.
#[derive(Debug)]
pub(crate) struct ServiceMetrics {
    classes: [Counter; 5],
    latency: LatencyHistogram,
    fresh: Counter,
    reused: Counter,
    retries: Counter,
}

impl ServiceMetrics {
    pub(crate) fn request(&self, status: u16, elapsed: Duration) {
        self.classes[usize::from(Class::of(status).0 - 1)].inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn upstream(&self, reused: bool) {
        if reused {
            self.reused.inc();
        } else {
            self.fresh.inc();
        }
    }

    pub(crate) fn retry(&self) {
        self.retries.inc();
    }
}

impl ProxyMetrics {
    /// `service`'s totals so far; `None` when the proxy has seen no request for it (read
    /// without creating series).
    pub(crate) fn totals(&self, service: &ServiceName) -> Option<HttpTotals> {
        let label = ServiceLabel(Some(service.clone()));
        let only = ServiceOnly {
            service: label.clone(),
        };
        // One statement per lookup: a family's read guard lives until its statement ends.
        let latency = self.latency.get(&only).map(|h| h.counts())?;
        let mut t = HttpTotals {
            latency,
            ..HttpTotals::default()
        };
        for c in 1..=5u8 {
            let n = self
                .requests
                .get(&RequestLabels {
                    service: label.clone(),
                    class: Class(c),
                })
                .map_or(0, |c| c.get());
            t.requests += n;
            if c == 5 {
                t.errors = n;
            }
        }
        Some(t)
    }

    /// The handles for `service`.
    pub(crate) fn service(&self, service: &ServiceLabel) -> ServiceMetrics {
        let class = |c: u8| {
            self.requests
                .get_or_create(&RequestLabels {
                    service: service.clone(),
                    class: Class(c),
                })
                .clone()
        };
        let upstream = |reused: bool| {
            self.upstream
                .get_or_create(&UpstreamLabels {
                    service: service.clone(),
                    reused,
                })
                .clone()
        };
        let only = ServiceOnly {
            service: service.clone(),
        };
        ServiceMetrics {
            classes: [class(1), class(2), class(3), class(4), class(5)],
            latency: self.latency.get_or_create(&only).clone(),
            fresh: upstream(false),
            reused: upstream(true),
            retries: self.retries.get_or_create(&only).clone(),
        }
    }

    /// Registers every metric on `registry` (names get the registry's `netsel_` prefix).
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_proxy_requests",
            "Requests answered by the HTTP proxy, by service and status class",
            self.requests.clone(),
        );
        registry.register(
            "http_proxy_request_duration_seconds",
            "Time from request to response headers, by service",
            self.latency.clone(),
        );
        registry.register(
            "http_proxy_upstream_requests",
            "Requests sent to instances, by whether the connection was reused",
            self.upstream.clone(),
        );
        registry.register(
            "http_proxy_retries",
            "Requests retried on another instance",
            self.retries.clone(),
        );
        registry.register(
            "http_proxy_open_connections",
            "Client connections open on the HTTP proxy",
            self.open_connections.clone(),
        );
        registry.register(
            "http_proxy_hyper_connections",
            "Client connections served by the general (hyper) path instead of the HTTP/1.1 \
             fast path: HTTP/2, upgrades, and requests the fast path does not take",
            self.hyper_connections.clone(),
        );
    }
}
