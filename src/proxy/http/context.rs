//! The state each layer of the proxy reads, from the widest to the narrowest: the
//! proxy's own ([`Shared`]: settings, balancer, retry budget, metrics), one worker
//! thread's ([`Worker`]: its upstream pool, tasks and metric handles) and one client
//! connection's ([`ConnCtx`]: the client's address and its requests in flight, for the
//! idle timeout). Both request paths take these, so neither reaches into the other or
//! into `mod.rs`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use hyper::header::HeaderValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::attempts::{Attempts, RetryBudget};
use super::metrics::{ProxyMetrics, ServiceLabel, ServiceMetrics};
use super::pool::Pool;
use super::route;
use super::settings::HttpProxySettings;
use crate::catalog::Service;
use crate::proxy::balance::{Balancer, Split};

/// What every worker and connection of one proxy reads.
pub(super) struct Shared {
    pub(super) settings: HttpProxySettings,
    pub(super) balancer: Arc<Balancer>,
    /// The catalog domain, lower case, without dots (`netsel`).
    pub(super) domain: String,
    pub(super) budget: RetryBudget,
    /// `splits`, by canonical service name, ready to choose.
    pub(super) splits: HashMap<String, Split>,
    pub(super) metrics: ProxyMetrics,
    /// Cancelled when the drain deadline has passed: everything still open is dropped.
    pub(super) hard_stop: CancellationToken,
}

impl Shared {
    /// The service `target` names (or the default service): see [`route::service`].
    pub(super) fn lookup(
        &self,
        target: Option<&route::Target>,
    ) -> Result<Arc<Service>, (StatusCode, String)> {
        route::service(
            &self.balancer,
            self.settings.default_service.as_deref(),
            target,
        )
    }

    /// The tag a request for `svc` goes to: see [`route::tag`].
    pub(super) fn route_tag<'p>(
        &'p self,
        svc: &Service,
        named: Option<&str>,
    ) -> Result<Option<Cow<'p, str>>, String> {
        route::tag(&self.balancer, &self.splits, svc, named)
    }

    /// One request's attempts at `svc`'s instances (of `tag`, or all).
    pub(super) fn attempts<'a>(
        &'a self,
        svc: &'a Arc<Service>,
        label: &'a ServiceMetrics,
        tag: Option<&'a str>,
    ) -> Attempts<'a> {
        Attempts::new(
            &self.balancer,
            &self.budget,
            self.settings.max_retries,
            svc,
            label,
            tag,
        )
    }
}

/// One proxy thread's own state.
pub(super) struct Worker {
    /// Upstream connections made from this thread.
    pub(super) pool: Arc<Pool>,
    /// Client connections and tunnels on this thread.
    pub(super) tasks: TaskTracker,
    /// Metric handles by service, for this thread.
    metrics: std::sync::Mutex<HashMap<ServiceLabel, Arc<ServiceMetrics>>>,
    /// Set once the worker stops accepting: connections close after their request.
    draining: AtomicBool,
}

impl Worker {
    pub(super) fn new(pool: Arc<Pool>) -> Self {
        Worker {
            pool,
            tasks: TaskTracker::new(),
            metrics: Default::default(),
            draining: Default::default(),
        }
    }

    pub(super) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The worker stopped accepting: connections close after their request.
    pub(super) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(super) fn metrics(&self, all: &ProxyMetrics, service: ServiceLabel) -> Arc<ServiceMetrics> {
        let mut cache = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(&service) {
            return m.clone();
        }
        if cache.len() >= 4096 {
            cache.clear(); // services come and go; keep the cache bounded
        }
        let m = Arc::new(all.service(&service));
        cache.insert(service, m.clone());
        m
    }
}

/// What a client connection knows about itself.
pub(crate) struct ConnCtx {
    pub(super) worker: Arc<Worker>,
    pub(super) client_ip: HeaderValue,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the last request ended.
    last_end_ms: AtomicU64,
    born: Instant,
}

impl ConnCtx {
    pub(super) fn new(worker: Arc<Worker>, peer: SocketAddr) -> Self {
        ConnCtx {
            worker,
            client_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    pub(super) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn end_request(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_end_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Counts the connection as idle from now.
    pub(super) fn touch(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_end_ms.store(now, Ordering::Relaxed);
    }

    /// When the connection will have been idle for `idle`, if nothing happens first.
    pub(super) fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        self.born + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Marks a request in flight on a client connection (for the idle timeout) until dropped.
pub(crate) struct InFlight(Arc<ConnCtx>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}
