//! The DNS server: authoritative for the NetSel domain (default `netsel.`), answering from
//! the newest catalog snapshot.
//!
//! * [`DnsHandler`] (`handler.rs`) is a hickory-server [`RequestHandler`]. It reads
//!   `catalog.snapshot()` for every query and turns it into records with the pure function
//!   [`plan`] (`answer.rs`); it keeps no cache, so an answer reflects a registration or
//!   expiry as soon as the catalog does.
//! * TCP is served by NetSel's own loop (`tcp.rs`): capped at `tcp_max_connections`, with
//!   the same answers as UDP (never truncated), and read and write timeouts.
//! * UDP is served by the fast path (`fast.rs`): a few threads on the shared socket that
//!   keep the encoded answer per distinct query (minus its id) for the current catalog
//!   index only, and patch the id and the question's letter case into a copy. Any catalog
//!   change clears it, so it can never be staler than the catalog. With
//!   `fast_path = false` hickory's UDP loop is used instead (same handler).
//! * Queries for names outside the zone go to the configured upstreams, if any, through
//!   [`Forwarder`] (`forward.rs`). [`DnsSettings`] (`settings.rs`) and [`DnsMetrics`]
//!   (`metrics.rs`) have files of their own; this file binds the sockets and starts the
//!   loops ([`bind`], [`serve`]).
//!
//! See `docs/dns.md` for the names answered and the protocol behaviour.
//!
//! [`RequestHandler`]: hickory_server::server::RequestHandler

mod answer;
pub(crate) mod fast;
mod forward;
mod handler;
mod metrics;
mod settings;
mod tcp;
#[cfg(target_os = "linux")]
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use answer::{MAX_UDP_PAYLOAD, Plan, Reply, Zone, ZoneError, plan};
pub use forward::Forwarder;
pub use handler::DnsHandler;
pub(crate) use handler::RawAnswer;
pub use metrics::DnsMetrics;
pub use settings::DnsSettings;

/// The DNS listeners: one UDP socket and one TCP listener on the same address.
#[derive(Debug)]
pub struct DnsSockets {
    /// UDP, blocking mode off.
    pub udp: std::net::UdpSocket,
    /// TCP.
    pub tcp: TcpListener,
}

impl DnsSockets {
    /// The address both are bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Binds UDP and TCP on `addr`. With port 0, both get the same free port (retrying if
/// the UDP port's TCP twin is taken).
pub async fn bind(addr: SocketAddr) -> io::Result<DnsSockets> {
    let mut last = None;
    for _ in 0..16 {
        let udp = bind_udp(addr)?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok(DnsSockets { udp, tcp }),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Large buffers absorb bursts (a load generator with many queries outstanding).
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Serves DNS on `sockets` until `shutdown`: TCP through NetSel's capped loop, UDP through
/// the fast path (or hickory's [`Server`], when `settings.fast_path` is off).
pub async fn serve(
    handler: DnsHandler,
    sockets: DnsSockets,
    settings: DnsSettings,
    shutdown: CancellationToken,
) {
    let mut server = Server::new(handler.clone());
    let tcp = tokio::spawn(tcp::serve(
        handler.clone(),
        sockets.tcp,
        settings.tcp_max_connections,
        Duration::from_secs(settings.tcp_idle_secs),
        shutdown.clone(),
    ));
    // Stopped when this task is dropped without a shutdown, like the UDP threads.
    let _stop_tcp = AbortOnDrop(tcp.abort_handle());
    let mut workers = Vec::new();
    // The UDP threads stop on shutdown, and also when this task is dropped without one
    // (a runtime going away must not wait on them forever).
    let workers_stop = shutdown.child_token();
    let _stop_on_drop = workers_stop.clone().drop_guard();
    if settings.fast_path {
        match fast::spawn(handler, sockets.udp, &settings, workers_stop) {
            Ok(w) => workers = w,
            Err(e) => tracing::error!(error = %e, "cannot start the DNS UDP workers"),
        }
    } else {
        match tokio::net::UdpSocket::from_std(sockets.udp) {
            Ok(udp) => server.register_socket(udp),
            Err(e) => tracing::error!(error = %e, "cannot register the DNS UDP socket"),
        }
    }
    shutdown.cancelled().await;
    if !settings.fast_path
        && let Err(e) = server.shutdown_gracefully().await
    {
        tracing::debug!(error = %e, "DNS server stopped with an error");
    }
    let _ = tcp.await;
    for w in workers {
        let _ = w.await;
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
