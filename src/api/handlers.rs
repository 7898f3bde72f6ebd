//! The JSON endpoints: register, heartbeat, deregister, services, instances, health,
//! metrics.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::acl::{Caller, Deny as _};
use super::error::ApiError;
use super::extract::{JsonBody, PathParam, QueryMap, SECRET_HEADER, index_header};
use super::model::{
    HealthView, HeartbeatResponse, InstanceView, RegisterRequest, RegisterResponse, SecretBody,
    ServiceList, ServiceView,
};
use super::state::ApiState;
use super::watch::{BlockingQuery, block};
use crate::catalog::{Endpoint, Registration};
use crate::protocol::{AppProtocol, Response as LineResponse};

fn client_ip(headers_ext: &axum::http::Extensions) -> Option<IpAddr> {
    super::limit::client_ip(headers_ext)
}

/// `POST /v1/instances`.
pub(crate) async fn register(
    State(state): State<ApiState>,
    caller: Caller,
    ext: axum::http::Extensions,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<Response, ApiError> {
    if req.name.is_empty() {
        return Err(ApiError::invalid("name", "is required"));
    }
    let acl = &state.inner.acl;
    if !acl.can_write(caller, &req.name, false) {
        return Err(acl.denied(caller, &format!("register {}", req.name)));
    }
    let peer = client_ip(&ext);
    let endpoint = match (req.address, req.port) {
        (_, Some(0)) => return Err(ApiError::invalid("port", "must be 1..=65535")),
        (Some(ip), Some(port)) => Endpoint::Explicit(SocketAddr::new(ip, port)),
        (None, Some(port)) => match peer {
            Some(ip) => Endpoint::Explicit(SocketAddr::new(ip, port)),
            None => return Err(ApiError::invalid("address", "is required")),
        },
        // An address without a port: a port from the pool, at that address.
        (Some(ip), None) => Endpoint::Pool {
            peer: ip,
            hint: None,
        },
        (None, None) => match peer {
            Some(peer) => Endpoint::Pool { peer, hint: None },
            None => return Err(ApiError::invalid("port", "is required")),
        },
    };
    let protocol = match &req.protocol {
        None => None,
        Some(p) => Some(match p.as_str() {
            "tcp" => AppProtocol::Tcp,
            "http1" => AppProtocol::Http1,
            "http2" => AppProtocol::Http2,
            _ => {
                return Err(ApiError::invalid(
                    "protocol",
                    "expected tcp, http1 or http2",
                ));
            }
        }),
    };
    let ttl = match req.ttl_secs {
        None => None,
        Some(0) => return Err(ApiError::invalid("ttl_secs", "must be at least 1")),
        Some(s) if s > 10 * 365 * 86_400 => {
            return Err(ApiError::invalid("ttl_secs", "is too long"));
        }
        Some(s) => Some(Duration::from_secs(s)),
    };
    let check = match &req.check {
        None => None,
        Some(c) => Some(c.to_check().map_err(|e| ApiError::invalid("check", e))?),
    };
    let reg = Registration {
        name: req.name,
        endpoint,
        tags: req.tags,
        meta: req.meta,
        weight: req.weight,
        ttl,
        service_port: req.service_port,
        protocol,
        check,
        deregister_critical_after: match req.deregister_critical_after_secs {
            None => None,
            Some(0) => {
                return Err(ApiError::invalid(
                    "deregister_critical_after_secs",
                    "must be at least 1",
                ));
            }
            Some(s) => Some(Duration::from_secs(s)),
        },
        replace: req.replace.unwrap_or(true),
        initial_health: None,
    };
    let registered = state.inner.catalog.register(reg).await?;
    let status = if registered.renewed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(RegisterResponse::from(registered))).into_response())
}

/// A request without the instance secret is refused like one with a wrong secret.
fn secret_required() -> ApiError {
    ApiError::Forbidden(
        "the instance secret is required (X-Netsel-Secret header or {\"secret\": ...} body)".into(),
    )
}

/// The secret from `X-Netsel-Secret`, else from the JSON body.
fn secret_of(headers: &HeaderMap, body: SecretBody) -> Option<String> {
    headers
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(body.secret)
}

