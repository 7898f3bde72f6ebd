//! Forwarding of out-of-zone queries to configured upstream resolvers (opt-in).
//!
//! Deliberately small: the raw query goes over UDP to each upstream in order until one
//! answers with the same id within the timeout. The number in flight is capped; beyond
//! it, and when every upstream fails, the caller answers SERVFAIL.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

/// Forwards queries to upstream resolvers.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Arc<[SocketAddr]>,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Forwarder {
    /// A forwarder to `upstreams`, trying each for `timeout`, at most `max_in_flight` at once.
    pub fn new(upstreams: &[SocketAddr], timeout: Duration, max_in_flight: usize) -> Self {
        Forwarder {
            upstreams: upstreams.into(),
            timeout,
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// The upstream's raw response to the raw `query`, or `None` (over capacity, or no
    /// upstream answered).
    pub async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        let _permit = self.permits.try_acquire().ok()?;
        if query.len() < 12 {
            return None;
        }
        for upstream in self.upstreams.iter() {
            match self.ask(*upstream, query).await {
                Ok(Some(resp)) => return Some(resp),
                Ok(None) => tracing::debug!(%upstream, "upstream did not answer in time"),
                Err(e) => tracing::debug!(%upstream, error = %e, "upstream failed"),
            }
        }
        None
    }

    async fn ask(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let local: IpAddr = match upstream {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = UdpSocket::bind((local, 0)).await?;
        sock.connect(upstream).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; 65_535];
        let read = async {
            loop {
                let n = sock.recv(&mut buf).await?;
                // Only a response to this query (same id, QR set) counts.
                if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
                    return Ok::<usize, std::io::Error>(n);
                }
            }
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(n)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }
}
