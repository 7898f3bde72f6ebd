//! The real `netsel` binary asked by `dig` (Debian `bind9-dnsutils`), as a user would,
//! and by the client library's `dns_resolve`; and a server in process put through ISC's
//! EDNS compliance cases with `dig` (`dig_edns_compliance`, one table).

mod common;

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
    common::have_tool("dig", &["-v"], "install bind9-dnsutils (.ci/run does)")
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

/// What `dig` printed of one reply: the header, the OPT pseudo-section and the counts.
#[derive(Debug, Default)]
struct DigReply {
    opcode: String,
    status: String,
    /// Header flags (`qr`, `aa`, `rd`, ...).
    flags: Vec<String>,
    /// The reserved header bit (Z), which dig shows as `MBZ: 0x...` among the flags.
    header_mbz: bool,
    answers: usize,
    /// The OPT record, if the reply had one.
    opt: Option<DigOpt>,
}

#[derive(Debug, Default)]
struct DigOpt {
    version: u8,
    /// Known EDNS flags (`do`).
    flags: Vec<String>,
    /// Unknown EDNS flags that were set (dig's `MBZ: 0x....`).
    mbz: Option<String>,
    udp: u16,
    /// Every other line of the pseudo-section: the options the server sent back.
    options: Vec<String>,
}

/// Parses dig's default output. Panics (showing it) on anything unexpected.
fn parse_dig(out: &str) -> DigReply {
    let mut r = DigReply::default();
    let mut in_opt = false;
    for line in out.lines() {
        if let Some(h) = line.strip_prefix(";; ->>HEADER<<- ") {
            for part in h.split(", ") {
                match part.split_once(": ") {
                    Some(("opcode", v)) => r.opcode = v.to_string(),
                    Some(("status", v)) => r.status = v.to_string(),
                    _ => {}
                }
            }
        } else if let Some(f) = line.strip_prefix(";; flags:") {
            let (flags, counts) = f.split_once(';').unwrap_or_else(|| panic!("{out}"));
            r.flags = flags.split_whitespace().map(str::to_string).collect();
            r.header_mbz = counts.contains("MBZ:");
            for c in counts.split(',') {
                if let Some(n) = c.trim().strip_prefix("ANSWER: ") {
                    r.answers = n.parse().unwrap_or_else(|_| panic!("{out}"));
                }
            }
        } else if line == ";; OPT PSEUDOSECTION:" {
            in_opt = true;
            r.opt = Some(DigOpt::default());
        } else if in_opt {
            let opt = r.opt.as_mut().unwrap();
            if line.is_empty() || line.starts_with(";; ") {
                in_opt = false;
            } else if let Some(e) = line.strip_prefix("; EDNS: version: ") {
                // `0, flags: do; udp: 1232` or `0, flags:; MBZ: 0x0080, udp: 1232`.
                let (version, rest) = e.split_once(", flags:").unwrap_or_else(|| panic!("{out}"));
                opt.version = version.parse().unwrap_or_else(|_| panic!("{out}"));
                let (flags, rest) = rest.split_once(';').unwrap_or_else(|| panic!("{out}"));
                opt.flags = flags.split_whitespace().map(str::to_string).collect();
                let rest = rest.trim();
                let udp = match rest.strip_prefix("MBZ: ") {
                    Some(m) => {
                        let (mbz, udp) = m.split_once(", ").unwrap_or_else(|| panic!("{out}"));
                        opt.mbz = Some(mbz.to_string());
                        udp
                    }
                    None => rest,
                };
                opt.udp = udp
                    .strip_prefix("udp: ")
                    .and_then(|u| u.parse().ok())
                    .unwrap_or_else(|| panic!("{out}"));
            } else {
                opt.options.push(line.to_string());
            }
        }
    }
    assert!(!r.status.is_empty(), "no reply parsed:\n{out}");
    r
}

/// The OPT a reply must (or must not) carry.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Opt {
    /// No OPT record.
    None,
    /// OPT version 0, DO clear.
    V0,
    /// OPT version 0, DO set.
    V0Do,
}

/// One case of the compliance table.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    opcode: &'static str,
    status: &'static str,
    /// Whether the answer section has records.
    answer: bool,
    /// Whether AA is set.
    aa: bool,
    opt: Opt,
}

