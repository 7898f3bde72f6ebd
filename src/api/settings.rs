//! The HTTP API's settings (the `[api]` table) and their defaults.

use serde::{Deserialize, Serialize};

/// HTTP API limits (`[api]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Largest request body accepted; larger ones get 413. Default 65536.
    pub max_body_bytes: usize,
    /// Requests per second each client IP may make (token bucket refill); 0 turns the
    /// limit off. Default 200.
    pub rate_limit_per_sec: u32,
    /// Burst size of each client's bucket. Default 400.
    pub rate_limit_burst: u32,
    /// Longest `wait` a blocking query may ask for, in seconds. Default 600.
    pub max_wait_secs: u64,
    /// Most simultaneous server-sent-event streams. Default 1024.
    pub max_event_streams: usize,
    /// Most simultaneous HTTP connections; more wait to be accepted. Default 4096.
    pub max_connections: usize,
    /// Milliseconds a client has to send a request's head, its first one included (against
    /// slowloris and silent connections); a keep-alive connection waiting for its next
    /// request also closes after this long. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a response (or an event stream) may wait for the client to read it;
    /// a client that stops reading is disconnected after this long. Default 30000.
    pub write_timeout_ms: u64,
    /// How often the dashboard's traffic series (`/v1/traffic`) sample the proxies, in
    /// milliseconds; each service keeps 180 samples (15 minutes at the default).
    /// 100..=60000, default 5000.
    pub traffic_interval_ms: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_body_bytes: 64 * 1024,
            rate_limit_per_sec: 200,
            rate_limit_burst: 400,
            max_wait_secs: 600,
            max_event_streams: 1024,
            max_connections: 4096,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            traffic_interval_ms: 5000,
        }
    }
}

impl ApiSettings {
    /// Checks the limits can work: the key and the reason when they cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |key, reason: &str| Err((key, reason.to_string()));
        if self.max_body_bytes < 1024 {
            return bad("api.max_body_bytes", "must be at least 1024");
        }
        if self.rate_limit_per_sec > 0 && self.rate_limit_burst == 0 {
            return bad(
                "api.rate_limit_burst",
                "must be at least 1 when rate limiting",
            );
        }
        if !(100..=60_000).contains(&self.traffic_interval_ms) {
            return bad("api.traffic_interval_ms", "must be between 100 and 60000");
        }
        if self.max_wait_secs == 0 || self.max_event_streams == 0 {
            return bad("api.max_wait_secs/max_event_streams", "must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("api.max_connections", "must be at least 1");
        }
        if self.header_read_timeout_ms == 0 {
            return bad("api.header_read_timeout_ms", "must be at least 1 ms");
        }
        if self.write_timeout_ms == 0 {
            return bad("api.write_timeout_ms", "must be at least 1 ms");
        }
        Ok(())
    }
}
