//! A guard on HTTP/1 client connections against request smuggling.
//!
//! hyper resolves ambiguous framing the lenient way RFC 9112 allows: with both
//! `Content-Length` and `Transfer-Encoding` it drops the length and lets chunked win, and
//! it folds repeated equal lengths into one. The proxy refuses such requests instead
//! (400, nothing forwarded), but by the time a request reaches it those headers are
//! gone. So this guard reads alongside hyper: it follows request heads and bodies in the
//! byte stream and, when a head has ambiguous framing, replaces the byte that would end
//! it with bytes hyper cannot parse. hyper then answers 400 itself, in order after any
//! earlier pipelined responses, and closes the connection; the request never reaches the
//! proxy's handler.
//!
//! Connections that start with the HTTP/2 preface, and connections after an `Upgrade` or
//! `CONNECT` head, are passed through unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What hyper gets instead of the end of a refused head: a NUL where a header name or a
/// line feed must be.
const POISON: &[u8] = b"\0\r\n\r\n";
/// Header line bytes kept for inspection (names and framing values are short).
const LINE_KEEP: usize = 256;

/// Most chunk-extension bytes in one body, and most trailer-section bytes and trailer
/// fields: hyper's limits (`CHUNKED_EXTENSIONS_LIMIT`, `TRAILER_LIMIT`, its default
/// header count), so a body the fast path passes on is one hyper would take too.
const MAX_EXTENSION_BYTES: u32 = 16 * 1024 - 1;
const MAX_TRAILER_BYTES: u32 = 16 * 1024 - 1;
const MAX_TRAILERS: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At the start of a chunk-size line: a hex digit must come.
    SizeStart,
    /// In a chunk-size line: the size so far.
    Size(u64),
    /// Whitespace after the size: only more whitespace, `;` or CR may follow.
    SizeLws(u64),
    /// In chunk extensions, up to the CR that ends the line.
    Ext(u64),
    /// After the CR that ends a chunk-size line: LF.
    SizeLf(u64),
    /// Chunk data left.
    Data(u64),
    /// After chunk data: CR.
    DataCr,
    /// After chunk data: LF.
    DataLf,
    /// Trailer section, at the start of a line: a field name or the final CR.
    TrailerLineStart,
    /// In a trailer field's name (at least one token character read).
    TrailerName,
    /// In a trailer field's value.
    TrailerValue,
    /// After the CR that ends a trailer field: LF.
    TrailerLf,
    /// Final CR seen; LF ends the message.
    TrailerEnd,
}

/// A `Content-Length` value: digits only (no sign, no list, no spaces inside).
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Follows a chunked body (RFC 9112 §7.1) byte by byte, to find where it ends. Used by
/// the guard below and by the fast path, which passes chunked bodies through verbatim.
///
/// It is exactly as strict as hyper's decoder (the general path's), or stricter: every
/// line ends with CRLF (a bare LF is malformed, as are a CR without LF and chunk data
/// not followed by CRLF); a size is hex digits whose value fits in 64 bits, optionally
/// followed by whitespace, then only `;` and extensions; extensions and trailers stay
/// within hyper's limits; each trailer line is `token ":" value` without control
/// characters (no obs-fold). The fast path hands a body it calls malformed to the
/// general path when it sees it with the head, so the two paths cannot disagree on
/// where a body ends or whether it is acceptable (the differential test in
/// `tests/http_proxy_differential.rs` checks this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkedBody {
    state: Chunk,
    /// Chunk-extension bytes so far, over the whole body.
    ext_bytes: u32,
    /// Trailer-section bytes and fields so far.
    trailer_bytes: u32,
    trailers: u32,
}

/// What [`ChunkedBody::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkStep {
    /// Every byte belongs to the body, which goes on.
    More,
    /// The body ended after this many of the bytes.
    End(usize),
    /// The chunking is malformed.
    Bad,
}

