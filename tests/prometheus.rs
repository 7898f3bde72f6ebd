//! Prometheus finds NetSel's instances: the real Prometheus (Debian's `prometheus`, 2.42),
//! started by the test on loopback with a temporary config and storage, reads
//! `/v1/sd/prometheus` through `http_sd_configs` with a bare `Authorization` token (what
//! 2.42 sends without `type:`), and its `/api/v1/targets` shows the instances with their
//! labels, and stops showing one after it deregisters. Without `prometheus` the test is
//! skipped, and failed under CI.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Line, eventually};
use netsel::config::{AclSettings, AclToken};
use serde_json::Value;

const TOKEN: &str = "prometheus-token-0123456789";

/// A Prometheus server that is killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (Prometheus takes no port 0 it would tell us about).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_prometheus(sd_url: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n\
         scrape_configs:\n  - job_name: netsel\n    http_sd_configs:\n      \
         - url: '{sd_url}'\n        refresh_interval: 1s\n        \
         authorization:\n          credentials: '{TOKEN}'\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let mut last = None;
    for _ in 0..5 {
        let addr = free_port();
        let mut child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let ready = eventually(Duration::from_secs(30), || {
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            async move { exited || get(addr, "/-/ready").await.is_some_and(|(s, _)| s == 200) }
        })
        .await;
        match child.try_wait() {
            Ok(None) if ready => {
                return Prometheus {
                    child,
                    addr,
                    _dir: dir,
                };
            }
            // The port was taken between our probe and its bind: try another.
            status => {
                let _ = child.kill();
                let _ = child.wait();
                last = Some(format!("{status:?}"));
            }
        }
    }
    panic!("prometheus did not start: {last:?}");
}

/// A GET on loopback: (status, body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Prometheus's active targets of job `netsel`: their discovered labels.
async fn targets(p: &Prometheus) -> Vec<serde_json::Map<String, Value>> {
    let Some((200, body)) = get(p.addr, "/api/v1/targets?state=active").await else {
        return Vec::new();
    };
    // The answer may be chunked; the JSON object is between the first '{' and last '}'.
    let (Some(a), Some(b)) = (body.find('{'), body.rfind('}')) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body[a..=b]).unwrap_or(Value::Null);
    v["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["discoveredLabels"].as_object().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_discovers_instances_over_http_sd() {
    if !common::have_tool(
        "prometheus",
        &["--version"],
        "apt-get install prometheus (.ci/run does; it is run by the test, not as a service)",
    ) {
        return;
    }
    let mut settings = common::settings(30);
    settings.acl = AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![AclToken {
            name: "prometheus".into(),
            token: TOKEN.into(),
            read: vec!["*".into()],
            write: vec!["*".into()],
        }],
        ..AclSettings::default()
    };
    let (server, registry) = common::start(settings).await;
    let api = server.bound().unwrap().api.unwrap();

    // Two instances of `web` (the endpoints need not answer: discovery is what is tested)
    // and one of `db`, which the URL's filter leaves out.
    let mut line = Line::connect(registry).await;
    let mut register = async |what: &str| {
        let answer = line.ask(&format!("REGISTER|{what}|token={TOKEN}")).await;
        let f: Vec<&str> = answer.split('|').collect();
        assert_eq!(f[0], "REGISTERED", "{answer}");
        (f[1].to_string(), f[2].to_string(), f[3].to_string())
    };
    let (a_id, _, vip) =
        register("web|127.0.0.1:39101|tag=v1|tag=canary|meta.version=1.2|meta.team-name=core")
            .await;
    let (b_id, b_secret, _) = register("web|127.0.0.1:39102|tag=v2").await;
    register("db|127.0.0.1:39103").await;

    let prometheus = start_prometheus(&format!("http://{api}/v1/sd/prometheus?service=web")).await;
    let seen = eventually(Duration::from_secs(30), || async {
        targets(&prometheus).await.len() == 2
    })
    .await;
    let found = targets(&prometheus).await;
    assert!(seen, "prometheus should list both web instances: {found:?}");
    let a = found
        .iter()
        .find(|t| t["__meta_netsel_instance_id"] == a_id.as_str())
        .expect("instance a");
    assert_eq!(a["__address__"], "127.0.0.1:39101");
    assert_eq!(a["__meta_netsel_service"], "web");
    assert_eq!(a["__meta_netsel_vip"], vip.as_str());
    assert_eq!(a["__meta_netsel_health"], "passing");
    assert_eq!(a["__meta_netsel_tags"], ",v1,canary,");
    assert_eq!(a["__meta_netsel_meta_version"], "1.2");
    assert_eq!(a["__meta_netsel_meta_team_name"], "core");
    assert!(
        found.iter().all(|t| t["__meta_netsel_service"] == "web"),
        "the filter leaves db out: {found:?}"
    );

    // A deregistered instance leaves Prometheus's targets.
    let answer = line.ask(&format!("DEREGISTER|{b_id}|{b_secret}")).await;
    assert_eq!(answer, "OK");
    let gone = eventually(Duration::from_secs(30), || async {
        let t = targets(&prometheus).await;
        t.len() == 1 && t[0]["__meta_netsel_instance_id"] == a_id.as_str()
    })
    .await;
    assert!(gone, "b should leave: {:?}", targets(&prometheus).await);
    server.shutdown().await;
}
