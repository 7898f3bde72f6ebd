//! Soak: the real `netsel serve` binary (durable store) under a mixed, paced load for a
//! long time, sampling its resident memory and open file descriptors. A server that leaks
//! a connection, a task, a timer or a catalog entry per operation shows it here as growth.
//!
//! `cargo bench --bench soak`. Environment: `SOAK_SECS`
//! (default 600), `SOAK_SAMPLE_SECS` (10), `SOAK_WARMUP_SECS` (60), `SOAK_DIR` (where the
//! data directory goes; default the system temp dir), `SOAK_RATE` (a multiplier on every
//! rate below, default 1).
//!
//! The load, all on loopback, paced rather than flat out (a soak looks for leaks, not for
//! the peak):
//! - 4 HTTP backends registered as `soakweb`, each heartbeating every second;
//! - registration churn: 20/s over 64 service names, half deregistered at once, half left
//!   to expire (a 2 s lease), so leases, VIP holds and the WAL turn over all the time;
//! - DNS over UDP: 1,000 queries/s mixing A, SRV, a churning name and NXDOMAIN; DNS over
//!   TCP: 10 connections/s, one query each;
//! - HTTP proxy: 4 keep-alive connections at 250 requests/s each, and 50 new connections/s
//!   with one request each;
//! - TCP proxy: 50 connections/s through the service's VIP, 10/s through the gateway;
//! - API: 4 blocking-query watchers on `/v1/services`, 2 event streams reconnecting every
//!   30 s, `/v1/services/soakweb` every second, `/metrics` every 5 s.
//!
//! It prints one line per sample and a summary, and exits 1 if resident memory or open
//! descriptors grew by more than 10 % from the end of warm-up to the end, or if more than
//! 0.1 % of any kind of operation failed.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use netsel::protocol::Response;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::{MissedTickBehavior, interval, timeout};

/// Longest any one operation may take before it counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Growth allowed from the end of warm-up to the end.
const MAX_GROWTH: f64 = 0.10;
/// Failed operations allowed, per kind.
const MAX_ERROR_RATE: f64 = 0.001;

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The kinds of operation the load makes, counted apart.
#[derive(Clone, Copy)]
enum Kind {
    Register,
    Heartbeat,
    DnsUdp,
    DnsTcp,
    HttpKeepAlive,
    HttpNewConn,
    Vip,
    Gateway,
    Watch,
    Event,
    ApiRead,
}

const KINDS: [(&str, Kind); 11] = [
    ("register+deregister", Kind::Register),
    ("heartbeat", Kind::Heartbeat),
    ("dns-udp", Kind::DnsUdp),
    ("dns-tcp", Kind::DnsTcp),
    ("http-keepalive", Kind::HttpKeepAlive),
    ("http-newconn", Kind::HttpNewConn),
    ("vip", Kind::Vip),
    ("gateway", Kind::Gateway),
    ("api-watch", Kind::Watch),
    ("api-event", Kind::Event),
    ("api-read", Kind::ApiRead),
];

#[derive(Default)]
struct Counters {
    ok: [AtomicU64; KINDS.len()],
    err: [AtomicU64; KINDS.len()],
    first_error: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn record<T, E: std::fmt::Display>(&self, kind: Kind, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => {
                self.ok[kind as usize].fetch_add(1, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                self.err[kind as usize].fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap();
                if first.len() < 20 {
                    first.push(format!("{}: {e}", KINDS[kind as usize].0));
                }
                None
            }
        }
    }

    fn ok(&self, kind: Kind) -> u64 {
        self.ok[kind as usize].load(Ordering::Relaxed)
    }

    fn err(&self, kind: Kind) -> u64 {
        self.err[kind as usize].load(Ordering::Relaxed)
    }
}

type Res<T> = Result<T, String>;

