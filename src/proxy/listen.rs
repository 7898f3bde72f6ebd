//! Listening sockets shared by a proxy's worker threads: one socket per worker on the same
//! address (`SO_REUSEPORT`, so the kernel spreads new connections evenly and each worker
//! accepts on its own queue), used by the TCP and the HTTP proxy alike.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Listen backlog of every proxy socket.
const LISTEN_BACKLOG: i32 = 4096;

/// One listening socket per worker from the first one: more `SO_REUSEPORT` sockets on its
/// address when it has that option (see [`bind_listeners`]), else copies of the one
/// socket.
pub(crate) fn spread_listener(
    first: std::net::TcpListener,
    workers: usize,
) -> Vec<std::net::TcpListener> {
    let mut out = Vec::with_capacity(workers);
    // Set on the listener, TCP_NODELAY is inherited by every accepted connection: one
    // setsockopt per socket instead of one per connection.
    if let Err(e) = SockRef::from(&first).set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY on a listening socket");
    }
    let addr = first.local_addr();
    let reuse_port = SockRef::from(&first).reuse_port().unwrap_or(false);
    for _ in 1..workers {
        let extra = match (&addr, reuse_port) {
            (Ok(addr), true) => bind_one(*addr, true),
            _ => first.try_clone(),
        };
        match extra {
            Ok(l) => out.push(l),
            Err(e) => {
                tracing::warn!(error = %e, "a listening socket for a worker");
                break;
            }
        }
    }
    out.insert(0, first);
    out
}

/// Binds `count` listening sockets on `addr` (`SO_REUSEPORT` when more than one, so the
/// kernel spreads new connections over them).
pub(crate) fn bind_listeners(
    addr: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_first(addr, count > 1)?;
    let addr = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..count {
        out.push(bind_one(addr, true)?);
    }
    Ok(out)
}

/// Binds `count` listening sockets on `addr` that join an `SO_REUSEPORT` group already
/// there: the nodes of one cluster on one host all serve each VIP, and the kernel spreads
/// new connections over every node's sockets (as kube-proxy runs on every host). An
/// address another program holds without `SO_REUSEPORT` still fails to bind.
pub(crate) fn bind_shared_listeners(
    addr: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    (0..count.max(1)).map(|_| bind_one(addr, true)).collect()
}

/// Binds the first listener on `addr`. With `reuse_port`, a plain bind probes the address
/// first, so the group never joins a socket another program holds with `SO_REUSEPORT`:
/// a taken address fails here like any bind would.
pub(crate) fn bind_first(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    if reuse_port && addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    bind_one(addr, reuse_port)
}

/// Binds one listener with `SO_REUSEADDR` (and `SO_REUSEPORT` if asked), `TCP_NODELAY`
/// (inherited by the connections it accepts) and a deep backlog.
fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_connections_inherit_nodelay_from_every_listener() {
        // A listener made elsewhere (without the option), and one bound here.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut listeners = spread_listener(plain, 1);
        listeners.extend(bind_listeners("127.0.0.1:0".parse().unwrap(), 1).unwrap());
        for l in &listeners {
            let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            l.set_nonblocking(false).unwrap();
            let (accepted, _) = l.accept().unwrap();
            assert!(
                accepted.nodelay().unwrap(),
                "accepted on {:?}",
                l.local_addr()
            );
        }
        // Every socket of a group has it.
        for l in bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap() {
            assert!(SockRef::from(&l).tcp_nodelay().unwrap());
        }
    }
}
