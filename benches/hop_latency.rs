//! The cost of one hop: the latency a proxy adds over going direct, at a fixed low rate.
//!
//! Throughput runs (wrk, h2load) load every target to saturation, where latency is mostly
//! queueing. Users feel the hop at ordinary rates, so this sends HTTP/1.1 GETs at a fixed
//! rate (open loop: request *i* is due at `i / RATE` whatever happened before; when the
//! target still holds the connection at that time, its latency counts from when it was
//! due, so a stall is not hidden by the requests it held back — no coordinated omission)
//! over keep-alive connections, to each target in turn,
//! alternating the order every round, and prints the percentiles per target and the
//! difference to the first target (direct).
//!
//! Written by hand rather than with wrk2 (not packaged in Debian) or `h2load --rps`
//! (reports only mean and deviation, no percentiles). Run by `benches/hop_latency.sh`,
//! which starts the peers; alone:
//!
//! ```text
//! TARGETS="direct=127.0.0.1:18080 haproxy=127.0.0.1:18082" RATE=1000 DURATION=10 \
//!   cargo bench --bench hop_latency
//! ```
//!
//! Env: `TARGETS` (`name=host:port[/Host]`, space-separated; the first is the baseline),
//! `RATE` (requests/s, default 1000), `DURATION` (s per target per round, default 10),
//! `ROUNDS` (default 3), `CONNS` (keep-alive connections, default 16), `HOST` (the Host
//! header, default `bench`).
//! Output: `RESULT hop target=NAME rate=R p50_us=… p90_us=… p99_us=… p999_us=… max_us=…
//! added_p50_us=… added_p99_us=… requests=N errors=E` over all rounds.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Target {
    name: String,
    addr: SocketAddr,
    host: String,
}

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn targets() -> Vec<Target> {
    let default_host = std::env::var("HOST").unwrap_or_else(|_| "bench".into());
    let spec = std::env::var("TARGETS").unwrap_or_else(|_| "direct=127.0.0.1:18080".into());
    spec.split_whitespace()
        .map(|t| {
            let (name, rest) = t.split_once('=').expect("TARGETS: name=host:port[/Host]");
            let (addr, host) = rest.split_once('/').unwrap_or((rest, &default_host));
            Target {
                name: name.into(),
                addr: addr.parse().expect("TARGETS: an IP:port"),
                host: host.into(),
            }
        })
        .collect()
}

/// Reads one response (status line, headers, a `Content-Length` or chunked body).
async fn read_response(r: &mut BufReader<TcpStream>, line: &mut String) -> std::io::Result<bool> {
    line.clear();
    if r.read_line(line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let ok = line.starts_with("HTTP/1.1 200");
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        if r.read_line(line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(line).await?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .unwrap_or(0);
            let mut skip = vec![0u8; size + 2];
            r.read_exact(&mut skip).await?;
            if size == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).await?;
    }
    Ok(ok)
}

/// One connection's share of a run: requests due at `start + (first + k * stride) / rate`.
async fn connection(
    t: &Target,
    start: Instant,
    first: u64,
    stride: u64,
    total: u64,
    rate: f64,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity((total / stride + 1) as usize);
    let mut errors = 0;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", t.host);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut line = String::new();
    let mut last_done = start;
    let mut i = first;
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        // Timed from when it was due if the target still held this connection then (no
        // coordinated omission); else from now, as the timer wakes up to 1 ms late and
        // that lateness is the load generator's, not the target's.
        let from = if last_done > due { due } else { Instant::now() };
        if conn.is_none() {
            match TcpStream::connect(t.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conn = Some(BufReader::new(s));
                }
                Err(_) => {
                    errors += 1;
                    i += stride;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let done = async {
            c.get_mut().write_all(request.as_bytes()).await?;
            read_response(c, &mut line).await
        };
        match tokio::time::timeout(Duration::from_secs(5), done).await {
            Ok(Ok(true)) => lat.push(from.elapsed().as_micros().min(u32::MAX as u128) as u32),
            _ => {
                errors += 1;
                conn = None;
            }
        }
        last_done = Instant::now();
        i += stride;
    }
    (lat, errors)
}

/// One run against `t`: `rate` requests/s for `secs` over `conns` connections.
async fn run(t: &Target, rate: f64, secs: f64, conns: u64) -> (Vec<u32>, u64) {
    let total = (rate * secs) as u64;
    // Connections open before the clock starts, so the first requests do not pay for it.
    let start = Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = (0..conns)
        .map(|k| {
            let t = Target {
                name: t.name.clone(),
                addr: t.addr,
                host: t.host.clone(),
            };
            tokio::spawn(async move { connection(&t, start, k, conns, total, rate).await })
        })
        .collect();
    let (mut all, mut errors) = (Vec::with_capacity(total as usize), 0);
    for task in tasks {
        let (lat, e) = task.await.expect("connection task");
        all.extend(lat);
        errors += e;
    }
    (all, errors)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let targets = targets();
    let rate: f64 = env("RATE", 1000.0);
    let secs: f64 = env("DURATION", 10.0);
    let rounds: usize = env("ROUNDS", 3);
    let conns: u64 = env("CONNS", 16);
    let mut samples: Vec<(Vec<u32>, u64)> = targets.iter().map(|_| (Vec::new(), 0)).collect();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &k in &order {
            // A short warm-up (connections, pools, caches), not counted.
            let _ = run(&targets[k], rate, 0.5, conns).await;
            let (lat, errors) = run(&targets[k], rate, secs, conns).await;
            eprintln!(
                "round {} {}: {} requests, {} errors",
                round + 1,
                targets[k].name,
                lat.len(),
                errors
            );
            samples[k].0.extend(lat);
            samples[k].1 += errors;
        }
    }
    let mut base: Option<(u32, u32)> = None;
    for (t, (lat, errors)) in targets.iter().zip(&mut samples) {
        lat.sort_unstable();
        let (p50, p99) = (percentile(lat, 50.0), percentile(lat, 99.0));
        let (b50, b99) = *base.get_or_insert((p50, p99));
        println!(
            "RESULT hop target={} rate={rate} p50_us={p50} p90_us={} p99_us={p99} p999_us={} max_us={} \
             added_p50_us={} added_p99_us={} requests={} errors={errors} conns={conns} rounds={rounds}",
            t.name,
            percentile(lat, 90.0),
            percentile(lat, 99.9),
            lat.last().copied().unwrap_or(0),
            i64::from(p50) - i64::from(b50),
            i64::from(p99) - i64::from(b99),
            lat.len(),
        );
    }
}
