//! The TCP proxy: a gateway on `tcp_proxy_addr` and one listener per `VIP:service-port`.
//!
//! * **Gateway** (the seed's protocol). The client's first line names the service
//!   (`web`, `web.netsel`, `\n` or `\r\n`); from then on bytes flow both ways between the
//!   client and one healthy instance. Bytes that arrived behind the name line are
//!   forwarded first. An unknown service, a service with no healthy instance, instances
//!   that all refuse, a name line that is too long, malformed or late: the client reads
//!   one line `ERROR <reason>\n` and the connection closes.
//! * **VIP listeners** (like a Kubernetes ClusterIP). For every service in the catalog
//!   the proxy listens on `VIP:port` and relays each connection to a healthy instance.
//!   Listeners follow the catalog (see [`vip`]); one that cannot be bound is reported by
//!   [`TcpProxy::affected_services`] and the `netsel_tcp_proxy_vip_bind_failed` gauge.
//!
//! Instances are chosen by the shared [`Balancer`]. A connection attempt that is refused
//! or times out ejects the instance (passive health) and the next one is tried, up to
//! `connect_attempts`, before the client sees anything. An instance whose endpoint is one
//! of the proxy's own listeners is never dialled (it would loop). Relays half-close each
//! direction on its own, end after `idle_timeout_secs` without traffic, and are capped at
//! `max_connections` in total. At shutdown the listeners close at once and relays get up
//! to the drain deadline to finish.

pub mod gateway;
pub mod metrics;
mod relay;
#[cfg(target_os = "linux")]
mod splice;
pub mod vip;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::catalog::{InstanceId, Service, ServiceName};
use crate::config::TcpProxySettings;
use crate::proxy::balance::{Balancer, Pick};
use gateway::GatewayError;
use metrics::{ServiceMetrics, TcpProxyMetrics};

/// Backlog of the VIP listeners (a burst of new connections waits here, not refused).
const LISTEN_BACKLOG: i32 = 4096;
/// How long an error line may take to reach a refused client.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long (and how much) a refused client's unread bytes are drained before closing,
/// so the error line is not lost to a reset.
const ERROR_LINGER: Duration = Duration::from_millis(500);
const ERROR_LINGER_BYTES: u64 = 64 * 1024;

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

/// The TCP proxy. Cheap to clone; clones are the same proxy.
#[derive(Clone)]
pub struct TcpProxy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// Addresses the proxy itself listens on: never dialled as instances.
#[derive(Default)]
struct OwnAddrs {
    exact: HashSet<SocketAddr>,
    /// Ports listened on at `0.0.0.0` / `[::]`: any local address with them loops.
    wildcard_ports: HashSet<u16>,
}

/// VIP listener bookkeeping, for queries.
#[derive(Default)]
struct VipTable {
    open: BTreeMap<ServiceName, SocketAddr>,
    affected: BTreeMap<ServiceName, AffectedService>,
}

struct Shared {
    balancer: Arc<Balancer>,
    settings: TcpProxySettings,
    drain: Duration,
    metrics: TcpProxyMetrics,
    slots: Arc<Semaphore>,
    own: RwLock<OwnAddrs>,
    vips: Mutex<VipTable>,
    /// Every connection task, so drain can wait for them.
    relays: TaskTracker,
    /// Fired when the drain deadline passes: every relay ends.
    force_close: CancellationToken,
}

/// Where an accepted connection goes.
#[derive(Clone, Debug)]
enum Route {
    /// Read a name line first.
    Gateway,
    /// Straight to this service.
    Vip(Arc<VipRoute>),
}

/// A VIP listener's service, with its metric handles looked up once.
#[derive(Debug)]
struct VipRoute {
    service: ServiceName,
    metrics: ServiceMetrics,
}

/// Why no instance could be connected.
enum ConnectError {
    NoHealthyInstance,
    AllFailed,
}

impl TcpProxy {
    /// A proxy balancing with `balancer`. `drain` is the most relays get after shutdown
    /// begins. Its metrics are registered on `registry` when one is given.
    pub fn new(
        balancer: Arc<Balancer>,
        settings: TcpProxySettings,
        drain: Duration,
        registry: Option<&mut Registry>,
    ) -> TcpProxy {
        TcpProxy {
            shared: Arc::new(Shared {
                balancer,
                slots: Arc::new(Semaphore::new(settings.max_connections)),
                settings,
                drain,
                metrics: TcpProxyMetrics::new(registry),
                own: RwLock::new(OwnAddrs::default()),
                vips: Mutex::new(VipTable::default()),
                relays: TaskTracker::new(),
                force_close: CancellationToken::new(),
            }),
        }
    }