/// `PUT /v1/instances/{id}/heartbeat`.
pub(crate) async fn heartbeat(
    State(state): State<ApiState>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SecretBody>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let Some(secret) = secret_of(&headers, body) else {
        return Err(secret_required());
    };
    let catalog = &state.inner.catalog;
    let ttl = catalog.heartbeat(&id, &secret)?;
    let remaining = catalog
        .snapshot()
        .instance(&id)
        .map(|i| catalog.lease_remaining(i))
        .unwrap_or(ttl);
    Ok(Json(HeartbeatResponse {
        id,
        ttl_secs: ttl.as_secs(),
        lease_remaining_ms: remaining.as_millis() as u64,
    }))
}

/// `DELETE /v1/instances/{id}`: with the instance secret, or with an ACL token that may
/// write the service.
pub(crate) async fn deregister(
    State(state): State<ApiState>,
    caller: Caller,
    PathParam(id): PathParam,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SecretBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let catalog = &state.inner.catalog;
    match secret_of(&headers, body) {
        Some(secret) => catalog.deregister(&id, &secret).await?,
        None => {
            let snap = catalog.snapshot();
            let inst = snap
                .instance(&id)
                .ok_or_else(|| ApiError::NotFound(format!("unknown instance {id}")))?;
            let acl = &state.inner.acl;
            if !acl.enabled() {
                return Err(secret_required());
            }
            if !acl.can_write(caller, inst.service.as_str(), true) {
                return Err(acl.denied(caller, &format!("deregister from {}", inst.service)));
            }
            catalog.deregister_admin(&id).await?;
        }
    }
    Ok(Json(serde_json::json!({ "id": id, "deregistered": true })))
}

/// `GET /v1/instances/{id}`.
pub(crate) async fn instance(
    State(state): State<ApiState>,
    caller: Caller,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let catalog = &state.inner.catalog;
    let snap = catalog.snapshot();
    let inst = snap
        .instance(&id)
        .filter(|i| state.inner.acl.can_read(caller, i.service.as_str()))
        .ok_or_else(|| ApiError::NotFound(format!("unknown instance {id}")))?;
    Ok((
        index_header(snap.index),
        Json(InstanceView::new(catalog, inst)),
    )
        .into_response())
}

fn flag(q: &BTreeMap<String, String>, key: &'static str) -> Result<bool, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::invalid(key, "expected true or false")),
    }
}

/// `GET /v1/services`: every service the caller may read, with counts and health;
/// `?detail=true` adds instances; `?tag=x,y` keeps the services with instances carrying
/// every tag, and only those instances (counts and health too); `?index=N&wait=30s` blocks until the catalog changes.
pub(crate) async fn services(
    State(state): State<ApiState>,
    caller: Caller,
    QueryMap(q): QueryMap,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    if acl.enabled() && caller == Caller::Anonymous && !acl.can_read_all(caller) {
        return Err(acl.denied(caller, "list services"));
    }
    let detail = flag(&q, "detail")?;
    let tags = super::sd::list(&q, "tag");
    let query = BlockingQuery::parse(&q, &state)?;
    let snap = block(&state, query, |_| true).await;
    let catalog = &state.inner.catalog;
    let list = ServiceList {
        index: snap.index,
        services: snap
            .services()
            .filter(|s| acl.can_read(caller, s.name.as_str()))
            .map(|s| super::sd::with_tags(s, &tags))
            .filter(|s| tags.is_empty() || !s.instances.is_empty())
            .map(|s| ServiceView::new(catalog, &s, detail))
            .collect(),
    };
    Ok((index_header(snap.index), Json(list)).into_response())
}

