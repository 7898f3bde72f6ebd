//! The JSON shapes of the API (documented in `docs/openapi.yaml`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Instance, Registered, Service};
use crate::protocol::Check;

/// An optional non-negative integer; integral floats (`8080.0`) count, as JSON Schema has
/// it.
fn integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    let whole =
        whole.ok_or_else(|| D::Error::custom(format!("{n} is not a non-negative integer")))?;
    T::try_from(whole)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{whole} is out of range")))
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Service name (one DNS label).
    pub name: String,
    /// Where the instance listens. Default: the address the request came from.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// Its port. Without one, a port is assigned from the port pool.
    #[serde(default, deserialize_with = "integer")]
    pub port: Option<u16>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Balancing weight, 1..=10000 (default 1).
    #[serde(default, deserialize_with = "integer")]
    pub weight: Option<u32>,
    /// Lease TTL in seconds (default `max_heartbeat_age`).
    #[serde(default, deserialize_with = "integer")]
    pub ttl_secs: Option<u64>,
    /// The service's port on its VIP (default: the first instance's port).
    #[serde(default, deserialize_with = "integer")]
    pub service_port: Option<u16>,
    /// `tcp`, `http1` or `http2` (default `tcp`).
    #[serde(default)]
    pub protocol: Option<String>,
    /// An active health check (default none: the lease alone decides).
    #[serde(default)]
    pub check: Option<CheckSpec>,
    /// Whether an instance already registered at this address is taken over (default
    /// true). `false` registers a new instance beside it: what a client sends when it
    /// registers again after its instance was removed or superseded.
    #[serde(default)]
    pub replace: Option<bool>,
    /// Seconds the instance may stay critical before it is deregistered (default: the
    /// `[health] deregister_critical_after_secs` setting; off unless set).
    #[serde(default, deserialize_with = "integer")]
    pub deregister_critical_after_secs: Option<u64>,
}

/// An active health check: `{"type": "tcp"}` or `{"type": "http", "path": "/health"}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// `tcp` (a connect succeeds) or `http` (`GET path` answers 2xx or 3xx).
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP path, starting with `/` (http only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl CheckSpec {
    /// The catalog's check, or why not.
    pub fn to_check(&self) -> Result<Check, String> {
        let wire = match (self.kind.as_str(), &self.path) {
            ("tcp", None) => "tcp".to_string(),
            ("tcp", Some(_)) => return Err("a tcp check takes no path".into()),
            ("http", Some(p)) => format!("http:{p}"),
            ("http", None) => return Err("an http check needs a path".into()),
            (other, _) => return Err(format!("unknown check type '{other}' (tcp or http)")),
        };
        wire.parse::<Check>().map_err(|e| e.to_string())
    }

    /// The spec of a catalog check.
    pub fn from_check(c: &Check) -> Self {
        match c {
            Check::Tcp => CheckSpec {
                kind: "tcp".into(),
                path: None,
            },
            Check::Http { path } => CheckSpec {
                kind: "http".into(),
                path: Some(path.clone()),
            },
        }
    }
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Instance id.
    pub id: String,
    /// Instance secret: needed to heartbeat and deregister. Shown once.
    pub secret: String,
    /// Canonical service name.
    pub service: String,
    /// Service VIP.
    pub vip: IpAddr,
    /// Service port on the VIP.
    pub service_port: u16,
    /// Where the instance listens (`ip:port`).
    pub endpoint: String,
    /// Lease TTL, seconds.
    pub ttl_secs: u64,
    /// True when this renewed an existing registration.
    pub renewed: bool,
}

impl From<Registered> for RegisterResponse {
    fn from(r: Registered) -> Self {
        RegisterResponse {
            id: r.id.to_string(),
            secret: r.secret.expose().to_string(),
            service: r.service.to_string(),
            vip: r.vip,
            service_port: r.service_port,
            endpoint: r.endpoint.to_string(),
            ttl_secs: r.ttl.as_secs().max(1),
            renewed: r.renewed,
        }
    }
}

/// Optional body of heartbeat and deregister (the secret may come in a header instead).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    /// The instance secret.
    #[serde(default)]
    pub secret: Option<String>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatResponse {
    /// Instance id.
    pub id: String,
    /// Lease TTL, seconds.
    pub ttl_secs: u64,
    /// Time left on the renewed lease, milliseconds.
    pub lease_remaining_ms: u64,
}

/// An instance's last check, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckStatus {
    /// `passing`, `critical`, or `pending` (not checked yet, or checked by another node).
    pub status: &'static str,
    /// What the check saw: `HTTP 200 from /healthz`, `connect 127.0.0.1:8000: connection
    /// refused`, `waiting for the first check`.
    pub output: String,
    /// When it ran, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at_unix_ms: Option<u64>,
    /// Checks in a row with this outcome.
    pub consecutive: u32,
    /// Since when it has been failing, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since_unix_ms: Option<u64>,
}

