//! What NetSel answers: a pure function from a parsed query and a catalog snapshot to the
//! records of the response. No I/O, no cache; both the hickory `RequestHandler` and the UDP
//! fast path call it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::zone_handler::MessageRequest;
use ipnet::IpNet;

use super::settings::DnsSettings;
use crate::catalog::{Instance, Service, Snapshot};

/// The largest UDP payload NetSel sends, whatever the client offers (the DNS flag day 2020
/// value, which avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Bytes of TXT strings in one answer, at most (metadata is free-form; keep answers sane).
const MAX_TXT_BYTES: usize = 4096;

/// The zone's fixed names, parsed once from the settings.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The domain, lower-case, e.g. `netsel.`.
    pub domain: Name,
    domain_lower: LowerName,
    /// The reverse zone covering the VIP pool, e.g. `77.127.in-addr.arpa.`.
    pub reverse: Name,
    reverse_lower: LowerName,
    vip_cidr: IpNet,
    ns: Name,
    hostmaster: Name,
    ttl: u32,
    negative_ttl: u32,
    bare_names: bool,
    forwarding: bool,
}

/// Why a zone could not be set up from settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid DNS domain '{domain}': {reason}")]
pub struct ZoneError {
    domain: String,
    reason: String,
}

impl Zone {
    /// The zone for `settings`, with the reverse zone of `vip_cidr`.
    pub fn new(settings: &DnsSettings, vip_cidr: IpNet) -> Result<Zone, ZoneError> {
        let err = |reason: String| ZoneError {
            domain: settings.domain.clone(),
            reason,
        };
        let mut domain = Name::from_ascii(&settings.domain)
            .map_err(|e| err(e.to_string()))?
            .to_lowercase();
        domain.set_fqdn(true);
        let ns = domain.prepend_label("ns").map_err(|e| err(e.to_string()))?;
        let hostmaster = domain
            .prepend_label("hostmaster")
            .map_err(|e| err(e.to_string()))?;
        let reverse = reverse_zone(vip_cidr);
        Ok(Zone {
            domain_lower: LowerName::new(&domain),
            domain,
            reverse_lower: LowerName::new(&reverse),
            reverse,
            vip_cidr,
            ns,
            hostmaster,
            ttl: settings.ttl_secs,
            negative_ttl: settings.negative_ttl_secs,
            bare_names: settings.bare_names,
            forwarding: !settings.upstreams.is_empty(),
        })
    }

    /// Whether upstreams are configured (and so RA is set).
    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    fn soa(&self, apex: &Name, serial: u64) -> Record {
        let soa = SOA::new(
            self.ns.clone(),
            self.hostmaster.clone(),
            serial as u32,
            3600,
            600,
            86_400,
            self.negative_ttl,
        );
        Record::from_rdata(apex.clone(), self.negative_ttl, RData::SOA(soa))
    }
}

/// The reverse zone of a CIDR, cut at the nearest octet (v4) or nibble (v6) boundary
/// at or above the prefix.
fn reverse_zone(cidr: IpNet) -> Name {
    let mut labels: Vec<String> = Vec::new();
    match cidr.network() {
        IpAddr::V4(v4) => {
            let octets = (cidr.prefix_len() / 8) as usize;
            labels.extend(v4.octets()[..octets].iter().rev().map(|o| o.to_string()));
            labels.push("in-addr".into());
        }
        IpAddr::V6(v6) => {
            let nibbles = (cidr.prefix_len() / 4) as usize;
            let all: Vec<String> = v6
                .octets()
                .iter()
                .flat_map(|b| [b >> 4, b & 0xf])
                .map(|n| format!("{n:x}"))
                .collect();
            labels.extend(all[..nibbles].iter().rev().cloned());
            labels.push("ip6".into());
        }
    }
    labels.push("arpa".into());
    let mut name =
        Name::from_labels(labels.iter().map(|l| l.as_bytes())).unwrap_or_else(|_| Name::root());
    name.set_fqdn(true);
    name
}

/// The records of one response, before encoding.
#[derive(Debug)]
pub struct Reply {
    /// Header fields.
    pub metadata: Metadata,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section.
    pub authorities: Vec<Record>,
    /// Additional section (without OPT).
    pub additionals: Vec<Record>,
    /// The OPT record to send, if the query had one.
    pub edns: Option<Edns>,
    /// The query type, for metrics.
    pub qtype: RecordType,
}

