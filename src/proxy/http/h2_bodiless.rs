//! HTTP/2 (h2c) client requests without a body, to HTTP/1.1 instances, over the direct
//! path's raw pooled sockets (a branch of the general path, `general.rs`): the request is written and the response head read in the
//! stream's own task, and the response body is read straight from the socket by the
//! body hyper polls — no hyper client connection task, no hand-offs between tasks.
//! Requests with a body, and services with h2c instances, keep the hyper client.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{Hold, RawBody, ResponseBody, local};
use super::context::{ConnCtx, InFlight, Shared};
use super::h1_upstream::{AttemptError, RespBody, read_upstream_head, response_framing};
use super::headers::{self, Parts};
use super::metrics::ServiceMetrics;
use crate::catalog::Service;
use crate::protocol::AppProtocol;

/// Whether [`forward`] can take a request to `svc`: no h2c instance to speak to.
pub(super) fn fits(svc: &Service) -> bool {
    !svc.instances
        .iter()
        .any(|i| i.protocol == AppProtocol::Http2)
}

/// Writes the client's headers for the instance (see [`headers::write_request_headers`]).
fn write_headers(
    h: &hyper::HeaderMap,
    client_ip: &HeaderValue,
    authority: Option<&HeaderValue>,
    out: &mut Vec<u8>,
) {
    let named: Vec<&[u8]> = if h.contains_key(hyper::header::CONNECTION) {
        headers::connection_tokens(
            h.get_all(hyper::header::CONNECTION)
                .iter()
                .map(HeaderValue::as_bytes),
        )
        .collect()
    } else {
        Vec::new()
    };
    headers::write_request_headers(
        h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        &named,
        false,
        client_ip.as_bytes(),
        authority.map(HeaderValue::as_bytes),
        out,
    );
}

/// Forwards a bodiless request (`parts` as the client sent it) to an HTTP/1.1 instance
/// of `svc`, with the same retries as the other paths. The upstream head gets the same
/// rewriting as on the other paths (`headers::strip_hop_by_hop` and
/// `headers::add_forwarded`), written straight into the bytes sent.
pub(super) async fn forward(
    proxy: &Shared,
    parts: &Parts,
    svc: &Arc<Service>,
    label: &ServiceMetrics,
    ctx: &ConnCtx,
    in_flight: InFlight,
    tag: Option<&str>,
) -> Response<ResponseBody> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.path.as_str().as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    write_headers(
        &parts.headers,
        &ctx.client_ip,
        parts.authority.as_ref(),
        &mut head,
    );
    head.extend_from_slice(b"host: ");
    let base = head.len();
    let is_head = parts.method == hyper::Method::HEAD;
    let idempotent = parts.method.is_idempotent();
    let pool = &ctx.worker.pool;
    let now = Instant::now();
    let mut buf = BytesMut::with_capacity(4096);
    let mut tries = proxy.attempts(svc, label, tag);
    while let Some(pick) = tries.next(true) {
        let addr = pick.instance.endpoint;
        let active = pick.start();
        let pooled = tries.pooled_raw(pool, addr, now);
        let reused = pooled.is_some();
        let mut up = match pooled {
            Some(up) => up,
            None => match pool.connect_raw(addr).await {
                Ok(up) => up,
                Err(e) => {
                    tries.connect_failed(&pick, &e);
                    continue;
                }
            },
        };
        label.upstream(reused);
        head.truncate(base);
        match (&parts.authority, proxy.settings.preserve_host) {
            (Some(a), true) => head.extend_from_slice(a.as_bytes()),
            _ => head.extend_from_slice(addr.to_string().as_bytes()),
        }
        head.extend_from_slice(b"\r\n\r\n");
        buf.clear();
        let r = exchange(
            &mut up,
            &head,
            &mut buf,
            is_head,
            proxy.settings.max_header_bytes,
        )
        .await;
        match r {
            Ok(resp) => {
                tries.succeeded(&pick);
                let hold = Hold {
                    pooled: None,
                    _active: Some(active),
                    _in_flight: in_flight,
                };
                let (status, headers, body, keep_alive) = resp;
                let raw = RawBody::new(up, buf, body, keep_alive, pool.clone(), addr);
                let mut r = Response::new(ResponseBody::raw(raw, hold));
                *r.status_mut() = status;
                *r.headers_mut() = headers;
                return r;
            }
            Err(e) => {
                tracing::debug!(service = %svc.name, %addr, error = ?e, reused, "upstream exchange failed");
                let no_response = matches!(e, AttemptError::NoResponse);
                if tries.again(&pick, reused, no_response, idempotent) {
                    continue;
                }
                break;
            }
        }
    }
    let (status, body) = tries.answer();
    local(status, body)
}

