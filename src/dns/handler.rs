//! [`DnsHandler`]: answers DNS queries from the newest catalog snapshot, as a hickory-server
//! [`RequestHandler`] and as raw bytes ([`DnsHandler::respond_raw`], for the UDP fast path
//! and NetSel's TCP loop), and [`encode`], which fits a reply into the size limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{
    Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::RecordType;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder, Queries};
use ipnet::IpNet;

use super::answer::{self, MAX_UDP_PAYLOAD, Plan, Reply, Zone, ZoneError, plan};
use super::forward::Forwarder;
use super::metrics::{self, DnsMetrics};
use super::settings::DnsSettings;
use crate::catalog::Catalog;

/// Answers DNS queries from the catalog. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DnsHandler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    catalog: Catalog,
    zone: Zone,
    forwarder: Option<Forwarder>,
    metrics: DnsMetrics,
}

/// A response ready to send, from [`DnsHandler::respond_raw`].
#[derive(Debug)]
pub(crate) enum RawAnswer {
    /// Send these bytes.
    Reply {
        bytes: Vec<u8>,
        qtype: Option<RecordType>,
        rcode: ResponseCode,
    },
    /// Forward the query upstream.
    Forward,
    /// Send nothing (not a query, or too short to answer).
    Drop,
}

impl DnsHandler {
    /// A handler for `catalog`, with the zone from `settings` and the reverse zone of
    /// `vip_cidr`.
    pub fn new(
        catalog: Catalog,
        settings: &DnsSettings,
        vip_cidr: IpNet,
        metrics: DnsMetrics,
    ) -> Result<DnsHandler, ZoneError> {
        let zone = Zone::new(settings, vip_cidr)?;
        let forwarder = (!settings.upstreams.is_empty()).then(|| {
            Forwarder::new(
                &settings.upstreams,
                Duration::from_millis(settings.forward_timeout_ms),
                settings.max_forwards,
            )
        });
        Ok(DnsHandler {
            inner: Arc::new(Inner {
                catalog,
                zone,
                forwarder,
                metrics,
            }),
        })
    }

    /// The zone it answers for.
    pub fn zone(&self) -> &Zone {
        &self.inner.zone
    }

    /// The metrics it records.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.inner.metrics
    }

    /// The catalog it reads.
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// What to answer to a parsed query, from the newest snapshot.
    pub fn plan(&self, req: &MessageRequest) -> Plan {
        plan(&self.inner.zone, &self.inner.catalog.snapshot(), req)
    }

    /// Answers a raw query without hickory's server loop: the wire response, or what to
    /// do instead. Never panics on any input.
    pub(crate) fn respond_raw(&self, raw: &[u8], udp: bool) -> RawAnswer {
        if raw.len() < 12 || raw[2] & 0x80 != 0 {
            // Too short to hold a header, or a response: never answer (no reflection).
            return RawAnswer::Drop;
        }
        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
        let any: SocketAddr = ([0, 0, 0, 0], 0).into();
        let req = match Request::from_bytes(raw.to_vec(), any, protocol) {
            Ok(req) => req,
            Err(_) => return self.formerr(raw),
        };
        match self.plan(&req) {
            Plan::Forward => RawAnswer::Forward,
            Plan::Reply(reply) => {
                let (bytes, _) = encode(&reply, &req.queries, payload_limit(&req, udp));
                self.inner
                    .metrics
                    .record(Some(reply.qtype), reply.metadata.response_code);
                RawAnswer::Reply {
                    bytes,
                    qtype: Some(reply.qtype),
                    rcode: reply.metadata.response_code,
                }
            }
        }
    }

    /// FORMERR for a query whose header parsed but whose body did not: the header echoed
    /// with QR set and no sections.
    fn formerr(&self, raw: &[u8]) -> RawAnswer {
        let mut bytes = vec![0u8; 12];
        bytes[..2].copy_from_slice(&raw[..2]);
        // QR, the query's opcode and RD; RCODE 1.
        bytes[2] = 0x80 | (raw[2] & 0x79);
        bytes[3] = 0x01;
        self.inner.metrics.record(None, ResponseCode::FormErr);
        RawAnswer::Reply {
            bytes,
            qtype: None,
            rcode: ResponseCode::FormErr,
        }
    }

    /// SERVFAIL for a forwarded query no upstream answered: the question echoed, RA set
    /// when forwarding, and an OPT (with the query's DO bit) when the query had one.
    pub(crate) fn servfail(&self, raw: &[u8]) -> Vec<u8> {
        let any: SocketAddr = ([0, 0, 0, 0], 0).into();
        if let Ok(req) = Request::from_bytes(raw.to_vec(), any, Protocol::Udp) {
            let mut metadata = Metadata::response_from_request(&req.metadata);
            metadata.response_code = ResponseCode::ServFail;
            metadata.recursion_available = self.inner.zone.forwarding();
            let reply = Reply {
                metadata,
                answers: Vec::new(),
                authorities: Vec::new(),
                additionals: Vec::new(),
                edns: req.edns.as_ref().map(answer::response_edns),
                qtype: RecordType::Unknown(0),
            };
            self.inner.metrics.record(None, ResponseCode::ServFail);
            return encode(&reply, &req.queries, payload_limit(&req, true)).0;
        }
        // Only forwarded queries get here, and they parsed; defensive.
        let mut bytes = vec![0u8; 12];
        bytes[..2].copy_from_slice(&raw[..2]);
        bytes[2] = 0x80 | (raw[2] & 0x79);
        bytes[3] = 0x02
            | if self.inner.zone.forwarding() {
                0x80
            } else {
                0
            };
        self.inner.metrics.record(None, ResponseCode::ServFail);
        bytes
    }

    /// Forwards a raw query upstream (see [`Forwarder`]).
    pub(crate) async fn forward_raw(&self, raw: &[u8]) -> Vec<u8> {
        match &self.inner.forwarder {
            Some(f) => match f.forward(raw).await {
                Some(resp) => {
                    self.inner.metrics.record(None, metrics::wire_rcode(&resp));
                    resp
                }
                None => self.servfail(raw),
            },
            None => self.servfail(raw),
        }
    }
}

