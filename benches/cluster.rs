//! Cluster benchmark (plain `main`, no harness), against a real 3-member etcd on loopback:
//!
//! 1. `reg`: registrations/s through 3 `netsel serve` nodes, against etcd's own
//!    create-if-absent transaction rate (a compare on the key, a put with a lease) with
//!    the same concurrency, alternating, in the same minutes;
//! 2. `prop`: propagation, a registration acknowledged by node A to node B's DNS answer,
//!    p50/p99 over `BENCH_SAMPLES` registrations;
//! 3. `hb`: heartbeats/s on a cluster node against a single in-memory node (same binary,
//!    same clients).
//!
//! `cargo bench --features etcd --bench cluster` (env: `BENCH_SECS` per run, default 5;
//! `BENCH_CLIENTS`, default 64; `BENCH_SAMPLES`, default 300; `BENCH_ONLY`, a
//! comma-separated subset of `reg,prop,hb`).

#![allow(clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{ClusterConfig, Etcd, Node, dns_a};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wanted(what: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|w| w == what))
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Conn {
            r: BufReader::new(r),
            w,
            line: String::new(),
        }
    }

    async fn ask(&mut self, line: &str) -> &str {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.line.clear();
        self.r.read_line(&mut self.line).await.unwrap();
        self.line.trim_end()
    }
}

/// Runs `clients` loops of `op` for `secs`; returns completions per second.
async fn rate<F, Fut>(clients: usize, secs: u64, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for c in 0..clients {
        let (stop, done, op) = (stop.clone(), done.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                if op(c, k).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// etcd's own create-if-absent rate: a compare on a fresh key and a put with a lease.
async fn etcd_rate(etcd: &Etcd, clients: usize, secs: u64, round: u64) -> f64 {
    let client = etcd.client().await;
    let lease = client.lease_client().grant(60, None).await.unwrap().id();
    rate(clients, secs, move |c, k| {
        let mut kv = client.kv_client();
        async move {
            let key = format!("/bench/{round}/{c}/{k}");
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key,
                    vec![b'x'; 300],
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            kv.txn(txn).await.map(|r| r.succeeded()).unwrap_or(false)
        }
    })
    .await
}

/// Registrations/s through the nodes: each client its own connection to one node,
/// registering distinct endpoints of 100 services.
async fn netsel_rate(nodes: &[SocketAddr], clients: usize, secs: u64, round: u64) -> f64 {
    let mut conns = Vec::new();
    for c in 0..clients {
        conns.push(Arc::new(tokio::sync::Mutex::new(
            Conn::open(nodes[c % nodes.len()]).await,
        )));
    }
    let conns = Arc::new(conns);
    rate(clients, secs, move |c, k| {
        let conns = conns.clone();
        async move {
            let mut conn = conns[c].lock().await;
            let ip = format!("127.{}.{}.{}", 100 + round, c, k % 250 + 1);
            let port = 1000 + (k / 250) % 60000;
            let line = format!("REGISTER|bench-{}|{ip}:{port}\n", k % 100);
            conn.ask(&line).await.starts_with("REGISTERED")
        }
    })
    .await
}

fn spawn_single() -> (Child, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netsel"));
    cmd.args(["serve", "--in-memory", "--max-heartbeat-age", "600"]);
    for flag in common::LISTEN_FLAGS {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    let mut child = cmd
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut registry = None;
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(a) = l.strip_prefix("registry: ") {
            registry = a.parse().ok();
        }
        if l == "ready" {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, registry.unwrap())
}

/// Heartbeats/s against `registry`: 16 instances, 16 clients, one connection each.
async fn heartbeat_rate(registry: SocketAddr, secs: u64) -> f64 {
    let mut creds = Vec::new();
    for c in 0..16 {
        let mut conn = Conn::open(registry).await;
        let a = conn
            .ask(&format!(
                "REGISTER|hb-{c}|127.0.0.1:{}|ttl=600s\n",
                30000 + c
            ))
            .await
            .to_string();
        let f: Vec<&str> = a.split('|').collect();
        assert_eq!(f[0], "REGISTERED", "{a}");
        creds.push((
            Arc::new(tokio::sync::Mutex::new(conn)),
            format!("HEARTBEAT|{}|{}\n", f[1], f[2]),
        ));
    }
    let creds = Arc::new(creds);
    rate(16, secs, move |c, _| {
        let creds = creds.clone();
        async move {
            let (conn, line) = &creds[c];
            conn.lock().await.ask(line).await == "HEARTBEAT_OK"
        }
    })
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let secs = env_num("BENCH_SECS", 5);
    let clients = env_num("BENCH_CLIENTS", 64) as usize;
    let Some(etcd) = Etcd::start(3).await else {
        println!("cluster bench needs etcd");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ClusterConfig::new(&etcd, dir.path());
    cfg.max_heartbeat_age = 600;
    cfg.lease_ttl_secs = 10;
    let nodes = [
        Node::start(&cfg, "a"),
        Node::start(&cfg, "b"),
        Node::start(&cfg, "c"),
    ];
    let registries: Vec<SocketAddr> = nodes.iter().map(|n| n.registry).collect();
    println!("etcd 3 members on loopback, 3 netsel nodes; {clients} clients, {secs} s per run");

    if wanted("reg") {
        let mut e = Vec::new();
        let mut n = Vec::new();
        for round in 0..2 {
            e.push(etcd_rate(&etcd, clients, secs, round).await);
            n.push(netsel_rate(&registries, clients, secs, round).await);
            println!(
                "round {round}: etcd create-if-absent txn {:.0}/s, netsel registrations {:.0}/s",
                e[round as usize], n[round as usize]
            );
        }
        let (e, n) = (median(&mut e), median(&mut n));
        println!("reg: etcd {e:.0}/s netsel {n:.0}/s ratio {:.2}", n / e);
    }

    if wanted("prop") {
        let samples = env_num("BENCH_SAMPLES", 300);
        let mut a = Conn::open(nodes[0].registry).await;
        let mut lat = Vec::new();
        for i in 0..samples {
            let name = format!("prop-{i}");
            let answer = a
                .ask(&format!("REGISTER|{name}|127.0.0.1:{}\n", 20000 + i))
                .await;
            assert!(answer.starts_with("REGISTERED"), "{answer}");
            let acked = Instant::now();
            loop {
                if !dns_a(nodes[1].dns, &name).await.is_empty() {
                    break;
                }
                assert!(
                    acked.elapsed() < Duration::from_secs(5),
                    "{name} never reached b"
                );
            }
            lat.push(acked.elapsed());
        }
        lat.sort();
        println!(
            "prop: registration acknowledged on a to b's DNS answer, {samples} samples: p50 {:?} p99 {:?} max {:?}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }

    if wanted("hb") {
        let (mut single, single_addr) = spawn_single();
        let mut c = Vec::new();
        let mut s = Vec::new();
        for _ in 0..2 {
            c.push(heartbeat_rate(nodes[2].registry, secs).await);
            s.push(heartbeat_rate(single_addr, secs).await);
        }
        let (c, s) = (median(&mut c), median(&mut s));
        println!(
            "hb: cluster node {c:.0}/s single node {s:.0}/s ratio {:.2}",
            c / s
        );
        let _ = single.kill();
        let _ = single.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.len().is_multiple_of(2) {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    } else {
        v[v.len() / 2]
    }
}
