//! The API on a real server (port 0): metrics parsed by a Prometheus text parser, the
//! server-sent-event stream, the client library's watch, and shutdown with open streams.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use netsel::client::http::{self, HttpRequest};
use netsel::{NetSelServer, Settings};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

async fn server() -> (NetSelServer, SocketAddr, SocketAddr) {
    let server = NetSelServer::with_settings(Settings::ephemeral());
    server.start().await.unwrap();
    let bound = server.bound().unwrap();
    (server, bound.api.expect("API is bound"), bound.registry)
}

async fn post_json(api: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let req = HttpRequest::new("POST", path).json(body.to_string());
    let r = http::send(api, &req, T).await.unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

async fn get(api: SocketAddr, path: &str) -> http::HttpResponse {
    http::send(api, &HttpRequest::new("GET", path), T)
        .await
        .unwrap()
}

async fn register(api: SocketAddr, name: &str, port: u16) -> (String, String) {
    let (status, body) = post_json(
        api,
        "/v1/instances",
        json!({"name": name, "address": "127.0.0.1", "port": port}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_string(),
        body["secret"].as_str().unwrap().to_string(),
    )
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("unexpected sample {s:?}"),
    }
}

fn find<'a>(
    scrape: &'a prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<&'a prometheus_parse::Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let (server, api, registry) = server().await;
    let (id, secret) = register(api, "web", 8000).await;
    register(api, "web", 8001).await;
    let req = HttpRequest::new("PUT", "/v1/instances/x/heartbeat");
    let r = http::send(api, &req.header("X-Netsel-Secret", "x"), T)
        .await
        .unwrap();
    assert_eq!(
        r.status, 404,
        "an unknown instance is not counted as a heartbeat"
    );
    let path = format!("/v1/instances/{id}/heartbeat");
    let r = http::send(
        api,
        &HttpRequest::new("PUT", &path).header("X-Netsel-Secret", secret),
        T,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Two bad line-protocol requests.
    let mut conn = tokio::net::TcpStream::connect(registry).await.unwrap();
    conn.write_all(b"BOGUS|x\nHEARTBEAT|0123|wrong\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let mut got = String::new();
    while got.matches('\n').count() < 2 {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }

    let r = get(api, "/metrics").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let v = |m: &str, l: &[(&str, &str)]| {
        value(find(&scrape, m, l).unwrap_or_else(|| panic!("no {m} {l:?} in\n{text}")))
    };
    assert_eq!(v("netsel_registrations_total", &[]), 2.0);
    assert_eq!(v("netsel_heartbeats_total", &[]), 1.0);
    assert_eq!(v("netsel_expiries_total", &[]), 0.0);
    assert_eq!(v("netsel_services", &[]), 1.0);
    assert_eq!(
        v(
            "netsel_instances",
            &[("service", "web"), ("health", "passing")]
        ),
        2.0
    );
    assert_eq!(
        v(
            "netsel_instances",
            &[("service", "web"), ("health", "critical")]
        ),
        0.0
    );
    assert_eq!(
        v(
            "netsel_registry_errors_total",
            &[("reason", "unknown_command")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "netsel_registry_errors_total",
            &[("reason", "unknown_instance")]
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn event_stream_sends_changes_and_ends_at_shutdown() {
    let (server, api, _) = server().await;
    let mut all = http::open(api, &HttpRequest::new("GET", "/v1/events"))
        .await
        .unwrap();
    assert_eq!(all.status, 200);
    assert!(
        all.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut only_db = http::open(api, &HttpRequest::new("GET", "/v1/events?service=db"))
        .await
        .unwrap();
    let hello = all.next_event().await.unwrap().unwrap();
    assert_eq!(hello.event, "hello");
    assert_eq!(only_db.next_event().await.unwrap().unwrap().event, "hello");

    let (id, _) = register(api, "web", 8000).await;
    register(api, "db", 5432).await;
    let mut kinds = Vec::new();
    for _ in 0..4 {
        let e = tokio::time::timeout(T, all.next_event())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.event, "change");
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(e.id.as_deref(), Some(data["index"].to_string().as_str()));
        kinds.push((
            data["service"].as_str().unwrap().to_string(),
            data["kind"].as_str().unwrap().to_string(),
        ));
    }
    assert!(
        kinds.contains(&("web".into(), "service_created".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("web".into(), "instance_registered".into())),
        "{kinds:?}"
    );
    let e = tokio::time::timeout(T, only_db.next_event())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let data: Value = serde_json::from_str(&e.data).unwrap();
    assert_eq!(data["service"], "db", "the filtered stream only sees db");
    assert!(id.len() == 16);

    // Shutdown ends the streams and drains in time.
    let drained = tokio::time::timeout(T, server.shutdown()).await.unwrap();
    assert!(drained, "shutdown waited on open event streams");
    let end = tokio::time::timeout(T, async {
        loop {
            match all.next_event().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("stream did not end at shutdown");
    let _ = end;
}

#[tokio::test]
async fn client_watch_follows_a_service() {
    let (server, api, _) = server().await;
    let mut watch = netsel::client::watch(api, "orders").wait(Duration::from_secs(20));
    assert_eq!(watch.next().await.unwrap(), None, "not registered yet");
    // Each change the watch reports, as it reports it.
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let waiter = tokio::spawn(async move {
        for _ in 0..2 {
            tx.send(watch.next().await.unwrap()).unwrap();
        }
    });
    let (id, secret) = register(api, "orders", 7001).await;
    let first = tokio::time::timeout(T, changes.recv())
        .await
        .unwrap()
        .unwrap();
    // Deregistered only once the registration was seen, so the watch reports both.
    let path = format!("/v1/instances/{id}");
    let r = http::send(
        api,
        &HttpRequest::new("DELETE", &path).header("X-Netsel-Secret", secret),
        T,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let second = tokio::time::timeout(T, changes.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, waiter).await.unwrap().unwrap();
    let first = first.expect("registered");
    assert_eq!(first.name, "orders");
    assert_eq!(first.instances.len(), 1);
    assert_eq!(first.instances[0].endpoint.port(), 7001);
    assert_eq!(second, None, "deregistered");
    server.shutdown().await;
}

#[tokio::test]
async fn ui_and_openapi_are_served_from_the_binary() {
    let (server, api, _) = server().await;
    let r = get(api, "/ui/").await;
    assert_eq!(r.status, 200);
    let html = r.text();
    assert!(html.contains("<script src=\"app.js\""), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'"));
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let r = get(api, asset).await;
        assert_eq!(r.status, 200, "{asset}");
        assert!(!r.body.is_empty());
        assert!(
            !r.text().contains("https://"),
            "{asset} loads nothing external"
        );
    }
    let r = get(api, "/").await;
    assert_eq!(r.status, 307);
    assert_eq!(r.header("location"), Some("/ui/"));
    let r = get(api, "/v1/openapi.yaml").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("openapi: 3."));
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let mut settings = Settings::ephemeral();
    settings.api.max_connections = 1;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    // The first client keeps its connection open (keep-alive) after one request.
    let mut first = tokio::net::TcpStream::connect(api).await.unwrap();
    first
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second client's request waits, unread, while the first holds the only slot...
    let request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut second = tokio::net::TcpStream::connect(api).await.unwrap();
    second.write_all(request).await.unwrap();
    let client = second.local_addr().unwrap();
    let len = request.len() as u64;
    assert!(
        common::eventually(T, || async {
            common::unread_bytes(api, client) == Some(len)
        })
        .await,
        "the second request reached the server"
    );
    // ...and stays unread while the server goes on serving the first.
    first
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        common::unread_bytes(api, client),
        Some(len),
        "served beyond max_connections"
    );
    let second = tokio::spawn(async move {
        let mut out = Vec::new();
        second.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    });
    // ...and is served once it is released.
    drop(first);
    let answer = tokio::time::timeout(T, second).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.shutdown().await;
}
