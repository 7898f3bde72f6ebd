//! Header rules: hop-by-hop stripping, the `X-Forwarded-*` headers, and the request
//! framing checks that keep requests from being smuggled past the proxy; and [`Parts`],
//! a request's head as the general path keeps it for its attempts.

use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Version};

/// A request's head, kept for retries.
pub(crate) struct Parts {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) path: PathAndQuery,
    /// The authority the client used (forwarded as `Host`).
    pub(crate) authority: Option<HeaderValue>,
}

impl Parts {
    pub(crate) fn new(p: hyper::http::request::Parts, authority: Option<HeaderValue>) -> Self {
        let path = p
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Parts {
            method: p.method,
            headers: p.headers,
            path,
            authority,
        }
    }
}

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Hop-by-hop headers removed whatever `Connection` says (besides `Connection` itself,
/// `TE` and `Upgrade`, which have rules of their own).
static HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TRAILER,
    TRANSFER_ENCODING,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

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
        let named: Vec<HeaderName> =
            connection_tokens(h.get_all(CONNECTION).iter().map(HeaderValue::as_bytes))
                .filter_map(|t| HeaderName::from_bytes(t).ok())
                .collect();
        for name in named {
            if !(upgrade && name == UPGRADE) {
                h.remove(&name);
            }
        }
        h.remove(CONNECTION);
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    // Each `TE` field is judged alone, as the raw-head writer does
    // (`is_hop_by_hop_raw`): `TE: gzip` and `TE: trailers` leave `TE: trailers`.
    if h.get_all(TE).iter().any(|v| !te_survives(v.as_bytes())) {
        let kept: Vec<HeaderValue> = h
            .get_all(TE)
            .iter()
            .filter(|v| te_survives(v.as_bytes()))
            .cloned()
            .collect();
        h.remove(TE);
        for v in kept {
            h.append(TE, v);
        }
    }
    if upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(UPGRADE);
    }
}

fn te_survives(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"trailers")
}

/// The tokens of `Connection` header values (the header names they make hop-by-hop).
pub(crate) fn connection_tokens<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// [`strip_hop_by_hop`] (without upgrade) for one header of a raw HTTP/1 head: whether
/// `name: value` is dropped, given the head's `Connection` tokens.
pub(crate) fn is_hop_by_hop_raw(name: &str, value: &[u8], connection: &[&[u8]]) -> bool {
    let n = name.as_bytes();
    if n.eq_ignore_ascii_case(b"connection") || n.eq_ignore_ascii_case(b"upgrade") {
        return true;
    }
    if n.eq_ignore_ascii_case(b"te") {
        return !te_survives(value) || connection.iter().any(|t| t.eq_ignore_ascii_case(n));
    }
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(n))
        || connection.iter().any(|t| t.eq_ignore_ascii_case(n))
}

/// The `X-Forwarded-For` value: `prev` (what the client sent, if anything) with the
/// client's address appended.
pub(crate) fn forwarded_for(prev: Option<&[u8]>, client_ip: &[u8], out: &mut Vec<u8>) {
    if let Some(prev) = prev {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip);
}

/// Writes a request's headers for an instance as `name: value` lines, with the rewriting
/// [`strip_hop_by_hop`] and [`add_forwarded`] apply to a `HeaderMap`, straight into
/// bytes: no `Host` (the caller writes it) and, with `drop_length`, no `Content-Length`
/// (the caller writes the framing); hop-by-hop headers and those `connection` names left
/// out; `X-Forwarded-For` the first one sent with the client appended,
/// `X-Forwarded-Proto: http`, and `X-Forwarded-Host` the authority when there is one.
pub(crate) fn write_request_headers<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    connection: &[&[u8]],
    drop_length: bool,
    client_ip: &[u8],
    authority: Option<&[u8]>,
    out: &mut Vec<u8>,
) {
    let mut xff: Option<&[u8]> = None;
    for (name, value) in headers {
        let n = name.as_bytes();
        if n.eq_ignore_ascii_case(b"x-forwarded-for") {
            xff = xff.or(Some(value));
            continue;
        }
        if n.eq_ignore_ascii_case(b"host")
            || (drop_length && n.eq_ignore_ascii_case(b"content-length"))
            || n.eq_ignore_ascii_case(b"x-forwarded-proto")
            || n.eq_ignore_ascii_case(b"x-forwarded-host")
            || is_hop_by_hop_raw(name, value, connection)
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    forwarded_for(xff, client_ip, out);
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(a) = authority {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
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
            forwarded_for(Some(prev.as_bytes()), client_ip.as_bytes(), &mut v);
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

    /// Found by the differential test (`tests/http_proxy_differential.rs`): with
    /// `TE: gzip` before `TE: trailers`, the general path dropped both and the fast path
    /// kept `TE: trailers`.
    #[test]
    fn each_te_field_is_judged_alone() {
        for (fields, want) in [
            (&["gzip", "trailers"][..], &["trailers"][..]),
            (&["trailers", "gzip"], &["trailers"]),
            (&["trailers"], &["trailers"]),
            (&["gzip", "deflate"], &[]),
        ] {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(TE, HeaderValue::from_static(f));
            }
            strip_hop_by_hop(&mut h, false);
            let left: Vec<_> = h.get_all(TE).iter().map(|v| v.to_str().unwrap()).collect();
            assert_eq!(left, want, "{fields:?}");
            // The raw-head writer (direct path, `h2_bodiless.rs`) agrees.
            let raw: Vec<&str> = fields
                .iter()
                .copied()
                .filter(|v| !is_hop_by_hop_raw("te", v.as_bytes(), &[]))
                .collect();
            assert_eq!(raw, want, "{fields:?}");
        }
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
