//! DNS metrics: queries answered, by query type and response code, and how long answers
//! took (a lock-free histogram; the UDP fast path records it once per received batch).

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{LatencyHistogram, exponential_bounds};

type Labels = [(&'static str, &'static str); 2];

const QTYPES: [&str; 11] = [
    "A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "ANY", "CNAME", "other", "none",
];
const RCODES: [&str; 8] = [
    "NOERROR", "NXDOMAIN", "REFUSED", "FORMERR", "SERVFAIL", "NOTIMP", "BADVERS", "other",
];

/// Query counters. Cheap to clone; counting is one atomic add on a handle resolved at
/// start-up (no label lookup on the hot path).
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    family: Family<Labels, Counter>,
    table: std::sync::Arc<Vec<Counter>>,
    tcp_refused: Counter,
    latency: LatencyHistogram,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let family = Family::<Labels, Counter>::default();
        let mut table = Vec::with_capacity(QTYPES.len() * RCODES.len());
        for q in QTYPES {
            for r in RCODES {
                table.push(family.get_or_create(&[("qtype", q), ("rcode", r)]).clone());
            }
        }
        DnsMetrics {
            family,
            table: std::sync::Arc::new(table),
            tcp_refused: Counter::default(),
            // 5 µs .. ~1.3 s: cached answers take microseconds, forwarded ones milliseconds.
            latency: LatencyHistogram::new(exponential_bounds(0.000_005, 2.0, 19)),
        }
    }
}

impl DnsMetrics {
    /// Registers the counters as `netsel_dns_queries_total{qtype,rcode}` and the latency
    /// histogram as `netsel_dns_query_duration_seconds`.
    pub fn register(&self, metrics_registry: &mut Registry) {
        metrics_registry.register(
            "dns_queries",
            "DNS queries answered, by query type and response code",
            self.family.clone(),
        );
        metrics_registry.register(
            "dns_tcp_refused_connections",
            "DNS-over-TCP connections closed at once because tcp_max_connections were open",
            self.tcp_refused.clone(),
        );
        metrics_registry.register(
            "dns_query_duration_seconds",
            "Time from receiving a query to sending its answer (UDP fast path: to sending \
             the batch it arrived in)",
            self.latency.clone(),
        );
    }

    /// Counts one DNS-over-TCP connection refused by the cap.
    pub fn tcp_refused(&self) {
        self.tcp_refused.inc();
    }

    /// DNS-over-TCP connections refused by the cap so far.
    pub fn tcp_refused_count(&self) -> u64 {
        self.tcp_refused.get()
    }

    /// Records how long `n` answered queries took each.
    #[inline]
    pub fn observe(&self, took: std::time::Duration, n: u64) {
        self.latency.observe_n(took, n);
    }

    /// Counts one answered query.
    pub fn record(&self, qtype: Option<RecordType>, rcode: ResponseCode) {
        let q = match qtype {
            None => 10,
            Some(RecordType::A) => 0,
            Some(RecordType::AAAA) => 1,
            Some(RecordType::SRV) => 2,
            Some(RecordType::PTR) => 3,
            Some(RecordType::TXT) => 4,
            Some(RecordType::SOA) => 5,
            Some(RecordType::NS) => 6,
            Some(RecordType::ANY) => 7,
            Some(RecordType::CNAME) => 8,
            Some(_) => 9,
        };
        self.table[q * RCODES.len() + rcode_index(rcode)].inc();
    }

    /// The count for one (qtype, rcode) pair, by label text (for tests).
    pub fn count(&self, qtype: &str, rcode: &str) -> u64 {
        let (Some(q), Some(r)) = (
            QTYPES.iter().position(|x| *x == qtype),
            RCODES.iter().position(|x| *x == rcode),
        ) else {
            return 0;
        };
        self.table[q * RCODES.len() + r].get()
    }
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::NXDomain => 1,
        ResponseCode::Refused => 2,
        ResponseCode::FormErr => 3,
        ResponseCode::ServFail => 4,
        ResponseCode::NotImp => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

/// The response code in a wire response's header (low four bits only; BADVERS needs the
/// OPT record, so the caller passes what it knows when it can).
pub(crate) fn wire_rcode(resp: &[u8]) -> ResponseCode {
    resp.get(3)
        .map(|b| ResponseCode::from_low(b & 0x0f))
        .unwrap_or(ResponseCode::ServFail)
}
