//! The HTTP proxy: routes each request by its authority to a healthy instance of the
//! service it names.
//!
//! * One port serves HTTP/1.1 (keep-alive) and HTTP/2 over cleartext with prior knowledge
//!   (h2c). Upstream, each instance is spoken to in the protocol it registered: h2c for
//!   [`AppProtocol::Http2`], HTTP/1.1 otherwise.
//! * `Host` (HTTP/1.1) or `:authority` (HTTP/2; it wins when both are present) must be
//!   `NAME` or `NAME.<domain>`, with any port. Unknown names get 404, a service with no
//!   healthy instance 503, failed attempts 502 (504 when they timed out). Only registered
//!   instances are ever connected to: `CONNECT` gets 405 and absolute-form requests for
//!   other hosts 404, so it is never an open proxy.
//! * Tags: `X-Netsel-Tag: TAG`, else a host `TAG.tag.NAME[.<domain>]`, sends a request to
//!   the instances carrying TAG (503 when none is healthy); else the service's
//!   `[http_proxy.splits.NAME]` chooses a tag by weight (`HttpProxy::route_tag`).
//! * Bodies stream both ways. HTTP/1.1 `Upgrade` (WebSocket and others) is tunnelled.
//! * Hop-by-hop headers are removed; `X-Forwarded-For`, `-Proto` and `-Host` are added;
//!   `Host` is kept as the client sent it unless `preserve_host = false`.
//! * Instances are picked by the shared [`Balancer`]. A request whose connection could
//!   not be made is retried on another instance; a request without a body and with an
//!   idempotent method is also retried after a reset, within a retry budget.
//! * Limits: header size and count (431), header read, idle and request timeouts, a
//!   connection cap, HTTP/2 stream and reset limits, and 400 for ambiguous framing.
//!
//! Two paths serve clients. Every connection starts on the HTTP/1.1 fast path
//! (`fast.rs`): plain keep-alive requests proxied by the connection's own task over raw
//! pooled sockets. Anything it does not take (HTTP/2, upgrades, ambiguous framing, errors
//! the proxy answers itself...) hands the connection to the general hyper path below,
//! with the bytes already read replayed, so every refusal comes from one place.

mod attempts;
mod bridge;
pub(crate) mod fast;
pub(crate) mod framing;
mod headers;
pub(crate) mod metrics;
mod route;
mod upstream;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::{Body as _, Incoming};
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, TRANSFER_ENCODING,
};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Service;
use crate::protocol::AppProtocol;
use crate::proxy::balance::{Balancer, Split, Subset};

use attempts::Attempts;
use metrics::{ProxyMetrics, ServiceLabel, ServiceMetrics};
use upstream::ResponseBody;
use upstream::{Hold, InFlight, Pool, PoolSettings, UpBody};

/// The request header naming the tag whose instances a request goes to.
pub const TAG_HEADER: &str = "x-netsel-tag";

/// The catalog domain used when no other is configured: `web.netsel` routes to `web`.
pub const DEFAULT_DOMAIN: &str = "netsel";

