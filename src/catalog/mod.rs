//! The catalog: the one source of truth for services, instances, leases and VIPs.
//!
//! * **Writes** (register, deregister, expire, health changes) take a short std `Mutex`,
//!   update persistent maps, hand the store a batch of [`StoreOp`]s in order, publish a new
//!   [`Snapshot`], bump the index and send [`Change`] events. The lock is never held across
//!   an `.await`; durability is awaited after it is released, before the caller is told.
//! * **Reads** load the current snapshot (`arc-swap`): no lock, never waiting for writers.
//!   Snapshots share structure (`imbl`), so publishing one is cheap.
//! * **Heartbeats** renew a lease with one atomic store on the instance's shared [`Lease`]:
//!   no lock, no new snapshot, no event.
//! * **Leases** expire at their deadline: [`Catalog::run`] keeps a timer heap and re-arms an
//!   entry when it finds the lease was renewed meanwhile; a sweep every
//!   `health_check_interval` is the backstop.

mod metrics;
mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
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
pub use model::{Health, Instance, InstanceId, Lease, NameError, Secret, Service, ServiceName};

use crate::network::{NetworkError, PortPool, VipPool};
use crate::protocol::{AppProtocol, Check, MAX_META, MAX_TAGS, MAX_VALUE_LEN};
use crate::store::{InstanceRecord, Persisted, ServiceRecord, Store, StoreError, StoreOp, VipHold};

/// Settings the catalog needs; every default is in [`crate::config`].
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

struct State {
    index: u64,
    services: imbl::OrdMap<ServiceName, Arc<Service>>,
    instances: imbl::HashMap<InstanceId, Arc<Instance>>,
    by_vip: imbl::HashMap<IpAddr, ServiceName>,
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
}

struct Inner {
    settings: CatalogSettings,
    epoch: Instant,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    events: broadcast::Sender<Change>,
    index_tx: watch::Sender<u64>,
    services_tx: watch::Sender<u64>,
    store: Arc<dyn Store>,
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
            .field("store", &self.inner.store.describe())
            .finish()
    }
}

