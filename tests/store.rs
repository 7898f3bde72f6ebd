//! The durable embedded store: restarts keep everything, renewals are persisted in
//! batches, bad data dirs and unknown formats are refused with clear errors.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netsel::catalog::{InstanceId, Secret, ServiceName};
use netsel::client::ServiceClient;
use netsel::protocol::{AppProtocol, RegisterOptions, Request, Response};
use netsel::store::embedded::{EmbeddedOptions, EmbeddedStore, FORMAT_VERSION, STORE_FILE};
use netsel::store::wal;
use netsel::store::{InstanceRecord, Op, ServiceRecord, Store, StoreError};
use netsel::{NetSelServer, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn settings(dir: &Path) -> Settings {
    let mut s = Settings::ephemeral();
    s.data_dir = Some(dir.to_path_buf());
    s
}

async fn start(s: Settings) -> NetSelServer {
    let server = NetSelServer::with_settings(s);
    server.start().await.expect("server starts");
    server
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One request on the line protocol, one answer.
async fn line(addr: SocketAddr, req: &Request) -> Response {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (r, mut w) = stream.into_split();
    w.write_all(&req.encode()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(r).read_line(&mut answer),
    )
    .await
    .expect("answer in time")
    .unwrap();
    Response::parse(&answer).expect("answer parses")
}

/// What a snapshot says about one instance, comparable across restarts.
#[derive(Debug, PartialEq)]
struct Seen {
    id: String,
    service: String,
    vip: IpAddr,
    service_port: u16,
    endpoint: SocketAddr,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    weight: u32,
    protocol: AppProtocol,
    ttl: Duration,
    owner_peer: Option<IpAddr>,
    pool_port: bool,
}

fn seen(server: &NetSelServer) -> Vec<Seen> {
    let snap = server.catalog().unwrap().snapshot();
    let mut out: Vec<Seen> = snap
        .services()
        .flat_map(|svc| {
            svc.instances.iter().map(move |i| Seen {
                id: i.id.to_string(),
                service: svc.name.to_string(),
                vip: svc.vip,
                service_port: svc.port,
                endpoint: i.endpoint,
                tags: i.tags.clone(),
                meta: i.meta.clone(),
                weight: i.weight,
                protocol: i.protocol,
                ttl: i.ttl,
                owner_peer: i.owner_peer,
                pool_port: i.pool_port,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[tokio::test]
async fn restart_keeps_vips_ports_ids_secrets_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(settings(dir.path())).await;
    let addr = server.bound().unwrap().registry;

    // The real client library: extended registrations with metadata, and the seed form
    // (pool port).
    let mut web = ServiceClient::builder("web")
        .registry(addr)
        .endpoint("127.0.0.1:18001".parse().unwrap())
        .tag("v2")
        .meta("zone", "a")
        .weight(7)
        .service_port(80)
        .protocol(AppProtocol::Http1)
        .build();
    let (web_vip, web_port) = web.register().await.unwrap();
    let mut web2 = ServiceClient::builder("web")
        .registry(addr)
        .endpoint("127.0.0.1:18002".parse().unwrap())
        .meta("zone", "b")
        .build();
    web2.register().await.unwrap();
    let mut legacy = ServiceClient::new(addr, "legacy".into());
    let (legacy_vip, legacy_port) = legacy.register().await.unwrap();
    // A raw registration, to know its secret.
    let reply = match line(
        addr,
        &Request::Register {
            name: "db".into(),
            endpoint: Some("127.0.0.1:15432".parse().unwrap()),
            options: RegisterOptions {
                meta: [("role".to_string(), "primary".to_string())].into(),
                ttl: Some(Duration::from_secs(30)),
                ..RegisterOptions::default()
            },
        },
    )
    .await
    {
        Response::Registered(r) => r,
        other => panic!("unexpected {other:?}"),
    };
    // A service that went away: its VIP is held for its name.
    let mut gone = ServiceClient::builder("gone")
        .registry(addr)
        .endpoint("127.0.0.1:18009".parse().unwrap())
        .build();
    let (gone_vip, _) = gone.register().await.unwrap();
    gone.deregister().await.unwrap();

    let before = seen(&server);
    let index_before = server.catalog().unwrap().index();
    assert_eq!(before.len(), 4);
    assert!(server.shutdown().await);

    let server = start(settings(dir.path())).await;
    let addr = server.bound().unwrap().registry;
    assert_eq!(seen(&server), before, "everything comes back unchanged");
    assert!(server.catalog().unwrap().index() >= index_before);
    let snap = server.catalog().unwrap().snapshot();
    assert_eq!(snap.service("web").unwrap().vip, web_vip);
    assert_eq!(snap.service("web").unwrap().port, web_port);
    assert_eq!(snap.service("legacy").unwrap().vip, legacy_vip);
    assert_eq!(
        snap.service("legacy").unwrap().instances[0].endpoint.port(),
        legacy_port
    );
    assert!(snap.service("gone").is_none());

    // The old secret still works, and a wrong one still does not.
    let hb = Request::Heartbeat {
        id: reply.id.clone(),
        secret: reply.secret.clone(),
    };
    assert_eq!(line(addr, &hb).await, Response::HeartbeatOk);
    let bad = Request::Heartbeat {
        id: reply.id.clone(),
        secret: "0".repeat(32),
    };
    assert!(matches!(line(addr, &bad).await, Response::Failed(r) if r.starts_with("wrong secret")));
    assert!(snap.instance(&web.instance_id().unwrap()).is_some());

    // The held VIP comes back to its name.
    let mut again = ServiceClient::builder("gone")
        .registry(addr)
        .endpoint("127.0.0.1:18009".parse().unwrap())
        .build();
    assert_eq!(again.register().await.unwrap().0, gone_vip);
    server.shutdown().await;
}

#[tokio::test]
async fn client_heartbeats_keep_working_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(settings(dir.path())).await;
    let addr = server.bound().unwrap().registry;
    let mut client = ServiceClient::builder("api")
        .registry(addr)
        .endpoint("127.0.0.1:18100".parse().unwrap())
        .build();
    client.register().await.unwrap();
    let id = client.instance_id().unwrap();
    server.shutdown().await;

    let mut s = settings(dir.path());
    s.config.registry_addr = addr;
    let server = start(s).await;
    let index = server.catalog().unwrap().index();
    client.send_heartbeat().await.unwrap();
    // Same id, and no new registration happened (the index did not move).
    assert_eq!(client.instance_id().unwrap(), id);
    assert_eq!(server.catalog().unwrap().index(), index);
    assert!(server.catalog().unwrap().snapshot().instance(&id).is_some());
    server.shutdown().await;
}

fn instance(id: &str, service: &str, port: u16, deadline_unix_ms: u64) -> InstanceRecord {
    InstanceRecord {
        id: InstanceId::from(id),
        service: ServiceName::new(service).unwrap(),
        endpoint: SocketAddr::from(([127, 0, 0, 1], port)),
        tags: vec!["t".into()],
        meta: [("k".to_string(), "v".to_string())].into(),
        weight: 1,
        protocol: AppProtocol::Tcp,
        check: None,
        ttl_ms: 1000,
        deregister_critical_after_ms: None,
        owner_peer: None,
        pool_port: false,
        secret: Secret::from_string("s".repeat(32)),
        registered_index: 1,
        deadline_unix_ms,
        owner: None,
        health: Default::default(),
        request: None,
    }
}

fn service(name: &str, vip: [u8; 4]) -> ServiceRecord {
    ServiceRecord {
        name: ServiceName::new(name).unwrap(),
        vip: IpAddr::from(vip),
        port: 80,
        created_index: 1,
    }
}

#[tokio::test]
async fn a_restart_never_expires_instances_whose_lease_ran_out_while_down() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Instances whose 1 s leases ran out ten minutes ago (the registry was down).
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let stale = unix_ms() - 600_000;
        let mut ops = vec![Op::PutService(service("old", [127, 77, 0, 9]))];
        for i in 0..50u16 {
            ops.push(Op::PutInstance(instance(
                &format!("{i:016x}"),
                "old",
                20_000 + i,
                stale,
            )));
        }
        ops.push(Op::SetIndex(1));
        store.apply(ops).wait().await.unwrap();
        store.close();
    }
    let mut s = settings(dir.path());
    s.config.max_heartbeat_age = 5;
    let server = start(s).await;
    let catalog = server.catalog().unwrap();
    let snap = catalog.snapshot();
    assert_eq!(snap.instance_count(), 50, "nothing expired at start-up");
    let grace = catalog.settings().restart_grace;
    assert_eq!(grace, Duration::from_secs(5));
    for i in snap.instances() {
        assert!(
            catalog.lease_remaining(i) > grace - Duration::from_millis(500),
            "every instance gets at least max_heartbeat_age to heartbeat"
        );
    }
    // Still there after a sweep interval's worth of the expiry loop running.
    let idx = catalog.index();
    assert_eq!(
        catalog
            .wait_for_index(idx, Duration::from_millis(300))
            .await,
        idx
    );
    assert_eq!(catalog.snapshot().instance_count(), 50);
    server.shutdown().await;
}

#[tokio::test]
async fn renewals_are_batched_and_persisted_but_never_resurrect() {
    let dir = tempfile::tempdir().unwrap();
    let base = unix_ms() + 10_000;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .apply(vec![
                Op::PutService(service("svc", [127, 77, 0, 1])),
                Op::PutInstance(instance("00000000000000aa", "svc", 1, base)),
                Op::PutInstance(instance("00000000000000bb", "svc", 2, base)),
                Op::SetIndex(3),
            ])
            .wait()
            .await
            .unwrap();
        // Many renewals coalesce to the latest deadline.
        for k in 0..1000 {
            store.renew(&InstanceId::from("00000000000000aa"), base + k);
        }
        store.renew(&InstanceId::from("00000000000000bb"), base + 5000);
        // bb goes away; its pending renewal must not bring its lease back.
        store
            .apply(vec![
                Op::DeleteInstance(InstanceId::from("00000000000000bb")),
                Op::SetIndex(4),
            ])
            .wait()
            .await
            .unwrap();
        store.flush().await.unwrap();
        store.renew(&InstanceId::from("00000000000000aa"), base + 7777);
        // close() writes what is still pending.
        store.close();
        assert!(matches!(
            store.apply(vec![Op::SetIndex(5)]).wait().await,
            Err(StoreError::Closed)
        ));
    }
    let p = EmbeddedStore::read(dir.path()).unwrap();
    assert_eq!(p.index, 4);
    assert_eq!(p.instances.len(), 1);
    assert_eq!(p.instances[0].id.as_str(), "00000000000000aa");
    assert_eq!(p.instances[0].deadline_unix_ms, base + 7777);
}

#[tokio::test]
async fn heartbeat_renewals_reach_disk_within_the_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(settings(dir.path())).await;
    let addr = server.bound().unwrap().registry;
    let reply = match line(
        addr,
        &Request::Register {
            name: "hb".into(),
            endpoint: Some("127.0.0.1:18200".parse().unwrap()),
            options: RegisterOptions {
                ttl: Some(Duration::from_secs(3600)),
                ..RegisterOptions::default()
            },
        },
    )
    .await
    {
        Response::Registered(r) => r,
        other => panic!("unexpected {other:?}"),
    };
    let registered_at = unix_ms();
    let hb = Request::Heartbeat {
        id: reply.id.clone(),
        secret: reply.secret.clone(),
    };
    // Heartbeat a little later, so the renewed deadline is measurably later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(line(addr, &hb).await, Response::HeartbeatOk);
    let heartbeat_at = unix_ms();
    // Kill-like stop: drop nothing, just read what another open would see once the
    // writer flushed (shutdown closes the store, which flushes pending renewals).
    server.shutdown().await;
    let p = EmbeddedStore::read(dir.path()).unwrap();
    let d = p.instances[0].deadline_unix_ms;
    assert!(
        d >= heartbeat_at - 5 + 3_600_000 - 100,
        "renewed deadline persisted"
    );
    assert!(d > registered_at + 3_600_000);
}

#[tokio::test]
async fn library_default_stays_in_memory() {
    let server = NetSelServer::with_settings(Settings::ephemeral());
    server.start().await.unwrap();
    assert!(
        format!("{:?}", server.catalog().unwrap()).contains("memory"),
        "NetSelServer without data_dir keeps state in memory"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn client_reregisters_when_the_data_dir_was_wiped() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(settings(dir.path())).await;
    let addr = server.bound().unwrap().registry;
    let mut client = ServiceClient::builder("wiped")
        .registry(addr)
        .endpoint("127.0.0.1:18300".parse().unwrap())
        .meta("zone", "c")
        .heartbeat_interval(Duration::from_millis(100))
        .build();
    client.register().await.unwrap();
    let old_id = client.instance_id().unwrap();
    let heartbeats = client.start_heartbeats();
    server.shutdown().await;
    std::fs::remove_dir_all(dir.path()).unwrap();

    let mut s = settings(dir.path());
    s.config.registry_addr = addr;
    let server = start(s).await;
    let catalog = server.catalog().unwrap();
    assert_eq!(
        catalog.snapshot().instance_count(),
        0,
        "the store really is empty"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(svc) = catalog.snapshot().service("wiped") {
            let i = &svc.instances[0];
            assert_eq!(i.endpoint, "127.0.0.1:18300".parse().unwrap());
            assert_eq!(i.meta.get("zone").map(String::as_str), Some("c"));
            assert_ne!(
                i.id.as_str(),
                old_id,
                "a new registration, not a resurrection"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client did not register again"
        );
        catalog
            .wait_for_index(catalog.index(), Duration::from_millis(200))
            .await;
    }
    heartbeats.shutdown().await.unwrap();
    server.shutdown().await;
}

// ---------------------------------------------------------------- bad data dirs

fn open_err(dir: &Path) -> StoreError {
    match EmbeddedStore::open(dir) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn a_foreign_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(STORE_FILE);
    let junk: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&file, &junk).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, StoreError::NotAStore(_)), "{e}");
    assert!(e.to_string().contains("not a NetSel store"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), junk, "never rewritten");

    // A text file, the classic mistake.
    std::fs::write(&file, b"hello, I am somebody's notes\n").unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, StoreError::NotAStore(_)), "{e}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"hello, I am somebody's notes\n"
    );
}

