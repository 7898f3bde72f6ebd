//! The web UI in real headless Chromium (Debian `chromium` driven by npm
//! `playwright-core`, see tests/ui/). Skipped with a note when the tools are missing,
//! failed when `CI` is set.

mod common;

use std::path::Path;
use std::process::Command;

use netsel::catalog::{Endpoint, Registration};
use netsel::{NetSelServer, Settings};

fn tools_present() -> bool {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let missing: Vec<&str> = [
        (
            "chromium (apt install chromium)",
            Path::new("/usr/bin/chromium").exists(),
        ),
        (
            "node (apt install nodejs)",
            Command::new("node")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
        ),
        (
            "playwright-core (npm ci in tests/ui)",
            ui.join("node_modules/playwright-core").exists(),
        ),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(what, _)| what)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the UI test needs {missing:?} in CI (.ci/run installs them)"
    );
    eprintln!("note: skipping the Chromium UI test; missing {missing:?}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_lists_services_and_updates_live_in_chromium() {
    if !tools_present() {
        return;
    }
    let server = NetSelServer::with_settings(Settings::ephemeral());
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    // A thousand services before the page loads: it must stay usable.
    for i in 1..=1000u32 {
        let ep = format!("127.0.0.1:{}", 10_000 + i).parse().unwrap();
        let mut reg = Registration::new(format!("seed-svc-{i:04}"), Endpoint::Explicit(ep));
        reg.tags = vec![format!("group-{}", i % 7)];
        catalog.register(reg).await.unwrap();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shot = dir.join("netsel-ui.png");
    let _ = std::fs::remove_file(&shot);
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let out = tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            Command::new("node")
                .arg("ui_test.mjs")
                .current_dir(ui)
                .env("NETSEL_API_URL", format!("http://{api}"))
                .env("NETSEL_SCREENSHOT", &shot)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "UI test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is a real PNG"
    );
    eprintln!("UI screenshot: {}", shot.display());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_asks_for_a_token_when_acls_are_on() {
    use netsel::config::{AclSettings, AclToken};
    if !tools_present() {
        return;
    }
    let mut settings = Settings::ephemeral();
    settings.acl = AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![
            AclToken {
                name: "viewer".into(),
                token: "viewer-token-0123456789".into(),
                read: vec!["*".into()],
                write: vec![],
            },
            AclToken {
                name: "deployer".into(),
                token: "deployer-token-0123456789".into(),
                read: vec![],
                write: vec!["acl-".into()],
            },
        ],
        ..AclSettings::default()
    };
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let catalog = server.catalog().unwrap();
    let ep = "127.0.0.1:7000".parse().unwrap();
    catalog
        .register(Registration::new("acl-before", Endpoint::Explicit(ep)))
        .await
        .unwrap();
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("ui_acl_test.mjs")
            .current_dir(ui)
            .env("NETSEL_API_URL", format!("http://{api}"))
            .env("NETSEL_READ_TOKEN", "viewer-token-0123456789")
            .env("NETSEL_WRITE_TOKEN", "deployer-token-0123456789")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "UI ACL test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    server.shutdown().await;
}

/// One request through the HTTP proxy to `host`; true when it was answered 200.
async fn through_proxy(proxy: std::net::SocketAddr, host: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else {
        return false;
    };
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_charts_traffic_and_shares_its_view_in_chromium() {
    if !tools_present() {
        return;
    }
    let mut settings = Settings::ephemeral();
    settings.api.traffic_interval_ms = 200;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let bound = server.bound().unwrap();
    let (api, proxy) = (bound.api.unwrap(), bound.http_proxy.unwrap());
    let catalog = server.catalog().unwrap();
    let mut web = Registration::new("chart-web", Endpoint::Explicit(common::ok_backend().await));
    web.meta = [("version", "1.2.3"), ("team", "edge")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    catalog.register(web).await.unwrap();
    for (name, port) in [("chart-db", 7101), ("unrelated", 7102)] {
        let ep = format!("127.0.0.1:{port}").parse().unwrap();
        catalog
            .register(Registration::new(name, Endpoint::Explicit(ep)))
            .await
            .unwrap();
    }
    // Traffic through the proxy for as long as the browser looks.
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        loop {
            tick.tick().await;
            assert!(
                through_proxy(proxy, "chart-web").await,
                "proxy did not answer 200"
            );
        }
    });
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("netsel-ui-traffic.png");
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let out = tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            Command::new("node")
                .arg("ui_traffic_test.mjs")
                .current_dir(ui)
                .env("NETSEL_API_URL", format!("http://{api}"))
                .env("NETSEL_SCREENSHOT", &shot)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        !sender.is_finished(),
        "the traffic sender stopped: {sender:?}"
    );
    sender.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "UI traffic test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    eprintln!("UI traffic screenshot: {}", shot.display());
    server.shutdown().await;
}
