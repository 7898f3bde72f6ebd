//! The registry: NetSel's line protocol on `registry_addr` (default `0.0.0.0:9000`).
//!
//! One task per connection; each request is parsed by [`crate::protocol`] and carried out
//! on the [`Catalog`]. Connections are capped, idle connections and half-sent requests time
//! out, and every bad input is answered `FAILED|<reason>`. Requests are never logged: they
//! may carry secrets.

pub mod codec;
mod rate;
mod settings;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::acl::{Acl, Caller};
use crate::catalog::{Catalog, CatalogError, Endpoint, Registration};
use crate::protocol::{
    self, Framing, ProtocolError, RegisterReply, Request, ResolvedInstance, Response,
};
use codec::{Decoded, Frame};
pub use settings::RegistryLimits;

/// How long to wait for the rest of a seed frame's NUL padding once its text has arrived.
const PADDING_WAIT: Duration = Duration::from_millis(300);

/// Kernel send buffer of a registry connection, in bytes (the kernel doubles it).
const SEND_BUFFER: usize = 64 * 1024;

/// Counts of refused line-protocol requests by reason (`netsel_registry_errors_total`).
#[derive(Debug, Clone, Default)]
pub struct RegistryMetrics {
    errors: Family<[(&'static str, &'static str); 1], Counter>,
}

impl RegistryMetrics {
    /// Fresh counters, registered on `metrics_registry`.
    pub fn new(metrics_registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = RegistryMetrics::default();
        metrics_registry.register(
            "registry_errors",
            "Line-protocol requests refused, by reason",
            m.errors.clone(),
        );
        m
    }

    fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&[("reason", reason)]).inc();
    }
}

fn protocol_reason(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::Empty => "empty",
        ProtocolError::NotUtf8 => "not_utf8",
        ProtocolError::ControlChar => "control_char",
        ProtocolError::BadPadding => "bad_padding",
        ProtocolError::TooLong(_) => "too_long",
        ProtocolError::UnknownCommand(_) => "unknown_command",
        ProtocolError::Arity { .. } => "arity",
        ProtocolError::EmptyField(_) => "empty_field",
        ProtocolError::BadEndpoint(_) => "bad_endpoint",
        ProtocolError::NotKeyValue(_) => "not_key_value",
        ProtocolError::UnknownOption(_) => "unknown_option",
        ProtocolError::DuplicateOption(_) => "duplicate_option",
        ProtocolError::BadOption { .. } => "bad_option",
        ProtocolError::BadEscape(_) => "bad_escape",
        ProtocolError::BadResponse(_) => "bad_response",
    }
}

/// Serves the line protocol on `listener` until `shutdown`, then closes idle connections
/// and waits for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    catalog: Catalog,
    limits: RegistryLimits,
    shutdown: CancellationToken,
) {
    serve_with_metrics(
        listener,
        catalog,
        limits,
        RegistryMetrics::default(),
        shutdown,
    )
    .await
}

/// [`serve`], counting refused requests on `metrics`.
pub async fn serve_with_metrics(
    listener: TcpListener,
    catalog: Catalog,
    limits: RegistryLimits,
    metrics: RegistryMetrics,
    shutdown: CancellationToken,
) {
    let acl = crate::acl::AclSettings::default();
    serve_with_acl(listener, catalog, limits, metrics, &acl, shutdown).await
}

