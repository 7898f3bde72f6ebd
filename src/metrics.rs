//! Metrics: one `prometheus-client` registry per server, filled by each part at start-up.
//!
//! A part that records metrics defines its own metric handles in its own module and
//! registers them on the [`Registry`] passed to it while the server starts (see
//! `server.rs`). Handles are cheap clones that share their values; recording is lock-free.
//! The API serves the registry as Prometheus text at `/metrics`.
//!
//! Besides the parts' own metrics, [`MetricsRegistry::new`] adds what every Prometheus
//! exporter is expected to have:
//!
//! * `netsel_build_info{version,features}` (gauge, always 1);
//! * the standard `process_*` family (no `netsel_` prefix, as Prometheus's own client
//!   libraries name them): `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//!   `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//!   `process_start_time_seconds`. They are read at scrape time by hand from Linux's
//!   `/proc/self/{stat,status,fd,limits}` and `/proc/stat` (the only new system call is
//!   `sysconf(_SC_CLK_TCK)`, in `crate::sys`); elsewhere, or when `/proc` is not mounted,
//!   the ones that cannot be read are left out.
//!
//! [`LatencyHistogram`] is a lock-free histogram for hot paths (prometheus-client's own
//! `Histogram` takes a mutex per observation).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
pub use prometheus_client::registry::Registry;

/// The finished registry, shared read-only once the server has started.
#[derive(Clone)]
pub struct MetricsRegistry(Arc<Registries>);

struct Registries {
    /// Everything named `netsel_*`.
    netsel: Registry,
    /// The unprefixed `process_*` family.
    process: Registry,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

impl MetricsRegistry {
    /// Freezes a registry that every part has registered on, adding
    /// `netsel_build_info` and the `process_*` metrics.
    pub fn new(mut metrics_registry: Registry) -> Self {
        register_build_info(&mut metrics_registry);
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector));
        MetricsRegistry(Arc::new(Registries {
            netsel: metrics_registry,
            process,
        }))
    }

    /// The registry in Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.0.netsel);
        let _ = encode_registry(&mut out, &self.0.process);
        let _ = encode_eof(&mut out);
        out
    }
}

/// A fresh registry with NetSel's metric prefix (`netsel_`).
pub fn new_registry() -> Registry {
    Registry::with_prefix("netsel")
}

/// The cargo features this build has, comma-separated (`server,etcd`).
pub fn build_features() -> String {
    let mut features = vec!["server"];
    if cfg!(feature = "etcd") {
        features.push("etcd");
    }
    features.join(",")
}

fn register_build_info(metrics_registry: &mut Registry) {
    let info = Family::<[(&'static str, String); 2], Gauge>::default();
    info.get_or_create(&[
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("features", build_features()),
    ])
    .set(1);
    metrics_registry.register(
        "build_info",
        "Always 1; the labels say which NetSel build this is",
        info,
    );
}

/// The `process_*` metrics, read from `/proc` at scrape time.
#[derive(Debug)]
struct ProcessCollector;

/// What one scrape reads from `/proc` (each `None` when it cannot be read).
#[derive(Debug, Default, Clone, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        let mut s = ProcessStats::default();
        let ticks = crate::sys::clock_ticks_per_sec() as f64;
        if let Some(stat) = read("/proc/self/stat").as_deref().and_then(parse_stat) {
            s.cpu_seconds = Some((stat.utime + stat.stime) as f64 / ticks);
            s.virtual_bytes = Some(stat.vsize);
            if let Some(boot) = read("/proc/stat").as_deref().and_then(parse_boot_time) {
                s.start_time_seconds = Some(boot as f64 + stat.starttime as f64 / ticks);
            }
        }
        s.resident_bytes = read("/proc/self/status")
            .as_deref()
            .and_then(|t| status_kib(t, "VmRSS:"))
            .map(|kib| kib * 1024);
        s.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        s.max_fds = read("/proc/self/limits")
            .as_deref()
            .and_then(parse_max_open_files);
        s
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The fields of `/proc/self/stat` the metrics use.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is at index 0 here; utime is field 14, stime 15, starttime 22,
    // vsize 23.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: n(14)?,
        stime: n(15)?,
        starttime: n(22)?,
        vsize: n(23)?,
    })
}

