//! Resolving a service through NetSel's DNS server, with no DNS library: the client-only
//! build stays free of server dependencies. Two small queries (the service's address and
//! its SRV records), over UDP, retried over TCP when truncated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::error::ClientError;
use crate::protocol::ResolvedInstance;

/// NetSel's default DNS domain.
pub const DEFAULT_DOMAIN: &str = "netsel.";
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
const T_A: u16 = 1;
const T_AAAA: u16 = 28;
const T_SRV: u16 = 33;

/// What DNS says about a service: its VIP and its healthy instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsResolution {
    /// The service name asked for.
    pub name: String,
    /// The service VIP (`NAME.<domain>` A or AAAA).
    pub vip: IpAddr,
    /// Healthy instances, from `_NAME._tcp.<domain>` SRV and its glue.
    pub instances: Vec<ResolvedInstance>,
}

/// Resolves service `name` through the NetSel DNS server at `dns_addr`, in the default
/// domain `netsel.`. See [`dns_resolve_in`].
pub async fn dns_resolve(dns_addr: SocketAddr, name: &str) -> Result<DnsResolution, ClientError> {
    dns_resolve_in(dns_addr, name, DEFAULT_DOMAIN).await
}

/// Resolves service `name` in `domain` through the NetSel DNS server at `dns_addr`:
/// `NAME.<domain>` A (then AAAA) for the VIP and `_NAME._tcp.<domain>` SRV for the
/// instances. A name that does not exist is [`ClientError::UnknownService`].
pub async fn dns_resolve_in(
    dns_addr: SocketAddr,
    name: &str,
    domain: &str,
) -> Result<DnsResolution, ClientError> {
    let domain = domain.trim_end_matches('.');
    let host = format!("{name}.{domain}");
    let mut vip = None;
    for qtype in [T_A, T_AAAA] {
        let resp = exchange(dns_addr, &host, qtype).await?;
        if resp.rcode == 3 {
            return Err(ClientError::UnknownService(name.to_string()));
        }
        check_rcode(&resp)?;
        vip = resp.answers.iter().find_map(|rr| rr.addr());
        if vip.is_some() {
            break;
        }
    }
    let vip = vip.ok_or_else(|| ClientError::UnknownService(name.to_string()))?;
    let resp = exchange(dns_addr, &format!("_{name}._tcp.{domain}"), T_SRV).await?;
    check_rcode(&resp)?;
    let mut instances = Vec::new();
    for rr in &resp.answers {
        let RData::Srv {
            weight,
            port,
            target,
        } = &rr.data
        else {
            continue;
        };
        let Some(ip) = resp
            .additionals
            .iter()
            .find(|g| g.name.eq_ignore_ascii_case(target))
            .and_then(|g| g.addr())
        else {
            continue;
        };
        let id = target.split('.').next().unwrap_or_default().to_string();
        instances.push(ResolvedInstance {
            id,
            endpoint: SocketAddr::new(ip, *port),
            weight: u32::from(*weight),
            // DNS carries no lease; the registry's RESOLVE does.
            lease_remaining: None,
        });
    }
    Ok(DnsResolution {
        name: name.to_string(),
        vip,
        instances,
    })
}

fn check_rcode(resp: &Response) -> Result<(), ClientError> {
    match resp.rcode {
        0 | 3 => Ok(()),
        code => Err(ClientError::Rejected(format!("DNS response code {code}"))),
    }
}

#[derive(Debug)]
enum RData {
    Addr(IpAddr),
    Srv {
        weight: u16,
        port: u16,
        target: String,
    },
    Other,
}

#[derive(Debug)]
struct Rr {
    name: String,
    data: RData,
}

impl Rr {
    fn addr(&self) -> Option<IpAddr> {
        match self.data {
            RData::Addr(ip) => Some(ip),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Response {
    rcode: u8,
    truncated: bool,
    answers: Vec<Rr>,
    additionals: Vec<Rr>,
}

async fn exchange(dns: SocketAddr, name: &str, qtype: u16) -> Result<Response, ClientError> {
    let id = fastrand::u16(..);
    let query = encode_query(id, name, qtype)?;
    let local: SocketAddr = if dns.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(dns).await?;
    sock.send(&query).await?;
    let mut buf = vec![0u8; 1232];
    let udp = tokio::time::timeout(DNS_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                return Ok::<usize, std::io::Error>(n);
            }
        }
    })
    .await
    .map_err(|_| ClientError::Timeout(DNS_TIMEOUT))??;
    let resp = parse(&buf[..udp]).ok_or_else(malformed)?;
    if !resp.truncated {
        return Ok(resp);
    }
    // Too big for UDP: the same question over TCP.
    tokio::time::timeout(DNS_TIMEOUT, async {
        let mut s = TcpStream::connect(dns).await?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        s.write_all(&framed).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await?;
        parse(&body).ok_or_else(malformed)
    })
    .await
    .map_err(|_| ClientError::Timeout(DNS_TIMEOUT))?
}

