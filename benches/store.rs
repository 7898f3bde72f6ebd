//! Durable store benchmark (plain `main`, no harness):
//!
//! 1. registrations/s from 16 concurrent line-protocol clients, durable vs in-memory;
//! 2. heartbeats/s from 16 concurrent clients, durable vs in-memory;
//! 3. start-up of the real `netsel serve` binary with 100,000 stored instances, after a
//!    clean shutdown and after SIGKILL (crash repair).
//!
//! `cargo bench --bench store` (env: `BENCH_SECS`, default 5; `BENCH_INSTANCES`, default
//! 100000; `BENCH_DIR`, where the stores live, default the system temp dir; `BENCH_ONLY`,
//! a comma-separated subset of `latency,hbns,reg,hb,startup`, default all).

#![allow(clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netsel::catalog::{InstanceId, Secret, ServiceName};
use netsel::protocol::{AppProtocol, RegisterOptions, Request, Response};
use netsel::store::embedded::{EmbeddedOptions, EmbeddedStore};
use netsel::store::{InstanceRecord, Op, ServiceRecord, Store};
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CLIENTS: usize = 16;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

    async fn call(&mut self, req: &[u8]) -> Response {
        self.w.write_all(req).await.unwrap();
        self.line.clear();
        self.r.read_line(&mut self.line).await.unwrap();
        Response::parse(&self.line).unwrap()
    }
}

/// A server on `store` (durable) or in memory.
async fn server(store: Option<Arc<EmbeddedStore>>) -> NetSelServer {
    let mut server = NetSelServer::with_settings(Settings::ephemeral());
    if let Some(store) = store {
        server = server.with_store(store);
    }
    server.start().await.unwrap();
    server
}

/// Opens a fresh durable store in `dir`, or none for the in-memory runs.
fn store_in(dir: Option<&Path>) -> Option<Arc<EmbeddedStore>> {
    dir.map(|d| Arc::new(EmbeddedStore::open_with(d, EmbeddedOptions::default()).unwrap()))
}

/// "log_syncs=.. batches/sync=.. us/sync=.. checkpoints=.." for a durable run.
fn describe(store: &Option<Arc<EmbeddedStore>>) -> String {
    match store {
        None => "memory".into(),
        Some(s) => {
            let st = s.stats();
            s.close();
            format!(
                "log_syncs={} batches/sync={:.1} us/sync={:.0} checkpoints={} us/checkpoint={:.0} renewals_written={}",
                st.commits,
                st.batches as f64 / st.commits.max(1) as f64,
                st.commit_micros as f64 / st.commits.max(1) as f64,
                st.checkpoints,
                st.checkpoint_micros as f64 / st.checkpoints.max(1) as f64,
                st.renewals
            )
        }
    }
}

