//! The catalog: the one source of truth for services, instances, leases and VIPs.
//!
//! It is a state machine over committed operations ([`Op`]):
//!
//! * **A write** (register, deregister, expire, health change) validates, allocates (VIP,
//!   pool port) and *plans* operations; it changes nothing itself.
//! * **The store commits them.** On a single node the store is the sequencer: the planned
//!   batch is applied under a short std `Mutex`, handed to the store in order, and the
//!   caller is answered once the store says it is durable (the lock is never held across
//!   an `.await`, so a store can group-commit). In a cluster the batch becomes an etcd
//!   transaction guarded by what the plan read ([`Expect`]); the node applies it when its
//!   watch delivers it, and answers once its own view has reached that revision.
//! * **Applying a committed operation** (`State::apply`) is the only way state changes,
//!   on every node: a local write, the embedded store's restore and log replay (a fold of
//!   the same apply over what was kept), and a cluster node's list and watch.
//! * **Reads** load the current snapshot (`arc-swap`): no lock, never waiting for writers.
//!   Snapshots share structure (`imbl`), so publishing one is cheap.
//! * **Heartbeats** renew a lease with one atomic store on the instance's shared [`Lease`]:
//!   no lock, no new snapshot, no event.
//! * **Leases** expire at their deadline: [`Catalog::run`] keeps a timer heap and re-arms an
//!   entry when it finds the lease was renewed meanwhile; a sweep every
//!   `health_check_interval` is the backstop.

pub mod audit;
mod metrics;
mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use metrics::CatalogMetrics;
pub use model::{CheckResult, Instance, Lease, Service};

use crate::model::{AppProtocol, Check, InstanceRecord, Op, ServiceRecord, VipHold};
pub use crate::model::{Health, InstanceId, NameError, NodeId, NodeInfo, Secret, ServiceName};
use crate::network::{NetworkError, PortPool, VipPool};
use crate::protocol::{MAX_META, MAX_TAGS, MAX_VALUE_LEN};
use crate::store::{Cluster, Expect, Persisted, Proposal, ProposeError, Store, StoreError};

/// Settings the catalog needs. The server's configuration assembles them from the seed's
/// `max_heartbeat_age` and `health_check_interval`, the lease limits (`min_ttl_ms`,
/// `max_ttl_secs`, `max_instances`), `[network]` and `[registry] allowed_endpoint_cidrs`,
/// whose defaults are written with those settings.
#[derive(Debug, Clone)]
pub struct CatalogSettings {
    /// VIP pool.
    pub vip_cidr: IpNet,
    /// How long a released VIP is held back from other names.
    pub vip_hold: Duration,
    /// Port pool for registrations without an endpoint.
    pub port_range: RangeInclusive<u16>,
    /// Lease TTL when a registration names none (the seed's `max_heartbeat_age`).
    pub default_ttl: Duration,
    /// Longest TTL a registration may ask for.
    pub max_ttl: Duration,
    /// Shortest TTL a registration may ask for.
    pub min_ttl: Duration,
    /// Backstop sweep interval (the seed's `health_check_interval`).
    pub sweep_interval: Duration,
    /// Time every loaded instance gets to heartbeat after a restart.
    pub restart_grace: Duration,
    /// Most instances the catalog will hold.
    pub max_instances: usize,
    /// Test-bind each candidate VIP of a loopback pool before handing it out.
    pub probe_vip_bind: bool,
    /// Where instance endpoints may be (`[registry] allowed_endpoint_cidrs`); empty means
    /// anywhere but the always-refused ranges (see [`endpoint_refusal`]).
    pub allowed_endpoints: Vec<IpNet>,
}

impl CatalogSettings {
    /// Whether an instance may have an endpoint on `ip` (no allocation: the proxies ask
    /// on every pick).
    pub fn allows_endpoint(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        endpoint_kind(ip).is_none()
            && (self.allowed_endpoints.is_empty()
                || self.allowed_endpoints.iter().any(|n| n.contains(&ip)))
    }

    /// Why an instance may not have an endpoint on `ip`, if it may not. Registrations are
    /// refused with this reason, and the proxies never connect to such an endpoint,
    /// whatever the catalog holds (a store written under another policy).
    pub fn endpoint_refusal(&self, ip: IpAddr) -> Option<String> {
        if let Some(why) = endpoint_refusal(ip) {
            return Some(why);
        }
        let ip = ip.to_canonical();
        if !self.allowed_endpoints.is_empty()
            && !self.allowed_endpoints.iter().any(|n| n.contains(&ip))
        {
            return Some(format!("{ip} is outside [registry] allowed_endpoint_cidrs"));
        }
        None
    }
}

/// Why no instance may ever listen on `ip`: unspecified, multicast, broadcast and
/// link-local addresses (169.254.0.0/16 and fe80::/10, where cloud metadata services live)
/// are refused.
pub fn endpoint_refusal(ip: IpAddr) -> Option<String> {
    let ip = ip.to_canonical();
    endpoint_kind(ip).map(|kind| format!("{ip} is a {kind} address, never an instance's"))
}

fn endpoint_kind(ip: IpAddr) -> Option<&'static str> {
    Some(match ip {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        IpAddr::V4(v4) if v4.is_broadcast() => "broadcast",
        IpAddr::V4(v4) if v4.is_link_local() => "link-local",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => "link-local",
        _ => return None,
    })
}

/// Why a catalog operation failed. `Display` is the reason given to clients.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The name breaks DNS label rules.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A field with an unacceptable value.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No instance with that id.
    #[error("unknown instance {0}")]
    UnknownInstance(String),
    /// No service with that name.
    #[error("unknown service {0}")]
    UnknownService(String),
    /// The secret does not match.
    #[error("wrong secret for instance {0}")]
    WrongSecret(String),
    /// A name-only heartbeat from an address that did not register the name.
    #[error("{name} is not registered from {peer}")]
    NotOwner {
        /// Service name.
        name: String,
        /// The peer that asked.
        peer: IpAddr,
    },
    /// The registration names a service port the service does not have.
    #[error("service {service} already answers on port {existing}, not {requested}")]
    PortConflict {
        /// Service name.
        service: String,
        /// Its port.
        existing: u16,
        /// The port asked for.
        requested: u16,
    },
    /// The catalog holds as many instances as it may.
    #[error("catalog is full ({0} instances)")]
    Full(usize),
    /// No VIP or port left.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// Applied in memory but not made durable.
    #[error("not persisted: {0}")]
    Store(#[from] StoreError),
    /// The cluster store cannot take writes now (no quorum, unreachable): nothing was
    /// changed. Reads, DNS and the proxies go on from the last view.
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
    /// The instance's lease is held by another cluster node: heartbeat it there, or
    /// register again here.
    #[error("unknown instance {id} on this node (its lease is held by node {owner})")]
    OwnedElsewhere {
        /// Instance id.
        id: String,
        /// The node that holds it.
        owner: String,
    },
}

impl CatalogError {
    /// A short stable label for the kind of error (metrics, API error codes).
    pub fn reason(&self) -> &'static str {
        match self {
            CatalogError::InvalidName(_) => "invalid_name",
            CatalogError::Invalid { .. } => "invalid_field",
            CatalogError::UnknownInstance(_) => "unknown_instance",
            CatalogError::UnknownService(_) => "unknown_service",
            CatalogError::WrongSecret(_) => "wrong_secret",
            CatalogError::NotOwner { .. } => "not_owner",
            CatalogError::PortConflict { .. } => "port_conflict",
            CatalogError::Full(_) => "catalog_full",
            CatalogError::Network(_) => "pool_exhausted",
            CatalogError::Store(_) => "store",
            CatalogError::Unavailable(_) => "unavailable",
            CatalogError::OwnedElsewhere { .. } => "owned_elsewhere",
        }
    }
}

/// Where a registered instance listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// An address the registrant gives.
    Explicit(SocketAddr),
    /// The registering peer's IP and a port from the pool (the seed's bare-name form).
    /// Repeated from the same peer, it renews and returns the same assignment.
    Pool {
        /// The registering peer.
        peer: IpAddr,
        /// The pool port to prefer, if free.
        hint: Option<u16>,
    },
}