/// `GET /v1/services/{name}`: one service with its instances (`?tag=x,y`: only those
/// carrying every tag; counts and health describe them); `?format=line` answers
/// in the line protocol's `RESOLVED` form (what the client library's watch reads).
pub(crate) async fn service(
    State(state): State<ApiState>,
    caller: Caller,
    PathParam(name): PathParam,
    QueryMap(q): QueryMap,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    if !acl.can_read(caller, &name) {
        return Err(acl.denied(caller, &format!("read {name}")));
    }
    let line = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("line") => true,
        Some(_) => return Err(ApiError::invalid("format", "expected json or line")),
    };
    let tags = super::sd::list(&q, "tag");
    let query = BlockingQuery::parse(&q, &state)?;
    // Wake for a change to this service: its modify index passing the client's, or its
    // disappearance. A client whose index is behind and who asks for an absent service
    // is answered at once (it may not know the service went away).
    let first = state.inner.catalog.snapshot();
    let existed = first.service(&name).is_some();
    let seen = query.index.unwrap_or(0);
    let behind = seen < first.index;
    let snap = block(&state, query, |snap| match snap.service(&name) {
        Some(s) => s.modify_index > seen,
        None => existed || behind,
    })
    .await;
    let catalog = &state.inner.catalog;
    let headers = index_header(snap.index);
    let Some(svc) = snap.service(&name) else {
        let message = format!("unknown service {name}");
        if line {
            let body = format!("{}\n", LineResponse::Failed(message));
            return Ok((StatusCode::NOT_FOUND, headers, body).into_response());
        }
        return Ok((headers, ApiError::NotFound(message)).into_response());
    };
    let svc = &*super::sd::with_tags(svc, &tags);
    if line {
        let r = crate::registry::resolved(catalog, svc);
        let body = format!("{r}\n");
        return Ok((
            headers,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response());
    }
    Ok((headers, Json(ServiceView::new(catalog, svc, true))).into_response())
}

fn health_view(state: &ApiState) -> (bool, HealthView) {
    let catalog = &state.inner.catalog;
    let snap = catalog.snapshot();
    let store = catalog.store_health();
    let stopping = state.inner.shutdown.is_cancelled();
    let ready = !stopping && !store.degraded;
    (
        ready,
        HealthView {
            status: if stopping {
                "shutting_down"
            } else if store.degraded {
                "degraded"
            } else {
                "ok"
            },
            store: catalog.describe_store(),
            store_error: store.detail,
            view_age_ms: store.view_age.map(|a| a.as_millis() as u64),
            node: catalog.node().map(|n| n.to_string()),
            live: true,
            ready,
            index: snap.index,
            services: snap.service_count(),
            instances: snap.instance_count(),
            dns_domain: state.inner.dns_domain.clone(),
        },
    )
}

/// `GET /v1/health`: liveness and readiness; 503 while shutting down.
pub(crate) async fn health(State(state): State<ApiState>) -> Response {
    let (ready, view) = health_view(&state);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view)).into_response()
}

/// `GET /v1/health/live`: 200 while the process answers.
pub(crate) async fn live(State(state): State<ApiState>) -> Response {
    Json(health_view(&state).1).into_response()
}

/// `GET /metrics`: Prometheus text.
pub(crate) async fn metrics(State(state): State<ApiState>, caller: Caller) -> Response {
    let acl = &state.inner.acl;
    if !acl.can_read_all(caller) {
        return acl.denied(caller, "read metrics").into_response();
    }
    let Some(metrics) = &state.inner.metrics else {
        return ApiError::NotFound("metrics are not enabled".into()).into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

/// One node of `GET /v1/nodes`.
#[derive(serde::Serialize)]
struct NodeView {
    id: String,
    /// `alive`, or for this node `degraded` while its store cannot take writes.
    state: &'static str,
    /// Whether it is the node that answered.
    #[serde(rename = "self")]
    is_self: bool,
    /// Instances whose lease it holds.
    instances: usize,
    addrs: BTreeMap<String, String>,
    started_unix_ms: u64,
    version: String,
}

/// `GET /v1/nodes`: the nodes serving this catalog (one, unless in a cluster), with their
/// addresses and how many instances each holds.
pub(crate) async fn nodes(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    if !acl.can_read_all(caller) {
        return Err(acl.denied(caller, "list nodes"));
    }
    let catalog = &state.inner.catalog;
    let snap = catalog.snapshot();
    let me = catalog.self_info().id;
    let degraded = catalog.store_health().degraded;
    let mut owned: BTreeMap<&str, usize> = BTreeMap::new();
    for i in snap.instances() {
        *owned
            .entry(i.owner.as_deref().unwrap_or("local"))
            .or_default() += 1;
    }
    let nodes: Vec<NodeView> = catalog
        .nodes()
        .into_iter()
        .map(|n| NodeView {
            state: if n.id == me && degraded {
                "degraded"
            } else {
                "alive"
            },
            is_self: n.id == me,
            instances: owned.get(n.id.as_str()).copied().unwrap_or(0),
            id: n.id,
            addrs: n.addrs,
            started_unix_ms: n.started_unix_ms,
            version: n.version,
        })
        .collect();
    let body = serde_json::json!({ "index": snap.index, "node": me, "nodes": nodes });
    Ok((index_header(snap.index), Json(body)).into_response())
}
