//! A real etcd cluster (Debian's `etcd-server`) and real `netsel serve` nodes on loopback,
//! for the cluster-mode tests and benchmarks.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// The etcd binary, or `None` (with the reason printed) when it is missing outside CI.
/// In CI (`CI` set) a missing etcd is a failure, never a skip.
pub fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("etcd is not installed (Debian: apt-get install etcd-server); CI needs it")
        }
        None => {
            eprintln!(
                "SKIPPED: etcd is not installed (Debian: apt-get install etcd-server); \
                 the cluster tests need a real etcd"
            );
            None
        }
    }
}

/// A free loopback port (bound and released: etcd needs explicit ports).
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A free port on `host` (bound and released).
pub fn free_port_on(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA, and server and client certificates signed by it, made with `openssl` in `dir`:
/// `ca.pem`, `server.pem`/`server-key.pem` (for `host`), `client.pem`/`client-key.pem`.
pub fn make_certs(dir: &Path, host: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian: apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=netsel-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    for who in ["server", "client"] {
        std::fs::write(
            dir.join(format!("{who}.ext")),
            format!(
                "subjectAltName=IP:{host},DNS:localhost\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .unwrap();
        let (key, csr, pem, ext) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj"]);
        let subj = format!("/CN={who}");
        req.push(&subj);
        run(&req);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

/// One etcd member.
pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    pub child: Option<Child>,
    args: Vec<String>,
}

/// A loopback etcd cluster of one or more members, in a temporary directory.
pub struct Etcd {
    /// A loopback address of this cluster's own (127.x.y.z): clusters of tests running at
    /// once never meet, even if a released port is handed out twice.
    pub host: String,
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
    binary: PathBuf,
    /// The directory of the certificates when clients must use TLS.
    pub tls: Option<PathBuf>,
}

impl Etcd {
    /// Starts `n` members and waits until the cluster takes a write.
    pub async fn start(n: usize) -> Option<Etcd> {
        Etcd::start_with(n, None).await
    }

    /// One member that serves clients only over TLS and requires a client certificate
    /// signed by a CA made in `certs` (see [`make_certs`]).
    pub async fn start_tls(certs: &Path) -> Option<Etcd> {
        Etcd::start_with(1, Some(certs.to_path_buf())).await
    }

    async fn start_with(n: usize, tls: Option<PathBuf>) -> Option<Etcd> {
        let binary = etcd_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let token = format!("netsel-test-{:08x}", fastrand::u32(..));
        let host = format!(
            "127.{}.{}.{}",
            fastrand::u8(1..=250),
            fastrand::u8(..),
            fastrand::u8(1..=254)
        );
        if let Some(certs) = &tls {
            make_certs(certs, &host);
        }
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port_on(&host),
                peer: free_port_on(&host),
                child: None,
                args: Vec::new(),
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://{host}:{}", m.name, m.peer))
            .collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        for m in &mut members {
            let data = dir.path().join(&m.name);
            m.args = vec![
                "--name".into(),
                m.name.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("{scheme}://{host}:{}", m.client),
                "--advertise-client-urls".into(),
                format!("{scheme}://{host}:{}", m.client),
                "--listen-peer-urls".into(),
                format!("http://{host}:{}", m.peer),
                "--initial-advertise-peer-urls".into(),
                format!("http://{host}:{}", m.peer),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                "--logger".into(),
                "zap".into(),
                "--log-level".into(),
                "error".into(),
            ];
            if let Some(certs) = &tls {
                let f = |name: &str| certs.join(name).display().to_string();
                m.args.extend([
                    "--cert-file".into(),
                    f("server.pem"),
                    "--key-file".into(),
                    f("server-key.pem"),
                    "--trusted-ca-file".into(),
                    f("ca.pem"),
                    "--client-cert-auth".into(),
                ]);
            }
        }
        let mut etcd = Etcd {
            host,
            members,
            _dir: dir,
            binary,
            tls,
        };
        for i in 0..n {
            etcd.launch(i);
        }
        etcd.wait_writable(Duration::from_secs(30)).await;
        for m in &mut etcd.members {
            let status = m.child.as_mut().map(|c| c.try_wait());
            assert!(
                matches!(status, Some(Ok(None))),
                "etcd member {} is not running: {status:?}",
                m.name
            );
        }
        Some(etcd)
    }

    fn launch(&mut self, i: usize) {
        let m = &mut self.members[i];
        let child = Command::new(&self.binary)
            .args(&m.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    /// `HOST:PORT,…` of every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}:{}", self.host, m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client to every member.
    pub async fn client(&self) -> etcd_client::Client {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{scheme}://{}:{}", self.host, m.client))
            .collect();
        let mut opts = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(2))
            .with_connect_timeout(Duration::from_secs(1));
        if let Some(certs) = &self.tls {
            let read = |n: &str| std::fs::read(certs.join(n)).unwrap();
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
                    .identity(etcd_client::Identity::from_pem(
                        read("client.pem"),
                        read("client-key.pem"),
                    )),
            );
        }
        etcd_client::Client::connect(eps, Some(opts)).await.unwrap()
    }

    /// Waits until a write commits.
    pub async fn wait_writable(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut c = self.client().await;
            if c.put("/netsel-test/probe", "1", None).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd did not take a write within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The member that is leader now.
    pub async fn leader(&self) -> usize {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(1));
            let Ok(mut c) = etcd_client::Client::connect(
                [format!("http://{}:{}", self.host, m.client)],
                Some(opts),
            )
            .await
            else {
                continue;
            };
            if let Ok(s) = c.status().await
                && s.leader() == s.header().map_or(0, |h| h.member_id())
            {
                return i;
            }
        }
        panic!("no etcd member is leader");
    }

    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.members[i].child.as_ref().expect("running").id();
        assert!(super::signal(pid, sig), "kill {sig} {pid}");
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed member again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none());
        let m = &mut self.members[i];
        if let Some(pos) = m.args.iter().position(|a| a == "new") {
            m.args[pos] = "existing".into();
        }
        self.launch(i);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                super::signal(c.id(), "CONT");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A running `netsel serve --store etcd://…` node.
pub struct Node {
    pub child: Child,
    pub registry: SocketAddr,
    pub api: SocketAddr,
    pub dns: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// Settings every node of a test shares (they must agree on the pool and prefix).
#[derive(Clone)]
pub struct ClusterConfig {
    pub endpoints: String,
    pub prefix: String,
    pub vip_cidr: String,
    pub lease_ttl_secs: u64,
    pub max_heartbeat_age: u64,
    pub vip_hold_secs: u64,
    pub dir: PathBuf,
    /// Extra lines for the `[store]` table (TLS files, credentials).
    pub store_extra: String,
}

impl ClusterConfig {
    pub fn new(etcd: &Etcd, dir: &Path) -> ClusterConfig {
        ClusterConfig {
            endpoints: etcd.endpoints(),
            prefix: format!("/t{:08x}", fastrand::u32(..)),
            vip_cidr: format!("127.{}.{}.0/24", fastrand::u8(1..=250), fastrand::u8(..)),
            lease_ttl_secs: 3,
            max_heartbeat_age: 10,
            vip_hold_secs: 600,
            dir: dir.to_path_buf(),
            store_extra: String::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("etcd://{}{}", self.endpoints, self.prefix)
    }
}

impl Node {
    /// Starts a node and waits for `ready`.
    pub fn start(cfg: &ClusterConfig, name: &str) -> Node {
        let config = cfg.dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "max_heartbeat_age = {}\nhealth_check_interval = 1\nmin_ttl_ms = 200\n\
                 [store]\nurl = \"{}\"\nlease_ttl_secs = {}\nnode_id = \"{name}\"\n{}\n\
                 [network]\nvip_cidr = \"{}\"\nvip_hold_secs = {}\n\
",
                cfg.max_heartbeat_age,
                cfg.url(),
                cfg.lease_ttl_secs,
                cfg.store_extra,
                cfg.vip_cidr,
                cfg.vip_hold_secs
            ),
        )
        .unwrap();
        let log = cfg.dir.join(format!("{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netsel"));
        cmd.arg("serve").arg("--config").arg(&config);
        for flag in super::LISTEN_FLAGS {
            cmd.args([flag, "127.0.0.1:0"]);
        }
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("NETSEL_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn netsel");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut registry, mut api, mut dns) = (None, None, None);
        for l in lines.by_ref() {
            let l = l.expect("read stdout");
            if let Some(a) = l.strip_prefix("registry: ") {
                registry = a.parse().ok();
            } else if let Some(a) = l.strip_prefix("api: ") {
                api = a.parse().ok();
            } else if let Some(a) = l.strip_prefix("dns: ") {
                dns = a.parse().ok();
            } else if l == "ready" {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        match (registry, api, dns) {
            (Some(registry), Some(api), Some(dns)) => Node {
                child,
                registry,
                api,
                dns,
                config,
                log,
            },
            _ => {
                let status = child.wait();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("node {name} did not become ready: {status:?}\n{log}");
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        assert!(super::signal(self.child.id(), sig), "kill {sig}");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Keep the node's log for a post-mortem when asked to.
        if let Some(dir) = std::env::var_os("NETSEL_TEST_LOG_DIR") {
            let name = self.log.file_name().unwrap_or_default().to_owned();
            let _ = std::fs::copy(&self.log, std::path::Path::new(&dir).join(name));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            super::signal(self.child.id(), "CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line-protocol exchange on a fresh connection.
pub async fn ask(addr: SocketAddr, line: &str) -> String {
    let mut l = super::Line::connect(addr).await;
    l.ask(line).await
}

/// `GET path` on the API: status and body.
pub async fn get(api: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("API answers within 10 s")
        .unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Bodies may be chunked: keep only JSON-looking text.
    let body = if body.contains("\r\n") && !body.starts_with('{') {
        body.split("\r\n")
            .filter(|l| l.starts_with('{') || l.starts_with('['))
            .collect::<Vec<_>>()
            .join("")
    } else {
        body.to_string()
    };
    (status, body)
}

/// The A records of `NAME.netsel.` from a node's DNS server.
pub async fn dns_a(dns: SocketAddr, name: &str) -> Vec<IpAddr> {
    let mut m = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii(format!("{name}.netsel.")).unwrap(),
        RecordType::A,
    ));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
    else {
        return Vec::new();
    };
    let answer = Message::from_vec(&buf[..n]).unwrap();
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}
