//! The gateway's first line: the name of the service to relay to.
//!
//! A client of the gateway sends one line naming the service (`web`, `web.netsel` or
//! `web.netsel.`, in any case, ended by `\n` or `\r\n`), then speaks its own protocol.
//! Whatever follows the line in the same read is kept and forwarded to the instance.
//! Parsing is pure ([`parse_name_line`]); [`read_name_line`] adds the size and time limits.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::catalog::{NameError, ServiceName};

/// The domain suffix a name line may carry.
const DOMAIN_SUFFIX: &str = ".netsel";

/// Why a gateway client gets no relay. Its `Display` is the error line sent to the client
/// (after `ERROR `).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The first line is longer than the limit.
    #[error("name line longer than {0} bytes")]
    TooLong(usize),
    /// The first line did not arrive in time.
    #[error("no name line within {0} ms")]
    Timeout(u128),
    /// The client closed before sending anything.
    #[error("connection closed before the name line")]
    Closed,
    /// The line is not a service name.
    #[error("bad service name: {0}")]
    BadName(#[from] NameError),
    /// The line is not UTF-8.
    #[error("name line is not UTF-8")]
    NotUtf8,
    /// No such service.
    #[error("unknown service {0}")]
    Unknown(ServiceName),
    /// The service has no healthy instance.
    #[error("no healthy instance of {0}")]
    NoHealthyInstance(ServiceName),
    /// Every instance tried refused or timed out.
    #[error("cannot connect to {0}")]
    ConnectFailed(ServiceName),
    /// The proxy is at its connection cap.
    #[error("too many connections")]
    TooManyConnections,
    /// Reading from the client failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl GatewayError {
    /// A short label for metrics (bounded: never the client's input).
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::TooLong(_) => "name_too_long",
            GatewayError::Timeout(_) => "name_timeout",
            GatewayError::Closed | GatewayError::Io(_) => "client_closed",
            GatewayError::BadName(_) | GatewayError::NotUtf8 => "bad_name",
            GatewayError::Unknown(_) => "unknown_service",
            GatewayError::NoHealthyInstance(_) => "no_healthy_instance",
            GatewayError::ConnectFailed(_) => "connect_failed",
            GatewayError::TooManyConnections => "too_many_connections",
        }
    }
}

/// Parses a name line (without or with its `\n` / `\r\n`): surrounding blanks, a trailing
/// dot and a `.netsel` suffix are ignored; the rest must be a valid service name.
pub fn parse_name_line(line: &[u8]) -> Result<ServiceName, GatewayError> {
    let text = std::str::from_utf8(line).map_err(|_| GatewayError::NotUtf8)?;
    let mut name = text.trim_ascii();
    name = name.strip_suffix('.').unwrap_or(name);
    if name.len() > DOMAIN_SUFFIX.len() {
        let cut = name.len() - DOMAIN_SUFFIX.len();
        if name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(DOMAIN_SUFFIX) {
            name = &name[..cut];
        }
    }
    Ok(ServiceName::new(name)?)
}

/// Splits the first line off `buf`: `Some(line)` (without its `\n`) once a newline has
/// arrived; `buf` keeps what follows it.
pub fn split_line(buf: &mut BytesMut) -> Option<BytesMut> {
    let pos = buf.iter().position(|b| *b == b'\n')?;
    let mut line = buf.split_to(pos + 1);
    line.truncate(pos);
    Some(line)
}

/// Reads the name line from `stream` within `timeout`, accepting at most `max` bytes
/// (line ending included). Returns the name and the bytes that followed it. A client that
/// half-closes right after the name (no newline) is accepted too.
pub async fn read_name_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
    timeout: Duration,
) -> Result<(ServiceName, BytesMut), GatewayError> {
    let mut buf = BytesMut::with_capacity(max.min(4096));
    let read = async {
        loop {
            if let Some(line) = split_line(&mut buf) {
                return Ok(line);
            }
            if buf.len() >= max {
                return Err(GatewayError::TooLong(max));
            }
            // Never read past the limit: bytes beyond it stay in the socket for the relay.
            let mut limited = (&mut *stream).take((max - buf.len()) as u64);
            if limited.read_buf(&mut buf).await? == 0 {
                if buf.is_empty() {
                    return Err(GatewayError::Closed);
                }
                return Ok(buf.split());
            }
        }
    };
    let line = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| GatewayError::Timeout(timeout.as_millis()))??;
    let name = parse_name_line(&line)?;
    Ok((name, buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn accepted_name_forms() {
        for line in [
            &b"web"[..],
            b"web\r",
            b"  Web \r",
            b"web.netsel",
            b"WEB.NETSEL.",
            b"web.",
        ] {
            assert_eq!(parse_name_line(line).unwrap().as_str(), "web", "{line:?}");
        }
        assert_eq!(parse_name_line(b"netsel").unwrap().as_str(), "netsel");
    }

    #[test]
    fn rejected_name_forms() {
        assert!(matches!(
            parse_name_line(b""),
            Err(GatewayError::BadName(NameError::Empty))
        ));
        assert!(matches!(
            parse_name_line(b"a.b"),
            Err(GatewayError::BadName(_))
        ));
        assert!(matches!(
            parse_name_line(b"web.other"),
            Err(GatewayError::BadName(_))
        ));
        assert!(matches!(
            parse_name_line(b"\xff\xfe"),
            Err(GatewayError::NotUtf8)
        ));
        assert!(matches!(
            parse_name_line("ü.netsel".as_bytes()),
            Err(GatewayError::BadName(_))
        ));
        let long = "a".repeat(64);
        assert!(matches!(
            parse_name_line(long.as_bytes()),
            Err(GatewayError::BadName(NameError::TooLong))
        ));
    }

    #[test]
    fn split_keeps_what_follows() {
        let mut buf = BytesMut::from(&b"web\r\nGET / HTTP/1.0\r\n"[..]);
        let line = split_line(&mut buf).unwrap();
        assert_eq!(&line[..], b"web\r");
        assert_eq!(&buf[..], b"GET / HTTP/1.0\r\n");
        let mut none = BytesMut::from(&b"partial"[..]);
        assert!(split_line(&mut none).is_none());
        assert_eq!(&none[..], b"partial");
    }

    #[tokio::test]
    async fn reads_name_and_leftover_across_reads() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            a.write_all(b"we").await.unwrap();
            tokio::task::yield_now().await;
            a.write_all(b"b\nhello").await.unwrap();
            a
        });
        let (name, rest) = read_name_line(&mut b, 256, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(name.as_str(), "web");
        let _a = writer.await.unwrap();
        // "hello" may or may not have arrived with the line; whatever did is kept.
        assert!(b"hello".starts_with(&rest[..]));
    }

    #[tokio::test]
    async fn limits() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[b'x'; 300]).await.unwrap();
        let e = read_name_line(&mut b, 256, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::TooLong(256)), "{e}");

        let (_a, mut b) = tokio::io::duplex(1024);
        tokio::time::pause();
        let e = read_name_line(&mut b, 256, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::Timeout(5000)), "{e}");
        assert_eq!(e.to_string(), "no name line within 5000 ms");

        let (a, mut b) = tokio::io::duplex(1024);
        drop(a);
        let e = read_name_line(&mut b, 256, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::Closed), "{e}");

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"web").await.unwrap();
        drop(a);
        let (name, rest) = read_name_line(&mut b, 256, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((name.as_str(), rest.len()), ("web", 0));
    }
}