/// What to do with a query.
#[derive(Debug)]
pub enum Plan {
    /// Answer it with these records.
    Reply(Reply),
    /// Out of zone with upstreams configured: forward the raw query.
    Forward,
}

enum Found {
    Records(Vec<Record>, Vec<Record>),
    NoData,
    NxDomain,
}

/// The OPT record of a response to a query that had `query` (RFC 6891 §7: a query with an
/// OPT gets one back): version 0, NetSel's UDP payload size, and the query's DO bit, which
/// RFC 3225 §3 says MUST be copied into the response. Nothing else is echoed: unknown
/// options are ignored (RFC 6891 §6.1.2) and unknown flags go back as zero (§6.1.4).
pub(crate) fn response_edns(query: &Edns) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(MAX_UDP_PAYLOAD);
    e.set_version(0);
    e.set_dnssec_ok(query.flags().dnssec_ok);
    e
}

/// Answers one parsed query from `snap`.
pub fn plan(zone: &Zone, snap: &Snapshot, req: &MessageRequest) -> Plan {
    let mut md = Metadata::response_from_request(&req.metadata);
    md.recursion_available = zone.forwarding;
    let edns = req.edns.as_ref().map(response_edns);
    let mut reply = Reply {
        metadata: md,
        answers: Vec::new(),
        authorities: Vec::new(),
        additionals: Vec::new(),
        edns,
        qtype: req
            .queries
            .queries()
            .first()
            .map(|q| q.query_type())
            .unwrap_or(RecordType::Unknown(0)),
    };
    let fail = |mut reply: Reply, code: ResponseCode| {
        reply.metadata.response_code = code;
        Plan::Reply(reply)
    };
    if req.metadata.op_code != OpCode::Query {
        return fail(reply, ResponseCode::NotImp);
    }
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return fail(reply, ResponseCode::BADVERS);
    }
    let [query] = req.queries.queries() else {
        return fail(reply, ResponseCode::FormErr);
    };
    let qtype = query.query_type();
    let name = query.name();
    let owner = query.original().name().clone();
    if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
        return fail(reply, ResponseCode::Refused);
    }
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return fail(reply, ResponseCode::Refused);
    }

    let (apex, found) = if zone.domain_lower.zone_of(name) {
        let depth = (name.num_labels() - zone.domain.num_labels()) as usize;
        let labels: Vec<&[u8]> = name.iter().take(depth).collect();
        (
            &zone.domain,
            lookup_forward(zone, snap, &labels, qtype, &owner),
        )
    } else if zone.reverse_lower.zone_of(name) {
        (
            &zone.reverse,
            lookup_reverse(zone, snap, name, qtype, &owner),
        )
    } else {
        let bare = (zone.bare_names && name.num_labels() == 1)
            .then(|| {
                name.iter()
                    .next()
                    .map(|l| service_found(zone, snap, l, qtype, &owner))
            })
            .flatten();
        match bare {
            Some(Found::Records(ans, add)) => {
                reply.metadata.authoritative = true;
                reply.answers = ans;
                reply.additionals = add;
                return Plan::Reply(reply);
            }
            Some(Found::NoData) => {
                reply.metadata.authoritative = true;
                return Plan::Reply(reply);
            }
            _ if zone.forwarding => return Plan::Forward,
            _ => return fail(reply, ResponseCode::Refused),
        }
    };
    reply.metadata.authoritative = true;
    match found {
        Found::Records(ans, add) => {
            reply.answers = ans;
            reply.additionals = add;
        }
        Found::NoData => reply.authorities.push(zone.soa(apex, snap.index)),
        Found::NxDomain => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.authorities.push(zone.soa(apex, snap.index));
        }
    }
    Plan::Reply(reply)
}

