//! A small HTTP/1.1 client for NetSel's API: one request per connection, no hyper and no
//! serde, so it stays in the client-only build. It reads `Content-Length`, chunked and
//! until-close bodies, and server-sent-event streams. Sizes and times are bounded.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// Longest single server-sent event accepted.
const MAX_EVENT: usize = 1024 * 1024;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not HTTP/1.1 as expected.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body, decoded from chunked if it was.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One request: the method, path (with query), extra headers and an optional JSON body.
/// Its `Debug` shows header names only: values may be secrets or tokens.
#[derive(Clone)]
pub struct HttpRequest<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// Path and query, e.g. `/v1/services?index=3`.
    pub path: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// A JSON body.
    pub json: Option<Vec<u8>>,
}

impl std::fmt::Debug for HttpRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| *k).collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("headers", &names)
            .field("json_len", &self.json.as_ref().map(Vec::len))
            .finish()
    }
}

impl<'a> HttpRequest<'a> {
    /// A request without headers or body.
    pub fn new(method: &'a str, path: &'a str) -> Self {
        HttpRequest {
            method,
            path,
            headers: Vec::new(),
            json: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Sets a JSON body.
    pub fn json(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.json = Some(body.into());
        self
    }

    fn encode(&self, addr: SocketAddr) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: netsel\r\n",
            self.method, self.path
        );
        for (k, v) in &self.headers {
            // Header values never carry line breaks (a caller's secret cannot inject).
            let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut bytes = match &self.json {
            Some(body) => {
                out.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                ));
                let mut b = out.into_bytes();
                b.extend_from_slice(body);
                b
            }
            None => {
                if matches!(self.method, "POST" | "PUT" | "PATCH" | "DELETE") {
                    out.push_str("Content-Length: 0\r\n");
                }
                out.push_str("\r\n");
                out.into_bytes()
            }
        };
        bytes.shrink_to_fit();
        bytes
    }
}

/// Sends `req` to `addr` and reads the whole response, all within `timeout`.
pub async fn send(
    addr: SocketAddr,
    req: &HttpRequest<'_>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    tokio::time::timeout(timeout, async {
        let mut body = open(addr, req).await?;
        let mut out = Vec::new();
        while let Some(piece) = body.read_piece().await? {
            if out.len() + piece.len() > MAX_BODY {
                return Err(HttpError::Malformed("body too large".into()));
            }
            out.extend_from_slice(&piece);
        }
        Ok(HttpResponse {
            status: body.status,
            headers: body.headers,
            body: out,
        })
    })
    .await
    .map_err(|_| HttpError::Timeout(timeout))?
}

/// Sends `req` and returns once the response head has arrived, with its body still to
/// read: for server-sent-event streams.
pub async fn open(addr: SocketAddr, req: &HttpRequest<'_>) -> Result<Body, HttpError> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    stream.write_all(&req.encode(addr)).await?;
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let n = (&mut reader)
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut head)
            .await?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed in the head".into()));
        }
        if head.len() > MAX_HEAD {
            return Err(HttpError::Malformed("head too large".into()));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("status line '{status_line}'")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line '{status_line}'")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = find_header(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = match find_header(&headers, "content-length") {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| HttpError::Malformed(format!("content-length '{v}'")))?,
        ),
        None => None,
    };
    let framing = if chunked {
        Framing::Chunked {
            left: 0,
            done: false,
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Body {
        status,
        headers,
        reader,
        framing,
        pending: Vec::new(),
    })
}

#[derive(Debug)]
enum Framing {
    Length(usize),
    Chunked { left: usize, done: bool },
    UntilClose,
}

/// A response whose body is read piece by piece.
#[derive(Debug)]
pub struct Body {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    framing: Framing,
    pending: Vec<u8>,
}

