//! The Consul-compatible API on `consul_addr` (off by default; Consul's usual address is
//! `127.0.0.1:8500`): the subset of Consul's agent, catalog, health and status endpoints
//! that Prometheus' `consul_sd_configs`, consul-template, Traefik's Consul catalog provider
//! and the common client libraries use. `docs/consul.md` lists it and how it differs.
//!
//! It is one more front end over the catalog: reads render a snapshot in Consul's JSON
//! shapes, writes go through [`Catalog`], and it shares the HTTP API's state (ACL tokens,
//! rate limits, body limit, blocking-query cap) and server plumbing. The only thing it
//! keeps is a cache from Consul ids to instance ids, rebuilt from the snapshot whenever
//! the catalog index moves.
//!
//! Mapping: a Consul service is a NetSel service (the name must be a DNS label; it is
//! answered lower-case); a Consul service instance is a NetSel instance, its Consul
//! `ID` kept in the instance's metadata under `consul-id` (a key prefix Consul reserves,
//! so no client sends it); a `TTL` check becomes the instance's lease, and pass/warn/fail
//! renew it; an `HTTP`/`TCP` check becomes the instance's active check. A registration
//! without a TTL check has a lease that this listener renews (`consul-lease = agent`),
//! so it stays until it is deregistered, as with a Consul agent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::acl::Caller;
use super::error::ApiError;
use super::extract::{PathParam, percent_decode};
use super::state::ApiState;
use super::watch::{BlockingQuery, block};
use crate::catalog::{
    Catalog, CatalogError, Endpoint, Health, Instance, InstanceId, Registration, Snapshot,
};
use crate::protocol::Check;

/// The datacenter NetSel answers as.
pub const DATACENTER: &str = "dc1";
/// The Consul version whose API this imitates (reported by `/v1/agent/self`).
pub const CONSUL_VERSION: &str = "1.15.0";
/// Metadata key holding an instance's Consul service ID.
pub const META_ID: &str = "consul-id";
/// Metadata key holding the ID of an instance's TTL check, when the client chose one.
pub const META_CHECK: &str = "consul-check";
/// Metadata key marking an instance whose lease this listener holds (`agent`): it was
/// registered without a TTL check.
pub const META_LEASE: &str = "consul-lease";

/// What the Consul handlers share.
#[derive(Clone)]
struct Consul {
    api: ApiState,
    addr: SocketAddr,
    ids: Arc<Mutex<IdCache>>,
}

/// Consul service and check IDs to instance ids, as of one catalog index.
#[derive(Default)]
struct IdCache {
    index: Option<u64>,
    services: HashMap<String, InstanceId>,
    checks: HashMap<String, InstanceId>,
}

impl Consul {
    fn catalog(&self) -> &Catalog {
        &self.api.inner.catalog
    }

    /// The Consul-registered instance with service ID `id`, and with check ID `id` when
    /// `check`.
    fn find(&self, snap: &Snapshot, id: &str, check: bool) -> Option<Arc<Instance>> {
        let mut cache = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if cache.index != Some(snap.index) {
            let mut fresh = IdCache {
                index: Some(snap.index),
                ..IdCache::default()
            };
            for inst in snap.instances() {
                let Some(sid) = inst.meta.get(META_ID) else {
                    continue;
                };
                fresh.services.insert(sid.clone(), inst.id.clone());
                if has_check(inst) {
                    fresh
                        .checks
                        .insert(format!("service:{sid}"), inst.id.clone());
                }
                if let Some(cid) = inst.meta.get(META_CHECK) {
                    fresh.checks.insert(cid.clone(), inst.id.clone());
                }
            }
            *cache = fresh;
        }
        let map = if check {
            &cache.checks
        } else {
            &cache.services
        };
        map.get(id).and_then(|i| snap.instance(i.as_str())).cloned()
    }

    /// This node's name: its NetSel node id (`local` on a single node).
    fn local_node(&self) -> String {
        self.catalog().self_info().id.to_string()
    }
}

/// The node an instance is shown on: the cluster node holding its lease, else `local`.
fn node_of<'a>(inst: &'a Instance, local: &'a str) -> &'a str {
    inst.owner.as_deref().unwrap_or(local)
}

/// A refusal in Consul's manner: a status and a plain-text message.
#[derive(Debug)]
pub(crate) struct ConsulError(StatusCode, String);

impl ConsulError {
    fn bad(message: impl Into<String>) -> Self {
        ConsulError(StatusCode::BAD_REQUEST, message.into())
    }

    fn denied(what: &str) -> Self {
        ConsulError(
            StatusCode::FORBIDDEN,
            format!("Permission denied: the ACL token may not {what}"),
        )
    }
}

impl From<ApiError> for ConsulError {
    fn from(e: ApiError) -> Self {
        ConsulError(e.status(), e.to_string())
    }
}