/// A registration request, from any front end.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Service name (validated here).
    pub name: String,
    /// Where the instance listens.
    pub endpoint: Endpoint,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Weight (default 1).
    pub weight: Option<u32>,
    /// Lease TTL (default `max_heartbeat_age`).
    pub ttl: Option<Duration>,
    /// Service port on the VIP (default: the first instance's port).
    pub service_port: Option<u16>,
    /// What the instance speaks (default TCP).
    pub protocol: Option<AppProtocol>,
    /// An active health check (none by default: the lease alone decides).
    pub check: Option<Check>,
    /// Deregister the instance once it has been critical this long (default: the
    /// `[health] deregister_critical_after_secs` setting, off unless set).
    pub deregister_critical_after: Option<Duration>,
    /// Whether an explicit endpoint already registered under the name is taken over
    /// (default; right for a restarted owner). `false` registers a new instance beside it
    /// instead: what a client sends when it registers again after being told its instance
    /// is gone or superseded, so a late owner never displaces its replacement.
    pub replace: bool,
    /// The health a new instance starts with (default passing). A registration that takes
    /// over an instance keeps that instance's health. The Consul door starts an instance
    /// with a TTL check critical until its first pass, as Consul does.
    pub initial_health: Option<Health>,
}

impl Registration {
    /// A registration of `name` at `endpoint` with every option at its default.
    pub fn new(name: impl Into<String>, endpoint: Endpoint) -> Self {
        Registration {
            name: name.into(),
            endpoint,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight: None,
            ttl: None,
            service_port: None,
            protocol: None,
            check: None,
            deregister_critical_after: None,
            replace: true,
            initial_health: None,
        }
    }
}

/// What a registration was given.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Instance id.
    pub id: InstanceId,
    /// Instance secret: give it to the registrant only.
    pub secret: Secret,
    /// Service name.
    pub service: ServiceName,
    /// Service VIP.
    pub vip: IpAddr,
    /// Service port on the VIP.
    pub service_port: u16,
    /// Where the instance listens.
    pub endpoint: SocketAddr,
    /// Lease TTL.
    pub ttl: Duration,
    /// True when this renewed an existing registration instead of adding one.
    pub renewed: bool,
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A new service (and its VIP).
    ServiceCreated,
    /// A service lost its last instance; its VIP is held back.
    ServiceRemoved,
    /// A new instance.
    InstanceRegistered,
    /// An instance re-registered with new details.
    InstanceUpdated,
    /// An instance deregistered.
    InstanceDeregistered,
    /// An instance's lease ran out.
    InstanceExpired,
    /// An instance's health changed.
    HealthChanged,
}

/// One change event. Changes of one write share its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Catalog index of the write.
    pub index: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// To which service.
    pub service: ServiceName,
    /// To which instance, if one.
    pub instance: Option<InstanceId>,
}

/// A consistent, immutable view of the catalog at one index.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The catalog index this view reflects.
    pub index: u64,
    services: imbl::OrdMap<ServiceName, Arc<Service>>,
    instances: imbl::HashMap<InstanceId, Arc<Instance>>,
    by_vip: imbl::HashMap<IpAddr, ServiceName>,
}

impl Snapshot {
    /// A service by name, matched case-insensitively.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.services.get(name.to_ascii_lowercase().as_str())
        } else {
            self.services.get(name)
        }
    }

    /// All services, sorted by name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The service that owns `vip`.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&vip).and_then(|n| self.services.get(n))
    }

    /// An instance by id.
    pub fn instance(&self, id: &str) -> Option<&Arc<Instance>> {
        self.instances.get(id)
    }

    /// All instances, in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.values()
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of instances.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }
}

/// The catalog's state: what the operations applied so far add up to.
struct State {
    index: u64,
    /// Live services: those with at least one instance.
    services: imbl::OrdMap<ServiceName, Arc<Service>>,
    instances: imbl::HashMap<InstanceId, Arc<Instance>>,
    by_vip: imbl::HashMap<IpAddr, ServiceName>,
    /// Every service record applied and not deleted, live or not, and since when (catalog
    /// ms) it has had no instance. In a cluster a service's record outlives its last
    /// instance by the VIP hold, so its name keeps its VIP cluster-wide; on a single node
    /// a service with no instance is deleted in the same batch (and its VIP held).
    records: HashMap<ServiceName, (ServiceRecord, Option<u64>)>,
    /// Which instance of a service a registration renews or takes over, without scanning
    /// the service's instances (registration stays O(log n) in a service of thousands).
    by_owner: HashMap<(ServiceName, OwnerKey), InstanceId>,
    /// Bumped whenever a service appears or disappears.
    services_epoch: u64,
    vips: VipPool,
    ports: PortPool,
}

/// What identifies an instance within its service: the registering peer's address for a
/// pool (seed) registration, the endpoint for an explicit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OwnerKey {
    Peer(IpAddr),
    Endpoint(SocketAddr),
}

impl OwnerKey {
    fn of(i: &Instance) -> OwnerKey {
        match i.owner_peer {
            Some(peer) => OwnerKey::Peer(peer),
            None => OwnerKey::Endpoint(i.endpoint),
        }
    }
}

/// What an apply needs besides the operation: the clocks (to turn stored wall-clock
/// deadlines into catalog time), this node, and why instances leave.
struct Ctx<'a> {
    now_ms: u64,
    unix_now: u64,
    node: Option<&'a NodeId>,
    removal: ChangeKind,
}

impl Ctx<'_> {
    fn owns(&self, owner: Option<&NodeId>) -> bool {
        owner == self.node
    }

    fn catalog_ms(&self, unix_ms: u64) -> u64 {
        if unix_ms >= self.unix_now {
            self.now_ms.saturating_add(unix_ms - self.unix_now)
        } else {
            self.now_ms.saturating_sub(self.unix_now - unix_ms)
        }
    }

    fn unix_ms(&self, catalog_ms: u64) -> u64 {
        if catalog_ms >= self.now_ms {
            self.unix_now.saturating_add(catalog_ms - self.now_ms)
        } else {
            self.unix_now.saturating_sub(self.now_ms - catalog_ms)
        }
    }
}

/// What applying operations produced besides the new state.
#[derive(Default)]
struct Effects {
    changes: Vec<Change>,
    /// Lease timers to arm: instances this node now holds.
    timers: Vec<(u64, InstanceId)>,
    /// Instances that could not be applied (their service record is missing).
    orphans: Vec<InstanceId>,
}

impl State {
    fn index_owner(&mut self, i: &Instance) {
        self.by_owner
            .insert((i.service.clone(), OwnerKey::of(i)), i.id.clone());
    }

    fn unindex_owner(&mut self, i: &Instance) {
        let key = (i.service.clone(), OwnerKey::of(i));
        if self.by_owner.get(&key) == Some(&i.id) {
            self.by_owner.remove(&key);
        }
    }

    /// Applies one committed operation. `op_index` is the index the operation committed
    /// at (in a cluster, its key's revision), `index` the catalog index of the batch.
    fn apply(&mut self, op: Op, op_index: u64, index: u64, ctx: &Ctx<'_>, fx: &mut Effects) {
        match op {
            Op::PutService(rec) => self.put_service(rec, op_index, ctx),
            Op::DeleteService(name) => {
                let Some((rec, _)) = self.records.remove(&name) else {
                    return;
                };
                self.vips.free(rec.vip);
                if let Some(svc) = self.services.remove(&name) {
                    // Only a cluster can delete a service with instances (a relist that
                    // lost it); its instances go with it.
                    for i in svc.instances.iter() {
                        self.instances.remove(&i.id);
                        self.unindex_owner(i);
                        if i.pool_port {
                            self.ports.release(i.endpoint.port());
                        }
                    }
                    self.by_vip.remove(&rec.vip);
                    self.services_epoch += 1;
                    fx.changes.push(Change {
                        index,
                        kind: ChangeKind::ServiceRemoved,
                        service: name,
                        instance: None,
                    });
                }
            }
            Op::PutInstance(rec) => self.put_instance(rec, op_index, index, ctx, fx),
            Op::DeleteInstance(id) => self.delete_instance(&id, index, ctx, fx),
            Op::PutHold(h) => self
                .vips
                .hold(h.vip, h.name, ctx.catalog_ms(h.until_unix_ms)),
            Op::DeleteHold(ip) => self.vips.unhold(ip),
            Op::SetIndex(i) => self.index = self.index.max(i),
            Op::SetHealth { id, health } => {
                let Some(inst) = self.instances.get(&id).cloned() else {
                    return;
                };
                if inst.health == health {
                    return;
                }
                let new = Arc::new(Instance {
                    health,
                    modify_index: op_index,
                    ..Instance::clone(&inst)
                });
                self.replace_in_service(&new, index);
                self.instances.insert(id.clone(), new);
                fx.changes.push(Change {
                    index,
                    kind: ChangeKind::HealthChanged,
                    service: inst.service.clone(),
                    instance: Some(id),
                });
            }
        }
    }

