//! [`StallGuard`]: deadlines on a connection's I/O that hyper does not give, against
//! clients that hold a connection without using it.
//!
//! * **Write stall**: a write (or flush) that cannot make progress for `write_timeout` —
//!   the client stopped reading its answers — fails with `TimedOut`, so the connection
//!   ends instead of holding its slot forever. Any progress restarts the clock.
//! * **Preface** (optional): hyper-util's automatic HTTP/1–HTTP/2 detection waits for the
//!   first bytes with no timeout of its own, so a client that connects and sends nothing
//!   (or dribbles the HTTP/2 preface) would never reach hyper's header timeout. Until the
//!   bytes read settle the protocol (24 bytes of the HTTP/2 preface, or a byte that is
//!   not part of it), a read that waits past the deadline fails with `TimedOut`.
//! * **Fair HTTP/2 reads**: on an HTTP/2 connection each frame read charges the task's
//!   cooperative budget one unit (tokio charges one per read, however many frames it
//!   holds). hyper answers a PING or SETTINGS flood frame by frame within one poll of the
//!   connection; charged per frame, the connection yields to the others of its thread
//!   after about a hundred frames instead of tens of thousands (hundreds of milliseconds
//!   of other clients' latency). A DATA frame costs one unit like any other, so bulk
//!   transfers are not slowed.
//! * **HTTP/2 control-frame floods**: more than [`MAX_CONTROL_FRAMES`] PING or SETTINGS
//!   frames (ACKs aside) within [`CONTROL_WINDOW`] fail the read, which closes the
//!   connection. h2 answers them one at a time, so they never pile up in memory, but
//!   answering a flood is all the connection's thread would do meanwhile.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O object with a write-stall timeout and, optionally, a deadline for the first
/// bytes. See the module documentation.
#[derive(Debug)]
pub(crate) struct StallGuard<T> {
    io: T,
    write_timeout: Duration,
    write_stall: Option<Pin<Box<Sleep>>>,
    /// The deadline for the protocol-deciding first bytes; `None` once decided (or when
    /// there is none).
    preface: Option<Pin<Box<Sleep>>>,
    /// What the bytes read so far say about the protocol.
    sniff: Sniff,
    /// PING and SETTINGS frames received since `control_since`.
    control: usize,
    control_since: Option<Instant>,
}

/// More PING and SETTINGS frames (ACKs aside) than this within [`CONTROL_WINDOW`] close
/// an HTTP/2 connection. Clients send one SETTINGS per connection or a few, and PINGs
/// for keep-alive or window estimation: a handful a second at most.
pub(crate) const MAX_CONTROL_FRAMES: usize = 1000;
/// See [`MAX_CONTROL_FRAMES`].
pub(crate) const CONTROL_WINDOW: Duration = Duration::from_secs(10);

/// The protocol as told by the first bytes, and HTTP/2 frame boundaries after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniff {
    /// This many bytes of the HTTP/2 preface seen, nothing else.
    Preface(usize),
    /// HTTP/2: `header` bytes of the next frame header are in `head`; or `payload` bytes
    /// of the current frame are still to come.
    H2 {
        head: [u8; 9],
        header: usize,
        payload: usize,
    },
    /// Not HTTP/2.
    Other,
}

impl Sniff {
    /// Looks at `bytes`, the next read; returns how many frame headers ended in them, and
    /// how many of those were PING or SETTINGS frames that ask for an answer (not ACKs).
    fn feed(&mut self, mut bytes: &[u8]) -> (usize, usize) {
        let mut frames = 0;
        let mut control = 0;
        while !bytes.is_empty() {
            match self {
                Sniff::Other => return (frames, control),
                Sniff::Preface(seen) => {
                    if bytes[0] != H2_PREFACE[*seen] {
                        *self = Sniff::Other;
                        return (frames, control);
                    }
                    *seen += 1;
                    bytes = &bytes[1..];
                    if *seen == H2_PREFACE.len() {
                        *self = Sniff::H2 {
                            head: [0; 9],
                            header: 0,
                            payload: 0,
                        };
                    }
                }
                Sniff::H2 {
                    head,
                    header,
                    payload,
                } => {
                    if *payload > 0 {
                        let skip = (*payload).min(bytes.len());
                        *payload -= skip;
                        bytes = &bytes[skip..];
                        continue;
                    }
                    let take = (9 - *header).min(bytes.len());
                    head[*header..*header + take].copy_from_slice(&bytes[..take]);
                    *header += take;
                    bytes = &bytes[take..];
                    if *header == 9 {
                        *header = 0;
                        *payload = usize::from(head[0]) << 16
                            | usize::from(head[1]) << 8
                            | usize::from(head[2]);
                        frames += 1;
                        // SETTINGS (4) or PING (6) without the ACK flag.
                        if matches!(head[3], 4 | 6) && head[4] & 1 == 0 {
                            control += 1;
                        }
                    }
                }
            }
        }
        (frames, control)
    }

