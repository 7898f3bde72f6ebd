//! `NetSelServer`: binds every listener, starts every part around one catalog, and shuts
//! them down together.
//!
//! All listeners are bound in [`NetSelServer::start`] before any task runs, so a port
//! conflict is reported at once and nothing half-starts. Each part then runs as a tracked
//! task with a shared cancellation token; [`NetSelServer::shutdown`] cancels it and waits
//! up to `drain_secs` for in-flight work.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::{Catalog, CatalogError};
use crate::config::{ConfigError, NetSelConfig, Settings};
use crate::metrics::MetricsRegistry;
use crate::proxy::balance::Balancer;
use crate::proxy::tcp::TcpProxy;
use crate::store::{MemoryStore, Store};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Settings that cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which part.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The catalog or its store could not be opened.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// `start` was called on a server that is running.
    #[error("server is already running")]
    AlreadyRunning,
}

/// The addresses the server actually bound (port 0 becomes a real port). A part that is
/// not running has `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundAddrs {
    /// Registry line protocol.
    pub registry: SocketAddr,
    /// HTTP/JSON API, UI and `/metrics`.
    pub api: Option<SocketAddr>,
    /// DNS (the same port over UDP and TCP).
    pub dns: Option<SocketAddr>,
    /// TCP proxy gateway.
    pub tcp_proxy: Option<SocketAddr>,
    /// HTTP proxy.
    pub http_proxy: Option<SocketAddr>,
}

impl BoundAddrs {
    /// `(name, address)` for every running part, in a fixed order (what `netsel serve`
    /// prints).
    pub fn listing(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = vec![("registry", self.registry)];
        let optional = [
            ("api", self.api),
            ("dns", self.dns),
            ("tcp_proxy", self.tcp_proxy),
            ("http_proxy", self.http_proxy),
        ];
        out.extend(optional.into_iter().filter_map(|(n, a)| a.map(|a| (n, a))));
        out
    }
}

struct Running {
    catalog: Catalog,
    metrics: MetricsRegistry,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    bound: BoundAddrs,
    tcp_proxy: TcpProxy,
}

/// A NetSel server: registry, catalog, and (as they are added) DNS, proxies and API.
///
/// ```no_run
/// use netsel::NetSelServer;
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let server = NetSelServer::new();
///     server.start().await?;
///     tokio::signal::ctrl_c().await?;
///     server.shutdown().await;
///     Ok(())
/// }
/// ```
pub struct NetSelServer {
    settings: Settings,
    store: Mutex<Option<Arc<dyn Store>>>,
    running: Mutex<Option<Running>>,
}

impl Default for NetSelServer {
    fn default() -> Self {
        NetSelServer::new()
    }
}

impl NetSelServer {
    /// A server with the seed's defaults, keeping state in memory.
    pub fn new() -> Self {
        NetSelServer::with_config(NetSelConfig::default())
    }

    /// A server with the seed's configuration struct.
    pub fn with_config(config: NetSelConfig) -> Self {
        NetSelServer::with_settings(Settings::from(config))
    }

    /// A server with full settings.
    pub fn with_settings(settings: Settings) -> Self {
        NetSelServer {
            settings,
            store: Mutex::new(None),
            running: Mutex::new(None),
        }
    }

    /// Uses `store` instead of the in-memory store.
    pub fn with_store(self, store: Arc<dyn Store>) -> Self {
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
        self
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Binds every listener and starts every part, then returns. The server runs until
    /// [`shutdown`](Self::shutdown) (or until the runtime stops).
    pub async fn start(&self) -> Result<(), ServerError> {
        if self.lock_running().is_some() {
            return Err(ServerError::AlreadyRunning);
        }
        let s = &self.settings;
        s.validate()?;
        let store = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::new(MemoryStore));
        let catalog = Catalog::new(s.catalog_settings(), store)?;
        // One balancer for both proxies: they share policies and passive ejection.
        let balancer = Arc::new(Balancer::new(catalog.clone(), s.balance.clone()));
        let mut registry_metrics = crate::metrics::new_registry();

        // Bind every listener first: a conflict fails start-up before anything runs.
        let registry = bind_tcp("registry", s.config.registry_addr).await?;
        let mut bound = BoundAddrs {
            registry: local_addr(&registry, s.config.registry_addr),
            api: None,
            dns: None,
            tcp_proxy: None,
            http_proxy: None,
        };
        // (Each front end binds here and fills in its `bound` field.)
        let tcp_gateway = bind_tcp("tcp proxy", s.config.tcp_proxy_addr).await?;
        bound.tcp_proxy = Some(local_addr(&tcp_gateway, s.config.tcp_proxy_addr));
        // Relays drain within the server's own deadline, with a margin to close the rest.
        let tcp_drain = Duration::from_secs(s.tcp_proxy.drain_secs)
            .min(Duration::from_millis(s.drain_secs.saturating_mul(900)));
        let tcp_proxy = TcpProxy::new(
            balancer.clone(),
            s.tcp_proxy.clone(),
            tcp_drain,
            Some(&mut registry_metrics),
        );

        let metrics = MetricsRegistry::new(std::mem::take(&mut registry_metrics));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn({
            let catalog = catalog.clone();
            let shutdown = shutdown.clone();
            async move { catalog.run(shutdown).await }
        });
        tasks.spawn(crate::registry::serve(
            registry,
            catalog.clone(),
            s.registry.clone(),
            shutdown.clone(),
        ));
        // (Each front end spawns its serve task here, on `tasks`, with `shutdown`.)
        tasks.spawn(tcp_proxy.clone().run(Some(tcp_gateway), shutdown.clone()));
        tasks.close();
        tracing::info!(listeners = ?bound.listing(), store = ?catalog, "NetSel started");
        *self.lock_running() = Some(Running {
            catalog,
            metrics,
            shutdown,
            tasks,
            bound,
            tcp_proxy,
        });
        Ok(())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bound addresses, once started.
    pub fn bound(&self) -> Option<BoundAddrs> {
        self.lock_running().as_ref().map(|r| r.bound.clone())
    }

    /// The catalog, once started.
    pub fn catalog(&self) -> Option<Catalog> {
        self.lock_running().as_ref().map(|r| r.catalog.clone())
    }

    /// The TCP proxy (gateway and VIP listeners), once started.
    pub fn tcp_proxy(&self) -> Option<TcpProxy> {
        self.lock_running().as_ref().map(|r| r.tcp_proxy.clone())
    }

    /// The metrics registry, once started.
    pub fn metrics(&self) -> Option<MetricsRegistry> {
        self.lock_running().as_ref().map(|r| r.metrics.clone())
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain_secs`, and stops
    /// every task. Returns whether everything finished within the deadline.
    pub async fn shutdown(&self) -> bool {
        let Some(running) = self.lock_running().take() else {
            return true;
        };
        running.shutdown.cancel();
        let drain = Duration::from_secs(self.settings.drain_secs);
        let drained = tokio::time::timeout(drain, running.tasks.wait())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(?drain, "shutdown deadline passed with work in flight");
        }
        drained
    }
}

/// Binds a TCP listener, naming the part in the error.
pub(crate) async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}