/// `btime` of `/proc/stat`: boot time, Unix seconds.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `kB` line of `/proc/self/status` (`VmRSS:    1234 kB`).
fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits` (`None` when unlimited).
fn parse_max_open_files(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let m = ConstCounter::new(v);
            m.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                m.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(v);
                m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// A lock-free histogram of durations with fixed buckets: one atomic add to a bucket and
/// one to the sum per observation (or per batch, with [`observe_n`](Self::observe_n)).
/// Cheap clones share the values. The count is the sum of the buckets, so a scrape
/// that races an observation may see the sum and the count of slightly different moments,
/// as with any lock-free exporter.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, seconds (for the text).
    bounds: Box<[f64]>,
    /// The same, nanoseconds (for the hot path).
    bounds_ns: Box<[u64]>,
    /// Per bucket, not cumulative; the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// A histogram with these upper bounds in seconds, ascending (`+Inf` is added).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().collect();
        let bounds_ns = bounds.iter().map(|b| (b * 1e9) as u64).collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram(Arc::new(HistogramInner {
            bounds,
            bounds_ns,
            counts,
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    #[inline]
    pub fn observe(&self, took: Duration) {
        self.observe_n(took, 1);
    }

    /// Records `n` events that each took `took`.
    #[inline]
    pub fn observe_n(&self, took: Duration, n: u64) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = self.0.bounds_ns.partition_point(|&b| b < ns);
        self.0.counts[i].fetch_add(n, Ordering::Relaxed);
        self.0
            .sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `first`, `first * factor`, … (`n` bounds).
pub fn exponential_bounds(first: f64, factor: f64, n: u16) -> Vec<f64> {
    let mut out = Vec::with_capacity(usize::from(n));
    let mut b = first;
    for _ in 0..n {
        // Rounded to 9 significant digits so the text shows `0.00128`, not `0.0012800000001`.
        let mut s = String::new();
        let _ = write!(s, "{b:.9e}");
        out.push(s.parse().unwrap_or(b));
        b *= factor;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_parsed_past_a_command_name_with_spaces_and_parens() {
        let text = "1234 (we (ird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 4 0 98765 123456789 2000 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 250,
                stime: 50,
                starttime: 98765,
                vsize: 123456789,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn proc_files_are_parsed() {
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t    2048 kB\n", "VmRSS:"),
            Some(2048)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files("Max open files            unlimited            unlimited"),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_sane_figures() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.virtual_bytes.unwrap() >= s.resident_bytes.unwrap());
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.cpu_seconds.unwrap() >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }

    #[test]
    fn latency_histogram_buckets_are_inclusive_and_cumulative() {
        let h = LatencyHistogram::new(exponential_bounds(0.001, 10.0, 3));
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe_n(Duration::from_millis(50), 2);
        h.observe(Duration::from_secs(5));
        assert_eq!(h.count(), 5);
        let mut metrics_registry = Registry::default();
        metrics_registry.register("lat_seconds", "x", h);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &metrics_registry).unwrap();
        assert!(
            out.contains("lat_seconds_bucket{le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("lat_seconds_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"0.1\"} 4\n"), "{out}");
        assert!(out.contains("lat_seconds_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("lat_seconds_count 5\n"), "{out}");
        assert!(out.contains("lat_seconds_sum 5.1015\n"), "{out}");
    }

    #[test]
    fn build_info_and_process_metrics_are_in_the_text() {
        let text = MetricsRegistry::new(new_registry()).encode();
        assert!(
            text.contains(&format!(
                "netsel_build_info{{version=\"{}\",features=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                build_features()
            )),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
