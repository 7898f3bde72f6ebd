//! Recent traffic per service, for the dashboard's charts (`GET /v1/traffic`).
//!
//! A sampler reads what the proxies already count, every `api.traffic_interval_ms`
//! (default 5 s), and keeps the last [`POINTS`] intervals per service (15 minutes at the
//! default interval) in a ring buffer. It only reads: the proxies' metric handles, the
//! balancer's in-flight counts and the catalog snapshot; nothing writes through it.
//!
//! Each point of a service, over the interval that ended at `t`:
//!
//! * `rps`: HTTP requests answered plus TCP connections relayed, per second;
//! * `error_rate`: the share that failed, 0..=1: HTTP 5xx answers (the instance's or the
//!   proxy's own) and failed TCP connection attempts, over requests, connections and
//!   failed attempts;
//! * `p99_ms`: the 99th percentile of HTTP latency (request to response headers), from
//!   the histogram's bucket deltas, interpolated within the bucket as Prometheus'
//!   `histogram_quantile` does; `None` when no HTTP request was answered;
//! * `open`: TCP connections and HTTP requests in flight to its instances at `t`, from
//!   both proxies.
//!
//! Memory is bounded: at most [`MAX_SERVICES`] services are tracked (the first by name),
//! services that leave the catalog are dropped at the next sample, and each keeps
//! [`POINTS`] points of 24 bytes plus its last totals: about 4.5 MB at the cap.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, ServiceName};
use crate::proxy::balance::Balancer;
use crate::proxy::http::metrics::{HttpTotals, LATENCY_BUCKETS, ProxyMetrics, latency_bound};
use crate::proxy::tcp::metrics::TcpProxyMetrics;

/// Points kept per service: 15 minutes at the default 5 s interval.
pub const POINTS: usize = 180;

/// Services tracked at most; beyond that, the first by name.
pub const MAX_SERVICES: usize = 1000;

/// One interval of one service.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    /// End of the interval, Unix milliseconds.
    t_ms: u64,
    rps: f32,
    error_rate: f32,
    /// NaN when no HTTP request was answered in the interval.
    p99_ms: f32,
    open: u32,
}

/// What the proxies had counted for a service at a sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Totals {
    http: HttpTotals,
    tcp_connections: u64,
    tcp_failures: u64,
}

#[derive(Debug, Default)]
struct Series {
    points: VecDeque<Point>,
    last: Totals,
}

#[derive(Debug, Default)]
struct State {
    series: HashMap<ServiceName, Series>,
    /// When the last sample was taken.
    at: Option<Instant>,
}

/// The series, shared by the sampler and the API. Cheap to clone.
#[derive(Clone)]
pub struct Traffic {
    interval: Duration,
    state: Arc<Mutex<State>>,
    sources: Arc<Sources>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic")
            .field("interval", &self.interval)
            .finish()
    }
}

/// Where the numbers come from.
struct Sources {
    catalog: Catalog,
    balancer: Arc<Balancer>,
    http: Option<ProxyMetrics>,
    tcp: Option<TcpProxyMetrics>,
}

/// One service's series, as the API answers it (parallel arrays, oldest first).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SeriesView {
    /// End of each interval, Unix seconds (millisecond precision).
    pub t: Vec<f64>,
    /// Requests and connections per second.
    pub rps: Vec<f64>,
    /// Share of them that failed, 0..=1.
    pub error_rate: Vec<f64>,
    /// 99th-percentile HTTP latency in milliseconds; `null` without HTTP requests.
    pub p99_ms: Vec<Option<f64>>,
    /// Connections and requests in flight at the end of the interval.
    pub open: Vec<u32>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Rounds to 3 significant decimals, so the JSON stays short.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Traffic {
    /// A sampler over `catalog`'s services, reading the proxies' handles (either may be
    /// missing) and `balancer`'s in-flight counts, every `interval`.
    pub(crate) fn new(
        catalog: Catalog,
        balancer: Arc<Balancer>,
        http: Option<ProxyMetrics>,
        tcp: Option<TcpProxyMetrics>,
        interval: Duration,
    ) -> Self {
        Traffic {
            interval,
            state: Arc::new(Mutex::new(State::default())),
            sources: Arc::new(Sources {
                catalog,
                balancer,
                http,
                tcp,
            }),
        }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Samples every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => self.sample(),
            }
        }
    }

    /// Takes one sample now: a point for every service seen at the last sample too, and
    /// the totals of all as the baseline for the next.
    pub(crate) fn sample(&self) {
        let src = &self.sources;
        let snap = src.catalog.snapshot();
        // Read the proxies before taking the lock: the API never waits on them.
        let now = Instant::now();
        let t_ms = unix_ms();
        let read: Vec<(ServiceName, Totals, u32)> = snap
            .services()
            .take(MAX_SERVICES)
            .map(|svc| {
                let http = src
                    .http
                    .as_ref()
                    .and_then(|m| m.totals(&svc.name))
                    .unwrap_or_default();
                let (tcp_connections, tcp_failures) = src
                    .tcp
                    .as_ref()
                    .map_or((0, 0), |m| m.totals(svc.name.as_str()));
                let open = u32::try_from(src.balancer.in_flight(svc)).unwrap_or(u32::MAX);
                let totals = Totals {
                    http,
                    tcp_connections,
                    tcp_failures,
                };
                (svc.name.clone(), totals, open)
            })
            .collect();
        let mut st = self.lock();
        let elapsed = st.at.map(|at| now.duration_since(at).as_secs_f64());
        st.at = Some(now);
        let mut next = HashMap::with_capacity(read.len());
        for (name, totals, open) in read {
            match (st.series.remove(&name), elapsed) {
                (Some(mut series), Some(secs)) if secs > 0.0 => {
                    let p = point(&series.last, &totals, secs, t_ms, open);
                    if series.points.len() == POINTS {
                        series.points.pop_front();
                    }
                    series.points.push_back(p);
                    series.last = totals;
                    next.insert(name, series);
                }
                // New since the last sample: its totals are the baseline for the next.
                _ => {
                    let series = Series {
                        points: VecDeque::with_capacity(POINTS),
                        last: totals,
                    };
                    next.insert(name, series);
                }
            }
        }
        // Services that left the catalog (or fell past the cap) are dropped here.
        st.series = next;
    }

    /// The series of every tracked service `keep` accepts, with the points after
    /// `since_ms` (Unix milliseconds) only when given.
    pub fn view(
        &self,
        keep: impl Fn(&str) -> bool,
        since_ms: Option<u64>,
    ) -> HashMap<String, SeriesView> {
        let st = self.lock();
        st.series
            .iter()
            .filter(|(name, _)| keep(name.as_str()))
            .map(|(name, s)| (name.to_string(), view(s, since_ms.unwrap_or(0))))
            .collect()
    }
}