impl Body {
    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next piece of the decoded body, or `None` at its end.
    pub async fn read_piece(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        let mut buf = vec![0u8; 16 * 1024];
        match &mut self.framing {
            Framing::Length(0) => Ok(None),
            Framing::Length(left) => {
                let want = (*left).min(buf.len());
                let n = self.reader.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(HttpError::Malformed("body shorter than its length".into()));
                }
                *left -= n;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::UntilClose => {
                let n = self.reader.read(&mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::Chunked { done: true, .. } => Ok(None),
            Framing::Chunked { left, done } => {
                if *left == 0 {
                    let mut line = Vec::new();
                    (&mut self.reader)
                        .take(1024)
                        .read_until(b'\n', &mut line)
                        .await?;
                    let text = String::from_utf8_lossy(&line);
                    let size = text.trim().split(';').next().unwrap_or("");
                    let size = usize::from_str_radix(size, 16).map_err(|_| {
                        HttpError::Malformed(format!("chunk size '{}'", text.trim()))
                    })?;
                    if size == 0 {
                        *done = true;
                        return Ok(None);
                    }
                    *left = size;
                }
                let want = (*left).min(buf.len());
                let n = self.reader.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(HttpError::Malformed(
                        "connection closed inside a chunk".into(),
                    ));
                }
                *left -= n;
                if *left == 0 {
                    let mut crlf = Vec::new();
                    (&mut self.reader)
                        .take(2)
                        .read_until(b'\n', &mut crlf)
                        .await?;
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }

    /// The next server-sent event, or `None` when the stream ends. Comments (keep-alives)
    /// are skipped.
    pub async fn next_event(&mut self) -> Result<Option<SseEvent>, HttpError> {
        loop {
            if let Some(end) = find_blank_line(&self.pending) {
                let raw: Vec<u8> = self.pending.drain(..end.1).collect();
                if let Some(event) = SseEvent::parse(&String::from_utf8_lossy(&raw[..end.0])) {
                    return Ok(Some(event));
                }
                continue;
            }
            if self.pending.len() > MAX_EVENT {
                return Err(HttpError::Malformed("event too large".into()));
            }
            match self.read_piece().await? {
                Some(piece) => self.pending.extend_from_slice(&piece),
                None => return Ok(None),
            }
        }
    }
}

/// `(end of the event, end of the separator)` of the first complete event in `buf`.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let a = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let b = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` lines joined by `\n`.
    pub data: String,
    /// `id:`, if any.
    pub id: Option<String>,
}

impl SseEvent {
    fn parse(text: &str) -> Option<SseEvent> {
        let mut e = SseEvent::default();
        let mut data: Vec<&str> = Vec::new();
        for line in text.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => e.event = value.to_string(),
                "data" => data.push(value),
                "id" => e.id = Some(value.to_string()),
                _ => {}
            }
        }
        if data.is_empty() && e.event.is_empty() {
            return None;
        }
        if e.event.is_empty() {
            e.event = "message".into();
        }
        e.data = data.join("\n");
        Some(e)
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_parse() {
        let e = SseEvent::parse("event: change\nid: 3\ndata: {\"a\":1}").unwrap();
        assert_eq!(e.event, "change");
        assert_eq!(e.id.as_deref(), Some("3"));
        assert_eq!(e.data, "{\"a\":1}");
        assert_eq!(SseEvent::parse(":keep-alive"), None);
        assert_eq!(find_blank_line(b"a\n\nb"), Some((1, 3)));
        assert_eq!(find_blank_line(b"a\r\n\r\nb"), Some((1, 5)));
    }

    #[test]
    fn header_values_cannot_inject_lines() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let req = HttpRequest::new("GET", "/").header("X-A", "b\r\nX-Evil: 1");
        let text = String::from_utf8(req.encode(addr)).unwrap();
        assert!(text.contains("X-A: bX-Evil: 1\r\n"), "{text}");
    }

    #[test]
    fn debug_hides_header_values() {
        let req = HttpRequest::new("PUT", "/x").header("X-Netsel-Secret", "s3cr3t");
        let shown = format!("{req:?}");
        assert!(
            shown.contains("X-Netsel-Secret") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn components_are_escaped() {
        assert_eq!(encode_component("a b/c"), "a%20b%2Fc");
    }
}
