//! The registry over real sockets: the seed client byte for byte, the extended protocol,
//! expiry, re-registration after a restart, ownership, limits and every bad input.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{Line, eventually, settings, start};
use netsel::client::{ClientError, ServiceClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn resolve_count(addr: SocketAddr, name: &str) -> Option<usize> {
    let client = ServiceClient::builder("probe").registry(addr).build();
    client.resolve(name).await.ok().map(|r| r.instances.len())
}

#[tokio::test]
async fn seed_client_registers_and_heartbeats() {
    let s = settings(60);
    let pool = s.network.vip_cidr;
    let (server, addr) = start(s).await;
    let mut client = ServiceClient::new(addr, "my-service".to_string());
    assert!(!client.is_registered());
    assert_eq!(client.get_assigned_addr(), None);
    let (ip, port) = client.register().await.unwrap();
    assert!(pool.contains(&ip), "{ip} not in {pool}");
    assert!((20000..=29999).contains(&port));
    assert!(client.is_registered());
    assert_eq!(client.get_assigned_addr(), Some(SocketAddr::new(ip, port)));
    let heartbeat_client = client.clone();
    heartbeat_client.send_heartbeat().await.unwrap();
    assert!(heartbeat_client.is_registered());
    // Registering again from the same address returns the same assignment.
    let mut again = ServiceClient::new(addr, "my-service".to_string());
    assert_eq!(again.register().await.unwrap(), (ip, port));
    let r = client.resolve("my-service").await.unwrap();
    assert_eq!(r.vip, ip);
    assert_eq!(r.instances.len(), 1);
    assert_eq!(
        r.instances[0].endpoint,
        SocketAddr::from(([127, 0, 0, 1], port))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn seed_bytes_in_pieces_get_byte_exact_answers() {
    let (server, addr) = start(settings(60)).await;
    let mut frame = vec![0u8; 256];
    frame[..7].copy_from_slice(b"pieces1");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    // TCP may deliver the frame in pieces: send it in three, with pauses.
    for part in [&frame[..3], &frame[3..100], &frame[100..]] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    let answer = &buf[..n];
    assert!(answer.starts_with(b"SUCCESS|127."), "{answer:?}");
    assert!(answer.ends_with(b"|60\0"), "{answer:?}");
    assert_eq!(answer.iter().filter(|b| **b == b'|').count(), 3);
    // The seed heartbeat: its own connection, 256 bytes, a bare answer.
    let mut hb = vec![0u8; 256];
    hb[..17].copy_from_slice(b"HEARTBEAT|pieces1");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hb).await.unwrap();
    // The server keeps the connection open for more: read exactly the answer.
    let mut got = [0u8; 12];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HEARTBEAT_OK");
    server.shutdown().await;
}

#[tokio::test]
async fn seed_frame_without_padding_is_answered() {
    let (server, addr) = start(settings(60)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"nopad\0").await.unwrap();
    let mut buf = [0u8; 128];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("answered after the short padding wait")
        .unwrap();
    assert!(buf[..n].starts_with(b"SUCCESS|"), "{:?}", &buf[..n]);
    server.shutdown().await;
}

#[tokio::test]
async fn extended_register_heartbeat_resolve_deregister() {
    let (server, addr) = start(settings(60)).await;
    let mut client = ServiceClient::builder("web")
        .registry(addr)
        .endpoint("127.0.0.1:18001".parse().unwrap())
        .tag("v1")
        .meta("zone", "a|b=c")
        .weight(3)
        .ttl(Duration::from_secs(30))
        .service_port(80)
        .build();
    let (vip, port) = client.register().await.unwrap();
    assert_eq!(port, 80);
    assert!(client.instance_id().is_some());
    client.send_heartbeat().await.unwrap();
    let r = client.resolve("WEB").await.unwrap();
    assert_eq!((r.name.as_str(), r.vip, r.service_port), ("web", vip, 80));
    assert_eq!(r.instances.len(), 1);
    assert_eq!(r.instances[0].weight, 3);
    let snap = server.catalog().unwrap().snapshot();
    let inst = snap.service("web").unwrap().instances[0].clone();
    assert_eq!(inst.tags, ["v1"]);
    assert_eq!(inst.meta["zone"], "a|b=c");
    assert_eq!(inst.ttl, Duration::from_secs(30));
    client.deregister().await.unwrap();
    assert!(matches!(
        client.resolve("web").await,
        Err(ClientError::UnknownService(_))
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn instance_expires_after_max_heartbeat_age() {
    let (server, addr) = start(settings(1)).await;
    let mut client = ServiceClient::new(addr, "short-lived".to_string());
    client.register().await.unwrap();
    let registered = tokio::time::Instant::now();
    assert_eq!(resolve_count(addr, "short-lived").await, Some(1));
    assert!(
        eventually(Duration::from_secs(3), || async {
            resolve_count(addr, "short-lived").await.is_none()
        })
        .await,
        "expired"
    );
    let took = registered.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "expired too early: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(1500),
        "expired too late: {took:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn heartbeat_handle_keeps_alive_and_reregisters_after_registry_restart() {
    let s = settings(1);
    let (server, addr) = start(s.clone()).await;
    let mut client = ServiceClient::builder("phoenix")
        .registry(addr)
        .endpoint("127.0.0.1:18002".parse().unwrap())
        .heartbeat_interval(Duration::from_millis(200))
        .build();
    let (vip, _) = client.register().await.unwrap();
    let first_id = client.instance_id().unwrap();
    let handle = client.start_heartbeats();
    // Kept alive past the TTL: the lease is renewed after the first one would have ended
    // (a deadline 1.5 s past the first means a heartbeat 0.5 s after it).
    let catalog = server.catalog().unwrap();
    let lease = |c: &netsel::catalog::Catalog| {
        c.snapshot()
            .instance(first_id.as_str())
            .map(|i| i.lease().deadline_ms())
    };
    let first = lease(&catalog).expect("registered");
    assert!(
        eventually(Duration::from_secs(10), || {
            let now = lease(&catalog);
            async move { now.is_some_and(|d| d > first + 1500) }
        })
        .await,
        "kept alive past the TTL"
    );
    assert_eq!(resolve_count(addr, "phoenix").await, Some(1));

    // The registry restarts with no state, on the same address.
    server.shutdown().await;
    let mut s2 = s.clone();
    s2.config.registry_addr = addr;
    let (server2, _) = start(s2).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            resolve_count(addr, "phoenix").await == Some(1)
        })
        .await,
        "re-registered with the new registry"
    );
    // The registry can answer a resolve before the client has read its REGISTERED reply
    // and stored the new id: wait for that, too.
    assert!(
        eventually(Duration::from_secs(5), || {
            let id = client.instance_id();
            let first = first_id.clone();
            async move { id.is_some_and(|id| id != first) }
        })
        .await,
        "the client took the new registry's instance id"
    );
    // The name hashes to the same place in the pool: the VIP is the same again.
    assert_eq!(client.resolve("phoenix").await.unwrap().vip, vip);

    // Shutting the handle down deregisters.
    handle.shutdown().await.unwrap();
    assert_eq!(resolve_count(addr, "phoenix").await, None);
    server2.shutdown().await;
}

#[tokio::test]
async fn seed_client_reregisters_with_its_old_port() {
    let s = settings(60);
    let (server, addr) = start(s.clone()).await;
    let mut client = ServiceClient::new(addr, "seedy".to_string());
    let (_, port) = client.register().await.unwrap();
    server.shutdown().await;
    let mut s2 = s;
    s2.config.registry_addr = addr;
    let (server2, _) = start(s2).await;
    // Move the fresh registry's next-fit cursor past the old port, leaving it free, so
    // only the client's port hint can bring it back.
    let mut filler = Line::connect(addr).await;
    let reg = filler.ask("REGISTER|filler").await;
    let f: Vec<&str> = reg.split('|').collect();
    assert_eq!(f[5], format!("127.0.0.1:{port}"));
    assert_eq!(
        filler.ask(&format!("DEREGISTER|{}|{}", f[1], f[2])).await,
        "OK"
    );
    client.send_heartbeat().await.unwrap();
    let r = client.resolve("seedy").await.unwrap();
    assert_eq!(r.instances[0].endpoint.port(), port);
    server2.shutdown().await;
}

#[tokio::test]
async fn dropping_the_heartbeat_handle_deregisters() {
    let (server, addr) = start(settings(60)).await;
    let mut client = ServiceClient::builder("dropme")
        .registry(addr)
        .endpoint("127.0.0.1:18003".parse().unwrap())
        .build();
    client.register().await.unwrap();
    drop(client.start_heartbeats());
    assert!(
        eventually(Duration::from_secs(3), || async {
            resolve_count(addr, "dropme").await.is_none()
        })
        .await
    );
    server.shutdown().await;
}

#[tokio::test]
async fn client_fails_over_to_the_next_registry() {
    let (server, addr) = start(settings(60)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut client = ServiceClient::builder("failover")
        .registry(dead)
        .registry(addr)
        .endpoint("127.0.0.1:18004".parse().unwrap())
        .build();
    client.register().await.unwrap();
    client.send_heartbeat().await.unwrap();
    server.shutdown().await;
}

async fn connect_from(src: [u8; 4], addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::from(src), 0)).unwrap();
    sock.connect(addr).await.unwrap()
}

#[tokio::test]
async fn seed_heartbeat_only_from_the_registering_address() {
    let (server, addr) = start(settings(60)).await;
    let mut owner = ServiceClient::new(addr, "owned".to_string());
    owner.register().await.unwrap();
    for (src, want) in [
        ([127, 0, 0, 2], &b"HEARTBEAT_FAILED"[..]),
        ([127, 0, 0, 1], &b"HEARTBEAT_OK"[..]),
    ] {
        let mut s = connect_from(src, addr).await;
        s.write_all(&netsel::protocol::seed_frame("HEARTBEAT|owned"))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], want, "from {src:?}");
    }
    // The other address registering the same name adds a second instance.
    let mut s = connect_from([127, 0, 0, 2], addr).await;
    s.write_all(&netsel::protocol::seed_frame("owned"))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"SUCCESS|"));
    assert_eq!(resolve_count(addr, "owned").await, Some(2));
    server.shutdown().await;
}