fn view(s: &Series, since_ms: u64) -> SeriesView {
    let mut v = SeriesView::default();
    for p in s.points.iter().filter(|p| p.t_ms > since_ms) {
        v.t.push(p.t_ms as f64 / 1000.0);
        v.rps.push(round3(f64::from(p.rps)));
        v.error_rate.push(round3(f64::from(p.error_rate)));
        v.p99_ms
            .push((!p.p99_ms.is_nan()).then(|| round3(f64::from(p.p99_ms))));
        v.open.push(p.open);
    }
    v
}

/// The point for an interval of `secs` between totals `a` and `b`.
fn point(a: &Totals, b: &Totals, secs: f64, t_ms: u64, open: u32) -> Point {
    let requests = b.http.requests.saturating_sub(a.http.requests);
    let errors = b.http.errors.saturating_sub(a.http.errors);
    let connections = b.tcp_connections.saturating_sub(a.tcp_connections);
    let failures = b.tcp_failures.saturating_sub(a.tcp_failures);
    let total = requests + connections + failures;
    let failed = errors + failures;
    let deltas: [u64; LATENCY_BUCKETS + 1] =
        std::array::from_fn(|i| b.http.latency[i].saturating_sub(a.http.latency[i]));
    Point {
        t_ms,
        rps: ((requests + connections) as f64 / secs) as f32,
        error_rate: if total == 0 {
            0.0
        } else {
            (failed as f64 / total as f64).min(1.0) as f32
        },
        p99_ms: quantile(&deltas, 0.99).map_or(f32::NAN, |s| (s * 1000.0) as f32),
        open,
    }
}

/// The `q` quantile in seconds of observations counted per bucket (`counts[i]` in
/// (`latency_bound(i-1)`, `latency_bound(i)`], the last bucket unbounded), interpolated
/// linearly within its bucket. `None` without observations.
fn quantile(counts: &[u64; LATENCY_BUCKETS + 1], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            if i == LATENCY_BUCKETS {
                // Past the last bound: all that can be said is "at least".
                return Some(latency_bound(LATENCY_BUCKETS - 1));
            }
            let lower = if i == 0 { 0.0 } else { latency_bound(i - 1) };
            let upper = latency_bound(i);
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    Some(latency_bound(LATENCY_BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(of: &[(usize, u64)]) -> [u64; LATENCY_BUCKETS + 1] {
        let mut c = [0; LATENCY_BUCKETS + 1];
        for (i, n) in of {
            c[*i] = *n;
        }
        c
    }

    #[test]
    fn quantile_from_buckets() {
        assert_eq!(quantile(&counts(&[]), 0.99), None);
        // All in the first bucket (0, 0.1 ms]: 99% of the way up it.
        let q = quantile(&counts(&[(0, 100)]), 0.99).unwrap();
        assert!((q - 0.000099).abs() < 1e-9, "{q}");
        // 98 fast, 2 slow in (0.8 ms, 1.6 ms]: p99 is half-way into the slow bucket.
        let q = quantile(&counts(&[(0, 98), (4, 2)]), 0.99).unwrap();
        assert!((q - 0.0012).abs() < 1e-9, "{q}");
        // Beyond the last bound: the last bound.
        let q = quantile(&counts(&[(LATENCY_BUCKETS, 5)]), 0.99).unwrap();
        assert_eq!(q, latency_bound(LATENCY_BUCKETS - 1));
    }

    #[test]
    fn point_rates() {
        let a = Totals::default();
        let mut b = Totals::default();
        b.http.requests = 90;
        b.http.errors = 9;
        b.http.latency = counts(&[(3, 90)]);
        b.tcp_connections = 10;
        b.tcp_failures = 0;
        let p = point(&a, &b, 2.0, 1_000, 3);
        assert_eq!(p.rps, 50.0);
        assert!((p.error_rate - 0.09).abs() < 1e-6);
        assert!(p.p99_ms > 0.4 && p.p99_ms <= 0.8, "{}", p.p99_ms);
        assert_eq!(p.open, 3);
        // Nothing counted: no latency, no errors.
        let p = point(&b, &b, 2.0, 1_000, 0);
        assert_eq!((p.rps, p.error_rate, p.open), (0.0, 0.0, 0));
        assert!(p.p99_ms.is_nan());
        // Totals that went backwards (a proxy restarted) count as nothing.
        let p = point(&b, &a, 2.0, 1_000, 0);
        assert_eq!(p.rps, 0.0);
    }
}
