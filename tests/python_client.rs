//! The Python client (`clients/python`) against the real `netsel` binary: runs its
//! `unittest` suite with `NETSEL_BIN` pointing at the binary cargo built. Needs python3
//! 3.9 or newer; without it the test prints a note and passes, unless `CI` is set.

mod common;

use std::process::Command;

const HINT: &str = "apt-get install python3 (3.9 or newer)";

#[test]
fn python_client_suite_passes_against_the_real_binary() {
    if !common::have_tool("python3", &["--version"], HINT) {
        return;
    }
    let new_enough = Command::new("python3")
        .args(["-c", "import sys; sys.exit(sys.version_info < (3, 9))"])
        .status()
        .is_ok_and(|s| s.success());
    if !new_enough {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 is too old: {HINT}"
        );
        eprintln!("note: python3 is older than 3.9 ({HINT}); skipping");
        return;
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-v",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NETSEL_BIN", env!("CARGO_BIN_EXE_netsel"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("NETSEL_API_ADDR")
        .env_remove("NETSEL_TOKEN")
        .output()
        .expect("run python3 -m unittest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the Python client's tests failed ({}):\n{text}",
        out.status
    );
    // unittest reports skips as success: every test must have run.
    assert!(
        !text.contains("skipped"),
        "Python tests were skipped:\n{text}"
    );
    eprintln!("{text}");
}
