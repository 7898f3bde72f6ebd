//! The DNS server's settings (the `[dns]` table) and their defaults.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// DNS server settings (the `[dns]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSettings {
    /// The zone NetSel is authoritative for. Default `netsel.`.
    pub domain: String,
    /// TTL of positive answers, in seconds. Short, because discovery data changes.
    /// Default 5.
    pub ttl_secs: u32,
    /// TTL of negative answers (the SOA minimum, RFC 2308), in seconds. Default 5.
    pub negative_ttl_secs: u32,
    /// Also answer a bare service name (`web.`) as `web.<domain>`. Default off.
    pub bare_names: bool,
    /// Resolvers that names outside the zone are forwarded to, in order. Empty (the
    /// default) refuses them: NetSel is never an open resolver unless told to be.
    pub upstreams: Vec<SocketAddr>,
    /// Milliseconds to wait for an upstream before trying the next. Default 2000.
    pub forward_timeout_ms: u64,
    /// Most forwarded queries in flight; more are answered SERVFAIL. Default 256.
    pub max_forwards: usize,
    /// Seconds a DNS-over-TCP connection may stay idle, and the most a query may take to
    /// arrive or an answer to be read by the client. Default 10.
    pub tcp_idle_secs: u64,
    /// Most DNS-over-TCP connections open at once; more are closed as soon as they are
    /// accepted (and counted in `netsel_dns_tcp_refused_connections_total`). Default 1024.
    pub tcp_max_connections: usize,
    /// Threads answering UDP; 0 means the worker rule (`TOKIO_WORKER_THREADS` if set, else
    /// one per CPU; see `sys::worker_threads`), at most 8. Default 0.
    pub udp_workers: usize,
    /// Serve UDP from precomputed wire answers (rebuilt on every catalog change) instead
    /// of hickory's generic UDP loop. Default on; off exists to measure the difference.
    pub fast_path: bool,
    /// Most precomputed answers each UDP worker keeps. Default 65536: a catalog of 10,000
    /// services is asked ~40,000 distinct questions (A, SRV, PTR, NXDOMAIN), which a
    /// 16,384-entry cache, cleared when full, kept missing (0.73× its own 1,000-name
    /// rate; 0.95× with 65,536, `benches/dns_large.sh`). A full cache of typical answers
    /// is ~20 MB per worker; a small catalog never fills it.
    pub cache_entries: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            domain: "netsel.".into(),
            ttl_secs: 5,
            negative_ttl_secs: 5,
            bare_names: false,
            upstreams: Vec::new(),
            forward_timeout_ms: 2000,
            max_forwards: 256,
            tcp_idle_secs: 10,
            tcp_max_connections: 1024,
            udp_workers: 0,
            fast_path: true,
            cache_entries: 65_536,
        }
    }
}

impl DnsSettings {
    /// Checks the settings can work on their own (that `upstreams` does not name NetSel's
    /// own `dns_addr` is checked with the rest of the configuration): the key and the
    /// reason when they cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |key, reason: String| Err((key, reason));
        let domain = self.domain.strip_suffix('.').unwrap_or(&self.domain);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if domain.is_empty() || domain.len() > 200 || !domain.split('.').all(label_ok) {
            return bad(
                "dns.domain",
                format!("'{}' is not a domain name like netsel.", self.domain),
            );
        }
        if self.ttl_secs > 86_400 || self.negative_ttl_secs > 86_400 {
            return bad("dns.ttl_secs", "TTLs must be at most 86400".into());
        }
        if self.forward_timeout_ms == 0 || self.max_forwards == 0 {
            return bad(
                "dns.forward_timeout_ms/max_forwards",
                "must be at least 1".into(),
            );
        }
        if self.tcp_idle_secs == 0 {
            return bad("dns.tcp_idle_secs", "must be at least 1".into());
        }
        if self.tcp_max_connections == 0 {
            return bad("dns.tcp_max_connections", "must be at least 1".into());
        }
        if self.udp_workers > 64 {
            return bad("dns.udp_workers", "at most 64".into());
        }
        Ok(())
    }
}
