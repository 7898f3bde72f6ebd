//! The TCP proxy end to end: a real server on port 0, echo backends registered through
//! the client library, clients on loopback. Every test uses its own VIP range so tests
//! run in parallel without sharing addresses.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netsel::client::ServiceClient;
use netsel::config::RelayMode;
use netsel::proxy::balance::Policy;
use netsel::proxy::tcp::TcpProxy;
use netsel::server::BoundAddrs;
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    server: NetSelServer,
    bound: BoundAddrs,
    proxy: TcpProxy,
}

/// A server on ephemeral ports with a VIP range of its own.
async fn start(tune: impl FnOnce(&mut Settings)) -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut s = Settings::ephemeral();
    s.network.vip_cidr = format!("127.{}.{}.0/24", fastrand::u8(128..=250), fastrand::u8(..))
        .parse()
        .unwrap();
    tune(&mut s);
    let server = NetSelServer::with_settings(s);
    server.start().await.unwrap();
    let bound = server.bound().unwrap();
    let proxy = server.tcp_proxy().unwrap();
    Harness {
        server,
        bound,
        proxy,
    }
}

impl Harness {
    fn gateway(&self) -> SocketAddr {
        self.bound.tcp_proxy.unwrap()
    }

    /// Registers `name` at `endpoint` through the client library; returns the client
    /// (keep it: it owns the registration) and `VIP:service-port`.
    async fn register(
        &self,
        name: &str,
        endpoint: SocketAddr,
        tune: impl FnOnce(netsel::client::ServiceClientBuilder) -> netsel::client::ServiceClientBuilder,
    ) -> (ServiceClient, SocketAddr) {
        let builder = ServiceClient::builder(name)
            .registry(self.bound.registry)
            .endpoint(endpoint);
        let mut client = tune(builder).build();
        let (vip, port) = client.register().await.unwrap();
        (client, SocketAddr::new(vip, port))
    }

