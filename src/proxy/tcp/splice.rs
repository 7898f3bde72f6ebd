//! Zero-copy relay on Linux: `splice(2)` moves bytes from one socket into a kernel pipe
//! and from the pipe into the other socket, without copying them through user space.
//!
//! Each direction starts by copying through a small buffer and switches to a pipe once it
//! has moved [`SPLICE_AFTER`] bytes: a short request/response never pays for two pipes
//! (four descriptors and their syscalls), a bulk transfer is spliced.
//!
//! The copy buffers come from a small per-thread pool and are held only from a read until
//! its bytes are written, so an idle relay holds none and a thread reuses a few. A read
//! that returns less than asked means the socket is drained: its readiness is cleared
//! there (as tokio's own `poll_read` does) instead of paying for a read that would block.
//! When the second direction ends, the first has already half-closed: both sockets are
//! closed next, so its half-close is skipped (`close` sends the FIN).
//!
//! When a read drains a sender that has already half-closed cleanly (its FIN came with
//! its last bytes, as with a response followed by `close`), that direction is done: the
//! bytes are sent with `MSG_MORE` and the half-close is passed on at once, so both leave
//! in one segment (a short connection through the proxy went from about 20 segments to
//! 18) and no read is spent on learning of the end of stream.
//!
//! The system calls (`pipe2`, `splice`, `fcntl`, `recv`, `send`) are in [`crate::sys`],
//! each on file descriptors this module owns or borrows from a live `TcpStream`, each
//! with its result checked. Readiness comes from tokio's reactor
//! (`ready()` / `writable()` + `try_io`), so the sockets stay non-blocking and registered
//! exactly as tokio left them.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::metrics::ServiceMetrics;

/// Pipe capacity asked for (the kernel default is 64 KiB; more lets one splice move more).
const PIPE_SIZE: usize = 1024 * 1024;
/// Bytes a direction copies through user space before it switches to a pipe, so short
/// exchanges (most requests) never pay for creating one.
const SPLICE_AFTER: u64 = 64 * 1024;
/// The user-space buffer of that first phase.
const COPY_BUFFER: usize = 16 * 1024;
/// Most idle copy buffers a thread keeps for reuse.
const POOLED_BUFFERS: usize = 32;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer from this thread's pool (a fresh one if the pool is empty).
fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .with_borrow_mut(|pool| pool.pop())
        .unwrap_or_else(|| vec![0u8; COPY_BUFFER].into_boxed_slice())
}

/// Returns a copy buffer to this thread's pool.
fn put_buffer(buf: Box<[u8]>) {
    BUFFERS.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}

/// A pipe: the kernel buffer one direction splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write, size) = crate::sys::pipe(PIPE_SIZE)?;
        Ok(Pipe { read, write, size })
    }
}

use crate::sys::{recv, send, splice};

/// Relays both ways until both directions have ended (each with a half-close of the
/// other side) or one fails.
pub(super) async fn relay(
    client: &TcpStream,
    instance: &TcpStream,
    metrics: &ServiceMetrics,
    moved: &AtomicU64,
) -> io::Result<()> {
    let ended = AtomicBool::new(false);
    tokio::try_join!(
        one_way(client, instance, &metrics.to_instance, moved, &ended, false),
        one_way(instance, client, &metrics.to_client, moved, &ended, true),
    )?;
    Ok(())
}

/// Marks the error of an instance that reset the connection before a byte moved.
#[derive(Debug, thiserror::Error)]
#[error("instance reset the connection before any byte moved")]
struct EarlyReset;

/// Whether a relay error is an instance's reset before any byte moved (see
/// [`super::relay::RelayEnd::InstanceReset`]).
pub(super) fn is_early_reset(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<EarlyReset>())
}

/// One direction: copy through a small buffer for the first [`SPLICE_AFTER`] bytes, then
/// splice through a pipe for the rest.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    counter: &Counter,
    moved: &AtomicU64,
    ended: &AtomicBool,
    from_instance: bool,
) -> io::Result<()> {
    let mut copied = 0u64;
    let mut can_splice = true;
    loop {
        if can_splice && copied >= SPLICE_AFTER {
            match Pipe::new() {
                Ok(pipe) => {
                    return splice_rest(from, to, &pipe, counter, moved, ended).await;
                }
                Err(e) => {
                    // Out of descriptors for a pipe: keep copying this direction.
                    tracing::debug!(error = %e, "no pipe for splice; copying");
                    can_splice = false;
                }
            }
        }
        let (n, end) = match copy_once(from, to, moved).await {
            Ok(copied) => copied,
            Err(e)
                if from_instance
                    && e.kind() == io::ErrorKind::ConnectionReset
                    && moved.load(Ordering::Relaxed) == 0 =>
            {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, EarlyReset));
            }
            Err(e) => return Err(e),
        };
        counter.inc_by(n as u64);
        copied += n as u64;
        if end {
            return half_close(to, ended);
        }
    }
}