/// `[http_proxy]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpProxySettings {
    /// Proxy threads, each with its own event loop, connections and upstream pool
    /// (like nginx workers); 0 means one per CPU. Default 0.
    pub workers: usize,
    /// With at least as many workers as CPUs, bind worker `n` to the `n`-th CPU the
    /// process may use, so each stays on its own. Default true.
    pub pin_workers: bool,
    /// The time slice each worker asks the scheduler for, in microseconds (Linux 6.12 and
    /// later; `sched_setattr`): a short one lets a worker that wakes up run sooner and
    /// hands the CPU back sooner to the clients and instances sharing it. 0 leaves the
    /// kernel's default. Default 100 (the shortest the kernel takes).
    pub sched_slice_us: u64,
    /// Most client connections open at once; further clients wait in the listen backlog.
    /// Default 10000.
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes; larger gets 431.
    /// At least 8192. Default 65536.
    pub max_header_bytes: usize,
    /// Most request headers; more gets 431. Default 100.
    pub max_headers: usize,
    /// Milliseconds a client has to send a complete request head (against slowloris).
    /// An HTTP/1.1 connection waiting for its next request also closes after this long.
    /// Default 30000.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a client connection may sit with no request in flight. Default 60000.
    pub idle_timeout_ms: u64,
    /// Milliseconds from a request to its response headers, retries included; past it
    /// the client gets 504. Default 60000.
    pub request_timeout_ms: u64,
    /// Milliseconds to connect to an instance before trying another. Default 2000.
    pub connect_timeout_ms: u64,
    /// HTTP/2: concurrent streams per client connection. Default 256.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: streams reset by the client before we accepted them, before the
    /// connection is closed (rapid-reset protection). Default 20.
    pub h2_max_pending_reset_streams: usize,
    /// HTTP/2: streams we had to reset because of client errors, before the connection
    /// is closed ("MadeYouReset" protection). Default 256.
    pub h2_max_local_error_reset_streams: usize,
    /// Retries of one request after a reset (connection failures are always retried on
    /// another instance while one is left). Default 2.
    pub max_retries: u32,
    /// Retries allowed, in percent of requests, over a burst of `retry_burst`. Default 20.
    pub retry_budget_percent: u32,
    /// Retries allowed at once before the budget refills. Default 50.
    pub retry_burst: u32,
    /// Send instances the `Host` the client sent (else the instance's address).
    /// Default true.
    pub preserve_host: bool,
    /// Idle HTTP/1.1 connections kept per instance, per worker. HTTP/2 clients
    /// multiplex many requests, each needing its own HTTP/1.1 connection upstream, so
    /// this is generous. Default 1024.
    pub pool_max_idle_per_instance: usize,
    /// Milliseconds an idle upstream connection is kept. Default 90000.
    pub pool_idle_timeout_ms: u64,
    /// Service for requests whose host names no service (an IP address, say). Unset:
    /// such requests get 404. Absolute-form requests are never routed here.
    pub default_service: Option<String>,
    /// Per-service traffic splits between tags, by weight: `[http_proxy.splits.web]`
    /// `v1 = 95`, `canary = 5`. Applied to requests that name no tag (see
    /// docs/http-proxy.md, "Tags"). Default none.
    pub splits: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Default for HttpProxySettings {
    fn default() -> Self {
        HttpProxySettings {
            workers: 0,
            pin_workers: true,
            sched_slice_us: 100,
            max_connections: 10_000,
            max_header_bytes: 65_536,
            max_headers: 100,
            header_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 60_000,
            connect_timeout_ms: 2_000,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            max_retries: 2,
            retry_budget_percent: 20,
            retry_burst: 50,
            preserve_host: true,
            pool_max_idle_per_instance: 1024,
            pool_idle_timeout_ms: 90_000,
            default_service: None,
            splits: BTreeMap::new(),
        }
    }
}

impl HttpProxySettings {
    /// Checks that the settings can work: `Err((key, reason))` otherwise.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |key, reason: &str| Err((key, reason.to_string()));
        if self.workers > 1024 {
            return bad("http_proxy.workers", "must be 0..=1024");
        }
        if !crate::proxy::worker::valid_slice_setting(self.sched_slice_us) {
            return bad("http_proxy.sched_slice_us", "must be 0 or 100..=100000");
        }
        if self.max_connections == 0 {
            return bad("http_proxy.max_connections", "must be at least 1");
        }
        if self.max_header_bytes < 8192 || self.max_header_bytes > 1 << 24 {
            return bad("http_proxy.max_header_bytes", "must be 8192..=16777216");
        }
        if self.max_headers == 0 || self.max_headers > 10_000 {
            return bad("http_proxy.max_headers", "must be 1..=10000");
        }
        for (key, v) in [
            (
                "http_proxy.header_read_timeout_ms",
                self.header_read_timeout_ms,
            ),
            ("http_proxy.idle_timeout_ms", self.idle_timeout_ms),
            ("http_proxy.request_timeout_ms", self.request_timeout_ms),
            ("http_proxy.connect_timeout_ms", self.connect_timeout_ms),
            ("http_proxy.pool_idle_timeout_ms", self.pool_idle_timeout_ms),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1 ms");
            }
        }
        if self.h2_max_concurrent_streams == 0 {
            return bad("http_proxy.h2_max_concurrent_streams", "must be at least 1");
        }
        if self.retry_budget_percent > 100 {
            return bad("http_proxy.retry_budget_percent", "must be 0..=100");
        }
        if let Some(name) = &self.default_service
            && crate::catalog::ServiceName::new(name).is_err()
        {
            return bad("http_proxy.default_service", "is not a valid service name");
        }
        for (service, split) in &self.splits {
            let bad = |reason: String| Err(("http_proxy.splits", reason));
            if crate::catalog::ServiceName::new(service).is_err() {
                return bad(format!("'{service}' is not a valid service name"));
            }
            if split.is_empty() {
                return bad(format!("{service}: names no tag (tag = weight, ...)"));
            }
            if split.len() > crate::proxy::balance::MAX_SPLIT_TAGS {
                return bad(format!(
                    "{service}: at most {} tags",
                    crate::proxy::balance::MAX_SPLIT_TAGS
                ));
            }
            for (n, (tag, weight)) in split.iter().enumerate() {
                if tag.is_empty() {
                    return bad(format!("{service}: a tag is empty"));
                }
                if *weight == 0 {
                    return bad(format!("{service}.{tag}: weight must be at least 1"));
                }
                if split.keys().take(n).any(|t| t.eq_ignore_ascii_case(tag)) {
                    return bad(format!(
                        "{service}.{tag}: tags match case-insensitively, so this one is listed twice"
                    ));
                }
            }
            let key_twice = self
                .splits
                .keys()
                .filter(|k| k.eq_ignore_ascii_case(service))
                .count()
                > 1;
            if key_twice {
                return bad(format!(
                    "{service}: service listed twice (names are case-insensitive)"
                ));
            }
        }
        Ok(())
    }
}