#[test]
fn a_redb_file_of_another_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join(STORE_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("users");
            tx.open_table(table).unwrap().insert("alice", 1).unwrap();
        }
        tx.commit().unwrap();
    }
    let e = open_err(dir.path());
    assert!(matches!(e, StoreError::NotAStore(_)), "{e}");
    assert!(e.to_string().contains("another program"), "{e}");
}

#[tokio::test]
async fn a_corrupted_store_is_refused_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .apply(
                std::iter::once(Op::PutService(service("svc", [127, 77, 0, 1])))
                    .chain(
                        (0..2000u16).map(|i| {
                            Op::PutInstance(instance(&format!("{i:016x}"), "svc", i + 1, 0))
                        }),
                    )
                    .collect(),
            )
            .wait()
            .await
            .unwrap();
        store.close();
    }
    let file = dir.path().join(STORE_FILE);
    let good = std::fs::read(&file).unwrap();
    // The header overwritten.
    let mut bad = good.clone();
    bad[..4096].fill(0xA5);
    std::fs::write(&file, &bad).unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(e, StoreError::NotAStore(_) | StoreError::Corrupt(_)),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), bad, "never rewritten");
    // Data pages damaged (every page past the header, a few bytes each): refused, never
    // trusted and never "repaired" into an empty store.
    let mut bad = good.clone();
    for page in (4096..bad.len()).step_by(4096) {
        bad[page + 700..page + 716].fill(0x5A);
    }
    std::fs::write(&file, &bad).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), bad, "never rewritten");
    // Truncated to a few bytes past the magic.
    std::fs::write(&file, &good[..100]).unwrap();
    let e = open_err(dir.path());
    assert!(
        !matches!(e, StoreError::Locked(_) | StoreError::Closed),
        "{e}"
    );
}

