//! Moving bytes between a client and an instance, both ways, until both sides are done.
//!
//! Each direction ends with a half-close: when one side stops sending, the other side's
//! write half is shut down and the opposite direction keeps flowing. A relay also ends
//! when no byte has moved either way for the idle timeout, or when the proxy's drain
//! deadline passes. Bytes are counted per direction as they move.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::metrics::ServiceMetrics;
use super::settings::RelayMode;

/// User-space buffer per direction in `copy` mode.
const COPY_BUFFER: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub(super) enum RelayEnd {
    /// Both sides finished sending.
    Done,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The drain deadline passed during shutdown.
    Drained,
    /// A socket error (a reset, usually).
    Failed(io::Error),
    /// The instance reset the connection before a byte moved either way (it died with
    /// the connection still in its accept queue): the client saw nothing, so another
    /// instance may be tried. (Detected by the `splice` relay.)
    InstanceReset,
}

impl std::fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayEnd::Done => f.write_str("done"),
            RelayEnd::Idle => f.write_str("idle timeout"),
            RelayEnd::Drained => f.write_str("drain deadline"),
            RelayEnd::Failed(e) => write!(f, "failed: {e}"),
            RelayEnd::InstanceReset => f.write_str("instance reset before any byte"),
        }
    }
}

/// Relays between `client` and `instance` until both directions end, the connection is
/// idle for `idle`, or `force_close` fires.
pub(super) async fn relay(
    client: &mut TcpStream,
    instance: &mut TcpStream,
    metrics: &ServiceMetrics,
    idle: Duration,
    mode: RelayMode,
    force_close: &CancellationToken,
) -> RelayEnd {
    let activity = AtomicU64::new(0);
    let moved = &activity;
    let copy = async move {
        #[cfg(target_os = "linux")]
        if mode == RelayMode::Splice {
            return super::splice::relay(client, instance, metrics, moved).await;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = mode;
        let mut c = Metered {
            io: client,
            read: &metrics.to_instance,
            moved,
        };
        let mut i = Metered {
            io: instance,
            read: &metrics.to_client,
            moved,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut i, COPY_BUFFER, COPY_BUFFER)
            .await
            .map(|_| ())
    };
    tokio::select! {
        r = copy => match r {
            Ok(()) => RelayEnd::Done,
            #[cfg(target_os = "linux")]
            Err(e) if super::splice::is_early_reset(&e) => RelayEnd::InstanceReset,
            Err(e) => RelayEnd::Failed(e),
        },
        _ = idle_watch(&activity, idle) => RelayEnd::Idle,
        _ = force_close.cancelled() => RelayEnd::Drained,
    }
}

/// Returns once `moved` has not changed for `idle` (checked in quarters of it, so the
/// connection is closed between `idle` and 1.25 × `idle` after its last byte).
async fn idle_watch(moved: &AtomicU64, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(1));
    let mut last = moved.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            last = now;
            quiet = Duration::ZERO;
        }
    }
}

/// A stream that counts the bytes read from it.
struct Metered<'a> {
    io: &'a mut TcpStream,
    read: &'a Counter,
    moved: &'a AtomicU64,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read.inc_by(n);
            this.moved.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_watch_waits_for_quiet() {
        let moved = AtomicU64::new(0);
        let start = tokio::time::Instant::now();
        let watch = idle_watch(&moved, Duration::from_secs(4));
        tokio::pin!(watch);
        // Activity every 2 s keeps it waiting.
        for _ in 0..5 {
            tokio::select! {
                _ = &mut watch => panic!("ended while bytes moved"),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            moved.fetch_add(1, Ordering::Relaxed);
        }
        watch.await;
        let quiet = start.elapsed() - Duration::from_secs(10);
        assert!(
            quiet >= Duration::from_secs(4) && quiet <= Duration::from_secs(5),
            "{quiet:?}"
        );
    }
}