fn lookup_forward(
    zone: &Zone,
    snap: &Snapshot,
    labels: &[&[u8]],
    qtype: RecordType,
    owner: &Name,
) -> Found {
    match labels {
        [] => match qtype {
            RecordType::SOA | RecordType::ANY => {
                let mut soa = zone.soa(owner, snap.index);
                soa.ttl = zone.ttl;
                Found::Records(vec![soa], Vec::new())
            }
            RecordType::NS => Found::Records(
                vec![Record::from_rdata(
                    owner.clone(),
                    zone.ttl,
                    RData::NS(NS(zone.ns.clone())),
                )],
                Vec::new(),
            ),
            _ => Found::NoData,
        },
        [b"_tcp"] => Found::NoData,
        // `_TAG.netsel.`: an empty non-terminal while some `_NAME._TAG` exists (RFC 8020:
        // an NXDOMAIN here would deny every name below it). Service names never start
        // with `_`, so this shadows none.
        [tag] if tag.first() == Some(&b'_') => {
            let tag = &tag[1..];
            let carried = snap
                .services()
                .any(|s| s.healthy().any(|i| carries(i, tag)));
            if carried {
                Found::NoData
            } else {
                Found::NxDomain
            }
        }
        [svc] => service_found(zone, snap, svc, qtype, owner),
        // `_NAME._tcp` (every healthy instance) and `_NAME._TAG` (those carrying TAG,
        // Consul's RFC 2782 form; a tag literally named `tcp` is unreachable this way).
        [srv, proto] if srv.first() == Some(&b'_') && proto.first() == Some(&b'_') => {
            let tag = match &proto[1..] {
                b"tcp" => None,
                tag => Some(tag),
            };
            let Some(service) = healthy_service(snap, &srv[1..]) else {
                return Found::NxDomain;
            };
            // Like Consul: a tag no healthy instance carries makes the name not exist.
            let tagged = |i: &&std::sync::Arc<Instance>| tag.is_none_or(|t| carries(i, t));
            if !service.healthy().any(|i| tagged(&i)) {
                return Found::NxDomain;
            }
            if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                return Found::NoData;
            }
            let mut answers = Vec::new();
            let mut glue = Vec::new();
            for inst in service.healthy().filter(tagged) {
                let Ok(target) =
                    Name::from_ascii(format!("{}.{}.{}", inst.id, service.name, zone.domain))
                else {
                    continue;
                };
                let weight = inst.weight.min(u16::MAX as u32) as u16;
                let srv = SRV::new(0, weight, inst.endpoint.port(), target.clone());
                answers.push(Record::from_rdata(owner.clone(), zone.ttl, RData::SRV(srv)));
                glue.push(address(target, zone.ttl, inst.endpoint.ip()));
            }
            Found::Records(answers, glue)
        }
        [id, svc] => {
            let Some(service) = healthy_service(snap, svc) else {
                return Found::NxDomain;
            };
            let Ok(id) = std::str::from_utf8(id) else {
                return Found::NxDomain;
            };
            let Some(inst) = service.healthy().find(|i| i.id.as_str() == id) else {
                // `tag.NAME.netsel.`: an empty non-terminal above `TAG.tag.NAME`.
                if id == "tag" && service.healthy().any(|i| !i.tags.is_empty()) {
                    return Found::NoData;
                }
                return Found::NxDomain;
            };
            let ip = inst.endpoint.ip();
            match qtype {
                RecordType::A | RecordType::AAAA | RecordType::ANY
                    if qtype == RecordType::ANY || is_v4(ip) == (qtype == RecordType::A) =>
                {
                    Found::Records(vec![address(owner.clone(), zone.ttl, ip)], Vec::new())
                }
                RecordType::TXT => txt(owner, zone.ttl, inst.meta.iter()),
                _ => Found::NoData,
            }
        }
        [tag, b"tag", svc] => tagged_addresses(zone, snap, svc, tag, qtype, owner),
        _ => Found::NxDomain,
    }
}

/// Whether `inst` carries the tag spelled by a DNS label (ASCII case-insensitively: DNS
/// names are, and the label arrives lower-cased).
fn carries(inst: &Instance, tag: &[u8]) -> bool {
    inst.tags
        .iter()
        .any(|t| t.as_bytes().eq_ignore_ascii_case(tag))
}

/// `TAG.tag.NAME.netsel.`: the endpoint addresses (not the VIP, which balances over every
/// instance) of NAME's healthy instances carrying TAG, each address once. The name exists
/// while at least one healthy instance carries the tag.
fn tagged_addresses(
    zone: &Zone,
    snap: &Snapshot,
    svc: &[u8],
    tag: &[u8],
    qtype: RecordType,
    owner: &Name,
) -> Found {
    let Some(service) = healthy_service(snap, svc) else {
        return Found::NxDomain;
    };
    let mut tagged = service.healthy().filter(|i| carries(i, tag)).peekable();
    if tagged.peek().is_none() {
        return Found::NxDomain;
    }
    match qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY => {
            let ips: BTreeSet<IpAddr> = tagged
                .map(|i| canonical(i.endpoint.ip()))
                .filter(|ip| qtype == RecordType::ANY || is_v4(*ip) == (qtype == RecordType::A))
                .collect();
            if ips.is_empty() {
                return Found::NoData;
            }
            let answers = ips
                .into_iter()
                .map(|ip| address(owner.clone(), zone.ttl, ip))
                .collect();
            Found::Records(answers, Vec::new())
        }
        RecordType::TXT => txt(owner, zone.ttl, tagged.flat_map(|i| i.meta.iter())),
        _ => Found::NoData,
    }
}

