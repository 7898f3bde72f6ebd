//! Batched UDP I/O for the fast path on Linux: `recvmmsg` takes up to [`BATCH`] queries
//! in one system call and `sendmmsg` returns their answers in one more, as knot and nsd
//! do. At hundreds of thousands of queries a second the system calls are most of the
//! cost, so this is where the fast path's single-core throughput comes from.
//!
//! Two libc calls whose buffers, iovecs and address storage are owned by [`Batch`] (or
//! borrowed for the duration of the call) and whose lengths are bounded by the sizes
//! passed in.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
/// Largest query accepted (longer ones are truncated by the kernel and fail to parse).
const BUF: usize = 4096;

/// Receive buffers and source addresses for one batch.
pub(crate) struct Batch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    count: usize,
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            bufs: vec![0u8; BATCH * BUF],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            count: 0,
        }
    }

    /// Blocks until at least one datagram arrives (or the socket's read timeout passes),
    /// then takes every one already queued, up to [`BATCH`]. Returns how many.
    pub(crate) fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr are valid (null pointers, zero lengths); every
        // field the kernel reads is set below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i].iov_base = self.bufs[i * BUF..].as_mut_ptr().cast();
            iovs[i].iov_len = BUF;
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds BATCH valid headers, each pointing at a BUF-byte region of
        // `self.bufs` and at one `sockaddr_storage` of `self.addrs`, all alive and not
        // otherwise borrowed during the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        self.count = n as usize;
        for (len, msg) in self.lens.iter_mut().zip(msgs.iter()).take(self.count) {
            *len = (msg.msg_len as usize).min(BUF);
        }
        Ok(self.count)
    }

    /// Datagram `i` of the last batch and where it came from.
    pub(crate) fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let data = &self.bufs[i * BUF..i * BUF + self.lens[i]];
        (data, to_socket_addr(&self.addrs[i]))
    }

    /// Sends each `(i, bytes)` to the source of datagram `i`, in as few calls as the
    /// kernel allows. A datagram the kernel refuses is skipped.
    pub(crate) fn send(&self, sock: &UdpSocket, replies: &[(usize, &[u8])]) {
        let mut start = 0;
        while start < replies.len() {
            let chunk = &replies[start..];
            // SAFETY: as in `recv`; zeroed headers are valid and filled below.
            let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            let n = chunk.len().min(BATCH);
            for (j, (i, bytes)) in chunk.iter().take(n).enumerate() {
                // The kernel only reads through these pointers for a send.
                iovs[j].iov_base = bytes.as_ptr() as *mut libc::c_void;
                iovs[j].iov_len = bytes.len();
                let hdr = &mut msgs[j].msg_hdr;
                hdr.msg_name =
                    (&self.addrs[*i] as *const libc::sockaddr_storage) as *mut libc::c_void;
                hdr.msg_namelen = addr_len(&self.addrs[*i]);
                hdr.msg_iov = &mut iovs[j];
                hdr.msg_iovlen = 1;
            }
            // SAFETY: `msgs[..n]` point at live reply bytes and address storage, which the
            // kernel reads only.
            let sent = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0)
            };
            if sent <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first datagram failed (e.g. an unroutable source): drop it, go on.
                tracing::debug!(error = %e, "DNS UDP send failed");
                start += 1;
            } else {
                start += sent as usize;
            }
        }
    }
}

fn addr_len(ss: &libc::sockaddr_storage) -> libc::socklen_t {
    let len = match ss.ss_family as libc::c_int {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => std::mem::size_of::<libc::sockaddr_storage>(),
    };
    len as libc::socklen_t
}

fn to_socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and aligned enough for.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_round_trips() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        for i in 0..5u8 {
            client
                .send_to(&[i; 3], server.local_addr().unwrap())
                .unwrap();
        }
        let mut batch = Batch::new();
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = batch.recv(&server).unwrap();
            let mut replies = Vec::new();
            for i in 0..n {
                let (data, src) = batch.datagram(i);
                assert_eq!(src, Some(client.local_addr().unwrap()));
                got.push(data.to_vec());
                replies.push((i, data));
            }
            let owned: Vec<(usize, Vec<u8>)> =
                replies.iter().map(|(i, d)| (*i, d.to_vec())).collect();
            let refs: Vec<(usize, &[u8])> = owned.iter().map(|(i, d)| (*i, d.as_slice())).collect();
            batch.send(&server, &refs);
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
        let mut buf = [0u8; 16];
        for i in 0..5u8 {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 3]);
        }
    }
}
