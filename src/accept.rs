//! The one accept loop of every TCP listener (registry, API, Consul API, DNS over TCP, both
//! proxies): the next connection, or nothing once shutdown fires. An accept that fails
//! (out of file descriptors, usually) is logged and retried after a back-off that doubles
//! from 5 ms to 1 s and resets on success, and shutdown is honoured while backing off.
//! What happens to an accepted connection beyond its listener's cap (refused, or waiting
//! for a slot) stays with each listener, which counts it in its own metrics.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A listener's accept loop.
#[derive(Debug)]
pub(crate) struct Acceptor {
    listener: TcpListener,
    /// The listener's name in logs (`registry`, `api`, `dns`, `http proxy`, …).
    what: String,
    backoff: Duration,
}

impl Acceptor {
    pub(crate) fn new(listener: TcpListener, what: impl Into<String>) -> Self {
        Acceptor {
            listener,
            what: what.into(),
            backoff: MIN_BACKOFF,
        }
    }

    /// The next connection, or `None` once `shutdown` has fired (checked first, so a
    /// stopping server takes no new connection).
    pub(crate) async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok(a) => {
                    self.backoff = MIN_BACKOFF;
                    return Some(a);
                }
                Err(e) => {
                    tracing::warn!(error = %e, listener = %self.what,
                        retry_in_ms = self.backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The listening socket (for draining what the kernel already completed).
    pub(crate) fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, "test");
        let stop = CancellationToken::new();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_, peer) = acceptor.next(&stop).await.expect("a connection");
        assert_eq!(peer, client.local_addr().unwrap());
        stop.cancel();
        // Even with a connection waiting, a stopped acceptor takes nothing.
        let _waiting = TcpStream::connect(addr).await.unwrap();
        assert!(acceptor.next(&stop).await.is_none());
    }
}
