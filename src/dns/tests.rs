//! Unit tests of the handler: raw queries in, parsed responses out, no sockets.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler};

use super::*;
use crate::catalog::{Catalog, Endpoint, Registration};
use crate::config::Settings;

fn settings() -> Settings {
    Settings::ephemeral()
}

fn handler_with(s: &Settings) -> DnsHandler {
    let mut cs = s.catalog_settings();
    cs.probe_vip_bind = false;
    let catalog = Catalog::in_memory(cs).unwrap();
    DnsHandler::new(catalog, &s.dns, s.network.vip_cidr, DnsMetrics::default()).unwrap()
}

fn handler() -> DnsHandler {
    handler_with(&settings())
}

async fn register(h: &DnsHandler, name: &str, ep: &str, meta: &[(&str, &str)]) -> String {
    let mut reg = Registration::new(name, Endpoint::Explicit(ep.parse().unwrap()));
    reg.weight = Some(7);
    for (k, v) in meta {
        reg.meta.insert(k.to_string(), v.to_string());
    }
    h.catalog().register(reg).await.unwrap().id.to_string()
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn ask_raw(h: &DnsHandler, raw: &[u8], udp: bool) -> Option<Vec<u8>> {
    match h.respond_raw(raw, udp) {
        RawAnswer::Reply { bytes, .. } => Some(bytes),
        RawAnswer::Forward => panic!("unexpected forward"),
        RawAnswer::Drop => None,
    }
}

fn ask(h: &DnsHandler, m: &Message) -> Message {
    let bytes = ask_raw(h, &m.to_vec().unwrap(), true).expect("an answer");
    Message::from_vec(&bytes).unwrap()
}

fn vip_of(h: &DnsHandler, name: &str) -> IpAddr {
    h.catalog().snapshot().service(name).unwrap().vip
}

#[tokio::test]
async fn a_record_is_the_vip_with_aa_and_no_ra() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("web.netsel.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(!r.metadata.recursion_available);
    assert!(r.metadata.recursion_desired, "RD is copied");
    assert_eq!(r.metadata.id, 0x4242);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].ttl, 5);
    match &r.answers[0].data {
        RData::A(a) => assert_eq!(IpAddr::V4(a.0), vip_of(&h, "web")),
        other => panic!("{other:?}"),
    }
    // No OPT in the query, none in the answer.
    assert!(r.edns.is_none());
}

#[tokio::test]
async fn case_is_echoed() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("wEb.NetSel.", RecordType::A));
    assert_eq!(r.queries[0].name().to_ascii(), "wEb.NetSel.");
    assert_eq!(r.answers[0].name.to_ascii(), "wEb.NetSel.");
}

#[tokio::test]
async fn srv_per_healthy_instance_with_glue() {
    let h = handler();
    let a = register(&h, "api", "127.0.0.1:8001", &[]).await;
    let b = register(&h, "api", "127.0.0.2:8002", &[]).await;
    let r = ask(&h, &query("_api._tcp.netsel.", RecordType::SRV));
    assert_eq!(r.answers.len(), 2);
    let mut targets = Vec::new();
    for rec in &r.answers {
        let RData::SRV(srv) = &rec.data else { panic!() };
        assert_eq!(srv.weight, 7);
        targets.push((srv.target.to_ascii(), srv.port));
    }
    targets.sort();
    let mut want = vec![
        (format!("{a}.api.netsel."), 8001),
        (format!("{b}.api.netsel."), 8002),
    ];
    want.sort();
    assert_eq!(targets, want);
    assert_eq!(r.additionals.len(), 2, "glue for each target");
    // The target names resolve to the instance address.
    let r = ask(&h, &query(&format!("{a}.api.netsel."), RecordType::A));
    let RData::A(ip) = &r.answers[0].data else {
        panic!()
    };
    assert_eq!(ip.0.to_string(), "127.0.0.1");
}