/// [`serve_with_metrics`] with `[acl]`: registrations need a token allowed to register the
/// name (`token=` or `AUTH|<token>`), seed-form frames are accepted only from
/// `trusted_cidrs`, and `RESOLVE` needs read rights, as on the API.
pub async fn serve_with_acl(
    listener: TcpListener,
    catalog: Catalog,
    limits: RegistryLimits,
    metrics: RegistryMetrics,
    acl: &crate::acl::AclSettings,
    shutdown: CancellationToken,
) {
    let acl = Arc::new(Acl::new(acl));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let rate = Arc::new(rate::RateLimiter::new(&limits));
    let tracker = TaskTracker::new();
    let mut acceptor = crate::accept::Acceptor::new(listener, "registry");
    while let Some((stream, peer)) = acceptor.next(&shutdown).await {
        let _ = stream.set_nodelay(true);
        // Answers are short lines: a small send buffer bounds the kernel memory a client
        // that never reads can pin, and lets the write timeout notice it sooner.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.error("too_many_connections");
            tracker.spawn(refuse(stream));
            continue;
        };
        let conn = Connection {
            catalog: catalog.clone(),
            limits: limits.clone(),
            metrics: metrics.clone(),
            rate: rate.clone(),
            peer,
            acl: acl.clone(),
            caller: if acl.enabled() {
                Caller::Anonymous
            } else {
                Caller::Open
            },
        };
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("registry", %peer);
        tracker.spawn(
            async move {
                if let Err(e) = conn.run(stream, shutdown).await {
                    tracing::debug!(error = %e, "connection ended");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    tracker.close();
    tracker.wait().await;
}

async fn refuse(mut stream: TcpStream) {
    tracing::warn!("registry connection limit reached; refusing a connection");
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(b"FAILED|too many connections\n"),
    )
    .await;
}

/// Writes `out`, giving up after `timeout`: a client that does not read its answers must
/// not hold its connection (and a slot of `max_connections`) forever.
async fn write(stream: &mut TcpStream, out: &[u8], timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, stream.write_all(out)).await {
        Ok(written) => written,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client does not read its answers",
        )),
    }
}

struct Connection {
    catalog: Catalog,
    limits: RegistryLimits,
    metrics: RegistryMetrics,
    rate: Arc<rate::RateLimiter>,
    peer: SocketAddr,
    acl: Arc<Acl>,
    /// Who this connection is, once `AUTH` said so.
    caller: Caller,
}

enum Read {
    More,
    Idle,
    Eof,
}

impl Connection {
    async fn run(mut self, mut stream: TcpStream, shutdown: CancellationToken) -> io::Result<()> {
        let mut buf = BytesMut::with_capacity(512);
        let mut out = Vec::with_capacity(256);
        let idle = Duration::from_secs(self.limits.idle_timeout_secs);
        let frame_timeout = Duration::from_secs(self.limits.frame_timeout_secs);
        let write_timeout = Duration::from_secs(self.limits.write_timeout_secs);
        // When the request being read must be complete: set by its first byte, so a
        // request trickled in a byte at a time still ends at the deadline (slowloris).
        let mut frame_deadline: Option<tokio::time::Instant> = None;
        loop {
            // Answer every complete request that has arrived; write the answers together.
            let padding_only = loop {
                match codec::decode(&mut buf) {
                    Decoded::Frame(frame) => {
                        // The next request's deadline starts with its own first byte.
                        frame_deadline = None;
                        self.answer(frame, &mut out).await;
                        // One read can hold thousands of pipelined requests: let other
                        // connections' tasks run between them.
                        tokio::task::consume_budget().await;
                    }
                    Decoded::NeedMore { padding_only } => break padding_only,
                    Decoded::TooLong => {
                        self.metrics.error("too_long");
                        let e = ProtocolError::TooLong(protocol::MAX_LINE_LEN);
                        Response::Failed(e.to_string()).encode_into(Framing::Line, &mut out);
                        write(&mut stream, &out, write_timeout).await?;
                        return close_gracefully(stream).await;
                    }
                }
            };
            if !out.is_empty() {
                write(&mut stream, &out, write_timeout).await?;
                out.clear();
            }
            let now = tokio::time::Instant::now();
            let wait = if buf.is_empty() {
                frame_deadline = None;
                idle
            } else {
                let deadline = *frame_deadline.get_or_insert(now + frame_timeout);
                let left = deadline.saturating_duration_since(now);
                if padding_only {
                    left.min(PADDING_WAIT)
                } else {
                    left
                }
            };
            let read = tokio::select! {
                _ = shutdown.cancelled(), if buf.is_empty() => return Ok(()),
                r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => match r {
                    Err(_) => Read::Idle,
                    Ok(Ok(0)) => Read::Eof,
                    Ok(Ok(_)) => Read::More,
                    Ok(Err(e)) => return Err(e),
                },
            };
            match read {
                Read::More => {}
                Read::Idle | Read::Eof if padding_only => {
                    // A seed frame whose padding never came: answer what we have.
                    let frame = codec::take_partial_seed(&mut buf);
                    self.answer(frame, &mut out).await;
                    write(&mut stream, &out, write_timeout).await?;
                    out.clear();
                    if matches!(read, Read::Eof) {
                        return Ok(());
                    }
                }
                Read::Idle if buf.is_empty() => return Ok(()),
                Read::Idle => {
                    self.metrics.error("timeout");
                    let reason = "timed out waiting for the rest of the request";
                    Response::Failed(reason.into()).encode_into(Framing::Line, &mut out);
                    write(&mut stream, &out, write_timeout).await?;
                    return close_gracefully(stream).await;
                }
                Read::Eof => {
                    // A last line without its newline: answer it, then we are done.
                    if !buf.is_empty() {
                        let frame = Frame::Line(buf.split());
                        self.answer(frame, &mut out).await;
                        write(&mut stream, &out, write_timeout).await?;
                    }
                    return Ok(());
                }
            }
        }
    }

