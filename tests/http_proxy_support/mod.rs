//! Shared helpers for the HTTP proxy tests: a NetSel server on ephemeral ports, small
//! hyper backends registered through the client library, and HTTP clients.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use netsel::client::ServiceClient;
use netsel::protocol::AppProtocol;
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A running NetSel with its bound addresses.
pub struct Proxy {
    pub server: NetSelServer,
    pub http: SocketAddr,
    pub registry: SocketAddr,
}

pub async fn start() -> Proxy {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut Settings)) -> Proxy {
    let mut s = Settings::ephemeral();
    s.drain_secs = 5;
    f(&mut s);
    let server = NetSelServer::with_settings(s);
    server.start().await.expect("server starts");
    let bound = server.bound().unwrap();
    Proxy {
        http: bound.http_proxy.expect("http proxy bound"),
        registry: bound.registry,
        server,
    }
}

impl Proxy {
    /// Registers `addr` as an instance of `name` through the client library.
    pub async fn register(
        &self,
        name: &str,
        addr: SocketAddr,
        proto: AppProtocol,
    ) -> ServiceClient {
        let mut c = ServiceClient::builder(name)
            .registry(self.registry)
            .endpoint(addr)
            .protocol(proto)
            .build();
        c.register().await.expect("register");
        c
    }

    pub fn metrics(&self) -> String {
        self.server.metrics().unwrap().encode()
    }
}

/// An in-process backend on port 0.
pub struct Backend {
    pub addr: SocketAddr,
    pub label: String,
    /// TCP connections accepted.
    pub accepts: Arc<AtomicUsize>,
    /// Requests served.
    pub requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Backend {
    /// Starts a backend speaking HTTP/1.1 and h2c (prior knowledge), or h2c only.
    pub async fn start(label: &str, h2_only: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (a, r, s, l) = (
            accepts.clone(),
            requests.clone(),
            stop.clone(),
            label.to_string(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    x = listener.accept() => match x { Ok(x) => x, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (r, s, l) = (r.clone(), s.clone(), l.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        handle(req, l.clone())
                    });
                    let mut b = auto::Builder::new(TokioExecutor::new());
                    if h2_only {
                        b = b.http2_only();
                    }
                    let conn = b.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    // Killing the backend drops every connection at once.
                    tokio::select! {
                        _ = conn => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        Backend {
            addr,
            label: label.to_string(),
            accepts,
            requests,
            stop,
        }
    }

    /// Stops listening and drops every open connection, like a killed process.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn query_num(req: &Request<Incoming>) -> u64 {
    req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0)
}

async fn handle(req: Request<Incoming>, label: String) -> Result<Response<Body>, Infallible> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let seen = [
        ("x-seen-host", h("host")),
        (
            "x-seen-authority",
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        ),
        ("x-seen-xff", h("x-forwarded-for")),
        ("x-seen-xfh", h("x-forwarded-host")),
        ("x-seen-xfp", h("x-forwarded-proto")),
        ("x-seen-secret", h("x-secret")),
        ("x-seen-keep-alive", h("keep-alive")),
        ("x-seen-version", format!("{:?}", req.version())),
        ("x-backend", label.clone()),
    ];
    let mut resp = match req.uri().path() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(n.to_string()))
        }
        "/big" => Response::new(Big::new(query_num(&req)).boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_num(&req))).await;
            Response::new(full(label.clone()))
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full(""))
        }
        "/status" => {
            let mut r = Response::new(full(""));
            *r.status_mut() =
                StatusCode::from_u16(query_num(&req) as u16).unwrap_or(StatusCode::OK);
            r
        }
        _ => Response::new(full(label.clone())),
    };
    for (k, v) in seen {
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}

/// `total` bytes of `x`, produced as they are read (never held whole).
pub struct Big {
    pub left: u64,
    pub chunk: Bytes,
}

impl Big {
    pub fn new(total: u64) -> Big {
        Big {
            left: total,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl hyper::body::Body for Big {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn body(b: impl Into<Bytes>) -> Body {
    full(b)
}

/// An HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    tx
}

/// An HTTP/2 prior-knowledge connection to `addr`.
pub async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

pub fn req(method: &str, host: &str, path: &str, b: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(b)
        .unwrap()
}

/// An HTTP/2 request: the authority is in the URI.
pub fn req2(method: &str, authority: &str, path: &str, b: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"))
        .body(b)
        .unwrap()
}

/// Status, headers and body text of a response.
pub async fn read(resp: Response<Incoming>) -> (StatusCode, hyper::HeaderMap, String) {
    let (parts, b) = resp.into_parts();
    let bytes = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// One GET over a fresh HTTP/1.1 connection.
pub async fn get(
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> (StatusCode, hyper::HeaderMap, String) {
    let mut tx = h1(proxy).await;
    let resp = tx
        .send_request(req("GET", host, path, empty()))
        .await
        .unwrap();
    read(resp).await
}

/// Writes `bytes` on a fresh connection and reads until the server closes (or 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `f` every 10 ms until it holds, failing after 10 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Boxing for test bodies.
pub trait BoxedBody {
    fn boxed_body(self) -> Body;
}

impl<B> BoxedBody for B
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    fn boxed_body(self) -> Body {
        BodyExt::boxed(self)
    }
}

/// A request body fed by hand.
pub struct ChannelSender(tokio::sync::mpsc::Sender<Bytes>);

impl ChannelSender {
    pub async fn send(&mut self, b: Bytes) {
        self.0.send(b).await.unwrap();
    }
}

pub struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub fn channel_body() -> (ChannelSender, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (ChannelSender(tx), ChannelBody(rx).boxed_body())
}