/// Capacity of the change-event channel; a subscriber that falls further behind gets
/// `Lagged` and should re-read the snapshot.
const EVENT_CAPACITY: usize = 4096;

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Catalog {
    /// A catalog over `store`, loaded with whatever the store kept.
    ///
    /// Every loaded instance gets at least `restart_grace` to heartbeat, so a restart never
    /// expires live clients en masse.
    pub fn new(settings: CatalogSettings, store: Arc<dyn Store>) -> Result<Self, CatalogError> {
        let persisted = store.load()?;
        let mut vips = VipPool::new(settings.vip_cidr, ms(settings.vip_hold))?;
        vips.set_probe_bind(settings.probe_vip_bind);
        let ports = PortPool::new(settings.port_range.clone())?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (timers, timer_rx) = mpsc::unbounded_channel();
        let (index_tx, _) = watch::channel(persisted.index);
        let (services_tx, _) = watch::channel(0);
        let catalog = Catalog {
            inner: Arc::new(Inner {
                settings,
                epoch: Instant::now(),
                state: Mutex::new(State {
                    index: persisted.index,
                    services: imbl::OrdMap::new(),
                    instances: imbl::HashMap::new(),
                    by_vip: imbl::HashMap::new(),
                    by_owner: HashMap::new(),
                    services_epoch: 0,
                    vips,
                    ports,
                }),
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                events,
                index_tx,
                services_tx,
                store,
                timers,
                timer_rx: Mutex::new(Some(timer_rx)),
                metrics: CatalogMetrics::default(),
            }),
        };
        catalog.restore(persisted)?;
        Ok(catalog)
    }

    /// A catalog with nothing persisted (the in-memory store).
    pub fn in_memory(settings: CatalogSettings) -> Result<Self, CatalogError> {
        Catalog::new(settings, Arc::new(crate::store::MemoryStore))
    }

    fn restore(&self, p: Persisted) -> Result<(), CatalogError> {
        let now = self.now_ms();
        let unix_now = unix_now_ms();
        let grace = ms(self.inner.settings.restart_grace);
        let mut st = self.lock();
        let mut fixups = Vec::new();
        for h in p.holds {
            let until = now.saturating_add(h.until_unix_ms.saturating_sub(unix_now));
            st.vips.restore_hold(h.vip, h.name, until);
        }
        let mut services: BTreeMap<ServiceName, Service> = BTreeMap::new();
        for s in p.services {
            let vip = if st.vips.restore(s.vip, &s.name) {
                s.vip
            } else {
                // The pool changed under the stored data (or two records clash): give the
                // service a new address rather than refuse to start.
                let vip = st.vips.allocate(&s.name, now)?;
                tracing::warn!(service = %s.name, old = %s.vip, new = %vip,
                    "stored VIP is outside the pool or taken; reassigned");
                fixups.push(StoreOp::PutService(ServiceRecord { vip, ..s.clone() }));
                vip
            };
            services.insert(
                s.name.clone(),
                Service {
                    name: s.name,
                    vip,
                    port: s.port,
                    created_index: s.created_index,
                    modify_index: s.created_index,
                    instances: imbl::Vector::new(),
                },
            );
        }
        for r in p.instances {
            let Some(svc) = services.get_mut(&r.service) else {
                tracing::warn!(instance = %r.id, service = %r.service,
                    "stored instance has no service; dropped");
                fixups.push(StoreOp::DeleteInstance(r.id));
                continue;
            };
            if r.pool_port && !st.ports.restore(r.endpoint.port()) {
                tracing::warn!(instance = %r.id, port = r.endpoint.port(),
                    "stored pool port is outside the pool or taken");
            }
            let remaining = r.deadline_unix_ms.saturating_sub(unix_now);
            let deadline = now + remaining.max(grace);
            let inst = Instance {
                id: r.id,
                service: r.service,
                endpoint: r.endpoint,
                tags: r.tags,
                meta: r.meta,
                weight: r.weight.max(1),
                protocol: r.protocol,
                check: r.check,
                ttl: Duration::from_millis(r.ttl_ms),
                owner_peer: r.owner_peer,
                pool_port: r.pool_port,
                health: Health::Passing,
                registered_index: r.registered_index,
                secret: r.secret,
                lease: Arc::new(Lease::new(deadline)),
            };
            svc.modify_index = svc.modify_index.max(inst.registered_index);
            let _ = self.inner.timers.send((deadline, inst.id.clone()));
            svc.instances.push_back(Arc::new(inst));
        }
        for (name, mut svc) in services {
            if svc.instances.is_empty() {
                // A service is only kept while it has instances.
                if let Some(until) = st.vips.release(svc.vip, now) {
                    fixups.push(StoreOp::DeleteService(name.clone()));
                    fixups.push(StoreOp::PutHold(VipHold {
                        vip: svc.vip,
                        name: name.clone(),
                        until_unix_ms: unix_now + (until - now),
                    }));
                }
                continue;
            }
            svc.instances.sort_by(|a, b| a.id.cmp(&b.id));
            for i in &svc.instances {
                st.instances.insert(i.id.clone(), i.clone());
                st.index_owner(i);
            }
            st.by_vip.insert(svc.vip, name.clone());
            st.services.insert(name, Arc::new(svc));
            st.services_epoch += 1;
        }
        if !fixups.is_empty() {
            fixups.push(StoreOp::SetIndex(st.index));
            // Start-up is not latency-sensitive; the fixups are best-effort repairs.
            drop(self.inner.store.apply(fixups));
        }
        self.publish(&st);
        Ok(())
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

    /// Registers the catalog's metrics (registrations, heartbeats, expiries,
    /// deregistrations, instances per service and health) on `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry, self.clone());
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
        ms(self.inner.epoch.elapsed())
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
        if let Endpoint::Explicit(ep) = reg.endpoint {
            if ep.port() == 0 {
                return Err(invalid("endpoint", "port 0"));
            }
            if ep.ip().is_unspecified() || ep.ip().is_multicast() {
                return Err(invalid("endpoint", "not a unicast address"));
            }
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

    /// Registers an instance; durable before it returns.
    ///
    /// * A pool registration repeated from the same peer renews and returns the same
    ///   assignment (the seed's behaviour).
    /// * An explicit endpoint already registered under the name is taken over: same id,
    ///   new details, a new secret (the old one stops working).
    pub async fn register(&self, reg: Registration) -> Result<Registered, CatalogError> {
        let (name, ttl, weight) = self.validate(&reg)?;
        let (result, commit) = {
            let mut st = self.lock();
            let now = self.now_ms();
            let deadline = now + ms(ttl);
            let existing_svc = st.services.get(&name).cloned();
            if let (Some(svc), Some(p)) = (&existing_svc, reg.service_port)
                && svc.port != p
            {
                return Err(CatalogError::PortConflict {
                    service: name.to_string(),
                    existing: svc.port,
                    requested: p,
                });
            }
            // Find the instance this registration renews or takes over, if any.
            let owner = match reg.endpoint {
                Endpoint::Pool { peer, .. } => OwnerKey::Peer(peer),
                Endpoint::Explicit(ep) => OwnerKey::Endpoint(ep),
            };
            let previous = st
                .by_owner
                .get(&(name.clone(), owner))
                .and_then(|id| st.instances.get(id))
                .cloned();
            if let (Some(prev), Some(svc), Endpoint::Pool { .. }) =
                (&previous, &existing_svc, reg.endpoint)
                && prev.tags == reg.tags
                && prev.meta == reg.meta
                && prev.weight == weight
                && prev.protocol == reg.protocol.unwrap_or_default()
                && prev.check == reg.check
                && prev.ttl == ttl
            {
                // The seed client registering again from the same address: a renewal.
                drop(st);
                self.renew(prev);
                return Ok(Registered {
                    id: prev.id.clone(),
                    secret: prev.secret.clone(),
                    service: name,
                    vip: svc.vip,
                    service_port: svc.port,
                    endpoint: prev.endpoint,
                    ttl,
                    renewed: true,
                });
            }
            if previous.is_none() && st.instances.len() >= self.inner.settings.max_instances {
                return Err(CatalogError::Full(self.inner.settings.max_instances));
            }
            let mut ops = Vec::with_capacity(4);
            let mut changes = Vec::with_capacity(2);
            let (id, secret, endpoint, pool_port, owner_peer, lease, registered_index) =
                match (&previous, reg.endpoint) {
                    (Some(prev), Endpoint::Pool { .. }) => (
                        prev.id.clone(),
                        prev.secret.clone(),
                        prev.endpoint,
                        prev.pool_port,
                        prev.owner_peer,
                        prev.lease.clone(),
                        prev.registered_index,
                    ),
                    (Some(prev), Endpoint::Explicit(ep)) => (
                        prev.id.clone(),
                        Secret::generate(),
                        ep,
                        false,
                        None,
                        prev.lease.clone(),
                        prev.registered_index,
                    ),
                    (None, Endpoint::Pool { peer, hint }) => {
                        let port = st.ports.allocate(hint)?;
                        (
                            InstanceId::generate(),
                            Secret::generate(),
                            SocketAddr::new(peer, port),
                            true,
                            Some(peer),
                            Arc::new(Lease::new(deadline)),
                            0,
                        )
                    }
                    (None, Endpoint::Explicit(ep)) => (
                        InstanceId::generate(),
                        Secret::generate(),
                        ep,
                        false,
                        None,
                        Arc::new(Lease::new(deadline)),
                        0,
                    ),
                };
            st.index += 1;
            let index = st.index;
            let mut svc = match existing_svc {
                Some(svc) => Service::clone(&svc),
                None => {
                    let vip = match st.vips.allocate(&name, now) {
                        Ok(vip) => vip,
                        Err(e) => {
                            st.index -= 1;
                            if pool_port && previous.is_none() {
                                st.ports.release(endpoint.port());
                            }
                            return Err(e.into());
                        }
                    };
                    ops.push(StoreOp::DeleteHold(vip));
                    let svc = Service {
                        name: name.clone(),
                        vip,
                        port: reg.service_port.unwrap_or(endpoint.port()),
                        created_index: index,
                        modify_index: index,
                        instances: imbl::Vector::new(),
                    };
                    ops.push(StoreOp::PutService(ServiceRecord {
                        name: name.clone(),
                        vip,
                        port: svc.port,
                        created_index: index,
                    }));
                    changes.push(ChangeKind::ServiceCreated);
                    st.services_epoch += 1;
                    st.by_vip.insert(vip, name.clone());
                    svc
                }
            };
            lease.renew(deadline);
            let inst = Arc::new(Instance {
                id: id.clone(),
                service: name.clone(),
                endpoint,
                tags: reg.tags,
                meta: reg.meta,
                weight,
                protocol: reg.protocol.unwrap_or_default(),
                check: reg.check,
                ttl,
                owner_peer,
                pool_port,
                health: previous.as_ref().map(|p| p.health).unwrap_or_default(),
                registered_index: if previous.is_some() {
                    registered_index
                } else {
                    index
                },
                secret: secret.clone(),
                lease,
            });
            changes.push(match &previous {
                None => ChangeKind::InstanceRegistered,
                Some(_) => ChangeKind::InstanceUpdated,
            });
            match svc.instances.binary_search_by(|i| i.id.cmp(&id)) {
                Ok(pos) => svc.instances[pos] = inst.clone(),
                Err(pos) => svc.instances.insert(pos, inst.clone()),
            }
            svc.modify_index = index;
            let vip = svc.vip;
            let service_port = svc.port;
            ops.push(StoreOp::PutInstance(self.record(&inst)));
            ops.push(StoreOp::SetIndex(index));
            st.instances.insert(id.clone(), inst.clone());
            st.index_owner(&inst);
            st.services.insert(name.clone(), Arc::new(svc));
            let commit = self.inner.store.apply(ops);
            self.publish(&st);
            for kind in changes {
                let _ = self.inner.events.send(Change {
                    index,
                    kind,
                    service: name.clone(),
                    instance: (kind != ChangeKind::ServiceCreated).then(|| id.clone()),
                });
            }
            if previous.is_none() {
                let _ = self.inner.timers.send((deadline, id.clone()));
            }
            (
                Registered {
                    id,
                    secret,
                    service: name,
                    vip,
                    service_port,
                    endpoint,
                    ttl,
                    renewed: previous.is_some(),
                },
                commit,
            )
        };
        commit.wait().await?;
        self.inner.metrics.registrations.inc();
        Ok(result)
    }

    fn record(&self, i: &Instance) -> InstanceRecord {
        InstanceRecord {
            id: i.id.clone(),
            service: i.service.clone(),
            endpoint: i.endpoint,
            tags: i.tags.clone(),
            meta: i.meta.clone(),
            weight: i.weight,
            protocol: i.protocol,
            check: i.check.clone(),
            ttl_ms: ms(i.ttl),
            owner_peer: i.owner_peer,
            pool_port: i.pool_port,
            secret: i.secret.clone(),
            registered_index: i.registered_index,
            deadline_unix_ms: self.deadline_unix_ms(i.lease.deadline_ms()),
        }
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
        self.renew(inst);
        Ok(inst.ttl)
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
        self.renew(inst);
        Ok(inst.ttl)
    }

    fn renew(&self, inst: &Instance) {
        self.inner.metrics.heartbeats.inc();
        let deadline = self.now_ms() + ms(inst.ttl);
        inst.lease.renew(deadline);
        self.inner
            .store
            .renew(&inst.id, self.deadline_unix_ms(deadline));
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
        let commit = {
            let mut st = self.lock();
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
            self.remove_locked(&mut st, &[id], ChangeKind::InstanceDeregistered)
        };
        commit.wait().await?;
        self.inner.metrics.deregistrations.inc();
        Ok(())
    }

    /// Expires every given instance whose lease has run out by now; skips the others.
    /// Returns how many expired.
    pub async fn expire(&self, ids: &[InstanceId]) -> Result<usize, CatalogError> {
        let (n, commit) = {
            let mut st = self.lock();
            let now = self.now_ms();
            let due: Vec<InstanceId> = ids
                .iter()
                .filter(|id| {
                    st.instances
                        .get(*id)
                        .is_some_and(|i| i.lease.deadline_ms() <= now)
                })
                .cloned()
                .collect();
            if due.is_empty() {
                return Ok(0);
            }
            for id in &due {
                tracing::info!(instance = %id, "lease expired");
            }
            (
                due.len(),
                self.remove_locked(&mut st, &due, ChangeKind::InstanceExpired),
            )
        };
        commit.wait().await?;
        self.inner.metrics.expiries.inc_by(n as u64);
        Ok(n)
    }

    /// Sets an instance's health (active checks). No-op if unchanged or unknown.
    pub async fn set_health(&self, id: &str, health: Health) -> Result<(), CatalogError> {
        let commit = {
            let mut st = self.lock();
            let Some(inst) = st.instances.get(id).cloned() else {
                return Ok(());
            };
            if inst.health == health {
                return Ok(());
            }
            st.index += 1;
            let index = st.index;
            let new = Arc::new(Instance {
                health,
                ..Instance::clone(&inst)
            });
            let mut svc = Service::clone(&st.services[&inst.service]);
            if let Ok(pos) = svc.instances.binary_search_by(|i| i.id.cmp(&inst.id)) {
                svc.instances[pos] = new.clone();
            }
            svc.modify_index = index;
            st.instances.insert(inst.id.clone(), new);
            st.services.insert(inst.service.clone(), Arc::new(svc));
            self.publish(&st);
            let _ = self.inner.events.send(Change {
                index,
                kind: ChangeKind::HealthChanged,
                service: inst.service.clone(),
                instance: Some(inst.id.clone()),
            });
            // Health is not persisted: after a restart every instance starts passing and
            // active checks re-establish it.
            self.inner.store.apply(vec![StoreOp::SetIndex(index)])
        };
        commit.wait().await?;
        Ok(())
    }

    fn remove_locked(
        &self,
        st: &mut State,
        ids: &[InstanceId],
        kind: ChangeKind,
    ) -> crate::store::Commit {
        st.index += 1;
        let index = st.index;
        let now = self.now_ms();
        let mut ops = Vec::with_capacity(ids.len() + 3);
        let mut changes = Vec::with_capacity(ids.len() + 1);
        for id in ids {
            let Some(inst) = st.instances.remove(id) else {
                continue;
            };
            st.unindex_owner(&inst);
            if inst.pool_port {
                st.ports.release(inst.endpoint.port());
            }
            ops.push(StoreOp::DeleteInstance(id.clone()));
            changes.push(Change {
                index,
                kind,
                service: inst.service.clone(),
                instance: Some(id.clone()),
            });
            let Some(svc) = st.services.get(&inst.service) else {
                continue;
            };
            let mut svc = Service::clone(svc);
            if let Ok(pos) = svc.instances.binary_search_by(|i| i.id.cmp(id)) {
                svc.instances.remove(pos);
            }
            svc.modify_index = index;
            if svc.instances.is_empty() {
                st.services.remove(&svc.name);
                st.services_epoch += 1;
                st.by_vip.remove(&svc.vip);
                if let Some(until) = st.vips.release(svc.vip, now) {
                    ops.push(StoreOp::PutHold(VipHold {
                        vip: svc.vip,
                        name: svc.name.clone(),
                        until_unix_ms: self.deadline_unix_ms(until),
                    }));
                }
                ops.push(StoreOp::DeleteService(svc.name.clone()));
                changes.push(Change {
                    index,
                    kind: ChangeKind::ServiceRemoved,
                    service: svc.name.clone(),
                    instance: None,
                });
            } else {
                st.services.insert(svc.name.clone(), Arc::new(svc));
            }
        }
        ops.push(StoreOp::SetIndex(index));
        let commit = self.inner.store.apply(ops);
        self.publish(st);
        for c in changes {
            let _ = self.inner.events.send(c);
        }
        commit
    }

    /// Runs lease expiry until `shutdown`: a timer per lease deadline, and a sweep every
    /// `sweep_interval` as a backstop. Call once; later calls return at once.
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
                        .filter(|i| i.lease.deadline_ms() <= now)
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