    async fn answer(&mut self, frame: Frame, out: &mut Vec<u8>) {
        let (framing, parsed) = match &frame {
            Frame::Seed(b) => (Framing::Seed, protocol::parse_seed_frame(b)),
            Frame::Line(b) => (Framing::Line, protocol::parse_line(b)),
        };
        let response = match parsed {
            Ok(request) => self.execute(request).await,
            Err(e) => {
                self.metrics.error(protocol_reason(&e));
                tracing::debug!(error = %e, "bad request");
                Response::Failed(e.to_string())
            }
        };
        response.encode_into(framing, out);
    }

    async fn execute(&mut self, request: Request) -> Response {
        let peer_ip = self.peer.ip().to_canonical();
        let catalog = &self.catalog;
        let registers = matches!(
            request,
            Request::SeedRegister { .. } | Request::Register { .. }
        );
        if registers && !self.rate.allow(peer_ip) {
            self.metrics.error("rate_limited");
            return Response::Failed(format!(
                "rate limited: too many registrations from {peer_ip}"
            ));
        }
        if let Some(refused) = self.authorize(&request) {
            return refused;
        }
        match request {
            Request::Ping => Response::Pong,
            Request::Auth { token } => match self.acl.identify(Some(&token.0)) {
                Ok(caller) => {
                    self.caller = caller;
                    Response::Ok
                }
                Err(e) => {
                    self.metrics.error("acl");
                    Response::Failed(e.to_string())
                }
            },
            Request::SeedRegister { name } => {
                let reg = Registration::new(
                    name,
                    Endpoint::Pool {
                        peer: peer_ip,
                        hint: None,
                    },
                );
                match catalog.register(reg).await {
                    Ok(r) => Response::SeedSuccess {
                        vip: r.vip,
                        port: r.endpoint.port(),
                        ttl_secs: r.ttl.as_secs().max(1),
                    },
                    Err(e) => self.failed(e),
                }
            }
            Request::SeedHeartbeat { name } => match catalog.heartbeat_seed(&name, peer_ip) {
                Ok(_) => Response::HeartbeatOk,
                Err(e) => {
                    self.metrics.error(e.reason());
                    tracing::debug!(error = %e, "seed heartbeat refused");
                    Response::HeartbeatFailed
                }
            },
            Request::Register {
                name,
                endpoint,
                options,
            } => {
                let endpoint = match endpoint {
                    Some(ep) => Endpoint::Explicit(ep),
                    None => Endpoint::Pool {
                        peer: peer_ip,
                        hint: options.port_hint,
                    },
                };
                let reg = Registration {
                    name,
                    endpoint,
                    tags: options.tags,
                    meta: options.meta,
                    weight: options.weight,
                    ttl: options.ttl,
                    service_port: options.service_port,
                    protocol: options.protocol,
                    check: options.check,
                    deregister_critical_after: options.deregister_critical_after,
                    replace: options.replace.unwrap_or(true),
                    initial_health: None,
                };
                match catalog.register(reg).await {
                    Ok(r) => Response::Registered(RegisterReply {
                        id: r.id.to_string(),
                        secret: r.secret.expose().to_string(),
                        vip: r.vip,
                        service_port: r.service_port,
                        endpoint: r.endpoint,
                        ttl_secs: r.ttl.as_secs().max(1),
                    }),
                    Err(e) => self.failed(e),
                }
            }
            Request::Heartbeat { id, secret } => match catalog.heartbeat(&id, &secret) {
                Ok(_) => Response::HeartbeatOk,
                Err(e) => self.failed(e),
            },
            Request::Deregister { id, secret } => match catalog.deregister(&id, &secret).await {
                Ok(()) => Response::Ok,
                Err(e) => self.failed(e),
            },
            Request::Resolve { name } => {
                let snap = catalog.snapshot();
                match snap.service(&name) {
                    Some(svc) => resolved(catalog, svc),
                    None => self.failed(CatalogError::UnknownService(name)),
                }
            }
        }
    }
}