/// The compliance table, after ISC's EDNS compliance tests (`genreport`, RFC 8906 §8):
/// each query as `dig` sends it, and what the reply must be. Every reply that carries an
/// OPT must also have version 0, no unknown flag (MBZ) set, and no option echoed.
const CASES: &[Case] = &[
    Case {
        name: "plain",
        args: &["+noedns", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::None,
    },
    Case {
        name: "edns0",
        args: &["+edns=0", "+nocookie", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "edns1",
        args: &["+edns=1", "+noednsneg", "+nocookie", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "BADVERS",
        answer: false,
        aa: false,
        opt: Opt::V0,
    },
    Case {
        name: "unknown option",
        args: &["+edns=0", "+nocookie", "+ednsopt=100", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "unknown option, edns1",
        args: &[
            "+edns=1",
            "+noednsneg",
            "+nocookie",
            "+ednsopt=100",
            "netsel.",
            "SOA",
        ],
        opcode: "QUERY",
        status: "BADVERS",
        answer: false,
        aa: false,
        opt: Opt::V0,
    },
    Case {
        name: "unknown flag",
        args: &["+edns=0", "+nocookie", "+ednsflags=0x80", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "DO",
        args: &["+edns=0", "+nocookie", "+dnssec", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0Do,
    },
    Case {
        name: "DO, edns1",
        args: &[
            "+edns=1",
            "+noednsneg",
            "+nocookie",
            "+dnssec",
            "netsel.",
            "SOA",
        ],
        opcode: "QUERY",
        status: "BADVERS",
        answer: false,
        aa: false,
        opt: Opt::V0Do,
    },
    Case {
        name: "DO, service name",
        args: &["+dnssec", "web.netsel.", "A"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0Do,
    },
    Case {
        name: "no DO, same name",
        args: &["web.netsel.", "A"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "DO, NXDOMAIN",
        args: &["+dnssec", "nope.netsel.", "A"],
        opcode: "QUERY",
        status: "NXDOMAIN",
        answer: false,
        aa: true,
        opt: Opt::V0Do,
    },
    Case {
        name: "DO, REFUSED",
        args: &["+dnssec", "example.com.", "A"],
        opcode: "QUERY",
        status: "REFUSED",
        answer: false,
        aa: false,
        opt: Opt::V0Do,
    },
    Case {
        name: "option list",
        args: &[
            "+edns=0",
            "+ednsopt=100",
            "+ednsopt=101",
            "+nsid",
            "+expire",
            "+cookie",
            "+subnet=0.0.0.0/0",
            "netsel.",
            "SOA",
        ],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "TCP",
        args: &["+tcp", "+edns=0", "+nocookie", "web.netsel.", "A"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0,
    },
    Case {
        name: "TCP, DO",
        args: &["+tcp", "+dnssec", "web.netsel.", "A"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::V0Do,
    },
    Case {
        name: "TCP, no EDNS",
        args: &["+tcp", "+noedns", "web.netsel.", "A"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::None,
    },
    Case {
        name: "NOTIFY",
        args: &["+opcode=notify", "+noedns", "netsel.", "SOA"],
        opcode: "NOTIFY",
        status: "NOTIMP",
        answer: false,
        aa: false,
        opt: Opt::None,
    },
    Case {
        name: "NOTIFY, DO",
        args: &["+opcode=notify", "+dnssec", "netsel.", "SOA"],
        opcode: "NOTIFY",
        status: "NOTIMP",
        answer: false,
        aa: false,
        opt: Opt::V0Do,
    },
    Case {
        name: "unknown opcode",
        args: &["+opcode=15", "+noedns", "netsel.", "SOA"],
        opcode: "RESERVED15",
        status: "NOTIMP",
        answer: false,
        aa: false,
        opt: Opt::None,
    },
    Case {
        name: "unknown opcode, header only",
        args: &["+opcode=15", "+header-only", "+noedns", "netsel.", "SOA"],
        opcode: "RESERVED15",
        status: "NOTIMP",
        answer: false,
        aa: false,
        opt: Opt::None,
    },
    Case {
        name: "reserved header bit",
        args: &["+zflag", "+noedns", "netsel.", "SOA"],
        opcode: "QUERY",
        status: "NOERROR",
        answer: true,
        aa: true,
        opt: Opt::None,
    },
    Case {
        name: "CHAOS version.bind",
        args: &["+noedns", "version.bind", "CH", "TXT"],
        opcode: "QUERY",
        status: "REFUSED",
        answer: false,
        aa: false,
        opt: Opt::None,
    },
    Case {
        name: "CHAOS id.server, DO",
        args: &["+dnssec", "id.server", "CH", "TXT"],
        opcode: "QUERY",
        status: "REFUSED",
        answer: false,
        aa: false,
        opt: Opt::V0Do,
    },
    Case {
        name: "CHAOS, a name in the zone",
        args: &["web.netsel.", "CH", "A"],
        opcode: "QUERY",
        status: "REFUSED",
        answer: false,
        aa: false,
        opt: Opt::V0,
    },
];

/// Checks one reply against its case; returns what is wrong, if anything.
fn check(case: &Case, out: &str) -> Vec<String> {
    let r = parse_dig(out);
    let mut bad = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    expect(r.opcode == case.opcode, format!("opcode {}", r.opcode));
    expect(r.status == case.status, format!("status {}", r.status));
    expect(
        (r.answers > 0) == case.answer,
        format!("{} answers", r.answers),
    );
    expect(
        r.flags.iter().any(|f| f == "aa") == case.aa,
        format!("flags {:?}", r.flags),
    );
    expect(!r.flags.iter().any(|f| f == "ra"), "RA set".into());
    expect(!r.header_mbz, "the reserved header bit set".into());
    match (&r.opt, case.opt) {
        (None, Opt::None) => {}
        (None, _) => expect(false, "no OPT".into()),
        (Some(_), Opt::None) => expect(false, "an OPT".into()),
        (Some(opt), want) => {
            expect(opt.version == 0, format!("EDNS version {}", opt.version));
            let has_do = opt.flags.iter().any(|f| f == "do");
            expect(
                has_do == (want == Opt::V0Do),
                format!("EDNS flags {:?}", opt.flags),
            );
            expect(
                opt.mbz.is_none(),
                format!("unknown EDNS flags {:?}", opt.mbz),
            );
            expect(opt.udp == 1232, format!("udp {}", opt.udp));
            expect(opt.options.is_empty(), format!("options {:?}", opt.options));
        }
    }
    bad
}

async fn start_in_process(fast_path: bool) -> (netsel::NetSelServer, SocketAddr) {
    let mut s = netsel::Settings::ephemeral();
    s.dns.fast_path = fast_path;
    let server = netsel::NetSelServer::with_settings(s);
    server.start().await.expect("server starts");
    let dns = server.bound().unwrap().dns.expect("dns is bound");
    let reg = netsel::catalog::Registration::new(
        "web",
        netsel::catalog::Endpoint::Explicit("127.0.0.1:8000".parse().unwrap()),
    );
    server.catalog().unwrap().register(reg).await.unwrap();
    (server, dns)
}

/// ISC's EDNS compliance cases, as one table, against the UDP fast path and against
/// hickory's UDP loop (TCP is hickory's in both). Each case is asked twice, so the second
/// UDP answer comes from the fast path's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_edns_compliance() {
    if !have_dig() {
        return;
    }
    let mut failures = Vec::new();
    for fast_path in [true, false] {
        let (server, dns) = start_in_process(fast_path).await;
        for case in CASES {
            for round in 0..2 {
                let mut args = vec!["+norec"];
                args.extend_from_slice(case.args);
                let out = tokio::task::spawn_blocking(move || dig(dns, &args))
                    .await
                    .unwrap();
                let bad = check(case, &out);
                if !bad.is_empty() {
                    failures.push(format!(
                        "{} (fast_path={fast_path}, round {round}): {}\n{out}",
                        case.name,
                        bad.join("; ")
                    ));
                }
            }
        }
        server.shutdown().await;
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The checker itself: a reply that breaks each rule is caught (a parser that saw nothing
/// would pass every case).
#[test]
fn the_checker_catches_what_it_should() {
    let bad = "\
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1
;; flags: qr aa; MBZ: 0x4; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1

;; OPT PSEUDOSECTION:
; EDNS: version: 0, flags:; MBZ: 0x0080, udp: 4096
; OPT=100: 01 02 (\"..\")
;; QUESTION SECTION:
;netsel.\t\t\tIN\tSOA
";
    let r = parse_dig(bad);
    let opt = r.opt.as_ref().unwrap();
    assert_eq!(opt.mbz.as_deref(), Some("0x0080"));
    assert_eq!(opt.udp, 4096);
    assert_eq!(opt.options.len(), 1);
    let do_case = CASES.iter().find(|c| c.name == "DO").unwrap();
    let wrong = check(do_case, bad);
    assert_eq!(wrong.len(), 5, "{wrong:?}"); // Z, DO, MBZ, udp, the option

    let good = bad
        .replace("MBZ: 0x4; ", "")
        .replace("flags:; MBZ: 0x0080, udp: 4096", "flags: do; udp: 1232")
        .replace("; OPT=100: 01 02 (\"..\")\n", "");
    assert!(
        check(do_case, &good).is_empty(),
        "{:?}",
        check(do_case, &good)
    );
    let plain = CASES.iter().find(|c| c.name == "plain").unwrap();
    assert_eq!(check(plain, &good), ["an OPT"]);
}

/// The answer section as dig prints it: for each record its type and data (an SRV record
/// shown as its port), sorted.
fn answer_section(out: &str) -> Vec<String> {
    let mut got: Vec<String> = out
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, _, _, "SRV", _, _, port, _] => format!("SRV {port}"),
                [_, _, _, t, data] => format!("{t} {data}"),
                _ => panic!("unexpected answer line {l:?} in\n{out}"),
            }
        })
        .collect();
    got.sort();
    got
}

/// Tag queries as a user asks them with `dig`: `_web._v1.netsel SRV` and
/// `v1.tag.web.netsel A`, over the UDP fast path (each asked twice: the second answer
/// comes from its cache, which must not confuse `_web._v1` with `_web._tcp`), over
/// hickory's UDP loop, and over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_tag_queries() {
    if !have_dig() {
        return;
    }
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "_web._tcp.netsel",
            "SRV",
            "NOERROR",
            &["SRV 8001", "SRV 8002", "SRV 8003"],
        ),
        (
            "_web._v1.netsel",
            "SRV",
            "NOERROR",
            &["SRV 8001", "SRV 8002"],
        ),
        (
            "_Web._V1.netsel",
            "SRV",
            "NOERROR",
            &["SRV 8001", "SRV 8002"],
        ),
        ("_web._canary.netsel", "SRV", "NOERROR", &["SRV 8003"]),
        ("_web._v9.netsel", "SRV", "NXDOMAIN", &[]),
        (
            "v1.tag.web.netsel",
            "A",
            "NOERROR",
            &["A 127.0.0.1", "A 127.0.0.2"],
        ),
        ("canary.tag.web.netsel", "A", "NOERROR", &["A 127.0.0.3"]),
        ("v1.tag.web.netsel", "AAAA", "NOERROR", &[]),
        ("v9.tag.web.netsel", "A", "NXDOMAIN", &[]),
        ("tag.web.netsel", "A", "NOERROR", &[]),
        ("web.netsel", "A", "NOERROR", &["A <vip>"]),
    ];
    let mut failures = Vec::new();
    for fast_path in [true, false] {
        let mut s = netsel::Settings::ephemeral();
        s.dns.fast_path = fast_path;
        let server = netsel::NetSelServer::with_settings(s);
        server.start().await.expect("server starts");
        let dns = server.bound().unwrap().dns.expect("dns is bound");
        let catalog = server.catalog().unwrap();
        for (ep, tags) in [
            ("127.0.0.1:8001", &["v1"][..]),
            ("127.0.0.2:8002", &["v1"]),
            ("127.0.0.3:8003", &["canary"]),
        ] {
            let mut reg = netsel::catalog::Registration::new(
                "web",
                netsel::catalog::Endpoint::Explicit(ep.parse().unwrap()),
            );
            reg.tags = tags.iter().map(|t| t.to_string()).collect();
            catalog.register(reg).await.unwrap();
        }
        let vip = catalog.snapshot().service("web").unwrap().vip.to_string();
        for transport in ["udp", "tcp"] {
            if transport == "tcp" && !fast_path {
                continue; // TCP is hickory's either way
            }
            for round in 0..2 {
                for (name, qtype, want_status, want) in cases {
                    let mut args = vec![*name, *qtype, "+norec"];
                    if transport == "tcp" {
                        args.push("+tcp");
                    }
                    let out = tokio::task::spawn_blocking(move || dig(dns, &args))
                        .await
                        .unwrap();
                    let want: Vec<String> = want.iter().map(|w| w.replace("<vip>", &vip)).collect();
                    let got = answer_section(&out);
                    if status(&out) != *want_status || got != want || !out.contains(" aa") {
                        failures.push(format!(
                            "{name} {qtype} over {transport} (fast_path={fast_path}, round {round}): \
                             want {want_status} {want:?}, got {} {got:?}\n{out}",
                            status(&out)
                        ));
                    }
                }
            }
        }
        server.shutdown().await;
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
