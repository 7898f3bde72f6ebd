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
//! Connections are served by `workers` threads, each a single-threaded event loop with its
//! own listening socket per address (`SO_REUSEPORT`, so the kernel spreads new connections
//! over the workers): a connection is accepted, connected and relayed on one thread, with
//! no cross-thread wake-up.
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
mod settings;
#[cfg(target_os = "linux")]
mod splice;
pub mod vip;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::catalog::{InstanceId, Service, ServiceName};
use crate::proxy::balance::{Balancer, Pick};
use crate::proxy::listen;
use gateway::GatewayError;
use metrics::{ServiceMetrics, TcpProxyMetrics};
pub use settings::{RelayMode, TcpProxySettings};

/// Backlog of the VIP listeners (a burst of new connections waits here, not refused).
/// Period of each worker's background timer (see `keep_timer_armed`): shorter than the
/// timers connections register, so those never wake the thread.
const TIMER_ARM: Duration = Duration::from_millis(500);
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
    /// What each running worker reports (for [`TcpProxy::connections`] and
    /// [`TcpProxy::accepted_per_worker`]).
    worker_stats: RwLock<Vec<WorkerStats>>,
    /// Fired when the drain deadline passes: every relay ends.
    force_close: CancellationToken,
}

/// A worker's numbers, readable from any thread.
#[derive(Clone)]
struct WorkerStats {
    relays: TaskTracker,
    accepted: Arc<AtomicU64>,
}

