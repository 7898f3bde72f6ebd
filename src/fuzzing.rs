//! Entry points for the fuzz targets in `fuzz/` and for property tests.
//!
//! **Not a stable API.** This module exists only so that the cargo-fuzz targets (a
//! separate crate) can reach parsers and decoders that are crate-internal. Each function
//! takes arbitrary bytes, runs them through the real code the way the server does, and
//! panics only when a property the code promises does not hold (a parsed request that
//! does not survive re-encoding, framing that depends on how the bytes were split, …).
//! Any other panic is a bug in the code under test. See `docs/fuzzing.md`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use hickory_proto::op::Message;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request as DnsRequest;
use tokio::io::{AsyncRead, ReadBuf};

use crate::catalog::{Catalog, Endpoint, Registration};
use crate::config::Settings;
use crate::dns::fast::{cache_key, owner_offsets};
use crate::dns::{DnsHandler, DnsMetrics, RawAnswer};
use crate::model::Op;
use crate::protocol::{self, Request, SEED_FRAME_LEN};
use crate::proxy::balance::Balancer;
use crate::proxy::http::h1_upstream::{read_upstream_head, response_framing};
use crate::proxy::http::message_framing::{ChunkStep, ChunkedBody, Scanner, Verdict, parse_length};
use crate::proxy::http::{HeadReading, HttpProxy};
use crate::registry::codec::{self, Decoded, Frame};
use crate::store::StoreSettings;
use crate::store::{embedded, wal};

/// Split positions drawn from a seed: piece lengths of 1 to 64 bytes.
struct Splits(u64);

impl Splits {
    fn new(seed: &[u8]) -> Splits {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for &b in seed {
            s = (s ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Splits(s | 1)
    }

    fn next_len(&mut self) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // Mostly tiny pieces (the interesting splits), sometimes larger ones.
        if self.0 & 3 == 0 {
            1 + (self.0 >> 8) as usize % 64
        } else {
            1 + (self.0 >> 8) as usize % 4
        }
    }

    /// `bytes` cut into pieces.
    fn pieces<'a>(&mut self, mut bytes: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let n = self.next_len().min(bytes.len());
            let (a, b) = bytes.split_at(n);
            out.push(a);
            bytes = b;
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Line protocol
// ---------------------------------------------------------------------------------------

/// The registry's line protocol: both parsers on the raw bytes, the frame splitter fed in
/// pieces (the first byte picks the split points) exactly as a connection feeds it, and a
/// re-encoding round trip for every request that parses.
///
/// Panics if a parsed request does not come back equal after [`Request::encode`], or if
/// the frames found depend on how the stream was split.
pub fn line_protocol(bytes: &[u8]) {
    if let Ok(req) = protocol::parse_line(bytes) {
        request_round_trip(&req);
    }
    if let Ok(req) = protocol::parse_seed_frame(&bytes[..bytes.len().min(SEED_FRAME_LEN)]) {
        request_round_trip(&req);
    }
    let Some((&seed, stream)) = bytes.split_first() else {
        return;
    };
    let whole = registry_stream(&[stream]);
    let split = registry_stream(&Splits::new(&[seed]).pieces(stream));
    assert_eq!(whole, split, "framing depends on how the stream was split");
}

/// What a registry connection makes of a byte stream: its messages, parsed, and how it
/// ends.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    /// The bytes ran out (a partial message may remain).
    Open { left: usize, padding_only: bool },
    /// A message over the limits closed the connection.
    TooLong,
}

type Parsed = Result<Request, protocol::ProtocolError>;

/// Runs the decode loop of `registry::Connection::run` over `pieces`, parsing each frame
/// as the connection would; at the end, a seed frame still waiting for its padding is
/// taken as the connection does when the peer goes quiet.
fn registry_stream(pieces: &[&[u8]]) -> (Vec<(bool, Parsed)>, StreamEnd) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut padding_only = false;
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match codec::decode(&mut buf) {
                Decoded::Frame(frame) => out.push(parse_frame(&frame)),
                Decoded::NeedMore { padding_only: p } => {
                    padding_only = p;
                    break;
                }
                Decoded::TooLong => return (out, StreamEnd::TooLong),
            }
        }
    }
    if padding_only {
        let frame = codec::take_partial_seed(&mut buf);
        out.push(parse_frame(&frame));
    }
    let end = StreamEnd::Open {
        left: buf.len(),
        padding_only,
    };
    (out, end)
}

