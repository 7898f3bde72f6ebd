//! The API's own metrics: requests by route template, method and status, and how long
//! they took to answer.
//!
//! The route is axum's [`MatchedPath`], the template a request matched
//! (`/v1/services/{name}`), never the raw path, and `unmatched` for requests no route
//! took; methods outside the standard ones count as `other`. So the label sets stay
//! bounded whatever clients send.

use std::fmt::Write as _;
use std::time::Instant;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
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
    /// Fresh metrics registered on `metrics_registry` as `netsel_api_requests_total` and
    /// `netsel_api_request_duration_seconds`.
    pub fn new(metrics_registry: &mut Registry) -> Self {
        let m = ApiMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        };
        metrics_registry.register(
            "api_requests",
            "HTTP API requests answered, by route template, method and status code",
            m.requests.clone(),
        );
        metrics_registry.register(
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

/// A layer counting and timing every request of the router it wraps. Hand-written rather
/// than `axum::middleware::from_fn`, which boxes the inner service and the future of every
/// request; this adds two clock reads and two metric lookups.
#[derive(Debug, Clone)]
pub(crate) struct RecordLayer(pub(crate) ApiMetrics);

impl<S> tower_layer::Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Record<S> {
        Record {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service of [`RecordLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Record<S> {
    inner: S,
    metrics: ApiMetrics,
}

impl<S> tower_service::Service<Request> for Record<S>
where
    S: tower_service::Service<Request, Response = Response>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = Route(req.extensions().get::<MatchedPath>().cloned());
        let method = method_label(req.method());
        Recorded {
            inner: self.inner.call(req),
            done: Some((self.metrics.clone(), route, method, Instant::now())),
        }
    }
}

/// The response future of [`Record`]: records when the response head is ready.
pub(crate) struct Recorded<F> {
    inner: F,
    done: Option<(ApiMetrics, Route, &'static str, Instant)>,
}

impl<F, E> Future for Recorded<F>
where
    F: Future<Output = Result<Response, E>> + Unpin,
{
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        if let (Ok(resp), Some((metrics, route, method, started))) = (&out, self.done.take()) {
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
        }
        Poll::Ready(out)
    }
}
