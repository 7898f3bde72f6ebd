//! The DNS server in process, on port 0, asked by hickory-resolver and by raw UDP/TCP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use netsel::catalog::{Endpoint, Registration};
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

async fn start(tweak: impl FnOnce(&mut Settings)) -> (NetSelServer, SocketAddr) {
    let mut s = Settings::ephemeral();
    tweak(&mut s);
    let server = NetSelServer::with_settings(s);
    server.start().await.unwrap();
    let dns = server.bound().unwrap().dns.expect("dns is bound");
    (server, dns)
}

async fn register(server: &NetSelServer, name: &str, ep: &str) -> String {
    let reg = Registration::new(name, Endpoint::Explicit(ep.parse().unwrap()));
    server
        .catalog()
        .unwrap()
        .register(reg)
        .await
        .unwrap()
        .id
        .to_string()
}

fn vip(server: &NetSelServer, name: &str) -> IpAddr {
    server
        .catalog()
        .unwrap()
        .snapshot()
        .service(name)
        .unwrap()
        .vip
}

fn resolver(dns: SocketAddr, tcp_only: bool) -> Resolver<TokioRuntimeProvider> {
    let mut conns = Vec::new();
    if !tcp_only {
        let mut udp = ConnectionConfig::udp();
        udp.port = dns.port();
        conns.push(udp);
    }
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.port();
    conns.push(tcp);
    let config =
        ResolverConfig::from_name_servers(vec![NameServerConfig::new(dns.ip(), true, conns)]);
    let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    let opts = b.options_mut();
    opts.cache_size = 0;
    opts.attempts = 2;
    opts.timeout = Duration::from_secs(2);
    opts.edns0 = true;
    b.build().unwrap()
}