fn parse_frame(frame: &Frame) -> (bool, Parsed) {
    let parsed = match frame {
        Frame::Seed(b) => protocol::parse_seed_frame(b),
        Frame::Line(b) => protocol::parse_line(b),
    };
    if let Ok(req) = &parsed {
        request_round_trip(req);
    }
    (matches!(frame, Frame::Seed(_)), parsed)
}

/// `req` encoded, framed by the registry's splitter and parsed again must be `req`.
fn request_round_trip(req: &Request) {
    let encoded = req.encode();
    let mut buf = BytesMut::from(&encoded[..]);
    let again = match codec::decode(&mut buf) {
        Decoded::Frame(Frame::Line(l)) => protocol::parse_line(&l),
        Decoded::Frame(Frame::Seed(s)) => protocol::parse_seed_frame(&s),
        other => panic!("{req:?} encodes to {encoded:?}, which frames as {other:?}"),
    };
    assert!(buf.is_empty(), "{req:?} encodes to more than one frame");
    assert_eq!(
        again.as_ref(),
        Ok(req),
        "{req:?} does not survive encoding as {encoded:?}"
    );
}

// ---------------------------------------------------------------------------------------
// DNS
// ---------------------------------------------------------------------------------------

struct Dns {
    // Kept alive for the catalog; queries are answered without it.
    _rt: tokio::runtime::Runtime,
    handler: DnsHandler,
}

/// A current-thread runtime, the default settings and an empty in-memory catalog made
/// inside that runtime (whose tasks it keeps alive): the fixture of the targets that need
/// a catalog.
fn catalog_fixture() -> (tokio::runtime::Runtime, Settings, Catalog) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let s = Settings::ephemeral();
    let mut cs = s.catalog_settings();
    cs.probe_vip_bind = false;
    let catalog = {
        let _enter = rt.enter();
        Catalog::in_memory(cs).expect("a catalog")
    };
    (rt, s, catalog)
}

fn dns() -> &'static Dns {
    static DNS: OnceLock<Dns> = OnceLock::new();
    DNS.get_or_init(|| {
        let (rt, s, catalog) = catalog_fixture();
        let handler = {
            let _enter = rt.enter();
            DnsHandler::new(catalog, &s.dns, s.network.vip_cidr, DnsMetrics::default())
                .expect("a DNS handler")
        };
        type Meta<'a> = &'a [(&'a str, &'a str)];
        let services: [(&str, &str, Meta); 4] = [
            ("web", "127.0.0.1:8000", &[("version", "2"), ("zone", "a")]),
            ("web", "127.0.0.2:8001", &[]),
            ("api", "[::1]:9000", &[("k", "a long value with spaces")]),
            ("db-primary", "127.0.0.3:5432", &[]),
        ];
        rt.block_on(async {
            for (name, ep, meta) in services {
                let mut reg = Registration::new(name, Endpoint::Explicit(ep.parse().unwrap()));
                reg.weight = Some(3);
                reg.tags = vec!["fuzz".into()];
                for (k, v) in meta {
                    reg.meta.insert(k.to_string(), v.to_string());
                }
                handler
                    .catalog()
                    .register(reg)
                    .await
                    .expect("a registration");
            }
        });
        Dns { _rt: rt, handler }
    })
}

/// One DNS query (arbitrary bytes) against a catalog holding a few services: the planner
/// on the parsed request, the raw UDP and TCP answer paths, and the UDP fast path's cache
/// (key, owner offsets and the patched copy a cache hit sends).
///
/// Panics if a cache hit for the same query with another id and question case would
/// differ from what the uncached path answers.
pub fn dns_query(bytes: &[u8]) {
    let d = dns();
    let h = &d.handler;
    let any = ([0, 0, 0, 0], 0).into();
    if let Ok(req) = DnsRequest::from_bytes(bytes.to_vec(), any, Protocol::Udp) {
        let _ = crate::dns::plan(h.zone(), &h.catalog().snapshot(), &req);
    }
    let _ = h.respond_raw(bytes, false);
    let answer = h.respond_raw(bytes, true);
    fast_path(h, bytes, answer);
}

