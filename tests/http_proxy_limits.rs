//! The HTTP proxy's limits and defences, mostly over raw sockets: header limits (431),
//! timeouts, the connection cap, request smuggling attempts (400, nothing forwarded) and
//! HTTP/2 flood protection.

#[path = "http_proxy_support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::StatusCode;
use netsel::protocol::AppProtocol;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn smuggling_attempts_get_400_and_nothing_is_forwarded() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let attacks: &[&str] = &[
        // CL.TE and TE.CL
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Duplicate Content-Length, equal or not, or as a list.
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\nGET /admin HTTP/1.1\r\nHost: web\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5, 5\r\n\r\nhello",
        // Malformed lengths.
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: +5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: -1\r\n\r\n",
        // Transfer-Encoding that is not exactly one `chunked`, or hidden.
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Broken header syntax.
        "GET / HTTP/1.1\r\nHost: web\r\nX Bad: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web\rX-Bad: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: web\r\nX-Bad: a\0b\r\n\r\n",
    ];
    for attack in attacks {
        let out = raw(p.http, attack.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{attack:?} -> {out:?}");
    }
    assert_eq!(web.requests.load(Ordering::SeqCst), 0, "nothing forwarded");
    // The same connection handling still serves honest requests.
    let out = raw(
        p.http,
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("hello"),
        "{out}"
    );
}

