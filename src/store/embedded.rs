//! The durable embedded store: one redb file in the data dir.
//!
//! * **Group commit.** [`Store::apply`] only queues the batch on a channel and returns a
//!   [`Commit`]; a dedicated writer thread drains everything queued, writes it in one redb
//!   write transaction with [`Durability::Immediate`] (fsync before `commit` returns), then
//!   completes every waiting [`Commit`]. Concurrent registrations therefore share one fsync,
//!   and the catalog's lock is never held across disk I/O.
//! * **Lease renewals** are coalesced in memory (latest deadline per instance) and written
//!   at most once per `renew_flush` (1 s by default), in the next transaction, so the write
//!   rate stays bounded whatever the heartbeat rate. After a crash at most `renew_flush` of
//!   renewals is lost; the catalog gives every restored instance at least
//!   `restart_grace` (= `max_heartbeat_age`) anyway.
//! * **Tables:** `services` (name → JSON [`ServiceRecord`]), `instances` (id → JSON
//!   [`InstanceRecord`]), `leases` (id → newest persisted deadline, Unix ms), `holds`
//!   (VIP → JSON [`VipHold`]), `meta` (`format_version`, `index`).
//! * **Safety at open:** redb's file lock refuses a second process; a file that is not
//!   redb, a redb file of another program, or an unknown `format_version` is refused with
//!   a clear [`StoreError`]. Nothing is ever rewritten or truncated to "fix" a bad file.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition, TableError,
};
use tokio::sync::oneshot;

use super::{
    Commit, InstanceRecord, Persisted, ServiceRecord, Store, StoreError, StoreOp, VipHold,
};
use crate::catalog::InstanceId;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;
/// The store's file name inside the data dir.
pub const STORE_FILE: &str = "netsel.redb";
/// How often coalesced lease renewals are written, by default.
pub const DEFAULT_RENEW_FLUSH: Duration = Duration::from_secs(1);

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases");
const HOLDS: TableDefinition<&str, &[u8]> = TableDefinition::new("holds");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KEY_VERSION: &str = "format_version";
const KEY_INDEX: &str = "index";

/// Most queued messages one transaction takes, so a burst cannot make one commit huge.
const MAX_MESSAGES_PER_TXN: usize = 8192;
const RENEW_SHARDS: usize = 16;
/// A lingering commit waits at most this long for the next write to arrive...
const LINGER_GAP: Duration = Duration::from_micros(100);

/// ...and at most about one commit time in all, never more than the configured maximum.
fn max_linger(commit_ema: Duration, cap: Duration) -> Duration {
    commit_ema.min(cap)
}

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How often coalesced lease renewals are written (default 1 s).
    pub renew_flush: Duration,
    /// Longest a commit waits for more concurrent writes to join it (the wait is also
    /// capped at about one commit time). Default zero: never wait. Waiting makes commits
    /// fuller (fewer fsyncs) but leaves the disk idle meanwhile; without it, writers that
    /// arrive during a commit form the next one, so CPU work and fsync overlap, which
    /// measured as fast or faster (BENCHMARKS.md).
    pub max_linger: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            renew_flush: DEFAULT_RENEW_FLUSH,
            max_linger: Duration::ZERO,
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

enum Msg {
    Apply(Vec<StoreOp>, Reply),
    /// Write pending renewals now and answer when durable.
    Flush(Reply),
    Load(mpsc::Sender<Result<Persisted, StoreError>>),
    Close(mpsc::Sender<()>),
}

/// Latest renewal per instance, sharded so heartbeats on many threads rarely contend.
struct Renewals {
    shards: Vec<Mutex<HashMap<InstanceId, u64, BuildHasherDefault<IdHasher>>>>,
}

/// A cheap multiply-rotate hash (FxHash). Instance ids are random, chosen by the server,
/// so SipHash's protection against chosen keys buys nothing on this per-heartbeat path.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Renewals {
    fn new() -> Self {
        Renewals {
            shards: (0..RENEW_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn add(&self, id: &InstanceId, deadline: u64) {
        let hash = BuildHasherDefault::<IdHasher>::default().hash_one(id.as_str());
        let shard = (hash >> 60) as usize % RENEW_SHARDS;
        let mut map = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(id.as_str()) {
            Some(d) => *d = (*d).max(deadline),
            None => {
                map.insert(id.clone(), deadline);
            }
        }
    }

    fn take(&self) -> Vec<(InstanceId, u64)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            out.extend(map);
        }
        out
    }
}

