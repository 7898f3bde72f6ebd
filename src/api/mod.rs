//! The HTTP/JSON API on `api_addr` (default `127.0.0.1:9001`): registration, discovery,
//! watches, `/metrics` and the web UI at `/ui/`.
//!
//! Every handler reads a catalog snapshot or writes through the catalog; the API keeps no
//! state of its own besides rate-limit buckets. Errors become a status and a JSON body
//! `{"error": "..."}` in one place ([`ApiError`]). Request bodies are bounded
//! (`api.max_body_bytes`), `/v1/` is rate-limited per client IP, and with `[acl]` on,
//! requests need a token with rights on the service names they touch.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/instances` | register an instance |
//! | `PUT /v1/instances/{id}/heartbeat` | renew its lease (`X-Netsel-Secret`) |
//! | `DELETE /v1/instances/{id}` | deregister it (`X-Netsel-Secret`, or an ACL token) |
//! | `GET /v1/instances/{id}` | one instance |
//! | `GET /v1/services` | services with counts and health; blocking with `?index=&wait=` |
//! | `GET /v1/services/{name}` | one service and its instances; blocking too |
//! | `GET /v1/events` | server-sent change events |
//! | `GET /v1/traffic` | recent traffic per service, for the dashboard's charts |
//! | `GET /v1/health` | liveness and readiness |
//! | `GET /v1/openapi.yaml` | the OpenAPI document |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /ui/` | the live dashboard |
//!
//! [`consul`] serves a Consul-compatible API on its own listener over the same state.

mod acl;
pub mod consul;
mod error;
mod extract;
mod handlers;
mod limit;
mod metrics;
pub mod model;
mod sd;
mod settings;
mod traffic;
mod ui;
mod watch;

use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use error::ApiError;
pub use metrics::ApiMetrics;
pub use settings::ApiSettings;

use crate::acl::AclSettings;
use crate::catalog::Catalog;
use crate::metrics::MetricsRegistry;

/// Header carrying the catalog index of a response (for blocking queries).
pub const INDEX_HEADER: &str = "x-netsel-index";
/// Header carrying an instance secret on heartbeat and deregister.
pub const SECRET_HEADER: &str = "x-netsel-secret";

/// The OpenAPI document of this API.
pub const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: Catalog,
    metrics: Option<MetricsRegistry>,
    requests: Option<ApiMetrics>,
    settings: ApiSettings,
    acl: acl::Acl,
    limiter: limit::RateLimiter,
    streams: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// The traffic series, when the server samples its proxies.
    traffic: Option<crate::traffic::Traffic>,
    /// The DNS domain without dots (`netsel`), for the names the UI shows.
    dns_domain: String,
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
                acl: acl::Acl::new(acl),
                limiter: limit::RateLimiter::new(
                    settings.rate_limit_per_sec,
                    settings.rate_limit_burst,
                ),
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
    /// Counts and times every request of [`router`] on `metrics`
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

async fn not_found() -> ApiError {
    ApiError::NotFound("no such path".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
        .into_response()
}

/// The API's router. Tests drive it in-process; [`serve`] runs it on a listener.
pub fn router(state: ApiState) -> Router {
    let limited = Router::new()
        .route("/v1/instances", post(handlers::register))
        .route(
            "/v1/instances/{id}",
            get(handlers::instance).delete(handlers::deregister),
        )
        .route("/v1/instances/{id}/heartbeat", put(handlers::heartbeat))
        .route("/v1/services", get(handlers::services))
        .route("/v1/nodes", get(handlers::nodes))
        .route("/v1/services/{name}", get(handlers::service))
        .route("/v1/events", get(watch::events))
        .route("/v1/traffic", get(traffic::traffic))
        .route("/v1/sd/prometheus", get(sd::prometheus))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit::rate_limit,
        ));
    let router = Router::new()
        .merge(limited)
        .route("/v1/health", get(handlers::health))
        .route("/v1/health/ready", get(handlers::health))
        .route("/v1/health/live", get(handlers::live))
        .route("/v1/openapi.yaml", get(openapi))
        .route("/metrics", get(handlers::metrics))
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui/", get(ui::index))
        .route("/ui/{file}", get(ui::asset))
        .route("/favicon.ico", get(ui::favicon))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let router = match &state.inner.requests {
        Some(m) => router.layer(metrics::RecordLayer(m.clone())),
        None => router,
    };
    router
        .layer(DefaultBodyLimit::max(state.inner.settings.max_body_bytes))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown`, then lets in-flight requests finish
/// (blocking queries and event streams end at once). At most `api.max_connections`
/// connections are served at a time; further clients wait in the listen backlog.
pub async fn serve(listener: TcpListener, state: ApiState, shutdown: CancellationToken) {
    let settings = state.inner.settings.clone();
    serve_app(listener, router(state), &settings, "api", shutdown).await;
}

/// Serves `app` on `listener` with the API's bounds (`settings`: connection limit, header
/// and write timeouts, graceful shutdown): the API's own listener and the
/// Consul-compatible one.
pub(crate) async fn serve_app(
    listener: TcpListener,
    app: Router,
    settings: &ApiSettings,
    what: &'static str,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let header_timeout = Duration::from_millis(settings.header_read_timeout_ms);
    let write_timeout = Duration::from_millis(settings.write_timeout_ms);
    let graceful = GracefulShutdown::new();
    let mut builder = AutoBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let mut acceptor = crate::accept::Acceptor::new(listener, what);
    loop {
        // A free slot first: beyond the cap, clients wait in the listen backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Some((stream, peer)) = acceptor.next(&shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        // Silent clients and clients that never read must not keep their slot.
        let io = crate::stall::StallGuard::new(stream, write_timeout)
            .with_preface_deadline(header_timeout);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, listener = what, "connection ended");
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("http", listener = what, %peer)),
        );
    }
    drop(acceptor);
    graceful.shutdown().await;
}
