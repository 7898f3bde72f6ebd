//! The API's own metrics: requests by route template, method and status, and how long
//! they took to answer.
//!
//! The route is axum's [`MatchedPath`], the template a request matched
//! (`/v1/services/{name}`), never the raw path, and `unmatched` for requests no route
//! took; methods outside the standard ones count as `other`. So the label sets stay
//! bounded whatever clients send.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DurationLabels {
    route: String,
    method: &'static str,
}

fn duration_histogram() -> Histogram {
    // 100 µs .. ~13 s (blocking queries wait longer and land in +Inf).
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Request counters and durations of the HTTP/JSON API. Cheap clones sharing values.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<DurationLabels, Histogram, fn() -> Histogram>,
}

impl ApiMetrics {
    /// Fresh metrics registered on `registry` as `netsel_api_requests_total` and
    /// `netsel_api_request_duration_seconds`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ApiMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        };
        registry.register(
            "api_requests",
            "HTTP API requests answered, by route template, method and status code",
            m.requests.clone(),
        );
        registry.register(
            "api_request_duration_seconds",
            "Time from an HTTP API request to its response head, by route template and \
             method (blocking queries include their wait; event streams end at their head)",
            m.durations.clone(),
        );
        m
    }

    /// The count for one route, method and status (for tests).
    pub fn count(&self, route: &str, method: &'static str, status: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method,
                status,
            })
            .get()
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Middleware counting and timing every request (layered over the whole router).
pub(crate) async fn record(
    State(metrics): State<ApiMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => p.as_str().to_string(),
        None => "unmatched".to_string(),
    };
    let method = method_label(req.method());
    let resp = next.run(req).await;
    metrics
        .durations
        .get_or_create(&DurationLabels {
            route: route.clone(),
            method,
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}
