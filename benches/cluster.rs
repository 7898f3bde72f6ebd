//! Cluster benchmark (plain `main`, no harness), against a real 3-member etcd on loopback:
//!
//! 1. `reg`: registrations/s through 3 `netsel serve` nodes, against etcd's own
//!    create-if-absent transaction rate (a compare on the key, a put with a lease) with
//!    the same concurrency, alternating, in the same minutes;
//! 2. `prop`: propagation, a registration acknowledged by node A to node B's DNS answer,
//!    p50/p99 over `BENCH_SAMPLES` registrations;
//! 3. `hb`: heartbeats/s on a cluster node against a single in-memory node (same binary,
//!    same clients);
//! 4. `size`: `BENCH_INSTANCES` instances (default 100,000) in 1,000 services registered
//!    through the nodes: etcd's keys and database size, each node's resident memory, and
//!    how long a new node takes to list them and serve.
//!
//! `cargo bench --features etcd --bench cluster` (env: `BENCH_SECS` per run, default 5;
//! `BENCH_CLIENTS`, default 64; `BENCH_SAMPLES`, default 300; `BENCH_ONLY`, a
//! comma-separated subset of `reg,prop,hb,size`).

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

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
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
    cfg.vip_cidr = format!("127.{}.0.0/16", fastrand::u8(100..=250));
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
        let pids = |etcd: &Etcd| -> Vec<u32> {
            etcd.members
                .iter()
                .filter_map(|m| m.child.as_ref().map(|c| c.id()))
                .collect()
        };
        let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
        let etcd_pids = pids(&etcd);
        let node_pids: Vec<u32> = nodes.iter().map(|n| n.child.id()).collect();
        for round in 0..2 {
            let e0 = cpu(&etcd_pids);
            e.push(etcd_rate(&etcd, clients, secs, round).await);
            let (e1, n1) = (cpu(&etcd_pids), cpu(&node_pids));
            n.push(netsel_rate(&registries, clients, secs, round).await);
            let (e2, n2) = (cpu(&etcd_pids), cpu(&node_pids));
            println!(
                "round {round}: CPU s: etcd run: etcd {:.1}; netsel run: etcd {:.1} + nodes {:.1}",
                e1 - e0,
                e2 - e1,
                n2 - n1
            );
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

    if wanted("size") {
        let total = env_num("BENCH_INSTANCES", 100_000);
        sizing(&etcd, &cfg, &nodes, total).await;
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

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Registers `total` instances in 1,000 services through `nodes`, then reports etcd's
/// size, each node's memory, and a new node's start-up.
async fn sizing(etcd: &Etcd, cfg: &ClusterConfig, nodes: &[Node], total: u64) {
    let before: Vec<u64> = nodes.iter().map(|n| rss_kib(n.child.id())).collect();
    let registries: Vec<SocketAddr> = nodes.iter().map(|n| n.registry).collect();
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64usize {
        let (next, addr) = (next.clone(), registries[c % registries.len()]);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let ip = format!("127.{}.{}.{}", 10 + i / 60000, (i / 250) % 240, i % 250 + 1);
                let line = format!(
                    "REGISTER|size-{}|{ip}:{}|ttl=600s\n",
                    i % 1000,
                    1000 + i % 50000
                );
                let a = conn.ask(&line).await;
                assert!(a.starts_with("REGISTERED"), "{a}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = t0.elapsed();
    println!(
        "size: {total} instances in 1000 services registered in {took:.1?} ({:.0}/s)",
        total as f64 / took.as_secs_f64()
    );
    let mut c = etcd.client().await;
    let status = c.status().await.unwrap();
    let keys = c
        .get(
            cfg.prefix.clone(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    let mut values = 0usize;
    let mut from = format!("{}/", cfg.prefix).into_bytes();
    let end = format!("{}0", cfg.prefix).into_bytes();
    loop {
        let page = c
            .get(
                from.clone(),
                Some(
                    etcd_client::GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(2000),
                ),
            )
            .await
            .unwrap();
        values += page
            .kvs()
            .iter()
            .map(|kv| kv.key().len() + kv.value().len())
            .sum::<usize>();
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    println!(
        "size: etcd keys under the prefix {keys}, key+value bytes {values} ({:.0} per instance), db size {} bytes (in use {})",
        values as f64 / total as f64,
        status.db_size(),
        status.raft_used_db_size()
    );
    for (n, b) in nodes.iter().zip(before) {
        let after = rss_kib(n.child.id());
        println!(
            "size: node rss {b} KiB -> {after} KiB: {:.0} bytes per instance",
            (after.saturating_sub(b) * 1024) as f64 / total as f64
        );
    }
    let t0 = Instant::now();
    let joiner = Node::start(cfg, "joiner");
    println!(
        "size: a new node listed {total} instances and was ready in {:.2?}, rss {} KiB",
        t0.elapsed(),
        rss_kib(joiner.child.id())
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.len().is_multiple_of(2) {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    } else {
        v[v.len() / 2]
    }
}