#[tokio::test]
async fn nxdomain_and_nodata_carry_the_soa() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    for (name, qtype, code) in [
        ("nope.netsel.", RecordType::A, ResponseCode::NXDomain),
        ("web.netsel.", RecordType::MX, ResponseCode::NoError),
        ("web.netsel.", RecordType::AAAA, ResponseCode::NoError),
        ("a.b.c.netsel.", RecordType::A, ResponseCode::NXDomain),
        (
            "_nope._tcp.netsel.",
            RecordType::SRV,
            ResponseCode::NXDomain,
        ),
    ] {
        let r = ask(&h, &query(name, qtype));
        assert_eq!(r.metadata.response_code, code, "{name} {qtype}");
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities.len(), 1, "{name}");
        let RData::SOA(soa) = &r.authorities[0].data else {
            panic!()
        };
        assert_eq!(soa.minimum, 5, "SOA minimum is the negative TTL");
        assert_eq!(r.authorities[0].name.to_ascii(), "netsel.");
    }
}

#[tokio::test]
async fn negative_ttl_is_configurable() {
    let mut s = settings();
    s.dns.negative_ttl_secs = 42;
    s.dns.ttl_secs = 9;
    let h = handler_with(&s);
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("nope.netsel.", RecordType::A));
    let RData::SOA(soa) = &r.authorities[0].data else {
        panic!()
    };
    assert_eq!(soa.minimum, 42);
    assert_eq!(r.authorities[0].ttl, 42);
    let r = ask(&h, &query("web.netsel.", RecordType::A));
    assert_eq!(r.answers[0].ttl, 9);
}

