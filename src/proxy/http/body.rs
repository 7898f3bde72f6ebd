//! The bodies of responses to clients ([`ResponseBody`]): a short answer of the proxy's
//! own ([`local`]), an instance's body streamed by hyper's client, or one read straight
//! from a raw pooled socket ([`RawBody`], for HTTP/2 clients' bodiless requests); and
//! what a body holds on to until the client has it all ([`Hold`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::context::InFlight;
use super::h1_upstream::RespBody;
use super::message_framing::ChunkStep;
use super::pool::{Pool, UpBody};
use crate::proxy::balance::ActiveGuard;

/// What a response body holds on to until the client has it all.
pub(crate) struct Hold {
    /// The HTTP/1.1 connection it came on, returned to the pool at the end of the body.
    pub(crate) pooled: Option<(Arc<Pool>, SocketAddr, http1::SendRequest<UpBody>)>,
    /// Counts the request against its instance (least connections).
    pub(crate) _active: Option<ActiveGuard>,
    /// Counts the request against the client connection (idle timeout).
    pub(crate) _in_flight: InFlight,
}

/// The error type of response bodies (hyper's, or an instance's socket's).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Kind {
    Full(Option<Bytes>),
    Stream {
        inner: Incoming,
        ended: bool,
    },
    /// Read straight from a raw pooled socket (HTTP/2 clients, bodiless requests).
    Raw(Box<RawBody>),
}

/// The body of a response to a client: a short local answer or an instance's body,
/// streamed.
pub(crate) struct ResponseBody {
    kind: Kind,
    hold: Option<Box<Hold>>,
}

impl ResponseBody {
    /// A complete body.
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(b.into())),
            hold: None,
        }
    }

    /// An instance's body read from a raw socket.
    pub(crate) fn raw(raw: RawBody, hold: Hold) -> Self {
        ResponseBody {
            kind: Kind::Raw(Box::new(raw)),
            hold: Some(Box::new(hold)),
        }
    }

    /// An instance's body.
    pub(crate) fn stream(inner: Incoming, hold: Hold) -> Self {
        ResponseBody {
            kind: Kind::Stream {
                inner,
                ended: false,
            },
            hold: Some(Box::new(hold)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Kind::Stream { inner, ended } = &self.kind
            && (*ended || inner.is_end_stream())
            && let Some((pool, addr, tx)) = self.hold.as_mut().and_then(|h| h.pooled.take())
        {
            pool.put_h1(addr, tx);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { inner, ended } => {
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(None) = r {
                    *ended = true;
                }
                r.map(|o| o.map(|r| r.map_err(Into::into)))
            }
            Kind::Raw(raw) => raw.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream { inner, ended } => *ended || inner.is_end_stream(),
            Kind::Raw(raw) => raw.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { inner, .. } => inner.size_hint(),
            Kind::Raw(raw) => raw.size_hint(),
        }
    }
}

/// A short plain-text answer from the proxy itself.
pub(crate) fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A response body read straight from the instance's socket; the connection goes back
/// to the pool when the body ended cleanly.
pub(crate) struct RawBody {
    stream: Option<TcpStream>,
    /// Bytes read and not yet passed on.
    buf: BytesMut,
    body: RespBody,
    keep_alive: bool,
    done: bool,
    pool: Arc<Pool>,
    addr: SocketAddr,
}

impl Drop for RawBody {
    fn drop(&mut self) {
        // hyper never polls a body that says it has ended (HEAD, 204, 304, length 0).
        if !self.done && matches!(self.body, RespBody::None | RespBody::Fixed(0)) {
            self.finish(true);
        }
    }
}

impl RawBody {
    /// The body that follows a response head in `buf` (bytes already read from
    /// `stream`), framed as `body`; `stream` goes back to `pool` as a connection to
    /// `addr` when the body ends cleanly and the instance `keep_alive`s.
    pub(crate) fn new(
        stream: TcpStream,
        buf: BytesMut,
        body: RespBody,
        keep_alive: bool,
        pool: Arc<Pool>,
        addr: SocketAddr,
    ) -> Self {
        RawBody {
            stream: Some(stream),
            buf,
            body,
            keep_alive,
            done: false,
            pool,
            addr,
        }
    }

    fn finish(&mut self, clean: bool) {
        self.done = true;
        if let Some(s) = self.stream.take()
            && clean
            && self.keep_alive
            && self.buf.is_empty()
        {
            self.pool.put_raw(self.addr, s, Instant::now());
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.done || matches!(self.body, RespBody::None | RespBody::Fixed(0))
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.body {
            RespBody::None => SizeHint::with_exact(0),
            RespBody::Fixed(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match &mut self.body {
                RespBody::None | RespBody::Fixed(0) => {
                    self.finish(true);
                    return Poll::Ready(None);
                }
                RespBody::Fixed(left) if !self.buf.is_empty() => {
                    let take = (*left).min(self.buf.len() as u64);
                    *left -= take;
                    let data = self.buf.split_to(take as usize).freeze();
                    if *left == 0 {
                        self.finish(true);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                RespBody::Chunked(t) if !self.buf.is_empty() => {
                    if let Some(left) = t.data_left() {
                        let take = left.min(self.buf.len() as u64) as usize;
                        t.feed(&self.buf[..take]);
                        let data = self.buf.split_to(take).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Framing bytes, one at a time up to the next data.
                    match t.feed(&self.buf[..1]) {
                        ChunkStep::More => self.buf.advance(1),
                        ChunkStep::End(_) => {
                            self.buf.advance(1);
                            self.finish(true);
                            return Poll::Ready(None);
                        }
                        ChunkStep::Bad => {
                            self.finish(false);
                            return Poll::Ready(Some(Err("malformed chunked response".into())));
                        }
                    }
                    continue;
                }
                RespBody::Close if !self.buf.is_empty() => {
                    let data = self.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                _ => {}
            }
            // More bytes are needed.
            let Some(stream) = &self.stream else {
                return Poll::Ready(None);
            };
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(16 * 1024);
            }
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    let close_delimited = matches!(self.body, RespBody::Close);
                    self.finish(false);
                    if close_delimited {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err("instance closed inside a response body".into())));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = std::task::ready!(stream.poll_read_ready(cx)) {
                        self.finish(false);
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                Err(e) => {
                    self.finish(false);
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}
