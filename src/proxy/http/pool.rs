//! Connections to instances, one pool per worker: idle raw sockets (the direct path's and
//! the bodiless HTTP/2 requests'), idle hyper HTTP/1.1 client connections, and one shared
//! HTTP/2 (h2c) connection per instance; and [`UpBody`], the request body hyper's client
//! connections carry. An HTTP/1.1 connection goes back to the pool only once its
//! response body has been read to the end; anything else closes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why no connection to an instance could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The TCP connect did not finish in time.
    #[error("connect timed out")]
    Timeout,
    /// The TCP connect failed (refused, unreachable...).
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// A request body on its way to an instance.
#[derive(Debug)]
pub(crate) enum UpBody {
    /// No body (most requests): nothing to stream, so the request can be replayed.
    Empty,
    /// The client's body, streamed as it arrives.
    Stream(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream(b) => b.size_hint(),
        }
    }
}

/// An idle raw HTTP/1.1 connection (the fast path's).
struct IdleRaw {
    stream: TcpStream,
    since: Instant,
}

struct IdleH1 {
    tx: http1::SendRequest<UpBody>,
    since: Instant,
}

/// Connection settings for the pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    pub(crate) max_idle_per_instance: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

/// Upstream connections, by instance endpoint.
pub(crate) struct Pool {
    h1: Mutex<HashMap<SocketAddr, Vec<IdleH1>>>,
    /// Idle connections of the HTTP/1.1 fast path: plain sockets between exchanges.
    raw: Mutex<HashMap<SocketAddr, Vec<IdleRaw>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<UpBody>>>,
    /// One HTTP/2 connect at a time per instance, so a burst shares one connection.
    h2_connecting: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    settings: PoolSettings,
}

impl Pool {
    pub(crate) fn new(settings: PoolSettings) -> Self {
        Pool {
            h1: Mutex::new(HashMap::new()),
            raw: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
            h2_connecting: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// An HTTP/1.1 connection to `addr`, ready for a request, and whether it was reused.
    pub(crate) async fn h1(
        &self,
        addr: SocketAddr,
    ) -> Result<(http1::SendRequest<UpBody>, bool), ConnectError> {
        while let Some(mut tx) = self.take_idle(addr) {
            if tx.ready().await.is_ok() {
                return Ok((tx, true));
            }
        }
        Ok((self.connect_h1(addr).await?, false))
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<UpBody>> {
        let mut map = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if !idle.tx.is_closed() && idle.since.elapsed() < self.settings.idle_timeout {
                return Some(idle.tx);
            }
        }
        None
    }

    /// Returns a connection whose exchange finished.
    pub(crate) fn put_h1(&self, addr: SocketAddr, tx: http1::SendRequest<UpBody>) {
        if tx.is_closed() || self.settings.max_idle_per_instance == 0 {
            return;
        }
        let mut map = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(addr).or_default();
        if list.len() < self.settings.max_idle_per_instance {
            list.push(IdleH1 {
                tx,
                since: Instant::now(),
            });
        }
    }

    async fn connect_tcp(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, ConnectError> {
        Ok(TokioIo::new(self.connect_raw(addr).await?))
    }

    /// A fresh TCP connection to `addr`.
    pub(crate) async fn connect_raw(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        let stream = tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        // Small requests and responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// An idle fast-path connection to `addr` that still looks open (the most recently
    /// used first: it is the least likely to have been closed by the instance).
    /// `now` is the caller's clock reading (saves reading it again).
    pub(crate) fn take_raw(&self, addr: SocketAddr, now: Instant) -> Option<TcpStream> {
        let mut map = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if now.saturating_duration_since(idle.since) >= self.settings.idle_timeout {
                list.clear(); // older ones are older still
                break;
            }
            // Cheap: tokio answers WouldBlock without a syscall unless the socket was
            // reported readable, which for an idle connection means closed (or garbage).
            let mut probe = [0u8; 1];
            match idle.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(idle.stream),
                _ => continue,
            }
        }
        None
    }

    /// Returns a fast-path connection whose exchange ended cleanly; it counts as idle
    /// since `since`.
    pub(crate) fn put_raw(&self, addr: SocketAddr, stream: TcpStream, since: Instant) {
        if self.settings.max_idle_per_instance == 0 {
            return;
        }
        let mut map = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(addr).or_default();
        if list.len() < self.settings.max_idle_per_instance {
            list.push(IdleRaw { stream, since });
        }
    }

    /// A fresh HTTP/1.1 connection (never from the pool), able to switch protocols.
    pub(crate) async fn connect_h1(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<UpBody>, ConnectError> {
        let io = self.connect_tcp(addr).await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// The shared HTTP/2 connection to `addr` (opened if needed), and whether it was
    /// reused.
    pub(crate) async fn h2(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<UpBody>, bool), ConnectError> {
        if let Some(tx) = self.shared_h2(addr) {
            return Ok((tx, true));
        }
        let gate = self
            .h2_connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone();
        let _connecting = gate.lock().await;
        if let Some(tx) = self.shared_h2(addr) {
            return Ok((tx, true));
        }
        let io = self.connect_tcp(addr).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream h2 connection ended");
            }
        });
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, tx.clone());
        Ok((tx, false))
    }

    fn shared_h2(&self, addr: SocketAddr) -> Option<http2::SendRequest<UpBody>> {
        let map = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&addr).filter(|tx| !tx.is_closed()).cloned()
    }

    /// Forgets an HTTP/2 connection that failed.
    pub(crate) fn drop_h2(&self, addr: SocketAddr) {
        let mut map = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&addr).is_some_and(|tx| tx.is_closed()) {
            map.remove(&addr);
        }
    }

    /// Closes idle connections past their idle timeout, and forgets closed ones.
    pub(crate) fn reap(&self) {
        let timeout = self.settings.idle_timeout;
        let mut map = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, list| {
            list.retain(|i| !i.tx.is_closed() && i.since.elapsed() < timeout);
            !list.is_empty()
        });
        drop(map);
        let mut map = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < timeout);
            !list.is_empty()
        });
        drop(map);
        let mut map = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, tx| !tx.is_closed());
        drop(map);
        let mut gates = self.h2_connecting.lock().unwrap_or_else(|e| e.into_inner());
        gates.retain(|_, g| Arc::strong_count(g) > 1);
    }

    /// Idle HTTP/1.1 connections held (for tests and metrics).
    pub(crate) fn idle_count(&self) -> usize {
        let map = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let h1: usize = map.values().map(Vec::len).sum();
        drop(map);
        let map = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        h1 + map.values().map(Vec::len).sum::<usize>()
    }
}
