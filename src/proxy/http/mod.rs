//! The HTTP proxy: routes each request by its authority to a healthy instance of the
//! service it names.
//!
//! * One port serves HTTP/1.1 (keep-alive) and HTTP/2 over cleartext with prior knowledge
//!   (h2c). Upstream, each instance is spoken to in the protocol it registered: h2c for
//!   [`AppProtocol::Http2`](crate::protocol::AppProtocol::Http2), HTTP/1.1 otherwise.
//! * `Host` (HTTP/1.1) or `:authority` (HTTP/2; it wins when both are present) must be
//!   `NAME` or `NAME.<domain>`, with any port. Unknown names get 404, a service with no
//!   healthy instance 503, failed attempts 502 (504 when they timed out). Only registered
//!   instances are ever connected to: `CONNECT` gets 405 and absolute-form requests for
//!   other hosts 404, so it is never an open proxy.
//! * Tags: `X-Netsel-Tag: TAG`, else a host `TAG.tag.NAME[.<domain>]`, sends a request to
//!   the instances carrying TAG (503 when none is healthy); else the service's
//!   `[http_proxy.splits.NAME]` chooses a tag by weight (`route::tag`).
//! * Bodies stream both ways. HTTP/1.1 `Upgrade` (WebSocket and others) is tunnelled.
//! * Hop-by-hop headers are removed; `X-Forwarded-For`, `-Proto` and `-Host` are added;
//!   `Host` is kept as the client sent it unless `preserve_host = false`.
//! * Instances are picked by the shared [`Balancer`]. A request whose connection could
//!   not be made is retried on another instance; a request without a body and with an
//!   idempotent method is also retried after a reset, within a retry budget.
//! * Limits: header size and count (431), header read, idle and request timeouts, a
//!   connection cap, HTTP/2 stream and reset limits, and 400 for ambiguous framing.
//!
//! # A request's path, file by file
//!
//! 1. **Accept** (`mod.rs`, [`HttpProxy::serve`]): one worker thread per CPU, each with
//!    its own listening socket, `accept::Acceptor`, upstream pool and connections;
//!    `HttpProxy::connection` serves each client connection.
//! 2. **Read a request** (`h1_direct.rs`): every connection starts on the direct path,
//!    which parses HTTP/1.1 heads itself (`httparse`). What it does not take (HTTP/2,
//!    upgrades, ambiguous framing, anything the proxy answers itself...) is handed over
//!    for the rest of the connection: back in `mod.rs`, hyper serves it, reading through
//!    the smuggling guard (`message_framing.rs`), and calls `general::handle` for each
//!    request (`general.rs`).
//! 3. **Route** (`route.rs`): authority → service → tag, for both paths.
//! 4. **Pick and attempt** (`attempts.rs`): the one attempt policy (next instance,
//!    ejection, stale connections, retries and their budget, 502/503/504) that every
//!    path's attempt loop follows; connections come from `pool.rs`. The loops (one per
//!    way of talking to an instance) stay separate so the direct path pays for no
//!    generic machinery; `attempts.rs` says why.
//! 5. **Relay upstream**: the direct path writes the rewritten head (`headers.rs`) and
//!    pumps the body itself; the general path sends through hyper's client
//!    (`general.rs`), or, for bodiless HTTP/2 requests to HTTP/1.1 instances, over raw
//!    sockets (`h2_bodiless.rs`).
//! 6. **Relay the response**: raw HTTP/1.1 responses are read and rewritten by
//!    `h1_upstream.rs` (direct path and `h2_bodiless.rs`); what goes back through hyper
//!    is a `body.rs` body.
//!
//! State shared along the way is in `context.rs` (the proxy's, a worker's, a
//! connection's); settings in `settings.rs`; metrics in `metrics.rs`. No file imports
//! from `mod.rs`, and no two files import each other.

mod attempts;
mod body;
mod context;
mod general;
mod h1_direct;
pub(crate) mod h1_upstream;
mod h2_bodiless;
mod headers;
pub(crate) mod message_framing;
pub(crate) mod metrics;
mod pool;
mod route;
mod settings;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::balance::{Balancer, Split};

use attempts::RetryBudget;
use context::{ConnCtx, Shared, Worker};
use metrics::ProxyMetrics;
use pool::{Pool, PoolSettings};

pub(crate) use h1_direct::HeadReading;
pub use route::TAG_HEADER;
pub use settings::HttpProxySettings;

/// The catalog domain used when no other is configured: `web.netsel` routes to `web`.
pub const DEFAULT_DOMAIN: &str = "netsel";

/// The HTTP proxy. Build with [`HttpProxy::new`], register its metrics, then
/// [`serve`](HttpProxy::serve) a bound listener.
pub struct HttpProxy {
    /// What every worker and connection reads.
    shared: Shared,
    builder: auto::Builder<TokioExecutor>,
    pools: std::sync::Mutex<Vec<Arc<Pool>>>,
    drain: Duration,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProxy")
            .field("settings", &self.shared.settings)
            .field("domain", &self.shared.domain)
            .finish()
    }
}

