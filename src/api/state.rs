//! [`ApiState`], what every handler of the API (and of the Consul-compatible listener)
//! shares: the catalog, settings, ACL, rate limiter, event-stream slots and shutdown.
//! Handlers read its fields directly; they are visible to the `api` module only.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::bucket::RateLimiter;
use super::metrics::ApiMetrics;
use super::settings::ApiSettings;
use crate::acl::{Acl, AclSettings};
use crate::catalog::Catalog;
use crate::metrics::MetricsRegistry;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) catalog: Catalog,
    pub(super) metrics: Option<MetricsRegistry>,
    pub(super) requests: Option<ApiMetrics>,
    pub(super) settings: ApiSettings,
    pub(super) acl: Acl,
    pub(super) limiter: RateLimiter,
    pub(super) streams: Arc<Semaphore>,
    pub(super) shutdown: CancellationToken,
    /// The traffic series, when the server samples its proxies.
    pub(super) traffic: Option<crate::traffic::Traffic>,
    /// The DNS domain without dots (`netsel`), for the names the UI shows.
    pub(super) dns_domain: String,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("settings", &self.inner.settings)
            .field("acl", &self.inner.acl.enabled())
            .finish()
    }
}

impl ApiState {
    /// State over `catalog`. `metrics` is served at `/metrics` when given; `shutdown`
    /// ends blocking queries and event streams, and turns readiness off.
    pub fn new(
        catalog: Catalog,
        settings: &ApiSettings,
        acl: &AclSettings,
        metrics: Option<MetricsRegistry>,
        shutdown: CancellationToken,
    ) -> Self {
        ApiState {
            inner: Arc::new(Inner {
                catalog,
                metrics,
                requests: None,
                settings: settings.clone(),
                acl: Acl::new(acl),
                limiter: RateLimiter::new(settings.rate_limit_per_sec, settings.rate_limit_burst),
                streams: Arc::new(Semaphore::new(settings.max_event_streams)),
                shutdown,
                traffic: None,
                dns_domain: "netsel".into(),
            }),
        }
    }

    fn configure(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("an ApiState is configured before it is cloned")
    }

    /// Serves `traffic` at `/v1/traffic` (without it, the endpoint answers an empty set).
    pub fn with_traffic(mut self, traffic: crate::traffic::Traffic) -> Self {
        self.configure().traffic = Some(traffic);
        self
    }

    /// The DNS domain services are named under (default `netsel`), shown by the UI.
    pub fn with_dns_domain(mut self, domain: &str) -> Self {
        self.configure().dns_domain = domain.trim_matches('.').to_ascii_lowercase();
        self
    }
}

impl ApiState {
    /// Counts and times every request of [`router`](super::router) on `metrics`
    /// (`netsel_api_requests_total`, `netsel_api_request_duration_seconds`). Call before
    /// the state is cloned.
    pub fn with_request_metrics(mut self, metrics: ApiMetrics) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.requests = Some(metrics),
            None => tracing::warn!("API request metrics set on a shared state: ignored"),
        }
        self
    }
}