/// What `dns::fast::Worker::answer` does with a query and its uncached answer, checked
/// against the uncached answer to a variant of the query that hits the same cache entry.
fn fast_path(h: &DnsHandler, query: &[u8], answer: RawAnswer) {
    let mut key = Vec::new();
    let Some(qend) = cache_key(query, &mut key) else {
        return;
    };
    assert!(qend + 4 <= query.len() && key.len() == query.len() - 2);
    let RawAnswer::Reply { bytes, .. } = answer else {
        return;
    };
    // The conditions under which the worker caches an answer.
    if bytes.len() < qend || bytes[4..6] != [0, 1] {
        return;
    }
    let Some(owners) = owner_offsets(&bytes, qend) else {
        return;
    };
    // Another id, every letter of the question name in the other case.
    let mut variant = query.to_vec();
    variant[0] ^= 0x5a;
    variant[1] ^= 0xa5;
    for b in &mut variant[12..qend] {
        if b.is_ascii_alphabetic() {
            *b ^= 0x20;
        }
    }
    let mut vkey = Vec::new();
    assert_eq!(cache_key(&variant, &mut vkey), Some(qend));
    assert_eq!(vkey, key, "the variant must hit the same cache entry");
    // The cache key leaves out the id, but a compressed name elsewhere in the query can
    // point into the id and so read differently (found by this target; see
    // docs/fuzzing.md). Compare only queries that mean the same apart from id and case.
    let meaning = |q: &[u8]| {
        Message::from_vec(q)
            .map(|mut m| {
                m.metadata.id = 0;
                m
            })
            .map_err(|e| e.to_string())
    };
    if meaning(query) != meaning(&variant) {
        return;
    }
    // The hit, patched as the worker patches it.
    let mut out = bytes.clone();
    out[..2].copy_from_slice(&variant[..2]);
    out[12..qend].copy_from_slice(&variant[12..qend]);
    for &at in owners.iter() {
        out[at..at + qend - 12].copy_from_slice(&variant[12..qend]);
    }
    let fresh = match h.respond_raw(&variant, true) {
        RawAnswer::Reply { bytes, .. } => bytes,
        other => panic!("the variant of a cached query is answered {other:?}"),
    };
    // The id and the question are echoed byte for byte (resolvers check them, 0x20
    // included); the rest must mean the same. Names elsewhere may differ in case only:
    // the cached copy compresses against the patched question, a fresh answer may not.
    assert_eq!(
        out[..qend],
        fresh[..qend],
        "a cache hit echoes another question"
    );
    let parsed = |b: &[u8]| Message::from_vec(b).map_err(|e| e.to_string());
    assert_eq!(
        parsed(&out),
        parsed(&fresh),
        "a cache hit differs from the uncached answer (query {query:?})"
    );
}

// ---------------------------------------------------------------------------------------
// HTTP proxy
// ---------------------------------------------------------------------------------------

/// The HTTP proxy's byte-level parsing: the smuggling guard's head scanner, the chunked
/// body decoder, `Content-Length` values, and an instance's response head and framing.
/// The first two bytes choose the head size limit and the split points; the rest is the
/// stream.
///
/// Panics if a verdict depends on how the stream was split (the scanner, the chunked
/// decoder and the response-head reader all promise it does not), or if a length is
/// accepted that is not plain digits.
pub fn http_head(bytes: &[u8]) {
    let (ctl, data) = bytes.split_at(bytes.len().min(2));
    let c0 = ctl.first().copied().unwrap_or(0);
    let max_head = if c0 & 0x80 != 0 {
        64 * 1024
    } else {
        16 + usize::from(c0) * 8
    };
    let mut splits = Splits::new(ctl);
    let pieces = splits.pieces(data);

    // The guard's scanner.
    assert_eq!(
        scan(max_head, &[data]),
        scan(max_head, &pieces),
        "the guard's verdict depends on the split"
    );

    // A chunked body.
    assert_eq!(
        chunked(&[data]),
        chunked(&pieces),
        "chunked framing depends on the split"
    );

    // Content-Length values.
    for v in data.split(|b| *b == b'\n').take(8) {
        let v = v.trim_ascii();
        if let Some(n) = parse_length(v) {
            assert!(v.iter().all(u8::is_ascii_digit) && v.len() <= 19);
            let digits = std::str::from_utf8(v).unwrap().trim_start_matches('0');
            assert_eq!(n.to_string(), if digits.is_empty() { "0" } else { digits });
        } else {
            assert!(v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit));
        }
    }

    // An instance's response head, read whole and in pieces.
    let is_head = c0 & 0x40 != 0;
    let whole = upstream_head(&[data], max_head, is_head);
    let split = upstream_head(&pieces, max_head, is_head);
    assert_eq!(
        whole, split,
        "the response head verdict depends on the split"
    );

    // The fast path's reading of a request head (httparse and the checks around it).
    fast_request_head(data);
}