#[test]
fn an_unwritable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A data dir below a regular file cannot be created, even by root.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = open_err(&file.join("data"));
    assert!(matches!(e, StoreError::Io(_)), "{e}");
    assert!(e.to_string().contains("cannot create data dir"), "{e}");
    // The data dir is itself a file.
    let e = open_err(&file);
    assert!(matches!(e, StoreError::Io(_)), "{e}");

    // A read-only directory (meaningless for root, who may write anyway).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    if std::fs::write(ro.join("probe"), b"x").is_err() {
        let e = open_err(&ro);
        assert!(matches!(e, StoreError::Io(_)), "{e}");
        assert!(e.to_string().contains("ermission denied"), "{e}");
    } else {
        eprintln!("note: running as root; read-only directory case skipped");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_second_store_on_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = EmbeddedStore::open(dir.path()).unwrap();
    let e = open_err(dir.path());
    assert!(matches!(e, StoreError::Locked(_)), "{e}");
    assert!(
        e.to_string().contains("in use by another NetSel process"),
        "{e}"
    );
    first.close();
    EmbeddedStore::open(dir.path()).expect("free again once closed");
}

fn set_version(dir: &Path, version: u64) {
    let db = redb::Database::create(dir.join(STORE_FILE)).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        tx.open_table(meta)
            .unwrap()
            .insert("format_version", version)
            .unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn an_unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open(dir.path()).unwrap().close();
    set_version(dir.path(), FORMAT_VERSION + 98);
    let e = open_err(dir.path());
    match &e {
        StoreError::UnsupportedVersion {
            found, supported, ..
        } => {
            assert_eq!(*found, FORMAT_VERSION + 98);
            assert_eq!(*supported, FORMAT_VERSION);
        }
        other => panic!("unexpected {other}"),
    }
    let shown = format!("format version {}", FORMAT_VERSION + 98);
    assert!(e.to_string().contains(&shown), "{e}");
    // Restored, it opens again: the refusal changed nothing.
    set_version(dir.path(), FORMAT_VERSION);
    EmbeddedStore::open(dir.path()).unwrap();
}

