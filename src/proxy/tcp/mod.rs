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
//!
//! Files: [`TcpProxy`] (this file) starts the workers, the gateway and the VIP listeners
//! and drains at shutdown; `connection.rs` serves one connection (accept loop, name line,
//! connection attempts, refusals); `relay.rs` moves the bytes (`splice.rs`: zero-copy
//! `splice` on Linux); [`gateway`] reads the name line; [`vip`] keeps the VIP listeners in
//! step with the catalog; `context.rs` holds the state they share (proxy, worker,
//! listener route); settings are in `settings.rs` and counters in [`metrics`]. No file
//! imports from `mod.rs`, and no two files import each other.

mod connection;
mod context;
pub mod gateway;
pub mod metrics;
mod relay;
mod settings;
#[cfg(target_os = "linux")]
mod splice;
pub mod vip;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::ServiceName;
use crate::proxy::balance::Balancer;
use crate::proxy::listen;
use connection::serve_on_workers;
pub use context::AffectedService;
use context::{OwnAddrs, Route, Shared, VipTable, Worker, WorkerStats};
use metrics::TcpProxyMetrics;
pub use settings::{RelayMode, TcpProxySettings};

/// Backlog of the VIP listeners (a burst of new connections waits here, not refused).
/// Period of each worker's background timer (see `keep_timer_armed`): shorter than the
/// timers connections register, so those never wake the thread.
const TIMER_ARM: Duration = Duration::from_millis(500);

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

/// Binds the gateway listener on `addr`: with `SO_REUSEPORT` when the proxy runs more than
/// one worker, so [`TcpProxy::run`] can give each worker a socket of its own.
pub fn bind_gateway(addr: SocketAddr, settings: &TcpProxySettings) -> io::Result<TcpListener> {
    TcpListener::from_std(listen::bind_first(
        addr,
        crate::sys::worker_threads(settings.workers) > 1,
    )?)
}