fn service_found(
    zone: &Zone,
    snap: &Snapshot,
    svc: &[u8],
    qtype: RecordType,
    owner: &Name,
) -> Found {
    let Some(service) = healthy_service(snap, svc) else {
        return Found::NxDomain;
    };
    match qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY
            if qtype == RecordType::ANY || is_v4(service.vip) == (qtype == RecordType::A) =>
        {
            Found::Records(
                vec![address(owner.clone(), zone.ttl, service.vip)],
                Vec::new(),
            )
        }
        RecordType::TXT => txt(
            owner,
            zone.ttl,
            service.healthy().flat_map(|i| i.meta.iter()),
        ),
        _ => Found::NoData,
    }
}

fn lookup_reverse(
    zone: &Zone,
    snap: &Snapshot,
    name: &LowerName,
    qtype: RecordType,
    owner: &Name,
) -> Found {
    if name == &zone.reverse_lower && matches!(qtype, RecordType::SOA | RecordType::ANY) {
        let mut soa = zone.soa(owner, snap.index);
        soa.ttl = zone.ttl;
        return Found::Records(vec![soa], Vec::new());
    }
    let ip = Name::from(name)
        .parse_arpa_name()
        .ok()
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| net.addr());
    let Some(ip) = ip.filter(|ip| zone.vip_cidr.contains(ip)) else {
        // An inner node of the reverse tree, or an address outside the pool.
        return if name.num_labels() < full_arpa_labels(zone.vip_cidr) {
            Found::NoData
        } else {
            Found::NxDomain
        };
    };
    let Some(service) = snap.service_by_vip(ip).filter(|s| s.healthy_count() > 0) else {
        return Found::NxDomain;
    };
    if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
        return Found::NoData;
    }
    let Ok(target) = Name::from_ascii(format!("{}.{}", service.name, zone.domain)) else {
        return Found::NxDomain;
    };
    Found::Records(
        vec![Record::from_rdata(
            owner.clone(),
            zone.ttl,
            RData::PTR(PTR(target)),
        )],
        Vec::new(),
    )
}

fn full_arpa_labels(cidr: IpNet) -> u8 {
    match cidr {
        IpNet::V4(_) => 6,
        IpNet::V6(_) => 34,
    }
}

/// The service named by a label, if it has a healthy instance (only then does its name
/// exist in DNS).
fn healthy_service<'s>(snap: &'s Snapshot, label: &[u8]) -> Option<&'s std::sync::Arc<Service>> {
    let name = std::str::from_utf8(label).ok()?;
    snap.service(name).filter(|s| s.healthy_count() > 0)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (both are answered as A).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn is_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

fn address(owner: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => RData::A(A(v4)),
            None => RData::AAAA(AAAA(v6)),
        },
    };
    Record::from_rdata(owner, ttl, rdata)
}

/// Metadata as `key=value` TXT strings: deduplicated, sorted, each at most 255 bytes,
/// all together at most [`MAX_TXT_BYTES`].
fn txt<'a>(owner: &Name, ttl: u32, meta: impl Iterator<Item = (&'a String, &'a String)>) -> Found {
    let strings: BTreeSet<String> = meta
        .map(|(k, v)| format!("{k}={v}"))
        .filter(|s| s.len() <= 255)
        .collect();
    let mut total = 0;
    let kept: Vec<String> = strings
        .into_iter()
        .take_while(|s| {
            total += s.len() + 1;
            total <= MAX_TXT_BYTES
        })
        .collect();
    if kept.is_empty() {
        return Found::NoData;
    }
    Found::Records(
        vec![Record::from_rdata(
            owner.clone(),
            ttl,
            RData::TXT(TXT::new(kept)),
        )],
        Vec::new(),
    )
}
