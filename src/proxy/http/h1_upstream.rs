//! The upstream side of HTTP/1.1 over raw sockets, shared by the direct path
//! (`h1_direct.rs`) and the bodiless HTTP/2 requests (`h2_bodiless.rs`): reading an
//! instance's response head (interim responses skipped, limits held), its framing and
//! keep-alive, the response head rewritten for the client, and following a response
//! body by its framing. Parsing uses `httparse`, as hyper does. Sans I/O except
//! [`read_upstream_head`], which reads from any `AsyncRead`.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::ReadHalf;

use super::headers;
use super::message_framing::{ChunkStep, ChunkedBody, parse_length};

/// Room made in a buffer before a read.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Header slots for an instance's response head.
const RESPONSE_HEADERS: usize = 128;

fn eq(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Why an attempt failed before anything reached the client.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The instance closed or reset before any response byte (or the write failed).
    NoResponse,
    /// The request timeout passed first.
    Timeout,
    /// The instance's response head was malformed or too large.
    BadResponse,
    /// The client went away while its body was being pumped: nothing more to do.
    ClientGone,
    /// The client's chunked body turned out malformed after its head had been sent.
    BadBody,
}

/// A response body's framing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RespBody {
    None,
    Fixed(u64),
    Chunked(ChunkedBody),
    /// Until the instance closes.
    Close,
}

/// What a response head said.
pub(super) struct RespHead {
    pub(super) len: usize,
    pub(super) status: u16,
    pub(super) body: RespBody,
    /// The instance keeps the connection open after this response.
    pub(super) keep_alive: bool,
}

/// Follows `body` over `bytes`: how many belong to it, whether it ended, whether it is
/// malformed.
pub(super) fn body_step(body: &mut RespBody, bytes: &[u8]) -> (usize, bool, bool) {
    match body {
        RespBody::None => (0, true, false),
        RespBody::Fixed(left) => {
            let take = (*left).min(bytes.len() as u64);
            *left -= take;
            (take as usize, *left == 0, false)
        }
        RespBody::Chunked(t) => match t.feed(bytes) {
            ChunkStep::End(k) => (k, true, false),
            ChunkStep::More => (bytes.len(), false, false),
            ChunkStep::Bad => (0, false, true),
        },
        RespBody::Close => (bytes.len(), false, false),
    }
}

/// Reads the instance's response head into `up` (skipping interim 1xx responses) and
/// writes its rewritten form for the client into `out`, without the blank line.
pub(super) async fn read_response_head(
    ur: &mut ReadHalf<'_>,
    up: &mut BytesMut,
    out: &mut Vec<u8>,
    is_head: bool,
    max_head: usize,
) -> Result<RespHead, AttemptError> {
    read_upstream_head(ur, up, max_head, |resp, len| {
        let status = resp.code.unwrap_or(0);
        let parsed = rewrite_response(resp, out, is_head)?;
        Ok(RespHead {
            len,
            status,
            body: parsed.0,
            keep_alive: parsed.1,
        })
    })
    .await
}

/// Reads from an instance until a final response head is complete in `buf` and returns
/// what `on_head` makes of it (given the parsed head and its length; the head's bytes
/// stay in `buf`). Interim 1xx heads are skipped (not forwarded); a 101 was never asked
/// for and is refused, as is a head over `max_head`. No byte at all is `NoResponse`.
pub(crate) async fn read_upstream_head<R: AsyncRead + Unpin, T>(
    r: &mut R,
    buf: &mut BytesMut,
    max_head: usize,
    on_head: impl FnOnce(&httparse::Response<'_, '_>, usize) -> Result<T, AttemptError>,
) -> Result<T, AttemptError> {
    loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    if len > max_head {
                        // Refused however it arrived: a head read in one piece is held to
                        // the same limit as one that arrives in pieces.
                        return Err(AttemptError::BadResponse);
                    }
                    let status = resp.code.unwrap_or(0);
                    if status == 101 {
                        // Not asked for: the proxy never forwards Upgrade on this path.
                        return Err(AttemptError::BadResponse);
                    }
                    if (100..200).contains(&status) {
                        // Interim (100 Continue, 103 Early Hints): not forwarded.
                        buf.advance(len);
                        continue;
                    }
                    return on_head(&resp, len);
                }
                Ok(httparse::Status::Partial) if buf.len() < max_head => {}
                _ => return Err(AttemptError::BadResponse),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(AttemptError::NoResponse),
            Ok(0) | Err(_) => return Err(AttemptError::BadResponse),
            Ok(_) => {}
        }
    }
}