    /// Serves the gateway on `gateway` (if given) and the VIP listeners (if enabled) until
    /// `shutdown`; then stops accepting, lets relays finish up to the drain deadline,
    /// closes what is left, and returns.
    pub async fn run(self, gateway: Option<TcpListener>, shutdown: CancellationToken) {
        let shared = self.shared;
        let mut parts = tokio::task::JoinSet::new();
        if let Some(listener) = gateway {
            if let Ok(addr) = listener.local_addr() {
                shared.add_own(addr);
                tracing::info!(%addr, "TCP proxy gateway listening");
            }
            parts.spawn(accept_loop(
                shared.clone(),
                listener,
                Route::Gateway,
                shutdown.clone(),
            ));
        }
        if shared.settings.vip_listeners {
            parts.spawn(vip::run(shared.clone(), shutdown.clone()));
        }
        shutdown.cancelled().await;
        while parts.join_next().await.is_some() {}
        shared.relays.close();
        if !shared.relays.is_empty() {
            tracing::info!(
                connections = shared.relays.len(),
                drain = ?shared.drain,
                "TCP proxy draining"
            );
        }
        if tokio::time::timeout(shared.drain, shared.relays.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = shared.relays.len(),
                "TCP proxy drain deadline passed; closing relays"
            );
            shared.force_close.cancel();
            shared.relays.wait().await;
        }
    }

    /// Services whose `VIP:port` listener could not be bound (retried periodically and on
    /// every catalog change).
    pub fn affected_services(&self) -> Vec<AffectedService> {
        self.shared.lock_vips().affected.values().cloned().collect()
    }

    /// The open VIP listeners, by service.
    pub fn vip_listeners(&self) -> Vec<(ServiceName, SocketAddr)> {
        let t = self.shared.lock_vips();
        t.open.iter().map(|(n, a)| (n.clone(), *a)).collect()
    }

    /// Client connections being handled now (relays and connections still being set up).
    pub fn connections(&self) -> usize {
        self.shared.relays.len()
    }
}

impl Shared {
    fn lock_vips(&self) -> std::sync::MutexGuard<'_, VipTable> {
        self.vips.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_own(&self, addr: SocketAddr) {
        let mut own = self.own.write().unwrap_or_else(|e| e.into_inner());
        if addr.ip().is_unspecified() {
            own.wildcard_ports.insert(addr.port());
        }
        own.exact.insert(addr);
    }

    fn remove_own(&self, addr: SocketAddr) {
        let mut own = self.own.write().unwrap_or_else(|e| e.into_inner());
        if addr.ip().is_unspecified() {
            own.wildcard_ports.remove(&addr.port());
        }
        own.exact.remove(&addr);
    }

    /// Whether dialling `endpoint` would reach one of the proxy's own listeners.
    fn is_own(&self, endpoint: SocketAddr) -> bool {
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        own.exact.contains(&endpoint)
            || (own.wildcard_ports.contains(&endpoint.port())
                && (endpoint.ip().is_loopback() || endpoint.ip().is_unspecified()))
    }

    async fn handle(
        self: Arc<Self>,
        mut client: TcpStream,
        route: Route,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let Some(_permit) = permit else {
            tracing::warn!("TCP proxy connection limit reached; refusing a connection");
            return self
                .refuse(client, &route, GatewayError::TooManyConnections)
                .await;
        };
        let (name, leftover) = match &route {
            Route::Gateway => {
                let read = gateway::read_name_line(
                    &mut client,
                    self.settings.name_line_max,
                    Duration::from_millis(self.settings.name_timeout_ms),
                )
                .await;
                match read {
                    Ok(found) => found,
                    Err(e) => return self.refuse(client, &route, e).await,
                }
            }
            Route::Vip(vip) => (vip.service.clone(), BytesMut::new()),
        };
        let snapshot = self.balancer.catalog().snapshot();
        let Some(svc) = snapshot.service(name.as_str()) else {
            return self
                .refuse(client, &route, GatewayError::Unknown(name))
                .await;
        };
        let metrics = match &route {
            Route::Vip(vip) => vip.metrics.clone(),
            Route::Gateway => self.metrics.service(svc.name.as_str()),
        };
        let (instance, pick) = match self.connect(svc, &metrics).await {
            Ok(c) => c,
            Err(ConnectError::NoHealthyInstance) => {
                let e = GatewayError::NoHealthyInstance(svc.name.clone());
                return self.refuse(client, &route, e).await;
            }
            Err(ConnectError::AllFailed) => {
                let e = GatewayError::ConnectFailed(svc.name.clone());
                return self.refuse(client, &route, e).await;
            }
        };
        drop(snapshot);
        self.relay(client, instance, leftover, &pick, metrics).await;
    }