struct Proxy {
    // Kept alive for the catalog.
    _rt: tokio::runtime::Runtime,
    proxy: std::sync::Arc<HttpProxy>,
}

/// An HTTP proxy over a catalog where `web` has one HTTP/1.1 instance.
fn proxy() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let (rt, s, catalog) = catalog_fixture();
        let proxy = {
            let _enter = rt.enter();
            let mut reg =
                Registration::new("web", Endpoint::Explicit("127.0.0.1:8000".parse().unwrap()));
            reg.protocol = Some(crate::protocol::AppProtocol::Http1);
            rt.block_on(catalog.register(reg)).expect("a registration");
            let balancer = std::sync::Arc::new(Balancer::new(catalog, s.balance.clone()));
            HttpProxy::new(
                s.http_proxy.clone(),
                balancer,
                "netsel",
                std::time::Duration::ZERO,
            )
        };
        Proxy { _rt: rt, proxy }
    })
}

/// Reads `data` as the fast path reads a request head, and checks what it would send: a
/// head that is complete and well-formed (httparse), that the framing guard lets through,
/// with the client's method and target, one `Host` and one framing header at most. Every
/// prefix the fast path keeps waiting on must be one httparse calls partial.
fn fast_request_head(data: &[u8]) {
    let p = proxy();
    match p.proxy.read_request_head(data) {
        HeadReading::Fallback => {}
        HeadReading::Partial => {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut slots);
            assert!(
                matches!(req.parse(data), Ok(httparse::Status::Partial)),
                "partial to the fast path, not to httparse"
            );
        }
        HeadReading::Fast { upstream, len } => {
            assert!(len <= data.len());
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut client = httparse::Request::new(&mut slots);
            assert_eq!(
                client.parse(data).ok(),
                Some(httparse::Status::Complete(len))
            );
            let mut slots = [httparse::EMPTY_HEADER; 160];
            let mut up = httparse::Request::new(&mut slots);
            assert_eq!(
                up.parse(&upstream).ok(),
                Some(httparse::Status::Complete(upstream.len())),
                "the upstream head is not one complete head: {:?}",
                String::from_utf8_lossy(&upstream)
            );
            assert_eq!(up.method, client.method);
            assert_eq!(up.path, client.path);
            assert_eq!(up.version, Some(1));
            let count = |name: &str| {
                up.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .count()
            };
            assert_eq!(count("host"), 1, "{:?}", String::from_utf8_lossy(&upstream));
            assert!(
                count("content-length") + count("transfer-encoding") <= 1,
                "{:?}",
                String::from_utf8_lossy(&upstream)
            );
            assert_eq!(
                scan(upstream.len() + 1, &[&upstream]),
                None,
                "the guard refuses what the fast path sends"
            );
        }
    }
}

