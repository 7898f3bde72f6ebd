//! The UDP fast path: a few threads receiving on one socket, each keeping the encoded
//! answer of every distinct query it has answered at the current catalog index.
//!
//! A cached answer is keyed by the query's bytes after its id, with the question name
//! lower-cased. Two queries with the same key differ only in id and in the letter case of
//! the question (the key holds the header flags and the whole OPT record, so a query with
//! the DO bit and one without never share an answer, and each gets its own DO bit back),
//! so the cached answer is copied and the id and the question's bytes are patched in (answers point at the question by compression, so their owner names follow
//! its case too). The cache belongs to one catalog index: when the index moves, it is
//! dropped before the next lookup, so an answer is never older than the catalog.
//! Entries are bounded per thread; a full cache is cleared.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::handler::{DnsHandler, RawAnswer};
use super::settings::DnsSettings;

/// How often an idle worker checks for shutdown.
const POLL: Duration = Duration::from_millis(200);
/// Most UDP workers the default (`udp_workers = 0`) starts, on top of the crate's
/// worker rule (`sys::worker_threads`). Unlike the proxies' workers, which each have a
/// listening socket of their own (`SO_REUSEPORT`), these all read one shared UDP socket:
/// one receive queue, so past a few threads more of them mostly wait on each other. An
/// explicit `udp_workers` (up to 64) is not held to it.
const DEFAULT_MAX_WORKERS: usize = 8;
/// Largest query cached (longer ones carry options that make them unique anyway).
const MAX_KEY: usize = 512;

/// Starts the UDP workers on `socket`; they stop soon after `shutdown`.
pub(super) fn spawn(
    handler: DnsHandler,
    socket: UdpSocket,
    settings: &DnsSettings,
    shutdown: CancellationToken,
) -> io::Result<Vec<JoinHandle<()>>> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(POLL))?;
    let n = match settings.udp_workers {
        0 => crate::sys::worker_threads(0).min(DEFAULT_MAX_WORKERS),
        n => n,
    };
    let rt = tokio::runtime::Handle::current();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let worker = Worker {
            handler: handler.clone(),
            socket: socket.try_clone()?,
            shutdown: shutdown.clone(),
            rt: rt.clone(),
            cache: HashMap::new(),
            cache_index: u64::MAX,
            max_entries: settings.cache_entries,
        };
        out.push(tokio::task::spawn_blocking(move || worker.run()));
    }
    Ok(out)
}

struct Cached {
    bytes: Box<[u8]>,
    /// Where the question name is repeated uncompressed (record owners), to patch too.
    owners: Box<[usize]>,
    qtype: Option<RecordType>,
    rcode: ResponseCode,
}

pub(super) struct Worker {
    handler: DnsHandler,
    socket: UdpSocket,
    shutdown: CancellationToken,
    rt: tokio::runtime::Handle,
    cache: HashMap<Box<[u8]>, Cached>,
    cache_index: u64,
    max_entries: usize,
}

impl Worker {
    fn run(mut self) {
        let mut key = Vec::with_capacity(MAX_KEY);
        #[cfg(target_os = "linux")]
        {
            let mut batch = crate::sys::mmsg::Batch::new();
            let mut outs: Vec<Vec<u8>> = (0..crate::sys::mmsg::BATCH)
                .map(|_| Vec::with_capacity(1232))
                .collect();
            let mut ready: Vec<usize> = Vec::with_capacity(crate::sys::mmsg::BATCH);
            while !self.shutdown.is_cancelled() {
                let n = match batch.recv(&self.socket) {
                    Ok(n) => n,
                    Err(e) => {
                        self.recv_error(e);
                        continue;
                    }
                };
                // One clock read per batch: every answer in it leaves with the batch.
                let started = Instant::now();
                ready.clear();
                for (i, out) in outs.iter_mut().enumerate().take(n) {
                    let (query, src) = batch.datagram(i);
                    let Some(src) = src.filter(|s| s.port() != 0) else {
                        continue;
                    };
                    if self.answer(query, src, &mut key, out) {
                        ready.push(i);
                    }
                }
                let replies: Vec<(usize, &[u8])> =
                    ready.iter().map(|&i| (i, outs[i].as_slice())).collect();
                batch.send(&self.socket, &replies);
                if !ready.is_empty() {
                    self.handler
                        .metrics()
                        .observe(started.elapsed(), ready.len() as u64);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut buf = vec![0u8; 4096];
            let mut out = Vec::with_capacity(1232);
            while !self.shutdown.is_cancelled() {
                let (n, src) = match self.socket.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) => {
                        self.recv_error(e);
                        continue;
                    }
                };
                let started = Instant::now();
                if src.port() != 0 && self.answer(&buf[..n], src, &mut key, &mut out) {
                    if let Err(e) = self.socket.send_to(&out, src) {
                        tracing::debug!(error = %e, dst = %src, "DNS UDP send failed");
                    }
                    self.handler.metrics().observe(started.elapsed(), 1);
                }
            }
        }
    }

