//! Token buckets by client IP: the [`RateLimiter`] the API's state holds and the
//! `limit` middleware consults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

/// Most clients tracked at once; beyond it, idle buckets are forgotten.
const MAX_CLIENTS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by client IP.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// `per_sec` = 0 turns limiting off.
    pub(crate) fn new(per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `ip`, or says how many seconds until one is available.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), u64> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.last).as_secs_f64() * per_sec < burst
            });
            if buckets.len() >= MAX_CLIENTS {
                buckets.clear();
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_sec).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let l = RateLimiter::new(2, 3);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        for _ in 0..3 {
            l.check(ip).unwrap();
        }
        assert_eq!(l.check(ip), Err(1));
        l.check(other).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        l.check(ip).unwrap();
        assert!(l.check(ip).is_err());
    }

    #[test]
    fn zero_rate_means_unlimited() {
        let l = RateLimiter::new(0, 0);
        for _ in 0..10_000 {
            l.check(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        }
    }
}
