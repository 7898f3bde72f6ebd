//! DNS over TCP (RFC 7766): NetSel's own accept loop, so that connections are capped.
//!
//! hickory-server's TCP listener takes every connection it is offered and, with a client
//! that never reads its answers, can block a connection's task on a full response queue
//! where its idle timeout no longer runs. Here each connection is one task that reads a
//! length-prefixed query, answers it with [`DnsHandler::respond_raw`] (the same answers as
//! the UDP fast path, without truncation) and writes the answer, one query at a time:
//!
//! * at most `tcp_max_connections` connections; one more is closed as soon as it is
//!   accepted and counted in `netsel_dns_tcp_refused_connections_total`;
//! * a query must arrive whole within `tcp_idle_secs` of the previous answer (slowloris
//!   and silent connections are closed), and an answer must be taken by the client within
//!   `tcp_idle_secs` (a client that never reads is disconnected; its connection's kernel
//!   send buffer is kept small, so that is noticed after 128 KiB of answers, not
//!   megabytes).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler::{DnsHandler, RawAnswer};

/// Kernel send buffer of a DNS-over-TCP connection, in bytes (the kernel doubles it).
const SEND_BUFFER: usize = 64 * 1024;

/// Serves DNS over TCP on `listener` until `shutdown`, then lets connections finish the
/// query they are answering.
pub(crate) async fn serve(
    handler: DnsHandler,
    listener: TcpListener,
    max_connections: usize,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let tracker = TaskTracker::new();
    let mut acceptor = crate::accept::Acceptor::new(listener, "dns tcp");
    while let Some((stream, _)) = acceptor.next(&shutdown).await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            handler.metrics().tcp_refused();
            tracing::debug!("DNS TCP connection limit reached; closing a connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Answers are at most 64 KiB: a small send buffer bounds the kernel memory a
        // client that never reads can pin, and lets the write timeout notice it sooner.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        tracker.spawn(async move {
            connection(&handler, stream, timeout, &shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Answers the queries of one connection until it closes, errs or times out.
async fn connection(
    handler: &DnsHandler,
    mut stream: TcpStream,
    timeout: Duration,
    shutdown: &CancellationToken,
) {
    let mut query = Vec::with_capacity(512);
    loop {
        // The whole query, length included, within the timeout.
        let read = async {
            let len = stream.read_u16().await? as usize;
            query.resize(len, 0);
            stream.read_exact(&mut query).await.map(|_| ())
        };
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(timeout, read) => r,
        };
        if !matches!(read, Ok(Ok(()))) {
            return; // closed, failed, or too slow
        }
        let answer = match handler.respond_raw(&query, false) {
            RawAnswer::Reply { bytes, .. } => bytes,
            RawAnswer::Forward => handler.forward_raw(&query).await,
            RawAnswer::Drop => continue,
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        match tokio::time::timeout(timeout, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return, // a client that does not take its answers
        }
    }
}