/// Registrations/s: CLIENTS connections, each registering distinct endpoints back to back.
async fn registrations(data_dir: Option<&Path>, secs: u64) -> (f64, String) {
    let store = store_in(data_dir);
    let srv = server(store.clone()).await;
    let addr = srv.bound().unwrap().registry;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for c in 0..CLIENTS {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut k: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let ip = IpAddr::from([127, 100 + c as u8, (k >> 16) as u8, (k >> 8) as u8]);
                let req = Request::Register {
                    name: format!("svc-{}", k % 64),
                    endpoint: Some(SocketAddr::new(ip, 1000 + (k & 0xff) as u16)),
                    options: RegisterOptions {
                        meta: [("zone".to_string(), "a".to_string())].into(),
                        ..RegisterOptions::default()
                    },
                }
                .encode();
                match conn.call(&req).await {
                    Response::Registered(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    srv.shutdown().await;
    if let Some(d) = data_dir {
        let st = store.as_ref().unwrap();
        st.close();
        assert_eq!(EmbeddedStore::read(d).unwrap().instances.len() as u64, n);
    }
    (rate, describe(&store))
}

/// Heartbeats/s: 1000 instances, CLIENTS connections heartbeating them round-robin.
async fn heartbeats(data_dir: Option<&Path>, secs: u64) -> (f64, String) {
    let store = store_in(data_dir);
    let srv = server(store.clone()).await;
    let addr = srv.bound().unwrap().registry;
    let mut conn = Conn::open(addr).await;
    let mut creds = Vec::new();
    for k in 0..1000u32 {
        let req = Request::Register {
            name: format!("hb-{}", k % 50),
            endpoint: Some(SocketAddr::from(([127, 9, (k >> 8) as u8, k as u8], 80))),
            options: RegisterOptions::default(),
        }
        .encode();
        match conn.call(&req).await {
            Response::Registered(r) => creds.push((r.id, r.secret)),
            other => panic!("{other:?}"),
        }
    }
    let creds = Arc::new(creds);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for c in 0..CLIENTS {
        let (stop, done, creds) = (stop.clone(), done.clone(), creds.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let reqs: Vec<Vec<u8>> = creds
                .iter()
                .skip(c)
                .step_by(CLIENTS)
                .map(|(id, secret)| {
                    Request::Heartbeat {
                        id: id.clone(),
                        secret: secret.clone(),
                    }
                    .encode()
                })
                .collect();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match conn.call(&reqs[i % reqs.len()]).await {
                    Response::HeartbeatOk => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("{other:?}"),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    srv.shutdown().await;
    (rate, describe(&store))
}

/// Fills a store with `n` instances (in services of 100) directly through the Store trait.
async fn fill(dir: &Path, n: u64) -> Duration {
    let t0 = Instant::now();
    let store = EmbeddedStore::open(dir).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut index = 0;
    let mut ops = Vec::new();
    for s in 0..n.div_ceil(100) {
        index += 1;
        let name = ServiceName::new(&format!("svc-{s}")).unwrap();
        ops.push(Op::PutService(ServiceRecord {
            name: name.clone(),
            vip: IpAddr::from([127, 77, ((s + 1) >> 8) as u8, (s + 1) as u8]),
            port: 80,
            created_index: index,
        }));
        for i in 0..100.min(n - s * 100) {
            index += 1;
            ops.push(Op::PutInstance(InstanceRecord {
                id: InstanceId::from(format!("{:016x}", s * 100 + i).as_str()),
                service: name.clone(),
                endpoint: SocketAddr::from(([127, 200 + (s >> 8) as u8, s as u8, i as u8], 8080)),
                tags: vec!["v1".into()],
                meta: BTreeMap::from([("zone".to_string(), "a".to_string())]),
                weight: 1,
                protocol: AppProtocol::Tcp,
                check: None,
                ttl_ms: 60_000,
                deregister_critical_after_ms: None,
                owner_peer: None,
                pool_port: false,
                secret: Secret::generate(),
                registered_index: index,
                deadline_unix_ms: now + 60_000,
                owner: None,
                health: Default::default(),
                request: None,
            }));
        }
        if ops.len() >= 10_000 {
            ops.push(Op::SetIndex(index));
            store.apply(std::mem::take(&mut ops)).wait().await.unwrap();
        }
    }
    ops.push(Op::SetIndex(index));
    store.apply(ops).wait().await.unwrap();
    store.close();
    t0.elapsed()
}

/// Mean time to make one registration durable when nothing else is queued.
async fn commit_latency(dir: &Path, n: u32) -> f64 {
    let store = EmbeddedStore::open(dir).unwrap();
    let name = ServiceName::new("lat").unwrap();
    store
        .apply(vec![Op::PutService(ServiceRecord {
            name: name.clone(),
            vip: IpAddr::from([127, 77, 9, 9]),
            port: 80,
            created_index: 1,
        })])
        .wait()
        .await
        .unwrap();
    let t0 = Instant::now();
    for i in 0..n {
        let rec = InstanceRecord {
            id: InstanceId::from(format!("{i:016x}").as_str()),
            service: name.clone(),
            endpoint: SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 8080)),
            tags: vec![],
            meta: BTreeMap::new(),
            weight: 1,
            protocol: AppProtocol::Tcp,
            check: None,
            ttl_ms: 60_000,
            deregister_critical_after_ms: None,
            owner_peer: None,
            pool_port: false,
            secret: Secret::generate(),
            registered_index: u64::from(i) + 2,
            deadline_unix_ms: 0,
            owner: None,
            health: Default::default(),
            request: None,
        };
        store
            .apply(vec![Op::PutInstance(rec), Op::SetIndex(u64::from(i) + 2)])
            .wait()
            .await
            .unwrap();
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    store.close();
    us
}

/// Starts the real binary on `dir`; returns (time to "ready", the child).
fn time_start(dir: &Path) -> (Duration, std::process::Child) {
    let t0 = Instant::now();
    let mut cmd = common::serve_command(dir);
    cmd.stderr(Stdio::inherit());
    let served = common::spawn_ready(cmd);
    (t0.elapsed(), served.child)
}

fn stop(mut child: std::process::Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Catalog heartbeats (no network) in ns/op, memory vs durable, interleaved in short
/// slices so that background load hits both alike. Returns (memory, durable) medians.
async fn heartbeat_ns(dir: &Path) -> (f64, f64) {
    use netsel::catalog::{Endpoint, Registration};
    let mem = server(None).await;
    let dur = server(store_in(Some(dir))).await;
    let mut creds = [Vec::new(), Vec::new()];
    for (k, srv) in [&mem, &dur].into_iter().enumerate() {
        let cat = srv.catalog().unwrap();
        for i in 0..1000u32 {
            let ep = SocketAddr::from(([127, 8, (i >> 8) as u8, i as u8], 80));
            let r = cat
                .register(Registration::new(
                    format!("hb{}", i % 50),
                    Endpoint::Explicit(ep),
                ))
                .await
                .unwrap();
            creds[k].push((r.id.to_string(), r.secret.expose().to_string()));
        }
    }
    let cats = [mem.catalog().unwrap(), dur.catalog().unwrap()];
    let mut samples = [Vec::new(), Vec::new()];
    const SLICE: usize = 200_000;
    for _ in 0..15 {
        for k in 0..2 {
            let t = Instant::now();
            for j in 0..SLICE {
                let (id, secret) = &creds[k][j % 1000];
                cats[k].heartbeat(id, secret).unwrap();
            }
            samples[k].push(t.elapsed().as_nanos() as f64 / SLICE as f64);
        }
    }
    mem.shutdown().await;
    dur.shutdown().await;
    let [mut m, mut d] = samples;
    (median(&mut m), median(&mut d))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env_num("BENCH_SECS", 5);
    let runs = env_num("RUNS", 3);
    let n = env_num("BENCH_INSTANCES", 100_000);
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let fs_dir = tempfile::tempdir_in(&base).unwrap();
    println!(
        "store dir: {} ({secs} s per run, {runs} runs alternating, {CLIENTS} clients)",
        fs_dir.path().display()
    );
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    if wanted("latency") {
        let lat = commit_latency(&fs_dir.path().join("lat"), 300).await;
        println!("RESULT netsel store_commit_latency_us one_write_per_commit={lat:.0}");
    }
    if wanted("hbns") {
        let (m, d) = heartbeat_ns(&fs_dir.path().join("hbns")).await;
        println!(
            "RESULT netsel catalog_heartbeat_ns_per_op memory={m:.0} durable={d:.0} (interleaved, median of 15 x 200k)"
        );
    }
    let (mut reg_d, mut reg_m, mut hb_d, mut hb_m) = (vec![], vec![], vec![], vec![]);
    for r in 0..runs {
        if wanted("reg") {
            let d = fs_dir.path().join(format!("reg{r}"));
            let (rate, how) = registrations(Some(&d), secs).await;
            println!("  run {r}: registrations/s durable={rate:.0} ({how})");
            reg_d.push(rate);
            let (rate, _) = registrations(None, secs).await;
            println!("  run {r}: registrations/s memory={rate:.0}");
            reg_m.push(rate);
        }
        if wanted("hb") {
            let d = fs_dir.path().join(format!("hb{r}"));
            let (rate, how) = heartbeats(Some(&d), secs).await;
            println!("  run {r}: heartbeats/s durable={rate:.0} ({how})");
            hb_d.push(rate);
            let (rate, _) = heartbeats(None, secs).await;
            println!("  run {r}: heartbeats/s memory={rate:.0}");
            hb_m.push(rate);
        }
    }
    if wanted("reg") {
        let (rd, rm) = (median(&mut reg_d), median(&mut reg_m));
        println!(
            "RESULT netsel registrations_per_s_median durable={rd:.0} memory={rm:.0} clients={CLIENTS}"
        );
    }
    if wanted("hb") {
        let (hd, hm) = (median(&mut hb_d), median(&mut hb_m));
        println!(
            "RESULT netsel heartbeats_per_s_median durable={hd:.0} memory={hm:.0} ratio={:.2} clients={CLIENTS}",
            hd / hm
        );
    }
    if !wanted("startup") {
        return;
    }

    let d = fs_dir.path().join("startup");
    let filled = fill(&d, n).await;
    let size = std::fs::metadata(d.join("netsel.redb")).unwrap().len();
    println!(
        "  filled {n} instances in {filled:?} ({:.1} MiB)",
        size as f64 / 1048576.0
    );
    let (first, child) = time_start(&d);
    stop(child, "TERM");
    let (clean, child) = time_start(&d);
    // Crash it, then time the start that has to repair.
    stop(child, "KILL");
    let (after_kill, child) = time_start(&d);
    stop(child, "TERM");
    println!(
        "RESULT netsel startup_ready_ms instances={n} first={} clean={} after_sigkill={}",
        first.as_millis(),
        clean.as_millis(),
        after_kill.as_millis()
    );
}