#[tokio::test]
async fn every_bad_input_gets_failed_and_the_connection_survives() {
    let (server, addr) = start(settings(60)).await;
    let mut line = Line::connect(addr).await;
    let cases = [
        ("", "empty request"),
        ("FROB", "unknown command"),
        ("PING|x", "PING takes"),
        ("REGISTER", "REGISTER takes"),
        ("REGISTER||-", "service name is empty"),
        ("REGISTER|bad_name|-", "may only contain"),
        ("REGISTER|-web|-", "may not start or end"),
        (&format!("REGISTER|{}|-", "a".repeat(64)), "longer than 63"),
        ("REGISTER|web|nohost", "not IP:PORT"),
        ("REGISTER|web|0.0.0.0:80", "invalid endpoint"),
        ("REGISTER|web|127.0.0.1:0", "invalid endpoint"),
        ("REGISTER|web|-|ttl=0", "option 'ttl'"),
        ("REGISTER|web|-|ttl=100000", "invalid ttl"),
        ("REGISTER|web|-|ttl=10ms", "invalid ttl"),
        ("REGISTER|web|-|weight=0", "option 'weight'"),
        ("REGISTER|web|-|frob=1", "unknown option"),
        ("REGISTER|web|-|tag", "not key=value"),
        ("REGISTER|web|-|tag=%G0", "percent-escape"),
        ("HEARTBEAT", "HEARTBEAT takes"),
        ("HEARTBEAT|nope|secret", "unknown instance"),
        ("HEARTBEAT|a|b|c", "HEARTBEAT takes"),
        ("DEREGISTER|nope|secret", "unknown instance"),
        ("DEREGISTER|x", "DEREGISTER takes"),
        ("RESOLVE|", "service name is empty"),
        ("RESOLVE|nope", "unknown service nope"),
        ("PI\tNG", "control character"),
    ];
    for (input, want) in cases {
        let answer = line.ask(input).await;
        assert!(
            answer.starts_with("FAILED|") && answer.contains(want),
            "{input:?} -> {answer:?} (wanted {want:?})"
        );
    }
    // Wrong secret for a real instance.
    let reg = line.ask("REGISTER|web|127.0.0.1:18005").await;
    let id = reg.split('|').nth(1).unwrap().to_string();
    let answer = line.ask(&format!("HEARTBEAT|{id}|wrong")).await;
    assert!(answer.starts_with("FAILED|wrong secret"), "{answer}");
    let answer = line.ask(&format!("DEREGISTER|{id}|wrong")).await;
    assert!(answer.starts_with("FAILED|wrong secret"), "{answer}");
    // Not UTF-8.
    line.stream
        .get_mut()
        .write_all(b"PI\xffNG\n")
        .await
        .unwrap();
    assert_eq!(line.read_line().await, "FAILED|request is not valid UTF-8");
    // Still alive.
    assert_eq!(line.ask("PING").await, "PONG");
    // A seed HEARTBEAT_FAILED for an unknown name; a seed frame with junk after padding.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&netsel::protocol::seed_frame("HEARTBEAT|ghost"))
        .await
        .unwrap();
    let mut frame = netsel::protocol::seed_frame("web");
    frame[200] = b'x';
    s.write_all(&frame).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\0") {
        let mut buf = [0u8; 128];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        got,
        b"HEARTBEAT_FAILEDFAILED|seed frame has data after its NUL padding\0"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (server, addr) = start(settings(60)).await;
    let mut line = Line::connect(addr).await;
    line.stream
        .get_mut()
        .write_all(b"PING\nRESOLVE|nope\r\nPING\n")
        .await
        .unwrap();
    assert_eq!(line.read_line().await, "PONG");
    assert_eq!(line.read_line().await, "FAILED|unknown service nope");
    assert_eq!(line.read_line().await, "PONG");
    server.shutdown().await;
}

