//! The README's quick start, run as written: the shell block after `<!-- quickstart -->`
//! runs in bash against the real binary, so the README cannot drift from what works.
//!
//! Only what must differ on a test machine is changed, and visibly: every well-known port
//! (9000, 9001, 5353, 8080, 8081 and the backend's 8000) becomes a free one, `netsel
//! serve` gets a VIP pool of the test's own, and `xdg-open` is a stand-in that fetches the
//! URL. `netsel` is the binary under test, first on PATH. Needs bash, python3, dig and
//! curl: skipped without them, failed under CI.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// The quick-start block of the README.
fn quickstart() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let after = readme
        .split_once("<!-- quickstart -->")
        .expect("README.md marks its quick start with <!-- quickstart -->")
        .1;
    let block = after
        .trim_start()
        .strip_prefix("```sh\n")
        .expect("the quick start is a ```sh block");
    block
        .split_once("\n```")
        .expect("a closed block")
        .0
        .to_string()
}

/// A port nothing listens on (TCP and UDP), for one of the quick start's fixed ports.
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn the_readme_quick_start_works_as_written() {
    let hint = "the quick start needs bash, python3, dig and curl (.ci/run installs them)";
    for (tool, arg) in [
        ("bash", "--version"),
        ("python3", "--version"),
        ("dig", "-v"),
    ] {
        if !common::have_tool(tool, &[arg], hint) {
            return;
        }
    }
    if !common::have_tool("curl", &["--version"], hint) {
        return;
    }
    let block = quickstart();
    // Each fixed port of the quick start, and its stand-in here.
    let ports: Vec<(u16, u16)> = [9000, 9001, 5353, 8080, 8081, 8000]
        .into_iter()
        .map(|p| (p, free_port()))
        .collect();
    let mut script = block.clone();
    for (from, to) in &ports {
        script = script.replace(&format!(":{from}"), &format!(":{to}"));
        script = script.replace(&format!("-p {from} "), &format!("-p {to} "));
        script = script.replace(&format!("--port {from} "), &format!("--port {to} "));
        script = script.replace(
            &format!("http.server {from} "),
            &format!("http.server {to} "),
        );
    }
    let pool = format!("127.{}.{}.0/24", fastrand::u8(1..=250), fastrand::u8(..));
    let serve = "netsel serve --in-memory";
    assert!(script.contains(serve), "the quick start starts `{serve}`");
    let listen: String = ports[..5]
        .iter()
        .zip([
            "--registry-addr",
            "--api-addr",
            "--dns-addr",
            "--tcp-proxy-addr",
            "--http-proxy-addr",
        ])
        .map(|((_, to), flag)| format!(" {flag} 127.0.0.1:{to}"))
        .collect();
    script = script.replace(serve, &format!("{serve}{listen} --vip-cidr {pool}"));
    let api = format!("127.0.0.1:{}", ports[1].1);

    // `netsel` on PATH, and an `xdg-open` that fetches the page instead of opening it.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_netsel"))
        .parent()
        .unwrap()
        .to_path_buf();
    let shims = tempfile::tempdir().unwrap();
    let xdg = shims.path().join("xdg-open");
    std::fs::write(
        &xdg,
        "#!/bin/sh\ncurl -sf \"$1\" | grep -q '<title>' && echo \"dashboard answered: $1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        shims.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Output to files, not pipes: a process that outlived the script would hold a pipe
    // open and a read would never end. Run as pasted (no `set -e`): what each step
    // printed is checked below, and the last step is NetSel's exit, which must be 0.
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("NETSEL_API_ADDR", &api)
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("run bash");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever happened, nothing the script started outlives the test: its process group,
    // and the backend, which `netsel run` starts in a group of its own.
    common::signal_group(child.id(), "KILL");
    let backend = format!("http.server {} ", ports[5].1);
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &backend])
        .status();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("the quick start did not finish in 90 s\n--- script\n{script}\n--- stdout\n{out}\n--- stderr\n{err}")
    });
    let context = format!("--- script\n{script}\n--- stdout\n{out}\n--- stderr\n{err}");
    assert!(
        status.success(),
        "the quick start failed: {status}\n{context}"
    );

    // What a reader sees: the VIP from dig, the backend's page through the proxy and the
    // VIP, the service in `netsel services`, and the dashboard.
    let prefix = pool.trim_end_matches("0/24");
    let vips: Vec<&str> = out.lines().filter(|l| l.starts_with(prefix)).collect();
    assert!(!vips.is_empty(), "dig printed the VIP\n{context}");
    assert!(
        out.matches("<!DOCTYPE HTML>").count() >= 2,
        "the backend answered through the HTTP proxy and the VIP\n{context}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains(vips[0])),
        "netsel services lists web at its VIP\n{context}"
    );
    assert!(out.contains("dashboard answered"), "{context}");
    assert!(
        err.contains("registered web at 127.0.0.1:"),
        "netsel run said it registered\n{context}"
    );
    assert!(
        err.contains("deregistered"),
        "netsel run deregistered it\n{context}"
    );
}
