//! Zero-copy relay on Linux: `splice(2)` moves bytes from one socket into a kernel pipe
//! and from the pipe into the other socket, without copying them through user space.
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

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::metrics::ServiceMetrics;

/// Pipe capacity asked for (the kernel default is 64 KiB; more lets one splice move more).
const PIPE_SIZE: usize = 256 * 1024;

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

/// One pipe per direction.
pub(super) struct Pipes {
    to_instance: Pipe,
    to_client: Pipe,
}

impl Pipes {
    /// Two fresh pipes (four file descriptors).
    pub(super) fn new() -> io::Result<Pipes> {
        Ok(Pipes {
            to_instance: Pipe::new()?,
            to_client: Pipe::new()?,
        })
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

/// Relays both ways through `pipes` until both directions have ended (each with a
/// half-close of the other side) or one fails.
pub(super) async fn relay(
    client: &TcpStream,
    instance: &TcpStream,
    pipes: &Pipes,
    metrics: &ServiceMetrics,
    moved: &AtomicU64,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(
            client,
            instance,
            &pipes.to_instance,
            &metrics.to_instance,
            moved
        ),
        one_way(
            instance,
            client,
            &pipes.to_client,
            &metrics.to_client,
            moved
        ),
    )?;
    Ok(())
}

async fn one_way(
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
            // The sender is done: pass the half-close on. The other side may already be
            // gone, which is fine.
            let _ = SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(());
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
