//! The API's own metrics: requests by route template, method and status, and how long
//! they took to answer.
//!
//! The route is axum's [`MatchedPath`], the template a request matched
//! (`/v1/services/{name}`), never the raw path, and `unmatched` for requests no route
//! took; methods outside the standard ones count as `other`. So the label sets stay
//! bounded whatever clients send.

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{LatencyHistogram, exponential_bounds};

/// A route label: the template a request matched (a cheap clone of axum's [`MatchedPath`],
/// no allocation per request), or `unmatched`.
#[derive(Debug, Clone)]
struct Route(Option<MatchedPath>);

impl Route {
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or("unmatched", |p| p.as_str())
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DurationLabels {
    route: Route,
    method: &'static str,
}

fn duration_histogram() -> LatencyHistogram {
    // 100 µs .. ~13 s (blocking queries wait longer and land in +Inf).
    LatencyHistogram::new(exponential_bounds(0.0001, 2.0, 18))
}

/// Request counters and durations of the HTTP/JSON API. Cheap clones sharing values.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<DurationLabels, LatencyHistogram, fn() -> LatencyHistogram>,
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
    let route = Route(req.extensions().get::<MatchedPath>().cloned());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    metrics
        .durations
        .get_or_create(&DurationLabels {
            route: route.clone(),
            method,
        })
        .observe(started.elapsed());
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