type Head = (StatusCode, hyper::HeaderMap, RespBody, bool);

/// Writes the request and reads the response head; the bytes after it stay in `buf`.
async fn exchange(
    up: &mut TcpStream,
    req: &[u8],
    buf: &mut BytesMut,
    is_head: bool,
    max_head: usize,
) -> Result<Head, AttemptError> {
    if up.write_all(req).await.is_err() {
        return Err(AttemptError::NoResponse);
    }
    let (head, len) = read_upstream_head(up, buf, max_head, |resp, len| {
        let status =
            StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| AttemptError::BadResponse)?;
        let (body, keep_alive, connection) = response_framing(resp, is_head)?;
        let mut map = hyper::HeaderMap::with_capacity(resp.headers.len());
        for h in resp.headers.iter() {
            let framing = h.name.eq_ignore_ascii_case("content-length");
            if (framing && !matches!(body, RespBody::Fixed(_) | RespBody::None))
                || headers::is_hop_by_hop_raw(h.name, h.value, &connection)
            {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                map.append(n, v);
            }
        }
        Ok(((status, map, body, keep_alive), len))
    })
    .await?;
    buf.advance(len);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head lines the general path sends for `h` (`strip_hop_by_hop` then
    /// `add_forwarded`), and `h2_bodiless.rs`'s, sorted (order does not matter to HTTP).
    fn both(h: &hyper::HeaderMap, authority: Option<&str>) -> (Vec<String>, Vec<String>) {
        let ip = HeaderValue::from_static("127.0.0.9");
        let authority = authority.map(|a| HeaderValue::from_str(a).unwrap());
        let mut general = h.clone();
        headers::strip_hop_by_hop(&mut general, false);
        headers::add_forwarded(&mut general, &ip, authority.as_ref());
        let mut want: Vec<String> = general
            .iter()
            .filter(|(n, _)| *n != hyper::header::HOST)
            .map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap()))
            .collect();
        want.sort();
        let mut out = Vec::new();
        write_headers(h, &ip, authority.as_ref(), &mut out);
        let mut got: Vec<String> = String::from_utf8(out)
            .unwrap()
            .split_terminator("\r\n")
            .map(str::to_string)
            .collect();
        got.sort();
        (want, got)
    }

    #[test]
    fn the_bridge_rewrites_headers_like_the_general_path() {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in [
            ("host", "web.netsel"),
            ("user-agent", "h2load"),
            ("accept", "*/*"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-forwarded-for", "10.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed"),
            ("te", "trailers"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("connection", "x-private, close"),
            ("x-private", "secret"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
            ("x-kept", "2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let (want, got) = both(&h, Some("web.netsel:8081"));
        assert_eq!(got, want);
        assert!(got.contains(&"x-forwarded-for: 10.1.1.1, 127.0.0.9".to_string()));
        assert!(!got.iter().any(|l| l.starts_with("x-private")));

        // No authority, nothing forwarded before, TE that does not survive.
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            HeaderName::from_static("x-forwarded-host"),
            HeaderValue::from_static("spoofed"),
        );
        let (want, got) = both(&h, None);
        assert_eq!(got, want);
        assert_eq!(
            got,
            vec!["x-forwarded-for: 127.0.0.9", "x-forwarded-proto: http"]
        );
    }
}
