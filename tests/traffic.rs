//! `GET /v1/traffic` on a real server: requests through the HTTP proxy show up as points
//! of the service's series; with ACLs on, reading them needs a token.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use netsel::catalog::{Endpoint, Registration};
use netsel::{NetSelServer, Settings};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
async fn http(addr: SocketAddr, host: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // The API answers with a length or chunked; the bodies read here are small JSON.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Sends requests through the proxy to `host` until dropped.
fn keep_sending(proxy: SocketAddr, host: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            let (status, body) = http(proxy, host, "/", None).await;
            assert_eq!((status, body.as_str()), (200, "ok"));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_through_the_proxy_becomes_points() {
    let mut settings = Settings::ephemeral();
    settings.api.traffic_interval_ms = 100;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let bound = server.bound().unwrap();
    let (api, proxy) = (bound.api.unwrap(), bound.http_proxy.unwrap());
    let catalog = server.catalog().unwrap();
    let be = common::ok_backend().await;
    catalog
        .register(Registration::new("traffic-web", Endpoint::Explicit(be)))
        .await
        .unwrap();
    let idle = catalog
        .register(Registration::new(
            "traffic-idle",
            Endpoint::Explicit("127.0.0.1:9".parse().unwrap()),
        ))
        .await
        .unwrap();
    let sender = keep_sending(proxy, "traffic-web");

    // Wait (bounded) until two intervals with requests have been sampled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = http(api, "api", "/v1/traffic", None).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let busy = v["services"]["traffic-web"]["rps"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|r| r.as_f64() > Some(0.0)).count());
        if busy >= 2 {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no points with traffic: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sender.abort();
    assert_eq!(body["interval_secs"].as_f64(), Some(0.1));
    assert_eq!(body["points_max"].as_u64(), Some(180));
    let web = &body["services"]["traffic-web"];
    let n = web["t"].as_array().unwrap().len();
    for key in ["rps", "error_rate", "p99_ms", "open"] {
        assert_eq!(web[key].as_array().unwrap().len(), n, "{key}: {web}");
    }
    let last_busy = web["rps"]
        .as_array()
        .unwrap()
        .iter()
        .rposition(|r| r.as_f64() > Some(0.0))
        .unwrap();
    assert!(web["p99_ms"][last_busy].as_f64().unwrap() > 0.0, "{web}");
    assert_eq!(web["error_rate"][last_busy].as_f64(), Some(0.0), "{web}");
    let t = web["t"].as_array().unwrap();
    assert!(
        t.windows(2).all(|w| w[0].as_f64() <= w[1].as_f64()),
        "{web}"
    );
    // A service without traffic has a flat series; no latency without requests.
    let flat = &body["services"]["traffic-idle"];
    assert!(
        flat["rps"].as_array().unwrap().iter().all(|r| r == 0.0),
        "{flat}"
    );
    assert!(
        flat["p99_ms"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_null)
    );

    // One service.
    let (status, body) = http(api, "api", "/v1/traffic?service=traffic-web", None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&String> = v["services"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["traffic-web"]);

    // Only newer points with `since`: a `t` given back as answered excludes its own point.
    for since in t.iter().map(|x| x.as_f64().unwrap()) {
        let path = format!("/v1/traffic?service=traffic-web&since={since}");
        let (status, body) = http(api, "api", &path, None).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let newer = v["services"]["traffic-web"]["t"].as_array().unwrap();
        assert!(
            newer.iter().all(|x| x.as_f64() > Some(since)),
            "{since}: {v}"
        );
    }
    let (status, _) = http(api, "api", "/v1/traffic?since=yesterday", None).await;
    assert_eq!(status, 400);

    // A service that leaves the catalog leaves the series at the next sample.
    catalog.deregister_admin(idle.id.as_str()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(api, "api", "/v1/traffic", None).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["services"].get("traffic-idle").is_none() {
            assert!(v["services"].get("traffic-web").is_some(), "{v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still there: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_needs_read_rights_when_acls_are_on() {
    use netsel::config::{AclSettings, AclToken};
    let mut settings = Settings::ephemeral();
    settings.api.traffic_interval_ms = 100;
    settings.acl = AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![AclToken {
            name: "web-reader".into(),
            token: "web-reader-token-0123".into(),
            read: vec!["acl-web".into()],
            write: vec![],
        }],
        ..AclSettings::default()
    };
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    for (name, port) in [("acl-web", 7001), ("acl-db", 7002)] {
        let ep = format!("127.0.0.1:{port}").parse().unwrap();
        catalog
            .register(Registration::new(name, Endpoint::Explicit(ep)))
            .await
            .unwrap();
    }
    let token = Some("web-reader-token-0123");
    // Without a token: refused, all or one.
    let (status, body) = http(api, "api", "/v1/traffic", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(api, "api", "/v1/traffic?service=acl-web", None).await;
    assert_eq!(status, 401);
    // A token reading one service: that one only.
    let (status, _) = http(api, "api", "/v1/traffic?service=acl-db", token).await;
    assert_eq!(status, 403);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http(api, "api", "/v1/traffic", token).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&String> = v["services"].as_object().unwrap().keys().collect();
        assert!(names.iter().all(|n| *n == "acl-web"), "{v}");
        if !names.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

/// A TCP echo backend.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A connection through the TCP gateway to `name`, checked with one echo.
async fn via_gateway(gateway: SocketAddr, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(format!("{name}\nhello").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    s
}

/// Polls `/v1/traffic?service=NAME` until `done` accepts the series (bounded).
async fn wait_for(api: SocketAddr, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http(api, "api", &format!("/v1/traffic?service={name}"), None).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let series = &v["services"][name];
        if !series.is_null() && done(series) {
            return series.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{name}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn any(series: &Value, key: &str, pred: impl Fn(f64) -> bool) -> bool {
    series[key]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_f64().is_some_and(&pred))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_connections_failures_and_open_relays_count() {
    let mut settings = Settings::ephemeral();
    settings.api.traffic_interval_ms = 100;
    settings.tcp_proxy.vip_listeners = false;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let bound = server.bound().unwrap();
    let (api, gateway) = (bound.api.unwrap(), bound.tcp_proxy.unwrap());
    let catalog = server.catalog().unwrap();
    catalog
        .register(Registration::new(
            "traffic-tcp",
            Endpoint::Explicit(echo().await),
        ))
        .await
        .unwrap();
    // An instance whose port refuses connections.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    catalog
        .register(Registration::new(
            "traffic-down",
            Endpoint::Explicit(refused),
        ))
        .await
        .unwrap();
    // Both services are tracked before traffic starts (their first sample is the baseline).
    wait_for(api, "traffic-tcp", |s| {
        !s["t"].as_array().unwrap().is_empty()
    })
    .await;
    wait_for(api, "traffic-down", |s| {
        !s["t"].as_array().unwrap().is_empty()
    })
    .await;

    // One relay that stays open, and one that ends.
    let held = via_gateway(gateway, "traffic-tcp").await;
    drop(via_gateway(gateway, "traffic-tcp").await);
    let s = wait_for(api, "traffic-tcp", |s| {
        any(s, "rps", |r| r > 0.0) && any(s, "open", |o| o >= 1.0)
    })
    .await;
    assert!(!any(&s, "error_rate", |e| e > 0.0), "{s}");
    // No HTTP request: no latency.
    assert!(
        s["p99_ms"].as_array().unwrap().iter().all(Value::is_null),
        "{s}"
    );
    drop(held);
    // Closed: the open count goes back to 0.
    wait_for(api, "traffic-tcp", |s| {
        s["open"].as_array().unwrap().last() == Some(&Value::from(0))
    })
    .await;

    // A connection whose instance refuses: an error, no relay.
    let mut c = TcpStream::connect(gateway).await.unwrap();
    c.write_all(b"traffic-down\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer).await;
    let s = wait_for(api, "traffic-down", |s| any(s, "error_rate", |e| e > 0.0)).await;
    assert!(any(&s, "error_rate", |e| e == 1.0), "{s}");
    server.shutdown().await;
}
