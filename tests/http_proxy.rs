//! The HTTP proxy end to end: backends registered through the client library, real
//! clients (hyper, curl, a WebSocket client) through the proxy.

#[path = "http_proxy_support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::StatusCode;
use hyper::body::Body as _;
use netsel::protocol::AppProtocol;
use support::*;

#[tokio::test]
async fn routes_by_host_and_rewrites_headers() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let api = Backend::start("api-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let _a = p.register("api", api.addr, AppProtocol::Http1).await;

    for host in ["web", "web:8081", "WEB.netsel", "web.netsel.:1234"] {
        let (status, h, body) = get(p.http, host, "/").await;
        assert_eq!(status, StatusCode::OK, "{host}");
        assert_eq!(body, "web-1", "{host}");
        assert_eq!(h["x-seen-host"], host, "Host is preserved");
        assert_eq!(h["x-seen-xfh"], host);
    }
    let (_, _, body) = get(p.http, "api.netsel", "/").await;
    assert_eq!(body, "api-1");

    // Hop-by-hop headers stop at the proxy; X-Forwarded-* are added.
    let mut tx = h1(p.http).await;
    let mut r = req("GET", "web", "/", empty());
    let h = r.headers_mut();
    h.insert("connection", "keep-alive, x-secret".parse().unwrap());
    h.insert("x-secret", "1".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let (status, h, _) = read(tx.send_request(r).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["x-seen-secret"], "");
    assert_eq!(h["x-seen-keep-alive"], "");
    assert_eq!(h["x-seen-xff"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-seen-xfp"], "http");

    // HTTP/2: :authority routes, and wins over a Host header.
    let mut tx = h2(p.http).await;
    let mut r = req2("GET", "api.netsel:8081", "/", empty());
    r.headers_mut().insert("host", "web".parse().unwrap());
    let (status, h, body) = read(tx.send_request(r).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "api-1");
    assert_eq!(h["x-seen-host"], "api.netsel:8081");
    let m = p.metrics();
    assert!(
        m.contains(r#"netsel_http_proxy_requests_total{service="web",class="2xx"} 5"#),
        "{m}"
    );
    assert!(
        m.contains("netsel_http_proxy_request_duration_seconds_bucket"),
        "{m}"
    );
}

#[tokio::test]
async fn preserve_host_can_be_turned_off() {
    let p = start_with(|s| s.http_proxy.preserve_host = false).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let (_, h, _) = get(p.http, "web", "/").await;
    assert_eq!(h["x-seen-host"], web.addr.to_string());
    assert_eq!(h["x-seen-xfh"], "web");
}

#[tokio::test]
async fn error_statuses() {
    let p = start_with(|s| {
        s.http_proxy.request_timeout_ms = 300;
    })
    .await;
    // 404 names the service looked for.
    let (status, _, body) = get(p.http, "nosuch.netsel", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("'nosuch'"), "{body}");

    // 503: the service exists, no instance is healthy.
    let sick = Backend::start("sick", false).await;
    let c = p.register("sick", sick.addr, AppProtocol::Http1).await;
    let catalog = p.server.catalog().unwrap();
    catalog
        .set_health(&c.instance_id().unwrap(), netsel::catalog::Health::Critical)
        .await
        .unwrap();
    let (status, _, body) = get(p.http, "sick", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(sick.requests.load(Ordering::SeqCst), 0);

    // 502: every instance refuses connections.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let _g = p.register("gone", gone_addr, AppProtocol::Http1).await;
    let (status, _, body) = get(p.http, "gone", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");

    // 504: the instance takes the request and never answers.
    let slow = Backend::start("slow", false).await;
    let _s = p.register("slow", slow.addr, AppProtocol::Http1).await;
    let (status, _, _) = get(p.http, "slow", "/hang").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        p.metrics()
            .contains(r#"netsel_http_proxy_requests_total{service="slow",class="5xx"} 1"#)
    );

    // Never an open proxy: CONNECT and absolute-form for foreign hosts are refused,
    // and nothing is connected to.
    let out = raw(
        p.http,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    let probe = Backend::start("probe", false).await;
    let target = format!(
        "GET http://{}/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        probe.addr, probe.addr
    );
    let out = raw(p.http, target.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert_eq!(probe.accepts.load(Ordering::SeqCst), 0);
    // Absolute form naming a service is fine.
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let out = raw(
        p.http,
        b"GET http://web.netsel/ HTTP/1.1\r\nHost: web.netsel\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("web-1"),
        "{out}"
    );
    let m = p.metrics();
    for line in [
        r#"netsel_http_proxy_requests_total{service="-",class="4xx"} 3"#,
        r#"netsel_http_proxy_requests_total{service="sick",class="5xx"} 1"#,
        r#"netsel_http_proxy_requests_total{service="gone",class="5xx"} 1"#,
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
}

#[tokio::test]
async fn default_service_takes_unnamed_hosts() {
    let p = start_with(|s| s.http_proxy.default_service = Some("web".into())).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let (status, _, body) = get(p.http, &p.http.to_string(), "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web-1"));
    // Absolute form still never goes anywhere but a named service.
    let out = raw(
        p.http,
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

#[tokio::test]
async fn h2c_instances_and_clients() {
    let p = start_with(|s| s.http_proxy.workers = 2).await;
    let b2 = Backend::start("grpcish", true).await;
    let _c = p.register("grpcish", b2.addr, AppProtocol::Http2).await;
    // An HTTP/1.1 client reaches an h2c-only instance...
    let (status, h, text) = get(p.http, "grpcish", "/").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "grpcish"));
    assert_eq!(h["x-seen-version"], "HTTP/2.0");
    assert_eq!(h["x-seen-authority"], "grpcish", "Host becomes :authority");
    // ...and so does an h2c client, many streams over one upstream connection.
    let tx = h2(p.http).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let r = req2("POST", "grpcish", "/echo", body("ping"));
            read(tx.send_request(r).await.unwrap()).await
        }));
    }
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ping"));
    }
    let accepts = b2.accepts.load(Ordering::SeqCst);
    assert!(
        accepts <= 2,
        "one shared h2 connection per worker, not {accepts}"
    );
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    // One worker thread, so one pool sees every request.
    let p = start_with(|s| s.http_proxy.workers = 1).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    // Sequential requests, each on a new client connection: one upstream connection.
    for _ in 0..30 {
        let (status, _, _) = get(p.http, "web", "/").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(web.accepts.load(Ordering::SeqCst), 1);
    // Eight clients at once: at most eight upstream connections, reused after.
    for _round in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let addr = p.http;
            tasks.push(tokio::spawn(async move { get(addr, "web", "/").await.0 }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
    }
    let accepts = web.accepts.load(Ordering::SeqCst);
    assert!(
        accepts <= 8,
        "{accepts} upstream connections for 70 requests"
    );
    assert_eq!(web.requests.load(Ordering::SeqCst), 70);
    let m = p.metrics();
    assert!(
        m.contains(&format!(
            r#"netsel_http_proxy_upstream_requests_total{{service="web",reused="false"}} {accepts}"#
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"netsel_http_proxy_upstream_requests_total{{service="web",reused="true"}} {}"#,
            70 - accepts
        )),
        "{m}"
    );
}

#[tokio::test]
async fn bodies_stream_both_ways_100mb() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    const TOTAL: u64 = 100 * 1024 * 1024;
    // Upload: the instance counts what arrives.
    let mut tx = h1(p.http).await;
    let r = req("POST", "web", "/count", Big::new(TOTAL).boxed_body());
    let (status, _, body) = read(tx.send_request(r).await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, TOTAL.to_string()));
    // Download, counted frame by frame (never collected).
    let resp = tx
        .send_request(req("GET", "web", &format!("/big?{TOTAL}"), empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut b = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = http_body_util::BodyExt::frame(&mut b).await {
        n += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(n, TOTAL);
    // Echo over HTTP/2 both ways at once.
    let mut tx = h2(p.http).await;
    let r = req2("POST", "web", "/echo", Big::new(TOTAL / 4).boxed_body());
    let resp = tx.send_request(r).await.unwrap();
    let mut b = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = http_body_util::BodyExt::frame(&mut b).await {
        n += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(n, TOTAL / 4);
}

#[tokio::test]
async fn request_body_streams_before_it_is_complete() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    // The client sends one chunk and waits for it to come back through the echo before
    // sending the end: a proxy that buffered the whole request would deadlock here.
    let (mut sender, b) = channel_body();
    let mut tx = h1(p.http).await;
    let resp = tokio::spawn(async move { tx.send_request(req("POST", "web", "/echo", b)).await });
    sender.send(bytes::Bytes::from_static(b"first")).await;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response headers before the request body ended")
        .unwrap()
        .unwrap();
    let mut rb = resp.into_body();
    let f = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::frame(&mut rb),
    )
    .await
    .expect("first chunk echoed before the request body ended")
    .unwrap()
    .unwrap();
    assert_eq!(f.into_data().unwrap(), "first");
    drop(sender);
    assert!(rb.is_end_stream() || http_body_util::BodyExt::frame(&mut rb).await.is_none());
}

#[tokio::test]
async fn failover_when_an_instance_is_killed() {
    let p = start().await;
    let backends = [
        Backend::start("a", false).await,
        Backend::start("b", false).await,
        Backend::start("c", false).await,
    ];
    let mut clients = Vec::new();
    for b in &backends {
        clients.push(p.register("web", b.addr, AppProtocol::Http1).await);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (addr, stop) = (p.http, stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut tx = h1(addr).await;
            while !stop.is_cancelled() {
                match tx.send_request(req("GET", "web", "/", empty())).await {
                    Ok(r) => {
                        let (status, _, body) = read(r).await;
                        if status == StatusCode::OK {
                            ok += 1;
                        } else {
                            failed.push(format!("{status} {body}"));
                        }
                    }
                    Err(e) => {
                        failed.push(e.to_string());
                        tx = h1(addr).await;
                    }
                }
            }
            (ok, failed)
        }));
    }
    let served = |b: &Backend| b.requests.load(Ordering::SeqCst);
    eventually("load on every instance", || {
        backends.iter().all(|b| served(b) > 50)
    })
    .await;
    backends[1].kill();
    let at_kill = served(&backends[0]) + served(&backends[2]);
    eventually("load after the kill", || {
        served(&backends[0]) + served(&backends[2]) > at_kill + 500
    })
    .await;
    stop.cancel();
    let (mut ok, mut failed) = (0, Vec::new());
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 600);
}

#[tokio::test]
async fn connect_failures_retry_any_method() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_addr = gone.local_addr().unwrap();
    drop(gone);
    let _a = p.register("web", gone_addr, AppProtocol::Http1).await;
    let _b = p.register("web", web.addr, AppProtocol::Http1).await;
    for i in 0..10 {
        let mut tx = h1(p.http).await;
        let r = req("POST", "web", "/echo", body(format!("post {i}")));
        let (status, _, b) = read(tx.send_request(r).await.unwrap()).await;
        assert_eq!((status, b), (StatusCode::OK, format!("post {i}")));
    }
    assert!(
        p.metrics()
            .contains(r#"netsel_http_proxy_retries_total{service="web"}"#)
    );
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let p = start().await;
    // A WebSocket echo server.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    let _c = p.register("chat", ws_addr, AppProtocol::Http1).await;
    let stream = tokio::net::TcpStream::connect(p.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://chat.netsel/socket", stream)
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &big[..]
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn curl_http1_and_h2_prior_knowledge() {
    if !common::have_tool("curl", &["--version"], "curl is installed by .ci/run") {
        return;
    }
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let url = format!("http://{}/", p.http);
    for extra in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "5", "-H", "Host: web.netsel"])
            .args(extra)
            .arg(&url)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let first = text.lines().next().unwrap_or("");
        let want = if extra[0] == "--http1.1" {
            "HTTP/1.1 200"
        } else {
            "HTTP/2 200"
        };
        assert!(first.starts_with(want), "{extra:?}: {text}");
        assert!(text.ends_with("web-1"), "{text}");
    }
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: nope",
        ])
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let p = start().await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let addr = p.http;
    let slow = tokio::spawn(async move { get(addr, "web", "/slow?500").await });
    eventually("request in flight", || {
        web.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(p.server.shutdown().await, "drained within the deadline");
    let (status, _, body) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web-1"));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn shutdown_deadline_cuts_requests_that_do_not_finish() {
    let p = start_with(|s| s.drain_secs = 1).await;
    let web = Backend::start("web-1", false).await;
    let _w = p.register("web", web.addr, AppProtocol::Http1).await;
    let mut tx = h1(p.http).await;
    let hung =
        tokio::spawn(async move { tx.send_request(req("GET", "web", "/hang", empty())).await });
    eventually("request in flight", || {
        web.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = tokio::time::Instant::now();
    assert!(
        !p.server.shutdown().await,
        "the hung request is not drained"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let r = tokio::time::timeout(Duration::from_secs(3), hung)
        .await
        .expect("client connection closed at the deadline")
        .unwrap();
    assert!(r.is_err(), "no response for a request cut at the deadline");
}

/// Registers `addr` as an instance of `name` carrying `tags`.
async fn register_tagged(
    p: &Proxy,
    name: &str,
    addr: std::net::SocketAddr,
    tags: &[&str],
) -> netsel::client::ServiceClient {
    let mut b = netsel::client::ServiceClient::builder(name)
        .registry(p.registry)
        .endpoint(addr);
    for t in tags {
        b = b.tag(*t);
    }
    let mut c = b.build();
    c.register().await.expect("register");
    c
}

/// `curl` with `args`, `-s`; (status of success, stdout).
async fn curl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A request routed to a tag: by `X-Netsel-Tag`, or by the host `TAG.tag.NAME` (as in
/// DNS), the header winning; on the fast path, the general path and HTTP/2; 503 when no
/// healthy instance carries the tag, as for a service with none.
#[tokio::test]
async fn routes_to_a_tag_by_header_or_host() {
    if !common::have_tool("curl", &["--version"], "curl is installed by .ci/run") {
        return;
    }
    let p = start().await;
    let v1a = Backend::start("v1-a", false).await;
    let v1b = Backend::start("v1-b", false).await;
    let canary = Backend::start("canary", false).await;
    let plain = Backend::start("plain", false).await;
    let _a = register_tagged(&p, "web", v1a.addr, &["v1"]).await;
    let _b = register_tagged(&p, "web", v1b.addr, &["V1"]).await;
    let c = register_tagged(&p, "web", canary.addr, &["canary"]).await;
    let _d = register_tagged(&p, "web", plain.addr, &[]).await;
    let url = format!("http://{}/", p.http);

    // curl, HTTP/1.1 and h2c: header, host form, both (the header wins).
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        for (headers, want) in [
            (&["Host: web", "X-Netsel-Tag: canary"][..], "canary"),
            (&["Host: canary.tag.web.netsel:8081"], "canary"),
            (&["Host: CANARY.Tag.web"], "canary"),
            (&["Host: v1.tag.web", "X-Netsel-Tag: canary"], "canary"),
        ] {
            let mut args = vec![proto, url.as_str()];
            for h in headers {
                args.extend(["-H", h]);
            }
            assert_eq!(curl(&args).await, want, "{proto} {headers:?}");
        }
    }
    // The instance sees the Host the client sent, and the tag header.
    let (status, h, body) = get(p.http, "canary.tag.web", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "canary"));
    assert_eq!(h["x-seen-host"], "canary.tag.web");

    // Many requests on one keep-alive connection (the fast path), then on one the
    // general path serves (after a request for no service): only v1 instances, both
    // (tags match case-insensitively), in turn.
    for general in [false, true] {
        let mut tx = h1(p.http).await;
        if general {
            let r = tx.send_request(req("GET", "nope", "/", empty())).await;
            assert_eq!(read(r.unwrap()).await.0, StatusCode::NOT_FOUND);
        }
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..20 {
            let mut r = req("GET", "web", "/", empty());
            r.headers_mut()
                .insert("x-netsel-tag", "v1".parse().unwrap());
            let (status, _, body) = read(tx.send_request(r).await.unwrap()).await;
            assert_eq!(status, StatusCode::OK);
            *seen.entry(body).or_default() += 1;
        }
        assert_eq!(
            seen,
            [("v1-a".into(), 10), ("v1-b".into(), 10)].into(),
            "general path: {general}"
        );
    }

    // No tag: every instance, untagged ones included.
    let mut seen = std::collections::BTreeSet::new();
    let mut tx = h1(p.http).await;
    for _ in 0..8 {
        let r = tx.send_request(req("GET", "web", "/", empty())).await;
        seen.insert(read(r.unwrap()).await.2);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");

    // A tag no healthy instance carries: 503 naming it, on both forms; nothing is sent.
    let before = canary.requests.load(Ordering::SeqCst);
    p.server
        .catalog()
        .unwrap()
        .set_health(&c.instance_id().unwrap(), netsel::catalog::Health::Critical)
        .await
        .unwrap();
    for headers in [
        &["Host: web", "X-Netsel-Tag: canary"][..],
        &["Host: canary.tag.web"],
        &["Host: v9.tag.web"],
    ] {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}", url.as_str()];
        for h in headers {
            args.extend(["-H", h]);
        }
        assert_eq!(curl(&args).await, "503", "{headers:?}");
    }
    let (status, _, body) = get(p.http, "v9.tag.web", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no healthy instance tagged 'v9'"), "{body}");
    assert_eq!(canary.requests.load(Ordering::SeqCst), before);
    // The host form of an unknown service is a 404, as for the plain name.
    let (status, _, body) = get(p.http, "v1.tag.nosuch", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

/// `[http_proxy.splits.web] v1 = 95, canary = 5`: 2000 requests with curl (one
/// keep-alive connection: the fast path) and 400 over h2c; the canary gets 5 % of them
/// (the split is a Weyl sequence, so the share is exact to a request or two, but the test
/// allows for binomial noise, ±2.5 %, as if the choice were random: 5 σ at n = 2000),
/// untagged instances none; a named tag overrides the split; a canary gone gives its share
/// to v1; with no tag of the split healthy, 503.
#[tokio::test]
async fn a_split_sends_a_weighted_share_to_each_tag() {
    if !common::have_tool("curl", &["--version"], "curl is installed by .ci/run") {
        return;
    }
    let p = start_with(|s| {
        s.http_proxy.splits.insert(
            "web".into(),
            [("v1".to_string(), 95), ("canary".to_string(), 5)].into(),
        );
    })
    .await;
    let v1a = Backend::start("v1-a", false).await;
    let v1b = Backend::start("v1-b", false).await;
    let canary = Backend::start("canary", false).await;
    let plain = Backend::start("plain", false).await;
    let a = register_tagged(&p, "web", v1a.addr, &["v1"]).await;
    let b = register_tagged(&p, "web", v1b.addr, &["v1"]).await;
    let c = register_tagged(&p, "web", canary.addr, &["canary"]).await;
    let _d = register_tagged(&p, "web", plain.addr, &[]).await;
    let counts = || [&v1a, &v1b, &canary, &plain].map(|b| b.requests.swap(0, Ordering::SeqCst));

    // curl's URL globbing: 2000 requests on one connection.
    let url = format!("http://{}/r[1-2000]", p.http);
    let out = curl(&[
        "--http1.1",
        "-H",
        "Host: web",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &url,
    ])
    .await;
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 2000, "{out}");
    let [x, y, can, none] = counts();
    assert_eq!(x + y + can, 2000);
    assert!((50..=150).contains(&can), "canary got {can} of 2000");
    assert_eq!(none, 0, "untagged instances get nothing under a split");
    assert!(x.abs_diff(y) <= 100, "v1 balanced: {x} {y}");

    // HTTP/2 (the h2_bodiless path): the same share.
    let mut tx = h2(p.http).await;
    for _ in 0..400 {
        let r = tx.send_request(req2("GET", "web", "/", empty())).await;
        assert_eq!(read(r.unwrap()).await.0, StatusCode::OK);
    }
    let [x, y, can, none] = counts();
    assert_eq!((x + y + can, none), (400, 0));
    assert!((5..=40).contains(&can), "canary got {can} of 400 over h2");

    // A named tag wins over the split (even a tag outside it).
    let out = curl(&[
        "-H",
        "Host: web",
        "-H",
        "X-Netsel-Tag: canary",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &url.replace("2000", "20"),
    ])
    .await;
    assert_eq!(out.lines().count(), 20);
    assert_eq!(counts(), [0, 0, 20, 0]);
    let (_, _, body) = get(p.http, "web", "/").await;
    assert_ne!(body, "plain");
    counts();

    // The canary goes critical: v1 takes its share.
    let catalog = p.server.catalog().unwrap();
    let critical = netsel::catalog::Health::Critical;
    catalog
        .set_health(&c.instance_id().unwrap(), critical)
        .await
        .unwrap();
    curl(&[
        "-H",
        "Host: web",
        "-o",
        "/dev/null",
        &url.replace("2000", "100"),
    ])
    .await;
    let [x, y, can, none] = counts();
    assert_eq!((x + y, can, none), (100, 0, 0));
    // No tag of the split has a healthy instance: 503, though an untagged one is healthy.
    for i in [&a, &b] {
        catalog
            .set_health(&i.instance_id().unwrap(), critical)
            .await
            .unwrap();
    }
    let (status, _, body) = get(p.http, "web", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("its split"), "{body}");
    assert_eq!(counts(), [0, 0, 0, 0]);
}
