//! The TCP proxy's settings (the `[tcp_proxy]` table) and their defaults.

use serde::{Deserialize, Serialize};

/// How the TCP proxy relays bytes between a client and an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    /// Zero-copy `splice(2)` through a kernel pipe on Linux; elsewhere the same as `copy`.
    #[default]
    Splice,
    /// Read into a user-space buffer and write it out (`tokio::io::copy_bidirectional`).
    Copy,
}

/// TCP proxy settings (the gateway on `tcp_proxy_addr` and the per-VIP listeners).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProxySettings {
    /// Seconds a relayed connection may pass no bytes either way before it is closed.
    /// Default 300.
    pub idle_timeout_secs: u64,
    /// Milliseconds to wait for one instance to accept before trying another. Default 2000.
    pub connect_timeout_ms: u64,
    /// Instances tried per client connection before it is refused. Default 3.
    pub connect_attempts: usize,
    /// Most client connections relayed at once (gateway and VIP listeners together).
    /// Default 8192.
    pub max_connections: usize,
    /// Longest gateway name line in bytes, line ending included. Default 256.
    pub name_line_max: usize,
    /// Milliseconds a gateway client has to send its name line. Default 5000.
    pub name_timeout_ms: u64,
    /// Listen on `VIP:service-port` for every service. Default true.
    pub vip_listeners: bool,
    /// Seconds relayed connections may run on after shutdown begins (never longer than
    /// the server's `drain_secs`). Default 10.
    pub drain_secs: u64,
    /// How bytes are relayed. Default `splice` (zero-copy on Linux).
    pub relay: RelayMode,
    /// Event-loop threads of the proxy, each with its own listening socket per address
    /// (`SO_REUSEPORT`): a connection is accepted, connected and relayed on one thread.
    /// 0 (the default) means `TOKIO_WORKER_THREADS` if set, else one per CPU (the worker
    /// rule, `sys::worker_threads`).
    pub workers: usize,
    /// With at least as many workers as CPUs, bind worker `n` to the `n`-th CPU the
    /// process may use, so each stays on its own. Default false: unlike the HTTP
    /// proxy's, the TCP proxy's figures did not gain from it, and a single bulk stream
    /// relayed by a bound worker lost throughput to the iperf3 client and server that
    /// shared its CPU.
    pub pin_workers: bool,
    /// The time slice each worker asks the scheduler for, in microseconds (Linux 6.12 and
    /// later), as for the HTTP proxy. 0 leaves the kernel's default. Default 100.
    pub sched_slice_us: u64,
}

impl Default for TcpProxySettings {
    fn default() -> Self {
        TcpProxySettings {
            idle_timeout_secs: 300,
            connect_timeout_ms: 2000,
            connect_attempts: 3,
            max_connections: 8192,
            name_line_max: 256,
            name_timeout_ms: 5000,
            vip_listeners: true,
            drain_secs: 10,
            relay: RelayMode::default(),
            workers: 0,
            pin_workers: false,
            sched_slice_us: 100,
        }
    }
}

impl TcpProxySettings {
    /// Checks the settings can work: the key and the reason when they cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |key, reason: &str| Err((key, reason.to_string()));
        if self.idle_timeout_secs == 0 || self.connect_timeout_ms == 0 || self.name_timeout_ms == 0
        {
            return bad("tcp_proxy timeouts", "must be greater than 0");
        }
        if self.connect_attempts == 0 || self.max_connections == 0 {
            return bad(
                "tcp_proxy.connect_attempts/max_connections",
                "must be at least 1",
            );
        }
        if !(16..=65_536).contains(&self.name_line_max) {
            return bad("tcp_proxy.name_line_max", "must be 16..=65536");
        }
        if self.workers > 1024 {
            return bad("tcp_proxy.workers", "must be 0..=1024");
        }
        if !crate::proxy::worker::valid_slice_setting(self.sched_slice_us) {
            return bad("tcp_proxy.sched_slice_us", "must be 0 or 100..=100000");
        }
        Ok(())
    }
}
