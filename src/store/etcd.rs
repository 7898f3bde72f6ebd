//! The cluster store: several NetSel nodes share one catalog through etcd.
//!
//! * **Keys** (under the prefix, `/netsel` by default):
//!   `services/<name>` → the [`ServiceRecord`] (no lease; its `created_index` is the key's
//!   `create_revision`); `vips/<ip>` → the name, the uniqueness index of VIPs;
//!   `instances/<name>/<id>` → the [`InstanceRecord`] with its owning node, attached to an
//!   etcd lease of that node; `ports/<port>` → the instance id of a pool port, on the same
//!   lease; `nodes/<id>` → the node's addresses, on its first lease.
//! * **Writes** are transactions guarded by what the catalog's plan read ([`Expect`]): a
//!   service's first registration creates `services/<name>` and `vips/<ip>` only if
//!   neither exists, so one name never gets two VIPs and two names never share one; the
//!   loser of a race catches up with its view and plans again (reusing the winner's VIP).
//!   A write that timed out may have committed: its instance record carries the node and a
//!   request id, and is read back before the write is retried on another member.
//! * **Views**: each node lists the prefix, then watches from the next revision; the
//!   revision is the catalog index. A compacted revision means list again (a fold of the
//!   catalog's one apply over the listed records), never a gap.
//! * **Liveness**: heartbeats stay in the owning node's memory. Each node holds a few
//!   leases (at most `keys_per_lease` instances each: etcd 3.4 slows sharply when a key is
//!   put on a lease that holds many), keeps them alive, and expires an instance by deleting
//!   its key at the deadline. A dead node's leases run out and its instances leave every
//!   view. A lease found gone is granted anew and its instances put back.
//! * **Members**: one client per endpoint; an `Unavailable` (or timed-out) answer moves to
//!   the next member, since etcd-client does not take a dead member out of rotation
//!   (etcd-client issue #39). gRPC keep-alive pings are 10 s apart (etcd refuses pings
//!   more often than `--grpc-keepalive-min-time`, 5 s).
//!
//! Hand-written because it is NetSel's own: the mapping of catalog operations to keys and
//! transactions. The gRPC client is `etcd-client`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::settings::StoreSettings;
use super::{Cluster, Expect, Op, Proposal, ProposeError, Replica, StoreError, StoreHealth};
use crate::model::{InstanceId, InstanceRecord, NodeId, NodeInfo, ServiceName, ServiceRecord};

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: i64,
    keys: usize,
}

/// An instance this node holds: its lease and its record, to put back if the lease is
/// lost.
#[derive(Debug, Clone)]
struct Owned {
    lease: i64,
    record: InstanceRecord,
}

#[derive(Default)]
struct Leases {
    slots: Vec<Slot>,
    /// Instances on this node's leases.
    owned: HashMap<InstanceId, Owned>,
    /// Owned instances whose keys were deleted: by a deregistration elsewhere, or because
    /// their lease ran out. The next keep-alive tells which: if the lease lives, they are
    /// forgotten; if it is gone, they are put back on a new one.
    limbo: HashMap<InstanceId, Owned>,
}

#[derive(Default)]
struct Contact {
    last_ok: Option<Instant>,
    failing: Option<String>,
}

/// The etcd cluster store of one node.
pub struct EtcdCluster {
    settings: StoreSettings,
    node: NodeId,
    prefix: String,
    clients: Vec<Client>,
    current: AtomicUsize,
    leases: tokio::sync::Mutex<Leases>,
    contact: Mutex<Contact>,
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    progress_tx: mpsc::UnboundedSender<()>,
    progress_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    info: Mutex<NodeInfo>,
    /// Proposals waiting for a group commit, once the committers run.
    queue: Mutex<Option<mpsc::UnboundedSender<Job>>>,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why an etcd call failed.
enum CallError {
    /// Try another member (unreachable, no leader, timed out).
    Transient(String),
    /// The request itself is wrong; another member would say the same.
    Fatal(String),
}

impl CallError {
    fn message(&self) -> &str {
        match self {
            CallError::Transient(m) | CallError::Fatal(m) => m,
        }
    }
}

fn classify(e: etcd_client::Error) -> CallError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted => CallError::Transient(s.message().to_string()),
            _ => CallError::Fatal(format!("{}: {}", s.code(), s.message())),
        },
        E::TransportError(t) => CallError::Transient(t.to_string()),
        E::IoError(io) => CallError::Transient(io.to_string()),
        E::WatchError(w) => CallError::Transient(w),
        other => CallError::Fatal(other.to_string()),
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node id: the host name and a random suffix.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
}