    fn decided(&self) -> bool {
        !matches!(self, Sniff::Preface(_))
    }
}

impl<T> StallGuard<T> {
    /// Fails writes that make no progress for `write_timeout`.
    pub(crate) fn new(io: T, write_timeout: Duration) -> Self {
        StallGuard {
            io,
            write_timeout,
            write_stall: None,
            preface: None,
            sniff: Sniff::Preface(0),
            control: 0,
            control_since: None,
        }
    }

    /// Also fails reads while the first bytes have not decided the protocol within
    /// `timeout` of now.
    pub(crate) fn with_preface_deadline(mut self, timeout: Duration) -> Self {
        self.preface = Some(Box::pin(tokio::time::sleep(timeout)));
        self
    }

    /// Counts `n` more control frames; true when they are a flood.
    fn control_flood(&mut self, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        let now = Instant::now();
        let since = *self.control_since.get_or_insert(now);
        if now.duration_since(since) >= CONTROL_WINDOW {
            self.control_since = Some(now);
            self.control = 0;
        }
        self.control += n;
        self.control > MAX_CONTROL_FRAMES
    }

    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.write_timeout;
        let sleep = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read its responses",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Handles a write-side poll result: progress disarms the stall clock, waiting arms it.
    fn on_write<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.write_stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => match self.stalled(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if fresh.is_empty() {
                    this.sniff = Sniff::Other;
                }
                let (frames, control) = this.sniff.feed(fresh);
                // The read itself already cost one unit.
                charge(cx, frames.saturating_sub(1));
                if this.control_flood(control) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "HTTP/2 PING or SETTINGS flood",
                    )));
                }
                if this.sniff.decided() {
                    this.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let late = match &mut this.preface {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if !late {
                    return Poll::Pending;
                }
                this.preface = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request from the client in time",
                )))
            }
            err => err,
        }
    }
}

/// Takes up to `units` more units of the task's cooperative budget. Once it is spent, the
/// next read (or any other tokio resource) returns `Pending` and the task yields; the
/// bytes just read are not held back.
fn charge(cx: &mut Context<'_>, units: usize) {
    for _ in 0..units {
        match tokio::task::coop::poll_proceed(cx) {
            Poll::Ready(spent) => spent.made_progress(),
            Poll::Pending => return,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        this.on_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.on_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn sniffing_finds_http2_frames_across_reads() {
        let mut s = Sniff::Preface(0);
        assert_eq!(s.feed(&H2_PREFACE[..10]), (0, 0));
        assert!(!s.decided());
        let mut rest = H2_PREFACE[10..].to_vec();
        // SETTINGS (empty), then PING (8 bytes), then the head of a DATA frame of 5.
        rest.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        rest.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        rest.extend_from_slice(&[0, 0, 5, 0, 0]);
        assert_eq!(s.feed(&rest), (2, 2));
        assert!(s.decided());
        assert_eq!(s.feed(&[0, 0, 0, 1]), (1, 0));
        assert_eq!(s.feed(b"hello"), (0, 0));
        // A SETTINGS ACK is no control frame to answer.
        assert_eq!(s.feed(&[0, 0, 0, 4, 1, 0, 0, 0, 0]), (1, 0));
        let mut h1 = Sniff::Preface(0);
        assert_eq!(h1.feed(b"GET / HTTP/1.1\r\n"), (0, 0));
        assert_eq!(h1, Sniff::Other);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_flood_fails_the_read_but_keep_alive_pings_do_not() {
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut g = StallGuard::new(a, Duration::from_secs(3));
        b.write_all(H2_PREFACE).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(g.read(&mut buf).await.unwrap(), H2_PREFACE.len());
        // One a second for longer than the window: fine.
        for _ in 0..30 {
            b.write_all(&ping).await.unwrap();
            assert_eq!(g.read(&mut buf).await.unwrap(), ping.len());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // A thousand at once: not.
        b.write_all(&ping.repeat(MAX_CONTROL_FRAMES + 1))
            .await
            .unwrap();
        let e = loop {
            match g.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_times_out() {
        let (a, _b) = tokio::io::duplex(16);
        let mut g = StallGuard::new(a, Duration::from_secs(3));
        let e = g.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_before_the_first_bytes_times_out_but_not_after() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_secs(3))
            .with_preface_deadline(Duration::from_secs(1));
        let e = g.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        // The HTTP/2 preface dribbled: still under the deadline.
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_secs(3))
            .with_preface_deadline(Duration::from_secs(1));
        b.write_all(b"PRI * HTTP").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(g.read(&mut buf).await.unwrap(), 10);
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        // HTTP/1.1 decided by its first byte: later silence is hyper's business.
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_secs(3))
            .with_preface_deadline(Duration::from_secs(1));
        b.write_all(b"GET").await.unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 3);
        let read = tokio::time::timeout(Duration::from_secs(5), g.read(&mut buf)).await;
        assert!(read.is_err(), "no deadline once the protocol is known");
    }
}
