//! The API verbs of the real `netsel` binary against a server on port 0.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use netsel::catalog::Catalog;
use netsel::client::http::{self, HttpRequest};
use netsel::{NetSelServer, Settings};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

async fn server() -> (NetSelServer, SocketAddr, Catalog) {
    let server = NetSelServer::with_settings(Settings::ephemeral());
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    (server, api, catalog)
}

fn netsel(api: SocketAddr) -> Command {
    let mut c = Command::cargo_bin("netsel").unwrap();
    c.env("NETSEL_API_ADDR", api.to_string())
        .env_remove("NETSEL_TOKEN")
        .env_remove("NETSEL_SECRET")
        .env("RUST_LOG", "warn");
    c
}

/// Runs the binary off the async runtime; returns (exit code, stdout, stderr).
async fn run(mut cmd: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn register(api: SocketAddr, name: &str, port: u16) -> (String, String) {
    let body = json!({"name": name, "address": "127.0.0.1", "port": port, "tags": ["t1"]});
    let r = http::send(
        api,
        &HttpRequest::new("POST", "/v1/instances").json(body.to_string()),
        T,
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    (
        v["id"].as_str().unwrap().into(),
        v["secret"].as_str().unwrap().into(),
    )
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &Child, sig: &str) {
    assert!(common::signal(child.id(), sig), "kill -{sig} failed");
}

async fn wait_exit(mut child: Child) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut out = String::new();
                if let Some(mut s) = child.stdout.take() {
                    use std::io::Read;
                    let _ = s.read_to_string(&mut out);
                }
                return (status.code().unwrap_or(-1), out);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn services_and_resolve_print_text_and_json_with_exit_codes() {
    let (server, api, _) = server().await;
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.arg("services");
        c
    })
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("no services"), "{out}");
    // The address may be written as a URL too.
    let (code, out, err) = run({
        let mut c = netsel(api);
        c.env("NETSEL_API_ADDR", format!("http://{api}/"))
            .arg("services");
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no services"), "{out}");
    register(api, "web", 8000).await;
    register(api, "web", 8001).await;

    let (code, out, err) = run({
        let mut c = netsel(api);
        c.arg("services");
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("2/2") && row.contains("passing") && row.contains("t1"),
        "{row}"
    );

    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["services", "--json"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["services"][0]["instance_count"], 2);

    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "WEB", "--json"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "web"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("127.0.0.1:8001") && out.contains("2 of 2"),
        "{out}"
    );

    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args(["resolve", "nope"]);
        c
    })
    .await;
    assert_eq!(code, 3, "unknown service: {err}");
    assert!(err.contains("unknown service nope"), "{err}");
    let (code, _, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "bad_name"]);
        c
    })
    .await;
    assert!(code == 3 || code == 2, "{code}");

    // Nothing listening: exit 1 with a clear message.
    let dead = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args(["services", "--api-addr", &dead]);
        c
    })
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the NetSel API"), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn deregister_needs_the_secret() {
    let (server, api, catalog) = server().await;
    let (id, secret) = register(api, "db", 5432).await;
    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args(["deregister", &id]);
        c
    })
    .await;
    assert_eq!(code, 2, "no secret is a usage error: {err}");
    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args([
            "deregister",
            &id,
            "--secret",
            "00000000000000000000000000000000",
        ]);
        c
    })
    .await;
    assert_eq!(code, 4, "wrong secret: {err}");
    assert!(catalog.snapshot().instance(&id).is_some());
    let (code, out, err) = run({
        let mut c = netsel(api);
        c.args(["deregister", &id]).env("NETSEL_SECRET", &secret);
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deregistered"));
    assert!(catalog.snapshot().instance(&id).is_none());
    let (code, _, _) = run({
        let mut c = netsel(api);
        c.args(["deregister", &id, "--secret", &secret]);
        c
    })
    .await;
    assert_eq!(code, 3, "already gone");
    server.shutdown().await;
}

#[tokio::test]
async fn register_heartbeats_in_the_foreground_and_deregisters_on_ctrl_c() {
    let (server, api, catalog) = server().await;
    let child = netsel(api)
        .args([
            "register",
            "fg",
            "--addr",
            "127.0.0.1:8123",
            "--tag",
            "x",
            "--ttl",
            "1",
            "--meta",
            "k=v",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("fg registered", || {
        catalog.snapshot().service("fg").is_some()
    })
    .await;
    let inst = catalog.snapshot().service("fg").unwrap().instances[0].clone();
    assert_eq!(inst.tags, ["x"]);
    assert_eq!(inst.meta["k"], "v");
    assert_eq!(inst.endpoint.port(), 8123);
    // A 1 s lease survives well past its TTL: it is renewed after the first one would
    // have ended (a deadline 1.5 s past the first means a heartbeat 0.5 s after it).
    let first = inst.lease().deadline_ms();
    eventually("the lease renewed past its first deadline", || {
        catalog
            .snapshot()
            .instance(inst.id.as_str())
            .is_some_and(|i| i.lease().deadline_ms() > first + 1500)
    })
    .await;
    signal(&child, "INT");
    let (code, out) = wait_exit(child).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("registered fg instance") && out.contains("deregistered"),
        "{out}"
    );
    assert!(catalog.snapshot().service("fg").is_none());
    server.shutdown().await;
}

/// A tool the test needs: present, or the test is skipped (failed in CI).
fn have(tool: &str) -> bool {
    common::have_tool(tool, &["--version"], ".ci/run installs it")
}

#[tokio::test]
async fn run_registers_python_http_server_while_it_lives() {
    if !have("python3") {
        return;
    }
    let (server, api, catalog) = server().await;
    let port = free_port();
    let child = netsel(api)
        .args([
            "run",
            "--name",
            "pyweb",
            "--port",
            &port.to_string(),
            "--tag",
            "py",
            "--",
        ])
        .args([
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("pyweb registered", || {
        catalog.snapshot().service("pyweb").is_some()
    })
    .await;
    let svc = catalog.snapshot().service("pyweb").unwrap().clone();
    assert_eq!(svc.instances[0].endpoint.port(), port);
    // It really is the python server behind the registration.
    let r = http::send(svc.instances[0].endpoint, &HttpRequest::new("GET", "/"), T)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Directory listing"), "{}", r.text());

    // SIGTERM goes to python; python dies of it; run passes that on and deregisters.
    signal(&child, "TERM");
    let (code, _) = wait_exit(child).await;
    assert_eq!(code, 128 + 15, "python killed by SIGTERM");
    assert!(
        catalog.snapshot().service("pyweb").is_none(),
        "deregistered"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn run_passes_on_the_exit_code_and_deregisters() {
    let (server, api, catalog) = server().await;
    let port = free_port();
    // A command that listens, gets registered, then exits 7 on its own.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut watch = netsel::client::watch(api, "short").wait(Duration::from_secs(15));
    assert_eq!(watch.next().await.unwrap(), None);
    let child = netsel(api)
        .args(["run", "--name", "short", "--port", &port.to_string(), "--"])
        .args(["sh", "-c", "sleep 1; exit 7"])
        .spawn()
        .unwrap();
    let appeared = tokio::time::timeout(T, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(appeared.is_some(), "registered while alive");
    let (code, _) = wait_exit(child).await;
    assert_eq!(code, 7);
    assert!(catalog.snapshot().service("short").is_none());
    drop(listener);

    // A command that cannot start: 127, nothing registered.
    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args([
            "run",
            "--name",
            "nope",
            "--port",
            "1",
            "--",
            "/nonexistent/cmd",
        ]);
        c
    })
    .await;
    assert_eq!(code, 127, "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn watch_prints_changes_as_json_lines() {
    let (server, api, _) = server().await;
    let mut child = netsel(api)
        .args(["watch", "svc", "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let hello: Value =
        serde_json::from_str(&tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()).unwrap();
    assert_eq!(hello["event"], "hello");
    register(api, "other", 1000).await;
    register(api, "svc", 1001).await;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let line = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["service"], "svc", "filtered to svc: {line}");
        kinds.push(v["kind"].as_str().unwrap().to_string());
    }
    assert!(
        kinds.contains(&"instance_registered".to_string()),
        "{kinds:?}"
    );
    let (code, _) = wait_exit(child).await;
    assert_eq!(code, 0);
    server.shutdown().await;
}

/// In text mode stdout holds only the changes; status lines go to stderr.
#[tokio::test]
async fn watch_text_puts_status_on_stderr_and_changes_on_stdout() {
    let (server, api, _) = server().await;
    let mut child = netsel(api)
        .args(["watch", "svc", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let status = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(status.starts_with("watching from index"), "{status}");
    register(api, "svc", 1002).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("watching"), "{stdout}");
    assert!(stdout.contains("svc"), "{stdout}");
    server.shutdown().await;
}

#[tokio::test]
async fn acl_tokens_from_flag_or_env() {
    use netsel::config::{AclSettings, AclToken};
    let mut settings = Settings::ephemeral();
    settings.acl = AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![
            AclToken {
                name: "ops".into(),
                token: "ops-token-0123456789".into(),
                read: vec!["*".into()],
                write: vec!["*".into()],
            },
            AclToken {
                name: "reader".into(),
                token: "reader-token-0123456789".into(),
                read: vec!["*".into()],
                write: vec![],
            },
        ],
        ..AclSettings::default()
    };
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    let body = json!({"name": "guarded", "address": "127.0.0.1", "port": 4000});
    let req = HttpRequest::new("POST", "/v1/instances")
        .header("Authorization", "Bearer ops-token-0123456789")
        .json(body.to_string());
    let r = http::send(api, &req, T).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = serde_json::from_slice::<Value>(&r.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (code, _, err) = run({
        let mut c = netsel(api);
        c.arg("services");
        c
    })
    .await;
    assert_eq!(code, 4, "no token: {err}");
    assert!(err.contains("token"), "{err}");
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["services", "--token", "reader-token-0123456789"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("guarded"), "{out}");
    let (code, _, _) = run({
        let mut c = netsel(api);
        c.args(["deregister", &id, "--token", "reader-token-0123456789"]);
        c
    })
    .await;
    assert_eq!(code, 4, "a read-only token may not deregister");
    let (code, _, err) = run({
        let mut c = netsel(api);
        c.args(["deregister", &id])
            .env("NETSEL_TOKEN", "ops-token-0123456789");
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(catalog.snapshot().instance(&id).is_none());
    server.shutdown().await;
}

/// `netsel register` at an address already registered under the name would take that
/// instance over: it refuses, naming the instance, unless given `--replace`.
#[tokio::test]
async fn register_refuses_a_takeover_without_replace() {
    let (server, api, catalog) = server().await;
    let mut reg = netsel::catalog::Registration::new(
        "owned",
        netsel::catalog::Endpoint::Explicit("127.0.0.1:8124".parse().unwrap()),
    );
    reg.tags = vec!["blue".into()];
    let first = catalog.register(reg).await.unwrap();
    let mut cmd = netsel(api);
    cmd.args(["register", "owned", "--addr", "127.0.0.1:8124"]);
    let (code, _, err) = run(cmd).await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains(first.id.as_str()) && err.contains("blue") && err.contains("--replace"),
        "{err}"
    );
    // The first holder is untouched.
    assert!(
        catalog
            .heartbeat(first.id.as_str(), first.secret.expose())
            .is_ok()
    );
    // With --replace it takes the instance over: same id, and the old secret stops working.
    let child = netsel(api)
        .args(["register", "owned", "--addr", "127.0.0.1:8124", "--replace"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("taken over", || {
        catalog
            .heartbeat(first.id.as_str(), first.secret.expose())
            .is_err()
    })
    .await;
    assert_eq!(
        catalog.snapshot().service("owned").unwrap().instances.len(),
        1
    );
    signal(&child, "TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    server.shutdown().await;
}

/// Fencing: an owner frozen (SIGSTOP) until its lease ran out and then thawed never acts
/// on the instance that replaced it: its heartbeats fail, it never removes or takes over
/// the replacement, and it registers again as a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_owner_never_displaces_its_replacement() {
    let (server, api, catalog) = server().await;
    let zombie = netsel(api)
        .args([
            "register",
            "fenced",
            "--addr",
            "127.0.0.1:8125",
            "--ttl",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the owner registered", || {
        catalog.snapshot().service("fenced").is_some()
    })
    .await;
    let old = catalog.snapshot().service("fenced").unwrap().instances[0]
        .id
        .clone();
    signal(&zombie, "STOP");
    eventually("its lease ran out", || {
        catalog.snapshot().instance(old.as_str()).is_none()
    })
    .await;
    // A replacement registers the same address and keeps it alive.
    let mut replacement = netsel::ServiceClient::builder("fenced")
        .registry(server.bound().unwrap().registry)
        .endpoint("127.0.0.1:8125".parse().unwrap())
        .ttl(Duration::from_secs(1))
        .heartbeat_interval(Duration::from_millis(250))
        .build();
    replacement.register().await.unwrap();
    let new = replacement.instance_id().unwrap();
    assert_ne!(new, old.as_str());
    let beats = replacement.start_heartbeats();
    signal(&zombie, "CONT");
    // The thawed owner registers again, beside the replacement, not over it.
    eventually("the zombie registered as a new instance", || {
        catalog
            .snapshot()
            .service("fenced")
            .is_some_and(|s| s.instances.len() == 2)
    })
    .await;
    let snap = catalog.snapshot();
    let ids: Vec<String> = snap
        .service("fenced")
        .unwrap()
        .instances
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert!(
        ids.contains(&new) && !ids.contains(&old.to_string()),
        "{ids:?}"
    );
    // For a few heartbeat rounds, the replacement stays, with its own id.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            catalog.snapshot().instance(&new).is_some(),
            "the replacement was displaced"
        );
        assert_eq!(replacement.instance_id().as_deref(), Some(new.as_str()));
    }
    signal(&zombie, "TERM");
    let out = tokio::task::spawn_blocking(move || zombie.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(catalog.snapshot().instance(&new).is_some());
    beats.shutdown().await.unwrap();
    server.shutdown().await;
}

/// A registry API that answers every request `500` and counts them.
async fn failing_api() -> (SocketAddr, tokio::sync::watch::Receiver<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                // Read the head and the body its content-length announces.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                tx.send_modify(|n| *n += 1);
                let body = r#"{"error":"the store is on fire"}"#;
                let answer = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn run_says_once_what_it_waits_for_and_once_why_it_retries() {
    if !have("python3") {
        return;
    }
    let (api, mut requests) = failing_api().await;
    let port = free_port();
    // The command takes a while to listen: `netsel run` waits for it, and says so once.
    let script = format!("sleep 0.5; exec python3 -m http.server {port} --bind 127.0.0.1");
    let mut cmd = netsel(api);
    cmd.args(["run", "--name", "slow", "--port", &port.to_string(), "--"])
        .args(["sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Three failed registrations (one a second), then stop it.
    tokio::time::timeout(Duration::from_secs(20), requests.wait_for(|n| *n >= 3))
        .await
        .expect("netsel run keeps trying")
        .unwrap();
    signal(&child, "TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let count = |needle: &str| err.matches(needle).count();
    assert_eq!(count("waiting for 'sh' to accept connections"), 1, "{err}");
    assert_eq!(count("retrying until it works"), 1, "{err}");
    assert!(err.contains("the store is on fire (HTTP 500)"), "{err}");
    assert!(!err.contains("Api {"), "no Rust Debug text: {err}");
}

/// An HTTP backend whose `/healthz` answers the status in `status` (changeable).
async fn switchable_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU16>) {
    use std::sync::atomic::{AtomicU16, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let status = std::sync::Arc::new(AtomicU16::new(503));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = status.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let code = s.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    (addr, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_say_why_everywhere_and_gate_traffic_until_the_first_pass() {
    let mut settings = Settings::ephemeral();
    settings.health.interval_ms = 100;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    let (backend, status) = switchable_backend().await;

    // `netsel register --check http:/healthz --ttl 30s` keeps the instance registered.
    let register = netsel(api)
        .args(["register", "checked", "--addr", &backend.to_string()])
        .args(["--check", "http:/healthz", "--ttl", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("registered", || {
        catalog.snapshot().service("checked").is_some()
    })
    .await;
    let inst = catalog.snapshot().service("checked").unwrap().instances[0].clone();
    assert_eq!(inst.ttl, Duration::from_secs(30));
    // Registered with a check: no traffic until a check passes.
    assert_eq!(inst.health.as_str(), "critical");

    // The check fails with HTTP 503: the API says so, and so do the CLI's listings.
    let detail = || catalog.check_result(inst.id.as_str());
    eventually("a failed check", || {
        detail().is_some_and(|r| r.output == "HTTP 503 from /healthz")
    })
    .await;
    let r = http::send(api, &HttpRequest::new("GET", "/v1/services/checked"), T)
        .await
        .unwrap();
    let body: Value = serde_json::from_str(&r.text()).unwrap();
    let check = &body["instances"][0]["check_result"];
    assert_eq!(check["status"], "critical", "{body}");
    assert_eq!(check["output"], "HTTP 503 from /healthz");
    assert!(check["consecutive"].as_u64().unwrap() >= 1);
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.arg("services");
        c
    })
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("critical: HTTP 503 from /healthz"), "{out}");
    let (_, out, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "checked"]);
        c
    })
    .await;
    assert!(out.contains("HTTP 503 from /healthz"), "{out}");

    // A watcher sees it turn passing, with the new state and what the check saw.
    let mut watch = netsel(api)
        .args(["watch", "checked", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = BufReader::new(watch.stderr.take().unwrap());
    let mut hello = String::new();
    ready.read_line(&mut hello).unwrap();
    assert!(hello.starts_with("watching from index"), "{hello}");
    status.store(200, std::sync::atomic::Ordering::Relaxed);
    let out = tokio::task::spawn_blocking(move || watch.wait_with_output().unwrap())
        .await
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("health_changed"), "{line}");
    assert!(line.contains("passing (HTTP 200 from /healthz)"), "{line}");

    signal(&register, "TERM");
    let _ = wait_exit(register).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stays_critical_is_deregistered_after_its_limit() {
    let mut settings = Settings::ephemeral();
    settings.health.interval_ms = 50;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let registry = server.bound().unwrap().registry;
    let catalog = server.catalog().unwrap();
    let closed = free_port();
    let mut conn = std::net::TcpStream::connect(registry).unwrap();
    std::io::Write::write_all(
        &mut conn,
        format!("REGISTER|doomed|127.0.0.1:{closed}|check=tcp|deregister_critical_after=300ms\n")
            .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer).unwrap();
    assert!(answer.starts_with("REGISTERED|"), "{answer}");
    let id = answer.split('|').nth(1).unwrap().to_string();
    eventually("the check fails", || {
        catalog
            .check_result(&id)
            .is_some_and(|r| r.output.contains("connection refused"))
    })
    .await;
    eventually("deregistered after 300 ms critical", || {
        catalog.snapshot().instance(&id).is_none()
    })
    .await;
    server.shutdown().await;
}

async fn register_tagged(api: SocketAddr, name: &str, port: u16, tags: &[&str]) {
    let body = json!({"name": name, "address": "127.0.0.1", "port": port, "tags": tags});
    let r = http::send(
        api,
        &HttpRequest::new("POST", "/v1/instances").json(body.to_string()),
        T,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

async fn get_json(api: SocketAddr, path: &str) -> (u16, Value) {
    let r = http::send(api, &HttpRequest::new("GET", path), T)
        .await
        .unwrap();
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

fn ports(v: &Value) -> Vec<String> {
    let mut p: Vec<String> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["endpoint"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    p.sort();
    p
}

/// `?tag=` on `GET /v1/services[/{name}]`, and `--tag` on `netsel resolve` and
/// `netsel services`: exact tags, every one required, as `/v1/sd/prometheus` filters.
#[tokio::test]
async fn tag_filters_in_the_api_and_the_cli() {
    let (server, api, _) = server().await;
    register_tagged(api, "web", 8001, &["v1"]).await;
    register_tagged(api, "web", 8002, &["v1", "canary"]).await;
    register_tagged(api, "web", 8003, &["v2"]).await;
    register_tagged(api, "db", 5432, &["v2"]).await;

    let (code, v) = get_json(api, "/v1/services/web?tag=v1").await;
    assert_eq!(code, 200);
    assert_eq!(ports(&v), ["8001", "8002"]);
    assert_eq!(
        (v["instance_count"].as_u64(), v["healthy_count"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(v["tags"], json!(["canary", "v1"]));
    let (_, v) = get_json(api, "/v1/services/web?tag=v1,canary").await;
    assert_eq!(ports(&v), ["8002"]);
    let (_, v) = get_json(api, "/v1/services/web?tag=").await;
    assert_eq!(
        ports(&v),
        ["8001", "8002", "8003"],
        "an empty filter is no filter"
    );
    // Exact, like /v1/sd/prometheus: V1 is another tag. The service exists: 200, empty.
    let (code, v) = get_json(api, "/v1/services/web?tag=V1").await;
    assert_eq!(code, 200);
    assert_eq!(ports(&v), Vec::<String>::new());
    assert_eq!(v["healthy_count"], 0);
    let (code, _) = get_json(api, "/v1/services/nope?tag=v1").await;
    assert_eq!(code, 404);
    // The list keeps the services with an instance carrying the tags.
    let (_, v) = get_json(api, "/v1/services?tag=v2&detail=true").await;
    let names: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);
    assert_eq!(ports(&v["services"][1]), ["8003"]);
    let (_, v) = get_json(api, "/v1/services?tag=canary").await;
    assert_eq!(v["services"].as_array().unwrap().len(), 1);
    assert_eq!(v["services"][0]["instance_count"], 1);

    // netsel resolve web --tag v1
    let (code, out, err) = run({
        let mut c = netsel(api);
        c.args(["resolve", "web", "--tag", "v1"]);
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("127.0.0.1:8001") && out.contains("127.0.0.1:8002"),
        "{out}"
    );
    assert!(
        !out.contains("127.0.0.1:8003") && out.contains("2 of 2 instances tagged v1 healthy"),
        "{out}"
    );
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "web", "--tag", "v1", "--tag", "canary", "--json"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    assert_eq!(ports(&serde_json::from_str(&out).unwrap()), ["8002"]);
    // A tag no instance carries: no healthy instance, exit 7.
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["resolve", "web", "--tag", "v9"]);
        c
    })
    .await;
    assert_eq!(code, 7, "{out}");

    // netsel services --tag canary
    let (code, out, err) = run({
        let mut c = netsel(api);
        c.args(["services", "--tag", "canary"]);
        c
    })
    .await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("1/1"), "{row}");
    assert!(!out.lines().any(|l| l.starts_with("db ")), "{out}");
    let (code, out, _) = run({
        let mut c = netsel(api);
        c.args(["services", "--tag", "v9"]);
        c
    })
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("no service has instances tagged v9"), "{out}");
    server.shutdown().await;
}