#[tokio::test]
async fn limits_frame_size_timeouts_and_connection_cap() {
    let mut s = settings(60);
    s.registry.frame_timeout_secs = 1;
    s.registry.idle_timeout_secs = 1;
    s.registry.max_connections = 2;
    let (server, addr) = start(s).await;

    // Too long: answered, then closed.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&vec![b'A'; 9000]).await.ok();
    let mut got = String::new();
    c.read_to_string(&mut got).await.ok();
    assert_eq!(got, "FAILED|request longer than 8192 bytes\n");

    // Half a request, then nothing: timed out.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"PIN").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(3), c.read_to_string(&mut got))
        .await
        .unwrap()
        .ok();
    assert_eq!(
        got,
        "FAILED|timed out waiting for the rest of the request\n"
    );

    // Idle: closed quietly.
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);

    // The cap: two held connections, the third is refused.
    let mut a = Line::connect(addr).await;
    let mut b = Line::connect(addr).await;
    assert_eq!(a.ask("PING").await, "PONG");
    assert_eq!(b.ask("PING").await, "PONG");
    let mut third = Line::connect(addr).await;
    assert_eq!(third.read_line().await, "FAILED|too many connections");
    drop((a, b));
    server.shutdown().await;
}

#[tokio::test]
async fn registrations_are_rate_limited_per_peer() {
    let mut s = settings(60);
    s.registry.register_rate_per_ip = 1;
    s.registry.register_burst_per_ip = 3;
    s.registry.rate_limit_exempt_loopback = false;
    let (server, addr) = start(s).await;
    let mut line = Line::connect(addr).await;
    let answers: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(
                line.ask(&format!("REGISTER|rl|127.0.0.1:{}", 18100 + i))
                    .await,
            );
        }
        v
    };
    assert!(
        answers[..3].iter().all(|a| a.starts_with("REGISTERED|")),
        "{answers:?}"
    );
    assert!(
        answers[3..]
            .iter()
            .all(|a| a.starts_with("FAILED|rate limited")),
        "{answers:?}"
    );
    // Heartbeats are not limited.
    let f: Vec<&str> = answers[0].split('|').collect();
    assert_eq!(
        line.ask(&format!("HEARTBEAT|{}|{}", f[1], f[2])).await,
        "HEARTBEAT_OK"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_instances_from_a_hundred_clients() {
    let mut s = settings(600);
    s.network.vip_cidr = format!("127.{}.0.0/16", fastrand::u8(1..=250))
        .parse()
        .unwrap();
    let (server, addr) = start(s).await;
    let mut tasks = Vec::new();
    for c in 0..100u32 {
        tasks.push(tokio::spawn(async move {
            let mut line = Line::connect(addr).await;
            let mut creds = Vec::new();
            for i in 0..100u32 {
                let port = 10_000 + c * 100 + i;
                let answer = line
                    .ask(&format!(
                        "REGISTER|svc-{}|127.0.0.1:{port}|tag=load",
                        c % 50
                    ))
                    .await;
                assert!(answer.starts_with("REGISTERED|"), "{answer}");
                let f: Vec<&str> = answer.split('|').collect();
                creds.push((f[1].to_string(), f[2].to_string()));
            }
            for (id, secret) in &creds {
                assert_eq!(
                    line.ask(&format!("HEARTBEAT|{id}|{secret}")).await,
                    "HEARTBEAT_OK"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = server.catalog().unwrap().snapshot();
    assert_eq!(snap.instance_count(), 10_000);
    assert_eq!(snap.service_count(), 50);
    let vips: std::collections::HashSet<_> = snap.services().map(|s| s.vip).collect();
    assert_eq!(vips.len(), 50);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let (server, addr) = start(settings(60)).await;
    let mut idle = Line::connect(addr).await;
    assert_eq!(idle.ask("PING").await, "PONG");
    assert!(server.shutdown().await, "drained within the deadline");
    assert!(TcpStream::connect(addr).await.is_err());
}

fn acl_settings(trusted: &[&str]) -> netsel::Settings {
    let mut s = settings(60);
    s.acl = netsel::config::AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![
            netsel::config::AclToken {
                name: "web-deployer".into(),
                token: "t-web-0123456789abcdef".into(),
                read: vec![],
                write: vec!["web".into()],
            },
            netsel::config::AclToken {
                name: "reader".into(),
                token: "t-read-0123456789abcdef".into(),
                read: vec!["*".into()],
                write: vec![],
            },
        ],
        trusted_cidrs: trusted.iter().map(|c| c.parse().unwrap()).collect(),
    };
    s
}

/// With `[acl]` on, the line protocol asks for the same rights as the API: a `token=`
/// option or an `AUTH` line to register, read rights to resolve; an unknown token is
/// refused; heartbeats and deregistrations stay with the instance secret.
#[tokio::test]
async fn acl_on_the_line_protocol_needs_a_token_like_the_api() {
    let (server, addr) = start(acl_settings(&["127.0.0.0/8"])).await;
    let mut line = Line::connect(addr).await;
    let refused = line.ask("REGISTER|web|127.0.0.1:39999").await;
    assert!(
        refused.starts_with("FAILED|an ACL token is required to register web")
            && refused.contains("token="),
        "{refused}"
    );
    let bad = line
        .ask("REGISTER|web|127.0.0.1:39999|token=t-web-0123456789abcdeX")
        .await;
    assert_eq!(bad, "FAILED|unknown ACL token");
    let other = line
        .ask("REGISTER|api|127.0.0.1:39998|token=t-web-0123456789abcdef")
        .await;
    assert_eq!(other, "FAILED|permission denied: register api");
    let ok = line
        .ask("REGISTER|web|127.0.0.1:39999|token=t-web-0123456789abcdef")
        .await;
    assert!(ok.starts_with("REGISTERED|"), "{ok}");
    let f: Vec<&str> = ok.split('|').collect();
    // The secret alone renews and removes, as on the API.
    assert_eq!(
        line.ask(&format!("HEARTBEAT|{}|{}", f[1], f[2])).await,
        "HEARTBEAT_OK"
    );
    // Reading needs read rights.
    let unread = line.ask("RESOLVE|web").await;
    assert!(
        unread.starts_with("FAILED|an ACL token is required to read web"),
        "{unread}"
    );
    assert_eq!(line.ask("AUTH|nope").await, "FAILED|unknown ACL token");
    assert_eq!(line.ask("AUTH|t-read-0123456789abcdef").await, "OK");
    assert!(line.ask("RESOLVE|web").await.starts_with("RESOLVED|web|"));
    // The reader may not register; AUTH as the deployer and it may, without token=.
    let denied = line.ask("REGISTER|web|127.0.0.1:39997").await;
    assert_eq!(denied, "FAILED|permission denied: register web");
    assert_eq!(line.ask("AUTH|t-web-0123456789abcdef").await, "OK");
    assert!(
        line.ask("REGISTER|web|127.0.0.1:39997")
            .await
            .starts_with("REGISTERED|")
    );
    assert_eq!(
        line.ask(&format!("DEREGISTER|{}|{}", f[1], f[2])).await,
        "OK"
    );
    // The client library carries the token.
    let mut client = ServiceClient::builder("web-2")
        .registry(addr)
        .endpoint("127.0.0.1:39996".parse().unwrap())
        .token("t-web-0123456789abcdef")
        .build();
    client.register().await.unwrap();
    let mut anonymous = ServiceClient::builder("web-3")
        .registry(addr)
        .endpoint("127.0.0.1:39995".parse().unwrap())
        .build();
    assert!(
        matches!(anonymous.register().await, Err(ClientError::Rejected(r)) if r.contains("ACL token"))
    );
    server.shutdown().await;
}

/// Seed-form frames carry no token: with ACLs on they are accepted from
/// `[acl] trusted_cidrs` (loopback by default) and refused elsewhere, naming the setting.
#[tokio::test]
async fn acl_on_seed_frames_only_from_trusted_addresses() {
    let (server, addr) = start(acl_settings(&["127.0.0.0/8", "::1/128"])).await;
    let mut trusted = ServiceClient::new(addr, "legacy".to_string());
    trusted.register().await.unwrap();
    trusted.send_heartbeat().await.unwrap();
    server.shutdown().await;

    let (server, addr) = start(acl_settings(&["192.0.2.0/24"])).await;
    let mut untrusted = ServiceClient::new(addr, "legacy".to_string());
    match untrusted.register().await {
        Err(ClientError::Rejected(reason)) => {
            assert!(reason.contains("[acl] trusted_cidrs"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&netsel::protocol::seed_frame("HEARTBEAT|legacy"))
        .await
        .unwrap();
    let mut answer = [0u8; 16];
    let n = s.read(&mut answer).await.unwrap();
    assert_eq!(&answer[..n], b"HEARTBEAT_FAILED");
    server.shutdown().await;
}
