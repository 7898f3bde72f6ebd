//! `[http_proxy]` settings: what the proxy reads from the configuration, with defaults
//! and validation. Re-exported as `crate::proxy::http::HttpProxySettings`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[http_proxy]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpProxySettings {
    /// Proxy threads, each with its own event loop, connections and upstream pool
    /// (like nginx workers); 0 means the worker rule (`crate::sys::worker_threads`:
    /// `TOKIO_WORKER_THREADS` if set, else one per CPU). Default 0.
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
