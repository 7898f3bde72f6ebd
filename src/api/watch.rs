//! Watching the catalog: Consul-style blocking queries (`?index=N&wait=30s`) and a
//! server-sent-event stream of change events (`GET /v1/events`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::acl::{Caller, Deny as _};
use super::error::ApiError;
use super::state::ApiState;
use crate::catalog::{Change, Snapshot};

/// Default `wait` of a blocking query (Consul's).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// How often an idle event stream sends a comment to keep proxies from closing it.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `?index=N&wait=D` of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockingQuery {
    /// The index the client has seen; `None` answers at once.
    pub(crate) index: Option<u64>,
    /// Longest time to hold the request.
    pub(crate) wait: Duration,
}

impl BlockingQuery {
    /// Reads `index` and `wait`, capping `wait` at `api.max_wait_secs`.
    pub(crate) fn parse(q: &BTreeMap<String, String>, state: &ApiState) -> Result<Self, ApiError> {
        let index = match q.get("index") {
            None => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| ApiError::invalid("index", "expected a non-negative integer"))?,
            ),
        };
        let max = Duration::from_secs(state.inner.settings.max_wait_secs);
        let wait = match q.get("wait") {
            None => DEFAULT_WAIT,
            Some(v) if v.trim() != v || v.is_empty() => {
                return Err(ApiError::invalid("wait", "expected a duration like 30s"));
            }
            // `wait=0` (in any unit) answers at once.
            Some(v) if is_zero_duration(v) => Duration::ZERO,
            Some(v) => {
                crate::protocol::parse_duration(v).map_err(|e| ApiError::invalid("wait", e))?
            }
        };
        Ok(BlockingQuery {
            index,
            wait: wait.min(max),
        })
    }
}

fn is_zero_duration(v: &str) -> bool {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    !digits.is_empty()
        && digits.bytes().all(|b| b == b'0')
        && matches!(unit, "" | "ms" | "s" | "m" | "h")
}

/// Returns the snapshot once the catalog index has passed `query.index` and `changed`
/// holds for it, or when the wait ends, or at shutdown. Without an index, at once.
pub(crate) async fn block(
    state: &ApiState,
    query: BlockingQuery,
    changed: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let catalog = &state.inner.catalog;
    let Some(seen) = query.index else {
        return catalog.snapshot();
    };
    let deadline = Instant::now() + query.wait;
    let mut rx = catalog.watch_index();
    loop {
        rx.borrow_and_update();
        let snap = catalog.snapshot();
        // An index below the client's means the catalog was reset: answer at once.
        if snap.index < seen || (snap.index > seen && changed(&snap)) {
            return snap;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return snap },
            _ = tokio::time::sleep_until(deadline) => return catalog.snapshot(),
            _ = state.inner.shutdown.cancelled() => return catalog.snapshot(),
        }
    }
}

struct Stream {
    state: ApiState,
    caller: Caller,
    service: Option<String>,
    rx: tokio::sync::broadcast::Receiver<Change>,
    hello: Option<Event>,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    fn wants(&self, c: &Change) -> bool {
        let name = c.service.as_str();
        self.service
            .as_deref()
            .is_none_or(|s| s.eq_ignore_ascii_case(name))
            && self.state.inner.acl.can_read(self.caller, name)
    }
}

fn json_event(kind: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(kind))
}

/// A change as the event stream sends it: a health change also carries the new state and
/// what the check saw (`"health": "critical", "output": "HTTP 503 from /healthz"`).
fn with_health(catalog: &crate::catalog::Catalog, change: &Change) -> serde_json::Value {
    let mut data = serde_json::to_value(change).unwrap_or_default();
    if change.kind == crate::catalog::ChangeKind::HealthChanged
        && let (Some(id), Some(o)) = (&change.instance, data.as_object_mut())
    {
        let snap = catalog.snapshot();
        if let Some(i) = snap.instance(id.as_str()) {
            o.insert("health".into(), i.health.as_str().into());
        }
        if let Some(r) = catalog.check_result(id.as_str()) {
            o.insert("output".into(), r.output.into());
        }
    }
    data
}

/// `GET /v1/events[?service=NAME]`: a server-sent-event stream. It opens with a `hello`
/// event carrying the current index, then sends one `change` event per catalog change
/// (`{"index","kind","service","instance"}`). A subscriber that falls behind gets a
/// `resync` event and should re-read `/v1/services`.
pub(crate) async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    super::extract::QueryMap(q): super::extract::QueryMap,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    let service = q.get("service").filter(|s| !s.is_empty()).cloned();
    match &service {
        Some(name) if !acl.can_read(caller, name) => {
            return Err(acl.denied(caller, &format!("watch {name}")));
        }
        None if caller == Caller::Anonymous && !acl.can_read_all(caller) => {
            return Err(acl.denied(caller, "watch the catalog"));
        }
        _ => {}
    }
    let permit = state
        .inner
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Unavailable("too many event streams".into()))?;
    // Subscribe before reading the index, so no change falls between the two.
    let rx = state.inner.catalog.subscribe();
    let index = state.inner.catalog.index();
    let hello = json_event("hello", &serde_json::json!({ "index": index }));
    let shutdown = state.inner.shutdown.clone();
    let stream = Stream {
        state,
        caller,
        service,
        rx,
        hello: Some(hello),
        _permit: permit,
    };
    let events = futures_util::stream::unfold(stream, move |mut s| {
        let shutdown = shutdown.clone();
        async move {
            if let Some(hello) = s.hello.take() {
                return Some((Ok::<Event, Infallible>(hello), s));
            }
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = s.rx.recv() => r,
                };
                match received {
                    Ok(change) if s.wants(&change) => {
                        let data = with_health(&s.state.inner.catalog, &change);
                        let event = json_event("change", &data).id(change.index.to_string());
                        return Some((Ok(event), s));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        let index = s.state.inner.catalog.index();
                        let data = serde_json::json!({ "index": index, "missed": missed });
                        return Some((Ok(json_event("resync", &data)), s));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