fn scan(max_head: usize, pieces: &[&[u8]]) -> Option<usize> {
    let mut s = Scanner::new(max_head);
    let mut offset = 0;
    for piece in pieces {
        if let Verdict::Refuse(n) = s.scan(piece) {
            assert!(n < piece.len());
            return Some(offset + n);
        }
        offset += piece.len();
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
enum ChunkEnd {
    More,
    End(usize),
    Bad,
}

fn chunked(pieces: &[&[u8]]) -> ChunkEnd {
    let mut c = ChunkedBody::new();
    let mut offset = 0;
    for piece in pieces {
        match c.feed(piece) {
            ChunkStep::More => {}
            ChunkStep::End(n) => {
                assert!(n <= piece.len());
                return ChunkEnd::End(offset + n);
            }
            ChunkStep::Bad => return ChunkEnd::Bad,
        }
        offset += piece.len();
    }
    ChunkEnd::More
}

/// A reader that hands out `pieces` one read at a time (a piece larger than the buffer
/// over several reads), then end of stream.
struct Pieces<'a> {
    rest: &'a [u8],
    next: std::slice::Iter<'a, &'a [u8]>,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rest.is_empty() {
            self.rest = self.next.next().copied().unwrap_or_default();
        }
        let n = self.rest.len().min(buf.remaining());
        buf.put_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Poll::Ready(Ok(()))
    }
}

/// The response head as the fast path reads it: (head length, status, framing,
/// keep-alive, `Connection` tokens), or the error's name.
fn upstream_head(pieces: &[&[u8]], max_head: usize, is_head: bool) -> Result<String, String> {
    let mut reader = Pieces {
        rest: &[],
        next: pieces.iter(),
    };
    let mut buf = BytesMut::new();
    let fut = read_upstream_head(&mut reader, &mut buf, max_head, |resp, len| {
        let (body, keep, conn) = response_framing(resp, is_head)?;
        Ok(format!("{len} {:?} {body:?} {keep} {conn:?}", resp.code))
    });
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    // The reader never waits, so neither does the future.
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => r.map_err(|e| format!("{e:?}")),
        Poll::Pending => panic!("reading a response head from memory waited"),
    }
}

// ---------------------------------------------------------------------------------------
// Write-ahead log
// ---------------------------------------------------------------------------------------

/// A scratch directory of this thread's own: tests run the WAL target on several threads
/// of one process at once, and must not write each other's log files.
fn wal_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static DIR: PathBuf = {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("netsel-fuzz-wal-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            dir
        };
    }
    DIR.with(Clone::clone)
}

/// Writes the two log files (`None`: absent).
fn write_wal(files: [Option<&[u8]>; 2]) -> PathBuf {
    let dir = wal_dir();
    for (name, bytes) in wal::WAL_FILES.iter().zip(files) {
        let path = dir.join(name);
        match bytes {
            Some(b) => std::fs::write(&path, b).expect("write a log file"),
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("cannot remove {}: {e}", path.display()),
            },
        }
    }
    dir
}

/// The embedded store's write-ahead log: `wal::scan` on the raw bytes, `wal::replay` over
/// two log files cut from them (the first byte picks the cut, which files exist and the
/// checkpoint), and the record payload decoder, reached by framing the bytes as a record
/// with a valid checksum. A payload that decodes must survive the store's own encoder.
///
/// Panics if a scanned record does not re-encode to the bytes it was read from, if replay
/// returns records out of order, or if decoded batches do not survive a round trip.
pub fn wal(bytes: &[u8]) {
    // scan: consecutive records that re-encode to a prefix of the bytes.
    let records = wal::scan(bytes);
    let mut again = Vec::new();
    for (i, (seq, payload)) in records.iter().enumerate() {
        if i > 0 {
            assert_eq!(*seq, records[i - 1].0 + 1);
        }
        wal::encode(*seq, payload, &mut again);
    }
    assert!(bytes.starts_with(&again));

    let Some((&c, data)) = bytes.split_first() else {
        return;
    };
    // replay over raw files.
    let cut = usize::from(c >> 2) * data.len() / 63;
    let (a, b) = data.split_at(cut.min(data.len()));
    let after = u64::from(c & 1);
    let files = match c & 2 {
        0 => [Some(a), Some(b)],
        _ => [Some(b), None],
    };
    check_replay(&write_wal(files), after);

    // The payload decoder, behind a valid record.
    let mut framed = Vec::new();
    wal::encode(7, data, &mut framed);
    let dir = write_wal([None, Some(&framed)]);
    let replayed = wal::replay(&dir, 6);
    let direct = serde_json::from_slice::<Vec<Vec<Op>>>(data);
    assert_eq!(
        replayed.is_ok(),
        direct.is_ok(),
        "replay and decoding disagree"
    );
    if let Ok(batches) = direct {
        assert_eq!(replayed.unwrap(), vec![(7, batches.clone())]);
        batches_round_trip(batches);
    }
}

