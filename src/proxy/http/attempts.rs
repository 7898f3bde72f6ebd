//! The one attempt policy: the rules every way the HTTP proxy sends a request upstream
//! follows, kept in one place. Which instance to try next, and whether a raw attempt
//! may take a pooled connection ([`Attempts::pooled_raw`]); what a failed connect or
//! exchange means for the instance (passive ejection, [`Attempts::connect_failed`],
//! [`Attempts::failed`]) and for the request (a fresh connection after a stale pooled
//! one, another instance within `max_retries` and the [`RetryBudget`]); a success
//! ([`Attempts::succeeded`]); and what the client is told when no attempt answered
//! (503, 504 or 502: [`Attempts::answer`], [`timed_out_answer`]) or its own body failed
//! ([`bad_body_answer`]).
//!
//! There are four attempt loops, one per way of talking to an instance: raw pooled
//! sockets with the client's body pumped alongside (`h1_direct.rs`), raw pooled sockets
//! with the body read by hyper (`h2_bodiless.rs`), hyper's HTTP/1.1 and h2c client
//! (`general.rs`, `forward`) and a fresh connection that may switch protocols
//! (`general.rs`, `upgrade`). They stay separate loops on purpose: one generic loop
//! would put a trait object or a boxed future, and the hyper types, on the direct
//! path's every request. What they share is every decision, which is made here; the
//! loops keep only how a connection is had, deadlines, and whether their request can
//! be sent again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use hyper::StatusCode;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::metrics::ServiceMetrics;
use super::pool::{ConnectError, Pool};
use crate::catalog::{InstanceId, Service};
use crate::protocol::AppProtocol;
use crate::proxy::balance::{Balancer, Pick, Subset};

/// A token bucket of retries, refilled by a share of each request.
pub(super) struct RetryBudget {
    tokens: AtomicI64,
    deposit: i64,
    cap: i64,
}

const RETRY_COST: i64 = 100;

impl RetryBudget {
    pub(super) fn new(percent: u32, burst: u32) -> Self {
        let cap = RETRY_COST * i64::from(burst);
        RetryBudget {
            tokens: AtomicI64::new(cap),
            deposit: i64::from(percent),
            cap,
        }
    }

    /// A request arrived: its share of a retry.
    pub(super) fn deposit(&self) {
        if self.deposit > 0 && self.tokens.load(Ordering::Relaxed) < self.cap {
            self.tokens.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t >= RETRY_COST).then_some(t - RETRY_COST)
            })
            .is_ok()
    }
}

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
    balancer: &'a Balancer,
    budget: &'a RetryBudget,
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
    /// Made by `Shared::attempts` (`context.rs`), which passes the proxy's balancer,
    /// budget and `max_retries`.
    pub(super) fn new(
        balancer: &'a Balancer,
        budget: &'a RetryBudget,
        max_retries: u32,
        svc: &'a Arc<Service>,
        label: &'a ServiceMetrics,
        tag: Option<&'a str>,
    ) -> Attempts<'a> {
        Attempts {
            balancer,
            budget,
            svc,
            label,
            subset: tag.map_or(Subset::All, Subset::Tagged),
            exclude: Vec::new(),
            retries_left: max_retries,
            stale: 0,
            last: None,
        }
    }

    /// The next instance to try; None when none is left. With `h1_only`, instances
    /// registered as h2c are passed over (for paths that speak HTTP/1.1 upstream).
    pub(super) fn next(&mut self, h1_only: bool) -> Option<Pick> {
        loop {
            let pick = self
                .balancer
                .pick_in(self.svc, &self.exclude, self.subset)?;
            if h1_only && pick.instance.protocol == AppProtocol::Http2 {
                self.exclude.push(pick.instance.id.clone());
                continue;
            }
            return Some(pick);
        }
    }

    /// An idle raw connection to `addr` from `pool` for the next attempt, unless it
    /// should open a fresh one: once a pooled connection has turned out closed, the
    /// request's further attempts connect afresh. `now` is the caller's clock reading.
    pub(super) fn pooled_raw(
        &self,
        pool: &Pool,
        addr: SocketAddr,
        now: Instant,
    ) -> Option<TcpStream> {
        if self.stale > 0 {
            None
        } else {
            pool.take_raw(addr, now)
        }
    }

    /// Connecting to `pick` failed. Nothing was sent, so any request may go to another
    /// instance; this one is ejected for its backoff.
    pub(super) fn connect_failed(&mut self, pick: &Pick, e: &ConnectError) {
        self.last = Some(match e {
            ConnectError::Timeout => Failure::Timeout,
            _ => Failure::Other,
        });
        let ej = self.balancer.report_failure(pick);
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

    /// `pick` answered: whatever happens to the response from here, the instance works.
    pub(super) fn succeeded(&self, pick: &Pick) {
        self.balancer.report_success(pick);
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
            self.balancer.report_failure(pick);
        }
        self.last = Some(Failure::Other);
        if retryable && self.retries_left > 0 && self.budget.withdraw() {
            self.retries_left -= 1;
            self.exclude.push(pick.instance.id.clone());
            self.label.retry();
            return true;
        }
        false
    }

    /// An exchange on a raw connection failed before any response reached the client
    /// (`no_response`: not a byte of one came back). Whether the request goes out again:
    /// on a fresh connection when the pooled one it went out on had been closed by the
    /// instance ([`stale`](Self::stale)), else to another instance as
    /// [`failed`](Self::failed) decides.
    pub(super) fn again(
        &mut self,
        pick: &Pick,
        reused: bool,
        no_response: bool,
        retryable: bool,
    ) -> bool {
        (reused && no_response && self.stale()) || self.failed(pick, reused, retryable)
    }

    /// The status and body for the client when no attempt answered: 503 when there
    /// was no instance to try, 504 after a timeout, else 502.
    pub(super) fn answer(&self) -> (StatusCode, String) {
        let name = &self.svc.name;
        match self.last {
            Some(Failure::Timeout) => timed_out_answer(self.svc),
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
}

/// The answer when the request timeout passed before any instance answered.
pub(super) fn timed_out_answer(svc: &Service) -> (StatusCode, String) {
    (
        StatusCode::GATEWAY_TIMEOUT,
        format!("no instance of '{}' answered in time\n", svc.name),
    )
}

/// The proxy's own answer to a request whose body turned out malformed after its head
/// had been forwarded: the client's fault, so nothing counts against the instance.
pub(super) fn bad_body_answer() -> (StatusCode, String) {
    (
        StatusCode::BAD_REQUEST,
        "bad request: malformed or incomplete request body\n".to_string(),
    )
}