/// The durable store: a redb database in the data dir, written by one thread.
pub struct EmbeddedStore {
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
    renewals: Arc<Renewals>,
    stats: Arc<StoreStats>,
    loaded: Mutex<Option<Persisted>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, creating the directory if needed, and reads
    /// everything it holds. Fails with a clear error if the directory cannot be written,
    /// another process has it open, or the file is not a NetSel store of this format.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        EmbeddedStore::open_with(dir, EmbeddedOptions::default())
    }

    /// [`open`](Self::open) with explicit options.
    pub fn open_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        // The store holds instance secrets: a new data dir is private to its owner.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                StoreError::Io(format!("cannot create data dir {}: {e}", dir.display()))
            })?;
        let path = dir.join(STORE_FILE);
        let shown = path.display().to_string();
        let (db, persisted) = guarded(&shown, || {
            let db = open_db(&path)?;
            if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(path = %shown, error = %e, "cannot make the store file private");
            }
            init_or_check(&db, &shown)?;
            let persisted = read_all(&db, &shown)?;
            Ok((db, persisted))
        })?;
        let (tx, rx) = mpsc::channel();
        let renewals = Arc::new(Renewals::new());
        let stats = Arc::new(StoreStats::default());
        let writer = std::thread::Builder::new()
            .name("netsel-store".into())
            .spawn({
                let renewals = renewals.clone();
                let shown = shown.clone();
                let stats = stats.clone();
                move || {
                    writer_loop(
                        db,
                        rx,
                        renewals,
                        options.renew_flush,
                        options.max_linger,
                        shown,
                        stats,
                    )
                }
            })
            .map_err(|e| StoreError::Io(format!("cannot start the store writer thread: {e}")))?;
        tracing::info!(path = %shown, services = persisted.services.len(),
            instances = persisted.instances.len(), index = persisted.index, "store opened");
        Ok(EmbeddedStore {
            path,
            tx,
            renewals,
            stats,
            loaded: Mutex::new(Some(persisted)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Reads a store that no process has open (for tools and tests), without keeping it
    /// open. Like [`open`](Self::open) it refuses a bad or foreign file; unlike it, it
    /// never creates anything: a missing store is an error.
    pub fn read(dir: impl AsRef<Path>) -> Result<Persisted, StoreError> {
        let path = dir.as_ref().join(STORE_FILE);
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(StoreError::Io(format!("no store at {shown}")));
        }
        guarded(&shown, || {
            let db = open_db(&path)?;
            init_or_check(&db, &shown)?;
            read_all(&db, &shown)
        })
    }

    /// What the writer thread has done so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes pending lease renewals now and waits until they are durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(StoreError::Io)
    }
}

/// Runs `f`, turning a panic inside redb (debug builds assert on some corrupt files) into
/// a [`StoreError::Corrupt`] instead of taking the process down.
fn guarded<T>(shown: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("internal error");
            Err(StoreError::Corrupt(format!(
                "{shown} cannot be read ({what}); move it away to start empty"
            )))
        }
    }
}

fn open_db(path: &Path) -> Result<Database, StoreError> {
    let shown = path.display();
    // Verify every page's checksum at open: a file damaged outside redb is then refused
    // with `Corrupted` instead of being trusted (a plain open may panic on one). It reads
    // the whole file once; 100,000 instances still start well under a second.
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    builder.create(path).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(
            path.parent()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| shown.to_string()),
        ),
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::NotAStore(format!(
                "{shown} is not a NetSel store (not a redb database: {io}); \
                 move it away or choose another data dir"
            ))
        }
        DatabaseError::Storage(StorageError::Io(io)) => {
            StoreError::Io(format!("cannot open {shown}: {io}"))
        }
        DatabaseError::Storage(StorageError::Corrupted(why)) => {
            StoreError::Corrupt(format!("{shown} is corrupt: {why}"))
        }
        DatabaseError::UpgradeRequired(v) => StoreError::NotAStore(format!(
            "{shown} is a redb file of an older file format ({v}), not written by this netsel"
        )),
        other => StoreError::Io(format!("cannot open {shown}: {other}")),
    })
}