fn check_replay(dir: &Path, after: u64) {
    if let Ok(found) = wal::replay(dir, after) {
        for (i, (seq, _)) in found.iter().enumerate() {
            assert_eq!(*seq, after + 1 + i as u64, "replay returned a gap");
        }
    }
}

/// Decoded batches, framed by the embedded store's encoder and replayed, are the same.
fn batches_round_trip(batches: Vec<Vec<Op>>) {
    if batches.is_empty() {
        // The store never frames an empty record.
        return;
    }
    let framed = embedded::frame(&batches, 41).expect("decoded batches encode");
    let bytes: Vec<u8> = framed.into_iter().flat_map(|f| f.bytes).collect();
    let dir = write_wal([Some(&bytes), None]);
    let replayed = wal::replay(&dir, 40).expect("the store's own records replay");
    let back: Vec<Vec<Op>> = replayed.into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(back, batches, "batches changed through the log");
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// The configuration file parser and the store URL parser, on any UTF-8 text.
pub fn config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(settings) = Settings::from_toml(text) {
        let _ = settings.catalog_settings();
    }
    let mut store = StoreSettings::default();
    if store.set_url(text).is_ok() {
        assert!(
            store.is_cluster(),
            "a store URL without an endpoint was accepted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::seed_frame;

    #[test]
    fn line_protocol_inputs() {
        let mut long = vec![b'a'; protocol::MAX_LINE_LEN + 10];
        long[0] = 3;
        for input in [
            &b""[..],
            b"\x07PING\n",
            b"\x01REGISTER|web|127.0.0.1:8000|tag=a|meta.k=v|weight=3\nPING\n",
            b"\x02HEARTBEAT|id|secret\r\nDEREGISTER|id|secret\nRESOLVE|web\nAUTH|t%20k\n",
            b"\x00web\0\0\0",
            &long,
        ] {
            line_protocol(input);
        }
        let mut frame = vec![5];
        frame.extend(seed_frame("web"));
        frame.extend(seed_frame("HEARTBEAT|web"));
        line_protocol(&frame);
    }

    #[test]
    fn dns_inputs() {
        // web.netsel. A, with and without EDNS; _web._tcp.netsel. SRV; a PTR; garbage.
        let a = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x06netsel\x00\x00\x01\x00\x01";
        let mut edns = a.to_vec();
        edns[11] = 1;
        edns.extend_from_slice(b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00");
        let srv = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04_web\x04_tcp\x06netsel\x00\x00\x21\x00\x01";
        let ptr = b"\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x011\x010\x0277\x03127\x07in-addr\x04arpa\x00\x00\x0c\x00\x01";
        for input in [
            &a[..],
            &edns,
            srv,
            ptr,
            b"",
            b"\x00\x00\x80\x00",
            &[0xff; 40],
        ] {
            dns_query(input);
        }
    }

    /// The fixture reaches all three outcomes, so the target's checks of a forwarded
    /// head run at all.
    #[test]
    fn the_http_fixture_takes_requests_for_web_on_the_fast_path() {
        let p = &proxy().proxy;
        let fast = p.read_request_head(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
        assert!(
            matches!(fast, HeadReading::Fast { len: 29, .. }),
            "{fast:?}"
        );
        let partial = p.read_request_head(b"GET / HTTP/1.1\r\nHost: web\r\n");
        assert!(matches!(partial, HeadReading::Partial), "{partial:?}");
        let other = p.read_request_head(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n");
        assert!(matches!(other, HeadReading::Fallback), "{other:?}");
    }

    #[test]
    fn http_inputs() {
        for input in [
            &b""[..],
            b"\x10\x03GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            // Taken by the fast path (`web` is in the fixture's catalog), and a prefix.
            b"\x80\x00POST /x?y=1 HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nX-A: 1\r\n\r\nabc",
            b"\x80\x00GET /x HTTP/1.1\r\nHost: web\r\n",
            b"\x90\x07POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"\x80\x01GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"\x80\x02HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            b"\x80\x05HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"\x00\x00PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x80\x09a;ext\r\n0123456789\r\n0\r\nT: 1\r\n\r\n",
        ] {
            http_head(input);
        }
    }

    #[test]
    fn wal_inputs() {
        let batches = vec![vec![Op::SetIndex(3)], vec![Op::SetIndex(4)]];
        let mut record = vec![0x81];
        record.extend(&embedded::frame(&batches, 1).unwrap()[0].bytes);
        for input in [
            &b""[..],
            b"\x00[[{\"SetIndex\":5}]]",
            b"\x03[]",
            b"\x00not json",
            &record,
        ] {
            wal(input);
        }
    }

    /// The batches in `fuzz/seeds/wal/store-record`: one of each kind of operation.
    fn store_batches() -> Vec<Vec<Op>> {
        use crate::model::{
            AppProtocol, Health, InstanceId, InstanceRecord, Secret, ServiceName, ServiceRecord,
            VipHold,
        };
        let name = ServiceName::new("web").unwrap();
        let id = InstanceId::from("00000000000000a1");
        let vip: std::net::IpAddr = "127.77.0.1".parse().unwrap();
        let instance = InstanceRecord {
            id: id.clone(),
            service: name.clone(),
            endpoint: "127.0.0.1:8000".parse().unwrap(),
            tags: vec!["blue".into()],
            meta: [("zone".to_string(), "eu".to_string())].into(),
            weight: 3,
            protocol: AppProtocol::Http1,
            check: None,
            ttl_ms: 30_000,
            deregister_critical_after_ms: None,
            owner_peer: Some("127.0.0.1".parse().unwrap()),
            pool_port: false,
            secret: Secret::from_string("s3cr3t".into()),
            registered_index: 1,
            deadline_unix_ms: 1_800_000_000_000,
            owner: None,
            health: Health::Passing,
            request: None,
        };
        vec![
            vec![
                Op::PutService(ServiceRecord {
                    name: name.clone(),
                    vip,
                    port: 8000,
                    created_index: 1,
                }),
                Op::PutInstance(instance),
                Op::SetIndex(1),
            ],
            vec![
                Op::SetHealth {
                    id: id.clone(),
                    health: Health::Critical,
                },
                Op::SetIndex(2),
            ],
            vec![
                Op::DeleteInstance(id),
                Op::DeleteService(name.clone()),
                Op::PutHold(VipHold {
                    vip,
                    name,
                    until_unix_ms: 1_800_000_600_000,
                }),
                Op::SetIndex(3),
            ],
            vec![Op::DeleteHold(vip), Op::SetIndex(4)],
        ]
    }

    /// The WAL seed is a record as the embedded store writes it (its first byte tells the
    /// `wal` target to replay it whole). `NETSEL_WRITE_FUZZ_SEEDS=1` rewrites it.
    #[test]
    fn wal_seed_is_what_the_store_writes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/wal/store-record");
        let mut seed = vec![0xfc];
        for f in embedded::frame(&store_batches(), 1).unwrap() {
            seed.extend(f.bytes);
        }
        if std::env::var_os("NETSEL_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::write(path, &seed).unwrap();
        }
        assert_eq!(
            std::fs::read(path).unwrap(),
            seed,
            "rewrite it: NETSEL_WRITE_FUZZ_SEEDS=1"
        );
        let records = wal::scan(&seed[1..]);
        assert_eq!(records.len(), 1);
        let batches: Vec<Vec<Op>> = serde_json::from_slice(records[0].1).unwrap();
        assert_eq!(batches, store_batches());
        wal(&seed);
    }

    #[test]
    fn config_inputs() {
        for input in [
            &b""[..],
            b"etcd://127.0.0.1:2379/netsel",
            b"etcd://",
            b"registry_addr = \"127.0.0.1:9000\"\n[dns]\ndomain = \"netsel\"\n",
            b"\xff\xfe",
            include_bytes!("../examples/netsel.toml"),
        ] {
            config(input);
        }
    }
}
