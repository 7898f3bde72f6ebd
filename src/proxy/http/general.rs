//! The general path: every request the direct path (`h1_direct.rs`) hands over, as
//! hyper serves it (HTTP/1.1 and HTTP/2, see `HttpProxy::connection` in `mod.rs`).
//! [`handle`] counts the request, refuses what the proxy never forwards (`CONNECT`,
//! ambiguous framing, too many headers), routes it (`route.rs`), then forwards it under
//! the request timeout: bodiless HTTP/2 requests to HTTP/1.1 instances over raw sockets
//! (`h2_bodiless.rs`), others through hyper's client ([`forward`]), upgrades on a fresh
//! connection joined byte for byte on `101` ([`upgrade`]). Every attempt decision is
//! `attempts.rs`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body as _, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderValue, TRANSFER_ENCODING};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::attempts::{Attempts, bad_body_answer, timed_out_answer};
use super::body::{Hold, ResponseBody, local};
use super::context::{ConnCtx, InFlight, Shared};
use super::headers::{self, Parts};
use super::metrics::{ServiceLabel, ServiceMetrics};
use super::pool::{Pool, UpBody};
use super::{h2_bodiless, route};
use crate::catalog::Service;
use crate::protocol::AppProtocol;

pub(super) async fn handle(
    proxy: &Shared,
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let in_flight = ctx.begin_request();
    proxy.budget.deposit();
    let (label, resp) = route(proxy, req, &ctx, in_flight).await;
    let m = match label {
        Labelled::Known(m) => m,
        Labelled::Unknown => ctx.worker.metrics(&proxy.metrics, ServiceLabel(None)),
    };
    m.request(resp.status().as_u16(), start.elapsed());
    resp
}