fn malformed() -> ClientError {
    ClientError::Rejected("malformed DNS response".into())
}

fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, ClientError> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // RD clear (NetSel is authoritative), one question.
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(ClientError::Rejected(format!("'{name}' is not a DNS name")));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    if q.len() > 12 + 254 {
        return Err(ClientError::Rejected(format!("'{name}' is too long")));
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    Ok(q)
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Reads a (possibly compressed) name at `i`; returns it and the offset after it.
fn read_name(b: &[u8], mut i: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *b.get(i)? as usize;
        match len {
            0 => return Some((name, end.unwrap_or(i + 1))),
            l if l & 0xc0 == 0xc0 => {
                end.get_or_insert(i + 2);
                i = (u16_at(b, i)? & 0x3fff) as usize;
            }
            l if l <= 63 => {
                let label = b.get(i + 1..i + 1 + l)?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(std::str::from_utf8(label).ok()?);
                i += 1 + l;
            }
            _ => return None,
        }
    }
    None
}

fn parse(b: &[u8]) -> Option<Response> {
    if b.len() < 12 || b[2] & 0x80 == 0 {
        return None;
    }
    let (qd, an, ns, ar) = (u16_at(b, 4)?, u16_at(b, 6)?, u16_at(b, 8)?, u16_at(b, 10)?);
    let mut i = 12;
    for _ in 0..qd {
        i = read_name(b, i)?.1 + 4;
    }
    let mut sections = [Vec::new(), Vec::new(), Vec::new()];
    for (section, count) in sections.iter_mut().zip([an, ns, ar]) {
        for _ in 0..count {
            let (name, next) = read_name(b, i)?;
            let rtype = u16_at(b, next)?;
            let rdlen = u16_at(b, next + 8)? as usize;
            let start = next + 10;
            let rd = b.get(start..start + rdlen)?;
            let data = match (rtype, rdlen) {
                (T_A, 4) => RData::Addr(IpAddr::from(<[u8; 4]>::try_from(rd).ok()?)),
                (T_AAAA, 16) => RData::Addr(IpAddr::from(<[u8; 16]>::try_from(rd).ok()?)),
                (T_SRV, 7..) => RData::Srv {
                    weight: u16_at(rd, 2)?,
                    port: u16_at(rd, 4)?,
                    target: read_name(b, start + 6)?.0,
                },
                _ => RData::Other,
            };
            section.push(Rr { name, data });
            i = start + rdlen;
        }
    }
    let [answers, _authorities, additionals] = sections;
    Some(Response {
        rcode: b[3] & 0x0f,
        truncated: b[2] & 0x02 != 0,
        answers,
        additionals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encoding() {
        let q = encode_query(0x0102, "web.netsel.", T_A).unwrap();
        assert_eq!(
            q,
            b"\x01\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x06netsel\x00\x00\x01\x00\x01"
        );
        assert!(encode_query(1, "a..b", T_A).is_err());
        assert!(encode_query(1, &"a".repeat(64), T_A).is_err());
    }

    #[test]
    fn parse_never_panics_and_follows_pointers() {
        // A response: one question, one A answer whose name points at the question.
        let mut r = b"\x01\x02\x84\x00\x00\x01\x00\x01\x00\x00\x00\x00\x03web\x06netsel\x00\x00\x01\x00\x01".to_vec();
        r.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x7f\x4d\x00\x01");
        let p = parse(&r).unwrap();
        assert_eq!(p.answers[0].name, "web.netsel");
        assert_eq!(p.answers[0].addr(), Some(IpAddr::from([127, 77, 0, 1])));
        for cut in 0..r.len() {
            let _ = parse(&r[..cut]);
        }
        // A pointer loop ends.
        let mut l = b"\x01\x02\x84\x00\x00\x01\x00\x00\x00\x00\x00\x00".to_vec();
        l.extend_from_slice(b"\xc0\x0c\x00\x01\x00\x01");
        assert!(parse(&l).is_none());
    }
}
