//! The client library: register a service, keep it alive, find others.
//!
//! [`ServiceClient::new`] speaks the seed protocol exactly as netsel 0.1 did (a 256-byte
//! NUL-padded name; `HEARTBEAT|<name>`), so every seed snippet keeps working.
//! [`ServiceClient::builder`] adds an explicit endpoint, tags, metadata, weight, TTL and
//! several registry addresses, and uses the extended line protocol with an instance id and
//! secret. Either way, [`ServiceClient::start_heartbeats`] returns a [`HeartbeatHandle`]
//! that heartbeats on its own, re-registers when the registry has forgotten the instance,
//! backs off with jitter and fails over between registries, and deregisters on shutdown
//! or drop.
//!
//! ```no_run
//! use netsel::client::ServiceClient;
//!
//! # async fn run() -> Result<(), netsel::client::ClientError> {
//! let mut client = ServiceClient::builder("web")
//!     .registry("127.0.0.1:9000".parse().unwrap())
//!     .endpoint("127.0.0.1:8000".parse().unwrap())
//!     .tag("v2")
//!     .meta("zone", "a")
//!     .build();
//! let (vip, port) = client.register().await?;
//! println!("web is reachable at {vip}:{port}");
//! let heartbeats = client.start_heartbeats();
//! // ... serve ...
//! heartbeats.shutdown().await?; // deregisters
//! # Ok(()) }
//! ```
//!
//! [`dns_resolve`] finds a service through NetSel's DNS server instead of the registry:
//! its VIP (`NAME.netsel.` A/AAAA) and healthy instances (`_NAME._tcp.netsel.` SRV).

// What the other files share (`error.rs`: `ClientError`; `resolution.rs`: `Resolution`)
// is in files of its own, so none of them imports from this one.
mod error;
pub mod http;
mod resolution;
pub mod watch;

pub use error::ClientError;
pub use resolution::Resolution;
pub use watch::{ServiceWatch, watch};

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Mutex as AsyncMutex, oneshot};
use tokio::task::JoinHandle;

use crate::protocol::{
    AppProtocol, ProtocolError, RegisterOptions, Request, Response, SEED_FRAME_LEN,
};

pub use crate::protocol::ResolvedInstance;

mod dns_query;
/// Resolving through NetSel's DNS server instead of the registry (no DNS library needed).
pub use dns_query::{DEFAULT_DOMAIN, DnsResolution, dns_resolve, dns_resolve_in};

/// The seed's heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer line the client accepts (a RESOLVE of a large service).
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
enum Mode {
    /// Seed protocol: bare name, pool port, name-only heartbeats.
    Seed,
    /// Extended protocol with id and secret.
    Extended {
        endpoint: Option<SocketAddr>,
        options: RegisterOptions,
    },
}

#[derive(Default)]
struct Registration {
    vip: Option<IpAddr>,
    port: Option<u16>,
    id: Option<String>,
    secret: Option<String>,
}

struct Shared {
    registries: Vec<SocketAddr>,
    name: String,
    mode: Mode,
    heartbeat_interval: Duration,
    state: Mutex<Registration>,
    /// Which registry to use next (rotated on failure).
    current: Mutex<usize>,
    /// One persistent line connection, reused for extended requests.
    conn: AsyncMutex<Option<LineConn>>,
}

/// Registers one service instance and keeps it alive. Clones share one registration.
#[derive(Clone)]
pub struct ServiceClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("name", &self.shared.name)
            .field("registries", &self.shared.registries)
            .field("registered", &self.is_registered())
            .finish()
    }
}

/// Builds a [`ServiceClient`] with the extended options.
#[derive(Debug, Clone)]
pub struct ServiceClientBuilder {
    name: String,
    registries: Vec<SocketAddr>,
    endpoint: Option<SocketAddr>,
    options: RegisterOptions,
    heartbeat_interval: Duration,
}

impl ServiceClientBuilder {
    /// Adds a registry address; several are tried in order, failing over on errors.
    pub fn registry(mut self, addr: SocketAddr) -> Self {
        self.registries.push(addr);
        self
    }

    /// Where the instance listens. Without one, the registry assigns a pool port on the
    /// address the client connects from.
    pub fn endpoint(mut self, addr: SocketAddr) -> Self {
        self.endpoint = Some(addr);
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.options.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.meta.insert(key.into(), value.into());
        self
    }

    /// Sets all metadata at once.
    pub fn metadata(mut self, meta: BTreeMap<String, String>) -> Self {
        self.options.meta = meta;
        self
    }

    /// Balancing weight (1..=10000).
    pub fn weight(mut self, weight: u32) -> Self {
        self.options.weight = Some(weight);
        self
    }

