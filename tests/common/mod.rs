//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(feature = "etcd")]
pub mod cluster;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Settings with every listener on 127.0.0.1:0, a per-test VIP pool and a short TTL.
pub fn settings(ttl_secs: u64) -> Settings {
    let mut s = Settings::ephemeral();
    s.config.max_heartbeat_age = ttl_secs;
    s.config.health_check_interval = 1;
    s.min_ttl_ms = 100;
    // A pool of its own per test so parallel tests never share VIPs.
    let b = fastrand::u8(1..=250);
    let c = fastrand::u8(0..=255);
    s.network.vip_cidr = format!("127.{b}.{c}.0/24").parse().unwrap();
    s
}

/// A started server and its registry address.
pub async fn start(settings: Settings) -> (NetSelServer, SocketAddr) {
    let server = NetSelServer::with_settings(settings);
    server.start().await.expect("server starts");
    let addr = server.bound().unwrap().registry;
    (server, addr)
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A line-protocol connection.
pub struct Line {
    pub stream: BufReader<TcpStream>,
}

impl Line {
    pub async fn connect(addr: SocketAddr) -> Line {
        Line {
            stream: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    /// Sends one line, returns the answer without its newline.
    pub async fn ask(&mut self, line: &str) -> String {
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.read_line().await
    }

    pub async fn read_line(&mut self) -> String {
        let mut s = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_line(&mut s))
            .await
            .expect("answer within 10 s")
            .unwrap();
        s.trim_end_matches('\n').to_string()
    }
}

/// `netsel serve`'s listen flags: tests give each `127.0.0.1:0`.
pub const LISTEN_FLAGS: [&str; 5] = [
    "--registry-addr",
    "--api-addr",
    "--dns-addr",
    "--tcp-proxy-addr",
    "--http-proxy-addr",
];

/// `netsel serve` (the real binary) on the data directory `dir`, every listener on
/// 127.0.0.1:0 and `RUST_LOG=warn`; add arguments, then spawn or run it.
pub fn serve_command(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_netsel"));
    cmd.arg("serve").arg("--data-dir").arg(dir);
    for flag in LISTEN_FLAGS {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}