/// One event-loop thread of the proxy: a single-threaded runtime that accepts on its own
/// sockets and connects and relays what it accepted.
struct Worker {
    shared: Arc<Shared>,
    /// Its runtime (listeners are handed to it here).
    handle: tokio::runtime::Handle,
    /// Its connection tasks, so drain can wait for them.
    relays: TaskTracker,
    /// Connections it accepted.
    accepted: Arc<AtomicU64>,
    /// Its relays end when this fires (a child of the proxy's `force_close`, so relays
    /// wait on a token of their own thread).
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
struct VipRoute {
    service: ServiceName,
    metrics: Arc<ServiceMetrics>,
    /// The service as the listener last saw it in the catalog (shared by the workers).
    last_seen: Arc<Mutex<Arc<Service>>>,
}

impl VipRoute {
    fn last_seen(&self) -> Arc<Service> {
        self.last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why no instance could be connected.
enum ConnectError {
    NoHealthyInstance,
    AllFailed,
}

impl TcpProxy {
    /// A proxy balancing with `balancer`. `drain` is the most relays get after shutdown
    /// begins. Its metrics are registered on `metrics_registry` when one is given.
    pub fn new(
        balancer: Arc<Balancer>,
        settings: TcpProxySettings,
        drain: Duration,
        metrics_registry: Option<&mut Registry>,
    ) -> TcpProxy {
        TcpProxy {
            shared: Arc::new(Shared {
                balancer,
                slots: Arc::new(Semaphore::new(settings.max_connections)),
                settings,
                drain,
                metrics: TcpProxyMetrics::new(metrics_registry),
                own: RwLock::new(OwnAddrs::default()),
                vips: Mutex::new(VipTable::default()),
                worker_stats: RwLock::new(Vec::new()),
                force_close: CancellationToken::new(),
            }),
        }
    }

    /// Serves the gateway on `gateway` (if given) and the VIP listeners (if enabled) until
    /// `shutdown`; then stops accepting, lets relays finish up to the drain deadline,
    /// closes what is left, and returns.
    pub async fn run(self, gateway: Option<TcpListener>, shutdown: CancellationToken) {
        let shared = self.shared;
        // The worker threads stop once this returns, or if this future is dropped.
        let stop_workers = CancellationToken::new();
        let _stop_workers = stop_workers.clone().drop_guard();
        let (workers, stopped) = start_workers(&shared, &stop_workers).await;
        *shared
            .worker_stats
            .write()
            .unwrap_or_else(|e| e.into_inner()) = workers
            .iter()
            .map(|w| WorkerStats {
                relays: w.relays.clone(),
                accepted: w.accepted.clone(),
            })
            .collect();
        let mut accepting = Vec::new();
        if let Some(listener) = gateway {
            let addr = listener.local_addr();
            if let Ok(addr) = addr {
                shared.add_own(addr);
            }
            match listener.into_std() {
                Ok(first) => {
                    let listeners = listen::spread_listener(first, workers.len());
                    let addr = addr.map_or_else(|_| "?".to_string(), |a| a.to_string());
                    tracing::info!(
                        %addr,
                        sockets = listeners.len(),
                        "TCP proxy gateway listening"
                    );
                    accepting =
                        serve_on_workers(&workers, listeners, |_| Route::Gateway, &shutdown);
                }
                Err(e) => tracing::error!(error = %e, "TCP proxy: cannot use the gateway listener"),
            }
        }
        let vips = shared
            .settings
            .vip_listeners
            .then(|| tokio::spawn(vip::run(shared.clone(), workers.clone(), shutdown.clone())));
        shutdown.cancelled().await;
        for task in accepting {
            let _ = task.await;
        }
        if let Some(vips) = vips {
            let _ = vips.await;
        }
        for w in &workers {
            w.relays.close();
        }
        let open: usize = workers.iter().map(|w| w.relays.len()).sum();
        if open > 0 {
            tracing::info!(
                connections = open,
                drain_ms = shared.drain.as_millis() as u64,
                "TCP proxy draining"
            );
        }
        let all_done = async {
            for w in &workers {
                w.relays.wait().await;
            }
        };
        if tokio::time::timeout(shared.drain, all_done).await.is_err() {
            let open: usize = workers.iter().map(|w| w.relays.len()).sum();
            tracing::warn!(
                connections = open,
                "TCP proxy drain deadline passed; closing relays"
            );
            shared.force_close.cancel();
            for w in &workers {
                w.relays.wait().await;
            }
        }
        drop(workers);
        stop_workers.cancel();
        for rx in stopped {
            let _ = rx.await;
        }
    }

    /// Services whose `VIP:port` listener could not be bound (retried periodically and on
    /// every catalog change).
    pub fn affected_services(&self) -> Vec<AffectedService> {
        self.shared.lock_vips().affected.values().cloned().collect()
    }

    /// The proxy's metric handles, for the traffic sampler to read.
    pub(crate) fn metric_handles(&self) -> TcpProxyMetrics {
        self.shared.metrics.clone()
    }

    /// The open VIP listeners, by service.
    pub fn vip_listeners(&self) -> Vec<(ServiceName, SocketAddr)> {
        let t = self.shared.lock_vips();
        t.open.iter().map(|(n, a)| (n.clone(), *a)).collect()
    }

    /// Client connections being handled now (relays and connections still being set up).
    pub fn connections(&self) -> usize {
        let stats = self.shared.worker_stats.read();
        let stats = stats.unwrap_or_else(|e| e.into_inner());
        stats.iter().map(|w| w.relays.len()).sum()
    }

    /// Connections accepted so far by each worker thread (gateway and VIP listeners
    /// together); empty until the proxy runs.
    pub fn accepted_per_worker(&self) -> Vec<u64> {
        let stats = self.shared.worker_stats.read();
        let stats = stats.unwrap_or_else(|e| e.into_inner());
        stats
            .iter()
            .map(|w| w.accepted.load(Ordering::Relaxed))
            .collect()
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
        &self,
        mut client: TcpStream,
        route: Route,
        permit: Option<OwnedSemaphorePermit>,
        force_close: &CancellationToken,
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
        let svc: Arc<Service> = match (snapshot.service(name.as_str()), &route) {
            (Some(svc), _) => svc.clone(),
            // Accepted by a VIP listener just before its service left the catalog: relay
            // to the instances the listener last knew.
            (None, Route::Vip(vip)) => vip.last_seen(),
            (None, Route::Gateway) => {
                drop(snapshot);
                return self
                    .refuse(client, &route, GatewayError::Unknown(name))
                    .await;
            }
        };
        // Relays may run for hours: they must not pin old catalog versions.
        drop(snapshot);
        let svc = &svc;
        let metrics = match &route {
            Route::Vip(vip) => vip.metrics.clone(),
            Route::Gateway => Arc::new(self.metrics.service(svc.name.as_str())),
        };
        let mut tried: Vec<InstanceId> = Vec::new();
        let mut attempts = 0;
        let mut first = true;
        loop {
            let connected = self.connect(svc, &metrics, &mut tried, &mut attempts).await;
            let (instance, pick) = match connected {
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
            if first {
                // Counted once, whichever instance ends up relaying.
                metrics.connections.inc();
                metrics.to_instance.inc_by(leftover.len() as u64);
                first = false;
            }
            let end = self
                .relay(
                    &mut client,
                    instance,
                    &leftover,
                    &pick,
                    &metrics,
                    force_close,
                )
                .await;
            // The instance reset the connection before a byte moved either way (it died
            // with the connection in its backlog): nobody saw anything, so it counts as
            // a failed connection attempt and the next instance is tried. Not when bytes
            // after a name line went out first: that instance may have acted on them.
            if !matches!(end, relay::RelayEnd::InstanceReset) || !leftover.is_empty() {
                return;
            }
            self.connect_failed(svc, &metrics, &pick, "reset before any byte moved");
        }
    }

    /// Connects to a healthy instance of `svc` not in `tried`, trying others when one
    /// fails, until `attempts` reaches the limit.
    async fn connect(
        &self,
        svc: &Arc<Service>,
        metrics: &ServiceMetrics,
        tried: &mut Vec<InstanceId>,
        attempts: &mut usize,
    ) -> Result<(TcpStream, Pick), ConnectError> {
        let timeout = Duration::from_millis(self.settings.connect_timeout_ms);
        while *attempts < self.settings.connect_attempts {
            let Some(pick) = self.balancer.pick(svc, tried) else {
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
            *attempts += 1;
            let error = match tokio::time::timeout(timeout, connect_to(endpoint)).await {
                Ok(Ok(stream)) => {
                    self.balancer.report_success(&pick);
                    return Ok((stream, pick));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {timeout:?}"),
            };
            self.connect_failed(svc, metrics, &pick, &error);
        }
        if *attempts == 0 {
            Err(ConnectError::NoHealthyInstance)
        } else {
            Err(ConnectError::AllFailed)
        }
    }

    /// Counts a failed attempt on `pick` and ejects it.
    fn connect_failed(&self, svc: &Service, metrics: &ServiceMetrics, pick: &Pick, error: &str) {
        metrics.connect_failures.inc();
        let ejection = self.balancer.report_failure(pick);
        metrics.ejections.inc();
        tracing::warn!(
            service = %svc.name,
            instance = %pick.instance.id,
            endpoint = %pick.instance.endpoint,
            %error,
            backoff = ?ejection.backoff,
            failures = ejection.failures,
            "connect to instance failed; ejected"
        );
    }

    async fn relay(
        &self,
        client: &mut TcpStream,
        mut instance: TcpStream,
        leftover: &[u8],
        pick: &Pick,
        metrics: &ServiceMetrics,
        force_close: &CancellationToken,
    ) -> relay::RelayEnd {
        let _in_flight = pick.start();
        metrics.active.inc();
        let _active = DecOnDrop(&metrics.active);
        if !leftover.is_empty()
            && let Err(e) = instance.write_all(leftover).await
        {
            tracing::debug!(error = %e, "forwarding the bytes after the name line failed");
            return relay::RelayEnd::Failed(e);
        }
        let end = relay::relay(
            client,
            &mut instance,
            metrics,
            Duration::from_secs(self.settings.idle_timeout_secs),
            self.settings.relay,
            force_close,
        )
        .await;
        match &end {
            relay::RelayEnd::InstanceReset => return end,
            relay::RelayEnd::Failed(e) => {
                tracing::debug!(instance = %pick.instance.id, error = %e, "relay failed")
            }
            end => tracing::debug!(instance = %pick.instance.id, end = %end, "relay ended"),
        }
        end
    }

    /// Closes a connection that gets no relay: gateway clients read `ERROR <reason>\n`
    /// first; VIP clients (whose protocol NetSel does not speak) are just closed.
    async fn refuse(&self, mut client: TcpStream, route: &Route, error: GatewayError) {
        self.metrics.refused(error.reason());
        tracing::debug!(%error, %route, "connection refused");
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

/// Accepts on `listener` until `stop`, one task per connection (tracked for drain), on
/// the worker's own thread.
async fn accept_loop(
    worker: Arc<Worker>,
    listener: std::net::TcpListener,
    route: Route,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, %route, "TCP proxy: cannot register a listener");
            return;
        }
    };
    let start = |stream: TcpStream, peer: SocketAddr| {
        worker.accepted.fetch_add(1, Ordering::Relaxed);
        // TCP_NODELAY comes from the listening socket (see `listen`).
        let permit = worker.shared.slots.clone().try_acquire_owned().ok();
        let span = match &route {
            Route::Gateway => tracing::debug_span!("tcp_gateway", %peer),
            Route::Vip(vip) => tracing::debug_span!("tcp_vip", %peer, service = %vip.service),
        };
        let (w, route) = (worker.clone(), route.clone());
        worker.relays.spawn(
            async move { w.shared.handle(stream, route, permit, &w.force_close).await }
                .instrument(span),
        );
    };
    let mut acceptor = crate::accept::Acceptor::new(listener, format!("tcp proxy {route}"));
    while let Some((stream, peer)) = acceptor.next(&stop).await {
        start(stream, peer);
    }
    // Connections the kernel completed before the stop are served, not reset by closing
    // the socket (clients connecting to a VIP as its service is deregistered). Accepted
    // straight from the socket: the event loop may not have seen them yet.
    let socket = SockRef::from(acceptor.listener());
    while let Ok((s, peer)) = socket.accept() {
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        if s.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(stream) = TcpStream::from_std(std::net::TcpStream::from(s)) {
            start(stream, peer);
        }
    }
}

/// Connects to `endpoint` with a non-blocking socket (`TCP_NODELAY` set before the
/// handshake); the connection is up once the socket turns writable without an error, so
/// `SO_ERROR` is only read when the kernel flags one.
async fn connect_to(endpoint: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(endpoint),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&endpoint.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Starts the worker threads, each running a single-threaded runtime until `stop`.
/// Returns the workers and one receiver per thread that resolves when it has ended. If no
/// thread can be started, the calling runtime serves as the only worker.
async fn start_workers(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> (Vec<Arc<Worker>>, Vec<tokio::sync::oneshot::Receiver<()>>) {
    let wanted = crate::sys::worker_threads(shared.settings.workers);
    let mut workers = Vec::with_capacity(wanted);
    let mut stopped = Vec::with_capacity(wanted);
    for n in 0..wanted {
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = stop.clone();
        let placement = crate::proxy::worker::Placement {
            workers: wanted,
            pin: shared.settings.pin_workers,
            slice: crate::proxy::worker::slice_setting(shared.settings.sched_slice_us),
        };
        let spawned =
            crate::proxy::worker::spawn(format!("tcp-proxy-{n}"), n, placement, move |rt| {
                if handle_tx.send(rt.handle().clone()).is_ok() {
                    rt.block_on(keep_timer_armed(stop));
                }
                drop(rt);
                drop(done_tx);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "TCP proxy: cannot start a worker thread");
            break;
        }
        let Ok(handle) = handle_rx.await else {
            break;
        };
        workers.push(Arc::new(Worker {
            shared: shared.clone(),
            handle,
            relays: TaskTracker::new(),
            accepted: Arc::default(),
            force_close: shared.force_close.child_token(),
        }));
        stopped.push(done_rx);
    }
    if workers.is_empty() {
        workers.push(Arc::new(Worker {
            shared: shared.clone(),
            handle: tokio::runtime::Handle::current(),
            relays: TaskTracker::new(),
            accepted: Arc::default(),
            force_close: shared.force_close.child_token(),
        }));
    }
    tracing::debug!(workers = workers.len(), "TCP proxy workers started");
    (workers, stopped)
}

/// Waits for `stop`, keeping a timer due within [`TIMER_ARM`] all the while.
///
/// Tokio's timer wakes its thread through an eventfd `write` whenever a new timer is due
/// before every timer it already has, even when registered from that very thread. Each
/// connection registers two (connect timeout, idle watch), so without an earlier timer
/// about every other connection paid a `write` and an extra event-loop turn; with this
/// one always earlier, none does.
async fn keep_timer_armed(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TIMER_ARM);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}

/// Starts one accept loop per listener, listener `i` on worker `i`.
fn serve_on_workers(
    workers: &[Arc<Worker>],
    listeners: Vec<std::net::TcpListener>,
    route: impl Fn(&Worker) -> Route,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    workers
        .iter()
        .zip(listeners)
        .map(|(w, l)| {
            let task = accept_loop(w.clone(), l, route(w), stop.clone());
            w.handle.spawn(task)
        })
        .collect()
}

/// Binds the gateway listener on `addr`: with `SO_REUSEPORT` when the proxy runs more than
/// one worker, so [`TcpProxy::run`] can give each worker a socket of its own.
pub fn bind_gateway(addr: SocketAddr, settings: &TcpProxySettings) -> io::Result<TcpListener> {
    TcpListener::from_std(listen::bind_first(
        addr,
        crate::sys::worker_threads(settings.workers) > 1,
    )?)
}
