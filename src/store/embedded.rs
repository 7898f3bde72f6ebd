//! The durable embedded store: a write-ahead log in front of one redb file in the data dir.
//!
//! * **Acknowledged means in the log.** [`Store::apply`] queues the batch for the log
//!   writer thread, which takes everything queued, appends it to the write-ahead log
//!   ([`super::wal`]: two preallocated files, CRC-framed records) and `fdatasync`s once
//!   before completing every waiting [`Commit`]. Concurrent registrations share one small
//!   sequential write and one flush, and the catalog's lock is never held across disk I/O.
//! * **Checkpoints.** A second thread applies the logged batches to redb in one write
//!   transaction with [`Durability::Immediate`] at least once per `renew_flush` (1 s by
//!   default) and whenever the log needs a file back, recording the last applied record
//!   (`wal_seq`). At open, records newer than `wal_seq` are replayed into redb first, so a
//!   crash between a log write and its checkpoint loses nothing.
//! * **Lease renewals** are coalesced in memory (latest deadline per instance) and written
//!   with the checkpoint, so the write rate stays bounded whatever the heartbeat rate.
//!   After a crash at most `renew_flush` of renewals is lost; the catalog gives every
//!   restored instance at least `restart_grace` (= `max_heartbeat_age`) anyway.
//! * **Tables:** `services` (name → JSON [`ServiceRecord`]), `instances` (id → JSON
//!   [`InstanceRecord`]), `leases` (id → newest persisted deadline, Unix ms), `holds`
//!   (VIP → JSON [`VipHold`]), `meta` (`format_version`, `index`, `wal_seq`).
//! * **Safety at open:** redb's file lock refuses a second process; a file that is not
//!   redb, a redb file of another program, an unknown `format_version`, or a log with a
//!   gap is refused with a clear [`StoreError`]. Nothing is ever rewritten or truncated to
//!   "fix" a bad file. Version 1 stores (no log) are upgraded in place.

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

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition, TableError,
};
use tokio::sync::oneshot;

use super::wal::{self, Wal};
use super::{Commit, InstanceRecord, Op, Persisted, ServiceRecord, Store, StoreError, VipHold};
use crate::metrics::{LatencyHistogram, exponential_bounds};
use crate::model::InstanceId;

/// The on-disk format this build reads and writes (2: redb plus the write-ahead log).
pub const FORMAT_VERSION: u64 = 2;
/// The oldest format this build opens (and upgrades in place).
const OLDEST_READABLE: u64 = 1;
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
const KEY_WAL_SEQ: &str = "wal_seq";

/// Most queued messages one log write takes, so a burst cannot make one write huge.
const MAX_MESSAGES_PER_SYNC: usize = 8192;
/// Logged batches waiting for a checkpoint, at most (then one runs early).
const MAX_PENDING_BATCHES: usize = 100_000;
const RENEW_SHARDS: usize = 16;

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How often logged writes and coalesced lease renewals are checkpointed into redb
    /// (default 1 s).
    pub renew_flush: Duration,
    /// Size of each of the two write-ahead log files (default 16 MiB).
    pub wal_file_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            renew_flush: DEFAULT_RENEW_FLUSH,
            wal_file_bytes: wal::DEFAULT_WAL_FILE_BYTES,
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

enum Msg {
    Apply(Vec<Op>, Reply),
    /// Checkpoint now (with pending renewals) and answer when durable.
    Flush(Reply),
    Load(mpsc::Sender<Result<Persisted, StoreError>>),
    Close(mpsc::Sender<()>),
}

/// What the log writer tells the checkpointer, in log order.
enum CpMsg {
    /// Batches now durable in the log, the last of them in record `seq`.
    Logged(u64, Vec<Vec<Op>>),
    /// Batches too large for a log record: commit them straight into redb.
    Direct(Vec<Vec<Op>>, mpsc::Sender<Result<(), String>>),
    /// Checkpoint everything logged so far, then answer.
    Checkpoint(mpsc::Sender<Result<(), String>>),
    Flush(Reply),
    Load(mpsc::Sender<Result<Persisted, StoreError>>),
    Close(mpsc::Sender<()>),
}

