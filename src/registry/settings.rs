//! The registry's settings (the `[registry]` table) and their defaults.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Registry listener limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryLimits {
    /// Most simultaneous connections; more are refused with `FAILED|too many connections`.
    pub max_connections: usize,
    /// Seconds a connection may sit idle between requests.
    pub idle_timeout_secs: u64,
    /// Seconds a request may take to arrive once it has begun (a deadline from its first
    /// byte, however steadily the rest trickles in).
    pub frame_timeout_secs: u64,
    /// Seconds an answer may wait for the client to take it; a client that stops reading
    /// is disconnected after this long. Default 10.
    pub write_timeout_secs: u64,
    /// Registrations per second allowed from one peer IP (a token bucket); 0 disables.
    pub register_rate_per_ip: u32,
    /// Registrations one peer IP may make in a burst.
    pub register_burst_per_ip: u32,
    /// Exempt loopback peers (processes on this host) from the registration rate limit.
    pub rate_limit_exempt_loopback: bool,
    /// Where instance endpoints may be; empty (the default) allows any address except
    /// unspecified, multicast, broadcast and link-local ones, which are always refused.
    pub allowed_endpoint_cidrs: Vec<IpNet>,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_connections: 4096,
            idle_timeout_secs: 300,
            frame_timeout_secs: 10,
            write_timeout_secs: 10,
            register_rate_per_ip: 200,
            register_burst_per_ip: 1000,
            rate_limit_exempt_loopback: true,
            allowed_endpoint_cidrs: Vec::new(),
        }
    }
}

impl RegistryLimits {
    /// Checks the limits can work: the key and the reason when they cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_connections == 0 {
            return Err(("registry.max_connections", "must be at least 1".into()));
        }
        if self.idle_timeout_secs == 0
            || self.frame_timeout_secs == 0
            || self.write_timeout_secs == 0
        {
            return Err(("registry timeouts", "must be at least 1 second".into()));
        }
        Ok(())
    }
}
