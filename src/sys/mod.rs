//! The one home of NetSel's `unsafe` code: the raw system calls the rest of the crate
//! needs and no well-kept crate wraps for it, each behind a safe function.
//!
//! * [`mmsg`]: `recvmmsg`/`sendmmsg`, the DNS fast path's batched UDP I/O.
//! * [`recv`], [`send`], [`pipe`], [`splice`], [`tcp_segments_out`]: the TCP relay's
//!   zero-copy path.
//! * [`yield_cpu`], [`allowed_cpus`], [`pin_current_thread`], [`set_time_slice`],
//!   [`time_slice_and_nice`]: the proxies' worker threads and their scheduling.
//! * [`worker_threads`]: how many worker threads the proxies and the DNS fast path run
//!   (no system call of its own, but the one place the rule is written).
//! * [`kill`]: `netsel run` forwarding a signal to its child.
//! * [`clock_ticks_per_sec`]: the unit of CPU times in `/proc` (the `process_*` metrics).
//!
//! Hand-written because the crates that cover these calls do not cover all of them
//! (`sched_setattr` is in none) and the hot ones (`splice`, `recvmmsg`) are measured here
//! at the cost of one libc call. Every `unsafe` block says why it is sound (SAFETY), and
//! every function has a test below. The rest of the crate denies `unsafe_code`.

#![allow(unsafe_code)]

pub(crate) mod mmsg;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `recv(2)` into `buf` (the socket decides whether it blocks).
pub(crate) fn recv(from: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `from` is open for the
    // duration of the call (the caller borrows it from a live socket).
    check(unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) })
}

/// `send(2)` from `buf`, never raising SIGPIPE; with `more`, the kernel holds the bytes
/// back for what follows (`MSG_MORE`).
pub(crate) fn send(to: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `to` is open for the
    // duration of the call (the caller borrows it from a live socket).
    check(unsafe { libc::send(to, buf.as_ptr().cast(), buf.len(), flags) })
}

/// A non-blocking, close-on-exec pipe, asked to hold `size` bytes: (read end, write end,
/// the size the kernel granted; 64 KiB if it refused).
pub(crate) fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let want = i32::try_from(size).unwrap_or(i32::MAX);
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure (a lower system limit) is harmless
    // and leaves the default size.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&write),
            libc::F_SETPIPE_SZ,
            want,
        )
    };
    let granted = if rc > 0 { rc as usize } else { 64 * 1024 };
    Ok((read, write, granted))
}

/// Moves up to `len` bytes from `from` to `to` (one of them a pipe), never blocking.
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from a
    // live socket or an owned pipe); null offsets are what splice expects for sockets and
    // pipes.
    check(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// Segments a TCP socket has sent (`tcpi_segs_out` of `TCP_INFO`); the relay's tests
/// count segments with it.
#[cfg(test)]
pub(crate) fn tcp_segments_out(fd: RawFd) -> io::Result<u32> {
    // SAFETY: `info` is a plain struct owned here and `len` its size: getsockopt writes at
    // most `len` bytes into it; the descriptor is open (borrowed from a live socket).
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info.tcpi_segs_out)
    }
}

/// Gives the CPU to whatever else is runnable on it (returns at once when nothing is).
pub(crate) fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments, touches no memory of ours, and cannot fail
    // on Linux.
    unsafe {
        libc::sched_yield();
    }
}

/// How many worker threads a part runs: the one rule for `[tcp_proxy] workers`,
/// `[http_proxy] workers` and `[dns] udp_workers`.
///
/// * the setting, if it is not 0;
/// * else `TOKIO_WORKER_THREADS`, if it is set to a whole number of at least 1;
/// * else one per CPU (`std::thread::available_parallelism`, which honours the affinity
///   mask and cgroup CPU quotas; 1 if it cannot tell).
///
/// A number from the environment or the CPU count is held to at most 1024, the most a
/// setting may ask for. A part may add a limit of its own on top (the DNS fast path
/// runs at most 8 by default, see `dns::fast`).
pub(crate) fn worker_threads(setting: usize) -> usize {
    if setting > 0 {
        return setting;
    }
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(1024)
}

