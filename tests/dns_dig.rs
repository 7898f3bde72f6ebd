//! The real `netsel` binary asked by `dig` (Debian `bind9-dnsutils`), as a user would,
//! and by the client library's `dns_resolve`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netsel::client::{ServiceClient, dns_resolve};

struct Netsel {
    child: Child,
    registry: SocketAddr,
    dns: SocketAddr,
}

impl Drop for Netsel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_netsel() -> Netsel {
    let any = "127.0.0.1:0";
    let mut child = Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args([
            "serve",
            "--registry-addr",
            any,
            "--dns-addr",
            any,
            "--api-addr",
            any,
        ])
        .args(["--tcp-proxy-addr", any, "--http-proxy-addr", any])
        // State in memory: the default data dir (./netsel-data) would be shared with
        // whatever else ran in this directory, and locked against parallel tests.
        .arg("--in-memory")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("netsel starts");
    let stdout = child.stdout.take().unwrap();
    let (mut registry, mut dns) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some((name, addr)) = line.split_once(": ") {
            match name {
                "registry" => registry = addr.parse().ok(),
                "dns" => dns = addr.parse().ok(),
                _ => {}
            }
        }
    }
    Netsel {
        child,
        registry: registry.expect("registry: ADDR printed"),
        dns: dns.expect("dns: ADDR printed"),
    }
}

/// Whether `dig` is here. Missing: a failure under CI, a note otherwise.
fn have_dig() -> bool {
    let found = Command::new("dig").arg("-v").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "dig is missing: install bind9-dnsutils (.ci/run does)"
        );
        eprintln!("note: dig not installed; skipping the dig test (install bind9-dnsutils)");
    }
    found
}

fn dig(dns: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args([
            format!("@{}", dns.ip()),
            "-p".into(),
            dns.port().to_string(),
        ])
        .args(["+tries=1", "+time=3"])
        .args(args)
        .output()
        .expect("dig runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("<none>")
}

#[tokio::test]
async fn dig_against_the_binary() {
    if !have_dig() {
        return;
    }
    let netsel = spawn_netsel();
    let mut web = ServiceClient::builder("web")
        .registry(netsel.registry)
        .endpoint("127.0.0.1:8000".parse().unwrap())
        .weight(3)
        .ttl(Duration::from_secs(60))
        .build();
    let (vip, _port) = web.register().await.unwrap();
    let dns = netsel.dns;

    // A over UDP, then the same over TCP.
    let udp = tokio::task::spawn_blocking(move || dig(dns, &["web.netsel", "A"]))
        .await
        .unwrap();
    assert_eq!(status(&udp), "NOERROR", "{udp}");
    assert!(udp.contains(" aa"), "AA set: {udp}");
    assert!(udp.contains(&format!("IN\tA\t{vip}")), "{udp}");
    let tcp = tokio::task::spawn_blocking(move || dig(dns, &["+tcp", "web.netsel", "A", "+short"]))
        .await
        .unwrap();
    assert_eq!(tcp.trim(), vip.to_string());

    // SRV: weight 3, port 8000, a per-instance target with glue.
    let srv = tokio::task::spawn_blocking(move || dig(dns, &["_web._tcp.netsel", "SRV"]))
        .await
        .unwrap();
    let id = web.instance_id().unwrap();
    assert!(
        srv.contains(&format!("SRV\t0 3 8000 {id}.web.netsel.")),
        "{srv}"
    );
    assert!(
        srv.contains(&format!("{id}.web.netsel. 5\tIN\tA\t127.0.0.1")),
        "glue: {srv}"
    );

    // NXDOMAIN with the SOA; REFUSED outside the zone.
    let nx = tokio::task::spawn_blocking(move || dig(dns, &["nope.netsel", "A"]))
        .await
        .unwrap();
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert!(nx.contains("SOA\tns.netsel. hostmaster.netsel."), "{nx}");
    let refused = tokio::task::spawn_blocking(move || dig(dns, &["example.com", "A"]))
        .await
        .unwrap();
    assert_eq!(status(&refused), "REFUSED", "{refused}");

    // The client library resolves through DNS as well.
    let r = dns_resolve(dns, "web").await.unwrap();
    assert_eq!(r.vip, vip);
    assert_eq!(r.instances.len(), 1);
    assert_eq!(r.instances[0].endpoint, "127.0.0.1:8000".parse().unwrap());
    assert_eq!(r.instances[0].weight, 3);
    assert_eq!(r.instances[0].id, id);
    assert!(matches!(
        dns_resolve(dns, "nope").await,
        Err(netsel::client::ClientError::UnknownService(_))
    ));

    // Deregistered: gone from DNS at once.
    web.deregister().await.unwrap();
    let nx = tokio::task::spawn_blocking(move || dig(dns, &["web.netsel", "A"]))
        .await
        .unwrap();
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
}