    fn put_service(&mut self, rec: ServiceRecord, op_index: u64, ctx: &Ctx<'_>) {
        let created = if rec.created_index == 0 {
            op_index
        } else {
            rec.created_index
        };
        let rec = ServiceRecord {
            created_index: created,
            ..rec
        };
        if let Some((old, _)) = self.records.get(&rec.name)
            && old.vip != rec.vip
        {
            self.vips.free(old.vip);
            if let Some(svc) = self.services.get(&rec.name) {
                self.by_vip.remove(&svc.vip);
                self.by_vip.insert(rec.vip, rec.name.clone());
            }
        }
        if !self.vips.take(rec.vip, &rec.name) {
            tracing::error!(service = %rec.name, vip = %rec.vip,
                "a committed service record names a VIP another service has");
        }
        if let Some(svc) = self.services.get(&rec.name)
            && (svc.port != rec.port || svc.vip != rec.vip)
        {
            let svc = Service {
                port: rec.port,
                vip: rec.vip,
                ..Service::clone(svc)
            };
            self.services.insert(rec.name.clone(), Arc::new(svc));
        }
        let live = self.services.contains_key(&rec.name);
        let empty_since = (!live).then_some(ctx.now_ms);
        let name = rec.name.clone();
        let since = match self.records.get(&name) {
            Some((_, Some(since))) if !live => Some(*since),
            _ => empty_since,
        };
        self.records.insert(name, (rec, since));
    }

    fn replace_in_service(&mut self, inst: &Arc<Instance>, index: u64) {
        if let Some(svc) = self.services.get(&inst.service) {
            let mut svc = Service::clone(svc);
            if let Ok(pos) = svc.instances.binary_search_by(|i| i.id.cmp(&inst.id)) {
                svc.instances[pos] = inst.clone();
            }
            svc.modify_index = index;
            self.services.insert(inst.service.clone(), Arc::new(svc));
        }
    }

    fn put_instance(
        &mut self,
        rec: InstanceRecord,
        op_index: u64,
        index: u64,
        ctx: &Ctx<'_>,
        fx: &mut Effects,
    ) {
        let Some((srec, _)) = self.records.get(&rec.service) else {
            fx.orphans.push(rec.id);
            return;
        };
        let (vip, port, created_index) = (srec.vip, srec.port, srec.created_index);
        let previous = self.instances.get(&rec.id).cloned();
        if let Some(prev) = &previous {
            self.unindex_owner(prev);
            if prev.pool_port && (!rec.pool_port || prev.endpoint.port() != rec.endpoint.port()) {
                self.ports.release(prev.endpoint.port());
            }
        }
        if rec.pool_port
            && previous
                .as_ref()
                .is_none_or(|p| !p.pool_port || p.endpoint.port() != rec.endpoint.port())
            && !self.ports.take(rec.endpoint.port())
        {
            tracing::warn!(instance = %rec.id, port = rec.endpoint.port(),
                "a pool port is recorded for two instances");
        }
        let deadline = ctx.catalog_ms(rec.deadline_unix_ms);
        let owned = ctx.owns(rec.owner.as_ref());
        let lease = match &previous {
            Some(prev) => {
                if owned {
                    prev.lease.renew(deadline);
                }
                prev.lease.clone()
            }
            None => Arc::new(Lease::new(deadline)),
        };
        if owned
            && previous
                .as_ref()
                .is_none_or(|p| !ctx.owns(p.owner.as_ref()))
        {
            fx.timers.push((lease.deadline_ms(), rec.id.clone()));
        }
        let registered_index = match (&previous, rec.registered_index) {
            (Some(prev), _) => prev.registered_index,
            (None, 0) => op_index,
            (None, i) => i,
        };
        let inst = Arc::new(Instance {
            id: rec.id.clone(),
            service: rec.service.clone(),
            endpoint: rec.endpoint,
            tags: rec.tags,
            meta: rec.meta,
            weight: rec.weight.max(1),
            protocol: rec.protocol,
            check: rec.check,
            deregister_critical_after: rec.deregister_critical_after_ms.map(Duration::from_millis),
            ttl: Duration::from_millis(rec.ttl_ms),
            owner_peer: rec.owner_peer,
            pool_port: rec.pool_port,
            health: rec.health,
            registered_index,
            modify_index: op_index,
            owner: rec.owner,
            secret: rec.secret,
            lease,
        });
        let mut svc = match self.services.get(&rec.service) {
            Some(svc) => Service::clone(svc),
            None => {
                self.services_epoch += 1;
                self.by_vip.insert(vip, rec.service.clone());
                fx.changes.push(Change {
                    index,
                    kind: ChangeKind::ServiceCreated,
                    service: rec.service.clone(),
                    instance: None,
                });
                Service {
                    name: rec.service.clone(),
                    vip,
                    port,
                    created_index,
                    modify_index: index,
                    instances: imbl::Vector::new(),
                }
            }
        };
        match svc.instances.binary_search_by(|i| i.id.cmp(&inst.id)) {
            Ok(pos) => svc.instances[pos] = inst.clone(),
            Err(pos) => svc.instances.insert(pos, inst.clone()),
        }
        svc.modify_index = index;
        if let Some((_, since)) = self.records.get_mut(&rec.service) {
            *since = None;
        }
        self.services.insert(rec.service.clone(), Arc::new(svc));
        self.index_owner(&inst);
        self.instances.insert(rec.id.clone(), inst);
        fx.changes.push(Change {
            index,
            kind: if previous.is_some() {
                ChangeKind::InstanceUpdated
            } else {
                ChangeKind::InstanceRegistered
            },
            service: rec.service,
            instance: Some(rec.id),
        });
    }

    fn delete_instance(&mut self, id: &InstanceId, index: u64, ctx: &Ctx<'_>, fx: &mut Effects) {
        let Some(inst) = self.instances.remove(id) else {
            return;
        };
        self.unindex_owner(&inst);
        if inst.pool_port {
            self.ports.release(inst.endpoint.port());
        }
        fx.changes.push(Change {
            index,
            kind: ctx.removal,
            service: inst.service.clone(),
            instance: Some(id.clone()),
        });
        let Some(svc) = self.services.get(&inst.service) else {
            return;
        };
        let mut svc = Service::clone(svc);
        if let Ok(pos) = svc.instances.binary_search_by(|i| i.id.cmp(id)) {
            svc.instances.remove(pos);
        }
        svc.modify_index = index;
        if svc.instances.is_empty() {
            self.services.remove(&svc.name);
            self.services_epoch += 1;
            self.by_vip.remove(&svc.vip);
            if let Some((_, since)) = self.records.get_mut(&svc.name) {
                *since = Some(ctx.now_ms);
            }
            fx.changes.push(Change {
                index,
                kind: ChangeKind::ServiceRemoved,
                service: svc.name.clone(),
                instance: None,
            });
        } else {
            self.services.insert(svc.name.clone(), Arc::new(svc));
        }
    }
}

/// Whether writes are sequenced here (a local store) or in a cluster store.
enum Writer {
    Local(Arc<dyn Store>),
    Cluster(Arc<dyn Cluster>),
}

struct Inner {
    settings: CatalogSettings,
    epoch: Instant,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    events: broadcast::Sender<Change>,
    index_tx: watch::Sender<u64>,
    services_tx: watch::Sender<u64>,
    /// Highest revision a cluster watch reported progress to (see
    /// [`Catalog::note_progress`]).
    progress_tx: watch::Sender<u64>,
    writer: Writer,
    /// This node's id in a cluster; `None` on a single node.
    node: Option<NodeId>,
    /// This node's description (`nodes/<id>` in a cluster).
    self_info: Mutex<NodeInfo>,
    /// Instances this node is expiring right now: their removal, when the watch delivers
    /// it, is an expiry, not a deregistration.
    expiring: Mutex<HashSet<InstanceId>>,
    /// The last active-check result of each checked instance this node checks. Not part
    /// of snapshots (a result per check round would mean a snapshot per round): health
    /// transitions are catalog writes, the detail behind them lives here.
    checks: Mutex<HashMap<InstanceId, CheckResult>>,
    timers: mpsc::UnboundedSender<(u64, InstanceId)>,
    timer_rx: Mutex<Option<mpsc::UnboundedReceiver<(u64, InstanceId)>>>,
    metrics: CatalogMetrics,
}