impl From<CatalogError> for ConsulError {
    fn from(e: CatalogError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

/// The caller, from `X-Consul-Token`, `Authorization: Bearer` or `?token=`.
impl FromRequestParts<Consul> for Caller {
    type Rejection = ConsulError;

    async fn from_request_parts(parts: &mut Parts, state: &Consul) -> Result<Self, ConsulError> {
        let acl = &state.api.inner.acl;
        if !acl.enabled() {
            return Ok(Caller::Open);
        }
        let h = &parts.headers;
        let token = h
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.trim().to_string())
            .or_else(|| {
                h.get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(|t| t.trim().to_string())
            })
            .or_else(|| {
                Params::of(parts.uri.query())
                    .get("token")
                    .map(str::to_string)
            })
            .filter(|t| !t.is_empty());
        acl.identify(token.as_deref())
            .map_err(|_| ConsulError(StatusCode::FORBIDDEN, "ACL not found".into()))
    }
}

/// The query string, keeping repeated keys (`?tag=a&tag=b`).
struct Params(Vec<(String, String)>);

impl Params {
    fn of(query: Option<&str>) -> Self {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Params(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a `node-meta` filter is given: NetSel's nodes carry no metadata, so it
    /// matches nothing, as it would on a Consul whose nodes have none.
    fn node_meta(&self) -> bool {
        self.all("node-meta").any(|v| !v.is_empty())
    }

    /// A flag given bare (`?passing`) or with a value other than false/0.
    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| !matches!(v, "false" | "0"))
    }

    /// What every read checks: the datacenter, and no `filter` expression (not
    /// supported: refused rather than ignored, so nobody gets an unfiltered answer).
    fn check_read(&self) -> Result<(), ConsulError> {
        if let Some(dc) = self.get("dc").filter(|d| !d.is_empty())
            && dc != DATACENTER
        {
            return Err(ConsulError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("No path to datacenter {dc:?} (NetSel serves only {DATACENTER:?})"),
            ));
        }
        if self.get("filter").is_some_and(|f| !f.is_empty()) {
            return Err(ConsulError::bad(
                "the filter parameter is not supported by NetSel (docs/consul.md)",
            ));
        }
        Ok(())
    }

    /// `?index=N&wait=D` (a Go duration, at most `api.max_wait_secs`; Consul's default
    /// of 5 minutes).
    fn blocking(&self, api: &ApiState) -> Result<BlockingQuery, ConsulError> {
        let index = match self.get("index").filter(|i| !i.is_empty()) {
            None => None,
            Some(i) => Some(i.parse::<u64>().map_err(|_| {
                ConsulError::bad(format!("Invalid index {i:?}: expected an integer"))
            })?),
        };
        let wait = match self.get("wait").filter(|w| !w.is_empty()) {
            None => Duration::from_secs(300),
            Some(w) => go_duration(&Value::String(w.to_string()), "wait")?,
        };
        let max = Duration::from_secs(api.inner.settings.max_wait_secs);
        Ok(BlockingQuery {
            index,
            wait: wait.min(max),
        })
    }
}

struct Query(Params);

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = ConsulError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ConsulError> {
        Ok(Query(Params::of(parts.uri.query())))
    }
}

/// Headers of every read: the index (never 0), leader and contact.
fn read_headers(state: &Consul, index: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_static("x-consul-index"),
        HeaderValue::from(index.max(1)),
    );
    let leader = !state.catalog().store_health().degraded;
    h.insert(
        HeaderName::from_static("x-consul-knownleader"),
        HeaderValue::from_static(if leader { "true" } else { "false" }),
    );
    h.insert(
        HeaderName::from_static("x-consul-lastcontact"),
        HeaderValue::from(0u64),
    );
    h
}

fn reply(state: &Consul, index: u64, body: Value) -> Response {
    (read_headers(state, index), axum::Json(body)).into_response()
}

// ---- JSON shapes ----

fn service_id(inst: &Instance) -> String {
    inst.meta
        .get(META_ID)
        .cloned()
        .unwrap_or_else(|| inst.id.to_string())
}

fn check_id(inst: &Instance) -> String {
    match inst.meta.get(META_CHECK) {
        Some(c) => c.clone(),
        None => format!("service:{}", service_id(inst)),
    }
}

/// Metadata without NetSel's `consul-` keys.
fn visible_meta(inst: &Instance) -> Map<String, Value> {
    inst.meta
        .iter()
        .filter(|(k, _)| !k.starts_with("consul-"))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

fn status(inst: &Instance) -> &'static str {
    inst.health.as_str()
}

/// Whether an instance has a service check: an active check, or a lease its client
/// renews (a TTL check, or a NetSel-native lease). A Consul registration without checks
/// has none, as in Consul.
fn has_check(inst: &Instance) -> bool {
    inst.check.is_some() || inst.meta.get(META_LEASE).map(String::as_str) != Some("agent")
}

fn check_type(inst: &Instance) -> &'static str {
    match &inst.check {
        Some(Check::Tcp) => "tcp",
        Some(Check::Http { .. }) => "http",
        None => "ttl",
    }
}

