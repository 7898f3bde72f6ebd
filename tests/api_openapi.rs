//! docs/openapi.yaml tested against the running server with schemathesis (PyPI): every
//! documented operation is fuzzed (examples, coverage, fuzzing and stateful phases) and
//! every response checked against the document (`--checks all`). Skipped with a note
//! when `st` is missing, failed when `CI` is set.

use std::process::{Command, Stdio};

use netsel::{NetSelServer, Settings};

fn schemathesis() -> Option<&'static str> {
    for tool in ["st", "schemathesis"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(tool);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "schemathesis is required in CI (.ci/run: pip install schemathesis)"
    );
    eprintln!("note: schemathesis not found (pip install schemathesis); skipping");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_server() {
    let Some(st) = schemathesis() else { return };
    let mut settings = Settings::ephemeral();
    // Fuzzing sends thousands of requests and may ask for long blocking queries.
    settings.api.rate_limit_per_sec = 0;
    settings.api.max_wait_secs = 1;
    let server = NetSelServer::with_settings(settings);
    server.start().await.unwrap();
    let api = server.bound().unwrap().api.unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let dir = work.path().to_owned();
        move || {
            Command::new(st)
                .args([
                    "run",
                    &format!("http://{api}/v1/openapi.yaml"),
                    "--url",
                    &format!("http://{api}"),
                    "--checks",
                    "all",
                    // An endless stream: documented, not fuzzable.
                    "--exclude-path",
                    "/v1/events",
                    "--phases",
                    "examples,coverage,fuzzing,stateful",
                    "--max-examples",
                    "40",
                    "--request-timeout",
                    "5",
                    "--generation-database",
                    "none",
                    "--no-color",
                    "--seed",
                    "1",
                ])
                .current_dir(dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed"), "{stdout}");
    server.shutdown().await;
}

#[test]
fn document_is_the_one_served_and_lists_every_route() {
    let doc = netsel::api::OPENAPI_YAML;
    assert!(doc.starts_with("openapi: 3.1"));
    for path in [
        "/v1/instances:",
        "/v1/instances/{id}:",
        "/v1/instances/{id}/heartbeat:",
        "/v1/services:",
        "/v1/services/{name}:",
        "/v1/events:",
        "/v1/health:",
        "/metrics:",
    ] {
        assert!(
            doc.contains(&format!("  {path}")),
            "{path} is not documented"
        );
    }
}