fn fail(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Paces a load loop: `per_sec` ticks a second (scaled by `SOAK_RATE`) until `stop`.
struct Pacer {
    tick: tokio::time::Interval,
    stop: Arc<AtomicBool>,
}

impl Pacer {
    fn new(per_sec: f64, stop: &Arc<AtomicBool>) -> Pacer {
        let rate = env_num("SOAK_RATE", 1.0);
        let mut tick = interval(Duration::from_secs_f64(1.0 / (per_sec * rate)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Pacer {
            tick,
            stop: stop.clone(),
        }
    }

    /// Waits for the next tick; false once the soak is over.
    async fn next(&mut self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.tick.tick().await;
        !self.stop.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------- the line protocol

struct Line {
    stream: BufReader<TcpStream>,
    buf: String,
}

impl Line {
    async fn connect(addr: SocketAddr) -> Res<Line> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| fail("connect", e))?;
        stream.set_nodelay(true).map_err(|e| fail("nodelay", e))?;
        Ok(Line {
            stream: BufReader::new(stream),
            buf: String::new(),
        })
    }

    async fn ask(&mut self, line: &str) -> Res<Response> {
        let exchange = async {
            self.stream
                .get_mut()
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(|e| fail("write", e))?;
            self.buf.clear();
            match self.stream.read_line(&mut self.buf).await {
                Ok(0) => Err("registry closed the connection".to_string()),
                Ok(_) => Response::parse(&self.buf).map_err(|e| fail("answer", e)),
                Err(e) => Err(fail("read", e)),
            }
        };
        timeout(OP_TIMEOUT, exchange)
            .await
            .map_err(|_| "no answer within 5 s".to_string())?
    }
}

/// Registers `endpoint` under `name`; returns (id, secret, vip, service port).
async fn register(
    conn: &mut Line,
    name: &str,
    endpoint: SocketAddr,
    ttl: &str,
) -> Res<(String, String, std::net::IpAddr, u16)> {
    match conn
        .ask(&format!("REGISTER|{name}|{endpoint}|ttl={ttl}"))
        .await?
    {
        Response::Registered(r) => Ok((r.id, r.secret, r.vip, r.service_port)),
        other => Err(format!("REGISTER answered {other:?}")),
    }
}

// ---------------------------------------------------------------- HTTP

/// An HTTP/1.1 backend answering every request `200 ok`, keeping connections alive.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    // A request head; the load sends no bodies.
                    let mut close = false;
                    loop {
                        line.clear();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        close |= line.eq_ignore_ascii_case("connection: close\r\n");
                    }
                    let answer: &[u8] = if close {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if stream.get_mut().write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one response (status line, head, `content-length` body) from `r`; returns its
/// status and head.
async fn read_response<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Res<(u16, String)> {
    let mut head = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.map_err(|e| fail("read", e))? == 0 {
            return Err("connection closed before the response".into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", head.lines().next()))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| fail("read body", e))?;
    Ok((status, head))
}

/// One request on a new connection to `addr` (first sending `prefix`, e.g. the gateway's
/// service line); expects `200`. Returns the response head.
async fn request_once(addr: SocketAddr, prefix: &str, host: &str, path: &str) -> Res<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| fail("connect", e))?;
        let req =
            format!("{prefix}GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| fail("write", e))?;
        let mut r = BufReader::new(stream);
        let (status, head) = read_response(&mut r).await?;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        Ok(head)
    };
    timeout(OP_TIMEOUT, exchange)
        .await
        .map_err(|_| "no response within 5 s".to_string())?
}

/// A keep-alive client of the HTTP proxy that reconnects when its connection fails.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    async fn get(&mut self, host: &str) -> Res<()> {
        let exchange = async {
            if self.conn.is_none() {
                let s = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| fail("connect", e))?;
                let _ = s.set_nodelay(true);
                self.conn = Some(BufReader::new(s));
            }
            let conn = self.conn.as_mut().unwrap();
            conn.get_mut()
                .write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
                .await
                .map_err(|e| fail("write", e))?;
            match read_response(conn).await? {
                (200, _) => Ok(()),
                (status, _) => Err(format!("status {status}")),
            }
        };
        let r = timeout(OP_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err("no response within 5 s".into()));
        if r.is_err() {
            self.conn = None;
        }
        r
    }
}

// ---------------------------------------------------------------- DNS

const A: u16 = 1;
const SRV: u16 = 33;

fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// Checks an answer to query `id`: `NOERROR` or `NXDOMAIN` (the load asks for names that
/// come and go), and `want_answers` when the name must exist.
fn check_dns(answer: &[u8], id: u16, must_exist: bool) -> Res<()> {
    if answer.len() < 12 || answer[..2] != id.to_be_bytes() || answer[2] & 0x80 == 0 {
        return Err("not an answer to the query".into());
    }
    let rcode = answer[3] & 0x0f;
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    match (rcode, must_exist) {
        (0, true) if answers > 0 => Ok(()),
        (0 | 3, false) => Ok(()),
        _ => Err(format!("rcode {rcode} with {answers} answers")),
    }
}

/// The `k`-th query of the mix: (name, type, must exist).
fn dns_mix(k: u64) -> (String, u16, bool) {
    match k % 10 {
        0..=3 => ("soakweb.netsel.".into(), A, true),
        4..=6 => ("_soakweb._tcp.netsel.".into(), SRV, true),
        7 | 8 => (format!("churn{}.netsel.", k % 64), A, false),
        _ => (format!("nothing{k}.netsel."), A, false),
    }
}

async fn dns_udp(sock: &UdpSocket, k: u64) -> Res<()> {
    let (name, qtype, must_exist) = dns_mix(k);
    let id = k as u16;
    sock.send(&dns_query(id, &name, qtype))
        .await
        .map_err(|e| fail("send", e))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = timeout(OP_TIMEOUT, sock.recv(&mut buf))
            .await
            .map_err(|_| "no DNS answer within 5 s".to_string())?
            .map_err(|e| fail("recv", e))?;
        // A late answer to an earlier, timed-out query: skip it.
        if n >= 2 && buf[..2] != id.to_be_bytes() {
            continue;
        }
        return check_dns(&buf[..n], id, must_exist);
    }
}