/// A field-name character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field-value character: visible ASCII, space, tab, or obs-text.
fn is_value_char(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl ChunkedBody {
    /// At the start of a chunked body.
    pub(crate) fn new() -> Self {
        ChunkedBody {
            state: Chunk::SizeStart,
            ext_bytes: 0,
            trailer_bytes: 0,
            trailers: 0,
        }
    }

    /// Follows the next bytes of the body.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> ChunkStep {
        let mut i = 0;
        while i < bytes.len() {
            if let Chunk::Data(left) = &mut self.state {
                let take = (*left).min((bytes.len() - i) as u64);
                *left -= take;
                i += take as usize;
                if *left == 0 {
                    self.state = Chunk::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            if matches!(
                self.state,
                Chunk::TrailerLineStart
                    | Chunk::TrailerName
                    | Chunk::TrailerValue
                    | Chunk::TrailerLf
                    | Chunk::TrailerEnd
            ) {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER_BYTES {
                    return ChunkStep::Bad;
                }
            }
            let next = match self.state {
                Chunk::SizeStart => hex(b).map(Chunk::Size),
                Chunk::Size(n) => match b {
                    _ if hex(b).is_some() => n
                        .checked_mul(16)
                        .and_then(|n| n.checked_add(hex(b).unwrap_or(0)))
                        .map(Chunk::Size),
                    b' ' | b'\t' => Some(Chunk::SizeLws(n)),
                    b';' => Some(Chunk::Ext(n)),
                    b'\r' => Some(Chunk::SizeLf(n)),
                    _ => None,
                },
                Chunk::SizeLws(n) => match b {
                    b' ' | b'\t' => Some(Chunk::SizeLws(n)),
                    b';' => Some(Chunk::Ext(n)),
                    b'\r' => Some(Chunk::SizeLf(n)),
                    _ => None,
                },
                Chunk::Ext(n) => match b {
                    b'\r' => Some(Chunk::SizeLf(n)),
                    b'\n' => None,
                    _ => {
                        self.ext_bytes += 1;
                        (self.ext_bytes < MAX_EXTENSION_BYTES).then_some(Chunk::Ext(n))
                    }
                },
                Chunk::SizeLf(n) => (b == b'\n').then(|| end_size_line(n)),
                Chunk::Data(_) => None, // handled above
                Chunk::DataCr => (b == b'\r').then_some(Chunk::DataLf),
                Chunk::DataLf => (b == b'\n').then_some(Chunk::SizeStart),
                Chunk::TrailerLineStart => match b {
                    b'\r' => Some(Chunk::TrailerEnd),
                    _ if is_tchar(b) && self.trailers < MAX_TRAILERS => {
                        self.trailers += 1;
                        Some(Chunk::TrailerName)
                    }
                    _ => None,
                },
                Chunk::TrailerName => match b {
                    b':' => Some(Chunk::TrailerValue),
                    _ => is_tchar(b).then_some(Chunk::TrailerName),
                },
                Chunk::TrailerValue => match b {
                    b'\r' => Some(Chunk::TrailerLf),
                    _ => is_value_char(b).then_some(Chunk::TrailerValue),
                },
                Chunk::TrailerLf => (b == b'\n').then_some(Chunk::TrailerLineStart),
                Chunk::TrailerEnd => {
                    if b == b'\n' {
                        return self.end(i);
                    }
                    None
                }
            };
            match next {
                Some(c) => self.state = c,
                None => return ChunkStep::Bad,
            }
        }
        ChunkStep::More
    }

    /// Chunk data bytes left in the current chunk, when the next byte is chunk data
    /// (so a decoder can pass data on and feed only the framing byte by byte).
    pub(crate) fn data_left(&self) -> Option<u64> {
        match self.state {
            Chunk::Data(n) => Some(n),
            _ => None,
        }
    }

    fn end(&mut self, n: usize) -> ChunkStep {
        *self = ChunkedBody::new();
        ChunkStep::End(n)
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before the first bytes: HTTP/2 preface or not (bytes matched so far).
    Detect(usize),
    /// In a request head.
    Head,
    /// In a body of known length.
    Fixed(u64),
    /// In a chunked body.
    Chunked(ChunkedBody),
    /// Not looking any more (HTTP/2, upgrades, or something hyper will reject anyway).
    Pass,
    /// A refused head was replaced: the connection reads as ended.
    Poisoned,
}

/// What a head said about framing.
#[derive(Debug, Default)]
struct Head {
    line: Vec<u8>,
    line_truncated: bool,
    first_line: bool,
    bytes: usize,
    lengths: u32,
    length: Option<u64>,
    encodings: u32,
    chunked: bool,
    bad: bool,
    http10: bool,
    switches: bool,
}

impl Head {
    fn reset(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        *self = Head {
            line,
            first_line: true,
            ..Head::default()
        };
    }

    fn end_line(&mut self) {
        let mut line = &self.line[..];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if self.first_line {
            self.first_line = false;
            self.http10 = line.ends_with(b"HTTP/1.0");
            self.switches |= line.starts_with(b"CONNECT ");
        } else if let Some(colon) = line.iter().position(|b| *b == b':') {
            let name = &line[..colon];
            let value = line[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"content-length") {
                self.lengths += 1;
                let parsed = (!value.is_empty()
                    && value.len() <= 19
                    && value.iter().all(u8::is_ascii_digit)
                    && !self.line_truncated)
                    .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
                    .flatten();
                match parsed {
                    Some(n) => self.length = Some(n),
                    None => self.bad = true,
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                self.encodings += 1;
                self.chunked = value.eq_ignore_ascii_case(b"chunked") && !self.line_truncated;
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                self.switches = true;
            }
        }
        self.line.clear();
        self.line_truncated = false;
    }

    /// Whether the framing is ambiguous.
    fn refused(&self) -> bool {
        self.bad
            || self.lengths > 1
            || (self.lengths > 0 && self.encodings > 0)
            || self.encodings > 1
            || (self.encodings == 1 && (!self.chunked || self.http10))
    }
}

/// Follows HTTP/1 requests in a byte stream.
#[derive(Debug)]
pub(crate) struct Scanner {
    state: State,
    head: Head,
    max_head: usize,
}

/// What the scanner decided about a run of bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Pass them on.
    Pass,
    /// Pass on the first `n`; the byte at `n` ends a refused head.
    Refuse(usize),
}

impl Scanner {
    pub(crate) fn new(max_head: usize) -> Self {
        let mut head = Head::default();
        head.reset();
        Scanner {
            state: State::Detect(0),
            head,
            max_head,
        }
    }

    /// Looks at the next bytes of the stream.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Verdict {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Pass | State::Poisoned => return Verdict::Pass,
                State::Detect(n) => {
                    if bytes[i] == H2_PREFACE[*n] {
                        *n += 1;
                        i += 1;
                        if *n == H2_PREFACE.len() {
                            self.state = State::Pass;
                        }
                    } else {
                        // Not HTTP/2: replay what matched into the head scanner.
                        let matched = *n;
                        self.state = State::Head;
                        for b in &H2_PREFACE[..matched] {
                            if self.head_byte(*b) {
                                // A preface prefix cannot end a head; be safe anyway.
                                return Verdict::Refuse(i);
                            }
                        }
                    }
                }
                State::Head => {
                    if self.head_byte(bytes[i]) {
                        return Verdict::Refuse(i);
                    }
                    i += 1;
                }
                State::Fixed(left) => {
                    let take = (*left).min((bytes.len() - i) as u64);
                    *left -= take;
                    i += take as usize;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunked(c) => match c.feed(&bytes[i..]) {
                    ChunkStep::More => i = bytes.len(),
                    ChunkStep::End(n) => {
                        i += n;
                        self.state = State::Head;
                    }
                    // Malformed chunking: hyper rejects it and closes the connection.
                    ChunkStep::Bad => self.state = State::Pass,
                },
            }
        }
        Verdict::Pass
    }

    /// One byte of a head; `true` when it ends a refused head.
    fn head_byte(&mut self, b: u8) -> bool {
        let h = &mut self.head;
        h.bytes += 1;
        if h.bytes > self.max_head {
            // hyper answers 431 to this one.
            self.state = State::Pass;
            return false;
        }
        if b != b'\n' {
            if h.line.len() < LINE_KEEP {
                h.line.push(b);
            } else {
                h.line_truncated = true;
            }
            return false;
        }
        let empty = h.line.is_empty() || h.line == b"\r";
        if empty && h.first_line {
            // Blank lines before a request line are skipped by the parser.
            h.line.clear();
            return false;
        }
        if !empty {
            h.end_line();
            return false;
        }
        // End of the head.
        if h.refused() {
            self.state = State::Poisoned;
            return true;
        }
        self.state = if h.switches {
            State::Pass
        } else if h.encodings > 0 {
            State::Chunked(ChunkedBody::new())
        } else {
            match h.length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head,
            }
        };
        self.head.reset();
        false
    }
}