#[test]
fn a_version_1_store_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open(dir.path()).unwrap().close();
    set_version(dir.path(), 1);
    EmbeddedStore::open(dir.path()).unwrap().close();
    let db = redb::Database::create(dir.path().join(STORE_FILE)).unwrap();
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    use redb::ReadableDatabase;
    let rtx = db.begin_read().unwrap();
    let version = rtx.open_table(meta).unwrap().get("format_version").unwrap();
    assert_eq!(version.unwrap().value(), FORMAT_VERSION);
}

/// The newest checkpointed log record, as redb records it.
fn wal_seq(dir: &Path) -> u64 {
    use redb::ReadableDatabase;
    let db = redb::Database::create(dir.join(STORE_FILE)).unwrap();
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let rtx = db.begin_read().unwrap();
    let table = rtx.open_table(meta).unwrap();
    table
        .get("wal_seq")
        .unwrap()
        .map(|v| v.value())
        .unwrap_or(0)
}

/// A log record written as the log writer writes it: what a crash after the
/// acknowledgement and before the checkpoint leaves behind.
fn log_record(dir: &Path, seq: u64, batches: &[Vec<Op>]) {
    let mut log = wal::Wal::open(dir, wal::DEFAULT_WAL_FILE_BYTES, seq - 1).unwrap();
    let mut bytes = Vec::new();
    wal::encode(seq, &serde_json::to_vec(batches).unwrap(), &mut bytes);
    log.append(&bytes, seq).unwrap();
    log.sync().unwrap();
}