    /// Lease TTL: the registry removes the instance this long after its last heartbeat.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl);
        self
    }

    /// The service's port on its VIP (default: the first instance's port).
    pub fn service_port(mut self, port: u16) -> Self {
        self.options.service_port = Some(port);
        self
    }

    /// What the instance speaks (the HTTP proxy uses h2c for `Http2`).
    pub fn protocol(mut self, protocol: AppProtocol) -> Self {
        self.options.protocol = Some(protocol);
        self
    }

    /// An active health check NetSel runs against the instance.
    pub fn check(mut self, check: crate::protocol::Check) -> Self {
        self.options.check = Some(check);
        self
    }

    /// The ACL token that allows registering this name, when the registry has `[acl]` on
    /// (sent as the `token=` option; never logged).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.options.token = Some(crate::protocol::Token(token.into()));
        self
    }

    /// How often the heartbeat handle heartbeats (default 10 s). Keep it well under the
    /// TTL.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The client. With no registry given, `127.0.0.1:9000`.
    pub fn build(mut self) -> ServiceClient {
        if self.registries.is_empty() {
            self.registries
                .push(SocketAddr::from(([127, 0, 0, 1], 9000)));
        }
        ServiceClient::from_parts(
            self.registries,
            self.name,
            Mode::Extended {
                endpoint: self.endpoint,
                options: self.options,
            },
            self.heartbeat_interval,
        )
    }
}

impl ServiceClient {
    /// A client for `hostname` at the registry `server_addr`, speaking the seed protocol:
    /// `register` sends the bare name and gets a VIP and a pool port on which the service
    /// is expected to listen.
    pub fn new(server_addr: SocketAddr, hostname: String) -> Self {
        ServiceClient::from_parts(
            vec![server_addr],
            hostname,
            Mode::Seed,
            DEFAULT_HEARTBEAT_INTERVAL,
        )
    }

