//! One client connection, from its accept to the end of its relay: the accept loops
//! ([`serve_on_workers`], one per listener socket on its worker's thread), the name line
//! (gateway) or the VIP's service, the connection attempts (next instance on failure,
//! ejection, never one of the proxy's own listeners), the relay (`relay.rs`) and the
//! `ERROR <reason>` line a refused gateway client reads.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::context::{Route, Shared, Worker};
use super::gateway::{self, GatewayError};
use super::metrics::ServiceMetrics;
use super::relay;
use crate::catalog::{InstanceId, Service};
use crate::proxy::balance::Pick;

/// How long an error line may take to reach a refused client.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long (and how much) a refused client's unread bytes are drained before closing,
/// so the error line is not lost to a reset.
const ERROR_LINGER: Duration = Duration::from_millis(500);
const ERROR_LINGER_BYTES: u64 = 64 * 1024;

/// Why no instance could be connected.
enum ConnectError {
    NoHealthyInstance,
    AllFailed,
}

impl Shared {
    async fn handle(
        &self,
        mut client: TcpStream,
        route: Route,
        permit: Option<OwnedSemaphorePermit>,
        force_close: &CancellationToken,
    ) {
        let Some(_permit) = permit else {
            tracing::warn!("TCP proxy connection limit reached; refusing a connection");
            return self
                .refuse(client, &route, GatewayError::TooManyConnections)
                .await;
        };
        let (name, leftover) = match &route {
            Route::Gateway => {
                let read = gateway::read_name_line(
                    &mut client,
                    self.settings.name_line_max,
                    Duration::from_millis(self.settings.name_timeout_ms),
                )
                .await;
                match read {
                    Ok(found) => found,
                    Err(e) => return self.refuse(client, &route, e).await,
                }
            }
            Route::Vip(vip) => (vip.service.clone(), BytesMut::new()),
        };
        let snapshot = self.balancer.catalog().snapshot();
        let svc: Arc<Service> = match (snapshot.service(name.as_str()), &route) {
            (Some(svc), _) => svc.clone(),
            // Accepted by a VIP listener just before its service left the catalog: relay
            // to the instances the listener last knew.
            (None, Route::Vip(vip)) => vip.last_seen(),
            (None, Route::Gateway) => {
                drop(snapshot);
                return self
                    .refuse(client, &route, GatewayError::Unknown(name))
                    .await;
            }
        };
        // Relays may run for hours: they must not pin old catalog versions.
        drop(snapshot);
        let svc = &svc;
        let metrics = match &route {
            Route::Vip(vip) => vip.metrics.clone(),
            Route::Gateway => Arc::new(self.metrics.service(svc.name.as_str())),
        };
        let mut tried: Vec<InstanceId> = Vec::new();
        let mut attempts = 0;
        let mut first = true;
        loop {
            let connected = self.connect(svc, &metrics, &mut tried, &mut attempts).await;
            let (instance, pick) = match connected {
                Ok(c) => c,
                Err(ConnectError::NoHealthyInstance) => {
                    let e = GatewayError::NoHealthyInstance(svc.name.clone());
                    return self.refuse(client, &route, e).await;
                }
                Err(ConnectError::AllFailed) => {
                    let e = GatewayError::ConnectFailed(svc.name.clone());
                    return self.refuse(client, &route, e).await;
                }
            };
            if first {
                // Counted once, whichever instance ends up relaying.
                metrics.connections.inc();
                metrics.to_instance.inc_by(leftover.len() as u64);
                first = false;
            }
            let end = self
                .relay(
                    &mut client,
                    instance,
                    &leftover,
                    &pick,
                    &metrics,
                    force_close,
                )
                .await;
            // The instance reset the connection before a byte moved either way (it died
            // with the connection in its backlog): nobody saw anything, so it counts as
            // a failed connection attempt and the next instance is tried. Not when bytes
            // after a name line went out first: that instance may have acted on them.
            if !matches!(end, relay::RelayEnd::InstanceReset) || !leftover.is_empty() {
                return;
            }
            self.connect_failed(svc, &metrics, &pick, "reset before any byte moved");
        }
    }