/// The CPUs this process may run on (its affinity mask, which honours cpusets and
/// `taskset`), in order; empty if it cannot be read.
#[cfg(target_os = "linux")]
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set owned here; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Binds the calling thread to one CPU.
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `set` is a plain bit set owned here, `cpu` is within its size (checked
    // above), and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(_cpu: usize) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// `struct sched_attr` (the first version, 56 bytes), for `sched_setattr(2)`.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Asks the scheduler to run the calling thread in slices of `slice` (kept as it is: the
/// normal policy and its nice value). Kernels before 6.12 ignore the slice of a normal
/// thread; newer ones clamp it to 0.1–100 ms.
#[cfg(target_os = "linux")]
pub(crate) fn set_time_slice(slice: Duration) -> io::Result<()> {
    // getpriority returns -1 for nice -1 too: errno tells an error apart.
    // SAFETY: errno is this thread's; getpriority only reads the calling thread's nice.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid sched_attr of the size it declares, read by the kernel
    // during the call; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn set_time_slice(_slice: Duration) -> io::Result<()> {
    Ok(())
}

/// The calling thread's time slice (ns) and nice value, as the kernel reports them; the
/// workers' tests read it back.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn time_slice_and_nice() -> io::Result<(u64, i32)> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is writable for `size` bytes; pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((attr.runtime, attr.nice))
}

/// Sends `signal` to process `pid`; false if it could not (the process is gone).
pub(crate) fn kill(pid: u32, signal: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a stale pid at
    // worst fails with ESRCH.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/*/stat` (100 if unknown).
pub(crate) fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf reads a system constant; it takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn worker_threads_takes_a_setting_as_is_and_otherwise_at_least_one() {
        // TOKIO_WORKER_THREADS is left alone: tests run in parallel threads.
        assert_eq!(worker_threads(3), 3);
        assert!((1..=1024).contains(&worker_threads(0)));
    }

    #[test]
    fn clock_ticks_per_sec_is_positive() {
        let n = clock_ticks_per_sec();
        assert!((1..=100_000).contains(&n), "{n}");
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn send_recv_pipe_and_splice_move_bytes() {
        let (a, mut b) = pair();
        assert_eq!(send(a.as_raw_fd(), b"hello", false).unwrap(), 5);
        let mut buf = [0u8; 16];
        let n = recv(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        // Socket -> pipe -> socket.
        let (r, w, size) = pipe(1 << 20).unwrap();
        assert!(size >= 64 * 1024);
        b.write_all(b"spliced").unwrap();
        let mut moved = 0;
        while moved < 7 {
            match splice(a.as_raw_fd(), w.as_raw_fd(), 64) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(splice(r.as_raw_fd(), b.as_raw_fd(), 64).unwrap(), 7);
        let mut out = [0u8; 7];
        (&a).read_exact(&mut out).unwrap_or_else(|_| panic!("read"));
        assert_eq!(&out, b"spliced");
        assert!(tcp_segments_out(b.as_raw_fd()).unwrap() >= 2);
        assert!(recv(-1, &mut buf).is_err() && send(-1, b"x", true).is_err());
        assert!(tcp_segments_out(-1).is_err());
    }

    #[test]
    fn scheduling_calls_answer() {
        yield_cpu();
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        std::thread::spawn(move || {
            pin_current_thread(cpus[0]).unwrap();
            assert_eq!(allowed_cpus(), vec![cpus[0]]);
            assert!(pin_current_thread(usize::MAX).is_err());
            set_time_slice(Duration::from_micros(500)).unwrap();
            let (_, nice) = time_slice_and_nice().unwrap();
            assert!((-20..=19).contains(&nice));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn kill_with_signal_zero_probes_a_process() {
        assert!(kill(std::process::id(), 0));
        assert!(!kill(u32::MAX, 0));
    }
}