impl EtcdCluster {
    /// Connects to etcd and checks that a member answers within the dial timeout. Nothing
    /// is written yet.
    pub async fn connect(settings: &StoreSettings) -> Result<Arc<EtcdCluster>, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.dial_timeout())
            .with_timeout(settings.request_timeout())
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if settings.tls() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &settings.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    StoreError::Io(format!("cannot read store.ca_file {}: {e}", ca.display()))
                })?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p)
                        .map_err(|e| StoreError::Io(format!("cannot read {}: {e}", p.display())))
                };
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let scheme = if settings.tls() { "https" } else { "http" };
        let mut clients = Vec::new();
        let mut reachable = false;
        let mut last_error = String::new();
        for ep in &settings.endpoints {
            let url = if ep.contains("://") {
                ep.clone()
            } else {
                format!("{scheme}://{ep}")
            };
            let attempt = tokio::time::timeout(
                settings.dial_timeout() + settings.request_timeout(),
                async {
                    let mut c = Client::connect([url.as_str()], Some(options.clone())).await?;
                    let probe = c.status().await;
                    Ok::<_, etcd_client::Error>((c, probe))
                },
            )
            .await;
            match attempt {
                Ok(Ok((c, probe))) => {
                    match probe {
                        Ok(_) => reachable = true,
                        Err(e) => last_error = format!("{ep}: {e}"),
                    }
                    clients.push(c);
                }
                Ok(Err(e)) => {
                    last_error = format!("{ep}: {e}");
                    // Authentication or TLS problems are the same on every member.
                    if matches!(classify(e), CallError::Fatal(_)) {
                        return Err(StoreError::Unavailable(format!(
                            "cannot connect to etcd: {last_error}"
                        )));
                    }
                }
                Err(_) => last_error = format!("{ep}: no answer within the dial timeout"),
            }
        }
        if !reachable || clients.is_empty() {
            let hint = if settings.tls() {
                "; with TLS, check [store] ca_file, cert_file and key_file"
            } else {
                ""
            };
            return Err(StoreError::Unavailable(format!(
                "no etcd member of {} answered ({last_error}){hint}",
                settings.endpoints.join(",")
            )));
        }
        let node: NodeId = settings
            .node_id
            .clone()
            .unwrap_or_else(default_node_id)
            .into();
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(EtcdCluster {
            settings: settings.clone(),
            prefix: format!("{}/", settings.prefix.trim_end_matches('/')),
            node,
            clients,
            current: AtomicUsize::new(0),
            leases: tokio::sync::Mutex::new(Leases::default()),
            contact: Mutex::new(Contact::default()),
            nodes: Mutex::new(BTreeMap::new()),
            progress_tx,
            progress_rx: Mutex::new(Some(progress_rx)),
            info: Mutex::new(NodeInfo::default()),
            queue: Mutex::new(None),
        }))
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join("/"));
        k
    }

    fn service_key(&self, name: &ServiceName) -> String {
        self.key(&["services", name.as_str()])
    }

    fn vip_key(&self, ip: std::net::IpAddr) -> String {
        self.key(&["vips", &ip.to_string()])
    }

    fn instance_key(&self, service: &ServiceName, id: &InstanceId) -> String {
        self.key(&["instances", service.as_str(), id.as_str()])
    }

    fn port_key(&self, port: u16) -> String {
        self.key(&["ports", &port.to_string()])
    }

    fn node_key(&self, node: &str) -> String {
        self.key(&["nodes", node])
    }

    fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Moves to the next member after `failed` answered badly (unless another task moved
    /// on already).
    fn next_member(&self, failed: usize) {
        let next = (failed + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn ok(&self) {
        let mut c = self.contact.lock().unwrap_or_else(|e| e.into_inner());
        c.last_ok = Some(Instant::now());
        c.failing = None;
    }

    fn failed(&self, why: &str) {
        let mut c = self.contact.lock().unwrap_or_else(|e| e.into_inner());
        if c.failing.is_none() {
            tracing::warn!(error = %why, "etcd is not answering");
        }
        c.failing = Some(why.to_string());
    }

    /// Runs `f` against the current member, moving to the next on a transient failure,
    /// until it succeeds or `deadline` passes.
    async fn call<T, F, Fut>(&self, deadline: tokio::time::Instant, f: F) -> Result<T, CallError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = String::from("no attempt made");
        loop {
            let (i, client) = self.client();
            match tokio::time::timeout_at(deadline, f(client)).await {
                Ok(Ok(v)) => {
                    self.ok();
                    return Ok(v);
                }
                Ok(Err(e)) => match classify(e) {
                    CallError::Transient(m) => {
                        last = m;
                        self.next_member(i);
                    }
                    fatal => return Err(fatal),
                },
                Err(_) => {
                    self.next_member(i);
                    let why = format!("timed out ({last})");
                    self.failed(&why);
                    return Err(CallError::Transient(why));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.failed(&last);
                return Err(CallError::Transient(last));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.settings.request_timeout()
    }

    /// Writes this node's entry (`nodes/<id>`) with its addresses.
    pub async fn announce(&self, info: NodeInfo) -> Result<(), StoreError> {
        *self.info.lock().unwrap_or_else(|e| e.into_inner()) = info.clone();
        let lease = self.lease_with_room(None).await.map_err(unavailable)?;
        let key = self.node_key(&self.node);
        let value = serde_json::to_vec(&info).map_err(|e| StoreError::Io(e.to_string()))?;
        self.call(self.deadline(), |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await
        .map_err(|e| unavailable(e.message().to_string()))?;
        Ok(())
    }

    /// A lease with room for one more key (`instance` keeps the one it is on), granting a
    /// new one when every lease is full.
    async fn lease_with_room(&self, instance: Option<&InstanceId>) -> Result<i64, String> {
        let mut leases = self.leases.lock().await;
        if let Some(id) = instance
            && let Some(o) = leases.owned.get(id)
        {
            return Ok(o.lease);
        }
        let max = self.settings.keys_per_lease;
        if let Some(slot) = leases.slots.iter_mut().find(|s| s.keys < max) {
            if instance.is_some() {
                slot.keys += 1;
            }
            return Ok(slot.id);
        }
        let ttl = self.settings.lease_ttl_secs as i64;
        let granted = self
            .call(self.deadline(), |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await
            .map_err(|e| e.message().to_string())?;
        let id = granted.id();
        tracing::info!(lease = id, ttl, "granted an etcd lease");
        leases.slots.push(Slot {
            id,
            keys: usize::from(instance.is_some()),
        });
        Ok(id)
    }

    /// The key an expectation is about.
    fn expect_key(&self, e: &Expect) -> String {
        match e {
            Expect::ServiceAbsent(name) | Expect::ServiceIs(name, _) => self.service_key(name),
            Expect::VipFree(ip) => self.vip_key(*ip),
            Expect::PortFree(port) => self.port_key(*port),
            Expect::InstanceIs { service, id, .. } => self.instance_key(service, id),
        }
    }

    fn compare(&self, e: &Expect) -> Compare {
        match e {
            Expect::ServiceAbsent(name) => {
                Compare::create_revision(self.service_key(name), CompareOp::Equal, 0)
            }
            Expect::ServiceIs(name, created) => {
                Compare::create_revision(self.service_key(name), CompareOp::Equal, *created as i64)
            }
            Expect::VipFree(ip) => Compare::create_revision(self.vip_key(*ip), CompareOp::Equal, 0),
            Expect::PortFree(port) => {
                Compare::create_revision(self.port_key(*port), CompareOp::Equal, 0)
            }
            Expect::InstanceIs {
                service,
                id,
                modify_index,
                ..
            } => Compare::mod_revision(
                self.instance_key(service, id),
                CompareOp::Equal,
                *modify_index as i64,
            ),
        }
    }

    /// A proposal as the parts of an etcd transaction: its compares, its operations, the
    /// reads that explain a failed compare, every key it touches, and the instance records
    /// it puts on this node's leases.
    async fn transaction(&self, p: &Proposal) -> Result<Parts, ProposeError> {
        let mut parts = Parts {
            compares: Vec::with_capacity(p.expect.len()),
            ops: Vec::with_capacity(p.ops.len() + 2),
            reads: Vec::with_capacity(p.expect.len()),
            keys: Vec::with_capacity(p.expect.len() + p.ops.len() + 2),
            puts: Vec::new(),
        };
        for e in &p.expect {
            let key = self.expect_key(e);
            parts.compares.push(self.compare(e));
            parts.reads.push(TxnOp::get(key.clone(), None));
            parts.keys.push(key);
        }
        for op in &p.ops {
            match op {
                Op::PutService(r) => {
                    let rec = ServiceRecord {
                        created_index: 0,
                        ..r.clone()
                    };
                    let (service, vip) = (self.service_key(&r.name), self.vip_key(r.vip));
                    parts
                        .ops
                        .push(TxnOp::put(service.clone(), json(&rec)?, None));
                    parts
                        .ops
                        .push(TxnOp::put(vip.clone(), r.name.as_str(), None));
                    parts.keys.extend([service, vip]);
                }
                Op::PutInstance(r) => {
                    if r.owner.as_ref() != Some(&self.node) {
                        // Only the owner writes an instance, on its own lease.
                        return Err(ProposeError::Unavailable(format!(
                            "instance {} is not this node's to write",
                            r.id
                        )));
                    }
                    let lease = self
                        .lease_with_room(Some(&r.id))
                        .await
                        .map_err(ProposeError::Unavailable)?;
                    let with_lease = Some(PutOptions::new().with_lease(lease));
                    let key = self.instance_key(&r.service, &r.id);
                    parts
                        .ops
                        .push(TxnOp::put(key.clone(), json(r)?, with_lease.clone()));
                    parts.keys.push(key);
                    if r.pool_port {
                        let port = self.port_key(r.endpoint.port());
                        parts
                            .ops
                            .push(TxnOp::put(port.clone(), r.id.as_str(), with_lease));
                        parts.keys.push(port);
                    }
                    parts.puts.push((lease, r.clone()));
                }
                Op::DeleteInstance(id) => {
                    let Some((service, pool_port)) = p.expect.iter().find_map(|e| match e {
                        Expect::InstanceIs {
                            service,
                            id: i,
                            pool_port,
                            ..
                        } if i == id => Some((service, *pool_port)),
                        _ => None,
                    }) else {
                        return Err(ProposeError::Unavailable(format!(
                            "removing {id} needs its service"
                        )));
                    };
                    let key = self.instance_key(service, id);
                    parts.ops.push(TxnOp::delete(key.clone(), None));
                    parts.keys.push(key);
                    if let Some(port) = pool_port {
                        let port = self.port_key(port);
                        parts.ops.push(TxnOp::delete(port.clone(), None));
                        parts.keys.push(port);
                    }
                }
                Op::DeleteService(name) => {
                    let key = self.service_key(name);
                    parts.ops.push(TxnOp::delete(key.clone(), None));
                    parts.keys.push(key);
                }
                // Holds, health alone and the index are not kept as keys in a cluster: a
                // service record outlives its last instance by the hold, health is in the
                // instance record, and the index is the revision.
                Op::PutHold(_) | Op::DeleteHold(_) | Op::SetIndex(_) | Op::SetHealth { .. } => {}
            }
        }
        Ok(parts)
    }

    /// Whether the write of `record` (carrying its request id) committed, and at which
    /// revision: read back after a timed-out attempt.
    async fn committed(
        &self,
        record: &InstanceRecord,
        deadline: tokio::time::Instant,
    ) -> Option<u64> {
        let key = self.instance_key(&record.service, &record.id);
        let got = self
            .call(deadline, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await
            .ok()?;
        let kv = got.kvs().first()?;
        let stored: InstanceRecord = serde_json::from_slice(kv.value()).ok()?;
        (stored.request.is_some() && stored.request == record.request)
            .then_some(kv.mod_revision() as u64)
    }

    async fn remember(&self, p: &Proposal, puts: Vec<(i64, InstanceRecord)>) {
        let mut leases = self.leases.lock().await;
        for op in &p.ops {
            if let Op::DeleteInstance(id) = op
                && let Some(o) = leases.owned.remove(id)
            {
                release_slot(&mut leases.slots, o.lease);
            }
        }
        for (lease, record) in puts {
            leases
                .owned
                .insert(record.id.clone(), Owned { lease, record });
        }
    }

    /// Lists the prefix: the revision, and the services and instances in it.
    /// Lists the prefix at one revision, in pages of [`LIST_PAGE`] keys (a large catalog
    /// would exceed gRPC's message limit in one answer): the revision, and the services
    /// and instances in it.
    #[allow(clippy::type_complexity)]
    async fn list(&self) -> Result<(u64, Vec<ServiceRecord>, Vec<(u64, InstanceRecord)>), String> {
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut services = Vec::new();
        let mut instances = Vec::new();
        let mut nodes = BTreeMap::new();
        loop {
            let (key, end_key) = (from.clone(), end.clone());
            let page = self
                .call(self.deadline() + Duration::from_secs(8), |mut c| {
                    let (key, end_key) = (key.clone(), end_key.clone());
                    let mut options = GetOptions::new().with_range(end_key).with_limit(LIST_PAGE);
                    if revision > 0 {
                        options = options.with_revision(revision);
                    }
                    async move { c.get(key, Some(options)).await }
                })
                .await
                .map_err(|e| e.message().to_string())?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                match self.decode(kv) {
                    Decoded::Service(s) => services.push(s),
                    Decoded::Instance(i) => instances.push((kv.mod_revision() as u64, i)),
                    Decoded::Node(n) => {
                        nodes.insert(n.id.clone(), n);
                    }
                    Decoded::Other | Decoded::Bad => {}
                }
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
        Ok((revision as u64, services, instances))
    }

    fn decode(&self, kv: &KeyValue) -> Decoded {
        let Some(rest) = kv.key().strip_prefix(self.prefix.as_bytes()) else {
            return Decoded::Other;
        };
        let Ok(rest) = std::str::from_utf8(rest) else {
            return Decoded::Other;
        };
        let bad = |e: serde_json::Error| {
            tracing::warn!(key = rest, error = %e, "unreadable record in etcd; ignored");
            Decoded::Bad
        };
        if rest.starts_with("services/") {
            match serde_json::from_slice::<ServiceRecord>(kv.value()) {
                Ok(s) => Decoded::Service(ServiceRecord {
                    created_index: kv.create_revision() as u64,
                    ..s
                }),
                Err(e) => bad(e),
            }
        } else if rest.starts_with("instances/") {
            match serde_json::from_slice::<InstanceRecord>(kv.value()) {
                Ok(i) => Decoded::Instance(i),
                Err(e) => bad(e),
            }
        } else if rest.starts_with("nodes/") {
            match serde_json::from_slice::<NodeInfo>(kv.value()) {
                Ok(n) => Decoded::Node(n),
                Err(e) => bad(e),
            }
        } else {
            Decoded::Other
        }
    }

    /// The operation a deleted key stands for.
    fn deleted(&self, key: &[u8]) -> Option<Op> {
        let rest = std::str::from_utf8(key.strip_prefix(self.prefix.as_bytes())?).ok()?;
        let mut parts = rest.split('/');
        match (parts.next()?, parts.next(), parts.next()) {
            ("services", Some(name), None) => ServiceName::new(name).ok().map(Op::DeleteService),
            ("instances", Some(_), Some(id)) => Some(Op::DeleteInstance(InstanceId::from(id))),
            ("nodes", Some(node), None) => {
                self.nodes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(node);
                None
            }
            _ => None,
        }
    }

    /// Lists, then watches, feeding `catalog`, until `shutdown`. The first list is done
    /// before this returns the task; a compacted revision lists again.
    pub async fn sync(self: &Arc<Self>, catalog: &dyn Replica) -> Result<u64, StoreError> {
        let (revision, services, instances) = self.list().await.map_err(unavailable)?;
        catalog.reset(revision, services, instances);
        self.reconcile_owned(catalog).await;
        Ok(revision)
    }

    /// Runs the watch, the lease keep-alives and the janitor until `shutdown`.
    pub fn spawn(
        self: &Arc<Self>,
        catalog: Arc<dyn Replica>,
        from: u64,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) {
        self.start_committers(tasks, &shutdown);
        tasks.spawn({
            let this = self.clone();
            let (catalog, shutdown) = (catalog.clone(), shutdown.clone());
            async move { this.watch_loop(catalog, from, shutdown).await }
        });
        tasks.spawn({
            let (this, shutdown) = (self.clone(), shutdown.clone());
            async move { this.keepalive_loop(shutdown).await }
        });
        tasks.spawn({
            let this = self.clone();
            async move { this.janitor_loop(catalog, shutdown).await }
        });
    }

    async fn watch_loop(
        self: Arc<Self>,
        catalog: Arc<dyn Replica>,
        mut from: u64,
        shutdown: CancellationToken,
    ) {
        let Some(mut progress_rx) = self
            .progress_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut relist = false;
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            if relist {
                match self.list().await {
                    Ok((revision, services, instances)) => {
                        tracing::info!(revision, "listed the cluster store again");
                        catalog.reset(revision, services, instances);
                        self.reconcile_owned(catalog.as_ref()).await;
                        from = revision + 1;
                        relist = false;
                    }
                    Err(e) => {
                        self.failed(&e);
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let (i, mut client) = self.client();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(from as i64)
                .with_progress_notify();
            let opened = tokio::time::timeout(
                self.settings.request_timeout(),
                client.watch(self.prefix.clone(), Some(options)),
            )
            .await;
            let stream = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.failed(classify(e).message());
                    self.next_member(i);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(_) => {
                    self.failed("opening the watch timed out");
                    self.next_member(i);
                    continue;
                }
            };
            let (mut sender, mut responses) = stream.split();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    Some(()) = progress_rx.recv() => {
                        while progress_rx.try_recv().is_ok() {}
                        let _ = sender.request_progress().await;
                        continue;
                    }
                    msg = responses.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => {
                        self.failed("the watch stream ended");
                        self.next_member(i);
                        break;
                    }
                    Err(e) => {
                        self.failed(classify(e).message());
                        self.next_member(i);
                        break;
                    }
                };
                self.ok();
                backoff = Duration::from_millis(100);
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            from,
                            compacted = resp.compact_revision(),
                            "the watch's revision was compacted; listing again"
                        );
                        relist = true;
                    } else {
                        self.failed(&format!("watch canceled: {}", resp.cancel_reason()));
                        self.next_member(i);
                    }
                    break;
                }
                if resp.created() && resp.events().is_empty() {
                    continue;
                }
                if resp.events().is_empty() {
                    // A progress notification: every event up to here was delivered.
                    if let Some(h) = resp.header() {
                        catalog.progress(h.revision() as u64);
                    }
                    continue;
                }
                let mut batch: Vec<Op> = Vec::new();
                let mut batch_rev = 0u64;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let rev = kv.mod_revision() as u64;
                    if rev != batch_rev && !batch.is_empty() {
                        self.deliver(catalog.as_ref(), batch_rev, std::mem::take(&mut batch))
                            .await;
                    }
                    batch_rev = rev;
                    match ev.event_type() {
                        EventType::Put => match self.decode(kv) {
                            Decoded::Service(s) => batch.push(Op::PutService(s)),
                            Decoded::Instance(i) => batch.push(Op::PutInstance(i)),
                            Decoded::Node(n) => {
                                self.nodes
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(n.id.clone(), n);
                            }
                            Decoded::Other | Decoded::Bad => {}
                        },
                        EventType::Delete => batch.extend(self.deleted(kv.key())),
                    }
                }
                if batch_rev > 0 {
                    self.deliver(catalog.as_ref(), batch_rev, batch).await;
                    from = batch_rev + 1;
                }
            }
        }
    }

    /// Applies one revision's operations: services first, then instances, then service
    /// deletions, so an instance always finds its service.
    async fn deliver(&self, catalog: &dyn Replica, revision: u64, mut ops: Vec<Op>) {
        ops.sort_by_key(|op| match op {
            Op::PutService(_) => 0,
            Op::DeleteService(_) => 2,
            _ => 1,
        });
        {
            let mut leases = self.leases.lock().await;
            for op in &ops {
                match op {
                    // Another node took one of ours over: it is no longer ours.
                    Op::PutInstance(r) if r.owner.as_ref() != Some(&self.node) => {
                        if let Some(o) = leases.owned.remove(&r.id) {
                            release_slot(&mut leases.slots, o.lease);
                        }
                        leases.limbo.remove(&r.id);
                    }
                    Op::DeleteInstance(id) => {
                        if let Some(o) = leases.owned.remove(id) {
                            leases.limbo.insert(id.clone(), o);
                        }
                    }
                    _ => {}
                }
            }
        }
        catalog.apply(revision, ops);
    }

    /// Brings the owned set in line with the view: instances another node took over are
    /// forgotten; instances the view says are ours but are not known here (a write whose
    /// answer was lost) are adopted.
    async fn reconcile_owned(&self, catalog: &dyn Replica) {
        let mut leases = self.leases.lock().await;
        let gone: Vec<InstanceId> = leases
            .owned
            .iter()
            .filter(|(id, _)| {
                catalog
                    .owner_of(id)
                    .is_some_and(|owner| owner.as_ref() != Some(&self.node))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(o) = leases.owned.remove(&id) {
                release_slot(&mut leases.slots, o.lease);
            }
        }
    }

    async fn keepalive_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.settings.lease_ttl_secs)
            .div_f64(3.0)
            .min(Duration::from_secs(1));
        let mut tick = ticker(every);
        while next_tick(&mut tick, &shutdown).await {
            let slots: Vec<i64> = self
                .leases
                .lock()
                .await
                .slots
                .iter()
                .map(|s| s.id)
                .collect();
            for lease in slots {
                let outcome = self
                    .call(self.deadline(), |mut c| async move {
                        match c.lease_keep_alive(lease).await {
                            Ok(_) => Ok(true),
                            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                            Err(e) => Err(e),
                        }
                    })
                    .await;
                match outcome {
                    Ok(true) => {
                        // The lease lives: its deleted keys were deregistrations.
                        let mut leases = self.leases.lock().await;
                        leases.limbo.retain(|_, o| o.lease != lease);
                    }
                    Ok(false) => self.lease_lost(lease).await,
                    Err(e) => {
                        tracing::debug!(lease, error = e.message(), "lease keep-alive failed");
                        break;
                    }
                }
            }
        }
    }

    /// A lease ran out (the node was cut off from etcd for longer than the TTL): grant a
    /// new one and put its instances back, unless another node has taken them meanwhile.
    async fn lease_lost(&self, lease: i64) {
        tracing::warn!(
            lease,
            "an etcd lease of this node is gone; putting its instances back"
        );
        let lost: Vec<Owned> = {
            let mut leases = self.leases.lock().await;
            leases.slots.retain(|s| s.id != lease);
            let mut lost: Vec<Owned> = leases
                .owned
                .extract_if(|_, o| o.lease == lease)
                .map(|(_, o)| o)
                .collect();
            lost.extend(
                leases
                    .limbo
                    .extract_if(|_, o| o.lease == lease)
                    .map(|(_, o)| o),
            );
            lost
        };
        let info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !info.id.is_empty()
            && let Err(e) = self.announce(info).await
        {
            tracing::warn!(error = %e, "announcing this node again");
        }
        for o in lost {
            let mut record = o.record;
            // The lease ran out with the key; the heartbeats did not stop: a fresh TTL.
            record.deadline_unix_ms = unix_now_ms() + record.ttl_ms;
            let key = self.instance_key(&record.service, &record.id);
            let p = Proposal {
                ops: vec![Op::PutInstance(record)],
                expect: Vec::new(),
            };
            let Ok(parts) = self.transaction(&p).await else {
                continue;
            };
            let puts = parts.puts;
            // Unless someone registered it again meanwhile (then that one stands).
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then(parts.ops);
            let done = self
                .call(self.deadline(), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await;
            if let Ok(r) = done
                && r.succeeded()
            {
                self.remember(&p, puts).await;
            }
        }
    }

    /// Collects service records whose VIP hold ran out, and keeps the owned set honest.
    async fn janitor_loop(self: Arc<Self>, catalog: Arc<dyn Replica>, shutdown: CancellationToken) {
        let hold = catalog.vip_hold();
        let every = (hold / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        let mut tick = ticker(every);
        while next_tick(&mut tick, &shutdown).await {
            for rec in catalog.expired_holds(hold) {
                self.collect(&rec).await;
            }
            self.reconcile_owned(catalog.as_ref()).await;
        }
    }

    /// Deletes a service record and its VIP key if it is still the same incarnation and
    /// has no instance: any node may run it, and several at once free it exactly once.
    async fn collect(&self, rec: &ServiceRecord) {
        let service = self.service_key(&rec.name);
        let instances = self.key(&["instances", rec.name.as_str(), ""]);
        let txn = Txn::new()
            .when([
                Compare::create_revision(
                    service.clone(),
                    CompareOp::Equal,
                    rec.created_index as i64,
                ),
                Compare::create_revision(instances, CompareOp::Equal, 0).with_prefix(),
            ])
            .and_then([
                TxnOp::delete(service, None),
                TxnOp::delete(self.vip_key(rec.vip), None),
            ]);
        match self
            .call(self.deadline(), |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
        {
            Ok(r) if r.succeeded() => {
                tracing::info!(service = %rec.name, vip = %rec.vip, "VIP hold ended; released");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(service = %rec.name, error = e.message(), "collecting a service")
            }
        }
    }
}

enum Decoded {
    Service(ServiceRecord),
    Instance(InstanceRecord),
    Node(NodeInfo),
    Other,
    Bad,
}

/// An interval that, after a late tick, waits a whole period again (no burst).
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick; false once `shutdown` is cancelled.
async fn next_tick(tick: &mut tokio::time::Interval, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tick.tick() => true,
    }
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 2000;

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn release_slot(slots: &mut [Slot], lease: i64) {
    if let Some(s) = slots.iter_mut().find(|s| s.id == lease) {
        s.keys = s.keys.saturating_sub(1);
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, ProposeError> {
    serde_json::to_vec(v).map_err(|e| ProposeError::Unavailable(format!("encoding a record: {e}")))
}

fn unavailable(why: impl Into<String>) -> StoreError {
    StoreError::Unavailable(why.into())
}

/// A proposal as the parts of an etcd transaction.
struct Parts {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    /// Reads of every compared key, run when a compare fails.
    reads: Vec<TxnOp>,
    /// Every key compared or written (a batch never holds two proposals on one key: etcd
    /// refuses a transaction that writes a key twice).
    keys: Vec<String>,
    puts: Vec<(i64, InstanceRecord)>,
}

/// A proposal waiting for a group commit.
struct Job {
    proposal: Proposal,
    parts: Parts,
    deadline: tokio::time::Instant,
    reply: tokio::sync::oneshot::Sender<Result<u64, ProposeError>>,
}

/// Most operations (and compares) in one transaction: etcd's `--max-txn-ops` default.
const MAX_TXN_OPS: usize = 128;
/// Transactions a node keeps in flight at once, each a group of proposals.
const COMMITTERS: usize = 4;

impl EtcdCluster {
    /// Commits one proposal on its own: retried on other members until `deadline`, and
    /// read back after an attempt that timed out (it may have committed).
    async fn commit_one(
        &self,
        p: &Proposal,
        parts: Parts,
        deadline: tokio::time::Instant,
    ) -> Result<u64, ProposeError> {
        // Leave time to read back an attempt that timed out.
        let attempt_deadline = deadline - (self.settings.request_timeout() / 4);
        let Parts {
            compares,
            ops,
            reads,
            puts,
            ..
        } = parts;
        // When a compare fails, read what it compared, so the node knows which revision
        // its view must reach before planning again.
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let mut last;
        loop {
            let (i, mut client) = self.client();
            match tokio::time::timeout_at(attempt_deadline, client.txn(txn.clone())).await {
                Ok(Ok(resp)) => {
                    self.ok();
                    let revision = resp.header().map_or(0, |h| h.revision()) as u64;
                    if resp.succeeded() {
                        self.remember(p, puts).await;
                        return Ok(revision);
                    }
                    let seen = resp
                        .op_responses()
                        .into_iter()
                        .filter_map(|r| match r {
                            etcd_client::TxnOpResponse::Get(g) => {
                                g.kvs().iter().map(|kv| kv.mod_revision() as u64).max()
                            }
                            _ => None,
                        })
                        .max()
                        .unwrap_or(0);
                    // Let the watch confirm it has delivered everything up to here.
                    let _ = self.progress_tx.send(());
                    return Err(ProposeError::Conflict { revision, seen });
                }
                Ok(Err(e)) => match classify(e) {
                    CallError::Transient(m) => {
                        last = m;
                        self.next_member(i);
                    }
                    CallError::Fatal(m) => return Err(ProposeError::Unavailable(m)),
                },
                Err(_) => {
                    last = format!("no answer within {:?}", self.settings.request_timeout());
                    self.next_member(i);
                }
            }
            // The attempt may have committed: read back before trying again.
            for (_, record) in &puts {
                if let Some(revision) = self.committed(record, deadline).await {
                    self.remember(p, puts.clone()).await;
                    return Ok(revision);
                }
            }
            if tokio::time::Instant::now() >= attempt_deadline {
                self.failed(&last);
                return Err(ProposeError::Unavailable(last));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Group commit: concurrent proposals on disjoint keys go to etcd as one transaction
    /// (etcd's cost is per transaction, not per key), a few transactions in flight. A
    /// group whose compares fail is committed proposal by proposal, so one lost race
    /// never fails the others.
    fn start_committers(
        self: &Arc<Self>,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        for _ in 0..COMMITTERS {
            let (this, rx, shutdown) = (self.clone(), rx.clone(), shutdown.clone());
            tasks.spawn(async move {
                let mut held: Option<Job> = None;
                loop {
                    let mut group: Vec<Job> = Vec::new();
                    // A job held back from the last group goes first, without waiting for
                    // the queue (another committer may be parked on it).
                    let first = match held.take() {
                        Some(j) => j,
                        None => {
                            let mut queue = rx.lock().await;
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                j = queue.recv() => match j {
                                    Some(j) => j,
                                    None => break,
                                },
                            }
                        }
                    };
                    let mut keys: std::collections::HashSet<String> =
                        first.parts.keys.iter().cloned().collect();
                    let (mut ops, mut compares) =
                        (first.parts.ops.len(), first.parts.compares.len());
                    group.push(first);
                    if let Ok(mut queue) = rx.try_lock() {
                        while let Ok(j) = queue.try_recv() {
                            let fits = ops + j.parts.ops.len() <= MAX_TXN_OPS
                                && compares + j.parts.compares.len() <= MAX_TXN_OPS;
                            if !fits || j.parts.keys.iter().any(|k| keys.contains(k)) {
                                held = Some(j);
                                break;
                            }
                            ops += j.parts.ops.len();
                            compares += j.parts.compares.len();
                            keys.extend(j.parts.keys.iter().cloned());
                            group.push(j);
                        }
                    }
                    this.commit_group(group).await;
                }
                // Stopping: whatever waits is told so.
                if let Some(j) = held {
                    let _ = j.reply.send(Err(ProposeError::Unavailable(
                        "the node is stopping".into(),
                    )));
                }
            });
        }
    }

    async fn commit_group(&self, mut group: Vec<Job>) {
        if group.len() == 1 {
            let j = group.pop().expect("one job");
            let r = self.commit_one(&j.proposal, j.parts, j.deadline).await;
            let _ = j.reply.send(r);
            return;
        }
        let deadline = group.iter().map(|j| j.deadline).min().expect("a job");
        let attempt_deadline = deadline - (self.settings.request_timeout() / 4);
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for j in &group {
            compares.extend(j.parts.compares.iter().cloned());
            ops.extend(j.parts.ops.iter().cloned());
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let (i, mut client) = self.client();
        match tokio::time::timeout_at(attempt_deadline, client.txn(txn)).await {
            Ok(Ok(resp)) if resp.succeeded() => {
                self.ok();
                let revision = resp.header().map_or(0, |h| h.revision()) as u64;
                for j in group {
                    self.remember(&j.proposal, j.parts.puts).await;
                    let _ = j.reply.send(Ok(revision));
                }
                return;
            }
            Ok(Ok(_)) => self.ok(),
            Ok(Err(e)) => {
                if matches!(classify(e), CallError::Transient(_)) {
                    self.next_member(i);
                }
            }
            Err(_) => self.next_member(i),
        }
        // A compare failed, or the attempt did: each proposal on its own (a timed-out
        // attempt may have committed, which commit_one's read-back finds out).
        let each = group.into_iter().map(|j| async move {
            for (_, record) in &j.parts.puts {
                if let Some(revision) = self.committed(record, j.deadline).await {
                    self.remember(&j.proposal, j.parts.puts.clone()).await;
                    let _ = j.reply.send(Ok(revision));
                    return;
                }
            }
            let r = self.commit_one(&j.proposal, j.parts, j.deadline).await;
            let _ = j.reply.send(r);
        });
        futures_util::future::join_all(each).await;
    }
}

#[async_trait::async_trait]
impl Cluster for EtcdCluster {
    fn node(&self) -> &NodeId {
        &self.node
    }

    async fn propose(&self, p: Proposal) -> Result<u64, ProposeError> {
        let deadline = self.deadline();
        let parts = self.transaction(&p).await?;
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(queue) = queue else {
            return self.commit_one(&p, parts, deadline).await;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            proposal: p,
            parts,
            deadline,
            reply,
        };
        if let Err(mpsc::error::SendError(job)) = queue.send(job) {
            return self.commit_one(&job.proposal, job.parts, deadline).await;
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ProposeError::Unavailable("the node is stopping".into())))
    }

    fn describe(&self) -> String {
        format!(
            "etcd:{}{}",
            self.settings.endpoints.join(","),
            self.prefix.trim_end_matches('/')
        )
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn health(&self) -> StoreHealth {
        let c = self.contact.lock().unwrap_or_else(|e| e.into_inner());
        StoreHealth {
            degraded: c.failing.is_some(),
            view_age: c.last_ok.map(|t| t.elapsed()),
            detail: c.failing.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/netsel/"), b"/netsel0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