#[tokio::test]
async fn out_of_zone_is_refused() {
    let h = handler();
    let r = ask(&h, &query("example.com.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(!r.metadata.authoritative);
    assert!(r.answers.is_empty());
    // A bare name is refused too unless bare_names is on.
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("web.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn bare_names_when_configured() {
    let mut s = settings();
    s.dns.bare_names = true;
    let h = handler_with(&s);
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("web.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    let r = ask(&h, &query("other.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn other_domain_setting() {
    let mut s = settings();
    s.dns.domain = "Svc.Example".into();
    let h = handler_with(&s);
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("web.svc.example.", RecordType::A));
    assert_eq!(r.answers.len(), 1);
    let r = ask(&h, &query("web.netsel.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn ptr_for_vips() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let IpAddr::V4(vip) = vip_of(&h, "web") else {
        panic!()
    };
    let o = vip.octets();
    let name = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
    let r = ask(&h, &query(&name, RecordType::PTR));
    assert!(r.metadata.authoritative);
    let RData::PTR(ptr) = &r.answers[0].data else {
        panic!()
    };
    assert_eq!(ptr.0.to_ascii(), "web.netsel.");
    // A VIP nobody holds: NXDOMAIN with the reverse zone's SOA.
    let r = ask(&h, &query("254.254.77.127.in-addr.arpa.", RecordType::PTR));
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities[0].name.to_ascii(), "77.127.in-addr.arpa.");
    // Outside the pool: not ours.
    let r = ask(&h, &query("1.0.0.10.in-addr.arpa.", RecordType::PTR));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn txt_is_metadata() {
    let h = handler();
    let id = register(&h, "web", "127.0.0.1:8000", &[("env", "prod"), ("v", "2")]).await;
    register(
        &h,
        "web",
        "127.0.0.2:8000",
        &[("env", "prod"), ("zone", "b")],
    )
    .await;
    let r = ask(&h, &query("web.netsel.", RecordType::TXT));
    let RData::TXT(txt) = &r.answers[0].data else {
        panic!()
    };
    let strings: Vec<String> = txt
        .txt_data
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(strings, ["env=prod", "v=2", "zone=b"]);
    let r = ask(&h, &query(&format!("{id}.web.netsel."), RecordType::TXT));
    let RData::TXT(txt) = &r.answers[0].data else {
        panic!()
    };
    assert_eq!(txt.txt_data.len(), 2);
}

#[tokio::test]
async fn edns_is_echoed_and_badvers() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let mut m = query("web.netsel.", RecordType::A);
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.set_edns(e);
    let r = ask(&h, &m);
    let opt = r.edns.as_ref().expect("OPT echoed");
    assert_eq!(opt.max_payload(), MAX_UDP_PAYLOAD);
    assert_eq!(opt.version(), 0);
    assert_eq!(r.answers.len(), 1);

    let mut m = query("web.netsel.", RecordType::A);
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let r = ask(&h, &m);
    // BADVERS and BADSIG share code 16; the parser names it BADSIG.
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(r.edns.as_ref().unwrap().version(), 0);
    assert!(r.answers.is_empty());
}

#[tokio::test]
async fn big_answers_truncate_over_udp_only() {
    let h = handler();
    for i in 0..60u16 {
        register(&h, "big", &format!("127.0.1.{}:{}", i + 1, 9000 + i), &[]).await;
    }
    let raw = query("_big._tcp.netsel.", RecordType::SRV)
        .to_vec()
        .unwrap();
    let udp = Message::from_vec(&ask_raw(&h, &raw, true).unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let bytes = ask_raw(&h, &raw, false).unwrap();
    let tcp = Message::from_vec(&bytes).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 60);
    assert_eq!(tcp.additionals.len(), 60);

    // The client's EDNS size is honoured: 4096 is capped at 1232, 600 is respected.
    for (size, limit) in [(4096u16, 1232usize), (600, 600), (100, 512)] {
        let mut m = query("_big._tcp.netsel.", RecordType::SRV);
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
        let bytes = ask_raw(&h, &m.to_vec().unwrap(), true).unwrap();
        assert!(bytes.len() <= limit, "{size}: {}", bytes.len());
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.metadata.truncation);
        assert!(r.edns.is_some(), "OPT kept when truncated");
    }
}

/// Over UDP without EDNS (512 bytes), an SRV answer is sent whole, with its targets'
/// addresses while they fit, without them once they do not (not truncated: they are not
/// required data, RFC 2181 §9, as knot, nsd and unbound answer), and truncated only when
/// the SRV records themselves do not fit.
#[tokio::test]
async fn glue_is_left_out_before_an_answer_is_truncated() {
    let h = handler();
    let raw = query("_grow._tcp.netsel.", RecordType::SRV)
        .to_vec()
        .unwrap();
    let mut seen = (false, false, false);
    for n in 1..=30u16 {
        register(&h, "grow", &format!("127.0.2.{n}:{}", 9000 + n), &[]).await;
        let bytes = ask_raw(&h, &raw, true).unwrap();
        assert!(bytes.len() <= 512, "{n}: {} bytes", bytes.len());
        let udp = Message::from_vec(&bytes).unwrap();
        let whole = ask_raw(&h, &raw, false).unwrap();
        let tcp = Message::from_vec(&whole).unwrap();
        assert_eq!(tcp.answers.len(), usize::from(n));
        // The same answers without the additional section: what must fit to avoid TC.
        let mut bare = tcp.clone();
        bare.additionals.clear();
        let bare_len = bare.to_vec().unwrap().len();
        if udp.metadata.truncation {
            assert!(
                bare_len > 512,
                "{n}: truncated although {bare_len} bytes fit"
            );
            assert!(udp.answers.is_empty());
            seen.2 = true;
        } else {
            assert_eq!(udp.answers, tcp.answers, "{n}: every SRV record");
            if udp.additionals.is_empty() {
                assert!(whole.len() > 512, "{n}: glue left out needlessly");
                seen.1 = true;
            } else {
                assert_eq!(udp.additionals, tcp.additionals);
                seen.0 = true;
            }
        }
    }
    assert_eq!(
        seen,
        (true, true, true),
        "with glue, without glue, truncated"
    );
}

#[tokio::test]
async fn malformed_queries_never_panic() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    // Too short, or a response: no answer.
    assert!(ask_raw(&h, b"\x01\x02\x03", true).is_none());
    let mut resp = query("web.netsel.", RecordType::A).to_vec().unwrap();
    resp[2] |= 0x80;
    assert!(ask_raw(&h, &resp, true).is_none());
    // A header promising a question that is not there: FORMERR.
    let bytes = ask_raw(
        &h,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab",
        true,
    )
    .unwrap();
    assert_eq!(&bytes[..2], b"\x12\x34");
    assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
    // Fuzz: random bytes and every truncation of a good query.
    let good = query("web.netsel.", RecordType::A).to_vec().unwrap();
    for cut in 0..good.len() {
        let _ = h.respond_raw(&good[..cut], true);
    }
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..5000 {
        let len = rng.usize(0..300);
        let mut b: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if b.len() > 2 && rng.bool() {
            b[2] &= 0x7f;
        }
        let _ = h.respond_raw(&b, rng.bool());
    }
    assert!(h.metrics().count("none", "FORMERR") >= 1);
}

#[tokio::test]
async fn several_questions_unknown_class_opcode_any() {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    let mut m = query("web.netsel.", RecordType::A);
    m.add_query(Query::query(
        Name::from_ascii("web.netsel.").unwrap(),
        RecordType::AAAA,
    ));
    assert_eq!(ask(&h, &m).metadata.response_code, ResponseCode::FormErr);

    let mut m = Message::new(1, MessageType::Query, OpCode::Query);
    let mut q = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    m.add_query(q);
    assert_eq!(ask(&h, &m).metadata.response_code, ResponseCode::Refused);

    let mut m = query("web.netsel.", RecordType::A);
    m.metadata.op_code = OpCode::Status;
    assert_eq!(ask(&h, &m).metadata.response_code, ResponseCode::NotImp);

    // ANY: a minimal answer (RFC 8482), the one address record.
    let r = ask(&h, &query("web.netsel.", RecordType::ANY));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].record_type(), RecordType::A);

    let r = ask(&h, &query("netsel.", RecordType::SOA));
    assert_eq!(r.answers[0].record_type(), RecordType::SOA);
    let r = ask(&h, &query("netsel.", RecordType::NS));
    assert_eq!(r.answers[0].record_type(), RecordType::NS);
    let r = ask(&h, &query("netsel.", RecordType::AXFR));
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn answers_follow_the_catalog_at_once() {
    let h = handler();
    let r = ask(&h, &query("late.netsel.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let id = register(&h, "late", "127.0.0.1:8000", &[]).await;
    let r = ask(&h, &query("late.netsel.", RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    h.catalog().deregister_admin(&id).await.unwrap();
    let r = ask(&h, &query("late.netsel.", RecordType::A));
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NXDomain,
        "no instances left"
    );
}

#[tokio::test]
async fn unhealthy_instances_are_not_answered() {
    let h = handler();
    let a = register(&h, "web", "127.0.0.1:8000", &[]).await;
    register(&h, "web", "127.0.0.2:8000", &[]).await;
    h.catalog()
        .set_health(&a, crate::catalog::Health::Critical)
        .await
        .unwrap();
    let r = ask(&h, &query("_web._tcp.netsel.", RecordType::SRV));
    assert_eq!(r.answers.len(), 1);
    let r = ask(&h, &query(&format!("{a}.web.netsel."), RecordType::A));
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn ipv6_instances_get_aaaa() {
    let h = handler();
    let id = register(&h, "v6", "[::1]:8000", &[]).await;
    let r = ask(&h, &query(&format!("{id}.v6.netsel."), RecordType::AAAA));
    let RData::AAAA(ip) = &r.answers[0].data else {
        panic!()
    };
    assert_eq!(ip.0, "::1".parse::<std::net::Ipv6Addr>().unwrap());
    let r = ask(&h, &query(&format!("{id}.v6.netsel."), RecordType::A));
    assert!(r.answers.is_empty());
    let _: SocketAddr = "[::1]:1".parse().unwrap();
}

#[test]
fn reverse_zones() {
    let s = settings();
    let z = |cidr: &str| {
        Zone::new(&s.dns, cidr.parse().unwrap())
            .unwrap()
            .reverse
            .to_ascii()
    };
    assert_eq!(z("127.77.0.0/16"), "77.127.in-addr.arpa.");
    assert_eq!(z("10.0.0.0/24"), "0.0.10.in-addr.arpa.");
    assert_eq!(z("10.0.0.0/20"), "0.10.in-addr.arpa.");
    assert_eq!(z("fd00::/8"), "d.f.ip6.arpa.");
}

/// A query with an OPT record, DO set or not.
fn edns_query(name: &str, qtype: RecordType, dnssec_ok: bool) -> Message {
    let mut m = query(name, qtype);
    let mut e = Edns::new();
    e.set_max_payload(1232);
    e.set_dnssec_ok(dnssec_ok);
    m.set_edns(e);
    m
}

/// Queries that get each kind of answer NetSel builds itself, all with an OPT: NOERROR,
/// NODATA, NXDOMAIN, REFUSED (out of zone, CHAOS), NOTIMP (NOTIFY), BADVERS, FORMERR
/// (two questions) and a truncated answer. With the rcode each must get.
fn edns_cases(dnssec_ok: bool) -> Vec<(&'static str, Message, ResponseCode)> {
    let q = |name: &str, qtype| edns_query(name, qtype, dnssec_ok);
    let mut notify = q("netsel.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    let mut badvers = q("netsel.", RecordType::SOA);
    let mut e = badvers.edns.clone().unwrap();
    e.set_version(1);
    badvers.set_edns(e);
    let mut chaos = q("version.bind.", RecordType::TXT);
    chaos.queries[0].set_query_class(DNSClass::CH);
    let mut two = q("web.netsel.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("web.netsel.").unwrap(),
        RecordType::AAAA,
    ));
    vec![
        (
            "answer",
            q("web.netsel.", RecordType::A),
            ResponseCode::NoError,
        ),
        (
            "nodata",
            q("web.netsel.", RecordType::MX),
            ResponseCode::NoError,
        ),
        (
            "nxdomain",
            q("nope.netsel.", RecordType::A),
            ResponseCode::NXDomain,
        ),
        (
            "refused",
            q("example.com.", RecordType::A),
            ResponseCode::Refused,
        ),
        ("chaos", chaos, ResponseCode::Refused),
        ("notify", notify, ResponseCode::NotImp),
        ("badvers", badvers, ResponseCode::BADVERS),
        ("two questions", two, ResponseCode::FormErr),
        (
            "truncated",
            q("_big._tcp.netsel.", RecordType::SRV),
            ResponseCode::NoError,
        ),
    ]
}

/// A handler with `web` and a service too big for one UDP answer.
async fn edns_handler() -> DnsHandler {
    let h = handler();
    register(&h, "web", "127.0.0.1:8000", &[]).await;
    for i in 0..60u16 {
        register(&h, "big", &format!("127.0.1.{}:{}", i + 1, 9000 + i), &[]).await;
    }
    h
}

/// The checks every EDNS answer must pass: the rcode, OPT version 0 with NetSel's size,
/// no option and no unknown flag echoed, and the query's DO bit (RFC 3225 §3).
fn check_opt(what: &str, r: &Message, code: ResponseCode, dnssec_ok: bool) {
    // BADVERS and BADSIG share code 16; compare numbers.
    assert_eq!(
        u16::from(r.metadata.response_code),
        u16::from(code),
        "{what}"
    );
    let opt = r.edns.as_ref().unwrap_or_else(|| panic!("{what}: no OPT"));
    assert_eq!(opt.version(), 0, "{what}");
    assert_eq!(opt.max_payload(), MAX_UDP_PAYLOAD, "{what}");
    assert_eq!(opt.flags().dnssec_ok, dnssec_ok, "{what}: DO");
    assert_eq!(opt.flags().z, 0, "{what}: unknown flags");
    assert!(opt.options().as_ref().is_empty(), "{what}: options");
}

#[tokio::test]
async fn do_bit_is_copied_by_respond_raw_over_udp_and_tcp() {
    let h = edns_handler().await;
    for udp in [true, false] {
        for dnssec_ok in [false, true] {
            for (what, m, code) in edns_cases(dnssec_ok) {
                let mut m = m;
                // Unknown flags and an unknown option in the query are not echoed.
                let mut e = m.edns.clone().unwrap();
                e.flags_mut().z = 0x0080;
                e.options_mut()
                    .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
                        100,
                        vec![1, 2],
                    ));
                m.set_edns(e);
                let bytes = ask_raw(&h, &m.to_vec().unwrap(), udp).expect("an answer");
                let r = Message::from_vec(&bytes).unwrap();
                let what = format!("{what} udp={udp} do={dnssec_ok}");
                check_opt(&what, &r, code, dnssec_ok);
                assert_eq!(r.metadata.truncation, udp && what.starts_with("truncated"));
            }
        }
    }
}

/// Asks through hickory's `RequestHandler` (the TCP path, and UDP with `fast_path = false`)
/// and returns the wire response hickory would send.
async fn ask_hickory(h: &DnsHandler, m: &Message, protocol: Protocol) -> Message {
    use futures_util::StreamExt;
    use hickory_server::net::BufDnsStreamHandle;
    use hickory_server::net::runtime::TokioTime;
    use hickory_server::server::ResponseHandle;

    let src: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let req = Request::from_bytes(m.to_vec().unwrap(), src, protocol).unwrap();
    let (stream, mut sent) = BufDnsStreamHandle::new(src);
    h.handle_request::<_, TokioTime>(&req, ResponseHandle::new(src, stream, protocol))
        .await;
    let msg = sent.next().await.expect("a response sent");
    Message::from_vec(msg.bytes()).unwrap()
}

#[tokio::test]
async fn do_bit_is_copied_by_the_hickory_handler() {
    let h = edns_handler().await;
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        for dnssec_ok in [false, true] {
            for (what, m, code) in edns_cases(dnssec_ok) {
                let r = ask_hickory(&h, &m, protocol).await;
                let what = format!("{what} {protocol} do={dnssec_ok}");
                check_opt(&what, &r, code, dnssec_ok);
            }
        }
    }
}

#[tokio::test]
async fn do_bit_on_the_fast_path_and_in_its_cache() {
    let h = edns_handler().await;
    let mut worker = fast::Worker::for_test(h.clone());
    let src: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let (mut key, mut out) = (Vec::new(), Vec::new());
    let mut distinct = 0;
    // The first round fills the cache, the second answers from it; a DO and a non-DO query
    // for the same name alternate, so each must get its own bit, never the other's.
    for round in 0..2 {
        for (i, (what, m, code)) in edns_cases(true).into_iter().enumerate() {
            for dnssec_ok in [true, false] {
                let mut m = m.clone();
                let mut e = m.edns.clone().unwrap();
                e.set_dnssec_ok(dnssec_ok);
                m.set_edns(e);
                m.metadata.id = (round * 100 + i) as u16;
                assert!(worker.answer(&m.to_vec().unwrap(), src, &mut key, &mut out));
                let r = Message::from_vec(&out).unwrap();
                assert_eq!(r.metadata.id, m.metadata.id);
                check_opt(
                    &format!("{what} round {round} do={dnssec_ok}"),
                    &r,
                    code,
                    dnssec_ok,
                );
                distinct += usize::from(round == 0);
            }
        }
    }
    // Every cacheable answer is cached once per DO value (the two-question query is not
    // cacheable).
    assert_eq!(worker.cached(), distinct - 2);
}

#[tokio::test]
async fn do_bit_on_servfail_when_no_upstream_answers() {
    // An upstream that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut s = settings();
    s.dns.upstreams = vec![silent.local_addr().unwrap()];
    s.dns.forward_timeout_ms = 20;
    let h = handler_with(&s);
    for dnssec_ok in [false, true] {
        let m = edns_query("example.com.", RecordType::A, dnssec_ok);
        assert!(matches!(
            h.respond_raw(&m.to_vec().unwrap(), true),
            RawAnswer::Forward
        ));
        // The fast path's reply.
        let r = Message::from_vec(&h.forward_raw(&m.to_vec().unwrap()).await).unwrap();
        check_opt("servfail", &r, ResponseCode::ServFail, dnssec_ok);
        assert!(r.metadata.recursion_available);
        assert_eq!(r.queries.len(), 1, "the question is echoed");
        // Hickory's.
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let r = ask_hickory(&h, &m, protocol).await;
            check_opt("servfail", &r, ResponseCode::ServFail, dnssec_ok);
        }
    }
    // Without OPT in the query, none in the answer.
    let m = query("example.com.", RecordType::A);
    let r = Message::from_vec(&h.forward_raw(&m.to_vec().unwrap()).await).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(r.edns.is_none());
}

async fn register_tagged(h: &DnsHandler, name: &str, ep: &str, tags: &[&str]) -> String {
    let mut reg = Registration::new(name, Endpoint::Explicit(ep.parse().unwrap()));
    reg.tags = tags.iter().map(|t| t.to_string()).collect();
    h.catalog().register(reg).await.unwrap().id.to_string()
}

/// What a tag query gets: (rcode, sorted SRV ports or A/AAAA addresses, authority count).
type TagAnswer = (ResponseCode, Vec<String>, usize);

fn tag_answer(r: &Message) -> TagAnswer {
    let mut got: Vec<String> = r
        .answers
        .iter()
        .map(|rec| match &rec.data {
            RData::SRV(srv) => srv.port.to_string(),
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    got.sort();
    (r.metadata.response_code, got, r.authorities.len())
}

/// `_NAME._TAG` SRV and `TAG.tag.NAME` A/AAAA, through the handler and through the UDP
/// fast path twice (the second answer from its cache, which must keep `_web._v1` and
/// `_web._tcp` apart), for letter case and for every negative case.
#[tokio::test]
async fn tag_queries_on_the_handler_and_the_fast_path() {
    let h = handler();
    register_tagged(&h, "web", "127.0.0.1:8001", &["v1"]).await;
    register_tagged(&h, "web", "127.0.0.2:8002", &["V1", "canary"]).await;
    register_tagged(&h, "web", "127.0.0.2:8003", &["v1"]).await;
    register_tagged(&h, "web", "[::1]:8004", &["v6"]).await;
    register_tagged(&h, "web", "127.0.0.3:8005", &[]).await;
    register_tagged(&h, "db", "127.0.0.9:5432", &[]).await;
    let (nx, ok) = (ResponseCode::NXDomain, ResponseCode::NoError);
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases: Vec<(&str, RecordType, TagAnswer)> = vec![
        // `_tcp` keeps meaning every instance.
        (
            "_web._tcp.netsel.",
            RecordType::SRV,
            (ok, v(&["8001", "8002", "8003", "8004", "8005"]), 0),
        ),
        // Tags match case-insensitively, as DNS names do.
        (
            "_web._v1.netsel.",
            RecordType::SRV,
            (ok, v(&["8001", "8002", "8003"]), 0),
        ),
        (
            "_WEB._V1.NETSEL.",
            RecordType::SRV,
            (ok, v(&["8001", "8002", "8003"]), 0),
        ),
        (
            "_web._canary.netsel.",
            RecordType::SRV,
            (ok, v(&["8002"]), 0),
        ),
        // A tag no healthy instance carries: the name does not exist (Consul does the same).
        ("_web._v2.netsel.", RecordType::SRV, (nx, v(&[]), 1)),
        ("_db._v1.netsel.", RecordType::SRV, (nx, v(&[]), 1)),
        ("_nope._v1.netsel.", RecordType::SRV, (nx, v(&[]), 1)),
        // It exists, not with that type: NODATA.
        ("_web._v1.netsel.", RecordType::A, (ok, v(&[]), 1)),
        // Endpoint addresses, each once (two v1 instances share 127.0.0.2).
        (
            "v1.tag.web.netsel.",
            RecordType::A,
            (ok, v(&["127.0.0.1", "127.0.0.2"]), 0),
        ),
        (
            "V1.Tag.Web.netsel.",
            RecordType::A,
            (ok, v(&["127.0.0.1", "127.0.0.2"]), 0),
        ),
        (
            "canary.tag.web.netsel.",
            RecordType::A,
            (ok, v(&["127.0.0.2"]), 0),
        ),
        ("v6.tag.web.netsel.", RecordType::AAAA, (ok, v(&["::1"]), 0)),
        ("v6.tag.web.netsel.", RecordType::A, (ok, v(&[]), 1)),
        ("v1.tag.web.netsel.", RecordType::AAAA, (ok, v(&[]), 1)),
        ("v1.tag.web.netsel.", RecordType::SRV, (ok, v(&[]), 1)),
        ("v2.tag.web.netsel.", RecordType::A, (nx, v(&[]), 1)),
        ("v1.tag.db.netsel.", RecordType::A, (nx, v(&[]), 1)),
        ("v1.tag.nope.netsel.", RecordType::A, (nx, v(&[]), 1)),
        // Empty non-terminals above existing tag names are NODATA, not NXDOMAIN (RFC 8020).
        ("tag.web.netsel.", RecordType::A, (ok, v(&[]), 1)),
        ("tag.db.netsel.", RecordType::A, (nx, v(&[]), 1)),
        ("_v1.netsel.", RecordType::A, (ok, v(&[]), 1)),
        ("_v2.netsel.", RecordType::A, (nx, v(&[]), 1)),
        ("x.v1.tag.web.netsel.", RecordType::A, (nx, v(&[]), 1)),
    ];
    let mut worker = fast::Worker::for_test(h.clone());
    let src: SocketAddr = "127.0.0.1:5300".parse().unwrap();
    let (mut key, mut out) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for (name, qtype, want) in &cases {
            let m = query(name, *qtype);
            let got = if round == 0 {
                ask(&h, &m)
            } else {
                assert!(worker.answer(&m.to_vec().unwrap(), src, &mut key, &mut out));
                Message::from_vec(&out).unwrap()
            };
            assert_eq!(&tag_answer(&got), want, "{name} {qtype} round {round}");
            assert!(got.metadata.authoritative);
            assert_eq!(got.queries[0].name().to_ascii(), *name, "case echoed");
            if !got.answers.is_empty() {
                assert_eq!(got.answers[0].name.to_ascii(), *name, "owner case echoed");
            }
        }
    }
    // Every distinct query got its own cache entry (`_web._v1` and `_WEB._V1` share one).
    assert_eq!(worker.cached(), cases.len() - 2);
    // SRV targets of a tag query carry glue, as for `_tcp`.
    let r = ask(&h, &query("_web._canary.netsel.", RecordType::SRV));
    assert_eq!(r.additionals.len(), 1);
    // A change of tags is seen at once, on the fast path too (the cache is per index).
    register_tagged(&h, "web", "127.0.0.4:8006", &["v2"]).await;
    let m = query("_web._v2.netsel.", RecordType::SRV);
    assert!(worker.answer(&m.to_vec().unwrap(), src, &mut key, &mut out));
    let got = Message::from_vec(&out).unwrap();
    assert_eq!(tag_answer(&got), (ok, v(&["8006"]), 0));
}
