//! Names from the system resolver (docs/resolver.md): dnsmasq on loopback forwards the
//! `netsel.` domain to NetSel, as a host's resolver would, and `dig` asks dnsmasq. Without
//! dnsmasq or dig the test is skipped, and failed under CI (`.ci/run` installs
//! `dnsmasq-base`, the binary without its system service).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Line, eventually};

/// A dnsmasq process, killed when dropped.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig @addr name type +short`, bounded in time.
fn dig(addr: SocketAddr, name: &str, qtype: &str) -> String {
    let out = Command::new("dig")
        .args([
            &format!("@{}", addr.ip()),
            "-p",
            &addr.port().to_string(),
            name,
            qtype,
            "+short",
            "+time=1",
            "+tries=1",
        ])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// dnsmasq on its own 127/8 address, forwarding `netsel.` to `netsel_dns` and nothing
/// else anywhere (no upstream servers, no /etc/hosts).
fn start_dnsmasq(netsel_dns: SocketAddr) -> Dnsmasq {
    let ip = format!("127.{}.{}.1", fastrand::u8(1..=250), fastrand::u8(..));
    let addr: SocketAddr = format!("{ip}:5300").parse().unwrap();
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
            &format!("--listen-address={ip}"),
            &format!("--port={}", addr.port()),
            &format!("--server=/netsel/{}#{}", netsel_dns.ip(), netsel_dns.port()),
            // Answers for the domain are NetSel's: do not cache them past their TTL.
            "--max-cache-ttl=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dnsmasq");
    Dnsmasq { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_forwards_the_netsel_domain_to_netsel() {
    let hint = "apt-get install dnsmasq-base bind9-dnsutils (.ci/run does)";
    if !common::have_tool("dnsmasq", &["--version"], hint)
        || !common::have_tool("dig", &["-v"], hint)
    {
        return;
    }
    let (server, registry) = common::start(common::settings(30)).await;
    let dns = server.bound().unwrap().dns.unwrap();
    let mut line = Line::connect(registry).await;
    let answer = line.ask("REGISTER|web|127.0.0.1:39201").await;
    let vip = answer.split('|').nth(3).expect("a VIP").to_string();

    let mut dnsmasq = start_dnsmasq(dns);
    let addr = dnsmasq.addr;
    let resolved = eventually(Duration::from_secs(20), || {
        let exited = matches!(dnsmasq.child.try_wait(), Ok(Some(_)));
        let want = vip.clone();
        async move {
            exited
                || tokio::task::spawn_blocking(move || dig(addr, "web.netsel", "A"))
                    .await
                    .unwrap()
                    == want
        }
    })
    .await;
    if let Ok(Some(status)) = dnsmasq.child.try_wait() {
        let mut err = String::new();
        use std::io::Read;
        let _ = dnsmasq
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err);
        panic!("dnsmasq exited ({status}): {err}");
    }
    assert!(
        resolved,
        "web.netsel through dnsmasq should be the VIP {vip}"
    );

    // SRV through the resolver too, and names outside the domain go nowhere.
    let srv = tokio::task::spawn_blocking(move || dig(addr, "_web._tcp.netsel", "SRV"))
        .await
        .unwrap();
    assert!(srv.contains(" 39201 "), "{srv}");
    let other = tokio::task::spawn_blocking(move || dig(addr, "example.com", "A"))
        .await
        .unwrap();
    assert!(
        other.is_empty(),
        "nothing outside netsel. is answered: {other}"
    );
    server.shutdown().await;
}