#[tokio::test]
async fn acknowledged_writes_still_only_in_the_log_are_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    store
        .apply(vec![Op::PutService(service("web", [127, 77, 0, 1]))])
        .wait()
        .await
        .unwrap();
    store.close();
    let seq = wal_seq(dir.path());
    assert_eq!(seq, 1, "one logged write, checkpointed at close");
    let late = instance("late", "web", 9001, unix_ms() + 60_000);
    log_record(
        dir.path(),
        seq + 1,
        &[vec![Op::PutInstance(late.clone()), Op::SetIndex(7)]],
    );
    let read = EmbeddedStore::read(dir.path()).unwrap();
    assert_eq!(read.instances, vec![late.clone()]);
    assert_eq!(read.index, 7);
    // Replayed into redb once: opening again finds it without the log record.
    assert_eq!(wal_seq(dir.path()), seq + 1);
    let p = EmbeddedStore::open(dir.path()).unwrap().load().unwrap();
    assert_eq!(p.instances, vec![late]);
}

#[tokio::test]
async fn a_log_with_a_missing_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open(dir.path()).unwrap().close();
    let seq = wal_seq(dir.path());
    // Record seq+2 without seq+1: an acknowledged write would be lost; refuse instead.
    log_record(
        dir.path(),
        seq + 2,
        &[vec![Op::PutService(service("web", [127, 77, 0, 1]))]],
    );
    match open_err(dir.path()) {
        StoreError::Corrupt(why) => assert!(why.contains("missing"), "{why}"),
        other => panic!("unexpected {other}"),
    }
}

/// Log files far too small for the load: the writer switches files hundreds of times,
/// each time after a checkpoint, and 16 concurrent writers lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_log_files_switch_often_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        renew_flush: Duration::from_secs(3600),
        wal_file_bytes: 4096,
    };
    let store = std::sync::Arc::new(EmbeddedStore::open_with(dir.path(), options).unwrap());
    store
        .apply(vec![Op::PutService(service("web", [127, 77, 0, 1]))])
        .wait()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..16u16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..25u16 {
                let id = format!("c{c}k{k}");
                let rec = instance(&id, "web", 10_000 + c * 100 + k, unix_ms() + 60_000);
                store
                    .apply(vec![Op::PutInstance(rec)])
                    .wait()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.stats();
    assert!(stats.checkpoints >= 10, "{stats:?}");
    store.close();
    let read = EmbeddedStore::read(dir.path()).unwrap();
    assert_eq!(read.instances.len(), 400);
}