async fn dns_tcp(addr: SocketAddr, k: u64) -> Res<()> {
    let exchange = async {
        let (name, qtype, must_exist) = dns_mix(k);
        let id = k as u16;
        let q = dns_query(id, &name, qtype);
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| fail("connect", e))?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        s.write_all(&framed).await.map_err(|e| fail("write", e))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.map_err(|e| fail("read", e))?;
        let mut answer = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer)
            .await
            .map_err(|e| fail("read", e))?;
        check_dns(&answer, id, must_exist)
    };
    timeout(OP_TIMEOUT, exchange)
        .await
        .map_err(|_| "no DNS answer within 5 s".to_string())?
}

// ---------------------------------------------------------------- API

/// One blocking query on `/v1/services` from `index`; returns the new index.
async fn watch_once(api: SocketAddr, index: u64) -> Res<u64> {
    let path = format!("/v1/services?index={index}&wait=20s");
    let exchange = async {
        let head = request_once(api, "", "netsel", &path).await?;
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-netsel-index")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| "no x-netsel-index".to_string())
    };
    timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "blocking query outlived its wait".to_string())?
}

/// Reads the event stream for `secs`, counting `change` events.
async fn event_stream(api: SocketAddr, secs: u64, counters: &Counters) -> Res<()> {
    let mut s = TcpStream::connect(api)
        .await
        .map_err(|e| fail("connect", e))?;
    s.write_all(b"GET /v1/events HTTP/1.1\r\nhost: netsel\r\n\r\n")
        .await
        .map_err(|e| fail("write", e))?;
    let mut r = BufReader::new(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut line = String::new();
    loop {
        line.clear();
        match tokio::time::timeout_at(deadline, r.read_line(&mut line)).await {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => return Err("event stream closed".into()),
            Ok(Err(e)) => return Err(fail("read", e)),
            Ok(Ok(_)) => {
                if line.starts_with("event: change") {
                    counters.record::<_, String>(Kind::Event, Ok(()));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- the process

struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    data_kib: u64,
}

fn sample(pid: u32, data: &std::path::Path, at: Duration) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let data_kib = std::fs::read_dir(data)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
                / 1024
        })
        .unwrap_or(0);
    Sample {
        at,
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        data_kib,
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_num("SOAK_SECS", 600.0) as u64;
    let sample_secs = env_num("SOAK_SAMPLE_SECS", 10.0).max(1.0) as u64;
    let warmup_secs = env_num("SOAK_WARMUP_SECS", 60.0) as u64;
    let rate = env_num("SOAK_RATE", 1.0);
    assert!(
        secs >= warmup_secs + 4 * sample_secs,
        "SOAK_SECS must leave at least four samples after the warm-up"
    );

    let base = std::env::var_os("SOAK_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let b = fastrand::u8(1..=250);
    let mut cmd = common::serve_command(&data);
    cmd.args(["--vip-cidr", &format!("127.{b}.0.0/16")])
        .args(["--health-check-interval", "1"])
        .stderr(log);
    let mut served = common::spawn_ready(cmd);
    let pid = served.child.id();
    let registry = served.addr("registry");
    let api = served.addr("api");
    let dns = served.addr("dns");
    let gateway = served.addr("tcp_proxy");
    let http = served.addr("http_proxy");
    println!(
        "soak: netsel pid {pid}, {secs} s, samples every {sample_secs} s, warm-up {warmup_secs} s, rate ×{rate}"
    );

    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();

    // Backends, registered as `soakweb`, heartbeating every second on their connection.
    let mut vip = None;
    for _ in 0..4 {
        let endpoint = backend().await;
        let mut conn = Line::connect(registry).await.unwrap();
        let (id, secret, v, port) = register(&mut conn, "soakweb", endpoint, "10s")
            .await
            .unwrap();
        vip = Some(SocketAddr::new(v, port));
        let (c, mut pace) = (counters.clone(), Pacer::new(1.0, &stop));
        tasks.spawn(async move {
            let beat = format!("HEARTBEAT|{id}|{secret}");
            while pace.next().await {
                let r = match conn.ask(&beat).await {
                    Ok(Response::HeartbeatOk) => Ok(()),
                    Ok(other) => Err(format!("HEARTBEAT answered {other:?}")),
                    Err(e) => Err(e),
                };
                c.record(Kind::Heartbeat, r);
            }
        });
    }
    let vip = vip.unwrap();

    // Registration churn over 64 names: half deregistered at once, half left to expire.
    {
        let (c, mut pace) = (counters.clone(), Pacer::new(20.0, &stop));
        tasks.spawn(async move {
            let mut conn = None;
            let mut k = 0u64;
            while pace.next().await {
                k += 1;
                if conn.is_none() {
                    conn = c.record(Kind::Register, Line::connect(registry).await);
                }
                let Some(line) = conn.as_mut() else { continue };
                let endpoint = SocketAddr::from(([127, 0, 0, 1], 30_000 + (k % 4096) as u16));
                let name = format!("churn{}", k % 64);
                match c.record(Kind::Register, register(line, &name, endpoint, "2s").await) {
                    Some((id, secret, _, _)) if k.is_multiple_of(2) => {
                        let r = match line.ask(&format!("DEREGISTER|{id}|{secret}")).await {
                            Ok(Response::Ok) => Ok(()),
                            Ok(other) => Err(format!("DEREGISTER answered {other:?}")),
                            Err(e) => Err(e),
                        };
                        if c.record(Kind::Register, r).is_none() {
                            conn = None;
                        }
                    }
                    Some(_) => {}
                    None => conn = None,
                }
            }
        });
    }

    // DNS over UDP (two sockets at 500/s each) and over TCP.
    for _ in 0..2 {
        let (c, mut pace) = (counters.clone(), Pacer::new(500.0, &stop));
        tasks.spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.connect(dns).await.unwrap();
            let mut k = fastrand::u64(..);
            while pace.next().await {
                k += 1;
                c.record(Kind::DnsUdp, dns_udp(&sock, k).await);
            }
        });
    }
    {
        let (c, mut pace) = (counters.clone(), Pacer::new(10.0, &stop));
        tasks.spawn(async move {
            let mut k = 0;
            while pace.next().await {
                k += 1;
                c.record(Kind::DnsTcp, dns_tcp(dns, k).await);
            }
        });
    }

    // HTTP proxy: keep-alive connections, and a new connection per request.
    for _ in 0..4 {
        let (c, mut pace) = (counters.clone(), Pacer::new(250.0, &stop));
        tasks.spawn(async move {
            let mut client = KeepAlive {
                addr: http,
                conn: None,
            };
            while pace.next().await {
                c.record(Kind::HttpKeepAlive, client.get("soakweb").await);
            }
        });
    }
    // One request per connection: (kind, per second, address, first line, path).
    let once = |kind: Kind, per_sec: f64, addr, prefix: &'static str, path: &'static str| {
        let (c, mut pace) = (counters.clone(), Pacer::new(per_sec, &stop));
        async move {
            while pace.next().await {
                c.record(kind, request_once(addr, prefix, "soakweb", path).await);
            }
        }
    };
    tasks.spawn(once(Kind::HttpNewConn, 50.0, http, "", "/"));
    // TCP proxy: through the VIP, and through the gateway (first line names the service).
    tasks.spawn(once(Kind::Vip, 50.0, vip, "", "/"));
    tasks.spawn(once(Kind::Gateway, 10.0, gateway, "soakweb\n", "/"));

    // API: blocking-query watchers, event streams, reads, metrics scrapes.
    for _ in 0..4 {
        let (c, mut pace) = (counters.clone(), Pacer::new(2.0, &stop));
        tasks.spawn(async move {
            let mut index = 0;
            while pace.next().await {
                if let Some(i) = c.record(Kind::Watch, watch_once(api, index).await) {
                    index = i;
                }
            }
        });
    }
    for _ in 0..2 {
        let (c, mut pace) = (counters.clone(), Pacer::new(1.0 / 30.0, &stop));
        tasks.spawn(async move {
            while pace.next().await {
                let r = event_stream(api, 30, &c).await;
                if let Err(e) = r {
                    c.record::<(), _>(Kind::Event, Err(e));
                }
            }
        });
    }
    tasks.spawn(once(Kind::ApiRead, 1.0, api, "", "/v1/services/soakweb"));
    tasks.spawn(once(Kind::ApiRead, 0.2, api, "", "/metrics"));

    // Samples until the end.
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut tick = interval(Duration::from_secs(sample_secs));
    tick.tick().await;
    println!(
        "{:>6} {:>9} {:>5} {:>7} {:>9}  operations ok (failed)",
        "t", "rss", "fds", "threads", "data"
    );
    while t0.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        if let Ok(Some(status)) = served.child.try_wait() {
            eprintln!(
                "netsel exited during the soak: {status}; log: {}",
                log_path.display()
            );
            std::process::exit(1);
        }
        let s = sample(pid, &data, t0.elapsed());
        let ops: Vec<String> = KINDS
            .iter()
            .map(|&(name, kind)| match counters.err(kind) {
                0 => format!("{name} {}", counters.ok(kind)),
                e => format!("{name} {} ({e})", counters.ok(kind)),
            })
            .collect();
        println!(
            "{:>5}s {:>6.1}MiB {:>5} {:>7} {:>6.1}MiB  {}",
            s.at.as_secs(),
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.threads,
            s.data_kib as f64 / 1024.0,
            ops.join(", ")
        );
        samples.push(s);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Event streams and blocking queries end within their own deadlines (≤ 30 s).
    let drained = timeout(Duration::from_secs(40), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();

    // Stop the server as an operator would, and wait for it.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = served.child.wait().unwrap();
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warnings = log_text.lines().filter(|l| l.contains("WARN")).count();
    let errors = log_text.lines().filter(|l| l.contains("ERROR")).count();

    // Baseline: the first three samples after warm-up; end: the last three.
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= Duration::from_secs(warmup_secs))
        .collect();
    let base = &after[..3.min(after.len())];
    let end = &after[after.len().saturating_sub(3)..];
    let growth = |f: fn(&Sample) -> u64| {
        let b = mean(base.iter().map(|s| f(s) as f64));
        let e = mean(end.iter().map(|s| f(s) as f64));
        (b, e, e / b - 1.0)
    };
    let (rss_b, rss_e, rss_g) = growth(|s| s.rss_kib);
    let (fd_b, fd_e, fd_g) = growth(|s| s.fds);
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let fd_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);

    println!("\n| figure | after warm-up | at the end | growth | peak |");
    println!("|---|---|---|---|---|");
    println!(
        "| resident memory | {:.1} MiB | {:.1} MiB | {:+.1} % | {:.1} MiB |",
        rss_b / 1024.0,
        rss_e / 1024.0,
        rss_g * 100.0,
        rss_max as f64 / 1024.0
    );
    println!(
        "| open file descriptors | {fd_b:.0} | {fd_e:.0} | {:+.1} % | {fd_max} |",
        fd_g * 100.0
    );
    println!("\n| operation | ok | failed | per second |");
    println!("|---|---|---|---|");
    let mut too_many_errors = false;
    for &(name, kind) in &KINDS {
        let (ok, err) = (counters.ok(kind), counters.err(kind));
        too_many_errors |= err as f64 > MAX_ERROR_RATE * (ok + err) as f64;
        println!("| {name} | {ok} | {err} | {:.0} |", ok as f64 / elapsed);
    }
    for e in counters.first_error.lock().unwrap().iter() {
        println!("failure: {e}");
    }
    println!(
        "\nnetsel exited {exit} after SIGTERM; its log has {warnings} warnings and {errors} errors"
    );

    let mut failed = Vec::new();
    if rss_g > MAX_GROWTH {
        failed.push(format!("resident memory grew {:.1} %", rss_g * 100.0));
    }
    if fd_g > MAX_GROWTH {
        failed.push(format!("open descriptors grew {:.1} %", fd_g * 100.0));
    }
    if too_many_errors {
        failed.push("more than 0.1 % of some operation failed".into());
    }
    if !drained {
        failed.push("load tasks did not finish within 40 s of the end".into());
    }
    if !exit.success() {
        failed.push(format!("netsel exited {exit}"));
    }
    if failed.is_empty() {
        println!("soak passed");
    } else {
        // Keep the data directory and the log for a look.
        println!(
            "soak FAILED: {}; kept {}",
            failed.join("; "),
            dir.keep().display()
        );
        std::process::exit(1);
    }
}
