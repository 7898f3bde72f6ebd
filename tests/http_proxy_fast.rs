//! The HTTP/1.1 fast path: keep-alive reuse, pipelining, chunked bodies, bodiless and
//! close-delimited responses, stale pooled connections, and the hand-over to the hyper
//! path (upgrades, smuggling, 431, unknown hosts) after requests were already served.
//! `netsel_http_proxy_hyper_connections_total` tells which path served a connection.

#[path = "http_proxy_support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use netsel::protocol::AppProtocol;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A hand-written HTTP/1.1 instance, to control framing and connection handling exactly.
///
/// * `/echo`: the request body (de-chunked) back, with a `Content-Length`.
/// * `/chunked`: a chunked response.
/// * `/close`: a response without length, ended by closing the connection.
/// * `/head`: `Content-Length: 1000` (the body only for GET).
/// * `/204`, `/304`: those statuses, with a `Content-Length` and no body.
/// * `/once`: answers the first request on a connection; a later request on the same
///   connection is read and the connection closed without an answer (a keep-alive
///   connection the instance dropped just as it was reused).
/// * anything else: `ok`.
struct RawBackend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawBackend {
    async fn start() -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = RawBackend {
            addr: l.local_addr().unwrap(),
            accepts: Default::default(),
            answered: Default::default(),
            heads: Default::default(),
        };
        let (a, n, h) = (b.accepts.clone(), b.answered.clone(), b.heads.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(s, n.clone(), h.clone()));
            }
        });
        b
    }

    fn last_head(&self) -> String {
        self.heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 65536];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

/// Decodes a complete chunked body at the start of `buf`: (body, bytes used).
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let eol = i + find(&buf[i..], b"\r\n")?;
        let line = std::str::from_utf8(&buf[i..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        i = eol + 2;
        if size == 0 {
            // Trailers up to the blank line.
            let end = i + find(&buf[i..], b"\r\n")?;
            if end == i {
                return Some((body, i + 2));
            }
            i = end + 2;
            let end = i + find(&buf[i..], b"\r\n\r\n").map(|e| e + 4)?;
            return Some((body, end));
        }
        if buf.len() < i + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[i..i + size]);
        i += size + 2;
    }
}

async fn serve_raw(mut s: TcpStream, answered: Arc<AtomicUsize>, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut served = 0;
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut s, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let body = if let Some(n) = header(&head, "content-length") {
            let n: usize = n.parse().unwrap();
            while buf.len() < n {
                if !fill(&mut s, &mut buf).await {
                    return;
                }
            }
            buf.drain(..n).collect::<Vec<u8>>()
        } else if header(&head, "transfer-encoding").is_some() {
            loop {
                if let Some((body, used)) = dechunk(&buf) {
                    buf.drain(..used);
                    break body;
                }
                if !fill(&mut s, &mut buf).await {
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let mut parts = head.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        if path == "/once" && served > 0 {
            return; // drop the connection without an answer
        }
        served += 1;
        heads.lock().unwrap().push(head.clone());
        answered.fetch_add(1, Ordering::SeqCst);
        let mut out: Vec<u8> = match path.as_str() {
            "/echo" => {
                let mut o = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                    .into_bytes();
                o.extend_from_slice(&body);
                o
            }
            "/chunked" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
                5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
                    .to_vec()
            }
            "/close" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil-")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = s.write_all(b"close").await;
                return;
            }
            "/head" if method == "HEAD" => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec()
            }
            "/head" => {
                let mut o = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec();
                o.extend_from_slice(&[b'h'; 1000]);
                o
            }
            "/204" => b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_vec(),
            "/304" => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 500\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        };
        if path == "/once" {
            out = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce".to_vec();
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Reads one response with a `Content-Length` (or none: until the connection closes)
/// from a raw client connection: (status line, head, body).
async fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                fill(s, buf).await,
                "connection closed before a response head"
            );
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let body = match header(&head, "content-length") {
            Some(n) => {
                let n: usize = n.parse().unwrap();
                while buf.len() < n {
                    assert!(fill(s, buf).await, "connection closed inside a body");
                }
                buf.drain(..n).collect()
            }
            None => {
                while fill(s, buf).await {}
                std::mem::take(buf)
            }
        };
        let status = head.lines().next().unwrap_or("").to_string();
        (status, head, body)
    })
    .await
    .expect("a response in time")
}

fn hyper_connections(p: &Proxy) -> u64 {
    let m = p.metrics();
    m.lines()
        .find_map(|l| l.strip_prefix("netsel_http_proxy_hyper_connections_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hyper connection counter in {m}"))
}