    /// Waits until the VIP listener of `name` is open at `addr`.
    async fn wait_vip(&self, name: &str, addr: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        while !self
            .proxy
            .vip_listeners()
            .iter()
            .any(|(n, a)| n.as_str() == name && *a == addr)
        {
            assert!(
                Instant::now() < deadline,
                "VIP listener {name} {addr} never opened"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn metrics(&self) -> String {
        self.server.metrics().unwrap().encode()
    }
}

/// An echo backend that first sends `<tag>\n`, then echoes until the client half-closes.
struct Backend {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    served: Arc<AtomicUsize>,
}

async fn backend(tag: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let banner = format!("{tag}\n");
    let count = served.clone();
    let accept = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let banner = banner.clone();
            tokio::spawn(async move {
                if s.write_all(banner.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Backend {
        addr,
        accept,
        served,
    }
}

impl Backend {
    /// Stops listening (new connections are refused); established ones carry on.
    async fn kill(&self) {
        self.accept.abort();
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(self.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "backend still accepting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Reads the backend's banner, checks one echo, half-closes, expects EOF. Returns the tag.
async fn exchange(stream: TcpStream, first: &[u8]) -> std::io::Result<String> {
    let mut r = BufReader::new(stream);
    let mut banner = String::new();
    r.read_line(&mut banner).await?;
    if banner.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !first.is_empty() {
        let mut echoed = vec![0; first.len()];
        r.read_exact(&mut echoed).await?;
        assert_eq!(echoed, first);
    }
    r.get_mut().write_all(b"ping\n").await?;
    let mut echoed = [0u8; 5];
    r.read_exact(&mut echoed).await?;
    assert_eq!(&echoed, b"ping\n");
    r.get_mut().shutdown().await?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await?;
    assert!(rest.is_empty());
    Ok(banner.trim_end().to_string())
}

/// Sends a name line to the gateway and expects `ERROR <expected>\n`, then EOF.
async fn expect_gateway_error(gateway: SocketAddr, send: &[u8], expected: &str) {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(send).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("the gateway closes after an error")
        .unwrap();
    assert_eq!(out, format!("ERROR {expected}\n"), "after sending {send:?}");
}

#[tokio::test]
async fn gateway_relays_and_forwards_bytes_after_the_name() {
    for mode in [RelayMode::Splice, RelayMode::Copy] {
        let h = start(|s| s.tcp_proxy.relay = mode).await;
        let b = backend("a").await;
        let (_c, _) = h.register("echo", b.addr, |b| b).await;
        for line in [&b"echo\n"[..], b"ECHO.netsel\r\n", b"echo.netsel.\n"] {
            let mut s = TcpStream::connect(h.gateway()).await.unwrap();
            // The name and the first bytes of the client's own protocol in one write.
            let mut first = line.to_vec();
            first.extend_from_slice(b"hello");
            s.write_all(&first).await.unwrap();
            assert_eq!(exchange(s, b"hello").await.unwrap(), "a", "{mode:?}");
        }
        let m = h.metrics();
        assert!(
            m.contains(r#"netsel_tcp_proxy_connections_total{service="echo"} 3"#),
            "{m}"
        );
        // 5 + 5 bytes per connection from the client, banner + echoes back.
        assert!(
            m.contains(
                r#"netsel_tcp_proxy_bytes_total{service="echo",direction="to_instance"} 30"#
            ),
            "{m}"
        );
        // "a\n" + "hello" + "ping\n" back, per connection.
        assert!(
            m.contains(r#"netsel_tcp_proxy_bytes_total{service="echo",direction="to_client"} 36"#),
            "{m}"
        );
        // The relay task finishes just after the client sees EOF.
        let deadline = Instant::now() + WAIT;
        while !h
            .metrics()
            .contains(r#"netsel_tcp_proxy_active_connections{service="echo"} 0"#)
        {
            assert!(Instant::now() < deadline, "{}", h.metrics());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        h.server.shutdown().await;
    }
}

#[tokio::test]
async fn large_transfers_arrive_intact_in_both_relay_modes() {
    for mode in [RelayMode::Splice, RelayMode::Copy] {
        let h = start(|s| s.tcp_proxy.relay = mode).await;
        let b = backend("big").await;
        let (_c, vip) = h.register("big", b.addr, |b| b).await;
        h.wait_vip("big", vip).await;
        let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let s = TcpStream::connect(vip).await.unwrap();
        let (r, mut w) = s.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, BufReader::new(r).read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert_eq!(&got[..4], b"big\n");
        assert!(got[4..] == payload[..], "{mode:?}: payload differs");
        h.server.shutdown().await;
    }
}

#[tokio::test]
async fn gateway_error_paths() {
    let h = start(|s| {
        s.tcp_proxy.name_timeout_ms = 300;
        s.tcp_proxy.connect_timeout_ms = 500;
    })
    .await;
    let g = h.gateway();
    expect_gateway_error(g, b"nope\n", "unknown service nope").await;
    expect_gateway_error(
        g,
        b"a.b\n",
        "bad service name: service name 'a.b' may only contain letters, digits and '-'",
    )
    .await;
    expect_gateway_error(g, b"\xff\n", "name line is not UTF-8").await;
    expect_gateway_error(g, &[b'x'; 300], "name line longer than 256 bytes").await;
    // No name line at all: the timeout.
    expect_gateway_error(g, b"", "no name line within 300 ms").await;
    expect_gateway_error(g, b"web", "no name line within 300 ms").await;

    // An instance that refuses: every attempt fails, the client is told.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (_c, _) = h.register("down", dead_addr, |b| b).await;
    expect_gateway_error(g, b"down\n", "cannot connect to down").await;

    // A service with no healthy instance.
    let b = backend("x").await;
    let (c, _) = h.register("sick", b.addr, |b| b).await;
    let catalog = h.server.catalog().unwrap();
    catalog
        .set_health(&c.instance_id().unwrap(), netsel::catalog::Health::Critical)
        .await
        .unwrap();
    expect_gateway_error(g, b"sick\n", "no healthy instance of sick").await;

    let m = h.metrics();
    for reason in [
        "unknown_service",
        "bad_name",
        "name_too_long",
        "name_timeout",
        "connect_failed",
        "no_healthy_instance",
    ] {
        assert!(m.contains(&format!("reason=\"{reason}\"")), "{reason}: {m}");
    }
    assert!(
        m.contains(r#"netsel_tcp_proxy_connect_failures_total{service="down"} 1"#),
        "{m}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn connection_cap_refuses_with_an_error_line() {
    let h = start(|s| s.tcp_proxy.max_connections = 1).await;
    let b = backend("a").await;
    let (_c, _) = h.register("capped", b.addr, |b| b).await;
    let mut held = TcpStream::connect(h.gateway()).await.unwrap();
    held.write_all(b"capped\n").await.unwrap();
    let mut banner = [0u8; 2];
    held.read_exact(&mut banner).await.unwrap();
    expect_gateway_error(h.gateway(), b"capped\n", "too many connections").await;
    drop(held);
    // The slot comes back once the relay ends.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(h.gateway()).await.unwrap();
        s.write_all(b"capped\n").await.unwrap();
        let mut first = [0u8; 2];
        s.read_exact(&mut first).await.unwrap();
        if &first == b"a\n" {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn vip_listeners_follow_the_catalog() {
    let h = start(|_| {}).await;
    let b = backend("v").await;
    let (client, vip) = h.register("vipsvc", b.addr, |b| b).await;
    assert_ne!(vip, b.addr);
    h.wait_vip("vipsvc", vip).await;
    let s = TcpStream::connect(vip).await.unwrap();
    assert_eq!(exchange(s, b"").await.unwrap(), "v");

    // An established relay outlives its listener.
    let held = TcpStream::connect(vip).await.unwrap();
    client.deregister().await.unwrap();
    let deadline = Instant::now() + WAIT;
    // Closed: no socket takes connections, and the proxy's list says so (it is updated
    // once every worker's accept loop has let go of its socket).
    while TcpStream::connect(vip).await.is_ok() || !h.proxy.vip_listeners().is_empty() {
        assert!(
            Instant::now() < deadline,
            "VIP listener still open after deregister"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // `held` was still in a listening socket's queue or already relayed: either way
    // it is served, not reset with the socket.
    assert_eq!(exchange(held, b"").await.unwrap(), "v");

    // Back again: the same VIP (held for the name), listening again without a restart.
    let (_c2, vip2) = h.register("vipsvc", b.addr, |b| b).await;
    assert_eq!(vip2, vip);
    h.wait_vip("vipsvc", vip).await;
    let s = TcpStream::connect(vip).await.unwrap();
    assert_eq!(exchange(s, b"").await.unwrap(), "v");
    h.server.shutdown().await;
}

#[tokio::test]
async fn vip_bind_conflict_marks_the_service_and_spares_the_others() {
    // A /30 has two usable addresses; occupy port P on both.
    let net = format!("127.{}.{}.0/30", fastrand::u8(128..=250), fastrand::u8(..));
    let h = start(|s| s.network.vip_cidr = net.parse().unwrap()).await;
    let base: IpAddr = net.split('/').next().unwrap().parse().unwrap();
    let IpAddr::V4(base) = base else {
        unreachable!()
    };
    let p = free_port().await;
    let q = free_port().await;
    let mut blockers = Vec::new();
    for last in [1u8, 2] {
        let mut o = base.octets();
        o[3] = last;
        blockers.push(std::net::TcpListener::bind((IpAddr::from(o), p)).unwrap());
    }
    let b = backend("ok").await;
    let (_a, vip_a) = h.register("blocked", b.addr, |c| c.service_port(p)).await;
    let deadline = Instant::now() + WAIT;
    while h.proxy.affected_services().is_empty() {
        assert!(Instant::now() < deadline, "bind failure never reported");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let affected = h.proxy.affected_services();
    assert_eq!(affected.len(), 1);
    assert_eq!(affected[0].service.as_str(), "blocked");
    assert_eq!(affected[0].addr, vip_a);
    assert!(
        h.metrics()
            .contains(r#"netsel_tcp_proxy_vip_bind_failed{service="blocked"} 1"#)
    );

    // Another service is not disturbed.
    let (_b, vip_b) = h.register("fine", b.addr, |c| c.service_port(q)).await;
    h.wait_vip("fine", vip_b).await;
    let s = TcpStream::connect(vip_b).await.unwrap();
    assert_eq!(exchange(s, b"").await.unwrap(), "ok");

    // Once the address is free, the next catalog change opens it.
    drop(blockers);
    let b2 = backend("ok").await;
    let (_a2, _) = h.register("blocked", b2.addr, |c| c.service_port(p)).await;
    h.wait_vip("blocked", vip_a).await;
    assert!(h.proxy.affected_services().is_empty());
    assert!(!h.metrics().contains("vip_bind_failed{"));
    h.server.shutdown().await;
}

async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn an_instance_pointing_at_the_proxy_itself_is_never_dialled() {
    let h = start(|_| {}).await;
    let b = backend("real").await;
    let (_c, vip) = h.register("loopy", b.addr, |b| b).await;
    h.wait_vip("loopy", vip).await;
    // Two more instances: the VIP listener itself, and the gateway.
    let (_l1, _) = h.register("loopy", vip, |b| b).await;
    let (_l2, _) = h.register("loopy", h.gateway(), |b| b).await;
    for _ in 0..9 {
        let s = TcpStream::connect(vip).await.unwrap();
        assert_eq!(exchange(s, b"").await.unwrap(), "real");
    }
    assert_eq!(b.served.load(Ordering::SeqCst), 9);
    h.server.shutdown().await;
}

async fn distribution(
    policy: Policy,
    weights: [u32; 3],
    connections: usize,
) -> HashMap<String, usize> {
    let h = start(|s| s.balance.policy = policy).await;
    let mut keep = Vec::new();
    let mut vip = None;
    for (n, w) in weights.into_iter().enumerate() {
        let b = backend(&format!("b{n}")).await;
        let (c, v) = h.register("dist", b.addr, |c| c.weight(w)).await;
        vip = Some(v);
        keep.push((b, c));
    }
    let vip = vip.unwrap();
    h.wait_vip("dist", vip).await;
    let mut seen = HashMap::new();
    for _ in 0..connections {
        let s = TcpStream::connect(vip).await.unwrap();
        *seen.entry(exchange(s, b"").await.unwrap()).or_default() += 1;
    }
    h.server.shutdown().await;
    seen
}

#[tokio::test]
async fn round_robin_spreads_connections_evenly() {
    let seen = distribution(Policy::RoundRobin, [1, 1, 1], 60).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| *n == 20), "{seen:?}");
}

#[tokio::test]
async fn weighted_follows_instance_weights() {
    let seen = distribution(Policy::Weighted, [1, 2, 3], 60).await;
    assert_eq!(
        (seen["b0"], seen["b1"], seen["b2"]),
        (10, 20, 30),
        "{seen:?}"
    );
}

#[tokio::test]
async fn least_connections_avoids_the_busy_instance() {
    let h = start(|s| s.balance.policy = Policy::LeastConnections).await;
    let a = backend("a").await;
    let b = backend("b").await;
    let (_ca, vip) = h.register("lc", a.addr, |c| c).await;
    let (_cb, _) = h.register("lc", b.addr, |c| c).await;
    h.wait_vip("lc", vip).await;
    // Hold three connections open; they spread 2/1 or 1/2 at worst, then whoever has
    // fewer gets every next short connection until counts are level.
    let mut held = Vec::new();
    let mut busy = HashMap::<String, usize>::new();
    for _ in 0..3 {
        let mut r = BufReader::new(TcpStream::connect(vip).await.unwrap());
        let mut tag = String::new();
        r.read_line(&mut tag).await.unwrap();
        *busy.entry(tag.trim().to_string()).or_default() += 1;
        held.push(r);
    }
    let (more, less) = if busy.get("a").copied().unwrap_or(0) > busy.get("b").copied().unwrap_or(0)
    {
        ("a", "b")
    } else {
        ("b", "a")
    };
    assert_eq!(busy[more], 2, "{busy:?}");
    // The next connection, held too, must go to the less busy one.
    let mut r = BufReader::new(TcpStream::connect(vip).await.unwrap());
    let mut tag = String::new();
    r.read_line(&mut tag).await.unwrap();
    assert_eq!(tag.trim(), less);
    // Close the held relays so shutdown need not wait out the drain deadline.
    drop((held, r));
    assert!(h.server.shutdown().await);
}

#[tokio::test]
async fn killing_one_of_three_instances_fails_no_new_connection() {
    let h = start(|s| s.balance.eject_base_ms = 60_000).await;
    let mut backends = Vec::new();
    let mut clients = Vec::new();
    let mut vip = None;
    for n in 0..3 {
        let b = backend(&format!("k{n}")).await;
        let (c, v) = h.register("kill", b.addr, |c| c).await;
        vip = Some(v);
        backends.push(b);
        clients.push(c);
    }
    let vip = vip.unwrap();
    h.wait_vip("kill", vip).await;
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut load = Vec::new();
    for _ in 0..8 {
        let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    r = async { exchange(TcpStream::connect(vip).await?, b"").await } => {
                        match r {
                            Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                            Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                }
            }
        }));
    }
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while done.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "load stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(100).await;
    backends[1].kill().await;
    let served_at_kill = backends[1].served.load(Ordering::SeqCst);
    let after = done.load(Ordering::SeqCst);
    wait_for(after + 300).await;
    stop.notify_waiters();
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "client connections failed"
    );
    assert_eq!(backends[1].served.load(Ordering::SeqCst), served_at_kill);
    let m = h.metrics();
    assert!(
        m.contains(r#"netsel_tcp_proxy_ejections_total{service="kill"} "#),
        "{m}"
    );
    assert!(
        !m.contains(r#"netsel_tcp_proxy_ejections_total{service="kill"} 0"#),
        "{m}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    let h = start(|_| {}).await;
    // Client finishes first: the backend reads to EOF, then answers.
    let counter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let counter_addr = counter.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = counter.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("received {}\n", got.len()).as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    let (_c1, _) = h.register("counter", counter_addr, |c| c).await;
    let mut s = TcpStream::connect(h.gateway()).await.unwrap();
    s.write_all(b"counter\n0123456789").await.unwrap();
    s.write_all(&[b'z'; 100_000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "received 100010\n");

    // Backend finishes first: it says goodbye and half-closes, then still receives.
    let talker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let talker_addr = talker.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = talker.accept().await.unwrap();
        s.write_all(b"bye\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let _ = tx.send(got);
    });
    let (_c2, vip) = h.register("talker", talker_addr, |c| c).await;
    h.wait_vip("talker", vip).await;
    let mut s = TcpStream::connect(vip).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"bye\n");
    s.write_all(b"still talking").await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    assert_eq!(got, b"still talking");
    h.server.shutdown().await;
}

#[tokio::test]
async fn idle_relays_are_closed() {
    let h = start(|s| s.tcp_proxy.idle_timeout_secs = 1).await;
    let b = backend("idle").await;
    let (_c, _) = h.register("idle", b.addr, |c| c).await;
    let mut s = TcpStream::connect(h.gateway()).await.unwrap();
    s.write_all(b"idle\n").await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("idle relay closed")
        .unwrap();
    assert_eq!(out, b"idle\n");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_relays_and_stops_accepting() {
    let h = start(|s| s.drain_secs = 10).await;
    let b = backend("d").await;
    let (_c, _) = h.register("drain", b.addr, |c| c).await;
    let mut s = TcpStream::connect(h.gateway()).await.unwrap();
    s.write_all(b"drain\n").await.unwrap();
    let mut banner = [0u8; 2];
    s.read_exact(&mut banner).await.unwrap();
    let server = Arc::new(h.server);
    let stopping = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    // New connections are refused once the gateway has closed...
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(h.bound.tcp_proxy.unwrap()).await.is_ok() {
        assert!(Instant::now() < deadline, "gateway still accepting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...while the established relay still works, and shutdown waits for it.
    assert!(!stopping.is_finished());
    assert_eq!(exchange_after_banner(s).await, b"ping\n");
    assert!(tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap());
}

async fn exchange_after_banner(mut s: TcpStream) -> Vec<u8> {
    s.write_all(b"ping\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn drain_deadline_closes_what_is_left() {
    let h = start(|s| s.drain_secs = 1).await;
    let b = backend("d").await;
    let (_c, _) = h.register("stuck", b.addr, |c| c).await;
    let mut s = TcpStream::connect(h.gateway()).await.unwrap();
    s.write_all(b"stuck\n").await.unwrap();
    let mut banner = [0u8; 2];
    s.read_exact(&mut banner).await.unwrap();
    let started = Instant::now();
    assert!(
        h.server.shutdown().await,
        "the proxy finished within the deadline"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut out = Vec::new();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(r.is_err() || out.is_empty(), "relay closed: {r:?} {out:?}");
}

/// Connects `n` clients to `addr` at once (distinct source ports) and checks each gets the
/// backend's banner.
async fn burst(addr: SocketAddr, gateway_name: Option<&str>, n: usize, banner: &str) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let line = gateway_name.map(|name| format!("{name}\n"));
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            if let Some(line) = line {
                s.write_all(line.as_bytes()).await?;
            }
            exchange(s, b"").await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), banner);
    }
}

#[tokio::test]
async fn every_worker_accepts_on_its_own_sockets() {
    let h = start(|s| s.tcp_proxy.workers = 2).await;
    let b = backend("w").await;
    let (_c, vip) = h.register("spread", b.addr, |c| c).await;
    h.wait_vip("spread", vip).await;
    assert_eq!(h.proxy.accepted_per_worker(), vec![0, 0]);
    // The kernel spreads connections over the workers' SO_REUSEPORT sockets by source
    // port: 64 connections all landing on one of two sockets has odds of 2^-63.
    burst(vip, None, 64, "w").await;
    let per_worker = h.proxy.accepted_per_worker();
    assert_eq!(per_worker.iter().sum::<u64>(), 64, "{per_worker:?}");
    assert!(per_worker.iter().all(|n| *n > 0), "{per_worker:?}");
    // The gateway too.
    burst(h.gateway(), Some("spread"), 64, "w").await;
    let after = h.proxy.accepted_per_worker();
    assert_eq!(after.iter().sum::<u64>(), 128, "{after:?}");
    assert!(
        after.iter().zip(&per_worker).all(|(a, b)| a > b),
        "{per_worker:?} then {after:?}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_port_held_with_so_reuseport_by_another_socket_is_still_a_conflict() {
    // With several workers the proxy binds SO_REUSEPORT sockets; it must not silently
    // share an address that another program holds with SO_REUSEPORT too.
    let net = format!("127.{}.{}.0/30", fastrand::u8(128..=250), fastrand::u8(..));
    let h = start(|s| {
        s.network.vip_cidr = net.parse().unwrap();
        s.tcp_proxy.workers = 3;
    })
    .await;
    let base: IpAddr = net.split('/').next().unwrap().parse().unwrap();
    let IpAddr::V4(base) = base else {
        unreachable!()
    };
    let p = free_port().await;
    let mut blockers = Vec::new();
    for last in [1u8, 2] {
        let mut o = base.octets();
        o[3] = last;
        let addr = SocketAddr::from((o, p));
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(16).unwrap();
        blockers.push(s);
    }
    let b = backend("ok").await;
    let (_a, vip_a) = h.register("shared", b.addr, |c| c.service_port(p)).await;
    let deadline = Instant::now() + WAIT;
    while h.proxy.affected_services().is_empty() {
        assert!(Instant::now() < deadline, "bind conflict never reported");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let affected = h.proxy.affected_services();
    assert_eq!(affected.len(), 1);
    assert_eq!(affected[0].addr, vip_a);
    assert!(h.proxy.vip_listeners().is_empty());
    // Nothing of the proxy listens there: the blocker gets every connection.
    let _conn = TcpStream::connect(vip_a).await.unwrap();
    let blocker = std::net::TcpListener::from(blockers.remove(vip_a_index(&blockers, vip_a)));
    blocker.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    while blocker.accept().is_err() {
        assert!(
            Instant::now() < deadline,
            "the blocker did not get the connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.server.shutdown().await;
}

fn vip_a_index(blockers: &[socket2::Socket], vip: SocketAddr) -> usize {
    blockers
        .iter()
        .position(|s| s.local_addr().unwrap().as_socket() == Some(vip))
        .unwrap()
}

#[tokio::test]
async fn an_instance_that_resets_before_any_byte_is_skipped() {
    let h = start(|s| s.balance.eject_base_ms = 60_000).await;
    // Accepts and resets at once (SO_LINGER 0), like an instance dying with connections
    // in its accept queue.
    let resetter = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = resetter.local_addr().unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let counted = resets.clone();
    let reset_task = tokio::spawn(async move {
        while let Ok((s, _)) = resetter.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let good = backend("good").await;
    let (_r, vip) = h.register("flaky", reset_addr, |c| c).await;
    let (_g, _) = h.register("flaky", good.addr, |c| c).await;
    h.wait_vip("flaky", vip).await;
    for _ in 0..6 {
        let s = TcpStream::connect(vip).await.unwrap();
        assert_eq!(exchange(s, b"").await.unwrap(), "good");
    }
    assert!(
        resets.load(Ordering::SeqCst) >= 1,
        "the resetter was never tried"
    );
    let m = h.metrics();
    assert!(
        m.contains(r#"netsel_tcp_proxy_connections_total{service="flaky"} 6"#),
        "{m}"
    );
    assert!(
        !m.contains(r#"netsel_tcp_proxy_connect_failures_total{service="flaky"} 0"#),
        "{m}"
    );
    reset_task.abort();
    h.server.shutdown().await;
}
