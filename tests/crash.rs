//! Crash safety: the real `netsel` binary is SIGKILLed at random moments while several
//! clients register and deregister; after every crash, every acknowledged registration is
//! on disk unchanged (and every acknowledged deregistration is gone), and after the restart
//! the registry answers for them with their old secrets.
//!
//! `NETSEL_CRASH_ROUNDS=N` runs N rounds instead of 20 (the long mode).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netsel::protocol::{RegisterOptions, Request, Response};
use netsel::store::embedded::EmbeddedStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const CLIENTS: usize = 6;
const SERVICES: usize = 5;

/// One acknowledged registration, as the registry answered it.
#[derive(Debug, Clone, PartialEq)]
struct Ack {
    id: String,
    secret: String,
    service: String,
    vip: IpAddr,
    service_port: u16,
    endpoint: SocketAddr,
    meta: BTreeMap<String, String>,
}

impl Ack {
    fn line(&self) -> String {
        let meta: Vec<String> = self.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{} {} {} {} {} {} {}",
            self.id,
            self.secret,
            self.service,
            self.vip,
            self.service_port,
            self.endpoint,
            meta.join(",")
        )
    }

    fn parse(line: &str) -> Ack {
        let f: Vec<&str> = line.split(' ').collect();
        Ack {
            id: f[0].into(),
            secret: f[1].into(),
            service: f[2].into(),
            vip: f[3].parse().unwrap(),
            service_port: f[4].parse().unwrap(),
            endpoint: f[5].parse().unwrap(),
            meta: f[6]
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect(),
        }
    }
}

#[derive(Default)]
struct Log {
    /// Acknowledged registrations, by id.
    live: HashMap<String, Ack>,
    /// Acknowledged deregistrations.
    gone: Vec<String>,
}

struct Server {
    child: Child,
    registry: SocketAddr,
}

fn spawn_server(dir: &Path) -> Server {
    let served = common::spawn_ready({
        let mut cmd = common::serve_command(dir);
        cmd.env("RUST_LOG", "error").stderr(Stdio::inherit());
        cmd
    });
    let registry = served.addr("registry");
    Server {
        child: served.child,
        registry,
    }
}

fn kill9(mut s: Server) {
    // Child::kill sends SIGKILL on Unix.
    s.child.kill().expect("SIGKILL");
    s.child.wait().expect("reap");
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let (r, w) = TcpStream::connect(addr).await?.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    async fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        self.w.write_all(&req.encode()).await?;
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("timeout"))??;
        if n == 0 || !line.ends_with('\n') {
            return Err(std::io::Error::other("connection closed"));
        }
        Response::parse(&line).map_err(std::io::Error::other)
    }
}

/// Registers (and now and then deregisters) until the connection dies or `stop` is set.
async fn client(
    addr: SocketAddr,
    n: usize,
    ports: Arc<AtomicU16>,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut conn) = Conn::open(addr).await else {
        return;
    };
    let mut mine: Vec<Ack> = Vec::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        if k.is_multiple_of(4) && !mine.is_empty() {
            let victim = mine.swap_remove(fastrand::usize(..mine.len()));
            let req = Request::Deregister {
                id: victim.id.clone(),
                secret: victim.secret.clone(),
            };
            match conn.call(&req).await {
                Ok(Response::Ok) => {
                    let mut log = log.lock().unwrap();
                    log.live.remove(&victim.id);
                    log.gone.push(victim.id);
                }
                Ok(other) => panic!("deregister refused: {other:?}"),
                Err(_) => {
                    // No answer: the deregistration may or may not have been committed, so
                    // the instance is no longer promised either way.
                    log.lock().unwrap().live.remove(&victim.id);
                    return;
                }
            }
            continue;
        }
        let service = format!("svc-{}", (n + k as usize) % SERVICES);
        let endpoint = SocketAddr::from(([127, 0, 0, 1], ports.fetch_add(1, Ordering::Relaxed)));
        let meta: BTreeMap<String, String> = [
            ("client".to_string(), n.to_string()),
            ("seq".to_string(), k.to_string()),
        ]
        .into();
        let req = Request::Register {
            name: service.clone(),
            endpoint: Some(endpoint),
            options: RegisterOptions {
                meta: meta.clone(),
                ttl: Some(Duration::from_secs(3600)),
                ..RegisterOptions::default()
            },
        };
        match conn.call(&req).await {
            Ok(Response::Registered(r)) => {
                let ack = Ack {
                    id: r.id,
                    secret: r.secret,
                    service,
                    vip: r.vip,
                    service_port: r.service_port,
                    endpoint: r.endpoint,
                    meta,
                };
                log.lock().unwrap().live.insert(ack.id.clone(), ack.clone());
                mine.push(ack);
            }
            Ok(other) => panic!("registration refused: {other:?}"),
            Err(_) => return,
        }
    }
}

fn write_acks(path: &Path, log: &Log) {
    let mut f = std::fs::File::create(path).unwrap();
    for a in log.live.values() {
        writeln!(f, "live {}", a.line()).unwrap();
    }
    for id in &log.gone {
        writeln!(f, "gone {id}").unwrap();
    }
    f.sync_all().unwrap();
}

