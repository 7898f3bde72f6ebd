//! The server loop of the API's listener and of the Consul-compatible one: a connection
//! cap, header and write timeouts (`stall.rs`), HTTP/1.1 and HTTP/2, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::settings::ApiSettings;

/// Serves `app` on `listener` with the API's bounds (`settings`: connection limit, header
/// and write timeouts, graceful shutdown): the API's own listener and the
/// Consul-compatible one.
pub(crate) async fn serve_app(
    listener: TcpListener,
    app: Router,
    settings: &ApiSettings,
    what: &'static str,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let header_timeout = Duration::from_millis(settings.header_read_timeout_ms);
    let write_timeout = Duration::from_millis(settings.write_timeout_ms);
    let graceful = GracefulShutdown::new();
    let mut builder = AutoBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let mut acceptor = crate::accept::Acceptor::new(listener, what);
    loop {
        // A free slot first: beyond the cap, clients wait in the listen backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Some((stream, peer)) = acceptor.next(&shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        // Silent clients and clients that never read must not keep their slot.
        let io = crate::stall::StallGuard::new(stream, write_timeout)
            .with_preface_deadline(header_timeout);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                tower_service::Service::call(&mut app, req.map(axum::body::Body::new))
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, listener = what, "connection ended");
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("http", listener = what, %peer)),
        );
    }
    drop(acceptor);
    graceful.shutdown().await;
}
