//! Zero-copy relay on Linux: `splice(2)` moves bytes from one socket into a kernel pipe
//! and from the pipe into the other socket, without copying them through user space.
//!
//! Each direction starts by copying through a small buffer and switches to a pipe once it
//! has moved [`SPLICE_AFTER`] bytes: a short request/response never pays for two pipes
//! (four descriptors and their syscalls), a bulk transfer is spliced.
//!
//! This is the only module of the crate with `unsafe` code: three libc calls (`pipe2`,
//! `splice`, `fcntl`), each on file descriptors this module owns or borrows from a live
//! `TcpStream`, each with its result checked. Readiness comes from tokio's reactor
//! (`readable()` / `writable()` + `try_io`), so the sockets stay non-blocking and
//! registered exactly as tokio left them.
#![allow(unsafe_code)]

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
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

/// A pipe: the kernel buffer one direction splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure (a lower system limit) is harmless
        // and leaves the default size.
        let rc = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as i32) };
        let size = if rc > 0 { rc as usize } else { 64 * 1024 };
        Ok(Pipe { read, write, size })
    }
}

/// Moves up to `len` bytes from `from` to `to`, never blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from a
    // live TcpStream or an owned pipe); null offsets are what splice expects for sockets
    // and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Relays both ways until both directions have ended (each with a half-close of the
/// other side) or one fails.
pub(super) async fn relay(
    client: &TcpStream,
    instance: &TcpStream,
    metrics: &ServiceMetrics,
    moved: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(client, instance, &metrics.to_instance, moved),
        one_way(instance, client, &metrics.to_client, moved),
    )?;
    Ok(())
}

/// One direction: copy through a small buffer for the first [`SPLICE_AFTER`] bytes, then
/// splice through a pipe for the rest.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    counter: &Counter,
    moved: &AtomicU64,
) -> io::Result<()> {
    // Never zeroed: reads fill its spare capacity directly.
    let mut buf = BytesMut::with_capacity(COPY_BUFFER);
    let mut copied = 0u64;
    let mut can_splice = true;
    loop {
        if can_splice && copied >= SPLICE_AFTER {
            match Pipe::new() {
                Ok(pipe) => {
                    drop(buf);
                    return splice_rest(from, to, &pipe, counter, moved).await;
                }
                Err(e) => {
                    // Out of descriptors for a pipe: keep copying this direction.
                    tracing::debug!(error = %e, "no pipe for splice; copying");
                    can_splice = false;
                }
            }
        }
        buf.clear();
        let n = read(from, &mut buf).await?;
        if n == 0 {
            return half_close(to);
        }
        write_all(to, &buf).await?;
        counter.inc_by(n as u64);
        moved.fetch_add(n as u64, Ordering::Relaxed);
        copied += n as u64;
    }
}

/// The rest of one direction, spliced through `pipe`.
async fn splice_rest(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &Counter,
    moved: &AtomicU64,
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
            return half_close(to);
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

/// The sender is done: pass the half-close on. The other side may already be gone, which
/// is fine.
fn half_close(to: &TcpStream) -> io::Result<()> {
    let _ = SockRef::from(to).shutdown(Shutdown::Write);
    Ok(())
}

async fn read(from: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