impl CheckStatus {
    /// The check status of `i` on this node.
    pub fn of(catalog: &Catalog, i: &Instance) -> Option<Self> {
        i.check.as_ref()?;
        Some(match catalog.check_result(i.id.as_str()) {
            Some(r) => CheckStatus {
                status: if r.passing { "passing" } else { "critical" },
                output: r.output,
                checked_at_unix_ms: Some(r.checked_at_unix_ms),
                consecutive: r.consecutive,
                failing_since_unix_ms: r.failing_since_unix_ms,
            },
            None => CheckStatus {
                status: "pending",
                output: match (&i.owner, catalog.owns(i)) {
                    (Some(node), false) => format!("checked by node {node}"),
                    _ => "waiting for the first check".into(),
                },
                checked_at_unix_ms: None,
                consecutive: 0,
                failing_since_unix_ms: None,
            },
        })
    }
}

/// One instance as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    /// Instance id.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Address it listens on.
    pub address: IpAddr,
    /// Port it listens on.
    pub port: u16,
    /// `address:port`.
    pub endpoint: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Balancing weight.
    pub weight: u32,
    /// `tcp`, `http1` or `http2`.
    pub protocol: &'static str,
    /// `passing` or `critical`.
    pub health: &'static str,
    /// Lease TTL, seconds.
    pub ttl_secs: u64,
    /// When the lease runs out unless renewed, Unix milliseconds.
    pub lease_deadline_unix_ms: u64,
    /// Time left on the lease, milliseconds.
    pub lease_remaining_ms: u64,
    /// Catalog index at which it registered.
    pub registered_index: u64,
    /// Its active health check, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// What its last check saw (instances with a check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_result: Option<CheckStatus>,
    /// Seconds it may stay critical before it is deregistered, if set on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_critical_after_secs: Option<u64>,
    /// The cluster node that holds its lease and takes its heartbeats (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl InstanceView {
    /// The view of `i` now.
    pub fn new(catalog: &Catalog, i: &Instance) -> Self {
        InstanceView {
            id: i.id.to_string(),
            service: i.service.to_string(),
            address: i.endpoint.ip(),
            port: i.endpoint.port(),
            endpoint: i.endpoint.to_string(),
            tags: i.tags.clone(),
            meta: i.meta.clone(),
            weight: i.weight,
            protocol: i.protocol.as_str(),
            health: i.health.as_str(),
            ttl_secs: i.ttl.as_secs(),
            lease_deadline_unix_ms: catalog.deadline_unix_ms(i.lease().deadline_ms()),
            lease_remaining_ms: catalog.lease_remaining(i).as_millis() as u64,
            registered_index: i.registered_index,
            check: i.check.as_ref().map(CheckSpec::from_check),
            check_result: CheckStatus::of(catalog, i),
            deregister_critical_after_secs: i.deregister_critical_after.map(|d| d.as_secs()),
            owner: i.owner.as_deref().map(str::to_string),
        }
    }
}

/// One service as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// Canonical name.
    pub name: String,
    /// VIP.
    pub vip: IpAddr,
    /// Service port on the VIP.
    pub port: u16,
    /// Number of instances.
    pub instance_count: usize,
    /// Number of passing instances.
    pub healthy_count: usize,
    /// `passing` (all instances pass), `warning` (some do) or `critical` (none do).
    pub health: &'static str,
    /// Every tag of any instance, sorted, without duplicates.
    pub tags: Vec<String>,
    /// Catalog index of its last change.
    pub modify_index: u64,
    /// Its instances (in `GET /v1/services/{name}`, or with `?detail=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceView>>,
}

impl ServiceView {
    /// The view of `s`, with instances when `detail`.
    pub fn new(catalog: &Catalog, s: &Service, detail: bool) -> Self {
        let healthy = s.healthy_count();
        let mut tags: Vec<String> = s.instances.iter().flat_map(|i| i.tags.clone()).collect();
        tags.sort();
        tags.dedup();
        ServiceView {
            name: s.name.to_string(),
            vip: s.vip,
            port: s.port,
            instance_count: s.instances.len(),
            healthy_count: healthy,
            health: if healthy == s.instances.len() {
                "passing"
            } else if healthy == 0 {
                "critical"
            } else {
                "warning"
            },
            tags,
            modify_index: s.modify_index,
            instances: detail.then(|| {
                s.instances
                    .iter()
                    .map(|i| InstanceView::new(catalog, i))
                    .collect()
            }),
        }
    }
}

/// `GET /v1/services`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceList {
    /// Catalog index of this view.
    pub index: u64,
    /// Services, sorted by name.
    pub services: Vec<ServiceView>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    /// `ok`, `degraded` (the store cannot take writes; reads go on from the last view),
    /// or `shutting_down`.
    pub status: &'static str,
    /// The store (`memory`, `redb:…`, `etcd:…`).
    pub store: String,
    /// Why the store cannot take writes, while it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Milliseconds since this node last heard from the cluster store (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view_age_ms: Option<u64>,
    /// This node's id (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The process answers.
    pub live: bool,
    /// It accepts registrations and answers queries.
    pub ready: bool,
    /// Catalog index.
    pub index: u64,
    /// Services registered.
    pub services: usize,
    /// Instances registered.
    pub instances: usize,
    /// The DNS domain services are named under, without dots (`netsel`): service `web`
    /// is `web.netsel.`, its instances `_web._tcp.netsel.` (SRV).
    pub dns_domain: String,
}
