//! Persistence behind the catalog.
//!
//! The catalog is the source of truth in memory; a [`Store`] makes its changes durable.
//! The catalog hands the store batches of [`Op`]s in the order it applied them, and
//! waits for [`Commit`] before acknowledging a registration or deregistration. Lease
//! renewals go through [`Store::renew`], which a durable store may batch.
//!
//! [`MemoryStore`] keeps nothing; a durable store loads what it kept in [`Store::load`].
//! [`embedded::EmbeddedStore`] is the durable store (redb), used by `netsel serve`.

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod settings;
pub mod wal;

pub use settings::StoreSettings;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use crate::model::{InstanceId, NodeId, NodeInfo, ServiceName};
pub use crate::model::{InstanceRecord, Op, ServiceRecord, VipHold};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O or database error.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The stored data cannot be read.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The store is shutting down or its writer has stopped.
    #[error("store is closed")]
    Closed,
    /// Another process (or another open store in this one) holds the data dir.
    #[error("data dir {0} is in use by another NetSel process (the store file is locked)")]
    Locked(String),
    /// The file is not a NetSel store: not a redb database, or one of another program.
    #[error("{0}")]
    NotAStore(String),
    /// The cluster store cannot be reached or cannot take writes.
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
    /// The store was written in an on-disk format this version does not understand.
    #[error(
        "store {path} has format version {found}; this netsel reads version {supported} \
         (use the netsel release that wrote it, or move the data dir away)"
    )]
    UnsupportedVersion {
        /// The store file.
        path: String,
        /// The version found on disk.
        found: u64,
        /// The version this build reads and writes.
        supported: u64,
    },
}

/// Everything a store kept, handed to the catalog at start-up.
#[derive(Debug, Clone, Default)]
pub struct Persisted {
    /// Last catalog index.
    pub index: u64,
    /// Services.
    pub services: Vec<ServiceRecord>,
    /// Instances.
    pub instances: Vec<InstanceRecord>,
    /// VIP holds.
    pub holds: Vec<VipHold>,
}

/// Resolves when a batch is durable.
pub enum Commit {
    /// Already durable (or nothing to wait for).
    Done(Result<(), StoreError>),
    /// Durable when this future resolves.
    Pending(Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>),
}

impl Commit {
    /// Waits until the batch is durable.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self {
            Commit::Done(r) => r,
            Commit::Pending(f) => f.await,
        }
    }
}

/// What a cluster write expects to find when it commits: the reads its plan was based
/// on. If any no longer holds, another node wrote first and the write is planned again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No service of this name exists.
    ServiceAbsent(ServiceName),
    /// The service exists and is the incarnation created at this index.
    ServiceIs(ServiceName, u64),
    /// No service has this VIP.
    VipFree(IpAddr),
    /// No instance has this pool port.
    PortFree(u16),
    /// The instance is as last changed at `modify_index` (with its pool port, if any,
    /// which the write moves or frees with it).
    InstanceIs {
        /// Its service.
        service: ServiceName,
        /// Its id.
        id: InstanceId,
        /// The index of its last change.
        modify_index: u64,
        /// Its pool port.
        pool_port: Option<u16>,
    },
}

/// A cluster write: operations to commit together, if what they expect holds.
#[derive(Debug, Clone)]
pub struct Proposal {
    /// The operations, in order.
    pub ops: Vec<Op>,
    /// What must hold for them to commit.
    pub expect: Vec<Expect>,
}

/// Why a cluster write did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    /// Something it expected had changed by `revision`: catch up and plan again.
    Conflict {
        /// The store's revision when the write was refused.
        revision: u64,
        /// The newest change to any key the write expected something of: once the view
        /// has applied it, planning again sees what made the write fail (0 when every
        /// such key is gone).
        seen: u64,
    },
    /// The store cannot take writes (unreachable, no quorum, timed out): nothing changed.
    Unavailable(String),
}

/// Whether a store can take writes, and how fresh this node's view of it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Writes fail now (a cluster store without quorum or out of reach).
    pub degraded: bool,
    /// Time since this node last heard from the cluster store (a cluster only).
    pub view_age: Option<std::time::Duration>,
    /// Why it is degraded.
    pub detail: Option<String>,
}

/// A store shared by several nodes (etcd): it commits guarded transactions, and each node
/// applies what was committed from its own list and watch
/// ([`crate::catalog::Catalog::reset_view`], [`crate::catalog::Catalog::apply_committed`]).
#[async_trait::async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// This node's id.
    fn node(&self) -> &NodeId;

    /// Commits `proposal` as one transaction; returns the revision it committed at.
    async fn propose(&self, proposal: Proposal) -> Result<u64, ProposeError>;

    /// A short description for logs (`etcd:http://127.0.0.1:2379/netsel`).
    fn describe(&self) -> String;

    /// Whether it can take writes now, and the view's age.
    fn health(&self) -> StoreHealth;

    /// The cluster's live nodes as this node's view has them.
    fn nodes(&self) -> Vec<NodeInfo>;
}

/// What a cluster store feeds: a node's view of the catalog. The catalog implements it;
/// the store never depends on the catalog itself.
pub trait Replica: Send + Sync + 'static {
    /// Replaces the view with a full list at `index`.
    fn reset(
        &self,
        index: u64,
        services: Vec<ServiceRecord>,
        instances: Vec<(u64, InstanceRecord)>,
    );
    /// Applies what was committed at `index`, in order.
    fn apply(&self, index: u64, ops: Vec<Op>);
    /// The watch reported progress up to `revision`.
    fn progress(&self, revision: u64);
    /// Who holds an instance's lease: `None` if the view has no such instance.
    fn owner_of(&self, id: &InstanceId) -> Option<Option<NodeId>>;
    /// Service records that have had no instance for at least `held`.
    fn expired_holds(&self, held: std::time::Duration) -> Vec<ServiceRecord>;
    /// How long a service's VIP is held after its last instance leaves.
    fn vip_hold(&self) -> std::time::Duration;
}

/// Where the catalog's state is kept.
pub trait Store: Send + Sync + 'static {
    /// What was kept, read once at start-up.
    fn load(&self) -> Result<Persisted, StoreError>;

    /// Queues a batch of changes, in the order the catalog applied them. Called with the
    /// catalog's write lock held, so it must not block; the returned [`Commit`] is awaited
    /// after the lock is released.
    fn apply(&self, batch: Vec<Op>) -> Commit;

    /// Records a lease renewal. Need not be durable at once; a store may batch these.
    fn renew(&self, id: &InstanceId, deadline_unix_ms: u64);

    /// A short description for logs (`memory`, `redb:/path`).
    fn describe(&self) -> String;

    /// Whether it can take writes (a store whose log write or checkpoint failed cannot:
    /// `/v1/health/ready` then answers 503).
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Registers the store's own metrics (names get the registry's `netsel_` prefix).
    /// Stores without any keep the default, which registers nothing.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    /// Flushes pending lease renewals, waits for queued batches, and releases the store
    /// (its file lock). Later batches fail with [`StoreError::Closed`]. Blocks briefly.
    fn close(&self) {}
}

/// A store that keeps nothing: state lives as long as the process.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn load(&self) -> Result<Persisted, StoreError> {
        Ok(Persisted::default())
    }

    fn apply(&self, _batch: Vec<Op>) -> Commit {
        Commit::Done(Ok(()))
    }

    fn renew(&self, _id: &InstanceId, _deadline_unix_ms: u64) {}

    fn describe(&self) -> String {
        "memory".into()
    }
}
