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
#[cfg(feature = "etcd")]
use crate::store::Cluster as _;
use crate::store::embedded::EmbeddedStore;
use crate::store::{MemoryStore, Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Settings that cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}{hint}", hint = bind_hint(.what, .addr, .source))]
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
    /// The durable store in the data dir could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
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
    /// Consul-compatible API (off unless `consul_addr` is set).
    pub consul: Option<SocketAddr>,
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
            ("consul", self.consul),
        ];
        out.extend(optional.into_iter().filter_map(|(n, a)| a.map(|a| (n, a))));
        out
    }
}

struct Running {
    catalog: Catalog,
    /// The store the server opened itself (from `data_dir`), closed at shutdown.
    owned_store: Option<Arc<dyn Store>>,
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

    /// Uses `store` instead of the in-memory store (and instead of the embedded store that
    /// `settings.data_dir` would open). The server does not close a store given here.
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
        crate::network::check_pool_usable(s.network.vip_cidr).map_err(|reason| {
            ConfigError::Invalid {
                key: "network.vip_cidr",
                reason,
            }
        })?;
        let explicit = self.store.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let explicit_store = explicit.is_some();
        // An explicit store wins; else `data_dir` means the durable embedded store.
        let (store, owned_store): (Arc<dyn Store>, _) = match (explicit, &s.data_dir) {
            (Some(store), _) => (store, None),
            (None, _) if s.store.is_cluster() => (Arc::new(MemoryStore), None),
            (None, Some(dir)) => {
                let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir)?);
                (store.clone(), Some(store))
            }
            (None, None) => (Arc::new(MemoryStore), None),
        };
        #[cfg(feature = "etcd")]
        let mut cluster: Option<(Arc<crate::store::etcd::EtcdCluster>, u64)> = None;
        let catalog = if s.store.is_cluster() && !explicit_store {
            #[cfg(feature = "etcd")]
            {
                let c = crate::store::etcd::EtcdCluster::connect(&s.store).await?;
                let catalog = Catalog::clustered(s.catalog_settings(), c.clone())?;
                // Serve nothing before this node's view holds the whole catalog.
                let revision = c.sync(&catalog).await?;
                tracing::info!(store = %c.describe(), node = %c.node(), revision,
                    services = catalog.snapshot().service_count(),
                    instances = catalog.snapshot().instance_count(), "joined the cluster");
                cluster = Some((c, revision + 1));
                catalog
            }
            #[cfg(not(feature = "etcd"))]
            {
                drop(store);
                return Err(ConfigError::Invalid {
                    key: "store",
                    reason: "this netsel was built without cluster support; build it with \
                             `cargo build --release --features etcd` (needs protoc)"
                        .into(),
                }
                .into());
            }
        } else {
            Catalog::new(s.catalog_settings(), store)?
        };
        // One balancer for both proxies: they share policies and passive ejection.
        let balancer = Arc::new(Balancer::new(catalog.clone(), s.balance.clone()));
        let mut metrics_registry = crate::metrics::new_registry();
        catalog.register_metrics(&mut metrics_registry);
        let line_metrics = crate::registry::RegistryMetrics::new(&mut metrics_registry);

        // Bind every listener first: a conflict fails start-up before anything runs.
        let registry = bind_tcp("registry", s.config.registry_addr).await?;
        let dns_sockets = crate::dns::bind(s.config.dns_addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "dns",
                addr: s.config.dns_addr,
                source,
            })?;
        let dns_metrics = crate::dns::DnsMetrics::default();
        dns_metrics.register(&mut metrics_registry);
        let vip_cidr = s.network.vip_cidr;
        let dns_handler =
            crate::dns::DnsHandler::new(catalog.clone(), &s.dns, vip_cidr, dns_metrics);
        let dns_handler = dns_handler.map_err(|e| ConfigError::Invalid {
            key: "dns.domain",
            reason: e.to_string(),
        })?;
        let api = bind_tcp("api", s.api_addr).await?;
        let consul = match s.consul_addr {
            Some(addr) => Some(bind_tcp("consul", addr).await?),
            None => None,
        };
        let mut bound = BoundAddrs {
            registry: local_addr(&registry, s.config.registry_addr),
            api: Some(local_addr(&api, s.api_addr)),
            dns: Some(dns_sockets.local_addr().unwrap_or(s.config.dns_addr)),
            tcp_proxy: None,
            http_proxy: None,
            consul: None,
        };
        if let (Some(l), Some(addr)) = (&consul, s.consul_addr) {
            bound.consul = Some(local_addr(l, addr));
        }
        // (Each front end binds here and fills in its `bound` field.)
        let http_listener = crate::proxy::http::bind(s.config.http_proxy_addr, &s.http_proxy)
            .map_err(|source| ServerError::Bind {
                what: "http proxy",
                addr: s.config.http_proxy_addr,
                source,
            })?;
        bound.http_proxy = Some(local_addr(&http_listener, s.config.http_proxy_addr));
        let http_proxy = crate::proxy::http::HttpProxy::new(
            s.http_proxy.clone(),
            balancer.clone(),
            s.dns.domain.as_str(),
            Duration::from_secs(s.drain_secs),
        );
        http_proxy.register_metrics(&mut metrics_registry);
        let tcp_gateway = crate::proxy::tcp::bind_gateway(s.config.tcp_proxy_addr, &s.tcp_proxy)
            .map_err(|source| ServerError::Bind {
                what: "tcp proxy",
                addr: s.config.tcp_proxy_addr,
                source,
            })?;
        bound.tcp_proxy = Some(local_addr(&tcp_gateway, s.config.tcp_proxy_addr));
        // Relays drain within the server's own deadline, with a margin to close the rest.
        let tcp_drain = Duration::from_secs(s.tcp_proxy.drain_secs)
            .min(Duration::from_millis(s.drain_secs.saturating_mul(900)));
        let tcp_proxy = TcpProxy::new(
            balancer.clone(),
            s.tcp_proxy.clone(),
            tcp_drain,
            Some(&mut metrics_registry),
        );

        let api_metrics = crate::api::ApiMetrics::new(&mut metrics_registry);
        let metrics = MetricsRegistry::new(std::mem::take(&mut metrics_registry));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn({
            let catalog = catalog.clone();
            let shutdown = shutdown.clone();
            async move { catalog.run(shutdown).await }
        });
        // Subscribed here, before any front end can write, so the audit log misses nothing.
        tasks.spawn(crate::catalog::audit::log_changes(
            catalog.clone(),
            catalog.subscribe(),
            shutdown.clone(),
        ));
        tasks.spawn(crate::health::run(
            catalog.clone(),
            s.health.clone(),
            s.check_interval(),
            shutdown.clone(),
        ));
        tasks.spawn({
            let (catalog, limits, acl, shutdown) = (
                catalog.clone(),
                s.registry.clone(),
                s.acl.clone(),
                shutdown.clone(),
            );
            async move {
                crate::registry::serve_with_acl(
                    registry,
                    catalog,
                    limits,
                    line_metrics,
                    &acl,
                    shutdown,
                )
                .await
            }
        });
        // The dashboard's traffic series: a reader of both proxies' counters.
        let traffic = crate::traffic::Traffic::new(
            catalog.clone(),
            balancer.clone(),
            Some(http_proxy.metric_handles()),
            Some(tcp_proxy.metric_handles()),
            Duration::from_millis(s.api.traffic_interval_ms),
        );
        tasks.spawn(traffic.clone().run(shutdown.clone()));
        let api_state = crate::api::ApiState::new(
            catalog.clone(),
            &s.api,
            &s.acl,
            Some(metrics.clone()),
            shutdown.clone(),
        )
        .with_traffic(traffic)
        .with_dns_domain(s.dns.domain.as_str())
        .with_request_metrics(api_metrics);
        if let (Some(listener), Some(addr)) = (consul, bound.consul) {
            tasks.spawn(crate::api::consul::serve(
                listener,
                api_state.clone(),
                addr,
                shutdown.clone(),
            ));
            tasks.spawn(crate::api::consul::hold_leases(
                catalog.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(crate::api::serve(api, api_state, shutdown.clone()));
        tasks.spawn(crate::dns::serve(
            dns_handler,
            dns_sockets,
            s.dns.clone(),
            shutdown.clone(),
        ));
        // (Each front end spawns its serve task here, on `tasks`, with `shutdown`.)
        tasks.spawn(http_proxy.serve(http_listener, shutdown.clone()));
        tasks.spawn(tcp_proxy.clone().run(Some(tcp_gateway), shutdown.clone()));
        if !s.acl.enabled {
            let open: Vec<String> = [
                ("registry", Some(bound.registry)),
                ("api", bound.api),
                ("consul", bound.consul),
            ]
            .into_iter()
            .filter_map(|(n, a)| a.map(|a| (n, a)))
            .filter(|(_, a)| !a.ip().is_loopback())
            .map(|(n, a)| format!("{n} on {a}"))
            .collect();
            if !open.is_empty() {
                tracing::warn!(listeners = %open.join(", "),
                    "ACLs are off and these listen beyond loopback: anyone who reaches them \
                     can register endpoints for any name and receive its proxied traffic \
                     (turn on [acl], or bind them to loopback; see docs/security.md)");
            }
        }
        let info = crate::model::NodeInfo {
            id: catalog.self_info().id,
            addrs: bound
                .listing()
                .into_iter()
                .map(|(name, addr)| (name.to_string(), addr.to_string()))
                .collect(),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        catalog.set_self_info(info.clone());
        #[cfg(feature = "etcd")]
        if let Some((c, from)) = cluster {
            if let Err(e) = c.announce(info).await {
                shutdown.cancel();
                return Err(e.into());
            }
            c.spawn(Arc::new(catalog.clone()), from, &tasks, shutdown.clone());
        }
        tasks.close();
        let listeners: Vec<String> = bound
            .listing()
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect();
        tracing::info!(
            listeners = %listeners.join(" "),
            store = %catalog.describe_store(),
            index = catalog.index(),
            "NetSel started"
        );
        *self.lock_running() = Some(Running {
            catalog,
            owned_store,
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
            tracing::warn!(
                drain_ms = drain.as_millis() as u64,
                "shutdown deadline passed with work in flight"
            );
        }
        if let Some(store) = running.owned_store {
            // Flush coalesced lease renewals and release the data dir's lock.
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
        drained
    }
}

/// What to do about a listener that cannot be bound: the flag that moves it, and for the
/// seed's DNS port, that 5353 is also where mDNS responders (avahi, systemd-resolved) listen.
fn bind_hint(what: &str, addr: &SocketAddr, e: &std::io::Error) -> String {
    let flag = match what {
        "registry" => "--registry-addr",
        "api" => "--api-addr",
        "dns" => "--dns-addr",
        "http proxy" => "--http-proxy-addr",
        "tcp proxy" => "--tcp-proxy-addr",
        _ => return String::new(),
    };
    match e.kind() {
        std::io::ErrorKind::AddrInUse if what == "dns" && addr.port() == 5353 => format!(
            "; port 5353 is also the mDNS port, which avahi-daemon or systemd-resolved may \
             hold: choose another with {flag} (e.g. {flag} {}:5354)",
            addr.ip()
        ),
        std::io::ErrorKind::AddrInUse => {
            format!("; another process holds it: choose another address with {flag}")
        }
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE: use a higher port with {flag}"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("; no interface of this host has {}: fix {flag}", addr.ip())
        }
        _ => String::new(),
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