// ---------------------------------------------------------------- the real binary

use common::serve_command as serve;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs `netsel serve` expecting it to refuse to start; returns its stderr.
fn serve_fails(dir: &Path) -> String {
    let mut child = serve(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(!status.success(), "netsel serve must exit non-zero");
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("ready"),
                "it must not become ready"
            );
            assert!(!stderr.contains("panicked"), "no panic: {stderr}");
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("netsel serve kept running on a bad data dir");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn netsel_serve_exits_non_zero_on_a_bad_data_dir() {
    // A foreign file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STORE_FILE), b"not a database at all").unwrap();
    let err = serve_fails(dir.path());
    assert!(err.contains("not a NetSel store"), "{err}");

    // An unknown format version.
    let dir = tempfile::tempdir().unwrap();
    EmbeddedStore::open(dir.path()).unwrap().close();
    set_version(dir.path(), 7);
    let err = serve_fails(dir.path());
    assert!(err.contains("format version 7"), "{err}");

    // A damaged store.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let ops = (0..500u16)
            .map(|i| Op::PutInstance(instance(&format!("{i:016x}"), "svc", i + 1, 0)))
            .collect();
        block_on(store.apply(ops).wait()).unwrap();
        store.close();
    }
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    for page in (4096..bytes.len()).step_by(4096) {
        bytes[page + 700..page + 716].fill(0x5A);
    }
    std::fs::write(&file, &bytes).unwrap();
    let err = serve_fails(dir.path());
    assert!(err.contains("corrupt"), "{err}");

    // A data dir that cannot be created.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let err = serve_fails(&file.join("sub"));
    assert!(err.contains("cannot create data dir"), "{err}");
}

#[test]
fn a_second_netsel_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = common::spawn_ready({
        let mut cmd = serve(dir.path());
        cmd.stderr(Stdio::null());
        cmd
    });
    let err = serve_fails(dir.path());
    assert!(err.contains("in use by another NetSel process"), "{err}");
    let _ = first.child.kill();
    let _ = first.child.wait();
}

#[test]
fn in_memory_flag_conflicts_with_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(dir.path()).arg("--in-memory").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--in-memory"));
}

#[test]
fn the_store_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new-data-dir");
    EmbeddedStore::open(&data).unwrap().close();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data dir holds secrets");
    assert_eq!(mode(&data.join(STORE_FILE)), 0o600);
}

/// An instance with an active check gets no traffic after a restart until a check passes
/// again: nothing has checked it since (issue #17).
#[tokio::test]
async fn a_checked_instance_restarts_critical_until_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    // A backend that passes its check.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = backend.local_addr().unwrap();
    let mut s = settings(dir.path());
    s.health.interval_ms = 50;
    let server = start(s.clone()).await;
    let addr = server.bound().unwrap().registry;
    let req = Request::Register {
        name: "checked".into(),
        endpoint: Some(endpoint),
        options: RegisterOptions {
            check: Some(netsel::protocol::Check::Tcp),
            ..RegisterOptions::default()
        },
    };
    let Response::Registered(reply) = line(addr, &req).await else {
        panic!("registered")
    };
    let catalog = server.catalog().unwrap();
    let health = |c: &netsel::catalog::Catalog| {
        c.snapshot()
            .instance(&reply.id)
            .map(|i| i.health.as_str())
            .unwrap_or("gone")
    };
    let mut index = catalog.watch_index();
    tokio::time::timeout(Duration::from_secs(10), async {
        while health(&catalog) != "passing" {
            index.changed().await.unwrap();
        }
    })
    .await
    .expect("passes its first check");
    server.shutdown().await;

    // Restarted with the backend gone and one check round an hour: were the instance
    // restored passing, one failed check (fall is 3) would leave it passing.
    drop(backend);
    s.health.interval_ms = 3_600_000;
    let server = start(s).await;
    let catalog = server.catalog().unwrap();
    assert_eq!(health(&catalog), "critical");
    assert_eq!(
        catalog
            .snapshot()
            .service("checked")
            .unwrap()
            .healthy_count(),
        0
    );
    server.shutdown().await;
}