async fn route(
    proxy: &Shared,
    req: Request<Incoming>,
    ctx: &ConnCtx,
    in_flight: InFlight,
) -> (Labelled, Response<ResponseBody>) {
    let none = Labelled::Unknown;
    if req.method() == Method::CONNECT {
        let mut r = local(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this proxy only forwards to registered services\n",
        );
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return (none, r);
    }
    if let Err(e) = headers::check_framing(&req) {
        tracing::debug!(error = %e, "refused ambiguous request framing");
        let mut r = local(StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return (none, r);
    }
    if req.headers().len() > proxy.settings.max_headers {
        return (
            none,
            local(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers\n",
            ),
        );
    }
    let target = route::target(&req, &proxy.domain);
    let svc = match proxy.lookup(target.as_ref()) {
        Ok(svc) => svc,
        Err((status, body)) => return (none, local(status, body)),
    };
    let m = ctx
        .worker
        .metrics(&proxy.metrics, ServiceLabel(Some(svc.name.clone())));
    let label = &*m;
    let named = req
        .headers()
        .get(route::TAG_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
        .filter(|v| !v.is_empty());
    let host_tag = target.as_ref().and_then(|t| t.tag);
    let tag = match proxy.route_tag(&svc, named.as_deref().or(host_tag)) {
        Ok(tag) => tag,
        Err(body) => {
            return (
                Labelled::Known(m),
                local(StatusCode::SERVICE_UNAVAILABLE, body),
            );
        }
    };
    let tag = tag.as_deref();
    let authority = target
        .as_ref()
        .and_then(|t| HeaderValue::from_str(t.authority).ok());
    let timeout = Duration::from_millis(proxy.settings.request_timeout_ms);
    let resp = if headers::is_upgrade(&req) {
        // Rare and large: boxed, so the common path's future stays small.
        let up = upgrade(proxy, req, &svc, label, ctx, authority, in_flight, tag);
        tokio::time::timeout(timeout, Box::pin(up)).await
    } else {
        let fwd = forward(proxy, req, &svc, label, ctx, authority, in_flight, tag);
        tokio::time::timeout(timeout, fwd).await
    };
    let resp = resp.unwrap_or_else(|_| {
        let (status, body) = timed_out_answer(&svc);
        local(status, body)
    });
    (Labelled::Known(m), resp)
}

/// Builds the request for one attempt on `instance`.
fn upstream_request(
    proxy: &Shared,
    parts: &Parts,
    body: UpBody,
    endpoint: SocketAddr,
    h2: bool,
) -> Request<UpBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let host = match (&parts.authority, proxy.settings.preserve_host) {
        (Some(a), true) => a.clone(),
        _ => HeaderValue::from_str(&endpoint.to_string())
            .unwrap_or(HeaderValue::from_static("localhost")),
    };
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        let authority = Authority::try_from(host.as_bytes())
            .unwrap_or_else(|_| Authority::from_static("localhost"));
        let mut u = hyper::http::uri::Parts::default();
        u.scheme = Some(Scheme::HTTP);
        u.authority = Some(authority);
        u.path_and_query = Some(parts.path.clone());
        *req.uri_mut() = Uri::from_parts(u).unwrap_or_default();
        req.headers_mut().remove(HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        *req.uri_mut() = Uri::from(parts.path.clone());
        req.headers_mut().insert(HOST, host);
        // A body of unknown length (the client's was chunked) goes out chunked, said
        // explicitly: without the header hyper's client sends no body at all for GET,
        // HEAD and CONNECT, dropping what the client sent (the fast path forwards it;
        // found by tests/http_proxy_differential.rs).
        if let UpBody::Stream(b) = req.body()
            && b.size_hint().exact().is_none()
            && !req.headers().contains_key(CONTENT_LENGTH)
        {
            req.headers_mut()
                .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
    }
    req
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    proxy: &Shared,
    req: Request<Incoming>,
    svc: &Arc<Service>,
    label: &ServiceMetrics,
    ctx: &ConnCtx,
    authority: Option<HeaderValue>,
    in_flight: InFlight,
    tag: Option<&str>,
) -> Response<ResponseBody> {
    let h2_client = req.version() == Version::HTTP_2;
    let (parts, body) = req.into_parts();
    let mut parts = Parts::new(parts, authority);
    if h2_client && body.is_end_stream() && h2_bodiless::fits(svc) {
        // Bodiless HTTP/2 requests to HTTP/1.1 instances: raw sockets, no hand-offs;
        // the head is written straight from the client's headers (same rewriting).
        return h2_bodiless::forward(proxy, &parts, svc, label, ctx, in_flight, tag).await;
    }
    headers::strip_hop_by_hop(&mut parts.headers, false);
    headers::add_forwarded(&mut parts.headers, &ctx.client_ip, parts.authority.as_ref());
    let mut body = Some(if body.is_end_stream() {
        UpBody::Empty
    } else {
        UpBody::Stream(body)
    });
    let replayable = matches!(body, Some(UpBody::Empty)) && parts.method.is_idempotent();
    let mut tries = proxy.attempts(svc, label, tag);
    while let Some(pick) = tries.next(false) {
        let active = pick.start();
        let addr = pick.instance.endpoint;
        let h2 = pick.instance.protocol == AppProtocol::Http2;
        let conn = if h2 {
            ctx.worker
                .pool
                .h2(addr)
                .await
                .map(|(tx, r)| (Sender::H2(tx), r))
        } else {
            ctx.worker
                .pool
                .h1(addr)
                .await
                .map(|(tx, r)| (Sender::H1(tx), r))
        };
        let (sender, reused) = match conn {
            Ok(c) => c,
            Err(e) => {
                tries.connect_failed(&pick, &e);
                continue;
            }
        };
        label.upstream(reused);
        let Some(b) = body.take() else { break };
        let up = upstream_request(proxy, &parts, b, addr, h2);
        let result = match sender {
            Sender::H1(mut tx) => match tx.try_send_request(up).await {
                Ok(resp) => Ok((resp, Some(tx))),
                Err(mut e) => Err((e.take_message(), e.into_error())),
            },
            Sender::H2(mut tx) => match tx.try_send_request(up).await {
                Ok(resp) => Ok((resp, None)),
                Err(mut e) => {
                    ctx.worker.pool.drop_h2(addr);
                    Err((e.take_message(), e.into_error()))
                }
            },
        };
        match result {
            Ok((resp, tx)) => {
                tries.succeeded(&pick);
                let pooled = tx.map(|tx| (ctx.worker.pool.clone(), addr, tx));
                return respond(resp, pooled, active, in_flight);
            }
            Err((Some(unsent_req), e)) if tries.stale() => {
                // The connection closed before the request went out: try again.
                tracing::debug!(%addr, error = %e, "upstream connection not usable, retrying");
                body = Some(unsent_req.into_body());
            }
            Err((_, e)) if e.is_user() => {
                // The client's body failed (malformed chunking, cut short): not the
                // instance's fault, so nothing counts against it, and the client is
                // told (the fast path answers the same).
                tracing::debug!(service = %svc.name, %addr, error = %e, "request body failed");
                let (status, body) = bad_body_answer();
                let mut r = local(status, body);
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
            Err((_, e)) => {
                tracing::debug!(service = %svc.name, %addr, error = %e, "upstream request failed");
                if tries.failed(&pick, reused, replayable) {
                    body = Some(UpBody::Empty);
                    continue;
                }
                break;
            }
        }
    }
    give_up(&tries)
}

/// An HTTP/1.1 `Upgrade`: forwarded on a fresh connection; on `101` both sides are
/// joined byte for byte.
#[allow(clippy::too_many_arguments)]
async fn upgrade(
    proxy: &Shared,
    mut req: Request<Incoming>,
    svc: &Arc<Service>,
    label: &ServiceMetrics,
    ctx: &ConnCtx,
    authority: Option<HeaderValue>,
    in_flight: InFlight,
    tag: Option<&str>,
) -> Response<ResponseBody> {
    let client_side = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut parts = Parts::new(parts, authority);
    headers::strip_hop_by_hop(&mut parts.headers, true);
    headers::add_forwarded(&mut parts.headers, &ctx.client_ip, parts.authority.as_ref());
    let mut body = Some(UpBody::Stream(body));
    let mut tries = proxy.attempts(svc, label, tag);
    // An h2c instance cannot take an HTTP/1.1 upgrade.
    while let Some(pick) = tries.next(true) {
        let addr = pick.instance.endpoint;
        let active = pick.start();
        let mut tx = match ctx.worker.pool.connect_h1(addr).await {
            Ok(tx) => tx,
            Err(e) => {
                tries.connect_failed(&pick, &e);
                continue;
            }
        };
        label.upstream(false);
        let Some(b) = body.take() else { break };
        let up = upstream_request(proxy, &parts, b, addr, false);
        let mut resp = match tx.send_request(up).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "upstream upgrade failed");
                // The request body streamed from the client: it cannot be sent again.
                tries.failed(&pick, false, false);
                break;
            }
        };
        tries.succeeded(&pick);
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return respond(resp, None, active, in_flight);
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let hard_stop = proxy.hard_stop.clone();
        ctx.worker.tasks.spawn(async move {
            let _active = active;
            let _in_flight = in_flight;
            let (client, upstream) = match tokio::join!(client_side, upstream_side) {
                (Ok(c), Ok(u)) => (c, u),
                (c, u) => {
                    tracing::debug!(
                        client_ok = c.is_ok(),
                        upstream_ok = u.is_ok(),
                        "upgrade did not complete"
                    );
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "tunnel ended");
                    }
                }
                _ = hard_stop.cancelled() => {}
            }
        });
        let (mut head, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut head.headers, true);
        return Response::from_parts(head, ResponseBody::full(bytes::Bytes::new()));
    }
    give_up(&tries)
}
/// Which service's metrics a response counts under.
enum Labelled {
    Known(Arc<ServiceMetrics>),
    /// The request named no known service.
    Unknown,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

fn respond(
    resp: Response<Incoming>,
    pooled: Option<(
        Arc<Pool>,
        SocketAddr,
        hyper::client::conn::http1::SendRequest<UpBody>,
    )>,
    active: crate::proxy::balance::ActiveGuard,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let (mut head, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut head.headers, false);
    head.version = Version::HTTP_11;
    let hold = Hold {
        pooled,
        _active: Some(active),
        _in_flight: in_flight,
    };
    Response::from_parts(head, ResponseBody::stream(body, hold))
}

/// [`Attempts::answer`] as a response: no attempt answered.
fn give_up(tries: &Attempts) -> Response<ResponseBody> {
    let (status, body) = tries.answer();
    local(status, body)
}