    fn recv_error(&self, e: io::Error) {
        // Timeouts let the loop see shutdown; anything else (e.g. an ICMP error reported
        // on a later call) is never fatal.
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        ) {
            tracing::debug!(error = %e, "DNS UDP receive error");
        }
    }

    /// Puts the answer to `query` in `out`; returns whether there is one to send now.
    pub(super) fn answer(
        &mut self,
        query: &[u8],
        src: SocketAddr,
        key: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> bool {
        let index = self.handler.catalog().index();
        if index != self.cache_index {
            self.cache.clear();
            self.cache_index = index;
        }
        let qend = cache_key(query, key);
        if let Some(qend) = qend
            && let Some(hit) = self.cache.get(key.as_slice())
        {
            out.clear();
            out.extend_from_slice(&hit.bytes);
            out[..2].copy_from_slice(&query[..2]);
            out[12..qend].copy_from_slice(&query[12..qend]);
            for &at in hit.owners.iter() {
                out[at..at + qend - 12].copy_from_slice(&query[12..qend]);
            }
            self.handler.metrics().record(hit.qtype, hit.rcode);
            return true;
        }
        match self.handler.respond_raw(query, true) {
            RawAnswer::Reply {
                bytes,
                qtype,
                rcode,
            } => {
                out.clear();
                out.extend_from_slice(&bytes);
                // Cache only answers that echo the one question at the same place.
                if let Some(qend) = qend
                    && bytes.len() >= qend
                    && bytes[4..6] == [0, 1]
                    && let Some(owners) = owner_offsets(&bytes, qend)
                {
                    if self.cache.len() >= self.max_entries {
                        self.cache.clear();
                    }
                    self.cache.insert(
                        key.as_slice().into(),
                        Cached {
                            bytes: bytes.into(),
                            owners: owners.into(),
                            qtype,
                            rcode,
                        },
                    );
                }
                true
            }
            RawAnswer::Forward => {
                let handler = self.handler.clone();
                let query = query.to_vec();
                match self.socket.try_clone() {
                    Ok(socket) => {
                        let started = Instant::now();
                        self.rt.spawn(async move {
                            let resp = handler.forward_raw(&query).await;
                            if socket.send_to(&resp, src).is_ok() {
                                handler.metrics().observe(started.elapsed(), 1);
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot forward DNS query"),
                }
                false
            }
            RawAnswer::Drop => false,
        }
    }
}

#[cfg(test)]
impl Worker {
    /// A worker on a socket of its own that nothing sends to, for calling
    /// [`Worker::answer`] directly. Call within a Tokio runtime.
    pub(super) fn for_test(handler: DnsHandler) -> Worker {
        Worker {
            handler,
            socket: UdpSocket::bind("127.0.0.1:0").expect("a UDP socket"),
            shutdown: CancellationToken::new(),
            rt: tokio::runtime::Handle::current(),
            cache: HashMap::new(),
            cache_index: u64::MAX,
            max_entries: 1024,
        }
    }

    /// How many answers are cached.
    pub(super) fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// Fills `key` with the query minus its id, the question name lower-cased. Returns the
/// end offset of the question name, or `None` when the query is not cacheable: not
/// exactly one question, a compressed or malformed name, or too long.
pub(crate) fn cache_key(query: &[u8], key: &mut Vec<u8>) -> Option<usize> {
    key.clear();
    if query.len() < 12 || query.len() > MAX_KEY || query[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        i += 1 + len;
    }
    // The question's type and class must be present.
    if query.len() < i + 4 {
        return None;
    }
    // Cached only when nothing after the question can name anything: no answer or
    // authority records, and at most an OPT with the root name. Otherwise a compressed
    // name there could point into the id, which the key leaves out, and two queries with
    // one key would mean different things (found by the `dns` fuzz target).
    let counts = &query[6..12];
    let rest = &query[i + 4..];
    let cacheable = match counts {
        [0, 0, 0, 0, 0, 0] => rest.is_empty(),
        [0, 0, 0, 0, 0, 1] => rest.len() >= 11 && rest[0] == 0 && rest[1..3] == [0, 41],
        _ => false,
    };
    if !cacheable {
        return None;
    }
    key.extend_from_slice(&query[2..]);
    key[10..i - 2].make_ascii_lowercase();
    Some(i)
}

/// The offsets of every record owner name in `resp` that repeats the question name
/// (`resp[12..qend]`) uncompressed, case-insensitively. `None` if the response does not
/// walk cleanly (then it is not cached).
pub(crate) fn owner_offsets(resp: &[u8], qend: usize) -> Option<Vec<usize>> {
    let qname = resp.get(12..qend)?;
    let count = |i: usize| Some(u16::from_be_bytes([*resp.get(i)?, *resp.get(i + 1)?]) as usize);
    let records = count(6)? + count(8)? + count(10)?;
    let mut owners = Vec::new();
    let mut i = qend + 4;
    for _ in 0..records {
        if resp
            .get(i..i + qname.len())
            .is_some_and(|n| n.eq_ignore_ascii_case(qname))
        {
            owners.push(i);
        }
        // Skip the owner name: labels up to a zero byte or a pointer.
        loop {
            let len = *resp.get(i)? as usize;
            if len == 0 {
                i += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            if len > 63 {
                return None;
            }
            i += 1 + len;
        }
        // Type, class, TTL, then RDLENGTH and the RDATA.
        let rdlen = count(i + 8)?;
        i += 10 + rdlen;
    }
    (i == resp.len()).then_some(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_id_and_case() {
        let q1 = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03WeB\x06netsel\x00\x00\x01\x00\x01";
        let q2 = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x06NETSEL\x00\x00\x01\x00\x01";
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        assert_eq!(cache_key(q1, &mut k1), Some(24));
        assert_eq!(cache_key(q2, &mut k2), Some(24));
        assert_eq!(k1, k2);
        // The length bytes are not letters and stay as they are.
        assert_eq!(&k1[10..14], b"\x03web");
    }

    #[test]
    fn tag_queries_have_keys_of_their_own() {
        // `_web._tcp` (every instance) and `_web._v1` (a tag) never share an answer; nor do
        // two tags whose labels have the same length.
        let q = |name: &[u8]| {
            let mut q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00".to_vec();
            q.extend_from_slice(name);
            q.extend_from_slice(b"\x00\x21\x00\x01");
            let mut k = Vec::new();
            cache_key(&q, &mut k).unwrap();
            k
        };
        let tcp = q(b"\x04_web\x04_tcp\x06netsel\x00");
        let v1 = q(b"\x04_web\x03_v1\x06netsel\x00");
        let v2 = q(b"\x04_web\x04_v22\x06netsel\x00");
        let upper = q(b"\x04_WEB\x03_V1\x06NETSEL\x00");
        assert_ne!(tcp, v1);
        assert_ne!(tcp, v2);
        assert_ne!(v1, v2);
        assert_eq!(v1, upper, "tags are case-insensitive, as their answers are");
    }

    #[test]
    fn owners_that_repeat_the_question_are_found() {
        // Question WeB.netsel A; answer owner WeB.netsel (uncompressed), then an SOA-ish
        // record owned by the apex via a pointer.
        let mut r = b"\x12\x34\x84\x00\x00\x01\x00\x01\x00\x01\x00\x00".to_vec();
        r.extend_from_slice(b"\x03WeB\x06netsel\x00\x00\x01\x00\x01");
        let owner = r.len();
        r.extend_from_slice(
            b"\x03WeB\x06netsel\x00\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x7f\x00\x00\x01",
        );
        r.extend_from_slice(b"\xc0\x10\x00\x06\x00\x01\x00\x00\x00\x05\x00\x01\x00");
        assert_eq!(owner_offsets(&r, 24), Some(vec![owner]));
        // Trailing garbage or a short record: not cacheable.
        let mut bad = r.clone();
        bad.push(0);
        assert_eq!(owner_offsets(&bad, 24), None);
        assert_eq!(owner_offsets(&r[..r.len() - 1], 24), None);
    }

    #[test]
    fn uncacheable_queries() {
        let mut k = Vec::new();
        for q in [
            &b"\x12\x34"[..],
            b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01",
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01",
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x09web",
            // An additional record whose name points into the header (at the id, which
            // the key leaves out): found by the `dns` fuzz target.
            include_bytes!("../../fuzz/seeds/dns/id-pointer-5f51a912"),
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x03web\x00\x00\x01\x00\x01\xc0\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
            // Trailing bytes after the question, or an answer record in a query.
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01\x00",
            b"\x12\x34\x01\x00\x00\x01\x00\x01\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01",
        ] {
            assert_eq!(cache_key(q, &mut k), None, "{q:?}");
        }
        // With an ordinary OPT (root name) the query is cached.
        let edns = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x03web\x00\x00\x01\x00\x01\x00\x00\x29\x10\x00\x00\x00\x80\x00\x00\x00";
        assert_eq!(cache_key(edns, &mut k), Some(17));
    }
}