    /// Connects to a healthy instance of `svc` not in `tried`, trying others when one
    /// fails, until `attempts` reaches the limit.
    async fn connect(
        &self,
        svc: &Arc<Service>,
        metrics: &ServiceMetrics,
        tried: &mut Vec<InstanceId>,
        attempts: &mut usize,
    ) -> Result<(TcpStream, Pick), ConnectError> {
        let timeout = Duration::from_millis(self.settings.connect_timeout_ms);
        while *attempts < self.settings.connect_attempts {
            let Some(pick) = self.balancer.pick(svc, tried) else {
                break;
            };
            tried.push(pick.instance.id.clone());
            let endpoint = pick.instance.endpoint;
            if self.is_own(endpoint) {
                tracing::warn!(
                    service = %svc.name,
                    instance = %pick.instance.id,
                    %endpoint,
                    "instance endpoint is one of the proxy's own listeners; not relaying to it"
                );
                continue;
            }
            *attempts += 1;
            let error = match tokio::time::timeout(timeout, connect_to(endpoint)).await {
                Ok(Ok(stream)) => {
                    self.balancer.report_success(&pick);
                    return Ok((stream, pick));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {timeout:?}"),
            };
            self.connect_failed(svc, metrics, &pick, &error);
        }
        if *attempts == 0 {
            Err(ConnectError::NoHealthyInstance)
        } else {
            Err(ConnectError::AllFailed)
        }
    }

    /// Counts a failed attempt on `pick` and ejects it.
    fn connect_failed(&self, svc: &Service, metrics: &ServiceMetrics, pick: &Pick, error: &str) {
        metrics.connect_failures.inc();
        let ejection = self.balancer.report_failure(pick);
        metrics.ejections.inc();
        tracing::warn!(
            service = %svc.name,
            instance = %pick.instance.id,
            endpoint = %pick.instance.endpoint,
            %error,
            backoff = ?ejection.backoff,
            failures = ejection.failures,
            "connect to instance failed; ejected"
        );
    }

    async fn relay(
        &self,
        client: &mut TcpStream,
        mut instance: TcpStream,
        leftover: &[u8],
        pick: &Pick,
        metrics: &ServiceMetrics,
        force_close: &CancellationToken,
    ) -> relay::RelayEnd {
        let _in_flight = pick.start();
        metrics.active.inc();
        let _active = DecOnDrop(&metrics.active);
        if !leftover.is_empty()
            && let Err(e) = instance.write_all(leftover).await
        {
            tracing::debug!(error = %e, "forwarding the bytes after the name line failed");
            return relay::RelayEnd::Failed(e);
        }
        let end = relay::relay(
            client,
            &mut instance,
            metrics,
            Duration::from_secs(self.settings.idle_timeout_secs),
            self.settings.relay,
            force_close,
        )
        .await;
        match &end {
            relay::RelayEnd::InstanceReset => return end,
            relay::RelayEnd::Failed(e) => {
                tracing::debug!(instance = %pick.instance.id, error = %e, "relay failed")
            }
            end => tracing::debug!(instance = %pick.instance.id, end = %end, "relay ended"),
        }
        end
    }

    /// Closes a connection that gets no relay: gateway clients read `ERROR <reason>\n`
    /// first; VIP clients (whose protocol NetSel does not speak) are just closed.
    async fn refuse(&self, mut client: TcpStream, route: &Route, error: GatewayError) {
        self.metrics.refused(error.reason());
        tracing::debug!(%error, %route, "connection refused");
        if let Route::Vip(_) = route {
            return;
        }
        let line = format!("ERROR {error}\n");
        let written =
            tokio::time::timeout(ERROR_WRITE_TIMEOUT, client.write_all(line.as_bytes())).await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        let _ = client.shutdown().await;
        // Read what the client still sends (briefly) so closing does not reset the
        // connection before it has read the error line.
        let mut sink = tokio::io::sink();
        let mut rest = (&mut client).take(ERROR_LINGER_BYTES);
        let _ = tokio::time::timeout(ERROR_LINGER, tokio::io::copy(&mut rest, &mut sink)).await;
    }
}

struct DecOnDrop<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts on `listener` until `stop`, one task per connection (tracked for drain), on
/// the worker's own thread.
async fn accept_loop(
    worker: Arc<Worker>,
    listener: std::net::TcpListener,
    route: Route,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, %route, "TCP proxy: cannot register a listener");
            return;
        }
    };
    let start = |stream: TcpStream, peer: SocketAddr| {
        worker.accepted.fetch_add(1, Ordering::Relaxed);
        // TCP_NODELAY comes from the listening socket (see `listen`).
        let permit = worker.shared.slots.clone().try_acquire_owned().ok();
        let span = match &route {
            Route::Gateway => tracing::debug_span!("tcp_gateway", %peer),
            Route::Vip(vip) => tracing::debug_span!("tcp_vip", %peer, service = %vip.service),
        };
        let (w, route) = (worker.clone(), route.clone());
        worker.relays.spawn(
            async move { w.shared.handle(stream, route, permit, &w.force_close).await }
                .instrument(span),
        );
    };
    let mut acceptor = crate::accept::Acceptor::new(listener, format!("tcp proxy {route}"));
    while let Some((stream, peer)) = acceptor.next(&stop).await {
        start(stream, peer);
    }
    // Connections the kernel completed before the stop are served, not reset by closing
    // the socket (clients connecting to a VIP as its service is deregistered). Accepted
    // straight from the socket: the event loop may not have seen them yet.
    let socket = SockRef::from(acceptor.listener());
    while let Ok((s, peer)) = socket.accept() {
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        if s.set_nonblocking(true).is_err() {
            continue;
        }
        if let Ok(stream) = TcpStream::from_std(std::net::TcpStream::from(s)) {
            start(stream, peer);
        }
    }
}

/// Connects to `endpoint` with a non-blocking socket (`TCP_NODELAY` set before the
/// handshake); the connection is up once the socket turns writable without an error, so
/// `SO_ERROR` is only read when the kernel flags one.
async fn connect_to(endpoint: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(endpoint),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&endpoint.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if (ready.is_error() || ready.is_write_closed())
        && let Some(e) = stream.take_error()?
    {
        return Err(e);
    }
    Ok(stream)
}

/// Starts one accept loop per listener, listener `i` on worker `i`.
pub(super) fn serve_on_workers(
    workers: &[Arc<Worker>],
    listeners: Vec<std::net::TcpListener>,
    route: impl Fn(&Worker) -> Route,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    workers
        .iter()
        .zip(listeners)
        .map(|(w, l)| {
            let task = accept_loop(w.clone(), l, route(w), stop.clone());
            w.handle.spawn(task)
        })
        .collect()
}