fn end_size_line(n: u64) -> Chunk {
    if n == 0 {
        Chunk::TrailerLineStart
    } else {
        Chunk::Data(n)
    }
}

/// A client connection read through a [`Scanner`].
#[derive(Debug)]
pub(crate) struct Guarded<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> Guarded<T> {
    pub(crate) fn new(inner: T, max_head: usize) -> Self {
        Guarded {
            inner,
            scanner: Scanner::new(max_head),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.scanner.state == State::Poisoned {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Verdict::Refuse(n) = this.scanner.scan(&buf.filled()[before..]) {
            tracing::debug!("refused a request head with ambiguous framing");
            buf.set_filled(before + n);
            if buf.remaining() < POISON.len() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ambiguous request framing",
                )));
            }
            buf.put_slice(POISON);
        }
        Poll::Ready(Ok(()))
    }
}

/// Implements `AsyncWrite` for a read-side wrapper with an `inner` stream field by
/// passing every write straight through (the wrappers only act on what is read).
macro_rules! write_through {
    ($ty:ident $(<$t:ident>)?) => {
        impl$(<$t: tokio::io::AsyncWrite + Unpin>)? tokio::io::AsyncWrite for $ty$(<$t>)? {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
pub(super) use write_through;

write_through!(Guarded<T>);

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8], step: usize) -> Option<usize> {
        let mut s = Scanner::new(65536);
        let mut offset = 0;
        for chunk in input.chunks(step) {
            if let Verdict::Refuse(n) = s.scan(chunk) {
                return Some(offset + n);
            }
            offset += chunk.len();
        }
        None
    }

    #[test]
    fn honest_pipelines_pass_at_any_split() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\n\r\n\
            GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nGET / HTTP/1.1\r\n\
            POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n10\r\nContent-Length: 1\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(scan_all(stream, step), None, "step {step}");
        }
    }

    #[test]
    fn ambiguous_heads_are_refused_at_their_last_byte() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\n",
        ] {
            for step in [1, 5, head.len()] {
                assert_eq!(scan_all(head, step), Some(head.len() - 1), "{head:?}");
            }
        }
        // Behind an honest request whose body looks like a head, still found.
        let mut s = b"POST / HTTP/1.1\r\nContent-Length: 38\r\n\r\n".to_vec();
        s.extend_from_slice(b"Content-Length: 1\r\nContent-Length: 2\r\n");
        assert_eq!(scan_all(&s, 3), None);
        s.extend_from_slice(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(scan_all(&s, 3), Some(s.len() - 1));
    }

    #[test]
    fn chunked_body_ends_where_it_ends() {
        let body = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1";
        let end = body.len() - b"GET / HTTP/1.1".len();
        for step in [1, 2, 3, 7, body.len()] {
            let mut c = ChunkedBody::new();
            let mut at = None;
            for (n, piece) in body.chunks(step).enumerate() {
                match c.feed(piece) {
                    ChunkStep::More => {}
                    ChunkStep::End(k) => {
                        at = Some(n * step + k);
                        break;
                    }
                    ChunkStep::Bad => panic!("step {step}: bad"),
                }
            }
            assert_eq!(at, Some(end), "step {step}");
        }
        let mut c = ChunkedBody::new();
        assert_eq!(c.feed(b"0\r\n\r\nrest"), ChunkStep::End(5));
        for bad in [&b"\r\n"[..], b"x\r\n", b"5\rX\n", b"2\r\nabX", b"-1\r\n"] {
            assert_eq!(ChunkedBody::new().feed(bad), ChunkStep::Bad, "{bad:?}");
        }
    }

    /// Found by the differential test (`tests/http_proxy_differential.rs`): the fast path
    /// passed on chunked bodies hyper refuses (bare LF line ends, a digit after the
    /// size's whitespace, malformed trailer lines), so an instance behind it got a body
    /// the general path would never forward.
    #[test]
    fn chunked_body_is_as_strict_as_hyper() {
        let end = |body: &[u8]| ChunkedBody::new().feed(body);
        for good in [
            &b"5\r\nhello\r\n0\r\n\r\n"[..],
            b"5 \t;a=b\r\nhello\r\n0;x\r\n\r\n",
            b"0005\r\nhello\r\n00\r\nX-T: 1\r\nX-Empty:\r\n\r\n",
            b"0\r\nX-Obs: caf\xe9\r\n\r\n",
        ] {
            assert_eq!(end(good), ChunkStep::End(good.len()), "{good:?}");
        }
        let huge = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(20_000));
        let many: String = (0..101).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("0\r\n{many}\r\n");
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5;a\nhello\r\n0\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nX-T: 1\n\r\n",
            b"5 1\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"0\r\nnot a field\r\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"0\r\nX-T : 1\r\n\r\n",
            b"0\r\nX-T: a\x00b\r\n\r\n",
            b"1FFFFFFFFFFFFFFFF\r\n",
            huge.as_bytes(),
            many.as_bytes(),
        ] {
            assert_eq!(
                end(bad),
                ChunkStep::Bad,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The largest size hyper takes is taken (and waits for its data).
        assert_eq!(end(b"FFFFFFFFFFFFFFFF\r\nabc"), ChunkStep::More);
    }

    #[test]
    fn http2_and_upgrades_pass_through() {
        let mut s = H2_PREFACE.to_vec();
        s.extend_from_slice(b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(scan_all(&s, 5), None);
        let s = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
            POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(scan_all(s, 4), None);
    }
}