fn db_err(shown: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{shown}: {e}"))
}

/// Checks the format version, or initializes an empty database.
fn init_or_check(db: &Database, shown: &str) -> Result<(), StoreError> {
    let rtx = db.begin_read().map_err(|e| db_err(shown, e))?;
    match rtx.open_table(META) {
        Ok(meta) => {
            let version = meta
                .get(KEY_VERSION)
                .map_err(|e| db_err(shown, e))?
                .map(|v| v.value());
            match version {
                Some(FORMAT_VERSION) => Ok(()),
                Some(found) => Err(StoreError::UnsupportedVersion {
                    path: shown.to_string(),
                    found,
                    supported: FORMAT_VERSION,
                }),
                None => Err(StoreError::NotAStore(format!(
                    "{shown} has no NetSel format version; it was not written by netsel"
                ))),
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {
            let tables = rtx.list_tables().map_err(|e| db_err(shown, e))?.count();
            if tables > 0 {
                return Err(StoreError::NotAStore(format!(
                    "{shown} is a redb database of another program ({tables} foreign tables)"
                )));
            }
            drop(rtx);
            let wtx = db.begin_write().map_err(|e| db_err(shown, e))?;
            {
                let mut meta = wtx.open_table(META).map_err(|e| db_err(shown, e))?;
                meta.insert(KEY_VERSION, FORMAT_VERSION)
                    .map_err(|e| db_err(shown, e))?;
                meta.insert(KEY_INDEX, 0).map_err(|e| db_err(shown, e))?;
                wtx.open_table(SERVICES).map_err(|e| db_err(shown, e))?;
                wtx.open_table(INSTANCES).map_err(|e| db_err(shown, e))?;
                wtx.open_table(LEASES).map_err(|e| db_err(shown, e))?;
                wtx.open_table(HOLDS).map_err(|e| db_err(shown, e))?;
            }
            wtx.commit().map_err(|e| db_err(shown, e))?;
            tracing::info!(path = %shown, version = FORMAT_VERSION, "initialized a new store");
            Ok(())
        }
        Err(e) => Err(StoreError::NotAStore(format!(
            "{shown} is not a NetSel store: {e}"
        ))),
    }
}

fn read_all(db: &Database, shown: &str) -> Result<Persisted, StoreError> {
    let err = |e: &dyn std::fmt::Display| db_err(shown, e);
    let corrupt = |table: &str, key: &str, e: serde_json::Error| {
        StoreError::Corrupt(format!("{shown}: bad record {key:?} in {table}: {e}"))
    };
    let rtx = db.begin_read().map_err(|e| err(&e))?;
    let meta = rtx.open_table(META).map_err(|e| err(&e))?;
    let index = meta
        .get(KEY_INDEX)
        .map_err(|e| err(&e))?
        .map(|v| v.value())
        .unwrap_or(0);
    let mut out = Persisted {
        index,
        ..Persisted::default()
    };
    let services = rtx.open_table(SERVICES).map_err(|e| err(&e))?;
    for row in services.iter().map_err(|e| err(&e))? {
        let (k, v) = row.map_err(|e| err(&e))?;
        let r: ServiceRecord =
            serde_json::from_slice(v.value()).map_err(|e| corrupt("services", k.value(), e))?;
        out.services.push(r);
    }
    let leases = rtx.open_table(LEASES).map_err(|e| err(&e))?;
    let instances = rtx.open_table(INSTANCES).map_err(|e| err(&e))?;
    out.instances
        .reserve(instances.len().map_err(|e| err(&e))? as usize);
    for row in instances.iter().map_err(|e| err(&e))? {
        let (k, v) = row.map_err(|e| err(&e))?;
        let mut r: InstanceRecord =
            serde_json::from_slice(v.value()).map_err(|e| corrupt("instances", k.value(), e))?;
        if let Some(renewed) = leases.get(k.value()).map_err(|e| err(&e))? {
            r.deadline_unix_ms = r.deadline_unix_ms.max(renewed.value());
        }
        out.instances.push(r);
    }
    let holds = rtx.open_table(HOLDS).map_err(|e| err(&e))?;
    for row in holds.iter().map_err(|e| err(&e))? {
        let (k, v) = row.map_err(|e| err(&e))?;
        let h: VipHold =
            serde_json::from_slice(v.value()).map_err(|e| corrupt("holds", k.value(), e))?;
        out.holds.push(h);
    }
    Ok(out)
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("cannot encode a record: {e}"))
}

fn hold_key(ip: &IpAddr) -> String {
    ip.to_string()
}

/// Writes one transaction: every batch in order, then the renewals. Durable on `Ok`.
fn write_txn(
    db: &Database,
    batches: &[Vec<StoreOp>],
    renewals: &[(InstanceId, u64)],
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut wtx = db.begin_write().map_err(|x| e(&x))?;
    wtx.set_durability(Durability::Immediate)
        .map_err(|x| e(&x))?;
    {
        let mut services = wtx.open_table(SERVICES).map_err(|x| e(&x))?;
        let mut instances = wtx.open_table(INSTANCES).map_err(|x| e(&x))?;
        let mut leases = wtx.open_table(LEASES).map_err(|x| e(&x))?;
        let mut holds = wtx.open_table(HOLDS).map_err(|x| e(&x))?;
        let mut meta = wtx.open_table(META).map_err(|x| e(&x))?;
        let mut index = None;
        for op in batches.iter().flatten() {
            match op {
                StoreOp::PutService(r) => {
                    services
                        .insert(r.name.as_str(), json(r)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                StoreOp::DeleteService(name) => {
                    services.remove(name.as_str()).map_err(|x| e(&x))?;
                }
                StoreOp::PutInstance(r) => {
                    instances
                        .insert(r.id.as_str(), json(r)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                StoreOp::DeleteInstance(id) => {
                    instances.remove(id.as_str()).map_err(|x| e(&x))?;
                    leases.remove(id.as_str()).map_err(|x| e(&x))?;
                }
                StoreOp::PutHold(h) => {
                    holds
                        .insert(hold_key(&h.vip).as_str(), json(h)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                StoreOp::DeleteHold(ip) => {
                    holds.remove(hold_key(ip).as_str()).map_err(|x| e(&x))?;
                }
                StoreOp::SetIndex(i) => index = Some(*i),
            }
        }
        if let Some(i) = index {
            meta.insert(KEY_INDEX, i).map_err(|x| e(&x))?;
        }
        for (id, deadline) in renewals {
            // A renewal that raced with a deregistration must not bring the lease back.
            if instances.get(id.as_str()).map_err(|x| e(&x))?.is_some() {
                leases.insert(id.as_str(), *deadline).map_err(|x| e(&x))?;
            }
        }
    }
    wtx.commit().map_err(|x| e(&x))
}

/// Counters of the writer thread, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct StoreStats {
    commits: AtomicU64,
    batches: AtomicU64,
    renewals: AtomicU64,
    commit_micros: AtomicU64,
}

/// A copy of [`StoreStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Write transactions committed (each one fsync).
    pub commits: u64,
    /// Catalog batches written (one per acknowledged write).
    pub batches: u64,
    /// Lease renewals written.
    pub renewals: u64,
    /// Total time spent in write transactions, microseconds.
    pub commit_micros: u64,
}

impl StoreStats {
    fn record(&self, batches: usize, renewals: usize, took: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches as u64, Ordering::Relaxed);
        self.renewals.fetch_add(renewals as u64, Ordering::Relaxed);
        self.commit_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            commits: self.commits.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
            commit_micros: self.commit_micros.load(Ordering::Relaxed),
        }
    }
}

fn writer_loop(
    db: Database,
    rx: mpsc::Receiver<Msg>,
    renewals: Arc<Renewals>,
    renew_flush: Duration,
    linger_cap: Duration,
    shown: String,
    stats: Arc<StoreStats>,
) {
    let mut last_renew = Instant::now();
    let mut commit_ema = Duration::ZERO;
    let mut failed: Option<String> = None;
    let mut last_batches = 0usize;
    let mut batches: Vec<Vec<StoreOp>> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    loop {
        let wait = renew_flush.saturating_sub(last_renew.elapsed());
        let mut flush_now = false;
        let mut loads = Vec::new();
        let mut close = None;
        let mut disconnected = false;
        let mut handle = |m: Msg, batches: &mut Vec<Vec<StoreOp>>, replies: &mut Vec<Reply>| match m
        {
            Msg::Apply(ops, reply) => {
                batches.push(ops);
                replies.push(reply);
            }
            Msg::Flush(reply) => {
                flush_now = true;
                replies.push(reply);
            }
            Msg::Load(reply) => loads.push(reply),
            Msg::Close(done) => close = Some(done),
        };
        match rx.recv_timeout(wait) {
            Ok(m) => handle(m, &mut batches, &mut replies),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => disconnected = true,
        }
        // Group commit: take everything already queued into this transaction. With
        // `max_linger` set and writes arriving concurrently (the last commit carried several
        // batches), linger while more keep coming, a bounded moment, so the writers answered
        // by the last commit join this one. A lone writer never waits.
        let linger_until = (last_batches > 1 && !linger_cap.is_zero())
            .then(|| Instant::now() + max_linger(commit_ema, linger_cap));
        let mut taken = 1;
        while taken < MAX_MESSAGES_PER_TXN {
            let m = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => {
                    let Some(until) = linger_until else { break };
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || batches.is_empty() {
                        break;
                    }
                    match rx.recv_timeout(left.min(LINGER_GAP)) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            };
            handle(m, &mut batches, &mut replies);
            taken += 1;
        }
        let stopping = close.is_some() || disconnected;
        let renew = if flush_now || stopping || last_renew.elapsed() >= renew_flush {
            last_renew = Instant::now();
            renewals.take()
        } else {
            Vec::new()
        };
        if !batches.is_empty() || !renew.is_empty() || !replies.is_empty() {
            let result = if let Some(why) = &failed {
                // Fail-stop: nothing is written after a failed commit, so no acknowledged
                // write can depend on one that was lost.
                Err(format!("an earlier commit failed ({why}); restart netsel"))
            } else if batches.is_empty() && renew.is_empty() {
                Ok(())
            } else {
                let started = Instant::now();
                let r = write_txn(&db, &batches, &renew);
                let took = started.elapsed();
                stats.record(batches.len(), renew.len(), took);
                commit_ema = (commit_ema * 7 + took) / 8;
                last_batches = batches.len();
                r
            };
            if let (Err(e), None) = (&result, &failed) {
                tracing::error!(path = %shown, error = %e, batches = batches.len(),
                    "store commit failed; the waiting writes are not acknowledged, and the \
                     store refuses every later write until netsel restarts");
                failed = Some(e.clone());
            }
            for reply in replies.drain(..) {
                let _ = reply.send(result.clone());
            }
            batches.clear();
        }
        for reply in loads {
            let _ = reply.send(read_all(&db, &shown));
        }
        if stopping {
            drop(db);
            tracing::info!(path = %shown, "store closed");
            if let Some(done) = close {
                let _ = done.send(());
            }
            return;
        }
    }
}

impl Store for EmbeddedStore {
    fn load(&self) -> Result<Persisted, StoreError> {
        if let Some(p) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Ok(p);
        }
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Msg::Load(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    fn apply(&self, batch: Vec<StoreOp>) -> Commit {
        if batch.is_empty() {
            return Commit::Done(Ok(()));
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Apply(batch, reply)).is_err() {
            return Commit::Done(Err(StoreError::Closed));
        }
        Commit::Pending(Box::pin(async move {
            match rx.await {
                Ok(r) => r.map_err(StoreError::Io),
                Err(_) => Err(StoreError::Closed),
            }
        }))
    }

    fn renew(&self, id: &InstanceId, deadline_unix_ms: u64) {
        self.renewals.add(id, deadline_unix_ms);
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    fn close(&self) {
        let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let (done, rx) = mpsc::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = rx.recv();
        }
        if writer.join().is_err() {
            tracing::error!(path = %self.path.display(), "store writer thread panicked");
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}
