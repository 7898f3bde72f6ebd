//! `GET /v1/traffic[?service=NAME][&since=UNIX_S]`: the recent traffic series
//! ([`crate::traffic`]) of every service the caller may read, or of one; with `since`,
//! only the points after it (what a dashboard polling for new points asks).

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::acl::{Caller, Deny};
use super::error::ApiError;
use super::extract::QueryMap;
use super::state::ApiState;
use crate::traffic::SeriesView;

/// The answer.
#[derive(Debug, Serialize)]
struct TrafficView {
    /// Seconds between points.
    interval_secs: f64,
    /// Points kept per service.
    points_max: usize,
    /// Series by service name.
    services: HashMap<String, SeriesView>,
}

pub(crate) async fn traffic(
    State(state): State<ApiState>,
    caller: Caller,
    QueryMap(q): QueryMap,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    let one = q.get("service").map(|s| s.to_ascii_lowercase());
    match &one {
        Some(name) if !acl.can_read(caller, name) => {
            return Err(acl.denied(caller, &format!("read {name}")));
        }
        None if acl.enabled() && caller == Caller::Anonymous && !acl.can_read_all(caller) => {
            return Err(acl.denied(caller, "list services"));
        }
        _ => {}
    }
    let since_ms = match q.get("since") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            // Rounded: a `t` sent back as given names its own millisecond exactly.
            Ok(s) if s.is_finite() && s >= 0.0 => Some((s * 1000.0).round() as u64),
            _ => return Err(ApiError::invalid("since", "expected Unix seconds")),
        },
    };
    let Some(traffic) = &state.inner.traffic else {
        return Ok(Json(TrafficView {
            interval_secs: 0.0,
            points_max: crate::traffic::POINTS,
            services: HashMap::new(),
        })
        .into_response());
    };
    let keep = |name: &str| match &one {
        Some(one) => name == one,
        None => acl.can_read(caller, name),
    };
    let services = traffic.view(keep, since_ms);
    Ok(Json(TrafficView {
        interval_secs: traffic.interval().as_secs_f64(),
        points_max: crate::traffic::POINTS,
        services,
    })
    .into_response())
}
