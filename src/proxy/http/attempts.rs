//! The rules every way the HTTP proxy sends a request upstream follows (the raw HTTP/1.1
//! fast path, the h2 bridge, the hyper client and upgrades), kept in one place: which
//! instance to try next, what a failed connect or exchange means for the instance
//! (passive ejection) and for the request (another connection or instance, within the
//! retry budget), and what the client is told when no attempt answered.
//!
//! The callers keep what differs between them: how a connection is made or taken from
//! the pool, deadlines, and whether a request can be sent again.

use std::sync::Arc;

use hyper::{Response, StatusCode};

use super::metrics::ServiceMetrics;
use super::pool::{ConnectError, ResponseBody};
use super::{HttpProxy, local};
use crate::catalog::{InstanceId, Service};
use crate::protocol::AppProtocol;
use crate::proxy::balance::{Pick, Subset};

/// Fresh connections a request may try after pooled ones turned out closed.
const MAX_STALE: u32 = 4;

/// How the last attempt went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Other,
}

/// One request's attempts at a service's instances.
pub(super) struct Attempts<'a> {
    proxy: &'a HttpProxy,
    svc: &'a Arc<Service>,
    label: &'a ServiceMetrics,
    /// The instances the request may go to (a tag's, or all).
    subset: Subset<'a>,
    /// Instances this request does not go to again.
    exclude: Vec<InstanceId>,
    retries_left: u32,
    stale: u32,
    /// How the last attempt failed; None while no instance was there to try.
    last: Option<Failure>,
}

impl<'a> Attempts<'a> {
    pub(super) fn new(
        proxy: &'a HttpProxy,
        svc: &'a Arc<Service>,
        label: &'a ServiceMetrics,
        tag: Option<&'a str>,
    ) -> Attempts<'a> {
        Attempts {
            proxy,
            svc,
            label,
            subset: tag.map_or(Subset::All, Subset::Tagged),
            exclude: Vec::new(),
            retries_left: proxy.settings.max_retries,
            stale: 0,
            last: None,
        }
    }

    /// The next instance to try; None when none is left. With `h1_only`, instances
    /// registered as h2c are passed over (for paths that speak HTTP/1.1 upstream).
    pub(super) fn next(&mut self, h1_only: bool) -> Option<Pick> {
        loop {
            let pick = self
                .proxy
                .balancer
                .pick_in(self.svc, &self.exclude, self.subset)?;
            if h1_only && pick.instance.protocol == AppProtocol::Http2 {
                self.exclude.push(pick.instance.id.clone());
                continue;
            }
            return Some(pick);
        }
    }

    /// Whether the next attempt should open a fresh connection rather than take a
    /// pooled one: a pooled connection has just turned out closed.
    pub(super) fn fresh_only(&self) -> bool {
        self.stale > 0
    }

    /// Connecting to `pick` failed. Nothing was sent, so any request may go to another
    /// instance; this one is ejected for its backoff.
    pub(super) fn connect_failed(&mut self, pick: &Pick, e: &ConnectError) {
        self.last = Some(match e {
            ConnectError::Timeout => Failure::Timeout,
            _ => Failure::Other,
        });
        let ej = self.proxy.balancer.report_failure(pick);
        tracing::info!(
            service = %pick.instance.service, instance = %pick.instance.id,
            endpoint = %pick.instance.endpoint, error = %e, backoff_ms = ej.backoff.as_millis() as u64,
            "instance refused a proxied connection; ejected"
        );
        self.exclude.push(pick.instance.id.clone());
        self.label.retry();
    }

    /// The request's deadline passed: the client gets a 504.
    pub(super) fn timed_out(&mut self) {
        self.last = Some(Failure::Timeout);
    }

    /// A pooled connection turned out closed before the instance answered (it closed
    /// an idle connection as the request went out). Whether the request may go out
    /// again on another connection, which it may a few times.
    pub(super) fn stale(&mut self) -> bool {
        if self.stale < MAX_STALE {
            self.stale += 1;
            true
        } else {
            false
        }
    }

    /// An exchange with `pick` failed. On a fresh connection that counts against the
    /// instance (a pooled one may only have been closed by it meanwhile). Whether the
    /// request may go to another instance: when it is `retryable` (it can be sent again
    /// and repeating it is safe) and the retry budget allows.
    pub(super) fn failed(&mut self, pick: &Pick, reused: bool, retryable: bool) -> bool {
        if !reused {
            self.proxy.balancer.report_failure(pick);
        }
        self.last = Some(Failure::Other);
        if retryable && self.retries_left > 0 && self.proxy.budget.withdraw() {
            self.retries_left -= 1;
            self.exclude.push(pick.instance.id.clone());
            self.label.retry();
            return true;
        }
        false
    }

    /// The status and body for the client when no attempt answered: 503 when there
    /// was no instance to try, 504 after a timeout, else 502.
    pub(super) fn answer(&self) -> (StatusCode, String) {
        let name = &self.svc.name;
        match self.last {
            Some(Failure::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("no instance of '{name}' answered in time\n"),
            ),
            Some(Failure::Other) => (
                StatusCode::BAD_GATEWAY,
                format!("no instance of '{name}' could take the request\n"),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                match self.subset {
                    Subset::All => format!("service '{name}' has no healthy instance\n"),
                    Subset::Tagged(tag) => {
                        format!("service '{name}' has no healthy instance tagged '{tag}'\n")
                    }
                },
            ),
        }
    }

    /// [`answer`](Self::answer) as a response.
    pub(super) fn give_up(&self) -> Response<ResponseBody> {
        let (status, body) = self.answer();
        local(status, body)
    }
}