/// Closes after an error answer so the peer can read it: closing a socket with unread
/// input makes the kernel send a reset, which can destroy the answer in flight. So: send
/// FIN, then discard what the peer still sends, for a short while.
async fn close_gracefully(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1 << 20 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    Ok(())
}

impl Connection {
    /// The refusal of a request the ACL does not allow, if it does not.
    fn authorize(&self, request: &Request) -> Option<Response> {
        if !self.acl.enabled() {
            return None;
        }
        let peer = self.peer.ip();
        let refuse = |reason: String| {
            self.metrics.error("acl");
            tracing::info!(%peer, %reason, "registry request refused by ACL");
            Some(Response::Failed(reason))
        };
        match request {
            Request::SeedRegister { .. } if !self.acl.trusts(peer) => refuse(format!(
                "seed-form registration from {peer} refused: ACLs are on and {peer} is not \
                 in [acl] trusted_cidrs (register with REGISTER|<name>|…|token=<token>)"
            )),
            Request::SeedHeartbeat { .. } if !self.acl.trusts(peer) => {
                self.metrics.error("acl");
                Some(Response::HeartbeatFailed)
            }
            Request::Register { name, options, .. } => {
                let caller = match &options.token {
                    Some(t) => match self.acl.identify(Some(&t.0)) {
                        Ok(c) => c,
                        Err(e) => return refuse(e.to_string()),
                    },
                    None => self.caller,
                };
                if self.acl.can_write(caller, name, false) {
                    None
                } else if caller == Caller::Anonymous {
                    refuse(format!(
                        "an ACL token is required to register {name} (token=<token> or \
                         AUTH|<token>)"
                    ))
                } else {
                    refuse(format!("permission denied: register {name}"))
                }
            }
            Request::Resolve { name } if !self.acl.can_read(self.caller, name) => {
                if self.caller == Caller::Anonymous {
                    refuse(format!(
                        "an ACL token is required to read {name} (AUTH|<token>)"
                    ))
                } else {
                    refuse(format!("permission denied: read {name}"))
                }
            }
            _ => None,
        }
    }

    fn failed(&self, e: CatalogError) -> Response {
        self.metrics.error(e.reason());
        if let CatalogError::Store(_) = e {
            tracing::error!(error = %e, "registration not persisted");
        }
        Response::Failed(e.to_string())
    }
}

/// The `RESOLVED` answer for `svc`: its VIP, port and healthy instances with their
/// remaining leases. Shared by the line protocol and the API's `?format=line`.
pub fn resolved(catalog: &Catalog, svc: &crate::catalog::Service) -> Response {
    Response::Resolved {
        name: svc.name.to_string(),
        vip: svc.vip,
        service_port: svc.port,
        instances: svc
            .healthy()
            .map(|i| ResolvedInstance {
                id: i.id.to_string(),
                endpoint: i.endpoint,
                weight: i.weight,
                lease_remaining: Some(catalog.lease_remaining(i)),
            })
            .collect(),
    }
}
