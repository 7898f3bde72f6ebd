//! Header rules: hop-by-hop stripping, the `X-Forwarded-*` headers, and the request
//! framing checks that keep requests from being smuggled past the proxy.

use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Request, Version};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Why a request's framing is refused (answered 400, nothing forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    /// More than one `Content-Length`, or a list of lengths.
    #[error("duplicate Content-Length")]
    DuplicateLength,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    /// `Transfer-Encoding` other than a single `chunked`.
    #[error("unsupported Transfer-Encoding")]
    BadEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 request.
    #[error("Transfer-Encoding in HTTP/1.0")]
    EncodingInHttp10,
}

/// Checks the framing headers of an HTTP/1 request. hyper already rejects malformed
/// lengths, conflicting lengths and bad chunked bodies; these are the ambiguous cases it
/// lets through (it resolves them, but a server behind us might resolve them otherwise).
pub(crate) fn check_framing<B>(req: &Request<B>) -> Result<(), FramingError> {
    if req.version() >= Version::HTTP_2 {
        return Ok(()); // h2 frames bodies itself; h2 rejects these headers.
    }
    let h = req.headers();
    let mut lengths = h.get_all(CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() || length.is_some_and(|v| v.as_bytes().contains(&b',')) {
        return Err(FramingError::DuplicateLength);
    }
    let mut encodings = h.get_all(TRANSFER_ENCODING).iter();
    if let Some(te) = encodings.next() {
        if length.is_some() {
            return Err(FramingError::LengthAndEncoding);
        }
        if req.version() == Version::HTTP_10 {
            return Err(FramingError::EncodingInHttp10);
        }
        if encodings.next().is_some() || !te.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(FramingError::BadEncoding);
        }
    }
    Ok(())
}

/// Whether the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers: those named by `Connection`, and the fixed list. `TE:
/// trailers` survives (gRPC needs it). With `upgrade`, `Upgrade` and `Connection:
/// upgrade` are kept so the next hop can switch protocols too.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    if h.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == UPGRADE) {
                h.remove(&name);
            }
        }
        h.remove(CONNECTION);
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &TRAILER, &TRANSFER_ENCODING] {
        h.remove(name);
    }
    h.remove(PROXY_AUTHORIZATION);
    h.remove(PROXY_AUTHENTICATE);
    if let Some(te) = h.get(TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        h.remove(TE);
    }
    if upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(UPGRADE);
    }
}

/// Adds `X-Forwarded-For` (appended to any the client sent), `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (both replaced: this proxy is where the client connected).
pub(crate) fn add_forwarded(
    h: &mut HeaderMap,
    client_ip: &HeaderValue,
    host: Option<&HeaderValue>,
) {
    let xff = match h.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone())
        }
        None => client_ip.clone(),
    };
    h.insert(X_FORWARDED_FOR.clone(), xff);
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(v) => {
            h.insert(X_FORWARDED_HOST.clone(), v.clone());
        }
        None => {
            h.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn framing_rules() {
        use FramingError::*;
        let v11 = Version::HTTP_11;
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<(), FramingError>);
        let cases: &[Case] = &[
            (&[("content-length", "5")], Ok(())),
            (&[("transfer-encoding", "chunked")], Ok(())),
            (&[("transfer-encoding", "Chunked")], Ok(())),
            (
                &[("content-length", "5"), ("content-length", "5")],
                Err(DuplicateLength),
            ),
            (&[("content-length", "5, 5")], Err(DuplicateLength)),
            (
                &[("content-length", "5"), ("transfer-encoding", "chunked")],
                Err(LengthAndEncoding),
            ),
            (&[("transfer-encoding", "gzip, chunked")], Err(BadEncoding)),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                Err(BadEncoding),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(check_framing(&req(v11, headers)), *want, "{headers:?}");
        }
        assert_eq!(
            check_framing(&req(Version::HTTP_10, &[("transfer-encoding", "chunked")])),
            Err(EncodingInHttp10)
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut r = req(
            Version::HTTP_11,
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic x"),
                ("te", "gzip"),
                ("upgrade", "websocket"),
                ("x-kept", "1"),
            ],
        );
        strip_hop_by_hop(r.headers_mut(), false);
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let mut r = req(
            Version::HTTP_11,
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
            ],
        );
        assert!(is_upgrade(&r));
        strip_hop_by_hop(r.headers_mut(), true);
        assert_eq!(r.headers()["connection"], "upgrade");
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["te"], "trailers");
    }

    #[test]
    fn forwarded_headers_append_and_replace() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &ip, Some(&HeaderValue::from_static("web:8081")));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(h[&X_FORWARDED_HOST], "web:8081");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.2.3.4"));
        add_forwarded(&mut h, &ip, None);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }
}