    /// Connects to a healthy instance of `svc`, trying others when one fails.
    async fn connect(
        &self,
        svc: &Service,
        metrics: &ServiceMetrics,
    ) -> Result<(TcpStream, Pick), ConnectError> {
        let timeout = Duration::from_millis(self.settings.connect_timeout_ms);
        let mut tried: Vec<InstanceId> = Vec::new();
        let mut attempts = 0;
        while attempts < self.settings.connect_attempts {
            let Some(pick) = self.balancer.pick(svc, &tried) else {
                break;
            };
            tried.push(pick.instance.id.clone());
            let endpoint = pick.instance.endpoint;
            if self.is_own(endpoint) {
                tracing::warn!(
                    service = %svc.name,
                    instance = %pick.instance.id,
                    %endpoint,
                    "instance endpoint is one of the proxy's own listeners; not relaying to it"
                );
                continue;
            }
            attempts += 1;
            let error = match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
                Ok(Ok(stream)) => {
                    self.balancer.report_success(&pick);
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, pick));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {timeout:?}"),
            };
            metrics.connect_failures.inc();
            let ejection = self.balancer.report_failure(&pick);
            metrics.ejections.inc();
            tracing::warn!(
                service = %svc.name,
                instance = %pick.instance.id,
                %endpoint,
                %error,
                backoff = ?ejection.backoff,
                failures = ejection.failures,
                "connect to instance failed; ejected"
            );
        }
        if attempts == 0 {
            Err(ConnectError::NoHealthyInstance)
        } else {
            Err(ConnectError::AllFailed)
        }
    }

    async fn relay(
        &self,
        client: TcpStream,
        mut instance: TcpStream,
        leftover: BytesMut,
        pick: &Pick,
        metrics: ServiceMetrics,
    ) {
        let _in_flight = pick.start();
        metrics.connections.inc();
        metrics.active.inc();
        let _active = DecOnDrop(&metrics.active);
        if !leftover.is_empty() {
            if let Err(e) = instance.write_all(&leftover).await {
                tracing::debug!(error = %e, "forwarding the bytes after the name line failed");
                return;
            }
            metrics.to_instance.inc_by(leftover.len() as u64);
        }
        let end = relay::relay(
            client,
            instance,
            &metrics,
            Duration::from_secs(self.settings.idle_timeout_secs),
            self.settings.relay,
            &self.force_close,
        )
        .await;
        match end {
            relay::RelayEnd::Failed(e) => {
                tracing::debug!(instance = %pick.instance.id, error = %e, "relay failed")
            }
            end => tracing::debug!(instance = %pick.instance.id, ?end, "relay ended"),
        }
    }

    /// Closes a connection that gets no relay: gateway clients read `ERROR <reason>\n`
    /// first; VIP clients (whose protocol NetSel does not speak) are just closed.
    async fn refuse(&self, mut client: TcpStream, route: &Route, error: GatewayError) {
        self.metrics.refused(error.reason());
        tracing::debug!(%error, ?route, "connection refused");
        if let Route::Vip(_) = route {
            return;
        }
        let line = format!("ERROR {error}\n");
        let written =
            tokio::time::timeout(ERROR_WRITE_TIMEOUT, client.write_all(line.as_bytes())).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        let _ = client.shutdown().await;
        // Read what the client still sends (briefly) so closing does not reset the
        // connection before it has read the error line.
        let mut sink = tokio::io::sink();
        let mut rest = (&mut client).take(ERROR_LINGER_BYTES);
        let _ = tokio::time::timeout(ERROR_LINGER, tokio::io::copy(&mut rest, &mut sink)).await;
    }
}

struct DecOnDrop<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts on `listener` until `stop`, one task per connection (tracked for drain).
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    route: Route,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => { backoff = Duration::from_millis(5); a }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, ?route, "TCP proxy accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = shared.slots.clone().try_acquire_owned().ok();
        let span = match &route {
            Route::Gateway => tracing::debug_span!("tcp_gateway", %peer),
            Route::Vip(vip) => tracing::debug_span!("tcp_vip", %peer, service = %vip.service),
        };
        shared.relays.spawn(
            shared
                .clone()
                .handle(stream, route.clone(), permit)
                .instrument(span),
        );
    }
}

/// Binds a listener with `SO_REUSEADDR` and a deep backlog.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}
