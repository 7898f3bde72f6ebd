//! Heartbeats per second through the line protocol: one persistent connection, and 64
//! connections at once, against an in-process server on loopback.
//!
//! `cargo bench --bench heartbeat` — criterion prints throughput as elements/s, one
//! element being one heartbeat answered `HEARTBEAT_OK`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Conn {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    answer: String,
}

impl Conn {
    async fn open(addr: SocketAddr, name: &str, port: u16) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = Conn {
            stream: BufReader::new(stream),
            line: Vec::new(),
            answer: String::new(),
        };
        let reg = format!("REGISTER|{name}|127.0.0.1:{port}|ttl=1h\n");
        c.stream.get_mut().write_all(reg.as_bytes()).await.unwrap();
        c.stream.read_line(&mut c.answer).await.unwrap();
        let f: Vec<&str> = c.answer.trim_end().split('|').collect();
        assert_eq!(f[0], "REGISTERED", "{}", c.answer);
        c.line = format!("HEARTBEAT|{}|{}\n", f[1], f[2]).into_bytes();
        c
    }

    async fn heartbeat(&mut self) {
        self.stream.get_mut().write_all(&self.line).await.unwrap();
        self.answer.clear();
        self.stream.read_line(&mut self.answer).await.unwrap();
        debug_assert_eq!(self.answer, "HEARTBEAT_OK\n");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, addr) = rt.block_on(async {
        let server = NetSelServer::with_settings(Settings::ephemeral());
        server.start().await.unwrap();
        let addr = server.bound().unwrap().registry;
        (server, addr)
    });

    let mut group = c.benchmark_group("heartbeat");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));

    let one = std::sync::Arc::new(tokio::sync::Mutex::new(rt.block_on(Conn::open(
        addr,
        "bench-one",
        30000,
    ))));
    group.bench_function("one_connection", |b| {
        b.iter_custom(|iters| {
            let one = one.clone();
            rt.block_on(async move {
                let mut conn = one.lock().await;
                let start = Instant::now();
                for _ in 0..iters {
                    conn.heartbeat().await;
                }
                start.elapsed()
            })
        })
    });

    let conns: Vec<Conn> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..64u16 {
            v.push(Conn::open(addr, &format!("bench-{i}"), 31000 + i).await);
        }
        v
    });
    let conns = std::sync::Arc::new(tokio::sync::Mutex::new(conns));
    group.bench_function("64_connections", |b| {
        b.iter_custom(|iters| {
            let conns = conns.clone();
            rt.block_on(async move {
                let mut guard = conns.lock().await;
                let per = iters.div_ceil(64);
                let start = Instant::now();
                let mut tasks = Vec::new();
                for mut c in guard.drain(..) {
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..per {
                            c.heartbeat().await;
                        }
                        c
                    }));
                }
                for t in tasks {
                    guard.push(t.await.unwrap());
                }
                // Scale to the number of iterations criterion asked for.
                start.elapsed().mul_f64(iters as f64 / (per * 64) as f64)
            })
        })
    });
    group.finish();
    rt.block_on(server.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