#[tokio::test]
async fn keep_alive_requests_share_one_upstream_connection() {
    let p = start_with(|s| s.http_proxy.workers = 1).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let mut tx = h1(p.http).await;
    for _ in 0..20 {
        let resp = tx
            .send_request(req("GET", "web", "/", empty()))
            .await
            .unwrap();
        let (status, headers, body) = read(resp).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "web-1"));
        assert_eq!(headers["x-seen-xff"], "127.0.0.1");
        assert_eq!(headers["x-seen-host"], "web");
    }
    for _ in 0..10 {
        assert_eq!(get(p.http, "web", "/").await.0, StatusCode::OK);
    }
    assert_eq!(
        web.accepts.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
    assert_eq!(web.requests.load(Ordering::SeqCst), 30);
    let m = p.metrics();
    assert!(
        m.contains(r#"netsel_http_proxy_upstream_requests_total{service="web",reused="true"} 29"#),
        "{m}"
    );
    assert_eq!(hyper_connections(&p), 0, "all on the fast path");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let p = start().await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    let mut s = TcpStream::connect(p.http).await.unwrap();
    // Five requests in one write: plain, fixed-length and chunked bodies.
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nfirst\
          POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n\
          GET /head HTTP/1.1\r\nHost: web\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: web.netsel:8081\r\nContent-Length: 4\r\n\r\nlast",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let (status, _, body) = read_one(&mut s, &mut buf).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        bodies.push(body);
    }
    assert_eq!(bodies[0], b"ok");
    assert_eq!(bodies[1], b"first");
    assert_eq!(bodies[2], b"second");
    assert_eq!(bodies[3], vec![b'h'; 1000]);
    assert_eq!(bodies[4], b"last");
    assert_eq!(be.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(hyper_connections(&p), 0);
}

#[tokio::test]
async fn chunked_bodies_pass_through_both_ways() {
    let p = start().await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    // A chunked request body, sent in pieces with a pause, and with an extension.
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    s.write_all(b"7\r\n, world\r\n0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let (status, _, body) = read_one(&mut s, &mut buf).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, b"hello, world");
    let head = be.last_head().to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    // A chunked response, with extension and trailer, through a real HTTP client.
    let mut tx = h1(p.http).await;
    let resp = tx
        .send_request(req("GET", "web", "/chunked", empty()))
        .await
        .unwrap();
    let (status, headers, body) = read(resp).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello, world"));
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert_eq!(headers["x-kind"], "chunked");
    // The connection is still in step.
    let resp = tx
        .send_request(req("POST", "web", "/echo", body_of("again")))
        .await
        .unwrap();
    assert_eq!(read(resp).await.2, "again");
    assert_eq!(hyper_connections(&p), 0);
}

fn body_of(s: &'static str) -> Body {
    support::body(s)
}

#[tokio::test]
async fn head_204_and_304_carry_no_body() {
    let p = start().await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    let mut tx = h1(p.http).await;
    let resp = tx
        .send_request(req("HEAD", "web", "/head", empty()))
        .await
        .unwrap();
    let (status, headers, body) = read(resp).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers["content-length"], "1000");
    let (status, _, body) = read(
        tx.send_request(req("GET", "web", "/204", empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (status, headers, body) = read(
        tx.send_request(req("GET", "web", "/304", empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::NOT_MODIFIED, ""));
    assert_eq!(headers["content-length"], "500");
    // Nothing was waited for or left over: the same connection goes on.
    let (status, _, body) = read(
        tx.send_request(req("GET", "web", "/head", empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::OK, 1000));
    assert_eq!(be.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(hyper_connections(&p), 0);
}

#[tokio::test]
async fn close_delimited_response_is_forwarded_then_closed() {
    let p = start().await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(b"GET /close HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, head, body) = read_one(&mut s, &mut buf).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, b"until-close");
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    // The next request goes out on a new upstream connection and works.
    assert_eq!(get(p.http, "web", "/").await.2, "ok");
    assert_eq!(be.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stale_pooled_connection_is_retried_without_an_error() {
    let p = start_with(|s| s.http_proxy.workers = 1).await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    // Every pooled connection is dropped by the instance when it is reused.
    let mut tx = h1(p.http).await;
    for i in 0..10 {
        let (method, b) = if i % 2 == 0 {
            ("GET", empty())
        } else {
            ("POST", body_of("small body, all read with the head"))
        };
        let (status, _, body) = read(
            tx.send_request(req(method, "web", "/once", b))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "once"),
            "request {i}"
        );
    }
    assert_eq!(be.answered.load(Ordering::SeqCst), 10);
    assert_eq!(be.accepts.load(Ordering::SeqCst), 10);
    let m = p.metrics();
    assert!(
        m.contains(r#"netsel_http_proxy_requests_total{service="web",class="2xx"} 10"#),
        "{m}"
    );
    assert!(
        m.contains(r#"netsel_http_proxy_requests_total{service="web",class="5xx"} 0"#),
        "{m}"
    );
}

#[tokio::test]
async fn websocket_after_fast_requests_on_one_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let p = start().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                // A plain request first, answered by hand; then WebSocket.
                if s.peek(&mut buf).await.is_ok() && &buf == b"GET " {
                    let mut peek = [0u8; 512];
                    let n = s.peek(&mut peek).await.unwrap_or(0);
                    if !String::from_utf8_lossy(&peek[..n])
                        .to_ascii_lowercase()
                        .contains("upgrade: websocket")
                    {
                        let mut s = s;
                        let mut b = Vec::new();
                        while find(&b, b"\r\n\r\n").is_none() && fill(&mut s, &mut b).await {}
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain")
                            .await;
                        return;
                    }
                }
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    let _c = p.register("chat", ws_addr, AppProtocol::Http1).await;
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: chat\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, _, body) = read_one(&mut s, &mut buf).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, b"plain");
    assert_eq!(hyper_connections(&p), 0);
    // The same client connection now asks for an upgrade: the hyper path takes over.
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://chat.netsel/socket", s)
        .await
        .expect("websocket handshake after a fast-path request");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "hi"
    );
    assert_eq!(hyper_connections(&p), 1);
}

#[tokio::test]
async fn refusals_after_fast_requests_come_from_the_hyper_path() {
    let p = start_with(|s| {
        s.http_proxy.max_header_bytes = 16 * 1024;
        s.http_proxy.max_headers = 50;
    })
    .await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let cases: &[(&str, &str)] = &[
        (
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            "HTTP/1.1 400",
        ),
        (
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 400",
        ),
        (
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (&big, "HTTP/1.1 431"),
        (
            "GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 404",
        ),
        (
            "GET http://example.com/ HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 404",
        ),
        (
            "CONNECT web:80 HTTP/1.1\r\nHost: web\r\n\r\n",
            "HTTP/1.1 405",
        ),
    ];
    for (n, (bad, want)) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(p.http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let (status, _, body) = read_one(&mut s, &mut buf).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(body, b"ok");
        s.write_all(bad.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let out = String::from_utf8_lossy(&rest);
        assert!(out.starts_with(want), "case {n}: {out:?}");
        assert_eq!(
            be.answered.load(Ordering::SeqCst),
            n + 1,
            "case {n}: nothing forwarded"
        );
    }
    assert_eq!(hyper_connections(&p), cases.len() as u64);
}

#[tokio::test]
async fn h2_clients_reach_http1_instances_over_raw_connections() {
    let p = start_with(|s| s.http_proxy.workers = 1).await;
    let be = RawBackend::start().await;
    let _w = p.register("web", be.addr, AppProtocol::Http1).await;
    let mut tx = h2(p.http).await;
    let get2 = |path: &'static str, method: &'static str| req2(method, "web", path, empty());
    let (status, headers, body) =
        read(tx.send_request(get2("/chunked", "GET")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello, world"));
    assert_eq!(headers["x-kind"], "chunked");
    assert!(!headers.contains_key("transfer-encoding"));
    let head = be.last_head().to_ascii_lowercase();
    assert!(head.starts_with("get /chunked http/1.1\r\n"), "{head}");
    assert!(head.contains("host: web\r\n"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    let (status, headers, body) = read(tx.send_request(get2("/head", "HEAD")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
    assert_eq!(headers["content-length"], "1000");
    let (status, _, body) = read(tx.send_request(get2("/304", "GET")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::NOT_MODIFIED, ""));
    let (status, _, body) = read(tx.send_request(get2("/head", "GET")).await.unwrap()).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 1000));
    // Sequential requests so far shared one upstream connection.
    assert_eq!(be.accepts.load(Ordering::SeqCst), 1);
    // Close-delimited: forwarded to the end; that connection is not pooled.
    let (status, _, body) = read(tx.send_request(get2("/close", "GET")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "until-close"));
    // Stale pooled connections are retried on fresh ones.
    for _ in 0..4 {
        let (status, _, body) = read(tx.send_request(get2("/once", "GET")).await.unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "once"));
    }
    // Many streams at once.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            read(
                tx.send_request(req2("GET", "web", "/", empty()))
                    .await
                    .unwrap(),
            )
            .await
        }));
    }
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    let m = p.metrics();
    assert!(
        m.contains(r#"netsel_http_proxy_requests_total{service="web",class="5xx"} 0"#),
        "{m}"
    );
}