impl HttpProxy {
    /// A proxy over `balancer`'s catalog. `domain` is the catalog domain without dots
    /// (`netsel`); `drain` bounds how long shutdown waits for requests in flight.
    pub fn new(
        settings: HttpProxySettings,
        balancer: Arc<Balancer>,
        domain: impl Into<String>,
        drain: Duration,
    ) -> Arc<Self> {
        let s = &settings;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(s.header_read_timeout_ms))
            .max_buf_size(s.max_header_bytes.max(8192));
        if s.max_headers != 100 {
            // Only when changed: a custom count moves hyper's header array to the heap.
            builder.http1().max_headers(s.max_headers);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(s.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams(s.h2_max_pending_reset_streams)
            .max_local_error_reset_streams(s.h2_max_local_error_reset_streams)
            // Bounds HEADERS + CONTINUATION too (CONTINUATION-flood protection).
            .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_millis(s.idle_timeout_ms.min(30_000)))
            .keep_alive_timeout(Duration::from_secs(20));
        let mut domain: String = domain.into();
        domain = domain.trim_matches('.').to_ascii_lowercase();
        let splits: HashMap<String, Split> = s
            .splits
            .iter()
            .map(|(name, split)| {
                let tags = split.iter().map(|(t, w)| (t.as_str(), *w));
                (name.to_ascii_lowercase(), Split::new(tags))
            })
            .collect();
        Arc::new(HttpProxy {
            shared: Shared {
                budget: RetryBudget::new(s.retry_budget_percent, s.retry_burst),
                splits,
                settings,
                balancer,
                domain,
                metrics: ProxyMetrics::default(),
                hard_stop: CancellationToken::new(),
            },
            builder,
            pools: std::sync::Mutex::new(Vec::new()),
            drain,
        })
    }

    /// How the fast path reads `buf` as a request head (for the fuzz target).
    pub(crate) fn read_request_head(&self, buf: &[u8]) -> h1_direct::HeadReading {
        h1_direct::read_head(&self.shared, buf)
    }

    /// Registers the proxy's metrics (`netsel_http_proxy_*`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }

    /// The proxy's metric handles, for the traffic sampler to read.
    pub(crate) fn metric_handles(&self) -> ProxyMetrics {
        self.shared.metrics.clone()
    }

    /// Idle upstream HTTP/1.1 connections in the pool.
    pub fn idle_upstream_connections(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.iter().map(|p| p.idle_count()).sum()
    }

