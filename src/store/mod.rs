//! Persistence behind the catalog.
//!
//! The catalog is the source of truth in memory; a [`Store`] makes its changes durable.
//! The catalog hands the store batches of [`StoreOp`]s in the order it applied them, and
//! waits for [`Commit`] before acknowledging a registration or deregistration. Lease
//! renewals go through [`Store::renew`], which a durable store may batch.
//!
//! [`MemoryStore`] keeps nothing; a durable store loads what it kept in [`Store::load`].
//! [`embedded::EmbeddedStore`] is the durable store (redb), used by `netsel serve`.

pub mod embedded;
pub mod wal;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::catalog::{InstanceId, Secret, ServiceName};
use crate::protocol::{AppProtocol, Check};

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

/// A service as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Name.
    pub name: ServiceName,
    /// Its VIP.
    pub vip: IpAddr,
    /// Its port on the VIP.
    pub port: u16,
    /// Catalog index at creation.
    pub created_index: u64,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Id.
    pub id: InstanceId,
    /// Service.
    pub service: ServiceName,
    /// Endpoint.
    pub endpoint: SocketAddr,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Weight.
    pub weight: u32,
    /// Protocol.
    pub protocol: AppProtocol,
    /// Active health check.
    #[serde(default)]
    pub check: Option<Check>,
    /// Lease TTL in milliseconds.
    pub ttl_ms: u64,
    /// Registering peer for bare-name registrations.
    pub owner_peer: Option<IpAddr>,
    /// Whether the port came from the pool.
    pub pool_port: bool,
    /// Owner secret.
    pub secret: Secret,
    /// Catalog index at registration.
    pub registered_index: u64,
    /// Lease deadline as wall-clock Unix milliseconds.
    pub deadline_unix_ms: u64,
}

/// A VIP held back after its service went away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipHold {
    /// The address.
    pub vip: IpAddr,
    /// Who had it.
    pub name: ServiceName,
    /// Held until (wall-clock Unix milliseconds).
    pub until_unix_ms: u64,
}

/// One change, in catalog order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Create or replace a service.
    PutService(ServiceRecord),
    /// Remove a service.
    DeleteService(ServiceName),
    /// Create or replace an instance.
    PutInstance(InstanceRecord),
    /// Remove an instance.
    DeleteInstance(InstanceId),
    /// Record a VIP hold.
    PutHold(VipHold),
    /// Drop a VIP hold (the address was reused or the hold ended).
    DeleteHold(IpAddr),
    /// The catalog index after this batch.
    SetIndex(u64),
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

/// Where the catalog's state is kept.
pub trait Store: Send + Sync + 'static {
    /// What was kept, read once at start-up.
    fn load(&self) -> Result<Persisted, StoreError>;

    /// Queues a batch of changes, in the order the catalog applied them. Called with the
    /// catalog's write lock held, so it must not block; the returned [`Commit`] is awaited
    /// after the lock is released.
    fn apply(&self, batch: Vec<StoreOp>) -> Commit;

    /// Records a lease renewal. Need not be durable at once; a store may batch these.
    fn renew(&self, id: &InstanceId, deadline_unix_ms: u64);

    /// A short description for logs (`memory`, `redb:/path`).
    fn describe(&self) -> String;

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

    fn apply(&self, _batch: Vec<StoreOp>) -> Commit {
        Commit::Done(Ok(()))
    }

    fn renew(&self, _id: &InstanceId, _deadline_unix_ms: u64) {}

    fn describe(&self) -> String {
        "memory".into()
    }
}