/// The catalog. Cheap to clone; every clone is the same catalog.
#[derive(Clone)]
pub struct Catalog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("index", &self.index())
            .field("store", &self.describe_store())
            .finish()
    }
}

/// Capacity of the change-event channel; a subscriber that falls further behind gets
/// `Lagged` and should re-read the snapshot.
const EVENT_CAPACITY: usize = 4096;

/// How often a cluster write is planned again after a guard failed (another node wrote
/// first), before it gives up.
const MAX_CLUSTER_ATTEMPTS: usize = 16;

/// How long a cluster write waits for this node's view to reach a revision.
const VIEW_WAIT: Duration = Duration::from_secs(5);

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn as_millis_u64(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a write planned: the operations to commit, what a cluster transaction must find
/// for them to hold, and what the caller is told once they are applied.
struct Plan<T> {
    ops: Vec<Op>,
    expect: Vec<Expect>,
    removal: ChangeKind,
    answer: T,
}

/// How a write ended.
enum Planned<T> {
    /// Commit these operations.
    Write(Plan<T>),
    /// Nothing to commit: answer at once.
    Done(T),
}

impl Catalog {
    /// A catalog over `store`, loaded with whatever the store kept.
    ///
    /// Every loaded instance gets at least `restart_grace` to heartbeat, so a restart never
    /// expires live clients en masse.
    pub fn new(settings: CatalogSettings, store: Arc<dyn Store>) -> Result<Self, CatalogError> {
        let persisted = store.load()?;
        let catalog = Catalog::build(settings, Writer::Local(store), None)?;
        catalog.restore(persisted)?;
        Ok(catalog)
    }

    /// A catalog with nothing persisted (the in-memory store).
    pub fn in_memory(settings: CatalogSettings) -> Result<Self, CatalogError> {
        Catalog::new(settings, Arc::new(crate::store::MemoryStore))
    }

    /// A cluster node's catalog: empty until the cluster store's list arrives through
    /// [`reset_view`](Self::reset_view), then fed by [`apply_committed`](Self::apply_committed).
    /// Writes become transactions of `cluster`.
    pub fn clustered(
        settings: CatalogSettings,
        cluster: Arc<dyn Cluster>,
    ) -> Result<Self, CatalogError> {
        let node = cluster.node().clone();
        Catalog::build(settings, Writer::Cluster(cluster), Some(node))
    }

    fn build(
        settings: CatalogSettings,
        writer: Writer,
        node: Option<NodeId>,
    ) -> Result<Self, CatalogError> {
        let mut vips = VipPool::new(settings.vip_cidr, as_millis_u64(settings.vip_hold))?;
        vips.set_probe_bind(settings.probe_vip_bind);
        let ports = PortPool::new(settings.port_range.clone())?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (timers, timer_rx) = mpsc::unbounded_channel();
        let (index_tx, _) = watch::channel(0);
        let (services_tx, _) = watch::channel(0);
        let (progress_tx, _) = watch::channel(0);
        let self_info = NodeInfo {
            id: node.as_deref().unwrap_or("local").to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..NodeInfo::default()
        };
        Ok(Catalog {
            inner: Arc::new(Inner {
                settings,
                epoch: Instant::now(),
                state: Mutex::new(State {
                    index: 0,
                    services: imbl::OrdMap::new(),
                    instances: imbl::HashMap::new(),
                    by_vip: imbl::HashMap::new(),
                    records: HashMap::new(),
                    by_owner: HashMap::new(),
                    services_epoch: 0,
                    vips,
                    ports,
                }),
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                events,
                index_tx,
                services_tx,
                progress_tx,
                writer,
                node,
                self_info: Mutex::new(self_info),
                expiring: Mutex::new(HashSet::new()),
                checks: Mutex::new(HashMap::new()),
                timers,
                timer_rx: Mutex::new(Some(timer_rx)),
                metrics: CatalogMetrics::default(),
            }),
        })
    }

    fn ctx(&self, removal: ChangeKind) -> Ctx<'_> {
        Ctx {
            now_ms: self.now_ms(),
            unix_now: unix_now_ms(),
            node: self.inner.node.as_ref(),
            removal,
        }
    }

    /// Applies a batch of operations at catalog index `index` and arms the timers it asks
    /// for. Every state change goes through here.
    fn apply_batch(
        &self,
        st: &mut State,
        index: u64,
        ops: impl IntoIterator<Item = (u64, Op)>,
        ctx: &Ctx<'_>,
    ) -> Effects {
        let mut fx = Effects::default();
        for (op_index, op) in ops {
            st.apply(op, op_index, index, ctx, &mut fx);
        }
        st.index = st.index.max(index);
        for t in fx.timers.drain(..) {
            let _ = self.inner.timers.send(t);
        }
        fx
    }

    /// Restores what a local store kept: a fold of [`State::apply`] over it, then the
    /// repairs a changed configuration needs, and the restart grace.
    fn restore(&self, p: Persisted) -> Result<(), CatalogError> {
        let ctx = self.ctx(ChangeKind::InstanceDeregistered);
        let mut st = self.lock();
        let index = p.index;
        let mut fixups = Vec::new();
        let mut ops: Vec<(u64, Op)> = Vec::new();
        ops.extend(p.holds.into_iter().map(|h| (index, Op::PutHold(h))));
        // Services whose stored VIP this pool cannot give them (the pool changed, or two
        // records clash) get a new address rather than refusing to start.
        let mut claimed: HashSet<IpAddr> = HashSet::new();
        for s in p.services {
            let vip = if claimed.contains(&s.vip) || !st.vips.net().contains(&s.vip) {
                let mut probe = st.vips.clone();
                for ip in &claimed {
                    probe.take(*ip, &s.name);
                }
                let vip = probe.pick(&s.name, ctx.now_ms)?;
                tracing::warn!(service = %s.name, old = %s.vip, new = %vip,
                    "stored VIP is outside the pool or taken; reassigned");
                fixups.push(Op::PutService(ServiceRecord { vip, ..s.clone() }));
                vip
            } else {
                s.vip
            };
            claimed.insert(vip);
            ops.push((s.created_index, Op::PutService(ServiceRecord { vip, ..s })));
        }
        // An instance with an active check is not used until a check passes, after a
        // restart too: nothing has checked it since.
        ops.extend(p.instances.into_iter().map(|mut r| {
            if r.check.is_some() {
                r.health = Health::Critical;
            }
            (r.registered_index, Op::PutInstance(r))
        }));
        let fx = self.apply_batch(&mut st, index, ops, &ctx);
        for id in fx.orphans {
            tracing::warn!(instance = %id, "stored instance has no service; dropped");
            fixups.push(Op::DeleteInstance(id));
        }
        let fixed: Vec<(u64, Op)> = fixups.iter().map(|op| (index, op.clone())).collect();
        self.apply_batch(&mut st, index, fixed, &ctx);
        // A service is only kept while it has instances.
        let dormant: Vec<ServiceRecord> = st
            .records
            .values()
            .filter(|(_, since)| since.is_some())
            .map(|(r, _)| r.clone())
            .collect();
        for r in dormant {
            let until = ctx.now_ms + st.vips.hold_ms();
            let ops = [
                Op::DeleteService(r.name.clone()),
                Op::PutHold(VipHold {
                    vip: r.vip,
                    name: r.name.clone(),
                    until_unix_ms: ctx.unix_ms(until),
                }),
            ];
            self.apply_batch(&mut st, index, ops.iter().map(|o| (index, o.clone())), &ctx);
            fixups.extend(ops);
        }
        // Every restored instance gets at least the grace to heartbeat again.
        let grace = ctx.now_ms + as_millis_u64(self.inner.settings.restart_grace);
        for i in st.instances.values() {
            i.lease.renew(grace);
        }
        if !fixups.is_empty()
            && let Writer::Local(store) = &self.inner.writer
        {
            fixups.push(Op::SetIndex(st.index));
            // Start-up is not latency-sensitive; the fixups are best-effort repairs.
            drop(store.apply(fixups));
        }
        self.publish(&st);
        Ok(())
    }

    /// Replaces a cluster node's view with a full list of the cluster store at `index`:
    /// the operations that turn the current view into the listed one, applied as one
    /// batch. Leases this node holds survive.
    pub fn reset_view(
        &self,
        index: u64,
        services: Vec<ServiceRecord>,
        instances: Vec<(u64, InstanceRecord)>,
    ) {
        let ctx = self.ctx(ChangeKind::InstanceDeregistered);
        let mut st = self.lock();
        let listed_services: HashSet<ServiceName> =
            services.iter().map(|s| s.name.clone()).collect();
        let listed_instances: HashMap<InstanceId, u64> = instances
            .iter()
            .map(|(rev, r)| (r.id.clone(), *rev))
            .collect();
        let mut ops: Vec<(u64, Op)> = Vec::new();
        for id in st.instances.keys() {
            if !listed_instances.contains_key(id) {
                ops.push((index, Op::DeleteInstance(id.clone())));
            }
        }
        for name in st.records.keys() {
            if !listed_services.contains(name) {
                ops.push((index, Op::DeleteService(name.clone())));
            }
        }
        for s in services {
            let same = st.records.get(&s.name).is_some_and(|(r, _)| *r == s);
            if !same {
                ops.push((s.created_index, Op::PutService(s)));
            }
        }
        for (rev, r) in instances {
            let same = st
                .instances
                .get(&r.id)
                .is_some_and(|i| i.modify_index == rev);
            if !same {
                ops.push((rev, Op::PutInstance(r)));
            }
        }
        let fx = self.apply_batch(&mut st, index, ops, &ctx);
        self.finish(&st, fx);
    }

    /// Applies operations a cluster store committed at `index` (its revision), in order.
    /// Operations at or below the current index were applied already and are skipped.
    pub fn apply_committed(&self, index: u64, ops: Vec<Op>) {
        let mut expiring = self
            .inner
            .expiring
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let expired = ops.iter().any(|op| match op {
            Op::DeleteInstance(id) => expiring.remove(id),
            _ => false,
        });
        drop(expiring);
        let removal = if expired {
            ChangeKind::InstanceExpired
        } else {
            ChangeKind::InstanceDeregistered
        };
        let ctx = self.ctx(removal);
        let mut st = self.lock();
        if index <= st.index {
            return;
        }
        let fx = self.apply_batch(&mut st, index, ops.into_iter().map(|op| (index, op)), &ctx);
        self.finish(&st, fx);
    }

    /// Records that the cluster store's watch has reported progress up to `revision`
    /// (every change up to it should have been delivered). Never moves the index: etcd
    /// 3.4 can report progress before it has delivered every earlier event (etcd issue
    /// #15220), so progress only tells a write that lost a race when to plan again.
    pub fn note_progress(&self, revision: u64) {
        self.inner.progress_tx.send_if_modified(|seen| {
            let newer = revision > *seen;
            if newer {
                *seen = revision;
            }
            newer
        });
    }

    fn finish(&self, st: &State, fx: Effects) {
        self.publish(st);
        for c in fx.changes {
            let _ = self.inner.events.send(c);
        }
    }

    /// Cluster service records with no instance since before `before_ms` (catalog time):
    /// the services whose VIP hold has run out, ready to be collected.
    pub fn dormant_services(&self, before_ms: u64) -> Vec<ServiceRecord> {
        self.lock()
            .records
            .values()
            .filter(|(_, since)| since.is_some_and(|s| s <= before_ms))
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Whether this node holds `instance`'s lease (always, on a single node).
    pub fn owns(&self, instance: &Instance) -> bool {
        instance.owner.as_ref() == self.inner.node.as_ref()
    }

    /// Records the result of an instance's active check (the health checker's report).
    pub fn record_check(&self, id: &InstanceId, result: CheckResult) {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), result);
    }

    /// The last check result of instance `id`, if this node has checked it.
    pub fn check_result(&self, id: &str) -> Option<CheckResult> {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Forgets the check results of instances that are gone.
    pub fn retain_check_results(&self, keep: impl Fn(&InstanceId) -> bool) {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| keep(id));
    }

    /// This node's id in a cluster.
    pub fn node(&self) -> Option<&NodeId> {
        self.inner.node.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would leave maps half-updated; none of the code
        // under it panics, but do not compound one by poisoning every later writer.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, st: &State) {
        self.inner.snapshot.store(Arc::new(Snapshot {
            index: st.index,
            services: st.services.clone(),
            instances: st.instances.clone(),
            by_vip: st.by_vip.clone(),
        }));
        self.inner.index_tx.send_replace(st.index);
        let epoch = st.services_epoch;
        self.inner.services_tx.send_if_modified(|seen| {
            let changed = *seen != epoch;
            *seen = epoch;
            changed
        });
    }

    /// A short description of the store (`memory`, `redb:/path`, `etcd:…`).
    pub fn describe_store(&self) -> String {
        match &self.inner.writer {
            Writer::Local(s) => s.describe(),
            Writer::Cluster(c) => c.describe(),
        }
    }

    /// What this node tells others about itself (set by the server once it is bound).
    pub fn set_self_info(&self, info: NodeInfo) {
        *self
            .inner
            .self_info
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = info;
    }

    /// This node as it describes itself.
    pub fn self_info(&self) -> NodeInfo {
        self.inner
            .self_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The nodes serving this catalog: the cluster's live nodes, or this one alone.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        match &self.inner.writer {
            Writer::Local(_) => vec![self.self_info()],
            Writer::Cluster(c) => c.nodes(),
        }
    }

    /// Whether the store can take writes now, and how old this node's view is.
    pub fn store_health(&self) -> crate::store::StoreHealth {
        match &self.inner.writer {
            Writer::Local(s) => s.health(),
            Writer::Cluster(c) => c.health(),
        }
    }

    /// Registers the catalog's metrics (registrations, heartbeats, expiries,
    /// deregistrations, instances per service and health) on `metrics_registry`.
    pub fn register_metrics(&self, metrics_registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(metrics_registry, self.clone());
    }

    /// Registers the local store's own metrics, if it has any (the embedded store's
    /// fsync, batch and checkpoint figures).
    pub(crate) fn register_store_metrics(
        &self,
        metrics_registry: &mut prometheus_client::registry::Registry,
    ) {
        if let Writer::Local(store) = &self.inner.writer {
            store.register_metrics(metrics_registry);
        }
    }

    /// The newest snapshot. Never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// The current catalog index.
    pub fn index(&self) -> u64 {
        self.inner.snapshot.load().index
    }

    /// Change events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.events.subscribe()
    }

    /// A receiver that sees every new catalog index; cheap "something changed" signal.
    pub fn watch_index(&self) -> watch::Receiver<u64> {
        self.inner.index_tx.subscribe()
    }

    /// A receiver that changes only when a service appears or disappears (a service keeps
    /// its VIP and port for life), for front ends whose state is per service, not per
    /// instance: they need not wake for every registration.
    pub fn watch_services(&self) -> watch::Receiver<u64> {
        self.inner.services_tx.subscribe()
    }

    /// Waits until the index passes `index` or `timeout` elapses; returns the index then.
    pub async fn wait_for_index(&self, index: u64, timeout: Duration) -> u64 {
        let mut rx = self.watch_index();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|i| *i > index)).await;
        self.index()
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &CatalogSettings {
        &self.inner.settings
    }

    /// The catalog clock: milliseconds since the catalog was created (tokio time, so
    /// paused-time tests control it). Lease deadlines are on this clock.
    pub fn now_ms(&self) -> u64 {
        as_millis_u64(self.inner.epoch.elapsed())
    }

    /// Time left on an instance's lease.
    pub fn lease_remaining(&self, instance: &Instance) -> Duration {
        Duration::from_millis(instance.lease.deadline_ms().saturating_sub(self.now_ms()))
    }

    /// A lease deadline as wall-clock Unix milliseconds.
    pub fn deadline_unix_ms(&self, deadline_ms: u64) -> u64 {
        let now = self.now_ms();
        if deadline_ms >= now {
            unix_now_ms() + (deadline_ms - now)
        } else {
            unix_now_ms().saturating_sub(now - deadline_ms)
        }
    }

    fn validate(&self, reg: &Registration) -> Result<(ServiceName, Duration, u32), CatalogError> {
        let name = ServiceName::new(reg.name.trim())?;
        let s = &self.inner.settings;
        let ttl = reg.ttl.unwrap_or(s.default_ttl);
        if ttl < s.min_ttl || ttl > s.max_ttl {
            return Err(CatalogError::Invalid {
                field: "ttl",
                reason: format!(
                    "{} ms is outside {}..={} ms",
                    ttl.as_millis(),
                    s.min_ttl.as_millis(),
                    s.max_ttl.as_millis()
                ),
            });
        }
        let weight = reg.weight.unwrap_or(1);
        if !(1..=10_000).contains(&weight) {
            return Err(invalid("weight", "must be 1..=10000"));
        }
        let ip = match reg.endpoint {
            Endpoint::Explicit(ep) => {
                if ep.port() == 0 {
                    return Err(invalid("endpoint", "port 0"));
                }
                ep.ip()
            }
            Endpoint::Pool { peer, .. } => peer,
        };
        if let Some(why) = s.endpoint_refusal(ip) {
            return Err(CatalogError::Invalid {
                field: "endpoint",
                reason: why,
            });
        }
        if reg.service_port == Some(0) {
            return Err(invalid("service_port", "port 0"));
        }
        if reg.tags.len() > MAX_TAGS {
            return Err(invalid("tags", "too many"));
        }
        if reg.meta.len() > MAX_META {
            return Err(invalid("meta", "too many entries"));
        }
        let too_long = |s: &String| s.len() > MAX_VALUE_LEN;
        if reg.tags.iter().any(|t| t.is_empty() || too_long(t)) {
            return Err(invalid("tags", "empty or too long"));
        }
        if reg
            .meta
            .iter()
            .any(|(k, v)| k.is_empty() || too_long(k) || too_long(v))
        {
            return Err(invalid("meta", "empty key, or key or value too long"));
        }
        let control = |s: &String| s.chars().any(char::is_control);
        if reg.tags.iter().any(control) || reg.meta.iter().any(|(k, v)| control(k) || control(v)) {
            return Err(invalid("tags/meta", "control characters"));
        }
        Ok((name, ttl, weight))
    }

    /// Runs a write: plans it against the current state, commits what it planned, and
    /// answers once that is applied here.
    ///
    /// On a single node plan and apply happen under one lock, and the store's durability
    /// is awaited after it is released. In a cluster the plan becomes a guarded
    /// transaction; when a guard fails (another node wrote first) the write waits for its
    /// view to catch up and plans again.
    async fn write<T>(
        &self,
        mut plan: impl FnMut(&Self, &mut State, &Ctx<'_>, u64) -> Result<Planned<T>, CatalogError>,
    ) -> Result<T, CatalogError> {
        match &self.inner.writer {
            Writer::Local(store) => {
                let (answer, commit) = {
                    let mut ctx = self.ctx(ChangeKind::InstanceDeregistered);
                    let mut st = self.lock();
                    let index = st.index + 1;
                    let p = match plan(self, &mut st, &ctx, index)? {
                        Planned::Done(answer) => return Ok(answer),
                        Planned::Write(p) => p,
                    };
                    ctx.removal = p.removal;
                    let fx = self.apply_batch(
                        &mut st,
                        index,
                        p.ops.iter().map(|op| (index, op.clone())),
                        &ctx,
                    );
                    let mut ops = p.ops;
                    ops.push(Op::SetIndex(index));
                    let commit = store.apply(ops);
                    self.finish(&st, fx);
                    (p.answer, commit)
                };
                commit.wait().await?;
                Ok(answer)
            }
            Writer::Cluster(cluster) => {
                let mut last = String::new();
                for _ in 0..MAX_CLUSTER_ATTEMPTS {
                    let p = {
                        let ctx = self.ctx(ChangeKind::InstanceDeregistered);
                        let mut st = self.lock();
                        let index = st.index;
                        match plan(self, &mut st, &ctx, index)? {
                            Planned::Done(answer) => return Ok(answer),
                            Planned::Write(p) => p,
                        }
                    };
                    if p.removal == ChangeKind::InstanceExpired {
                        let mut expiring = self
                            .inner
                            .expiring
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        for op in &p.ops {
                            if let Op::DeleteInstance(id) = op {
                                expiring.insert(id.clone());
                            }
                        }
                    }
                    let proposal = Proposal {
                        ops: p.ops,
                        expect: p.expect,
                    };
                    match cluster.propose(proposal).await {
                        Ok(revision) => {
                            self.reach(revision).await?;
                            return Ok(p.answer);
                        }
                        Err(ProposeError::Conflict { revision, seen }) => {
                            last = format!("another node changed it first (revision {revision})");
                            self.catch_up(revision, seen).await;
                        }
                        Err(ProposeError::Unavailable(why)) => {
                            return Err(CatalogError::Unavailable(why));
                        }
                    }
                }
                Err(CatalogError::Unavailable(format!(
                    "the write kept conflicting after {MAX_CLUSTER_ATTEMPTS} attempts: {last}"
                )))
            }
        }
    }

    /// Waits until this node's view has applied `revision` (read-your-writes).
    async fn reach(&self, revision: u64) -> Result<(), CatalogError> {
        if revision == 0 || self.index() >= revision {
            return Ok(());
        }
        let reached = self.wait_for_index(revision - 1, VIEW_WAIT).await;
        if reached >= revision {
            Ok(())
        } else {
            Err(CatalogError::Unavailable(format!(
                "committed at revision {revision}, but this node's view is still at {reached}"
            )))
        }
    }

    /// After a write lost a race at `revision`: waits (briefly) until this node's view has
    /// applied `seen`, the newest change to what the write expected, and then until it has
    /// seen `revision`, by its index or by the watch's progress report.
    async fn catch_up(&self, revision: u64, seen: u64) {
        let mut index = self.watch_index();
        if seen > 0 {
            let _ = tokio::time::timeout(VIEW_WAIT, index.wait_for(|i| *i >= seen)).await;
        }
        let mut progress = self.inner.progress_tx.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if *index.borrow_and_update() >= revision
                    || *progress.borrow_and_update() >= revision
                {
                    return;
                }
                tokio::select! {
                    r = index.changed() => if r.is_err() { return },
                    r = progress.changed() => if r.is_err() { return },
                }
            }
        })
        .await;
    }

    /// Registers an instance; durable (single node) or committed and visible here (cluster)
    /// before it returns.
    ///
    /// * A pool registration repeated from the same peer renews and returns the same
    ///   assignment (the seed's behaviour).
    /// * An explicit endpoint already registered under the name is taken over: same id,
    ///   new details, a new secret (the old one stops working).
    pub async fn register(&self, reg: Registration) -> Result<Registered, CatalogError> {
        let (name, ttl, weight) = self.validate(&reg)?;
        let request = self.next_request();
        let (id, renewed) = self
            .write(|cat, st, ctx, index| {
                cat.plan_register(st, ctx, index, &reg, &name, ttl, weight, request.clone())
            })
            .await?;
        if let Some(done) = renewed {
            self.inner.metrics.registrations.inc();
            return Ok(done);
        }
        let snap = self.snapshot();
        let inst = snap
            .instance(id.as_str())
            .ok_or_else(|| CatalogError::UnknownInstance(id.to_string()))?;
        let svc = snap
            .service(inst.service.as_str())
            .ok_or_else(|| CatalogError::UnknownService(inst.service.to_string()))?;
        self.inner.metrics.registrations.inc();
        Ok(Registered {
            id: inst.id.clone(),
            secret: inst.secret.clone(),
            service: svc.name.clone(),
            vip: svc.vip,
            service_port: svc.port,
            endpoint: inst.endpoint,
            ttl: inst.ttl,
            renewed: inst.registered_index != inst.modify_index,
        })
    }

    fn next_request(&self) -> Option<String> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.inner.node.as_ref().map(|n| {
            format!(
                "{n}/{}",
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_register(
        &self,
        st: &mut State,
        ctx: &Ctx<'_>,
        index: u64,
        reg: &Registration,
        name: &ServiceName,
        ttl: Duration,
        weight: u32,
        request: Option<String>,
    ) -> Result<Planned<(InstanceId, Option<Registered>)>, CatalogError> {
        let cluster = self.inner.node.is_some();
        let now = ctx.now_ms;
        let deadline = now + as_millis_u64(ttl);
        let live = st.services.get(name).cloned();
        let record = st.records.get(name).map(|(r, _)| r.clone());
        if let (Some(svc), Some(p)) = (&live, reg.service_port)
            && svc.port != p
        {
            return Err(CatalogError::PortConflict {
                service: name.to_string(),
                existing: svc.port,
                requested: p,
            });
        }
        // Find the instance this registration renews or takes over, if any.
        let owner_key = match reg.endpoint {
            Endpoint::Pool { peer, .. } => OwnerKey::Peer(peer),
            Endpoint::Explicit(ep) => OwnerKey::Endpoint(ep),
        };
        let takes_over = reg.replace || matches!(reg.endpoint, Endpoint::Pool { .. });
        let previous = st
            .by_owner
            .get(&(name.clone(), owner_key))
            .filter(|_| takes_over)
            .and_then(|id| st.instances.get(id))
            .cloned();
        let protocol = reg.protocol.unwrap_or_default();
        if let (Some(prev), Some(svc), Endpoint::Pool { .. }) = (&previous, &live, reg.endpoint)
            && ctx.owns(prev.owner.as_ref())
            && prev.tags == reg.tags
            && prev.meta == reg.meta
            && prev.weight == weight
            && prev.protocol == protocol
            && prev.check == reg.check
            && prev.deregister_critical_after == reg.deregister_critical_after
            && prev.ttl == ttl
        {
            // The seed client registering again from the same address: a renewal.
            self.renew(prev);
            return Ok(Planned::Done((
                prev.id.clone(),
                Some(Registered {
                    id: prev.id.clone(),
                    secret: prev.secret.clone(),
                    service: name.clone(),
                    vip: svc.vip,
                    service_port: svc.port,
                    endpoint: prev.endpoint,
                    ttl,
                    renewed: true,
                }),
            )));
        }
        if previous.is_none() && st.instances.len() >= self.inner.settings.max_instances {
            return Err(CatalogError::Full(self.inner.settings.max_instances));
        }
        let mut ops = Vec::with_capacity(4);
        let mut expect = Vec::with_capacity(3);
        let (id, secret, endpoint, pool_port, owner_peer) = match (&previous, reg.endpoint) {
            (Some(prev), Endpoint::Pool { .. }) => (
                prev.id.clone(),
                prev.secret.clone(),
                prev.endpoint,
                prev.pool_port,
                prev.owner_peer,
            ),
            (Some(prev), Endpoint::Explicit(ep)) => {
                (prev.id.clone(), Secret::generate(), ep, false, None)
            }
            (None, Endpoint::Pool { peer, hint }) => {
                let port = st.ports.pick(hint)?;
                if hint != Some(port) {
                    st.ports.advance_past(port);
                }
                if cluster {
                    expect.push(Expect::PortFree(port));
                }
                (
                    InstanceId::generate(),
                    Secret::generate(),
                    SocketAddr::new(peer, port),
                    true,
                    Some(peer),
                )
            }
            (None, Endpoint::Explicit(ep)) => {
                (InstanceId::generate(), Secret::generate(), ep, false, None)
            }
        };
        if let Some(prev) = &previous {
            expect.push(Expect::InstanceIs {
                service: name.clone(),
                id: prev.id.clone(),
                modify_index: prev.modify_index,
                pool_port: prev.pool_port.then_some(prev.endpoint.port()),
            });
        }
        let port = reg.service_port.unwrap_or(endpoint.port());
        match (&live, &record) {
            (Some(svc), _) => {
                if cluster {
                    expect.push(Expect::ServiceIs(name.clone(), svc.created_index));
                }
            }
            (None, Some(rec)) => {
                // A cluster service in its VIP hold: its name gets its VIP back.
                expect.push(Expect::ServiceIs(name.clone(), rec.created_index));
                if rec.port != port {
                    ops.push(Op::PutService(ServiceRecord {
                        port,
                        ..rec.clone()
                    }));
                }
            }
            (None, None) => {
                st.vips.prune(now);
                let vip = st.vips.pick(name, now)?;
                if cluster {
                    expect.push(Expect::ServiceAbsent(name.clone()));
                    expect.push(Expect::VipFree(vip));
                } else {
                    ops.push(Op::DeleteHold(vip));
                }
                ops.push(Op::PutService(ServiceRecord {
                    name: name.clone(),
                    vip,
                    port,
                    created_index: if cluster { 0 } else { index },
                }));
            }
        }
        let registered_index = match &previous {
            Some(p) => p.registered_index,
            None if cluster => 0,
            None => index,
        };
        let rec = InstanceRecord {
            id: id.clone(),
            service: name.clone(),
            endpoint,
            tags: reg.tags.clone(),
            meta: reg.meta.clone(),
            weight,
            protocol,
            check: reg.check.clone(),
            deregister_critical_after_ms: reg.deregister_critical_after.map(as_millis_u64),
            ttl_ms: as_millis_u64(ttl),
            owner_peer,
            pool_port,
            secret,
            registered_index,
            deadline_unix_ms: ctx.unix_ms(deadline),
            owner: ctx.node.cloned(),
            // A re-registration with the same check keeps its health. A new check (a new
            // instance, or a changed check) starts critical, so nothing is routed to it
            // until its first check passes, unless the door says otherwise (Consul's).
            health: match &previous {
                Some(p) if p.check == reg.check => p.health,
                _ => reg.initial_health.unwrap_or(if reg.check.is_some() {
                    Health::Critical
                } else {
                    Health::Passing
                }),
            },
            request,
        };
        ops.push(Op::PutInstance(rec));
        Ok(Planned::Write(Plan {
            ops,
            expect,
            removal: ChangeKind::InstanceDeregistered,
            answer: (id, None),
        }))
    }

    /// Renews an instance's lease. Lock-free: one snapshot load and one atomic store.
    /// Returns the instance's TTL.
    pub fn heartbeat(&self, id: &str, secret: &str) -> Result<Duration, CatalogError> {
        let snap = self.inner.snapshot.load();
        let inst = snap
            .instance(id)
            .ok_or_else(|| CatalogError::UnknownInstance(id.to_string()))?;
        if !inst.secret_matches(secret) {
            return Err(CatalogError::WrongSecret(id.to_string()));
        }
        self.check_owned(inst)?;
        self.renew(inst);
        Ok(inst.ttl)
    }

    fn check_owned(&self, inst: &Instance) -> Result<(), CatalogError> {
        if self.owns(inst) {
            Ok(())
        } else {
            Err(CatalogError::OwnedElsewhere {
                id: inst.id.to_string(),
                owner: inst.owner.as_deref().unwrap_or("none").to_string(),
            })
        }
    }

    /// The seed's name-only heartbeat: renews the instance of `name` registered from
    /// `peer`, and only that one.
    pub fn heartbeat_seed(&self, name: &str, peer: IpAddr) -> Result<Duration, CatalogError> {
        let snap = self.inner.snapshot.load();
        let svc = snap
            .service(name)
            .ok_or_else(|| CatalogError::UnknownService(name.to_string()))?;
        let inst = svc
            .instances
            .iter()
            .find(|i| i.owner_peer == Some(peer))
            .ok_or_else(|| CatalogError::NotOwner {
                name: name.to_string(),
                peer,
            })?;
        self.check_owned(inst)?;
        self.renew(inst);
        Ok(inst.ttl)
    }

    fn renew(&self, inst: &Instance) {
        self.inner.metrics.heartbeats.inc();
        let deadline = self.now_ms() + as_millis_u64(inst.ttl);
        inst.lease.renew(deadline);
        if let Writer::Local(store) = &self.inner.writer {
            store.renew(&inst.id, self.deadline_unix_ms(deadline));
        }
    }

    /// Deregisters an instance; durable before it returns.
    pub async fn deregister(&self, id: &str, secret: &str) -> Result<(), CatalogError> {
        self.remove_one(id, Some(secret)).await
    }

    /// Removes an instance without its secret: for operators (API with a management
    /// token, `netsel deregister`). Durable before it returns.
    pub async fn deregister_admin(&self, id: &str) -> Result<(), CatalogError> {
        self.remove_one(id, None).await
    }

    async fn remove_one(&self, id: &str, secret: Option<&str>) -> Result<(), CatalogError> {
        self.write(|cat, st, ctx, _| {
            let inst = st
                .instances
                .get(id)
                .ok_or_else(|| CatalogError::UnknownInstance(id.to_string()))?;
            if let Some(secret) = secret
                && !inst.secret_matches(secret)
            {
                return Err(CatalogError::WrongSecret(id.to_string()));
            }
            let id = inst.id.clone();
            Ok(Planned::Write(cat.plan_remove(
                st,
                ctx,
                &[id],
                ChangeKind::InstanceDeregistered,
            )))
        })
        .await?;
        self.inner.metrics.deregistrations.inc();
        Ok(())
    }

    /// Plans removing instances; on a single node, a service losing its last instance is
    /// deleted in the same batch and its VIP held back for its name.
    fn plan_remove(
        &self,
        st: &State,
        ctx: &Ctx<'_>,
        ids: &[InstanceId],
        removal: ChangeKind,
    ) -> Plan<()> {
        let mut ops = Vec::with_capacity(ids.len() + 2);
        let mut expect = Vec::new();
        let mut left: HashMap<&ServiceName, usize> = HashMap::new();
        for id in ids {
            let Some(inst) = st.instances.get(id) else {
                continue;
            };
            ops.push(Op::DeleteInstance(id.clone()));
            if self.inner.node.is_some() {
                expect.push(Expect::InstanceIs {
                    service: inst.service.clone(),
                    id: id.clone(),
                    modify_index: inst.modify_index,
                    pool_port: inst.pool_port.then_some(inst.endpoint.port()),
                });
                continue;
            }
            let Some(svc) = st.services.get(&inst.service) else {
                continue;
            };
            let n = left.entry(&svc.name).or_insert(svc.instances.len());
            *n -= 1;
            if *n == 0 {
                ops.push(Op::DeleteService(svc.name.clone()));
                ops.push(Op::PutHold(VipHold {
                    vip: svc.vip,
                    name: svc.name.clone(),
                    until_unix_ms: ctx.unix_ms(ctx.now_ms + st.vips.hold_ms()),
                }));
            }
        }
        // A hold's operations go after every instance deletion of its service.
        ops.sort_by_key(|op| !matches!(op, Op::DeleteInstance(_)));
        Plan {
            ops,
            expect,
            removal,
            answer: (),
        }
    }

    /// Expires every given instance whose lease has run out by now; skips the others (and,
    /// in a cluster, those another node holds). Returns how many expired.
    pub async fn expire(&self, ids: &[InstanceId]) -> Result<usize, CatalogError> {
        let due = |st: &State, ctx: &Ctx<'_>, batch: &[InstanceId]| -> Vec<InstanceId> {
            batch
                .iter()
                .filter(|id| {
                    st.instances.get(*id).is_some_and(|i| {
                        i.lease.deadline_ms() <= ctx.now_ms && ctx.owns(i.owner.as_ref())
                    })
                })
                .cloned()
                .collect()
        };
        let batches: Vec<Vec<InstanceId>> = match &self.inner.writer {
            Writer::Local(_) => vec![ids.to_vec()],
            // In a cluster each removal is its own transaction: one instance taken over
            // meanwhile must not hold back the others.
            Writer::Cluster(_) => ids.iter().map(|id| vec![id.clone()]).collect(),
        };
        let mut n = 0;
        for batch in batches {
            let removed = self
                .write(|cat, st, ctx, _| {
                    let due = due(st, ctx, &batch);
                    if due.is_empty() {
                        return Ok(Planned::Done(0));
                    }
                    let plan = cat.plan_remove(st, ctx, &due, ChangeKind::InstanceExpired);
                    Ok(Planned::Write(Plan {
                        ops: plan.ops,
                        expect: plan.expect,
                        removal: plan.removal,
                        answer: due.len(),
                    }))
                })
                .await;
            match removed {
                Ok(k) => n += k,
                Err(e) if n == 0 && ids.len() == 1 => return Err(e),
                Err(e) => tracing::warn!(error = %e, "expiring a lease"),
            }
        }
        self.inner.metrics.expiries.inc_by(n as u64);
        Ok(n)
    }

    /// Sets an instance's health (active checks). No-op if unchanged or unknown.
    pub async fn set_health(&self, id: &str, health: Health) -> Result<(), CatalogError> {
        let changed = self
            .write(|_, st, ctx, _| {
                let Some(inst) = st.instances.get(id) else {
                    return Ok(Planned::Done(false));
                };
                if inst.health == health {
                    return Ok(Planned::Done(false));
                }
                let (ops, expect) = match ctx.node {
                    // A single node keeps health in memory only: after a restart every
                    // instance starts passing and active checks re-establish it.
                    None => (
                        vec![Op::SetHealth {
                            id: inst.id.clone(),
                            health,
                        }],
                        Vec::new(),
                    ),
                    // A cluster keeps it in the instance's record, so every node routes alike.
                    Some(_) => (
                        vec![Op::PutInstance(record_of(inst, ctx, health))],
                        vec![Expect::InstanceIs {
                            service: inst.service.clone(),
                            id: inst.id.clone(),
                            modify_index: inst.modify_index,
                            pool_port: inst.pool_port.then_some(inst.endpoint.port()),
                        }],
                    ),
                };
                Ok(Planned::Write(Plan {
                    ops,
                    expect,
                    removal: ChangeKind::InstanceDeregistered,
                    answer: true,
                }))
            })
            .await?;
        if changed {
            self.inner.metrics.health_transition(health);
        }
        Ok(())
    }

    /// Runs lease expiry until `shutdown`: a timer per lease deadline, and a sweep every
    /// `sweep_interval` as a backstop. Only leases this node holds expire here. Call once;
    /// later calls return at once.
    pub async fn run(&self, shutdown: CancellationToken) {
        let Some(mut rx) = self
            .inner
            .timer_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut heap: BinaryHeap<Reverse<(u64, InstanceId)>> = BinaryHeap::new();
        let mut sweep = tokio::time::interval(self.inner.settings.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = heap
                .peek()
                .map(|Reverse((d, _))| self.inner.epoch + Duration::from_millis(*d));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some((deadline, id)) => heap.push(Reverse((deadline, id))),
                    None => return,
                },
                _ = sleep_until_opt(next) => {
                    let now = self.now_ms();
                    let snap = self.snapshot();
                    let mut due = Vec::new();
                    while let Some(Reverse((d, _))) = heap.peek() {
                        if *d > now {
                            break;
                        }
                        let Some(Reverse((_, id))) = heap.pop() else { break };
                        let Some(inst) = snap.instance(id.as_str()) else { continue };
                        if !self.owns(inst) {
                            continue;
                        }
                        let actual = inst.lease.deadline_ms();
                        if actual > now {
                            heap.push(Reverse((actual, id)));
                        } else {
                            due.push(id);
                        }
                    }
                    if !due.is_empty()
                        && let Err(e) = self.expire(&due).await
                    {
                        tracing::error!(error = %e, "expiring leases");
                    }
                }
                _ = sweep.tick() => {
                    let now = self.now_ms();
                    let due: Vec<InstanceId> = self
                        .snapshot()
                        .instances()
                        .filter(|i| i.lease.deadline_ms() <= now && self.owns(i))
                        .map(|i| i.id.clone())
                        .collect();
                    if !due.is_empty() {
                        tracing::debug!(count = due.len(), "sweep found expired leases");
                        if let Err(e) = self.expire(&due).await {
                            tracing::error!(error = %e, "expiring leases in sweep");
                        }
                    }
                }
            }
        }
    }
}

