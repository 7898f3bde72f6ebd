//! The catalog's in-memory state: instances with their shared leases, and services.
//! The names, ids, secrets and records they are built from live in [`crate::model`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::model::{AppProtocol, Check, Health, InstanceId, NodeId, Secret, ServiceName};

/// A lease: the deadline by which the instance must heartbeat. Shared between snapshots so
/// a heartbeat renews it with one atomic store and no new snapshot.
#[derive(Debug)]
pub struct Lease {
    /// Milliseconds since the catalog's clock epoch.
    deadline_ms: AtomicU64,
}

impl Lease {
    pub(crate) fn new(deadline_ms: u64) -> Self {
        Lease {
            deadline_ms: AtomicU64::new(deadline_ms),
        }
    }

    /// The deadline, in milliseconds of the catalog clock (see [`super::Catalog::now_ms`]).
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(Ordering::Acquire)
    }

    pub(crate) fn renew(&self, deadline_ms: u64) {
        // fetch_max: a late heartbeat never moves the deadline backwards.
        self.deadline_ms.fetch_max(deadline_ms, Ordering::AcqRel);
    }
}

/// The outcome of an instance's last active check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// Whether it passed.
    pub passing: bool,
    /// What was seen: `HTTP 200 from /healthz`, `connect 127.0.0.1:8000: connection
    /// refused`, `no answer within 2s`.
    pub output: String,
    /// When it ran, Unix milliseconds.
    pub checked_at_unix_ms: u64,
    /// How many checks in a row have had this outcome.
    pub consecutive: u32,
    /// Since when (Unix milliseconds) the instance has been failing its checks, while it
    /// fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since_unix_ms: Option<u64>,
}

/// One registered instance of a service. Immutable once in a snapshot, except for the
/// shared [`Lease`].
#[derive(Debug, Clone)]
pub struct Instance {
    /// Unique id.
    pub id: InstanceId,
    /// The service it belongs to.
    pub service: ServiceName,
    /// Where it really listens.
    pub endpoint: SocketAddr,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Balancing weight, at least 1.
    pub weight: u32,
    /// What it speaks.
    pub protocol: AppProtocol,
    /// Its active health check, if any.
    pub check: Option<Check>,
    /// How long it may stay critical before it is deregistered (none: the default of
    /// `[health] deregister_critical_after_secs`).
    pub deregister_critical_after: Option<Duration>,
    /// Lease TTL.
    pub ttl: Duration,
    /// For bare-name (seed) registrations: the peer IP that registered it, the only address
    /// from which a name-only heartbeat is accepted.
    pub owner_peer: Option<IpAddr>,
    /// Whether its port came from the port pool (and returns there when it goes).
    pub pool_port: bool,
    /// Current health.
    pub health: Health,
    /// Catalog index at which it was registered.
    pub registered_index: u64,
    /// Catalog index of its last change (in a cluster, its etcd key's `mod_revision`).
    pub modify_index: u64,
    /// The cluster node that holds its lease (none on a single node).
    pub owner: Option<NodeId>,
    pub(crate) secret: Secret,
    pub(crate) lease: Arc<Lease>,
}

impl Instance {
    /// Whether DNS and the proxies should use it.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Passing
    }

    /// Its lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Checks a claimed secret in constant time.
    pub fn secret_matches(&self, candidate: &str) -> bool {
        self.secret.matches(candidate)
    }
}

/// A service: a name, its VIP and service port, and its instances (sorted by id).
#[derive(Debug, Clone)]
pub struct Service {
    /// Canonical name.
    pub name: ServiceName,
    /// Virtual IP, stable for as long as the service exists.
    pub vip: IpAddr,
    /// The port it answers on at its VIP.
    pub port: u16,
    /// Catalog index at which it was created.
    pub created_index: u64,
    /// Catalog index of its last change.
    pub modify_index: u64,
    /// Instances, sorted by id. A persistent vector: a write clones O(log n), not the
    /// whole list, so registering into a service with thousands of instances stays cheap.
    pub instances: imbl::Vector<Arc<Instance>>,
}

impl Service {
    /// The instances that DNS answers and proxies route to.
    pub fn healthy(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.iter().filter(|i| i.is_healthy())
    }

    /// Number of healthy instances.
    pub fn healthy_count(&self) -> usize {
        self.healthy().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_never_moves_backwards() {
        let l = Lease::new(1000);
        l.renew(500);
        assert_eq!(l.deadline_ms(), 1000);
        l.renew(2000);
        assert_eq!(l.deadline_ms(), 2000);
    }
}