fn query(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

async fn udp_raw(dns: SocketAddr, q: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(q, dns).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    buf.truncate(n);
    buf
}

async fn udp(dns: SocketAddr, q: &[u8]) -> Message {
    Message::from_vec(&udp_raw(dns, q).await).unwrap()
}

async fn tcp(dns: SocketAddr, q: &[u8]) -> Message {
    let mut s = TcpStream::connect(dns).await.unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(q).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test]
async fn resolver_gets_a_srv_and_nxdomain_over_udp_and_tcp() {
    let (server, dns) = start(|_| {}).await;
    let id = register(&server, "web", "127.0.0.1:8000").await;
    register(&server, "web", "127.0.0.2:8001").await;
    for tcp_only in [false, true] {
        let r = resolver(dns, tcp_only);
        let a = r.lookup("web.netsel.", RecordType::A).await.unwrap();
        let ips: Vec<IpAddr> = a
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec![vip(&server, "web")], "tcp_only={tcp_only}");

        let srv = r
            .lookup("_web._tcp.netsel.", RecordType::SRV)
            .await
            .unwrap();
        let mut ports: Vec<u16> = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some(s.port),
                _ => None,
            })
            .collect();
        ports.sort();
        assert_eq!(ports, [8000, 8001]);

        let inst = r
            .lookup(format!("{id}.web.netsel.").as_str(), RecordType::A)
            .await
            .unwrap();
        assert!(matches!(&inst.answers()[0].data, RData::A(a) if a.0.to_string() == "127.0.0.1"));

        let err = r
            .lookup("missing.netsel.", RecordType::A)
            .await
            .unwrap_err();
        assert!(err.is_nx_domain(), "{err}");
        let soa = err.into_soa().expect("SOA in the authority section");
        assert_eq!(soa.data.minimum, 5);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn udp_and_tcp_share_the_address_and_flags_are_right() {
    let (server, dns) = start(|_| {}).await;
    register(&server, "web", "127.0.0.1:8000").await;
    let q = query(7, "web.netsel.", RecordType::A, None);
    for m in [udp(dns, &q).await, tcp(dns, &q).await] {
        assert_eq!(m.metadata.id, 7);
        assert!(m.metadata.authoritative);
        assert!(!m.metadata.recursion_available);
        assert_eq!(m.answers.len(), 1);
    }
    let m = udp(dns, &query(8, "example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    server.shutdown().await;
}

#[tokio::test]
async fn two_hundred_instances_truncate_over_udp_and_come_whole_over_tcp() {
    for fast_path in [true, false] {
        let (server, dns) = start(|s| s.dns.fast_path = fast_path).await;
        for i in 0..200u32 {
            let ep = format!("127.0.{}.{}:{}", i / 200 + 1, i % 200 + 1, 10000 + i);
            register(&server, "big", &ep).await;
        }
        let q = query(9, "_big._tcp.netsel.", RecordType::SRV, Some(1232));
        let raw = udp_raw(dns, &q).await;
        assert!(raw.len() <= 1232);
        let m = Message::from_vec(&raw).unwrap();
        assert!(m.metadata.truncation, "fast_path={fast_path}");
        assert!(m.edns.is_some(), "OPT echoed");
        let m = tcp(dns, &q).await;
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
        assert_eq!(m.additionals.len(), 200, "glue");
        // A real resolver retries over TCP and gets all 200.
        let srv = resolver(dns, false)
            .lookup("_big._tcp.netsel.", RecordType::SRV)
            .await
            .unwrap();
        assert_eq!(srv.answers().len(), 200);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn question_case_is_echoed_through_the_udp_cache() {
    let (server, dns) = start(|_| {}).await;
    register(&server, "web", "127.0.0.1:8000").await;
    // The second and third are answered from the first's cached bytes.
    for (id, name) in [
        (1u16, "WEB.netsel."),
        (2, "web.NETSEL."),
        (3, "wEb.nEtSeL."),
    ] {
        let m = udp(dns, &query(id, name, RecordType::A, Some(1232))).await;
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.queries[0].name().to_ascii(), name);
        assert_eq!(m.answers[0].name.to_ascii(), name);
        assert!(
            matches!(&m.answers[0].data, RData::A(a) if IpAddr::V4(a.0) == vip(&server, "web"))
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn answers_follow_registrations_and_deregistrations_at_once() {
    let (server, dns) = start(|_| {}).await;
    let catalog = server.catalog().unwrap();
    let q = query(1, "fresh.netsel.", RecordType::A, None);
    for round in 0..20 {
        assert_eq!(
            udp(dns, &q).await.metadata.response_code,
            ResponseCode::NXDomain,
            "{round}"
        );
        let id = register(&server, "fresh", "127.0.0.1:8000").await;
        // The very next query sees it: no cache between the catalog and the answer.
        let m = udp(dns, &q).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{round}");
        assert_eq!(m.answers.len(), 1);
        catalog.deregister_admin(&id).await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_leaves_dns_within_milliseconds() {
    let (server, dns) = start(|_| {}).await;
    let mut reg = Registration::new(
        "brief",
        Endpoint::Explicit("127.0.0.1:8000".parse().unwrap()),
    );
    reg.ttl = Some(Duration::from_secs(1));
    let registered = server.catalog().unwrap().register(reg).await.unwrap();
    let deadline = tokio::time::Instant::now() + registered.ttl;
    let q = query(1, "brief.netsel.", RecordType::A, None);
    assert_eq!(udp(dns, &q).await.answers.len(), 1);
    // Poll (answers come from the UDP cache between changes) until it is gone.
    let gone = loop {
        let m = udp(dns, &q).await;
        if m.metadata.response_code == ResponseCode::NXDomain {
            break tokio::time::Instant::now();
        }
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(3),
            "never expired"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        gone >= deadline - Duration::from_millis(50),
        "gone before its lease ran out"
    );
    let late = gone.saturating_duration_since(deadline);
    assert!(
        late < Duration::from_millis(250),
        "gone {late:?} after the deadline"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_queries_do_not_stop_the_server() {
    let (server, dns) = start(|_| {}).await;
    register(&server, "web", "127.0.0.1:8000").await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3f",
    ] {
        sock.send_to(junk, dns).await.unwrap();
    }
    let m = udp(dns, &query(5, "web.netsel.", RecordType::A, None)).await;
    assert_eq!(m.answers.len(), 1);
    // A truncated question gets FORMERR.
    let raw = udp_raw(
        dns,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web",
    )
    .await;
    assert_eq!(raw[3] & 0x0f, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_count_queries_by_type_and_rcode() {
    let (server, dns) = start(|_| {}).await;
    register(&server, "web", "127.0.0.1:8000").await;
    udp(dns, &query(1, "web.netsel.", RecordType::A, None)).await;
    udp(dns, &query(2, "web.netsel.", RecordType::A, None)).await;
    udp(dns, &query(3, "nope.netsel.", RecordType::SRV, None)).await;
    tcp(dns, &query(4, "web.netsel.", RecordType::A, None)).await;
    let text = server.metrics().unwrap().encode();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with("netsel_dns_queries_total") && l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(line(r#"qtype="A",rcode="NOERROR""#), "3");
    assert_eq!(line(r#"qtype="SRV",rcode="NXDOMAIN""#), "1");
    server.shutdown().await;
}

#[tokio::test]
async fn forwarding_to_configured_upstreams_sets_ra() {
    // Upstream: another NetSel, authoritative for netsel.
    let (upstream, up_dns) = start(|_| {}).await;
    register(&upstream, "far", "127.0.0.9:9000").await;
    // Front: authoritative for "near.", forwarding everything else to the upstream.
    let (front, dns) = start(|s| {
        s.dns.domain = "near.".into();
        s.dns.upstreams = vec![up_dns];
    })
    .await;
    register(&front, "web", "127.0.0.1:8000").await;

    let m = udp(dns, &query(11, "far.netsel.", RecordType::A, None)).await;
    assert_eq!(m.metadata.id, 11);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&m.answers[0].data, RData::A(a) if IpAddr::V4(a.0) == vip(&upstream, "far")));
    // Over TCP too (hickory's path).
    let m = tcp(dns, &query(12, "far.netsel.", RecordType::A, None)).await;
    assert_eq!(m.answers.len(), 1);
    // The upstream's OPT is passed on over UDP (the fast path relays its bytes) and over
    // TCP (hickory's path rebuilds the message), with the query's DO bit.
    for dnssec_ok in [false, true] {
        let mut m =
            Message::from_vec(&query(15, "far.netsel.", RecordType::A, Some(1232))).unwrap();
        let mut e = m.edns.clone().unwrap();
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
        let q = m.to_vec().unwrap();
        for (path, r) in [("udp", udp(dns, &q).await), ("tcp", tcp(dns, &q).await)] {
            assert_eq!(r.answers.len(), 1, "{path}");
            let opt = r.edns.as_ref().unwrap_or_else(|| panic!("{path}: no OPT"));
            assert_eq!(opt.flags().dnssec_ok, dnssec_ok, "{path}");
        }
    }
    // Own names are still answered locally, now with RA set.
    let m = udp(dns, &query(13, "web.near.", RecordType::A, None)).await;
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_available);
    // What the upstream refuses comes back refused.
    let m = udp(dns, &query(14, "example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    front.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_port() {
    let (server, dns) = start(|_| {}).await;
    assert!(server.shutdown().await, "drained in time");
    // Both sockets are free again.
    std::net::UdpSocket::bind(dns).unwrap();
    std::net::TcpListener::bind(dns).unwrap();
}