/// What a client connection knows about itself.
pub(crate) struct ConnCtx {
    worker: Arc<Worker>,
    client_ip: HeaderValue,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the last request ended.
    last_end_ms: AtomicU64,
    born: Instant,
}

impl ConnCtx {
    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(crate) fn end_request(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_end_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Counts the connection as idle from now.
    fn touch(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.last_end_ms.store(now, Ordering::Relaxed);
    }

    /// When the connection will have been idle for `idle`, if nothing happens first.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        self.born + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed)) + idle
    }
}

/// One proxy thread's own state.
struct Worker {
    /// Upstream connections made from this thread.
    pool: Arc<Pool>,
    /// Client connections and tunnels on this thread.
    tasks: TaskTracker,
    /// Metric handles by service, for this thread.
    metrics: std::sync::Mutex<std::collections::HashMap<ServiceLabel, Arc<ServiceMetrics>>>,
    /// Set once the worker stops accepting: connections close after their request.
    draining: std::sync::atomic::AtomicBool,
}

impl Worker {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn metrics(&self, all: &ProxyMetrics, service: ServiceLabel) -> Arc<ServiceMetrics> {
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

/// A token bucket of retries, refilled by a share of each request.
struct RetryBudget {
    tokens: AtomicI64,
    deposit: i64,
    cap: i64,
}

const RETRY_COST: i64 = 100;

impl RetryBudget {
    fn new(percent: u32, burst: u32) -> Self {
        let cap = RETRY_COST * i64::from(burst);
        RetryBudget {
            tokens: AtomicI64::new(cap),
            deposit: i64::from(percent),
            cap,
        }
    }

    fn deposit(&self) {
        if self.deposit > 0 && self.tokens.load(Ordering::Relaxed) < self.cap {
            self.tokens.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t >= RETRY_COST).then_some(t - RETRY_COST)
            })
            .is_ok()
    }
}