/// The rest of one direction, spliced through `pipe`.
async fn splice_rest(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &Counter,
    moved: &AtomicU64,
    ended: &AtomicBool,
) -> io::Result<()> {
    loop {
        // The pipe is empty here, so "would block" can only mean the socket has no data.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return half_close(to, ended);
        }
        // The pipe holds data here, so "would block" can only mean the socket is full.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.inc_by(n as u64);
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The sender is done: pass the half-close on, unless the other direction has ended
/// already (then both sockets are closed next, and `close` sends the FIN). The other side
/// may already be gone, which is fine.
fn half_close(to: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if !ended.swap(true, Ordering::Relaxed) {
        let _ = SockRef::from(to).shutdown(Shutdown::Write);
    }
    Ok(())
}

/// Reads once from `from` and writes all of it to `to`. Returns the bytes moved and
/// whether `from` has finished sending: at its end of stream, or when these bytes drained
/// a sender that had already half-closed cleanly. Those last bytes are sent with
/// `MSG_MORE`, and the half-close the caller passes on at once then leaves in the same
/// segment. Read bytes count in `moved` before they are written.
async fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
) -> io::Result<(usize, bool)> {
    loop {
        let ready = from.ready(Interest::READABLE).await?;
        let mut buf = take_buffer();
        let mut short = None;
        let read = from.try_io(Interest::READABLE, || {
            let n = recv(from.as_raw_fd(), &mut buf)?;
            if n > 0 && n < buf.len() {
                // Less than asked: the socket is drained. "Would block" clears its
                // readiness (unless an event arrived meanwhile), sparing a read.
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match (read, short) {
            (_, Some(n)) | (Ok(n), None) => n,
            (Err(e), None) => {
                put_buffer(buf);
                if e.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e);
            }
        };
        if n == 0 {
            put_buffer(buf);
            return Ok((0, true));
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        // Drained, and the FIN has come (not a reset): nothing more can arrive.
        let last = short.is_some() && ready.is_read_closed() && !ready.is_error();
        write_all(to, &buf[..n], last).await?;
        put_buffer(buf);
        return Ok((n, last));
    }
}

async fn write_all(to: &TcpStream, mut buf: &[u8], more: bool) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || send(to.as_raw_fd(), buf, more)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected loopback pair: (the proxy's end, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        (ours, peer)
    }

    /// Segments `s` has sent (`tcpi_segs_out`).
    fn segments_sent(s: &TcpStream) -> u32 {
        crate::sys::tcp_segments_out(s.as_raw_fd()).unwrap()
    }

    #[tokio::test]
    async fn last_bytes_and_the_half_close_leave_in_one_segment() {
        let (instance, mut instance_peer) = pair().await;
        let (client, mut client_peer) = pair().await;
        // The instance answers and closes before the relay reads anything.
        instance_peer.write_all(b"response").await.unwrap();
        instance_peer.shutdown().await.unwrap();
        // Until the relay's side has seen the FIN as well as the bytes.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !instance
                .ready(Interest::READABLE)
                .await
                .unwrap()
                .is_read_closed()
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();

        let before = segments_sent(&client);
        let (counter, moved, ended) = (
            Counter::default(),
            AtomicU64::new(0),
            AtomicBool::new(false),
        );
        one_way(&instance, &client, &counter, &moved, &ended, true)
            .await
            .unwrap();
        assert_eq!(
            segments_sent(&client) - before,
            1,
            "bytes and FIN in one segment"
        );

        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
        assert_eq!(counter.get(), 8);
        assert!(ended.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn an_answer_longer_than_a_buffer_arrives_whole_then_the_end() {
        let (instance, mut instance_peer) = pair().await;
        let (client, mut client_peer) = pair().await;
        // Several copy buffers' worth (still short of the switch to splice), then close.
        let answer: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let sent = answer.clone();
        let writer = tokio::spawn(async move {
            instance_peer.write_all(&sent).await.unwrap();
            instance_peer.shutdown().await.unwrap();
        });
        let (counter, moved, ended) = (
            Counter::default(),
            AtomicU64::new(0),
            AtomicBool::new(false),
        );
        let relay = one_way(&instance, &client, &counter, &moved, &ended, true);
        let mut got = Vec::new();
        let (relayed, read) = tokio::join!(relay, client_peer.read_to_end(&mut got));
        relayed.unwrap();
        read.unwrap();
        writer.await.unwrap();
        assert_eq!(got, answer);
        assert_eq!(counter.get(), 40_000);
    }
}