fn read_acks(path: &Path) -> (Vec<Ack>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut live = Vec::new();
    let mut gone = Vec::new();
    for l in text.lines() {
        match l.split_once(' ') {
            Some(("live", rest)) => live.push(Ack::parse(rest)),
            Some(("gone", id)) => gone.push(id.to_string()),
            _ => panic!("bad ack line {l:?}"),
        }
    }
    (live, gone)
}

/// Opens the store the dead process left and checks every acknowledged write.
fn check_store(dir: &Path, acks: &Path, round: usize) {
    let (live, gone) = read_acks(acks);
    let p = EmbeddedStore::read(dir).expect("the store opens after a crash");
    let instances: HashMap<&str, _> = p.instances.iter().map(|i| (i.id.as_str(), i)).collect();
    let services: HashMap<&str, _> = p.services.iter().map(|s| (s.name.as_str(), s)).collect();
    for a in &live {
        let i = instances.get(a.id.as_str()).unwrap_or_else(|| {
            panic!(
                "round {round}: acknowledged {a:?} lost; service stored: {:?}; instances of it: {}",
                services.get(a.service.as_str()),
                p.instances
                    .iter()
                    .filter(|i| i.service.as_str() == a.service)
                    .count()
            )
        });
        assert_eq!(i.service.as_str(), a.service, "round {round}");
        assert_eq!(i.endpoint, a.endpoint, "round {round}");
        assert_eq!(i.meta, a.meta, "round {round}");
        assert_eq!(i.secret.expose(), a.secret, "round {round}: secret");
        let s = services[a.service.as_str()];
        assert_eq!(s.vip, a.vip, "round {round}: VIP of {}", a.service);
        assert_eq!(s.port, a.service_port, "round {round}");
    }
    for id in &gone {
        assert!(
            !instances.contains_key(id.as_str()),
            "round {round}: deregistered {id} came back"
        );
    }
}

/// After a restart, the registry itself answers for a sample of acknowledged writes.
async fn check_registry(addr: SocketAddr, acks: &Path, round: usize) {
    let (mut live, gone) = read_acks(acks);
    fastrand::shuffle(&mut live);
    let mut conn = Conn::open(addr).await.unwrap();
    for a in live.iter().take(20) {
        let hb = Request::Heartbeat {
            id: a.id.clone(),
            secret: a.secret.clone(),
        };
        assert_eq!(
            conn.call(&hb).await.unwrap(),
            Response::HeartbeatOk,
            "round {round}: old secret of {}",
            a.id
        );
        let req = Request::Resolve {
            name: a.service.clone(),
        };
        match conn.call(&req).await.unwrap() {
            Response::Resolved {
                vip,
                service_port,
                instances,
                ..
            } => {
                assert_eq!(
                    (vip, service_port),
                    (a.vip, a.service_port),
                    "round {round}"
                );
                assert!(
                    instances
                        .iter()
                        .any(|i| i.id == a.id && i.endpoint == a.endpoint),
                    "round {round}: RESOLVE lacks {}",
                    a.id
                );
            }
            other => panic!("round {round}: RESOLVE {}: {other:?}", a.service),
        }
    }
    for id in gone.iter().rev().take(5) {
        let hb = Request::Heartbeat {
            id: id.clone(),
            secret: "0".repeat(32),
        };
        assert!(
            matches!(conn.call(&hb).await.unwrap(), Response::Failed(r) if r.starts_with("unknown instance")),
            "round {round}: deregistered {id} is back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let rounds: usize = std::env::var("NETSEL_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let acks = work.path().join("acknowledged.txt");
    let log = Arc::new(Mutex::new(Log::default()));
    let ports = Arc::new(AtomicU16::new(10_000));
    let started = std::time::Instant::now();
    let mut total_acks = 0usize;
    for round in 0..rounds {
        let server = spawn_server(data.path());
        if round > 0 {
            check_registry(server.registry, &acks, round).await;
        }
        if ports.load(Ordering::Relaxed) > 60_000 {
            ports.store(10_000, Ordering::Relaxed);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                tokio::spawn(client(
                    server.registry,
                    n,
                    ports.clone(),
                    log.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // A random moment: mid-commit, mid-batch, between requests.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..250))).await;
        // The list of what was acknowledged so far goes to disk first...
        write_acks(&acks, &log.lock().unwrap());
        // ...then the crash.
        kill9(server);
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        // Answers that raced with the kill were acknowledged too (the process sent them
        // before it died): they are held to the same promise.
        let log = log.lock().unwrap();
        write_acks(&acks, &log);
        total_acks = log.live.len() + log.gone.len();
        drop(log);
        check_store(data.path(), &acks, round);
    }
    // A final restart answers for everything.
    let server = spawn_server(data.path());
    check_registry(server.registry, &acks, rounds).await;
    kill9(server);
    assert!(
        total_acks > rounds * 10,
        "the clients made progress ({total_acks} acknowledged writes)"
    );
    eprintln!(
        "{rounds} SIGKILL rounds, {total_acks} acknowledged writes checked, {:?}",
        started.elapsed()
    );
}
