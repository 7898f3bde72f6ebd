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

/// A `netsel serve` child that printed `ready`, and the addresses it printed before
/// (`registry: 127.0.0.1:4242` → `"registry"`).
pub struct Served {
    pub child: std::process::Child,
    pub addrs: std::collections::HashMap<String, SocketAddr>,
}

impl Served {
    /// The address of listener `name`; panics if the server did not print it.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("netsel serve printed no {name} address"))
    }
}

/// Spawns `cmd` (a [`serve_command`]) with stdout piped and waits for its `ready` line;
/// panics with the exit status if it exits first. A thread keeps draining stdout so the
/// child never blocks on a full pipe.
pub fn spawn_ready(mut cmd: std::process::Command) -> Served {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn netsel serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = std::collections::HashMap::new();
    let mut ready = false;
    for line in lines.by_ref() {
        let line = line.expect("read netsel's stdout");
        if line == "ready" {
            ready = true;
            break;
        }
        if let Some((name, addr)) = line.split_once(": ")
            && let Ok(addr) = addr.parse()
        {
            addrs.insert(name.to_string(), addr);
        }
    }
    if !ready {
        let status = child.wait();
        panic!("netsel serve exited before it was ready: {status:?}");
    }
    std::thread::spawn(move || for _ in lines {});
    Served { child, addrs }
}

/// Bytes that arrived on the server's side of the TCP connection `client` → `server` and
/// that the server has not read (`None`: no such connection), from `/proc/net/tcp`. A
/// request whose bytes stay unread while the server answers others shows that the server
/// holds that client back (a connection cap), rather than being slow to serve it.
/// IPv4 only.
pub fn unread_bytes(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    // /proc/net/tcp writes an address as its in-memory u32 (native order) and a port.
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => panic!("unread_bytes reads /proc/net/tcp: IPv4 only"),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        // sl local remote st tx_queue:rx_queue …
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1)? != &local || f.get(2)? != &remote {
            return None;
        }
        u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()
    })
}

/// Connections waiting in the accept queues of the sockets listening on `listener`
/// (summed over an `SO_REUSEPORT` group), from `/proc/net/tcp`, where a listening
/// socket's receive queue is its accept queue. A server that holds clients in the
/// backlog (a connection cap applied before `accept`) shows them here, not accepted.
/// IPv4 only.
pub fn accept_queue(listener: SocketAddr) -> u64 {
    let SocketAddr::V4(v4) = listener else {
        panic!("accept_queue reads /proc/net/tcp: IPv4 only");
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local remote st tx_queue:rx_queue …; st 0A is LISTEN.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1)? != &local || f.get(3)? != &"0A" {
                return None;
            }
            u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()
        })
        .sum()
}

/// Sends signal `sig` ("TERM", "-STOP", "SIGKILL", …) to process `pid` with kill(2);
/// false if no such process.
///
/// Never through the `kill` command: Debian's procps-ng 4 reads `kill -KILL -12345` as
/// `kill(-1, SIGKILL)`, every process on the machine (a CI run was lost to it).
pub fn signal(pid: u32, sig: &str) -> bool {
    send(i32::try_from(pid).expect("a pid"), sig)
}

/// Sends signal `sig` to every process in process group `pgid` (kill(2) with `-pgid`).
pub fn signal_group(pgid: u32, sig: &str) -> bool {
    send(-i32::try_from(pgid).expect("a pgid"), sig)
}

#[allow(unsafe_code)] // kill(2): no safe wrapper among our dependencies.
fn send(target: i32, sig: &str) -> bool {
    // pid 0 and -1 would reach our own group or the whole machine.
    assert!(target != 0 && target != -1, "refusing to signal {target}");
    let name = sig.trim_start_matches('-');
    let name = name.strip_prefix("SIG").unwrap_or(name);
    let signo = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        other => panic!("unknown signal {other}"),
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(target, signo) == 0 }
}

/// Whether the system tool `tool` runs (`tool ARGS…` exits at all). Missing, it fails the
/// test under CI (`.ci/run` installs every tool, `hint` says how) and skips it otherwise,
/// so `cargo test` passes on a machine with only Rust.
pub fn have_tool(tool: &str, args: &[&str], hint: &str) -> bool {
    let found = std::process::Command::new(tool)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI: {hint}"
        );
        eprintln!("note: {tool} is not installed ({hint}); skipping");
    }
    found
}

/// A tiny HTTP/1.1 backend answering `ok` to every request, one per connection.
pub async fn ok_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}