    /// Accepts and serves connections until `shutdown`; then stops accepting, lets
    /// requests in flight finish (up to the drain deadline) and returns.
    ///
    /// Connections are served by `workers` threads, each running its own single-threaded
    /// event loop with its own upstream pool: a request and the upstream exchange it
    /// causes stay on one thread, with no cross-thread wake-ups (the nginx model).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let workers = worker_count(&self.shared.settings);
        let slots = Arc::new(Semaphore::new(self.shared.settings.max_connections));
        // The workers stop on `shutdown`, and also if this future is dropped (its runtime
        // shutting down), so no worker thread outlives the server.
        let shutdown = shutdown.child_token();
        let _stop_workers = shutdown.clone().drop_guard();
        let std_listener = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "http proxy: cannot share the listener");
                return;
            }
        };
        // One socket per worker (SO_REUSEPORT when `bind` set it up), so the kernel spreads
        // connections evenly instead of whichever worker wakes first taking most of them.
        let mut listeners =
            crate::proxy::listen::spread_listener(std_listener, workers).into_iter();
        let mut done = Vec::new();
        let placement = crate::proxy::worker::Placement {
            workers,
            pin: self.shared.settings.pin_workers,
            slice: crate::proxy::worker::slice_setting(self.shared.settings.sched_slice_us),
        };
        for n in 0..workers {
            let worker = Arc::new(Worker::new(Arc::new(Pool::new(PoolSettings {
                max_idle_per_instance: self.shared.settings.pool_max_idle_per_instance,
                idle_timeout: Duration::from_millis(self.shared.settings.pool_idle_timeout_ms),
                connect_timeout: Duration::from_millis(self.shared.settings.connect_timeout_ms),
            }))));
            self.pools
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(worker.pool.clone());
            let Some(listener) = listeners.next() else {
                break;
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (proxy, slots, shutdown) = (self.clone(), slots.clone(), shutdown.clone());
            let spawned =
                crate::proxy::worker::spawn(format!("http-proxy-{n}"), n, placement, move |rt| {
                    rt.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => proxy.run_worker(l, worker, slots, shutdown).await,
                            Err(e) => tracing::error!(error = %e, "http proxy: listener"),
                        }
                    });
                    drop(rt);
                    drop(tx);
                });
            match spawned {
                Ok(_) => done.push(rx),
                Err(e) => tracing::error!(error = %e, "http proxy: cannot start a worker thread"),
            }
        }
        drop(listeners);
        for rx in done {
            let _ = rx.await;
        }
    }

    /// One worker: accepts until `shutdown`, then drains its connections.
    async fn run_worker(
        self: Arc<Self>,
        listener: TcpListener,
        worker: Arc<Worker>,
        slots: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let reaper = tokio::spawn({
            let pool = worker.pool.clone();
            let every = Duration::from_millis(self.shared.settings.pool_idle_timeout_ms / 2)
                .max(Duration::from_millis(100));
            let shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => pool.reap(),
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        });
        let mut acceptor = crate::accept::Acceptor::new(listener, "http proxy");
        loop {
            // Accept, then wait for a slot: each worker has its own socket, so a connection
            // waiting in one worker's accept queue must be taken by that worker; a slot freed
            // anywhere then goes to it (a worker without a waiting connection does not hold
            // one). At most one accepted connection per worker waits beyond the cap.
            let Some((stream, peer)) = acceptor.next(&shutdown).await else {
                break;
            };
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let proxy = self.clone();
            let (shutdown, w) = (shutdown.clone(), worker.clone());
            worker
                .tasks
                .spawn(proxy.connection(stream, peer, w, shutdown, permit));
        }
        drop(acceptor);
        worker.start_draining();
        reaper.abort();
        worker.tasks.close();
        if tokio::time::timeout(self.drain, worker.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                drain_ms = self.drain.as_millis() as u64,
                "http proxy: drain deadline passed, closing connections"
            );
            self.shared.hard_stop.cancel();
            worker.tasks.wait().await;
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        worker: Arc<Worker>,
        shutdown: CancellationToken,
        _permit: OwnedSemaphorePermit,
    ) {
        // TCP_NODELAY comes from the listening socket (see `proxy::listen`).
        self.shared.metrics.open_connections.inc();
        let ctx = Arc::new(ConnCtx::new(worker, peer));
        let svc = {
            let proxy = self.clone();
            let ctx = ctx.clone();
            service_fn(move |req| {
                let proxy = proxy.clone();
                let ctx = ctx.clone();
                // Boxed: hyper moves the service's future several times on its way into
                // the stream's task (3.6 KB each time, ~8 % of the h2c path's CPU in
                // memmove); a box is moved as a pointer.
                Box::pin(async move {
                    Ok::<_, Infallible>(general::handle(&proxy.shared, req, ctx).await)
                })
            })
        };
        let mut stream = stream;
        let next = tokio::select! {
            n = h1_direct::serve(&self.shared, &mut stream, &ctx, &shutdown) => n,
            _ = self.shared.hard_stop.cancelled() => h1_direct::Next::Close,
        };
        let pre = match next {
            h1_direct::Next::Close => {
                self.shared.metrics.open_connections.dec();
                return;
            }
            h1_direct::Next::Fallback(pre) => pre,
        };
        // hyper serves the rest of the connection (the general path, `general.rs`), from
        // the request the direct path left.
        self.shared.metrics.hyper_connections.inc();
        ctx.touch();
        let stream = h1_direct::Rewind::new(pre, stream);
        let io = message_framing::Guarded::new(stream, self.shared.settings.max_header_bytes);
        // A client that stops reading its responses is let go after the idle timeout.
        let io = crate::stall::StallGuard::new(
            io,
            Duration::from_millis(self.shared.settings.idle_timeout_ms),
        );
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let idle = Duration::from_millis(self.shared.settings.idle_timeout_ms);
        let mut draining = false;
        loop {
            let idle_at = ctx.idle_deadline(idle);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "http proxy connection ended");
                    }
                    break;
                }
                _ = shutdown.cancelled(), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = self.shared.hard_stop.cancelled() => break,
                _ = tokio::time::sleep_until(idle_at), if !draining => {
                    if ctx.idle_deadline(idle) <= Instant::now() {
                        tracing::debug!(%peer, "http proxy connection idle, closing");
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        }
        self.shared.metrics.open_connections.dec();
    }
}

/// How many worker threads the proxy runs: the setting, else the worker rule
/// ([`crate::sys::worker_threads`]).
fn worker_count(settings: &HttpProxySettings) -> usize {
    crate::sys::worker_threads(settings.workers)
}

/// Binds the proxy's listener on `addr`: with `SO_REUSEPORT` when it runs more than one
/// worker, so [`HttpProxy::serve`] can give each worker a socket of its own.
pub fn bind(
    addr: std::net::SocketAddr,
    settings: &HttpProxySettings,
) -> std::io::Result<TcpListener> {
    TcpListener::from_std(crate::proxy::listen::bind_first(
        addr,
        worker_count(settings) > 1,
    )?)
}