impl crate::store::Replica for Catalog {
    fn reset(
        &self,
        index: u64,
        services: Vec<ServiceRecord>,
        instances: Vec<(u64, InstanceRecord)>,
    ) {
        self.reset_view(index, services, instances);
    }

    fn apply(&self, index: u64, ops: Vec<Op>) {
        self.apply_committed(index, ops);
    }

    fn progress(&self, revision: u64) {
        self.note_progress(revision);
    }

    fn owner_of(&self, id: &InstanceId) -> Option<Option<NodeId>> {
        self.snapshot()
            .instance(id.as_str())
            .map(|i| i.owner.clone())
    }

    fn expired_holds(&self, held: Duration) -> Vec<ServiceRecord> {
        self.dormant_services(self.now_ms().saturating_sub(as_millis_u64(held)))
    }

    fn vip_hold(&self) -> Duration {
        self.inner.settings.vip_hold
    }
}

/// An instance as a record, with its lease deadline as wall-clock time.
fn record_of(i: &Instance, ctx: &Ctx<'_>, health: Health) -> InstanceRecord {
    InstanceRecord {
        id: i.id.clone(),
        service: i.service.clone(),
        endpoint: i.endpoint,
        tags: i.tags.clone(),
        meta: i.meta.clone(),
        weight: i.weight,
        protocol: i.protocol,
        check: i.check.clone(),
        deregister_critical_after_ms: i.deregister_critical_after.map(as_millis_u64),
        ttl_ms: as_millis_u64(i.ttl),
        owner_peer: i.owner_peer,
        pool_port: i.pool_port,
        secret: i.secret.clone(),
        registered_index: i.registered_index,
        deadline_unix_ms: ctx.unix_ms(i.lease.deadline_ms()),
        owner: i.owner.clone(),
        health,
        request: None,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn invalid(field: &'static str, reason: &str) -> CatalogError {
    CatalogError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