#[tokio::test]
async fn header_limits_answer_431() {
    let p = start_with(|s| {
        s.http_proxy.max_header_bytes = 16 * 1024;
        s.http_proxy.max_headers = 50;
    })
    .await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let out = raw(p.http, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: web\r\n");
    for i in 0..60 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw(p.http, many.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // HTTP/2: too many headers, and too many header bytes.
    let mut tx = h2(p.http).await;
    let mut r = req2("GET", "web", "/", empty());
    for i in 0..60 {
        r.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let (status, _, _) = read(tx.send_request(r).await.unwrap()).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut tx = h2(p.http).await;
    let mut r = req2("GET", "web", "/", empty());
    r.headers_mut()
        .insert("x-big", "a".repeat(20_000).parse().unwrap());
    match tx.send_request(r).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(
            e.to_string().contains("too large") || e.to_string().contains("reset"),
            "{e}"
        ),
    }
    assert_eq!(web.requests.load(Ordering::SeqCst), 0);
    // Within the limits, fine.
    let (status, _, _) = get(p.http, "web", "/").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let p = start_with(|s| {
        s.http_proxy.header_read_timeout_ms = 300;
        s.http_proxy.idle_timeout_ms = 300;
    })
    .await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    // Slowloris: a head that never ends.
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the proxy");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // An HTTP/1.1 keep-alive connection waiting for its next request is closed too.
    let mut tx = h1(p.http).await;
    let (status, _, _) = read_resp(tx.send_request(req("GET", "web", "/", empty())).await).await;
    assert_eq!(status, StatusCode::OK);
    eventually("idle h1 connection closed", || tx.is_closed()).await;
    // An HTTP/2 connection with nothing in flight is closed after the idle timeout.
    let mut tx = h2(p.http).await;
    let (status, _, _) = read_resp(tx.send_request(req2("GET", "web", "/", empty())).await).await;
    assert_eq!(status, StatusCode::OK);
    eventually("idle h2 connection closed", || tx.is_closed()).await;
    // But a slow response is not idle.
    let mut tx = h2(p.http).await;
    let (status, _, _) = read_resp(
        tx.send_request(req2("GET", "web", "/slow?700", empty()))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

async fn read_resp(
    r: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
) -> (StatusCode, hyper::HeaderMap, String) {
    read(r.unwrap()).await
}

/// A GET on a held connection, answered 200.
async fn get_ok(tx: &mut hyper::client::conn::http1::SendRequest<Body>) {
    let (status, _, _) = read(
        tx.send_request(req("GET", "web", "/", empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn connection_cap_holds_extra_clients_back() {
    let p = start_with(|s| s.http_proxy.max_connections = 2).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let mut a = h1(p.http).await;
    let mut b = h1(p.http).await;
    for tx in [&mut a, &mut b] {
        get_ok(tx).await;
    }
    // A third client's request waits, unread, while the two hold both slots...
    let addr = p.http;
    let request = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let client = third.local_addr().unwrap();
    let len = request.len() as u64;
    eventually("the third request reached the proxy", || {
        common::unread_bytes(addr, client) == Some(len)
    })
    .await;
    // ...and stays unread while the proxy goes on serving the first two.
    for tx in [&mut a, &mut b] {
        get_ok(tx).await;
    }
    assert_eq!(
        common::unread_bytes(addr, client),
        Some(len),
        "served beyond the cap"
    );
    let third = tokio::spawn(async move {
        let mut out = Vec::new();
        third.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    drop(a);
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

// ---- HTTP/2 frames by hand

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// GET / with :authority web (HPACK: static-table indexes and one literal).
fn get_headers(stream: u32) -> Vec<u8> {
    frame(
        0x1,
        0x1 | 0x4,
        stream,
        &[0x82, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'],
    )
}

async fn h2_raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    s
}

/// Reads frames until one of type `kind` (returning its payload) or the end.
async fn read_until(s: &mut TcpStream, kind: u8) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline, s.read_exact(&mut head))
            .await
            .ok()?
            .ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        tokio::time::timeout_at(deadline, s.read_exact(&mut payload))
            .await
            .ok()?
            .ok()?;
        if head[3] == kind {
            return Some(payload);
        }
    }
}

#[tokio::test]
async fn h2_settings_announce_the_limits() {
    let p = start_with(|s| {
        s.http_proxy.h2_max_concurrent_streams = 7;
        s.http_proxy.max_header_bytes = 20_000;
    })
    .await;
    let mut s = h2_raw(p.http).await;
    let settings = read_until(&mut s, 0x4).await.expect("server SETTINGS");
    let params: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        params.contains(&(0x3, 7)),
        "MAX_CONCURRENT_STREAMS in {params:?}"
    );
    assert!(
        params.contains(&(0x6, 20_000)),
        "MAX_HEADER_LIST_SIZE in {params:?}"
    );
}

#[tokio::test]
async fn h2_rapid_reset_flood_is_cut_off() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let mut s = h2_raw(p.http).await;
    let mut flood = Vec::new();
    for i in 0..500u32 {
        let id = 2 * i + 1;
        flood.extend(get_headers(id));
        flood.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = s.write_all(&flood).await;
    let goaway = read_until(&mut s, 0x7).await.expect("GOAWAY");
    let code = u32::from_be_bytes([goaway[4], goaway[5], goaway[6], goaway[7]]);
    assert_eq!(code, 0xb, "ENHANCE_YOUR_CALM");
}

#[tokio::test]
async fn h2_continuation_flood_is_cut_off() {
    let p = start_with(|s| s.http_proxy.max_header_bytes = 16 * 1024).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let s = h2_raw(p.http).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end.
    let mut block = Vec::new();
    for _ in 0..20_000 {
        // Literal header, new name, not indexed: "x-a: vvvvvvvvvv"
        block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'a', 0x0a]);
        block.extend_from_slice(b"vvvvvvvvvv");
    }
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let first = frame(
            0x1,
            0x1,
            1,
            &[0x82, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'],
        );
        if wr.write_all(&first).await.is_err() {
            return;
        }
        for chunk in block.chunks(512) {
            if wr.write_all(&frame(0x9, 0, 1, chunk)).await.is_err() {
                return; // the server hung up: good
            }
        }
    });
    // The server must end the connection (GOAWAY or close) rather than keep buffering.
    let mut buf = vec![0u8; 65536];
    let mut saw_goaway = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                // Cheap scan for a GOAWAY frame header.
                saw_goaway |= buf[..n]
                    .windows(4)
                    .any(|w| w[3] == 0x7 && w[0] == 0 && w[1] == 0);
            }
            Err(_) => panic!("connection still open after a CONTINUATION flood"),
        }
    }
    let _ = writer.await;
    let _ = saw_goaway;
    assert_eq!(web.requests.load(Ordering::SeqCst), 0);
}