/// The HTTP proxy. Build with [`HttpProxy::new`], register its metrics, then
/// [`serve`](HttpProxy::serve) a bound listener.
pub struct HttpProxy {
    settings: HttpProxySettings,
    balancer: Arc<Balancer>,
    domain: String,
    builder: auto::Builder<TokioExecutor>,
    pools: std::sync::Mutex<Vec<Arc<Pool>>>,
    metrics: ProxyMetrics,
    budget: RetryBudget,
    /// `splits`, by canonical service name, ready to choose.
    splits: HashMap<String, Split>,
    drain: Duration,
    /// Cancelled when the drain deadline has passed: everything still open is dropped.
    hard_stop: CancellationToken,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProxy")
            .field("settings", &self.settings)
            .field("domain", &self.domain)
            .finish()
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
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
            .header_read_timeout(ms(s.header_read_timeout_ms))
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
            .keep_alive_interval(ms(s.idle_timeout_ms.min(30_000)))
            .keep_alive_timeout(Duration::from_secs(20));
        let mut domain: String = domain.into();
        domain = domain.trim_matches('.').to_ascii_lowercase();
        let splits = s
            .splits
            .iter()
            .map(|(name, split)| {
                let tags = split.iter().map(|(t, w)| (t.as_str(), *w));
                (name.to_ascii_lowercase(), Split::new(tags))
            })
            .collect();
        Arc::new(HttpProxy {
            budget: RetryBudget::new(s.retry_budget_percent, s.retry_burst),
            splits,
            settings,
            balancer,
            domain,
            builder,
            pools: std::sync::Mutex::new(Vec::new()),
            metrics: ProxyMetrics::default(),
            drain,
            hard_stop: CancellationToken::new(),
        })
    }

    /// Registers the proxy's metrics (`netsel_http_proxy_*`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// The proxy's metric handles, for the traffic sampler to read.
    pub(crate) fn metric_handles(&self) -> ProxyMetrics {
        self.metrics.clone()
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
        let workers = worker_count(&self.settings);
        let slots = Arc::new(Semaphore::new(self.settings.max_connections));
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
            pin: self.settings.pin_workers,
            slice: crate::proxy::worker::slice_setting(self.settings.sched_slice_us),
        };
        for n in 0..workers {
            let worker = Arc::new(Worker {
                pool: Arc::new(Pool::new(PoolSettings {
                    max_idle_per_instance: self.settings.pool_max_idle_per_instance,
                    idle_timeout: ms(self.settings.pool_idle_timeout_ms),
                    connect_timeout: ms(self.settings.connect_timeout_ms),
                })),
                tasks: TaskTracker::new(),
                metrics: Default::default(),
                draining: Default::default(),
            });
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
            let every = ms(self.settings.pool_idle_timeout_ms / 2).max(Duration::from_millis(100));
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
        worker.draining.store(true, Ordering::Relaxed);
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
            self.hard_stop.cancel();
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
        self.metrics.open_connections.inc();
        let ctx = Arc::new(ConnCtx {
            worker,
            client_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            born: Instant::now(),
        });
        let svc = {
            let proxy = self.clone();
            let ctx = ctx.clone();
            service_fn(move |req| {
                let proxy = proxy.clone();
                let ctx = ctx.clone();
                // Boxed: hyper moves the service's future several times on its way into
                // the stream's task (3.6 KB each time, ~8 % of the h2c path's CPU in
                // memmove); a box is moved as a pointer.
                Box::pin(async move { Ok::<_, Infallible>(proxy.handle(req, ctx).await) })
            })
        };
        let mut stream = stream;
        let next = tokio::select! {
            n = fast::serve(&self, &mut stream, &ctx, &shutdown) => n,
            _ = self.hard_stop.cancelled() => fast::Next::Close,
        };
        let pre = match next {
            fast::Next::Close => {
                self.metrics.open_connections.dec();
                return;
            }
            fast::Next::Fallback(pre) => pre,
        };
        // hyper serves the rest of the connection, from the request the fast path left.
        self.metrics.hyper_connections.inc();
        ctx.touch();
        let stream = fast::Rewind::new(pre, stream);
        let io = framing::Guarded::new(stream, self.settings.max_header_bytes);
        // A client that stops reading its responses is let go after the idle timeout.
        let io = crate::stall::StallGuard::new(io, ms(self.settings.idle_timeout_ms));
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let idle = ms(self.settings.idle_timeout_ms);
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
                _ = self.hard_stop.cancelled() => break,
                _ = tokio::time::sleep_until(idle_at), if !draining => {
                    if ctx.idle_deadline(idle) <= Instant::now() {
                        tracing::debug!(%peer, "http proxy connection idle, closing");
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        }
        self.metrics.open_connections.dec();
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        ctx: Arc<ConnCtx>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let in_flight = ctx.begin_request();
        self.budget.deposit();
        let (label, resp) = self.route(req, &ctx, in_flight).await;
        let m = match label {
            Labelled::Known(m) => m,
            Labelled::Unknown => ctx.worker.metrics(&self.metrics, ServiceLabel(None)),
        };
        m.request(resp.status().as_u16(), start.elapsed());
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        ctx: &ConnCtx,
        in_flight: InFlight,
    ) -> (Labelled, Response<ResponseBody>) {
        let none = Labelled::Unknown;
        if req.method() == Method::CONNECT {
            let mut r = local(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: this proxy only forwards to registered services\n",
            );
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return (none, r);
        }
        if let Err(e) = headers::check_framing(&req) {
            tracing::debug!(error = %e, "refused ambiguous request framing");
            let mut r = local(StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return (none, r);
        }
        if req.headers().len() > self.settings.max_headers {
            return (
                none,
                local(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many request headers\n",
                ),
            );
        }
        let target = route::target(&req, &self.domain);
        let svc = match self.lookup(target.as_ref()) {
            Ok(svc) => svc,
            Err((status, body)) => return (none, local(status, body)),
        };
        let m = ctx
            .worker
            .metrics(&self.metrics, ServiceLabel(Some(svc.name.clone())));
        let label = &*m;
        let named = req
            .headers()
            .get(TAG_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .filter(|v| !v.is_empty());
        let host_tag = target.as_ref().and_then(|t| t.tag);
        let tag = match self.route_tag(&svc, named.as_deref().or(host_tag)) {
            Ok(tag) => tag,
            Err(body) => {
                return (
                    Labelled::Known(m),
                    local(StatusCode::SERVICE_UNAVAILABLE, body),
                );
            }
        };
        let tag = tag.as_deref();
        let authority = target
            .as_ref()
            .and_then(|t| HeaderValue::from_str(t.authority).ok());
        let timeout = ms(self.settings.request_timeout_ms);
        let resp = if headers::is_upgrade(&req) {
            // Rare and large: boxed, so the common path's future stays small.
            let up = self.upgrade(req, &svc, label, ctx, authority, in_flight, tag);
            tokio::time::timeout(timeout, Box::pin(up)).await
        } else {
            let fwd = self.forward(req, &svc, label, ctx, authority, in_flight, tag);
            tokio::time::timeout(timeout, fwd).await
        };
        let resp = resp.unwrap_or_else(|_| {
            let body = format!("no instance of '{}' answered in time\n", svc.name);
            local(StatusCode::GATEWAY_TIMEOUT, body)
        });
        (Labelled::Known(m), resp)
    }

    /// The tag a request for `svc` goes to: the one it names (`X-Netsel-Tag`, else the
    /// host's `TAG.tag.NAME` form), else the one the service's split chooses, else none
    /// (every instance). `Err` with the `503` body when that leaves no healthy instance.
    pub(crate) fn route_tag<'p>(
        &'p self,
        svc: &Service,
        named: Option<&str>,
    ) -> Result<Option<Cow<'p, str>>, String> {
        if let Some(tag) = named {
            if self.balancer.has_healthy(svc, Subset::Tagged(tag)) {
                return Ok(Some(Cow::Owned(tag.to_string())));
            }
            return Err(format!(
                "service '{}' has no healthy instance tagged '{tag}'\n",
                svc.name
            ));
        }
        if !self.splits.is_empty()
            && let Some(split) = self.splits.get(svc.name.as_str())
        {
            return match self.balancer.split_tag(split, svc) {
                Some(tag) => Ok(Some(Cow::Borrowed(tag))),
                None => {
                    let tags: Vec<&str> = split.tags().map(|(t, _)| t).collect();
                    Err(format!(
                        "service '{}' has no healthy instance tagged {} (its split)\n",
                        svc.name,
                        tags.join(" or ")
                    ))
                }
            };
        }
        if svc.healthy_count() == 0 {
            return Err(format!("service '{}' has no healthy instance\n", svc.name));
        }
        Ok(None)
    }

    /// The service `target` names (or the default service): the 404 or 400 answer
    /// otherwise.
    fn lookup(&self, target: Option<&route::Target>) -> Result<Arc<Service>, (StatusCode, String)> {
        let snap = self.balancer.catalog().snapshot();
        if let Some(svc) = target.and_then(|t| snap.service(t.name)) {
            return Ok(svc.clone());
        }
        let fallback = match (&self.settings.default_service, target) {
            (Some(d), None) => snap.service(d),
            (Some(d), Some(t)) if !t.absolute => snap.service(d),
            _ => None,
        };
        match (fallback, target) {
            (Some(svc), _) => Ok(svc.clone()),
            (None, Some(t)) => {
                let body = format!("no service named '{}'\n", t.name);
                Err((StatusCode::NOT_FOUND, body))
            }
            (None, None) => Err((
                StatusCode::BAD_REQUEST,
                "request names no host\n".to_string(),
            )),
        }
    }

    /// Builds the request for one attempt on `instance`.
    fn upstream_request(
        &self,
        parts: &Parts,
        body: UpBody,
        endpoint: SocketAddr,
        h2: bool,
    ) -> Request<UpBody> {
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        let host = match (&parts.authority, self.settings.preserve_host) {
            (Some(a), true) => a.clone(),
            _ => HeaderValue::from_str(&endpoint.to_string())
                .unwrap_or(HeaderValue::from_static("localhost")),
        };
        if h2 {
            *req.version_mut() = Version::HTTP_2;
            let authority = Authority::try_from(host.as_bytes())
                .unwrap_or_else(|_| Authority::from_static("localhost"));
            let mut u = hyper::http::uri::Parts::default();
            u.scheme = Some(Scheme::HTTP);
            u.authority = Some(authority);
            u.path_and_query = Some(parts.path.clone());
            *req.uri_mut() = Uri::from_parts(u).unwrap_or_default();
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = Version::HTTP_11;
            *req.uri_mut() = Uri::from(parts.path.clone());
            req.headers_mut().insert(HOST, host);
            // A body of unknown length (the client's was chunked) goes out chunked, said
            // explicitly: without the header hyper's client sends no body at all for GET,
            // HEAD and CONNECT, dropping what the client sent (the fast path forwards it;
            // found by tests/http_proxy_differential.rs).
            if let UpBody::Stream(b) = req.body()
                && b.size_hint().exact().is_none()
                && !req.headers().contains_key(CONTENT_LENGTH)
            {
                req.headers_mut()
                    .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        }
        req
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        req: Request<Incoming>,
        svc: &Arc<Service>,
        label: &ServiceMetrics,
        ctx: &ConnCtx,
        authority: Option<HeaderValue>,
        in_flight: InFlight,
        tag: Option<&str>,
    ) -> Response<ResponseBody> {
        let h2_client = req.version() == Version::HTTP_2;
        let (parts, body) = req.into_parts();
        let mut parts = Parts::new(parts, authority);
        if h2_client && body.is_end_stream() && bridge::fits(svc) {
            // Bodiless HTTP/2 requests to HTTP/1.1 instances: raw sockets, no hand-offs;
            // the head is written straight from the client's headers (same rewriting).
            return bridge::forward(self, &parts, svc, label, ctx, in_flight, tag).await;
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        headers::add_forwarded(&mut parts.headers, &ctx.client_ip, parts.authority.as_ref());
        let mut body = Some(if body.is_end_stream() {
            UpBody::Empty
        } else {
            UpBody::Stream(body)
        });
        let replayable = matches!(body, Some(UpBody::Empty)) && parts.method.is_idempotent();
        let mut tries = Attempts::new(self, svc, label, tag);
        while let Some(pick) = tries.next(false) {
            let active = pick.start();
            let addr = pick.instance.endpoint;
            let h2 = pick.instance.protocol == AppProtocol::Http2;
            let conn = if h2 {
                ctx.worker
                    .pool
                    .h2(addr)
                    .await
                    .map(|(tx, r)| (Sender::H2(tx), r))
            } else {
                ctx.worker
                    .pool
                    .h1(addr)
                    .await
                    .map(|(tx, r)| (Sender::H1(tx), r))
            };
            let (sender, reused) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tries.connect_failed(&pick, &e);
                    continue;
                }
            };
            label.upstream(reused);
            let Some(b) = body.take() else { break };
            let up = self.upstream_request(&parts, b, addr, h2);
            let result = match sender {
                Sender::H1(mut tx) => match tx.try_send_request(up).await {
                    Ok(resp) => Ok((resp, Some(tx))),
                    Err(mut e) => Err((e.take_message(), e.into_error())),
                },
                Sender::H2(mut tx) => match tx.try_send_request(up).await {
                    Ok(resp) => Ok((resp, None)),
                    Err(mut e) => {
                        ctx.worker.pool.drop_h2(addr);
                        Err((e.take_message(), e.into_error()))
                    }
                },
            };
            match result {
                Ok((resp, tx)) => {
                    self.balancer.report_success(&pick);
                    let pooled = tx.map(|tx| (ctx.worker.pool.clone(), addr, tx));
                    return respond(resp, pooled, active, in_flight);
                }
                Err((Some(unsent_req), e)) if tries.stale() => {
                    // The connection closed before the request went out: try again.
                    tracing::debug!(%addr, error = %e, "upstream connection not usable, retrying");
                    body = Some(unsent_req.into_body());
                }
                Err((_, e)) if e.is_user() => {
                    // The client's body failed (malformed chunking, cut short): not the
                    // instance's fault, so nothing counts against it, and the client is
                    // told (the fast path answers the same).
                    tracing::debug!(service = %svc.name, %addr, error = %e, "request body failed");
                    let (status, body) = fast::bad_body_answer();
                    let mut r = local(status, body);
                    r.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    return r;
                }
                Err((_, e)) => {
                    tracing::debug!(service = %svc.name, %addr, error = %e, "upstream request failed");
                    if tries.failed(&pick, reused, replayable) {
                        body = Some(UpBody::Empty);
                        continue;
                    }
                    break;
                }
            }
        }
        tries.give_up()
    }

    /// An HTTP/1.1 `Upgrade`: forwarded on a fresh connection; on `101` both sides are
    /// joined byte for byte.
    #[allow(clippy::too_many_arguments)]
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        svc: &Arc<Service>,
        label: &ServiceMetrics,
        ctx: &ConnCtx,
        authority: Option<HeaderValue>,
        in_flight: InFlight,
        tag: Option<&str>,
    ) -> Response<ResponseBody> {
        let client_side = hyper::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut parts = Parts::new(parts, authority);
        headers::strip_hop_by_hop(&mut parts.headers, true);
        headers::add_forwarded(&mut parts.headers, &ctx.client_ip, parts.authority.as_ref());
        let mut body = Some(UpBody::Stream(body));
        let mut tries = Attempts::new(self, svc, label, tag);
        // An h2c instance cannot take an HTTP/1.1 upgrade.
        while let Some(pick) = tries.next(true) {
            let addr = pick.instance.endpoint;
            let active = pick.start();
            let mut tx = match ctx.worker.pool.connect_h1(addr).await {
                Ok(tx) => tx,
                Err(e) => {
                    tries.connect_failed(&pick, &e);
                    continue;
                }
            };
            label.upstream(false);
            let Some(b) = body.take() else { break };
            let up = self.upstream_request(&parts, b, addr, false);
            let mut resp = match tx.send_request(up).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "upstream upgrade failed");
                    // The request body streamed from the client: it cannot be sent again.
                    tries.failed(&pick, false, false);
                    break;
                }
            };
            self.balancer.report_success(&pick);
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                return respond(resp, None, active, in_flight);
            }
            let upstream_side = hyper::upgrade::on(&mut resp);
            let hard_stop = self.hard_stop.clone();
            ctx.worker.tasks.spawn(async move {
                let _active = active;
                let _in_flight = in_flight;
                let (client, upstream) = match tokio::join!(client_side, upstream_side) {
                    (Ok(c), Ok(u)) => (c, u),
                    (c, u) => {
                        tracing::debug!(
                            client_ok = c.is_ok(),
                            upstream_ok = u.is_ok(),
                            "upgrade did not complete"
                        );
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "tunnel ended");
                        }
                    }
                    _ = hard_stop.cancelled() => {}
                }
            });
            let (mut head, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut head.headers, true);
            return Response::from_parts(head, ResponseBody::full(bytes::Bytes::new()));
        }
        tries.give_up()
    }
}

/// Which service's metrics a response counts under.
enum Labelled {
    Known(Arc<ServiceMetrics>),
    /// The request named no known service.
    Unknown,
}

/// A request's head, kept for retries.
struct Parts {
    method: Method,
    headers: hyper::HeaderMap,
    path: PathAndQuery,
    /// The authority the client used (forwarded as `Host`).
    authority: Option<HeaderValue>,
}

impl Parts {
    fn new(p: hyper::http::request::Parts, authority: Option<HeaderValue>) -> Self {
        let path = p
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Parts {
            method: p.method,
            headers: p.headers,
            path,
            authority,
        }
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

fn respond(
    resp: Response<Incoming>,
    pooled: Option<(
        Arc<Pool>,
        SocketAddr,
        hyper::client::conn::http1::SendRequest<UpBody>,
    )>,
    active: crate::proxy::balance::ActiveGuard,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let (mut head, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut head.headers, false);
    head.version = Version::HTTP_11;
    let hold = Hold {
        pooled,
        _active: Some(active),
        _in_flight: in_flight,
    };
    Response::from_parts(head, ResponseBody::stream(body, hold))
}

/// A short plain-text answer from the proxy itself.
fn local(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// How many worker threads the proxy runs: the setting, or one per CPU.
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
