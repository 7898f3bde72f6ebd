//! The real `netsel` binary and the seed's examples, driven as a user would.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use netsel::client::{ClientError, ServiceClient};

/// Every listen flag on an ephemeral loopback port, with a VIP pool of the test's own.
fn serve_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["serve"].iter().map(|s| s.to_string()).collect();
    for flag in common::LISTEN_FLAGS {
        args.push(flag.into());
        args.push("127.0.0.1:0".into());
    }
    // State in memory: parallel tests must not share (or lock) a data dir.
    args.push("--in-memory".into());
    args.push("--vip-cidr".into());
    args.push(format!(
        "127.{}.{}.0/24",
        fastrand::u8(1..=250),
        fastrand::u8(..)
    ));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

struct Proc {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(program: impl Into<PathBuf>, args: &[String]) -> Proc {
        let mut child = Command::new(program.into())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let lines = BufReader::new(child.stdout.take().unwrap());
        Proc { child, lines }
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest of it.
    fn wait_for(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.lines.read_line(&mut line).expect("read stdout");
            assert!(n > 0, "process ended before printing {prefix:?}");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_string();
            }
        }
    }

    fn signal(&self, sig: &str) {
        assert!(common::signal(self.child.id(), sig), "kill -{sig}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example(name: &str) -> PathBuf {
    // target/debug/deps/<test> -> target/debug/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_registers_expires_and_stops_on_sigterm() {
    let mut serve = Proc::spawn(
        env!("CARGO_BIN_EXE_netsel"),
        &serve_args(&["--max-heartbeat-age", "1", "--health-check-interval", "1"]),
    );
    let registry: SocketAddr = serve.wait_for("registry:").parse().unwrap();
    serve.wait_for("ready");

    let mut client = ServiceClient::new(registry, "cli-service".to_string());
    let (vip, port) = client.register().await.unwrap();
    assert!(vip.to_string().starts_with("127."));
    let r = client.resolve("cli-service").await.unwrap();
    assert_eq!(r.instances[0].endpoint.port(), port);

    // No heartbeats: gone after max_heartbeat_age.
    let start = Instant::now();
    loop {
        match client.resolve("cli-service").await {
            Err(ClientError::UnknownService(_)) => break,
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(3), "never expired"),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    serve.signal("TERM");
    let status = serve.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
}

/// `netsel serve` with `args` at log level info, its stderr in `log`, once it printed
/// `ready` (`common::spawn_ready`, which keeps draining its stdout).
fn serve_logged(args: &[String], log: &tempfile::NamedTempFile) -> common::Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netsel"));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stderr(log.reopen().unwrap());
    common::spawn_ready(cmd)
}

#[test]
fn acls_off_beyond_loopback_are_warned_about_at_start_up() {
    const WARNING: &str = "ACLs are off and these listen beyond loopback";
    // The registry on every address (as the seed's default), ACLs off: warned, naming it.
    let mut args = serve_args(&[]);
    let at = args.iter().position(|a| a == "--registry-addr").unwrap();
    args[at + 1] = "0.0.0.0:0".into();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = serve_logged(&args, &log).child;
    assert!(common::signal(child.id(), "-TERM"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(log.path()).unwrap();
    let warned: Vec<&str> = text.lines().filter(|l| l.contains(WARNING)).collect();
    assert_eq!(warned.len(), 1, "{text}");
    assert!(warned[0].contains("registry on 0.0.0.0:"), "{}", warned[0]);
    assert!(!warned[0].contains("api on"), "{}", warned[0]);
    // Everything on loopback: nothing to warn about.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = serve_logged(&serve_args(&[]), &log).child;
    assert!(common::signal(child.id(), "-TERM"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(!text.contains(WARNING), "{text}");
}

/// SIGHUP does not kill the server: it says it ignores the signal and goes on serving; the
/// last log line after SIGTERM says it stopped.
#[test]
fn sighup_is_logged_and_ignored_and_the_last_line_says_stopped() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let served = serve_logged(&serve_args(&[]), &log);
    let registry = served.addr("registry");
    let mut child = served.child;
    let pid = child.id();
    let kill = |sig: &str| assert!(common::signal(pid, sig), "kill {sig}");
    kill("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(log.path())
        .unwrap()
        .contains("SIGHUP ignored")
    {
        assert!(Instant::now() < deadline, "no SIGHUP log line");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still serving.
    let mut s = std::net::TcpStream::connect(registry).unwrap();
    std::io::Write::write_all(&mut s, b"PING\n").unwrap();
    let mut pong = String::new();
    BufReader::new(s).read_line(&mut pong).unwrap();
    assert_eq!(pong, "PONG\n");
    assert_eq!(child.try_wait().unwrap(), None, "alive after SIGHUP");
    kill("-TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(log.path()).unwrap();
    let last = text.lines().last().unwrap_or_default();
    assert!(last.contains("NetSel stopped"), "last line: {last}");
    assert!(
        !text.contains('\x1b'),
        "no colour codes when stderr is not a terminal: {text}"
    );
}

/// Reads `path` until `needle` appears in it (the server writes its log as it goes).
fn wait_in_file(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_logs_carry_the_audit_trail_and_never_a_secret() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(serve_args(&[
            "--log-format",
            "json",
            "--health-check-interval",
            "1",
        ]))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut out = Proc {
        lines: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    let registry = out.wait_for("registry:");
    out.wait_for("ready");

    let mut conn = std::net::TcpStream::connect(&registry).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut ask = |line: &str| {
        std::io::Write::write_all(&mut conn, format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    };
    let fields = |answer: &str| -> (String, String) {
        let f: Vec<&str> = answer.split('|').collect();
        assert_eq!(f[0], "REGISTERED", "{answer}");
        (f[1].to_string(), f[2].to_string())
    };
    let (kept, kept_secret) = fields(&ask("REGISTER|audited|127.0.0.1:39555|ttl=1s"));
    let (gone, gone_secret) = fields(&ask("REGISTER|audited|127.0.0.1:39556|ttl=60s"));
    assert_eq!(
        ask(&format!("HEARTBEAT|{kept}|{kept_secret}")),
        "HEARTBEAT_OK"
    );
    assert_eq!(ask(&format!("DEREGISTER|{gone}|{gone_secret}")), "OK");
    // A checked instance: its check passes while this listener is up, then fails.
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = up.local_addr().unwrap().port();
    let (checked, _) = fields(&ask(&format!(
        "REGISTER|audited|127.0.0.1:{port}|ttl=60s|check=tcp"
    )));
    wait_in_file(log.path(), "instance health changed");
    drop(up);
    wait_in_file(log.path(), "connection refused");
    // The first instance stops heartbeating: its lease runs out.
    wait_in_file(log.path(), "instance expired");
    out.signal("TERM");
    assert_eq!(out.wait_exit(Duration::from_secs(10)).code(), Some(0));

    let text = std::fs::read_to_string(log.path()).unwrap();
    for secret in [&kept_secret, &gone_secret] {
        assert!(!text.contains(secret.as_str()), "a secret reached the log");
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let audit = |message: &str, id: &str| {
        lines.iter().any(|l| {
            l["target"] == "netsel::audit"
                && l["level"] == "INFO"
                && l["service"] == "audited"
                && l["instance"] == id
                && l["message"].as_str().unwrap_or("").starts_with(message)
        })
    };
    assert!(audit("instance registered", &kept), "{text}");
    assert!(audit("instance registered", &gone), "{text}");
    assert!(audit("instance deregistered", &gone), "{text}");
    assert!(audit("instance expired", &kept), "{text}");
    // Health changes say to what and why.
    let changed = |health: &str, why: &str| {
        lines.iter().any(|l| {
            l["target"] == "netsel::audit"
                && l["instance"] == checked.as_str()
                && l["message"] == "instance health changed"
                && l["health"] == health
                && l["check"].as_str().unwrap_or("").contains(why)
        })
    };
    assert!(changed("passing", ""), "{text}");
    assert!(changed("critical", "connection refused"), "{text}");
    let started = lines
        .iter()
        .find(|l| l["message"] == "NetSel started")
        .unwrap();
    assert!(
        started["listeners"]
            .as_str()
            .unwrap()
            .contains("registry=127.0.0.1:"),
        "plain values, no Rust Debug text: {started}"
    );
    assert_eq!(lines.last().unwrap()["message"], "NetSel stopped");
}

#[test]
fn a_bad_log_level_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(["--log-level", "netsel=loud", "serve", "--validate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-level 'netsel=loud'"), "{err}");
}

#[test]
fn sigint_also_exits_zero() {
    let mut serve = Proc::spawn(env!("CARGO_BIN_EXE_netsel"), &serve_args(&[]));
    serve.wait_for("ready");
    serve.signal("INT");
    assert_eq!(serve.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn config_file_validate_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "max_heartbeat_age = 5\n[network]\nvip_cidr = \"127.66.0.0/24\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(["serve", "--validate", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration is valid"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max_heartbeat_age = 5\nmystery = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(["serve", "--validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mystery"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(["serve", "--validate", "--max-heartbeat-age", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_heartbeat_age"));

    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(["serve", "--config", "/nonexistent/netsel.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// `--store` takes a cluster URL: a bad one is a usage error naming the flag; one with no
/// etcd behind it fails start-up saying so (or, in a build without the `etcd` feature, how
/// to get one).
#[test]
fn store_flag_errors_are_clear() {
    let mut args: Vec<String> = serve_args(&[]);
    args.retain(|a| a != "--in-memory");
    let run = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
            .args(&a)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--store", "http://127.0.0.1:2379"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--store") && err.contains("etcd://"), "{err}");
    let (code, err) = run(&["--store", "etcd://127.0.0.1:2379", "--data-dir", "/tmp/x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--data-dir"), "{err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let started = std::time::Instant::now();
    let (code, err) = run(&["--store", &format!("etcd://127.0.0.1:{port}")]);
    assert_eq!(code, Some(1), "{err}");
    if cfg!(feature = "etcd") {
        assert!(
            err.contains("no etcd member") && err.contains(&port.to_string()),
            "{err}"
        );
    } else {
        assert!(err.contains("--features etcd"), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up in {:?}",
        started.elapsed()
    );
}

/// A VIP pool this host cannot serve (no local address in it) is reported by
/// `--validate` and at start-up, with what to do, instead of failing later.
#[test]
fn a_vip_pool_the_host_cannot_use_is_refused_with_what_to_do() {
    for extra in [&["--validate"][..], &[][..]] {
        let mut args = serve_args(extra);
        let i = args.iter().position(|a| a == "--vip-cidr").unwrap();
        args[i + 1] = "192.0.2.0/24".into();
        let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains("192.0.2.0/24") && err.contains("ip addr add"),
            "{err}"
        );
    }
}

#[test]
fn port_conflict_fails_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut args = serve_args(&[]);
    let i = args.iter().position(|a| a == "--registry-addr").unwrap();
    args[i + 1] = addr.clone();
    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("registry"), "{err}");
    assert!(
        err.contains("choose another address with --registry-addr"),
        "{err}"
    );
}

#[test]
fn a_taken_dns_port_5353_is_explained_as_the_mdns_port() {
    // 5353 on an address of our own in 127/8, so no other test or mDNS responder meets it.
    let ip = format!("127.{}.{}.53", fastrand::u8(1..=250), fastrand::u8(..));
    let addr = format!("{ip}:5353");
    let _udp = std::net::UdpSocket::bind(&addr).unwrap();
    let _tcp = std::net::TcpListener::bind(&addr).unwrap();
    let mut args = serve_args(&[]);
    let i = args.iter().position(|a| a == "--dns-addr").unwrap();
    args[i + 1] = addr.clone();
    let out = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
    assert!(err.contains("mDNS"), "{err}");
    assert!(err.contains(&format!("--dns-addr {ip}:5354")), "{err}");
}

#[test]
fn examples_run_the_seed_workflow() {
    let mut server = Proc::spawn(example("netsel_server"), &["127.0.0.1:0".to_string()]);
    let registry = server.wait_for("- Registration server:");
    let mut service = Proc::spawn(example("service_b"), &[registry.clone(), "1".to_string()]);
    let assigned = service.wait_for("Successfully registered! Assigned address:");
    assert!(assigned.starts_with("127."), "{assigned}");
    service.wait_for("Starting echo server on");

    let out = Command::new(example("test_client"))
        .args([registry.as_str(), "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "test_client failed:\n{stdout}");
    for check in [
        "Service registration test passed!",
        "Echo server test passed!",
        "Heartbeat mechanism test passed!",
        "All tests passed!",
    ] {
        assert!(stdout.contains(check), "missing {check:?} in:\n{stdout}");
    }

    // With service_b gone, test_client fails loudly.
    drop(service);
    let out = Command::new(example("test_client"))
        .args([registry.as_str(), "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `Type=notify` (dist/netsel.service): `netsel serve` sends `READY=1` to systemd's
/// socket once every listener answers, and `STOPPING=1` when it starts to drain.
#[test]
fn systemd_hears_ready_when_every_listener_is_bound() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut serve = {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netsel"))
            .args(serve_args(&[]))
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc {
            lines: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    };
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    // By then every listener has been printed and answers.
    let mut addrs = Vec::new();
    let mut line = String::new();
    while serve.lines.read_line(&mut line).unwrap() > 0 && line.trim() != "ready" {
        addrs.push(line.trim().to_string());
        line.clear();
    }
    assert_eq!(addrs.len(), 5, "{addrs:?}");
    for entry in &addrs {
        let (name, addr) = entry.split_once(": ").unwrap();
        if name != "dns" {
            std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("{name} at {addr} does not answer: {e}"));
        }
    }
    serve.signal("TERM");
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(serve.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn completions_and_the_man_page_cover_every_subcommand() {
    let netsel = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_netsel"))
            .args(args)
            .output()
            .unwrap()
    };
    let subcommands = [
        "serve",
        "services",
        "resolve",
        "nodes",
        "watch",
        "register",
        "deregister",
        "run",
    ];
    for (shell, marker) in [
        ("bash", "complete -F _netsel"),
        ("zsh", "#compdef netsel"),
        ("fish", "complete -c netsel"),
    ] {
        let out = netsel(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script}");
        for sub in subcommands {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    // The bash script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("netsel.bash");
    std::fs::write(&path, netsel(&["completions", "bash"]).stdout).unwrap();
    let status = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(status.success(), "bash -n on the completion script");

    let bad = netsel(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));

    let man = String::from_utf8(netsel(&["man"]).stdout).unwrap();
    assert!(man.contains(".TH netsel 1"), "{man}");
    for sub in subcommands {
        let section = format!(".SH \"NETSEL {}\"", sub.to_uppercase());
        assert!(man.contains(&section), "man page lacks {section}");
    }
    assert!(
        man.contains("log\\-format"),
        "global options are documented"
    );
}
