//! Catalog unit tests. Time is paused tokio time: leases are tested to the millisecond
//! without sleeping.

use super::*;
use crate::config::Settings;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

fn settings(ttl_secs: u64) -> CatalogSettings {
    let mut s = Settings::default();
    s.config.max_heartbeat_age = ttl_secs;
    s.network.vip_hold_secs = 60;
    let mut c = s.catalog_settings();
    c.probe_vip_bind = false;
    c
}

fn catalog(ttl_secs: u64) -> Catalog {
    Catalog::in_memory(settings(ttl_secs)).unwrap()
}

fn explicit(name: &str, port: u16) -> Registration {
    Registration::new(
        name,
        Endpoint::Explicit(SocketAddr::from(([127, 0, 0, 1], port))),
    )
}

fn pool(name: &str, peer: [u8; 4]) -> Registration {
    Registration::new(
        name,
        Endpoint::Pool {
            peer: IpAddr::from(peer),
            hint: None,
        },
    )
}

fn spawn_leases(c: &Catalog) -> CancellationToken {
    let stop = CancellationToken::new();
    let (c, s) = (c.clone(), stop.clone());
    tokio::spawn(async move { c.run(s).await });
    stop
}

#[tokio::test(start_paused = true)]
async fn register_assigns_vip_and_service_port() {
    let c = catalog(60);
    let r = c.register(explicit("Web", 8000)).await.unwrap();
    assert_eq!(r.service.as_str(), "web");
    assert!(c.settings().vip_cidr.contains(&r.vip));
    assert_eq!(r.service_port, 8000);
    assert_eq!(r.ttl, Duration::from_secs(60));
    let snap = c.snapshot();
    let svc = snap.service("WEB").unwrap();
    assert_eq!(svc.vip, r.vip);
    assert_eq!(svc.instances.len(), 1);
    assert_eq!(snap.service_by_vip(r.vip).unwrap().name.as_str(), "web");
    assert_eq!(snap.index, 1);
    // A second instance shares the VIP and keeps the first instance's port as the
    // service port.
    let r2 = c.register(explicit("web", 8001)).await.unwrap();
    assert_eq!((r2.vip, r2.service_port), (r.vip, 8000));
    assert_eq!(c.snapshot().service("web").unwrap().instances.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn service_port_conflict_is_refused() {
    let c = catalog(60);
    let mut reg = explicit("web", 8000);
    reg.service_port = Some(80);
    c.register(reg).await.unwrap();
    let mut reg = explicit("web", 8001);
    reg.service_port = Some(81);
    assert!(matches!(
        c.register(reg).await,
        Err(CatalogError::PortConflict {
            existing: 80,
            requested: 81,
            ..
        })
    ));
    let mut reg = explicit("web", 8001);
    reg.service_port = Some(80);
    c.register(reg).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn invalid_registrations_are_refused() {
    let c = catalog(60);
    assert!(matches!(
        c.register(explicit("bad_name", 1)).await,
        Err(CatalogError::InvalidName(_))
    ));
    assert!(matches!(
        c.register(explicit("web", 0)).await,
        Err(CatalogError::Invalid {
            field: "endpoint",
            ..
        })
    ));
    let mut r = Registration::new("web", Endpoint::Explicit("0.0.0.0:80".parse().unwrap()));
    assert!(c.register(r.clone()).await.is_err());
    r.endpoint = Endpoint::Explicit("127.0.0.1:80".parse().unwrap());
    r.ttl = Some(Duration::from_millis(10));
    assert!(matches!(
        c.register(r.clone()).await,
        Err(CatalogError::Invalid { field: "ttl", .. })
    ));
    r.ttl = Some(Duration::from_secs(1_000_000));
    assert!(c.register(r.clone()).await.is_err());
    r.ttl = None;
    r.weight = Some(0);
    assert!(c.register(r.clone()).await.is_err());
    r.weight = None;
    r.tags = vec![String::new()];
    assert!(c.register(r.clone()).await.is_err());
    r.tags = vec!["a\nb".into()];
    assert!(c.register(r).await.is_err());
    assert_eq!(c.snapshot().instance_count(), 0);
    assert_eq!(c.index(), 0, "failed writes do not move the index");
}

#[tokio::test(start_paused = true)]
async fn seed_registration_repeats_return_same_assignment() {
    let c = catalog(60);
    let a = c.register(pool("web", [127, 0, 0, 1])).await.unwrap();
    let b = c.register(pool("web", [127, 0, 0, 1])).await.unwrap();
    assert!(b.renewed);
    assert_eq!((a.id, a.vip, a.endpoint), (b.id, b.vip, b.endpoint));
    assert_eq!(c.index(), 1, "a pure renewal is not a change");
    // From another address: a second instance, another pool port, same VIP.
    let d = c.register(pool("web", [127, 0, 0, 2])).await.unwrap();
    assert!(!d.renewed);
    assert_eq!(d.vip, a.vip);
    assert_ne!(d.endpoint.port(), a.endpoint.port());
    assert_eq!(d.endpoint.ip(), IpAddr::from([127, 0, 0, 2]));
}

#[tokio::test(start_paused = true)]
async fn explicit_endpoint_reregistration_takes_over() {
    let c = catalog(60);
    let a = c.register(explicit("web", 8000)).await.unwrap();
    let mut again = explicit("web", 8000);
    again.tags = vec!["v2".into()];
    let b = c.register(again).await.unwrap();
    assert_eq!(a.id, b.id);
    assert_ne!(a.secret, b.secret);
    assert!(matches!(
        c.heartbeat(a.id.as_str(), a.secret.expose()),
        Err(CatalogError::WrongSecret(_))
    ));
    c.heartbeat(b.id.as_str(), b.secret.expose()).unwrap();
    assert_eq!(c.snapshot().instance(b.id.as_str()).unwrap().tags, ["v2"]);
}

#[tokio::test(start_paused = true)]
async fn lease_expires_at_its_deadline_not_at_the_sweep() {
    let c = catalog(2); // sweep every 30 s; TTL 2 s
    let stop = spawn_leases(&c);
    let mut events = c.subscribe();
    let r = c.register(explicit("web", 8000)).await.unwrap();
    let start = tokio::time::Instant::now();
    loop {
        let e = events.recv().await.unwrap();
        if e.kind == ChangeKind::InstanceExpired {
            break;
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
        "expired after {took:?}"
    );
    assert!(c.snapshot().instance(r.id.as_str()).is_none());
    assert!(
        c.snapshot().service("web").is_none(),
        "empty service removed"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_an_instance_alive() {
    let c = catalog(2);
    let stop = spawn_leases(&c);
    let r = c.register(explicit("web", 8000)).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.heartbeat(r.id.as_str(), r.secret.expose()).unwrap();
        assert!(c.snapshot().instance(r.id.as_str()).is_some());
    }
    // Then it stops: gone within TTL (+100 ms).
    let last = tokio::time::Instant::now();
    let mut idx = c.watch_index();
    idx.wait_for(|_| c.snapshot().instance(r.id.as_str()).is_none())
        .await
        .unwrap();
    let gone_after = last.elapsed();
    assert!(
        gone_after >= Duration::from_millis(1900) && gone_after <= Duration::from_millis(2100),
        "{gone_after:?}"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn seed_heartbeat_only_from_the_registering_peer() {
    let c = catalog(60);
    c.register(pool("web", [127, 0, 0, 1])).await.unwrap();
    c.heartbeat_seed("WEB", IpAddr::from([127, 0, 0, 1]))
        .unwrap();
    assert!(matches!(
        c.heartbeat_seed("web", IpAddr::from([127, 0, 0, 9])),
        Err(CatalogError::NotOwner { .. })
    ));
    assert!(matches!(
        c.heartbeat_seed("nope", IpAddr::from([127, 0, 0, 1])),
        Err(CatalogError::UnknownService(_))
    ));
    // An explicit-endpoint instance has no owner peer: name-only heartbeats never touch it.
    c.register(explicit("api", 9500)).await.unwrap();
    assert!(
        c.heartbeat_seed("api", IpAddr::from([127, 0, 0, 1]))
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn deregister_needs_the_secret_and_holds_the_vip() {
    let c = catalog(60);
    let a = c.register(explicit("web", 8000)).await.unwrap();
    assert!(matches!(
        c.deregister(a.id.as_str(), "nope").await,
        Err(CatalogError::WrongSecret(_))
    ));
    assert!(matches!(
        c.deregister("missing", "x").await,
        Err(CatalogError::UnknownInstance(_))
    ));
    c.deregister(a.id.as_str(), a.secret.expose())
        .await
        .unwrap();
    assert!(c.snapshot().service("web").is_none());
    // The VIP is held: the same name gets it back, others do not.
    let b = c.register(explicit("web", 8000)).await.unwrap();
    assert_eq!(a.vip, b.vip);
}

#[tokio::test(start_paused = true)]
async fn events_carry_increasing_indexes() {
    let c = catalog(60);
    let mut events = c.subscribe();
    let a = c.register(explicit("web", 8000)).await.unwrap();
    c.register(explicit("web", 8001)).await.unwrap();
    c.set_health(a.id.as_str(), Health::Critical).await.unwrap();
    c.deregister_admin(a.id.as_str()).await.unwrap();
    let mut got = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push((e.index, e.kind));
    }
    assert_eq!(
        got,
        vec![
            (1, ChangeKind::ServiceCreated),
            (1, ChangeKind::InstanceRegistered),
            (2, ChangeKind::InstanceRegistered),
            (3, ChangeKind::HealthChanged),
            (4, ChangeKind::InstanceDeregistered),
        ]
    );
    assert_eq!(c.index(), 4);
}

#[tokio::test(start_paused = true)]
async fn critical_instances_are_not_healthy() {
    let c = catalog(60);
    let a = c.register(explicit("web", 8000)).await.unwrap();
    c.register(explicit("web", 8001)).await.unwrap();
    c.set_health(a.id.as_str(), Health::Critical).await.unwrap();
    let snap = c.snapshot();
    let svc = snap.service("web").unwrap();
    assert_eq!(svc.healthy_count(), 1);
    assert_eq!(svc.instances.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn health_transitions_are_counted_once_per_change() {
    let c = catalog(60);
    let mut metrics_registry = crate::metrics::new_registry();
    c.register_metrics(&mut metrics_registry);
    let a = c.register(explicit("web", 8000)).await.unwrap();
    for h in [Health::Critical, Health::Critical, Health::Passing] {
        c.set_health(a.id.as_str(), h).await.unwrap();
    }
    c.set_health("no-such-instance", Health::Critical)
        .await
        .unwrap();
    let text = crate::metrics::MetricsRegistry::new(metrics_registry).encode();
    assert!(
        text.contains("netsel_health_transitions_total{to=\"critical\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("netsel_health_transitions_total{to=\"passing\"} 1\n"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn readers_keep_their_snapshot() {
    let c = catalog(60);
    c.register(explicit("web", 8000)).await.unwrap();
    let old = c.snapshot();
    c.register(explicit("api", 8001)).await.unwrap();
    assert_eq!(old.service_count(), 1);
    assert_eq!(c.snapshot().service_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn wait_for_index_wakes_on_change_or_times_out() {
    let c = catalog(60);
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_for_index(0, Duration::from_secs(30)).await })
    };
    tokio::task::yield_now().await;
    c.register(explicit("web", 8000)).await.unwrap();
    assert_eq!(waiter.await.unwrap(), 1);
    let start = tokio::time::Instant::now();
    assert_eq!(c.wait_for_index(1, Duration::from_secs(5)).await, 1);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn full_catalog_refuses_more() {
    let mut s = settings(60);
    s.max_instances = 2;
    let c = Catalog::in_memory(s).unwrap();
    c.register(explicit("a", 1)).await.unwrap();
    c.register(explicit("a", 2)).await.unwrap();
    assert!(matches!(
        c.register(explicit("a", 3)).await,
        Err(CatalogError::Full(2))
    ));
    // Renewing an existing one is still fine.
    c.register(explicit("a", 2)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn restart_restores_with_grace() {
    use crate::store::{Commit, Op, Persisted, Store};
    use std::sync::Mutex as StdMutex;

    /// A store that keeps ops in memory and replays them: enough to test `restore`.
    #[derive(Default)]
    struct Replay(StdMutex<Persisted>);
    impl Store for Replay {
        fn load(&self) -> Result<Persisted, StoreError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn apply(&self, batch: Vec<Op>) -> Commit {
            let mut p = self.0.lock().unwrap();
            for op in batch {
                match op {
                    Op::PutService(s) => {
                        p.services.retain(|x| x.name != s.name);
                        p.services.push(s);
                    }
                    Op::DeleteService(n) => p.services.retain(|x| x.name != n),
                    Op::PutInstance(i) => {
                        p.instances.retain(|x| x.id != i.id);
                        p.instances.push(i);
                    }
                    Op::DeleteInstance(id) => p.instances.retain(|x| x.id != id),
                    Op::PutHold(h) => p.holds.push(h),
                    Op::DeleteHold(ip) => p.holds.retain(|h| h.vip != ip),
                    Op::SetIndex(i) => p.index = i,
                    Op::SetHealth { .. } => {}
                }
            }
            Commit::Done(Ok(()))
        }
        fn renew(&self, _: &InstanceId, _: u64) {}
        fn describe(&self) -> String {
            "replay".into()
        }
    }

    let store = Arc::new(Replay::default());
    let c1 = Catalog::new(settings(5), store.clone()).unwrap();
    let a = c1.register(explicit("web", 8000)).await.unwrap();
    let b = c1.register(pool("api", [127, 0, 0, 1])).await.unwrap();
    drop(c1);
    tokio::time::advance(Duration::from_secs(4)).await;

    let c2 = Catalog::new(settings(5), store).unwrap();
    let stop = spawn_leases(&c2);
    assert_eq!(c2.index(), 2);
    let snap = c2.snapshot();
    assert_eq!(snap.service("web").unwrap().vip, a.vip);
    assert_eq!(snap.service("api").unwrap().vip, b.vip);
    assert_eq!(snap.instance(b.id.as_str()).unwrap().endpoint, b.endpoint);
    c2.heartbeat(a.id.as_str(), a.secret.expose()).unwrap();
    // The seed registration keeps its pool port: a new one gets another.
    let other = c2.register(pool("api", [127, 0, 0, 2])).await.unwrap();
    assert_ne!(other.endpoint.port(), b.endpoint.port());
    // `b` does not heartbeat; it still has the full grace (5 s) from the restart.
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert!(c2.snapshot().instance(b.id.as_str()).is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c2.snapshot().instance(b.id.as_str()).is_none());
    stop.cancel();
}

/// Random register/deregister/expire sequences through the catalog never break the
/// network invariants: unique VIPs among live services, stable VIPs while a service
/// lives, no early reuse of a held VIP by another name, unique pool ports.
#[test]
fn catalog_property_network_invariants() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    #[derive(Debug, Clone)]
    enum Op {
        Seed(u8, u8),
        Explicit(u8, u8),
        Deregister(u8),
        Advance(u32),
    }
    let op = prop_oneof![
        (0u8..6, 0u8..3).prop_map(|(n, p)| Op::Seed(n, p)),
        (0u8..6, 0u8..3).prop_map(|(n, p)| Op::Explicit(n, p)),
        (0u8..40).prop_map(Op::Deregister),
        (0u32..3000).prop_map(Op::Advance),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(op, 1..120), |ops| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut s = settings(2);
                s.vip_cidr = "127.77.0.0/29".parse().unwrap();
                s.vip_hold = Duration::from_secs(1);
                s.port_range = 21000..=21009;
                let c = Catalog::in_memory(s).unwrap();
                let stop = spawn_leases(&c);
                let mut released: HashMap<IpAddr, (String, u64)> = HashMap::new();
                let mut prev_vips: HashMap<String, IpAddr> = HashMap::new();
                for op in ops {
                    // A release happens somewhere during the op: no earlier than this.
                    let before = c.now_ms();
                    match op {
                        Op::Seed(n, p) => {
                            let _ = c.register(pool(&format!("s{n}"), [127, 0, 0, p + 1])).await;
                        }
                        Op::Explicit(n, p) => {
                            let _ = c
                                .register(explicit(&format!("s{n}"), 8000 + u16::from(p)))
                                .await;
                        }
                        Op::Deregister(k) => {
                            let snap = c.snapshot();
                            if let Some(i) = snap.instances().nth(usize::from(k)) {
                                let _ = c.deregister(i.id.as_str(), i.secret.expose()).await;
                            }
                        }
                        Op::Advance(ms) => {
                            tokio::time::sleep(Duration::from_millis(u64::from(ms))).await
                        }
                    }
                    let snap = c.snapshot();
                    let now = c.now_ms();
                    let mut vips = HashSet::new();
                    let mut ports = HashSet::new();
                    let mut live = HashMap::new();
                    for svc in snap.services() {
                        prop_assert!(vips.insert(svc.vip), "two services share {}", svc.vip);
                        prop_assert!(!svc.instances.is_empty());
                        live.insert(svc.name.to_string(), svc.vip);
                        if let Some((who, at)) = released.get(&svc.vip) {
                            prop_assert!(
                                who == svc.name.as_str() || now >= at + 1000,
                                "held VIP reused early"
                            );
                        }
                        for i in &svc.instances {
                            if i.pool_port {
                                prop_assert!(ports.insert(i.endpoint.port()), "pool port reused");
                            }
                        }
                    }
                    for (name, vip) in &prev_vips {
                        match live.get(name) {
                            Some(v) => prop_assert_eq!(v, vip, "VIP of a live service changed"),
                            None => {
                                released.insert(*vip, (name.clone(), before));
                            }
                        }
                    }
                    for vip in live.values() {
                        if let Some((who, _)) = released.get(vip)
                            && live.get(who) == Some(vip)
                        {
                            released.remove(vip);
                        }
                    }
                    prev_vips = live;
                }
                stop.cancel();
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn instance_ids_are_16_hex_digits_and_strictly_increase() {
    let ids: Vec<InstanceId> = (0..10_000).map(|_| InstanceId::generate()).collect();
    for id in &ids {
        assert_eq!(id.as_str().len(), 16, "{id}");
        assert!(
            id.as_str()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must increase");
}

/// The owner index (which instance a registration renews or takes over) follows every
/// write: a deregistered endpoint registers afresh, a re-registered one is taken over.
#[tokio::test(start_paused = true)]
async fn owner_index_follows_register_and_deregister() {
    let c = catalog(30);
    let a = c.register(explicit("web", 9001)).await.unwrap();
    let again = c.register(explicit("web", 9001)).await.unwrap();
    assert_eq!(
        a.id, again.id,
        "same endpoint is taken over, not duplicated"
    );
    let b = c.register(explicit("web", 9002)).await.unwrap();
    assert_ne!(a.id, b.id);
    c.deregister(again.id.as_str(), again.secret.expose())
        .await
        .unwrap();
    let fresh = c.register(explicit("web", 9001)).await.unwrap();
    assert_ne!(fresh.id, a.id, "a deregistered instance is not resurrected");
    let p1 = c.register(pool("seed", [127, 0, 0, 9])).await.unwrap();
    let p2 = c.register(pool("seed", [127, 0, 0, 9])).await.unwrap();
    assert_eq!(p1.id, p2.id, "same peer renews its pool registration");
    assert!(p2.renewed);
    let snap = c.snapshot();
    assert_eq!(snap.service("web").unwrap().instances.len(), 2);
    assert_eq!(snap.service("seed").unwrap().instances.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn watch_services_changes_only_when_a_service_comes_or_goes() {
    let c = catalog(30);
    let mut rx = c.watch_services();
    rx.borrow_and_update();
    let a = c.register(explicit("web", 9001)).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a new service");
    rx.borrow_and_update();
    let b = c.register(explicit("web", 9002)).await.unwrap();
    c.heartbeat(a.id.as_str(), a.secret.expose()).unwrap();
    assert!(
        !rx.has_changed().unwrap(),
        "another instance is not a new service"
    );
    c.deregister(b.id.as_str(), b.secret.expose())
        .await
        .unwrap();
    assert!(
        !rx.has_changed().unwrap(),
        "the service still has an instance"
    );
    c.deregister(a.id.as_str(), a.secret.expose())
        .await
        .unwrap();
    assert!(rx.has_changed().unwrap(), "the service is gone");
}

#[tokio::test]
async fn endpoints_in_refused_ranges_are_refused_with_the_reason() {
    let c = catalog(60);
    for (ep, kind) in [
        ("169.254.169.254:80", "link-local"),
        ("[fe80::1]:80", "link-local"),
        ("[::ffff:169.254.1.1]:80", "link-local"),
        ("255.255.255.255:80", "broadcast"),
        ("0.0.0.0:80", "unspecified"),
        ("[::]:80", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("[ff02::1]:80", "multicast"),
    ] {
        let reg = Registration::new("web", Endpoint::Explicit(ep.parse().unwrap()));
        let e = c.register(reg).await.unwrap_err();
        assert_eq!(e.reason(), "invalid_field", "{ep}");
        assert!(e.to_string().contains(kind), "{ep}: {e}");
    }
    // A bare-name registration from a link-local peer too.
    let reg = Registration::new(
        "web",
        Endpoint::Pool {
            peer: "169.254.0.7".parse().unwrap(),
            hint: None,
        },
    );
    assert!(
        c.register(reg)
            .await
            .unwrap_err()
            .to_string()
            .contains("link-local")
    );
    // Ordinary addresses pass.
    c.register(explicit("web", 8080)).await.unwrap();
    let mut s = settings(60);
    s.allowed_endpoints = vec!["127.0.0.0/8".parse().unwrap()];
    assert!(s.allows_endpoint("127.1.2.3".parse().unwrap()));
    assert!(!s.allows_endpoint("192.0.2.1".parse().unwrap()));
    assert!(!s.allows_endpoint("169.254.169.254".parse().unwrap()));
}
