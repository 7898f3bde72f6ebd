//! Per-client rate limiting: a token bucket per client IP address. The middleware and
//! the client's IP are here; the buckets themselves (`RateLimiter`) are in `bucket.rs`,
//! held by the API's state.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::ApiState;

/// The client's IP, when the server recorded it (not in in-process router tests).
pub(crate) fn client_ip(req_extensions: &axum::http::Extensions) -> Option<IpAddr> {
    req_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical())
}

/// Middleware: refuses a request with 429 when its client is over the limit.
pub(crate) async fn rate_limit(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let ip = client_ip(req.extensions()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if let Err(retry_after_secs) = state.inner.limiter.check(ip) {
        tracing::debug!(%ip, "rate limited");
        return ApiError::RateLimited { retry_after_secs }.into_response();
    }
    next.run(req).await
}