    /// A builder for the extended options.
    pub fn builder(name: impl Into<String>) -> ServiceClientBuilder {
        ServiceClientBuilder {
            name: name.into(),
            registries: Vec::new(),
            endpoint: None,
            options: RegisterOptions::default(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }

    fn from_parts(
        registries: Vec<SocketAddr>,
        name: String,
        mode: Mode,
        heartbeat_interval: Duration,
    ) -> Self {
        ServiceClient {
            shared: Arc::new(Shared {
                registries,
                name,
                mode,
                heartbeat_interval,
                state: Mutex::new(Registration::default()),
                current: Mutex::new(0),
                conn: AsyncMutex::new(None),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Registration> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Registers, returning the service's VIP and port: for the seed form the pool port
    /// assigned to this instance, for the extended form the service port on the VIP.
    pub async fn register(&mut self) -> Result<(IpAddr, u16), ClientError> {
        self.register_shared(None, true).await
    }

    /// Registers; `replace` false when registering again after the registry said the
    /// instance is gone or superseded, so a late owner never takes over its replacement.
    async fn register_shared(
        &self,
        port_hint: Option<u16>,
        replace: bool,
    ) -> Result<(IpAddr, u16), ClientError> {
        match &self.shared.mode {
            Mode::Seed if port_hint.is_none() => {
                let frame = Request::SeedRegister {
                    name: self.shared.name.clone(),
                }
                .encode();
                let answer = self.seed_exchange(&frame).await?;
                match Response::parse(&answer)? {
                    Response::SeedSuccess { vip, port, .. } => {
                        let mut st = self.state();
                        st.vip = Some(vip);
                        st.port = Some(port);
                        Ok((vip, port))
                    }
                    Response::Failed(reason) => Err(ClientError::Rejected(reason)),
                    other => Err(unexpected(other)),
                }
            }
            mode => {
                let (endpoint, mut options) = match mode {
                    Mode::Seed => (None, RegisterOptions::default()),
                    Mode::Extended { endpoint, options } => (*endpoint, options.clone()),
                };
                options.port_hint = port_hint;
                if !replace {
                    options.replace = Some(false);
                }
                let req = Request::Register {
                    name: self.shared.name.clone(),
                    endpoint,
                    options,
                };
                match self.request(&req).await? {
                    Response::Registered(r) => {
                        let mut st = self.state();
                        st.vip = Some(r.vip);
                        if matches!(self.shared.mode, Mode::Seed) {
                            st.port = Some(r.endpoint.port());
                        } else {
                            st.port = Some(r.service_port);
                            st.id = Some(r.id);
                            st.secret = Some(r.secret);
                        }
                        Ok((r.vip, st.port.unwrap_or(r.service_port)))
                    }
                    Response::Failed(reason) => Err(ClientError::Rejected(reason)),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    /// Renews the lease. If the registry has forgotten the instance (a restart that lost
    /// state, or a lease that ran out), registers again with the same details and
    /// succeeds; the seed form asks for the same pool port back.
    pub async fn send_heartbeat(&self) -> Result<(), ClientError> {
        match &self.shared.mode {
            Mode::Seed => {
                let port = self.state().port.ok_or(ClientError::NotRegistered)?;
                let frame = Request::SeedHeartbeat {
                    name: self.shared.name.clone(),
                }
                .encode();
                match Response::parse(&self.seed_exchange(&frame).await?)? {
                    Response::HeartbeatOk => Ok(()),
                    Response::HeartbeatFailed => {
                        tracing::info!(name = %self.shared.name, "registry forgot us; registering again");
                        self.register_shared(Some(port), true).await.map(drop)
                    }
                    other => Err(unexpected(other)),
                }
            }
            Mode::Extended { .. } => {
                let (id, secret) = {
                    let st = self.state();
                    match (&st.id, &st.secret) {
                        (Some(i), Some(s)) => (i.clone(), s.clone()),
                        _ => return Err(ClientError::NotRegistered),
                    }
                };
                match self.request(&Request::Heartbeat { id, secret }).await? {
                    Response::HeartbeatOk => Ok(()),
                    Response::Failed(reason)
                        if reason.starts_with("unknown instance")
                            || reason.starts_with("wrong secret") =>
                    {
                        tracing::info!(name = %self.shared.name, %reason, "registering again");
                        self.register_shared(None, false).await.map(drop)
                    }
                    Response::Failed(reason) => Err(ClientError::Rejected(reason)),
                    other => Err(unexpected(other)),
                }
            }
        }
    }

    /// Removes the registration. The seed form cannot deregister (its instance simply
    /// stops heartbeating and expires), so this is a no-op there.
    pub async fn deregister(&self) -> Result<(), ClientError> {
        let (id, secret) = {
            let mut st = self.state();
            let (Some(id), Some(secret)) = (st.id.take(), st.secret.take()) else {
                return Ok(());
            };
            st.vip = None;
            st.port = None;
            (id, secret)
        };
        match self.request(&Request::Deregister { id, secret }).await? {
            Response::Ok => Ok(()),
            Response::Failed(reason) if reason.starts_with("unknown instance") => Ok(()),
            Response::Failed(reason) => Err(ClientError::Rejected(reason)),
            other => Err(unexpected(other)),
        }
    }

    /// The VIP and port assigned at registration, if registered.
    pub fn get_assigned_addr(&self) -> Option<SocketAddr> {
        let st = self.state();
        Some(SocketAddr::new(st.vip?, st.port?))
    }

    /// Whether a registration has succeeded.
    pub fn is_registered(&self) -> bool {
        self.state().vip.is_some()
    }

    /// The instance id (extended registrations only).
    pub fn instance_id(&self) -> Option<String> {
        self.state().id.clone()
    }

    /// The healthy instances of `name`, with the service's VIP and port.
    pub async fn resolve(&self, name: &str) -> Result<Resolution, ClientError> {
        let req = Request::Resolve {
            name: name.to_string(),
        };
        match self.request(&req).await? {
            Response::Resolved {
                name,
                vip,
                service_port,
                instances,
            } => Ok(Resolution {
                name,
                vip,
                service_port,
                instances,
            }),
            Response::Failed(reason) if reason.starts_with("unknown service") => {
                Err(ClientError::UnknownService(name.to_string()))
            }
            Response::Failed(reason) => Err(ClientError::Rejected(reason)),
            other => Err(unexpected(other)),
        }
    }

    /// Starts a task that heartbeats every interval until the handle is shut down or
    /// dropped; then it deregisters.
    pub fn start_heartbeats(&self) -> HeartbeatHandle {
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let client = self.clone();
        let task = tokio::spawn(async move {
            let interval = client.shared.heartbeat_interval;
            let mut delay = interval;
            let mut failures: u32 = 0;
            loop {
                tokio::select! {
                    _ = &mut stop_rx => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match client.send_heartbeat().await {
                    Ok(()) => {
                        failures = 0;
                        delay = interval;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        client.next_registry();
                        delay = backoff(failures, interval);
                        tracing::warn!(name = %client.shared.name, error = %e, retry_in_ms = delay.as_millis() as u64,
                            "heartbeat failed");
                    }
                }
            }
        });
        HeartbeatHandle {
            client: self.clone(),
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    fn registry(&self) -> (usize, SocketAddr) {
        let i = *self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let i = i % self.shared.registries.len();
        (i, self.shared.registries[i])
    }

    fn next_registry(&self) {
        let mut cur = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *cur = (*cur + 1) % self.shared.registries.len();
    }

    /// One seed exchange on a fresh connection, trying each registry once.
    async fn seed_exchange(&self, frame: &[u8]) -> Result<String, ClientError> {
        let mut last = None;
        for _ in 0..self.shared.registries.len() {
            let (_, addr) = self.registry();
            match tokio::time::timeout(REQUEST_TIMEOUT, seed_roundtrip(addr, frame)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = Some(ClientError::Io(e)),
                Err(_) => last = Some(ClientError::Timeout(REQUEST_TIMEOUT)),
            }
            self.next_registry();
        }
        Err(last.unwrap_or(ClientError::NotRegistered))
    }

    /// One line request on the persistent connection, reconnecting and failing over to
    /// the next registry on network errors.
    async fn request(&self, req: &Request) -> Result<Response, ClientError> {
        let line = req.encode();
        let mut conn = self.shared.conn.lock().await;
        if let Some(c) = conn.as_mut() {
            c.fresh = false;
        }
        let mut last = None;
        // Each registry once, plus one retry on a connection that went stale.
        for _ in 0..=self.shared.registries.len() {
            let (idx, addr) = self.registry();
            if conn.as_ref().is_none_or(|c| c.registry != idx) {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        *conn = Some(LineConn {
                            registry: idx,
                            fresh: true,
                            stream: BufReader::new(stream),
                        });
                    }
                    Ok(Err(e)) => {
                        last = Some(ClientError::Io(e));
                        self.next_registry();
                        continue;
                    }
                    Err(_) => {
                        last = Some(ClientError::Timeout(CONNECT_TIMEOUT));
                        self.next_registry();
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connection was just set");
            match tokio::time::timeout(REQUEST_TIMEOUT, c.roundtrip(&line)).await {
                Ok(Ok(text)) => return Ok(Response::parse(&text)?),
                Ok(Err(e)) => last = Some(ClientError::Io(e)),
                Err(_) => last = Some(ClientError::Timeout(REQUEST_TIMEOUT)),
            }
            // The connection is broken or out of step: drop it. A stale keep-alive
            // connection is retried once on the same registry before failing over.
            let was_fresh = conn.take().is_some_and(|c| c.fresh);
            if was_fresh {
                self.next_registry();
            }
        }
        Err(last.unwrap_or(ClientError::NotRegistered))
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(ProtocolError::BadResponse(r.to_string()))
}

/// Exponential backoff with jitter, capped at the heartbeat interval.
fn backoff(failures: u32, interval: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << failures.min(16).saturating_sub(1));
    let capped = base.min(interval);
    capped.mul_f64(0.5 + fastrand::f64() * 0.5)
}

async fn seed_roundtrip(addr: SocketAddr, frame: &[u8]) -> io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(frame).await?;
    // Answers are short: `SUCCESS|…` ends with a NUL; heartbeat answers have no
    // terminator, so read until one of the known answers is complete or the peer closes.
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        let done = n == 0
            || buf.contains(&0)
            || buf.ends_with(b"\n")
            || buf == b"HEARTBEAT_OK"
            || buf == b"HEARTBEAT_FAILED"
            || buf.len() >= SEED_FRAME_LEN;
        if done {
            break;
        }
    }
    if buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "registry closed the connection without answering",
        ));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

struct LineConn {
    registry: usize,
    /// Opened by the current request (a failure then is the registry's, not staleness).
    fresh: bool,
    stream: BufReader<TcpStream>,
}

impl LineConn {
    async fn roundtrip(&mut self, line: &[u8]) -> io::Result<String> {
        self.stream.get_mut().write_all(line).await?;
        let mut answer = Vec::with_capacity(128);
        let n = (&mut self.stream)
            .take(MAX_RESPONSE)
            .read_until(b'\n', &mut answer)
            .await?;
        if n == 0 || answer.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "registry closed the connection mid-answer",
            ));
        }
        String::from_utf8(answer)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "answer is not UTF-8"))
    }
}

/// Keeps an instance alive in the background. Dropping it stops the heartbeats and
/// deregisters (in a spawned task, if a runtime is still there);
/// [`shutdown`](Self::shutdown) does the same and waits for the deregistration.
pub struct HeartbeatHandle {
    client: ServiceClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatHandle")
            .field("client", &self.client)
            .finish()
    }
}

impl HeartbeatHandle {
    /// Stops heartbeating and deregisters.
    pub async fn shutdown(mut self) -> Result<(), ClientError> {
        self.stop_task().await;
        self.client.deregister().await
    }

    /// Stops heartbeating without deregistering: the lease runs out on its own.
    pub async fn abandon(mut self) {
        self.stop_task().await;
    }

    async fn stop_task(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        task.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            rt.spawn(async move {
                if let Err(e) = client.deregister().await {
                    tracing::warn!(error = %e, "deregistering on drop failed");
                }
            });
        }
    }
}