/// How an instance's response is framed, whether the instance keeps the connection
/// alive after it, and the header names its `Connection` header lists.
pub(crate) fn response_framing<'h>(
    resp: &httparse::Response<'_, 'h>,
    is_head: bool,
) -> Result<(RespBody, bool, Vec<&'h [u8]>), AttemptError> {
    let status = resp.code.unwrap_or(0);
    let mut connection: Vec<&[u8]> = Vec::new();
    let mut close = false;
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if eq(n, b"connection") {
            for t in headers::connection_tokens(std::iter::once(h.value)) {
                close |= eq(t, b"close");
                connection.push(t);
            }
        } else if eq(n, b"content-length") {
            let v = parse_length(h.value).ok_or(AttemptError::BadResponse)?;
            if length.is_some_and(|l| l != v) {
                return Err(AttemptError::BadResponse);
            }
            length = Some(v);
        } else if eq(n, b"transfer-encoding") {
            // The last coding decides: chunked or read to close.
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = Some(eq(last.trim_ascii(), b"chunked"));
        }
    }
    let body = if is_head || status == 204 || status == 304 {
        RespBody::None
    } else {
        match (chunked, length) {
            (Some(true), _) => RespBody::Chunked(ChunkedBody::new()),
            (Some(false), _) => RespBody::Close,
            (None, Some(n)) => RespBody::Fixed(n),
            (None, None) => RespBody::Close,
        }
    };
    let keep_alive = resp.version == Some(1) && !close;
    Ok((body, keep_alive, connection))
}

/// The client's response head: status line and end-to-end headers, with the framing
/// header this proxy sends. Returns the body's framing and whether the instance keeps
/// the connection alive.
fn rewrite_response(
    resp: &httparse::Response<'_, '_>,
    out: &mut Vec<u8>,
    is_head: bool,
) -> Result<(RespBody, bool), AttemptError> {
    let status = resp.code.unwrap_or(0);
    let (body, keep_alive, connection) = response_framing(resp, is_head)?;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(status).as_slice());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        let framing = eq(n, b"content-length");
        if (framing && !matches!(body, RespBody::None))
            || headers::is_hop_by_hop_raw(h.name, h.value, &connection)
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    match body {
        RespBody::Fixed(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RespBody::Chunked(_) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RespBody::None | RespBody::Close => {}
    }
    Ok((body, keep_alive))
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_len(mut input: &[u8], max_head: usize) -> Result<usize, AttemptError> {
        read_upstream_head(&mut input, &mut BytesMut::new(), max_head, |_, len| Ok(len)).await
    }

    /// Found by the `http_head` fuzz target: a head over the limit was accepted when it
    /// arrived in one read, and refused when it arrived in pieces.
    #[tokio::test]
    async fn a_head_over_the_limit_is_refused_even_in_one_read() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: 0123456789\r\n\r\n";
        assert_eq!(head_len(head, head.len()).await.unwrap(), head.len());
        assert!(matches!(
            head_len(head, head.len() - 1).await,
            Err(AttemptError::BadResponse)
        ));
        // Each interim head is held to the limit too.
        let mut two = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        two.extend_from_slice(head);
        assert_eq!(head_len(&two, head.len()).await.unwrap(), head.len());
    }
}