fn service_check(catalog: &Catalog, node: &str, inst: &Instance) -> Value {
    let output = match (inst.health, &inst.check) {
        (Health::Passing, _) => String::new(),
        (Health::Critical, Some(c)) => match catalog.check_result(inst.id.as_str()) {
            Some(r) => r.output,
            None => format!("NetSel: the {} check has not passed yet", c.to_wire()),
        },
        (Health::Critical, None) => "NetSel: marked critical".to_string(),
    };
    json!({
        "Node": node,
        "CheckID": check_id(inst),
        "Name": format!("Service '{}' check", inst.service),
        "Status": status(inst),
        "Notes": "",
        "Output": output,
        "ServiceID": service_id(inst),
        "ServiceName": inst.service.as_str(),
        "ServiceTags": inst.tags,
        "Type": check_type(inst),
        "Definition": {},
        "CreateIndex": inst.registered_index.max(1),
        "ModifyIndex": inst.modify_index.max(1),
    })
}

/// The node's own check, always passing (Consul lists it with every instance).
fn node_check(node: &str) -> Value {
    json!({
        "Node": node,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Definition": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

fn agent_service(inst: &Instance) -> Value {
    json!({
        "ID": service_id(inst),
        "Service": inst.service.as_str(),
        "Tags": inst.tags,
        "Meta": visible_meta(inst),
        "Port": inst.endpoint.port(),
        "Address": inst.endpoint.ip().to_string(),
        "TaggedAddresses": {},
        "Weights": {"Passing": inst.weight, "Warning": 1},
        "EnableTagOverride": false,
        "Datacenter": DATACENTER,
        "CreateIndex": inst.registered_index.max(1),
        "ModifyIndex": inst.modify_index.max(1),
    })
}

fn node_json(node: &str, address: IpAddr) -> Value {
    let a = address.to_string();
    json!({
        "ID": "",
        "Node": node,
        "Address": a,
        "Datacenter": DATACENTER,
        "TaggedAddresses": {"lan": a, "wan": a},
        "Meta": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

fn catalog_service(node: &str, inst: &Instance) -> Value {
    let a = inst.endpoint.ip().to_string();
    json!({
        "ID": "",
        "Node": node,
        "Address": a,
        "Datacenter": DATACENTER,
        "TaggedAddresses": {"lan": a, "wan": a},
        "NodeMeta": {},
        "ServiceKind": "",
        "ServiceID": service_id(inst),
        "ServiceName": inst.service.as_str(),
        "ServiceTags": inst.tags,
        "ServiceAddress": a,
        "ServiceTaggedAddresses": {},
        "ServiceWeights": {"Passing": inst.weight, "Warning": 1},
        "ServiceMeta": visible_meta(inst),
        "ServicePort": inst.endpoint.port(),
        "ServiceEnableTagOverride": false,
        "CreateIndex": inst.registered_index.max(1),
        "ModifyIndex": inst.modify_index.max(1),
    })
}

// ---- reads ----

/// `GET /v1/agent/self`: enough of Consul's answer for clients that read the datacenter,
/// node name and version. Any known token may read it (it names no service).
async fn agent_self(State(state): State<Consul>, caller: Caller) -> Result<Response, ConsulError> {
    let acl = &state.api.inner.acl;
    if caller == Caller::Anonymous && !acl.can_read_all(caller) {
        return Err(ConsulError::denied("read the agent (agent:read)"));
    }
    let node = state.local_node();
    let body = json!({
        "Config": {
            "Datacenter": DATACENTER,
            "PrimaryDatacenter": DATACENTER,
            "NodeName": node,
            "NodeID": "",
            "Revision": concat!("netsel-", env!("CARGO_PKG_VERSION")),
            "Server": true,
            "Version": CONSUL_VERSION,
        },
        "Member": {
            "Name": node,
            "Addr": state.addr.ip().to_string(),
            "Port": state.addr.port(),
            "Tags": {"dc": DATACENTER, "role": "consul", "build": CONSUL_VERSION},
            "Status": 1,
        },
        "Meta": {},
        "Stats": {},
    });
    let index = state.catalog().index();
    Ok(reply(&state, index, body))
}

/// `GET /v1/status/leader`: this listener's address (one node answers as its own leader).
async fn status_leader(State(state): State<Consul>) -> Response {
    let index = state.catalog().index();
    reply(&state, index, json!(state.addr.to_string()))
}

/// `GET /v1/status/peers`.
async fn status_peers(State(state): State<Consul>) -> Response {
    let index = state.catalog().index();
    reply(&state, index, json!([state.addr.to_string()]))
}

/// `GET /v1/catalog/datacenters`.
async fn datacenters(State(state): State<Consul>) -> Response {
    let index = state.catalog().index();
    reply(&state, index, json!([DATACENTER]))
}

/// The `/v1/catalog/services` answer: readable service names and their tags.
fn services_map(state: &Consul, caller: Caller, snap: &Snapshot, q: &Params) -> Map<String, Value> {
    let acl = &state.api.inner.acl;
    snap.services()
        .filter(|s| !q.node_meta() && acl.can_read(caller, s.name.as_str()))
        .map(|s| {
            let tags: BTreeSet<&str> = s
                .instances
                .iter()
                .flat_map(|i| i.tags.iter().map(String::as_str))
                .collect();
            (s.name.to_string(), json!(tags))
        })
        .collect()
}

/// `GET /v1/catalog/services`: `{name: [tags]}`; blocking until that answer changes.
async fn catalog_services(
    State(state): State<Consul>,
    caller: Caller,
    Query(q): Query,
) -> Result<Response, ConsulError> {
    q.check_read()?;
    let query = q.blocking(&state.api)?;
    let first = state.catalog().snapshot();
    let before = services_map(&state, caller, &first, &q);
    let behind = query.index.is_some_and(|seen| seen < first.index);
    let snap = block(&state.api, query, |snap| {
        behind || services_map(&state, caller, snap, &q) != before
    })
    .await;
    let body = services_map(&state, caller, &snap, &q);
    Ok(reply(&state, snap.index, Value::Object(body)))
}

/// Blocks until service `name` changes (its modify index passes the client's, or it
/// appears or goes), the wait ends, or at once without an index or when the client is
/// behind and the service is absent.
async fn block_on_service(state: &Consul, query: BlockingQuery, name: &str) -> Arc<Snapshot> {
    let first = state.catalog().snapshot();
    let existed = first.service(name).is_some();
    let seen = query.index.unwrap_or(0);
    let behind = seen < first.index;
    block(&state.api, query, |snap| match snap.service(name) {
        Some(s) => s.modify_index > seen || !existed,
        None => existed || behind,
    })
    .await
}

/// The instances of `name` the caller may read that carry every `tag`, in the service's
/// order (by instance id); `passing` keeps only the healthy.
fn instances_of(
    state: &Consul,
    caller: Caller,
    snap: &Snapshot,
    name: &str,
    q: &Params,
    passing: bool,
) -> Vec<Arc<Instance>> {
    if q.node_meta() || !state.api.inner.acl.can_read(caller, name) {
        return Vec::new();
    }
    let Some(svc) = snap.service(name) else {
        return Vec::new();
    };
    let tags: Vec<&str> = q.all("tag").collect();
    svc.instances
        .iter()
        .filter(|i| !passing || i.is_healthy())
        .filter(|i| {
            tags.iter()
                .all(|t| i.tags.iter().any(|have| have.eq_ignore_ascii_case(t)))
        })
        .cloned()
        .collect()
}

/// `GET /v1/catalog/service/{name}`: its instances with node fields, `?tag=`, blocking.
async fn catalog_service_nodes(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(q): Query,
) -> Result<Response, ConsulError> {
    q.check_read()?;
    let query = q.blocking(&state.api)?;
    let snap = block_on_service(&state, query, &name).await;
    let local = state.local_node();
    let list: Vec<Value> = instances_of(&state, caller, &snap, &name, &q, false)
        .iter()
        .map(|i| catalog_service(node_of(i, &local), i))
        .collect();
    Ok(reply(&state, snap.index, Value::Array(list)))
}

/// `GET /v1/health/service/{name}`: `[{Node, Service, Checks}]`, unhealthy instances
/// included unless `?passing`; `?tag=`; blocking.
async fn health_service(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(q): Query,
) -> Result<Response, ConsulError> {
    q.check_read()?;
    let query = q.blocking(&state.api)?;
    let passing = q.flag("passing");
    let snap = block_on_service(&state, query, &name).await;
    let local = state.local_node();
    let list: Vec<Value> = instances_of(&state, caller, &snap, &name, &q, passing)
        .iter()
        .map(|i| {
            let node = node_of(i, &local);
            let mut checks = vec![node_check(node)];
            if has_check(i) {
                checks.push(service_check(state.catalog(), node, i));
            }
            json!({
                "Node": node_json(node, i.endpoint.ip()),
                "Service": agent_service(i),
                "Checks": checks,
            })
        })
        .collect();
    Ok(reply(&state, snap.index, Value::Array(list)))
}

/// `GET /v1/health/checks/{name}`: the service checks of its instances; `?tag=`-less,
/// blocking like `health/service`.
async fn health_checks(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(name): PathParam,
    Query(q): Query,
) -> Result<Response, ConsulError> {
    q.check_read()?;
    let query = q.blocking(&state.api)?;
    let snap = block_on_service(&state, query, &name).await;
    let local = state.local_node();
    let everything = Params(Vec::new());
    let list: Vec<Value> = instances_of(&state, caller, &snap, &name, &everything, false)
        .iter()
        .filter(|i| !q.node_meta() && has_check(i))
        .map(|i| service_check(state.catalog(), node_of(i, &local), i))
        .collect();
    Ok(reply(&state, snap.index, Value::Array(list)))
}

/// The checks in state `wanted` (`any`, `passing`, `warning`, `critical`) the caller may
/// read: each instance's service check, and the node's own.
fn checks_in_state(
    state: &Consul,
    caller: Caller,
    snap: &Snapshot,
    wanted: &str,
    q: &Params,
) -> Vec<Value> {
    let acl = &state.api.inner.acl;
    let local = state.local_node();
    let mut out = Vec::new();
    if q.node_meta() {
        return out;
    }
    if matches!(wanted, "any" | "passing") {
        out.push(node_check(&local));
    }
    for svc in snap.services() {
        if !acl.can_read(caller, svc.name.as_str()) {
            continue;
        }
        for i in svc.instances.iter() {
            if has_check(i) && (wanted == "any" || wanted == status(i)) {
                out.push(service_check(state.catalog(), node_of(i, &local), i));
            }
        }
    }
    out
}

/// `GET /v1/health/state/{state}`: checks in that state; blocking until the list changes.
async fn health_state(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(wanted): PathParam,
    Query(q): Query,
) -> Result<Response, ConsulError> {
    q.check_read()?;
    if !matches!(wanted.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(ConsulError::bad(format!(
            "Invalid state {wanted:?}: expected any, passing, warning or critical"
        )));
    }
    let query = q.blocking(&state.api)?;
    // What the answer depends on, cheap to compare on every catalog change: the
    // instances listed and their modify indexes.
    let acl = &state.api.inner.acl;
    let fingerprint = |snap: &Snapshot| -> Vec<(InstanceId, u64)> {
        snap.services()
            .filter(|s| acl.can_read(caller, s.name.as_str()))
            .flat_map(|s| s.instances.iter())
            .filter(|i| has_check(i) && (wanted == "any" || wanted == status(i)))
            .map(|i| (i.id.clone(), i.modify_index))
            .collect()
    };
    let first = state.catalog().snapshot();
    let before = fingerprint(&first);
    let behind = query.index.is_some_and(|seen| seen < first.index);
    let snap = block(&state.api, query, |snap| {
        behind || fingerprint(snap) != before
    })
    .await;
    let list = checks_in_state(&state, caller, &snap, &wanted, &q);
    Ok(reply(&state, snap.index, Value::Array(list)))
}

/// `GET /v1/agent/services`: `{ServiceID: service}` of every instance the caller may read.
async fn agent_services(State(state): State<Consul>, caller: Caller) -> Response {
    let acl = &state.api.inner.acl;
    let snap = state.catalog().snapshot();
    let mut map = Map::new();
    for svc in snap.services() {
        if acl.can_read(caller, svc.name.as_str()) {
            for i in svc.instances.iter() {
                map.insert(service_id(i), agent_service(i));
            }
        }
    }
    reply(&state, snap.index, Value::Object(map))
}

/// `GET /v1/agent/checks`: `{CheckID: check}` of every instance the caller may read.
async fn agent_checks(State(state): State<Consul>, caller: Caller) -> Response {
    let snap = state.catalog().snapshot();
    let mut map = Map::new();
    for c in checks_in_state(&state, caller, &snap, "any", &Params(Vec::new())) {
        if c["ServiceID"] != "" {
            map.insert(c["CheckID"].as_str().unwrap_or("").to_string(), c);
        }
    }
    reply(&state, snap.index, Value::Object(map))
}

// ---- writes ----

/// A key's value in a JSON object, matching Consul's decoding: case-insensitively, and
/// `snake_case` like `CamelCase` (`tagged_addresses` = `TaggedAddresses`).
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| {
            k.chars()
                .filter(|c| *c != '_')
                .map(|c| c.to_ascii_lowercase())
                .eq(name.chars())
        })
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn string_field(
    obj: &Map<String, Value>,
    name: &str,
    shown: &str,
) -> Result<Option<String>, ConsulError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ConsulError::bad(format!(
            "Invalid {shown}: expected a string"
        ))),
    }
}

/// A Go duration (`10s`, `1m30s`, `1.5s`, `500ms`), or a bare number of nanoseconds as
/// Consul's JSON also accepts.
fn go_duration(v: &Value, shown: &str) -> Result<Duration, ConsulError> {
    let bad = || ConsulError::bad(format!("Invalid {shown}: expected a duration like 10s"));
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => {
            return n.as_u64().map(Duration::from_nanos).ok_or_else(bad);
        }
        _ => return Err(bad()),
    };
    let mut rest = text.as_str();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// One check of a registration, as NetSel takes it.
struct CheckDef {
    id: Option<String>,
    ttl: Option<Duration>,
    active: Option<Check>,
    status: Option<Health>,
    /// `DeregisterCriticalServiceAfter`: honoured for HTTP and TCP checks.
    deregister_critical_after: Option<Duration>,
}

fn parse_check(obj: &Map<String, Value>) -> Result<CheckDef, ConsulError> {
    for unsupported in [
        "args",
        "scriptargs",
        "script",
        "grpc",
        "dockercontainerid",
        "h2ping",
        "aliasservice",
        "aliasnode",
        "udp",
        "osservice",
    ] {
        if field(obj, unsupported).is_some() {
            return Err(ConsulError::bad(format!(
                "Invalid check: {unsupported} checks are not supported by NetSel (ttl, http \
                 and tcp are; docs/consul.md)"
            )));
        }
    }
    let id = match string_field(obj, "checkid", "CheckID")? {
        Some(id) => Some(id),
        None => string_field(obj, "id", "Check.ID")?,
    }
    .filter(|s| !s.is_empty());
    if let Some(id) = &id
        && (id.len() > crate::protocol::MAX_VALUE_LEN
            || id.chars().any(|c| c.is_control() || c == '/'))
    {
        return Err(ConsulError::bad(
            "Invalid CheckID: too long, or a '/' or control character",
        ));
    }
    let ttl = field(obj, "ttl")
        .map(|v| go_duration(v, "TTL"))
        .transpose()?;
    let http = string_field(obj, "http", "HTTP")?.filter(|s| !s.is_empty());
    let tcp = string_field(obj, "tcp", "TCP")?.filter(|s| !s.is_empty());
    if let Some(m) = string_field(obj, "method", "Method")?
        && !m.is_empty()
        && !m.eq_ignore_ascii_case("GET")
    {
        return Err(ConsulError::bad(
            "Invalid check: NetSel's http checks only GET",
        ));
    }
    let active = match (http, tcp) {
        (Some(_), Some(_)) => {
            return Err(ConsulError::bad("Invalid check: both HTTP and TCP given"));
        }
        (Some(url), None) => {
            // The check always goes to the instance's own endpoint: only the path counts.
            let rest = if let Some(r) = url.strip_prefix("http://") {
                r
            } else if url.starts_with("https://") {
                return Err(ConsulError::bad(
                    "Invalid check: https checks are not supported by NetSel",
                ));
            } else {
                return Err(ConsulError::bad(format!(
                    "Invalid check: HTTP {url:?} is not an http:// URL"
                )));
            };
            let path = rest.find('/').map_or("/", |i| &rest[i..]);
            Some(Check::Http {
                path: path.to_string(),
            })
        }
        (None, Some(_)) => Some(Check::Tcp),
        (None, None) => None,
    };
    if ttl.is_some() && active.is_some() {
        return Err(ConsulError::bad(
            "Invalid check: a check has one of TTL, HTTP or TCP",
        ));
    }
    if ttl.is_none() && active.is_none() {
        return Err(ConsulError::bad(
            "Invalid check: one of TTL, HTTP or TCP is required",
        ));
    }
    let status = match string_field(obj, "status", "Status")?.as_deref() {
        None | Some("") => None,
        Some("passing") | Some("warning") => Some(Health::Passing),
        Some("critical") => Some(Health::Critical),
        Some(other) => {
            return Err(ConsulError::bad(format!("Invalid check status {other:?}")));
        }
    };
    let deregister_critical_after = field(obj, "deregistercriticalserviceafter")
        .map(|v| go_duration(v, "DeregisterCriticalServiceAfter"))
        .transpose()?
        .filter(|d| !d.is_zero());
    Ok(CheckDef {
        id,
        ttl,
        active,
        status,
        deregister_critical_after,
    })
}

fn peer_ip(ext: &axum::http::Extensions) -> Option<IpAddr> {
    super::limit::client_ip(ext)
}

/// `PUT /v1/agent/service/register`: registers (or updates, by `ID`) a service instance.
async fn register(
    State(state): State<Consul>,
    caller: Caller,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ConsulError::bad(format!("Request decode failed: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ConsulError::bad(
            "Request decode failed: expected a JSON object",
        ));
    };
    let name = string_field(&obj, "name", "Name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad("Missing service name"))?;
    let acl = &state.api.inner.acl;
    if !acl.can_write(caller, &name, false) {
        return Err(ConsulError::denied(&format!(
            "register {name} (service:write)"
        )));
    }
    if let Some(kind) = string_field(&obj, "kind", "Kind")?
        && !kind.is_empty()
    {
        return Err(ConsulError::bad(format!(
            "Invalid service kind {kind:?}: NetSel registers typical services only"
        )));
    }
    let sid = string_field(&obj, "id", "ID")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    if sid.len() > crate::protocol::MAX_VALUE_LEN || sid.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(ConsulError::bad(format!(
            "Invalid service ID: at most {} bytes, no '/' or control characters",
            crate::protocol::MAX_VALUE_LEN
        )));
    }
    let tags = match field(&obj, "tags") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ConsulError::bad("Invalid Tags: expected strings"))?,
        Some(_) => return Err(ConsulError::bad("Invalid Tags: expected a list")),
    };
    let mut meta = BTreeMap::new();
    match field(&obj, "meta") {
        None => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if k.starts_with("consul-") {
                    return Err(ConsulError::bad(format!(
                        "Invalid Meta: key {k:?} has the reserved prefix consul-"
                    )));
                }
                let v = v
                    .as_str()
                    .ok_or_else(|| ConsulError::bad("Invalid Meta: expected string values"))?;
                meta.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => return Err(ConsulError::bad("Invalid Meta: expected an object")),
    }
    let address = match string_field(&obj, "address", "Address")?.filter(|a| !a.is_empty()) {
        Some(a) => a.parse::<IpAddr>().map_err(|_| {
            ConsulError::bad(format!(
                "Invalid Address {a:?}: NetSel needs an IP address, not a host name"
            ))
        })?,
        None => peer_ip(&ext)
            .ok_or_else(|| ConsulError::bad("Missing Address (no client address to use)"))?,
    };
    let port = match field(&obj, "port") {
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| ConsulError::bad("Invalid Port: expected 1..65535"))?,
        None => {
            return Err(ConsulError::bad(
                "Missing Port: NetSel registers an address and a port",
            ));
        }
    };
    let weight = match field(&obj, "weights") {
        Some(Value::Object(w)) => match field(w, "passing") {
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| ConsulError::bad("Invalid Weights.Passing"))?,
            ),
            None => None,
        },
        Some(_) => return Err(ConsulError::bad("Invalid Weights: expected an object")),
        None => None,
    };
    let mut checks = Vec::new();
    if let Some(c) = field(&obj, "check") {
        let c = c
            .as_object()
            .ok_or_else(|| ConsulError::bad("Invalid Check: expected an object"))?;
        checks.push(parse_check(c)?);
    }
    match field(&obj, "checks") {
        None => {}
        Some(Value::Array(list)) => {
            for c in list {
                let c = c
                    .as_object()
                    .ok_or_else(|| ConsulError::bad("Invalid Checks: expected objects"))?;
                checks.push(parse_check(c)?);
            }
        }
        Some(_) => return Err(ConsulError::bad("Invalid Checks: expected a list")),
    }
    let numbered = checks.len() > 1;
    let mut ttl = None;
    let mut ttl_check_id = None;
    let mut active = None;
    let mut deregister_critical_after = None;
    let mut initial = None;
    for (n, c) in checks.iter().enumerate() {
        let default_id = if numbered {
            format!("service:{sid}:{}", n + 1)
        } else {
            format!("service:{sid}")
        };
        if let Some(t) = c.ttl {
            if ttl.is_some() {
                return Err(ConsulError::bad(
                    "Invalid Checks: NetSel takes at most one TTL check per service",
                ));
            }
            ttl = Some(t);
            ttl_check_id = Some(c.id.clone().unwrap_or(default_id));
        } else if let Some(a) = &c.active {
            if active.is_some() {
                return Err(ConsulError::bad(
                    "Invalid Checks: NetSel takes at most one HTTP or TCP check per service",
                ));
            }
            active = Some(a.clone());
            deregister_critical_after = c.deregister_critical_after;
        }
        // Consul starts a check critical unless it names a status.
        let s = c.status.unwrap_or(Health::Critical);
        if initial.is_none() || s == Health::Critical {
            initial = Some(s);
        }
    }
    meta.insert(META_ID.to_string(), sid.clone());
    match &ttl_check_id {
        Some(id) if *id != format!("service:{sid}") => {
            meta.insert(META_CHECK.to_string(), id.clone());
        }
        _ => {}
    }
    if ttl.is_none() {
        meta.insert(META_LEASE.to_string(), "agent".to_string());
    }
    let catalog = state.catalog();
    let snap = catalog.snapshot();
    let endpoint = SocketAddr::new(address, port);
    let previous = state.find(&snap, &sid, false);
    let same_place = previous
        .as_ref()
        .is_some_and(|p| p.endpoint == endpoint && p.service.as_str().eq_ignore_ascii_case(&name));
    if let Some(p) = &previous
        && !same_place
        && !acl.can_write(caller, p.service.as_str(), false)
    {
        return Err(ConsulError::denied(&format!(
            "replace {sid} of {} (service:write)",
            p.service
        )));
    }
    let reg = Registration {
        name,
        endpoint: Endpoint::Explicit(endpoint),
        tags,
        meta,
        weight,
        ttl,
        service_port: None,
        protocol: None,
        check: active,
        deregister_critical_after,
        replace: same_place,
        initial_health: initial,
    };
    let registered = catalog.register(reg).await?;
    if checks.is_empty() {
        // No check left to fail: an update that drops its checks is passing (a no-op
        // unless it was critical).
        catalog
            .set_health(registered.id.as_str(), Health::Passing)
            .await?;
    }
    if let Some(p) = previous
        && p.id != registered.id
    {
        match catalog.deregister_admin(p.id.as_str()).await {
            Ok(()) | Err(CatalogError::UnknownInstance(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(StatusCode::OK.into_response())
}

/// The Consul-registered instance `id` names (a service ID, or a check ID when `check`),
/// if the caller may write its service.
fn writable(
    state: &Consul,
    caller: Caller,
    id: &str,
    check: bool,
) -> Result<Arc<Instance>, ConsulError> {
    let snap = state.catalog().snapshot();
    let acl = &state.api.inner.acl;
    let inst = state
        .find(&snap, id, check)
        .filter(|i| acl.can_read(caller, i.service.as_str()))
        .ok_or_else(|| {
            let what = if check { "check" } else { "service" };
            ConsulError(
                StatusCode::NOT_FOUND,
                format!("Unknown {what} ID {id:?}. Ensure that the {what} ID is passed, not the {what} name."),
            )
        })?;
    if !acl.can_write(caller, inst.service.as_str(), false) {
        return Err(ConsulError::denied(&format!(
            "change {} (service:write)",
            inst.service
        )));
    }
    Ok(inst)
}

/// `PUT /v1/agent/service/deregister/{id}` (GET too, as old clients send it).
async fn deregister(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(id): PathParam,
) -> Result<Response, ConsulError> {
    let inst = writable(&state, caller, &id, false)?;
    match state.catalog().deregister_admin(inst.id.as_str()).await {
        Ok(()) | Err(CatalogError::UnknownInstance(_)) => Ok(StatusCode::OK.into_response()),
        Err(e) => Err(e.into()),
    }
}

/// Renews `inst`'s lease and records its health: what a TTL check update does.
async fn update_check(
    state: &Consul,
    inst: &Instance,
    health: Health,
) -> Result<Response, ConsulError> {
    let catalog = state.catalog();
    catalog.heartbeat(inst.id.as_str(), inst.secret.expose())?;
    catalog.set_health(inst.id.as_str(), health).await?;
    Ok(StatusCode::OK.into_response())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/{id}` (GET too): renews the lease with the
/// check's new state, `health` (pass and warn: passing, as NetSel has no warning state and
/// Consul's DNS keeps warning instances in service; fail: critical).
async fn check_mark(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(id): PathParam,
    health: Health,
) -> Result<Response, ConsulError> {
    let inst = writable(&state, caller, &id, true)?;
    update_check(&state, &inst, health).await
}

/// `PUT /v1/agent/check/update/{id}` with `{"Status": "passing|warning|critical"}`.
async fn check_update(
    State(state): State<Consul>,
    caller: Caller,
    PathParam(id): PathParam,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let inst = writable(&state, caller, &id, true)?;
    let value: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ConsulError::bad(format!("Request decode failed: {e}")))?
    };
    let obj = value
        .as_object()
        .ok_or_else(|| ConsulError::bad("Request decode failed: expected a JSON object"))?;
    let health = match string_field(obj, "status", "Status")?.as_deref() {
        Some("passing") | Some("warning") => Health::Passing,
        Some("critical") => Health::Critical,
        other => {
            return Err(ConsulError::bad(format!(
                "Invalid Status {:?}: expected passing, warning or critical",
                other.unwrap_or("")
            )));
        }
    };
    update_check(&state, &inst, health).await
}

async fn not_found() -> ConsulError {
    ConsulError(
        StatusCode::NOT_FOUND,
        "NetSel's Consul-compatible API does not serve this path (docs/consul.md)".into(),
    )
}

async fn method_not_allowed() -> ConsulError {
    ConsulError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
}

/// The Consul-compatible router over the API's state; `addr` is the listener's address
/// (reported as the leader; loopback stands in for an unspecified address).
pub fn router(api: ApiState, mut addr: SocketAddr) -> Router {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    let body_limit = api.inner.settings.max_body_bytes;
    let state = Consul {
        api: api.clone(),
        addr,
        ids: Arc::new(Mutex::new(IdCache::default())),
    };
    let write = MethodFilter::PUT.or(MethodFilter::GET);
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service_nodes))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/state/{state}", get(health_state))
        .route("/v1/health/checks/{name}", get(health_checks))
        .route(
            "/v1/agent/service/register",
            axum::routing::put(register).post(register),
        )
        .route("/v1/agent/service/deregister/{id}", on(write, deregister))
        .route(
            "/v1/agent/check/pass/{id}",
            on(write, |s, c, id| check_mark(s, c, id, Health::Passing)),
        )
        .route(
            "/v1/agent/check/warn/{id}",
            on(write, |s, c, id| check_mark(s, c, id, Health::Passing)),
        )
        .route(
            "/v1/agent/check/fail/{id}",
            on(write, |s, c, id| check_mark(s, c, id, Health::Critical)),
        )
        .route(
            "/v1/agent/check/update/{id}",
            axum::routing::put(check_update),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            api,
            super::limit::rate_limit,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves the Consul-compatible API on `listener` (bound at `addr`) until `shutdown`,
/// with the HTTP API's bounds.
pub async fn serve(
    listener: TcpListener,
    api: ApiState,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let settings = api.inner.settings.clone();
    super::listener::serve_app(listener, router(api, addr), &settings, "consul", shutdown).await;
}

/// Renews the leases of instances registered through the Consul API without a TTL check
/// (`consul-lease = agent`), as a Consul agent keeps such a service until it is
/// deregistered. Runs until `shutdown`, renewing every third of the shortest such TTL
/// (instances restored from the store keep the TTL they were registered with).
pub async fn hold_leases(catalog: Catalog, shutdown: CancellationToken) {
    let (floor, ceiling) = (Duration::from_millis(50), Duration::from_secs(10));
    loop {
        let snap = catalog.snapshot();
        let mut every = catalog.settings().default_ttl / 3;
        for inst in snap.instances() {
            if inst.meta.get(META_LEASE).map(String::as_str) != Some("agent") || !catalog.owns(inst)
            {
                continue;
            }
            every = every.min(inst.ttl / 3);
            if let Err(e) = catalog.heartbeat(inst.id.as_str(), inst.secret.expose()) {
                tracing::debug!(error = %e, instance = %inst.id, "renewing a Consul lease");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every.clamp(floor, ceiling)) => {}
        }
    }
}
