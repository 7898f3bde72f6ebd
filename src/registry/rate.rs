//! Per-peer-IP token buckets for registrations.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

use super::settings::RegistryLimits;

/// Buckets kept before idle ones are pruned.
const PRUNE_AT: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Allows `rate` registrations per second per peer IP, in bursts of up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    exempt_loopback: bool,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: &RegistryLimits) -> Self {
        RateLimiter {
            rate: f64::from(limits.register_rate_per_ip),
            burst: f64::from(limits.register_burst_per_ip.max(1)),
            exempt_loopback: limits.rate_limit_exempt_loopback,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; false when it has none left.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.rate == 0.0 || (self.exempt_loopback && ip.is_loopback()) {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            // Drop buckets that have refilled completely: they carry no information.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(rate: u32, burst: u32, exempt: bool) -> RateLimiter {
        RateLimiter::new(&RegistryLimits {
            register_rate_per_ip: rate,
            register_burst_per_ip: burst,
            rate_limit_exempt_loopback: exempt,
            ..RegistryLimits::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_then_refills() {
        let l = limiter(10, 3, false);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(ip)));
        assert!(!l.allow(ip));
        // Another peer has its own bucket.
        assert!(l.allow("192.0.2.2".parse().unwrap()));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.allow(ip));
        assert!(!l.allow(ip));
    }

    #[tokio::test(start_paused = true)]
    async fn loopback_exemption_and_off() {
        let l = limiter(1, 1, true);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!((0..100).all(|_| l.allow(lo)));
        let l = limiter(0, 1, false);
        assert!((0..100).all(|_| l.allow("192.0.2.1".parse().unwrap())));
    }
}