/// What the log and checkpoint threads share: whether a log write or a checkpoint failed
/// (then no further write is acknowledged).
#[derive(Default)]
struct Progress {
    failed: Mutex<Option<String>>,
}

impl Progress {
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, why: &str) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why.to_string());
        }
    }
}

/// Latest renewal per instance, sharded so heartbeats on many threads rarely contend.
struct Renewals {
    shards: Vec<Mutex<HashMap<InstanceId, u64, BuildHasherDefault<IdHasher>>>>,
}

/// A cheap multiply-rotate hash (FxHash). Instance ids are chosen by the server, never by
/// a client, so SipHash's protection against chosen keys buys nothing on this per-heartbeat
/// path.
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
    progress: Arc<Progress>,
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
        let (db, persisted, checkpointed) = guarded(&shown, || {
            let db = open_db(&path)?;
            if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(path = %shown, error = %e, "cannot make the store file private");
            }
            init_or_check(&db, &shown)?;
            let checkpointed = recover(&db, dir, &shown)?;
            let persisted = read_all(&db, &shown)?;
            Ok((db, persisted, checkpointed))
        })?;
        let log = Wal::open(dir, options.wal_file_bytes.max(4096), checkpointed).map_err(|e| {
            StoreError::Io(format!(
                "cannot create the write-ahead log in {}: {e}",
                dir.display()
            ))
        })?;
        let (tx, rx) = mpsc::channel();
        let (cp_tx, cp_rx) = mpsc::channel();
        let renewals = Arc::new(Renewals::new());
        let stats = Arc::new(StoreStats::default());
        let progress = Arc::new(Progress::default());
        let spawn_err =
            |e: std::io::Error| StoreError::Io(format!("cannot start a store thread: {e}"));
        let checkpointer = std::thread::Builder::new()
            .name("netsel-checkpoint".into())
            .spawn({
                let (renewals, shown, stats, progress) = (
                    renewals.clone(),
                    shown.clone(),
                    stats.clone(),
                    progress.clone(),
                );

                let flush = options.renew_flush;
                move || checkpoint_loop(db, cp_rx, renewals, flush, shown, stats, progress)
            })
            .map_err(spawn_err)?;
        let writer = std::thread::Builder::new()
            .name("netsel-store".into())
            .spawn({
                let (shown, stats, progress) = (shown.clone(), stats.clone(), progress.clone());
                move || {
                    log_loop(log, checkpointed, rx, cp_tx, shown, stats, progress);
                    if checkpointer.join().is_err() {
                        tracing::error!("store checkpoint thread panicked");
                    }
                }
            })
            .map_err(spawn_err)?;
        tracing::info!(path = %shown, services = persisted.services.len(),
            instances = persisted.instances.len(), index = persisted.index, "store opened");
        Ok(EmbeddedStore {
            path,
            tx,
            renewals,
            stats,
            loaded: Mutex::new(Some(persisted)),
            writer: Mutex::new(Some(writer)),
            progress,
        })
    }

    /// Reads a store that no process has open (for tools and tests), without keeping it
    /// open. Like [`open`](Self::open) it refuses a bad or foreign file and first replays
    /// the write-ahead log into redb; unlike it, it never creates a store: a missing one is
    /// an error.
    pub fn read(dir: impl AsRef<Path>) -> Result<Persisted, StoreError> {
        let path = dir.as_ref().join(STORE_FILE);
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(StoreError::Io(format!("no store at {shown}")));
        }
        guarded(&shown, || {
            let db = open_db(&path)?;
            init_or_check(&db, &shown)?;
            recover(&db, dir.as_ref(), &shown)?;
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

/// redb's page cache. The catalog keeps every instance in memory and redb is read only at
/// start-up, so redb's default (1 GiB, grown as pages are touched) only doubled what an
/// instance costs: at 100,000 instances it held ~50 MB beside the catalog's ~88 MB.
/// 1 MiB and 4 MiB filled 100,000 instances at the same rate and started up from them in
/// the same time; 1 MiB is ~35 bytes less per instance (BENCHMARKS.md, "Memory").
const REDB_CACHE_BYTES: usize = 1 << 20;

fn open_db(path: &Path) -> Result<Database, StoreError> {
    let shown = path.display();
    // Verify every page's checksum at open: a file damaged outside redb is then refused
    // with `Corrupted` instead of being trusted (a plain open may panic on one). It reads
    // the whole file once; 100,000 instances still start well under a second.
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    builder.set_cache_size(REDB_CACHE_BYTES);
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
                Some(old) if (OLDEST_READABLE..FORMAT_VERSION).contains(&old) => {
                    drop(meta);
                    drop(rtx);
                    // Version 1 had no log: the redb file is complete; mark it as ours now.
                    let wtx = db.begin_write().map_err(|e| db_err(shown, e))?;
                    {
                        let mut meta = wtx.open_table(META).map_err(|e| db_err(shown, e))?;
                        meta.insert(KEY_VERSION, FORMAT_VERSION)
                            .map_err(|e| db_err(shown, e))?;
                    }
                    wtx.commit().map_err(|e| db_err(shown, e))?;
                    tracing::info!(path = %shown, from = old, to = FORMAT_VERSION,
                        "upgraded the store format");
                    Ok(())
                }
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

/// Replays the log records that redb does not have yet (a crash after their
/// acknowledgement, before their checkpoint) and returns the newest record now in redb.
fn recover(db: &Database, dir: &Path, shown: &str) -> Result<u64, StoreError> {
    let rtx = db.begin_read().map_err(|e| db_err(shown, e))?;
    let meta = rtx.open_table(META).map_err(|e| db_err(shown, e))?;
    let checkpointed = meta
        .get(KEY_WAL_SEQ)
        .map_err(|e| db_err(shown, e))?
        .map(|v| v.value())
        .unwrap_or(0);
    drop(meta);
    drop(rtx);
    let records = wal::replay(dir, checkpointed)
        .map_err(|why| StoreError::Corrupt(format!("{}: {why}", dir.display())))?;
    let Some(&(last, _)) = records.last() else {
        return Ok(checkpointed);
    };
    let batches: Vec<Vec<Op>> = records.into_iter().flat_map(|(_, b)| b).collect();
    write_txn(db, &batches, &[], Some(last)).map_err(|e| db_err(shown, e))?;
    tracing::info!(path = %shown, records = last - checkpointed, batches = batches.len(),
        "replayed the write-ahead log");
    Ok(last)
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

/// Writes one transaction: every batch in order, then the renewals, and the newest log
/// record it includes. Durable on `Ok`.
fn write_txn(
    db: &Database,
    batches: &[Vec<Op>],
    renewals: &[(InstanceId, u64)],
    wal_seq: Option<u64>,
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
                Op::PutService(r) => {
                    services
                        .insert(r.name.as_str(), json(r)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                Op::DeleteService(name) => {
                    services.remove(name.as_str()).map_err(|x| e(&x))?;
                }
                Op::PutInstance(r) => {
                    instances
                        .insert(r.id.as_str(), json(r)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                Op::DeleteInstance(id) => {
                    instances.remove(id.as_str()).map_err(|x| e(&x))?;
                    leases.remove(id.as_str()).map_err(|x| e(&x))?;
                }
                Op::PutHold(h) => {
                    holds
                        .insert(hold_key(&h.vip).as_str(), json(h)?.as_slice())
                        .map_err(|x| e(&x))?;
                }
                Op::DeleteHold(ip) => {
                    holds.remove(hold_key(ip).as_str()).map_err(|x| e(&x))?;
                }
                Op::SetIndex(i) => index = Some(*i),
                // Health is not kept on a single node: after a restart every instance
                // starts passing and its active check re-establishes it.
                Op::SetHealth { .. } => {}
            }
        }
        if let Some(i) = index {
            meta.insert(KEY_INDEX, i).map_err(|x| e(&x))?;
        }
        if let Some(seq) = wal_seq {
            meta.insert(KEY_WAL_SEQ, seq).map_err(|x| e(&x))?;
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

/// Counters of the store's threads, for benchmarks and metrics.
#[derive(Debug)]
pub struct StoreStats {
    commits: AtomicU64,
    batches: AtomicU64,
    renewals: AtomicU64,
    commit_micros: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_micros: AtomicU64,
    /// `netsel_store_fsync_duration_seconds`: each `fdatasync` of the log.
    fsync: LatencyHistogram,
    /// `netsel_store_commit_batch_size`: catalog writes sharing one log write and fsync.
    batch_size: Histogram,
    /// `netsel_store_checkpoint_duration_seconds`: each redb write transaction.
    checkpoint: LatencyHistogram,
    /// `netsel_store_wal_bytes`: bytes of records in the active log file.
    wal_bytes: Gauge,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            commits: AtomicU64::default(),
            batches: AtomicU64::default(),
            renewals: AtomicU64::default(),
            commit_micros: AtomicU64::default(),
            checkpoints: AtomicU64::default(),
            checkpoint_micros: AtomicU64::default(),
            // 50 µs .. ~3.3 s.
            fsync: LatencyHistogram::new(exponential_bounds(0.000_05, 2.0, 17)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            // 100 µs .. ~6.6 s.
            checkpoint: LatencyHistogram::new(exponential_bounds(0.000_1, 2.0, 17)),
            wal_bytes: Gauge::default(),
        }
    }
}

/// A copy of [`StoreStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Acknowledgement points: log writes, each ending in one `fdatasync`.
    pub commits: u64,
    /// Catalog batches logged (one per acknowledged write).
    pub batches: u64,
    /// Lease renewals written to redb.
    pub renewals: u64,
    /// Total time spent writing and syncing the log, microseconds.
    pub commit_micros: u64,
    /// Checkpoints: redb write transactions.
    pub checkpoints: u64,
    /// Total time spent in checkpoints, microseconds.
    pub checkpoint_micros: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl StoreStats {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("store");
        r.register(
            "fsync_duration_seconds",
            "Time each fdatasync of the write-ahead log took",
            self.fsync.clone(),
        );
        r.register(
            "commit_batch_size",
            "Catalog writes acknowledged by one write-ahead log write and fsync (group commit)",
            self.batch_size.clone(),
        );
        r.register(
            "checkpoint_duration_seconds",
            "Time each checkpoint (a redb write transaction of logged writes and lease \
             renewals) took",
            self.checkpoint.clone(),
        );
        r.register(
            "wal_bytes",
            "Bytes of records in the active write-ahead log file (each of its two files is \
             preallocated; at the end of one the log moves to the other after a checkpoint)",
            self.wal_bytes.clone(),
        );
    }

    fn synced(&self, took: Duration) {
        self.fsync.observe(took);
    }

    fn logged(&self, batches: usize, took: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches as u64, Ordering::Relaxed);
        self.batch_size.observe(batches as f64);
        self.commit_micros
            .fetch_add(micros(took), Ordering::Relaxed);
    }

    fn checkpointed(&self, renewals: usize, took: Duration) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.renewals.fetch_add(renewals as u64, Ordering::Relaxed);
        self.checkpoint.observe(took);
        self.checkpoint_micros
            .fetch_add(micros(took), Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            commits: self.commits.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
            commit_micros: self.commit_micros.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            checkpoint_micros: self.checkpoint_micros.load(Ordering::Relaxed),
        }
    }
}

/// One framed log record: its bytes, its sequence number, and the index just past the
/// last batch it carries.
pub(crate) struct Framed {
    pub(crate) bytes: Vec<u8>,
    seq: u64,
    end: usize,
}

/// Frames `batches` as log records numbered from `next_seq`, each payload at most
/// [`wal::MAX_RECORD_PAYLOAD`] unless one batch alone is larger.
pub(crate) fn frame(batches: &[Vec<Op>], mut next_seq: u64) -> Result<Vec<Framed>, String> {
    let mut records = Vec::new();
    let mut payload = Vec::with_capacity(4096);
    let seal = |payload: &mut Vec<u8>, seq: u64, end: usize| {
        payload.push(b']');
        let mut bytes = Vec::with_capacity(wal::HEADER + payload.len());
        wal::encode(seq, payload, &mut bytes);
        payload.clear();
        Framed { bytes, seq, end }
    };
    for (i, batch) in batches.iter().enumerate() {
        let item = json(batch)?;
        if !payload.is_empty() && payload.len() + item.len() + 2 > wal::MAX_RECORD_PAYLOAD {
            records.push(seal(&mut payload, next_seq, i));
            next_seq += 1;
        }
        payload.push(if payload.is_empty() { b'[' } else { b',' });
        payload.extend_from_slice(&item);
    }
    if !payload.is_empty() {
        records.push(seal(&mut payload, next_seq, batches.len()));
    }
    Ok(records)
}

/// Sends the checkpointer a request and waits for its answer.
fn ask(
    cp: &mpsc::Sender<CpMsg>,
    make: impl FnOnce(mpsc::Sender<Result<(), String>>) -> CpMsg,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let gone = || "the store's checkpoint thread stopped".to_string();
    cp.send(make(tx)).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// The log writer: every queued write goes into the log, one `fdatasync` per round, and
/// is acknowledged; the checkpointer gets the batches once they are durable.
fn log_loop(
    mut log: Wal,
    checkpointed: u64,
    rx: mpsc::Receiver<Msg>,
    cp: mpsc::Sender<CpMsg>,
    shown: String,
    stats: Arc<StoreStats>,
    progress: Arc<Progress>,
) {
    let mut last_seq = checkpointed;
    let mut batches: Vec<Vec<Op>> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut after: Vec<CpMsg> = Vec::new();
    loop {
        let mut stopping = false;
        let mut handle = |m: Msg, stopping: &mut bool| match m {
            Msg::Apply(ops, reply) => {
                batches.push(ops);
                replies.push(reply);
            }
            Msg::Flush(reply) => after.push(CpMsg::Flush(reply)),
            Msg::Load(reply) => after.push(CpMsg::Load(reply)),
            Msg::Close(done) => {
                after.push(CpMsg::Close(done));
                *stopping = true;
            }
        };
        match rx.recv() {
            Ok(m) => handle(m, &mut stopping),
            Err(_) => stopping = true,
        }
        // Group commit: everything already queued shares this round's one fsync.
        let mut taken = 1;
        while taken < MAX_MESSAGES_PER_SYNC && !stopping {
            match rx.try_recv() {
                Ok(m) => handle(m, &mut stopping),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => stopping = true,
            }
            taken += 1;
        }
        if !batches.is_empty() {
            let started = Instant::now();
            let count = batches.len();
            let result = match progress.failure() {
                // Fail-stop: nothing is acknowledged after a failed write or checkpoint, so
                // no acknowledged write can depend on one that was lost.
                Some(why) => Err(format!(
                    "an earlier store write failed ({why}); restart netsel"
                )),
                None => write_log(
                    &mut log,
                    std::mem::take(&mut batches),
                    &mut last_seq,
                    &cp,
                    &stats,
                ),
            };
            batches.clear();
            stats.logged(count, started.elapsed());
            if let Err(e) = &result
                && progress.failure().is_none()
            {
                tracing::error!(path = %shown, error = %e, batches = count,
                    "store write failed; the waiting writes are not acknowledged, and the \
                     store refuses every later write until netsel restarts");
                progress.fail(e);
            }
            for reply in replies.drain(..) {
                let _ = reply.send(result.clone());
            }
        }
        for m in after.drain(..) {
            let _ = cp.send(m);
        }
        if stopping {
            return;
        }
    }
}

/// Logs `batches`, syncs, and hands them to the checkpointer. Batches too large for a
/// log record are committed straight into redb instead.
fn write_log(
    log: &mut Wal,
    batches: Vec<Vec<Op>>,
    last_seq: &mut u64,
    cp: &mpsc::Sender<CpMsg>,
    stats: &StoreStats,
) -> Result<(), String> {
    let records = frame(&batches, *last_seq + 1)?;
    if records.iter().any(|r| !log.can_hold(r.bytes.len())) {
        return ask(cp, |tx| CpMsg::Direct(batches, tx));
    }
    let mut batches = batches.into_iter();
    let (mut handed, mut written) = (0usize, 0usize);
    let sync = |log: &Wal| {
        let started = Instant::now();
        let r = log.sync().map_err(|e| format!("cannot sync the log: {e}"));
        stats.synced(started.elapsed());
        r
    };
    for rec in records {
        if !log.fits(rec.bytes.len()) {
            // The other file is reused only once redb holds every record in it, including
            // the ones this round already wrote (synced and handed over first).
            if written > handed {
                sync(log)?;
                let done = batches.by_ref().take(written - handed).collect();
                let _ = cp.send(CpMsg::Logged(*last_seq, done));
                handed = written;
            }
            ask(cp, CpMsg::Checkpoint)?;
            log.switch();
            stats.wal_bytes.set(0);
        }
        log.append(&rec.bytes, rec.seq)
            .map_err(|e| format!("cannot write the log: {e}"))?;
        stats
            .wal_bytes
            .set(i64::try_from(log.position()).unwrap_or(i64::MAX));
        *last_seq = rec.seq;
        written = rec.end;
    }
    sync(log)?;
    let _ = cp.send(CpMsg::Logged(*last_seq, batches.collect()));
    Ok(())
}

/// The checkpointer: applies logged batches (and renewals) to redb, durably, at least once
/// per `renew_flush`, and answers loads, flushes and close.
fn checkpoint_loop(
    db: Database,
    rx: mpsc::Receiver<CpMsg>,
    renewals: Arc<Renewals>,
    renew_flush: Duration,
    shown: String,
    stats: Arc<StoreStats>,
    progress: Arc<Progress>,
) {
    let mut pending: Vec<Vec<Op>> = Vec::new();
    let mut pending_seq: Option<u64> = None;
    let mut last = Instant::now();
    let checkpoint = |pending: &mut Vec<Vec<Op>>,
                      pending_seq: &mut Option<u64>,
                      with_renewals: bool|
     -> Result<(), String> {
        if let Some(why) = progress.failure() {
            return Err(format!(
                "an earlier store write failed ({why}); restart netsel"
            ));
        }
        let renew = if with_renewals {
            renewals.take()
        } else {
            Vec::new()
        };
        if pending.is_empty() && renew.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let result = write_txn(&db, pending, &renew, *pending_seq);
        stats.checkpointed(renew.len(), started.elapsed());
        match &result {
            Ok(()) => {
                pending.clear();
                *pending_seq = None;
            }
            Err(e) => {
                tracing::error!(path = %shown, error = %e,
                    "store checkpoint failed; the store refuses every later write until \
                     netsel restarts (acknowledged writes are safe in the log)");
                progress.fail(e);
            }
        }
        result
    };
    loop {
        let wait = renew_flush.saturating_sub(last.elapsed());
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = checkpoint(&mut pending, &mut pending_seq, true);
                return;
            }
        };
        match msg {
            None => {
                last = Instant::now();
                let _ = checkpoint(&mut pending, &mut pending_seq, true);
            }
            Some(CpMsg::Logged(seq, batches)) => {
                pending.extend(batches);
                pending_seq = Some(seq);
                if pending.len() >= MAX_PENDING_BATCHES {
                    let _ = checkpoint(&mut pending, &mut pending_seq, false);
                }
            }
            Some(CpMsg::Direct(batches, reply)) => {
                pending.extend(batches);
                let _ = reply.send(checkpoint(&mut pending, &mut pending_seq, false));
            }
            Some(CpMsg::Checkpoint(reply)) => {
                let _ = reply.send(checkpoint(&mut pending, &mut pending_seq, false));
            }
            Some(CpMsg::Flush(reply)) => {
                last = Instant::now();
                let _ = reply.send(checkpoint(&mut pending, &mut pending_seq, true));
            }
            Some(CpMsg::Load(reply)) => {
                let r = checkpoint(&mut pending, &mut pending_seq, false)
                    .map_err(StoreError::Io)
                    .and_then(|()| read_all(&db, &shown));
                let _ = reply.send(r);
            }
            Some(CpMsg::Close(done)) => {
                let _ = checkpoint(&mut pending, &mut pending_seq, true);
                tracing::info!(path = %shown, "store closed");
                let _ = done.send(());
                return;
            }
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

    fn apply(&self, batch: Vec<Op>) -> Commit {
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

    fn health(&self) -> super::StoreHealth {
        let failure = self.progress.failure();
        super::StoreHealth {
            degraded: failure.is_some(),
            view_age: None,
            detail: failure,
        }
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        self.stats.register(registry);
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
