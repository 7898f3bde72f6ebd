//! The state the proxy's parts share, from the widest to the narrowest: the proxy's own
//! ([`Shared`]: balancer, settings, metrics, connection slots, its own addresses and the
//! VIP listener table), one worker thread's ([`Worker`]: its runtime, relays and counts)
//! and one listener's ([`Route`]: gateway or a VIP's service). `mod.rs`, `vip.rs` and
//! `connection.rs` all take these from here, so no file reaches into `mod.rs` for them.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::{ServiceMetrics, TcpProxyMetrics};
use super::settings::TcpProxySettings;
use crate::catalog::{Service, ServiceName};
use crate::proxy::balance::Balancer;

/// A service whose VIP listener could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffectedService {
    /// The service.
    pub service: ServiceName,
    /// The address that could not be bound.
    pub addr: SocketAddr,
    /// Why (the operating system's message).
    pub error: String,
}

/// Addresses the proxy itself listens on: never dialled as instances.
#[derive(Default)]
pub(super) struct OwnAddrs {
    exact: HashSet<SocketAddr>,
    /// Ports listened on at `0.0.0.0` / `[::]`: any local address with them loops.
    wildcard_ports: HashSet<u16>,
}

/// VIP listener bookkeeping, for queries.
#[derive(Default)]
pub(super) struct VipTable {
    pub(super) open: BTreeMap<ServiceName, SocketAddr>,
    pub(super) affected: BTreeMap<ServiceName, AffectedService>,
}

/// What the proxy, its workers and its connections share.
pub(super) struct Shared {
    pub(super) balancer: Arc<Balancer>,
    pub(super) settings: TcpProxySettings,
    pub(super) drain: Duration,
    pub(super) metrics: TcpProxyMetrics,
    pub(super) slots: Arc<Semaphore>,
    pub(super) own: RwLock<OwnAddrs>,
    pub(super) vips: Mutex<VipTable>,
    /// What each running worker reports (for [`super::TcpProxy::connections`] and
    /// [`super::TcpProxy::accepted_per_worker`]).
    pub(super) worker_stats: RwLock<Vec<WorkerStats>>,
    /// Fired when the drain deadline passes: every relay ends.
    pub(super) force_close: CancellationToken,
}

/// A worker's numbers, readable from any thread.
#[derive(Clone)]
pub(super) struct WorkerStats {
    pub(super) relays: TaskTracker,
    pub(super) accepted: Arc<AtomicU64>,
}

/// One event-loop thread of the proxy: a single-threaded runtime that accepts on its own
/// sockets and connects and relays what it accepted.
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    /// Its runtime (listeners are handed to it here).
    pub(super) handle: tokio::runtime::Handle,
    /// Its connection tasks, so drain can wait for them.
    pub(super) relays: TaskTracker,
    /// Connections it accepted.
    pub(super) accepted: Arc<AtomicU64>,
    /// Its relays end when this fires (a child of the proxy's `force_close`, so relays
    /// wait on a token of their own thread).
    pub(super) force_close: CancellationToken,
}

/// Where an accepted connection goes.
#[derive(Clone, Debug)]
pub(super) enum Route {
    /// Read a name line first.
    Gateway,
    /// Straight to this service.
    Vip(Arc<VipRoute>),
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Gateway => f.write_str("gateway"),
            Route::Vip(v) => write!(f, "VIP of {}", v.service),
        }
    }
}

/// A VIP listener's service, with its metric handles looked up once (per worker).
#[derive(Debug)]
pub(super) struct VipRoute {
    pub(super) service: ServiceName,
    pub(super) metrics: Arc<ServiceMetrics>,
    /// The service as the listener last saw it in the catalog (shared by the workers).
    pub(super) last_seen: Arc<Mutex<Arc<Service>>>,
}

impl VipRoute {
    pub(super) fn last_seen(&self) -> Arc<Service> {
        self.last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Shared {
    pub(super) fn lock_vips(&self) -> std::sync::MutexGuard<'_, VipTable> {
        self.vips.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn add_own(&self, addr: SocketAddr) {
        let mut own = self.own.write().unwrap_or_else(|e| e.into_inner());
        if addr.ip().is_unspecified() {
            own.wildcard_ports.insert(addr.port());
        }
        own.exact.insert(addr);
    }

    pub(super) fn remove_own(&self, addr: SocketAddr) {
        let mut own = self.own.write().unwrap_or_else(|e| e.into_inner());
        if addr.ip().is_unspecified() {
            own.wildcard_ports.remove(&addr.port());
        }
        own.exact.remove(&addr);
    }

    /// Whether dialling `endpoint` would reach one of the proxy's own listeners.
    pub(super) fn is_own(&self, endpoint: SocketAddr) -> bool {
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        own.exact.contains(&endpoint)
            || (own.wildcard_ports.contains(&endpoint.port())
                && (endpoint.ip().is_loopback() || endpoint.ip().is_unspecified()))
    }
}
