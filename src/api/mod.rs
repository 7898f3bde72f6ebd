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
//!
//! Files: this one declares the others, re-exports the public items and holds the
//! router and [`serve`]. What the handlers share is in `state.rs` ([`ApiState`]),
//! `extract.rs` (extractors, headers) and `error.rs`; rate limiting in `limit.rs` (its
//! buckets in `bucket.rs`); the server loop, shared with [`consul`], in `listener.rs`. No
//! file imports from `mod.rs`, and no two files import each other.

mod acl;
mod bucket;
pub mod consul;
mod error;
mod extract;
mod handlers;
mod limit;
mod listener;
mod metrics;
pub mod model;
mod sd;
mod settings;
mod state;
mod traffic;
mod ui;
mod watch;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use extract::{INDEX_HEADER, SECRET_HEADER};
pub use metrics::ApiMetrics;
pub use settings::ApiSettings;
pub use state::ApiState;

use listener::serve_app;

/// The OpenAPI document of this API.
pub const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

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