/// The UDP payload limit for a response: the client's EDNS size (512 without EDNS),
/// at least 512 and at most [`MAX_UDP_PAYLOAD`]. TCP: the 64 KiB message limit.
fn payload_limit(req: &MessageRequest, udp: bool) -> u16 {
    if udp {
        req.max_payload().clamp(512, MAX_UDP_PAYLOAD)
    } else {
        u16::MAX
    }
}

/// How much of a reply fitted in the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Every section.
    All,
    /// The answer and authority sections, without the additional records (the SRV
    /// targets' addresses): not truncated, as they are not required data (RFC 2181 §9).
    NoAdditionals,
    /// Not even the answers: header, question and OPT with TC set.
    Truncated,
}

/// Encodes `reply` within `limit` bytes. A reply that does not fit is sent without its
/// additional records if that fits (as knot, nsd and unbound do), else as header,
/// question and OPT with TC set (RFC 2181 §9: the client retries over TCP). Returns the
/// bytes and how much fitted.
pub(crate) fn encode(reply: &Reply, queries: &Queries, limit: u16) -> (Vec<u8>, Fit) {
    let mut buf = Vec::with_capacity(512);
    for (additionals, fit) in [(true, Fit::All), (false, Fit::NoAdditionals)] {
        if !additionals && reply.additionals.is_empty() {
            break;
        }
        buf.clear();
        // Encoded whole and measured, not with the encoder's size limit: hickory's check
        // reserves room ahead and refuses records that would fit (a 500-byte answer was
        // cut at 512).
        let mut enc = BinEncoder::new(&mut buf);
        let extra = if additionals {
            &reply.additionals[..]
        } else {
            &[]
        };
        let resp = MessageResponseBuilder::new(queries, reply.edns.as_ref()).build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            extra.iter(),
        );
        if let Ok(info) = resp.destructive_emit(&mut enc)
            && !info.truncation
            && buf.len() <= usize::from(limit)
        {
            return (buf, fit);
        }
    }
    buf.clear();
    let mut md = reply.metadata;
    md.truncation = true;
    let ok = {
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(limit);
        MessageResponseBuilder::new(queries, reply.edns.as_ref())
            .build_no_records(md)
            .destructive_emit(&mut enc)
            .is_ok()
    };
    if !ok {
        // Not even the question fits (it always does within 512 bytes; defensive).
        buf.clear();
        md.response_code = ResponseCode::ServFail;
        let mut enc = BinEncoder::new(&mut buf);
        let header = Header {
            metadata: md,
            counts: HeaderCounts::default(),
        };
        let _ = hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut enc);
    }
    (buf, Fit::Truncated)
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = std::time::Instant::now();
        let udp = request.protocol() == Protocol::Udp;
        let sent = match self.plan(request) {
            Plan::Reply(reply) => {
                let rcode = reply.metadata.response_code;
                self.inner.metrics.record(Some(reply.qtype), rcode);
                let builder = MessageResponseBuilder::new(&request.queries, reply.edns.as_ref());
                let fit = if udp {
                    encode(&reply, &request.queries, payload_limit(request, udp)).1
                } else {
                    Fit::All
                };
                if fit == Fit::Truncated {
                    let mut md = reply.metadata;
                    md.truncation = true;
                    response_handle
                        .send_response(builder.build_no_records(md))
                        .await
                } else {
                    let extra = if fit == Fit::All {
                        &reply.additionals[..]
                    } else {
                        &[]
                    };
                    let resp = builder.build(
                        reply.metadata,
                        reply.answers.iter(),
                        reply.authorities.iter(),
                        std::iter::empty(),
                        extra.iter(),
                    );
                    response_handle.send_response(resp).await
                }
            }
            Plan::Forward => {
                let raw = self.forward_raw(request.as_slice()).await;
                let upstream = Message::from_vec(&raw).ok();
                match &upstream {
                    Some(msg) => {
                        // The upstream's answer as it is, OPT included (the fast path
                        // relays its bytes): it got the query's DO bit and answers to it.
                        let builder =
                            MessageResponseBuilder::new(&request.queries, msg.edns.as_ref());
                        let mut md = msg.metadata;
                        md.id = request.metadata.id;
                        let resp = builder.build(
                            md,
                            msg.answers.iter(),
                            msg.authorities.iter(),
                            std::iter::empty(),
                            msg.additionals.iter(),
                        );
                        response_handle.send_response(resp).await
                    }
                    None => {
                        let mut md = Metadata::response_from_request(&request.metadata);
                        md.response_code = ResponseCode::ServFail;
                        md.recursion_available = true;
                        let edns = request.edns.as_ref().map(answer::response_edns);
                        response_handle
                            .send_response(
                                MessageResponseBuilder::new(&request.queries, edns.as_ref())
                                    .build_no_records(md),
                            )
                            .await
                    }
                }
            }
        };
        match sent {
            Ok(info) => {
                self.inner.metrics.observe(started.elapsed(), 1);
                info
            }
            Err(e) => {
                tracing::debug!(error = %e, src = %request.src(), "cannot send DNS response");
                let mut md =
                    Metadata::new(request.metadata.id, MessageType::Response, OpCode::Query);
                md.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: md,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
