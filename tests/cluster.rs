//! Cluster mode against a real etcd (Debian's `etcd-server`) and real `netsel serve` nodes
//! on loopback. Outside CI, without an `etcd` binary, each test says SKIPPED and passes; in
//! CI a missing etcd fails.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::cluster::{ClusterConfig, Etcd, Node, ask, dns_a, get};
use netsel::ServiceClient;

/// `REGISTERED|id|secret|vip|port|endpoint|ttl` → (id, secret, vip).
fn registered(answer: &str) -> (String, String, IpAddr) {
    let f: Vec<&str> = answer.split('|').collect();
    assert_eq!(f[0], "REGISTERED", "{answer}");
    (f[1].into(), f[2].into(), f[3].parse().unwrap())
}

/// The VIP a node's `RESOLVE` gives `name`, if it knows it.
async fn resolve(node: &Node, name: &str) -> Option<(IpAddr, usize)> {
    let a = ask(node.registry, &format!("RESOLVE|{name}")).await;
    let f: Vec<&str> = a.split('|').collect();
    (f[0] == "RESOLVED").then(|| (f[2].parse().unwrap(), f[4].parse().unwrap()))
}

/// `{name: vip}` and the index of a node's `/v1/services`.
async fn view(node: &Node) -> (u64, BTreeMap<String, String>) {
    let (status, body) = get(node.api, "/v1/services").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let index = v["index"].as_u64().unwrap();
    let services = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                format!(
                    "{} {}",
                    s["vip"].as_str().unwrap(),
                    s["instance_count"].as_u64().unwrap()
                ),
            )
        })
        .collect();
    (index, services)
}

/// A one-member etcd and two nodes over it: the setup most tests share.
struct Pair {
    etcd: Etcd,
    dir: tempfile::TempDir,
    cfg: ClusterConfig,
    a: Node,
    b: Node,
}

impl Pair {
    async fn start() -> Option<Pair> {
        let etcd = Etcd::start(1).await?;
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClusterConfig::new(&etcd, dir.path());
        let a = Node::start(&cfg, "a");
        let b = Node::start(&cfg, "b");
        Some(Pair {
            etcd,
            dir,
            cfg,
            a,
            b,
        })
    }
}

async fn until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        common::eventually(timeout, &mut check).await,
        "{what} within {timeout:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_on_one_node_is_answered_by_another_within_200ms() {
    let Some(Pair {
        etcd: _etcd,
        dir: _dir,
        cfg: _cfg,
        a,
        b,
    }) = Pair::start().await
    else {
        return;
    };

    let started = Instant::now();
    let (_, _, vip) = registered(&ask(a.registry, "REGISTER|web|127.0.0.1:39001").await);
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(5) {
        if let Some((v, n)) = resolve(&b, "web").await {
            seen = Some((v, n, started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (v, n, took) = seen.expect("node b answers RESOLVE for web");
    assert_eq!((v, n), (vip, 1));
    assert!(
        took < Duration::from_millis(200),
        "propagation took {took:?}"
    );
    // DNS and the API on b agree.
    assert_eq!(dns_a(b.dns, "web").await, vec![vip]);
    let (status, body) = get(b.api, "/v1/services/web").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&vip.to_string()) && body.contains("127.0.0.1:39001"),
        "{body}"
    );
    // Both views stand at the same index.
    assert_eq!(view(&a).await, view(&b).await);

    // Both nodes serve the VIP on this one host: they share its listener, neither fails.
    until(
        Duration::from_secs(3),
        "both nodes open the VIP listener",
        || async { a.log().contains("VIP listener open") && b.log().contains("VIP listener open") },
    )
    .await;
    for n in [&a, &b] {
        assert!(!n.log().contains("cannot open VIP listener"), "{}", n.log());
    }
    let vip_port = SocketAddr::new(vip, 39001);
    assert!(
        tokio::net::TcpStream::connect(vip_port).await.is_ok(),
        "{vip_port} accepts"
    );

    // Every node lists both nodes, and which holds the instance.
    let (status, body) = get(b.api, "/v1/nodes").await;
    assert_eq!(status, 200, "{body}");
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(nodes["node"], "b");
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    assert_eq!(list[0]["id"], "a");
    assert_eq!(list[0]["instances"], 1);
    assert_eq!(list[0]["addrs"]["registry"], a.registry.to_string());
    assert_eq!(list[1]["self"], true);
    // The CLI too, failing over from an address that answers nothing.
    let dead = common::cluster::free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netsel"))
        .args([
            "nodes",
            "--api-addr",
            &format!("127.0.0.1:{dead},{}", b.api),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("NODE") && text.contains("b *"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains(&a.registry.to_string())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_stay_with_the_owner_and_a_deregistration_anywhere_is_seen_everywhere() {
    let Some(Pair {
        etcd: _etcd,
        dir: _dir,
        cfg: _cfg,
        a,
        b,
    }) = Pair::start().await
    else {
        return;
    };
    let (id, secret, _) = registered(&ask(a.registry, "REGISTER|api|127.0.0.1:39002").await);
    assert_eq!(
        ask(a.registry, &format!("HEARTBEAT|{id}|{secret}")).await,
        "HEARTBEAT_OK"
    );
    until(Duration::from_secs(2), "b sees api", || async {
        resolve(&b, "api").await.is_some()
    })
    .await;
    // b does not hold the lease: the client is told to register again there.
    let hb = ask(b.registry, &format!("HEARTBEAT|{id}|{secret}")).await;
    assert!(hb.starts_with("FAILED|unknown instance"), "{hb}");
    // A wrong secret is refused anywhere.
    let bad = ask(b.registry, &format!("DEREGISTER|{id}|nope")).await;
    assert!(bad.starts_with("FAILED|wrong secret"), "{bad}");
    // The right one works from any node, and every view loses the instance.
    assert_eq!(
        ask(b.registry, &format!("DEREGISTER|{id}|{secret}")).await,
        "OK"
    );
    until(Duration::from_secs(2), "a drops api", || async {
        resolve(&a, "api").await.is_none()
    })
    .await;
    assert!(resolve(&b, "api").await.is_none(), "read-your-writes on b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_names_across_three_nodes_get_a_hundred_vips_and_one_view() {
    let Some(etcd) = Etcd::start(3).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::new(&etcd, dir.path());
    let nodes = [
        Node::start(&cfg, "a"),
        Node::start(&cfg, "b"),
        Node::start(&cfg, "c"),
    ];
    let mut tasks = Vec::new();
    for i in 0..100u16 {
        let addr = nodes[usize::from(i) % 3].registry;
        tasks.push(tokio::spawn(async move {
            let a = ask(addr, &format!("REGISTER|svc-{i}|127.0.0.1:{}", 40000 + i)).await;
            (format!("svc-{i}"), registered(&a).2)
        }));
    }
    let mut vips: HashMap<String, IpAddr> = HashMap::new();
    for t in tasks {
        let (name, vip) = t.await.unwrap();
        vips.insert(name, vip);
    }
    let distinct: BTreeSet<IpAddr> = vips.values().copied().collect();
    assert_eq!(distinct.len(), 100, "every name its own VIP");
    let mut views = Vec::new();
    for n in &nodes {
        until(
            Duration::from_secs(3),
            "every node holds 100 services",
            || async { view(n).await.1.len() == 100 },
        )
        .await;
        views.push(view(n).await);
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    for (name, vip) in &vips {
        assert_eq!(views[0].1[name], format!("{vip} 1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_registered_on_three_nodes_at_once_gets_one_vip() {
    let Some(etcd) = Etcd::start(3).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::new(&etcd, dir.path());
    let nodes = [
        Node::start(&cfg, "a"),
        Node::start(&cfg, "b"),
        Node::start(&cfg, "c"),
    ];
    let mut all: BTreeSet<IpAddr> = BTreeSet::new();
    for round in 0..20u16 {
        let name = format!("race-{round}");
        let mut tasks = Vec::new();
        for (k, n) in nodes.iter().enumerate() {
            let (addr, name) = (n.registry, name.clone());
            let port = 41000 + round * 3 + k as u16;
            tasks.push(tokio::spawn(async move {
                registered(&ask(addr, &format!("REGISTER|{name}|127.0.0.1:{port}")).await).2
            }));
        }
        let mut got = BTreeSet::new();
        for t in tasks {
            got.insert(t.await.unwrap());
        }
        assert_eq!(got.len(), 1, "round {round}: one VIP, got {got:?}");
        let vip = *got.iter().next().unwrap();
        assert!(
            all.insert(vip),
            "round {round}: {vip} was given to another name"
        );
        for n in &nodes {
            until(
                Duration::from_secs(2),
                "every node holds the three",
                || async { resolve(n, &name).await == Some((vip, 3)) },
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_takes_its_instances_and_its_clients_move_keeping_their_vip() {
    let Some(etcd) = Etcd::start(1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::new(&etcd, dir.path());
    let mut a = Node::start(&cfg, "a");
    let b = Node::start(&cfg, "b");
    let c = Node::start(&cfg, "c");

    // An instance registered on a by line, and a client library given a then b.
    let (_, _, vip) = registered(&ask(a.registry, "REGISTER|lost|127.0.0.1:39101").await);
    let mut client = ServiceClient::builder("moving")
        .registry(a.registry)
        .registry(b.registry)
        .endpoint("127.0.0.1:39102".parse().unwrap())
        .heartbeat_interval(Duration::from_millis(300))
        .build();
    let (moving_vip, _) = client.register().await.unwrap();
    let heartbeats = client.start_heartbeats();
    until(Duration::from_secs(2), "b and c see both", || async {
        resolve(&b, "lost").await.is_some() && resolve(&c, "moving").await.is_some()
    })
    .await;

    a.kill9();
    let killed = Instant::now();
    // b and c keep answering throughout, and the orphan leaves within TTL + 2 s.
    let limit = Duration::from_secs(cfg.lease_ttl_secs + 2);
    loop {
        assert_eq!(
            dns_a(c.dns, "moving").await,
            vec![moving_vip],
            "c answers throughout"
        );
        let gone_b = resolve(&b, "lost").await.is_none();
        let gone_c = resolve(&c, "lost").await.is_none();
        if gone_b && gone_c {
            break;
        }
        assert!(
            killed.elapsed() < limit,
            "lost still listed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = vip;
    // The client re-registered through b: same VIP, and b holds its lease now.
    until(Duration::from_secs(5), "moving is held by b", || async {
        let (s, body) = get(b.api, "/v1/services/moving").await;
        s == 200 && body.contains("\"owner\":\"b\"")
    })
    .await;
    assert_eq!(resolve(&c, "moving").await, Some((moving_vip, 1)));
    assert_eq!(client.get_assigned_addr().unwrap().ip(), moving_vip);
    heartbeats.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_reads_go_on_and_writes_fail_fast_then_converge() {
    let Some(etcd) = Etcd::start(3).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::new(&etcd, dir.path());
    let a = Node::start(&cfg, "a");
    let b = Node::start(&cfg, "b");
    let (id, secret, vip) = registered(&ask(a.registry, "REGISTER|steady|127.0.0.1:39201").await);
    until(Duration::from_secs(2), "b sees steady", || async {
        resolve(&b, "steady").await.is_some()
    })
    .await;

    // Two of three members stop: no quorum.
    etcd.signal(1, "-STOP");
    etcd.signal(2, "-STOP");
    let started = Instant::now();
    let answer = ask(a.registry, "REGISTER|newcomer|127.0.0.1:39202").await;
    let took = started.elapsed();
    assert!(
        answer.starts_with("FAILED|cluster store unavailable"),
        "{answer}"
    );
    assert!(took < Duration::from_millis(2500), "failed after {took:?}");
    // Reads, DNS and heartbeats go on from the last view.
    assert_eq!(dns_a(b.dns, "steady").await, vec![vip]);
    assert_eq!(resolve(&a, "steady").await, Some((vip, 1)));
    assert_eq!(
        ask(a.registry, &format!("HEARTBEAT|{id}|{secret}")).await,
        "HEARTBEAT_OK"
    );
    // The API says so.
    until(Duration::from_secs(5), "readiness turns 503", || async {
        get(a.api, "/v1/health/ready").await.0 == 503
    })
    .await;
    let (status, body) = get(a.api, "/v1/services/newcomer").await;
    assert_eq!(status, 404, "{body}");

    etcd.signal(1, "-CONT");
    etcd.signal(2, "-CONT");
    let back = Instant::now();
    until(Duration::from_secs(5), "writes work again", || async {
        ask(b.registry, "REGISTER|newcomer|127.0.0.1:39202")
            .await
            .starts_with("REGISTERED")
    })
    .await;
    until(Duration::from_secs(5), "a converges", || async {
        resolve(&a, "newcomer").await.is_some() && get(a.api, "/v1/health/ready").await.0 == 200
    })
    .await;
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "converged in {:?}",
        back.elapsed()
    );
    assert_eq!(view(&a).await, view(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_lists_again_after_compaction_and_converges() {
    let Some(Pair {
        mut etcd,
        dir: _dir,
        cfg: _cfg,
        a,
        b,
    }) = Pair::start().await
    else {
        return;
    };
    registered(&ask(a.registry, "REGISTER|before|127.0.0.1:39301").await);
    until(Duration::from_secs(2), "b sees before", || async {
        resolve(&b, "before").await.is_some()
    })
    .await;

    // b stops; etcd restarts under it (b's watch stream breaks, unseen); the catalog
    // changes and etcd compacts: b must watch again from a revision that is gone.
    b.signal("-STOP");
    etcd.kill(0);
    etcd.restart(0);
    etcd.wait_writable(Duration::from_secs(20)).await;
    until(Duration::from_secs(10), "a writes again", || async {
        ask(a.registry, "REGISTER|during|127.0.0.1:39302")
            .await
            .starts_with("REGISTERED")
    })
    .await;
    let (id, secret, _) = registered(&ask(a.registry, "REGISTER|during|127.0.0.1:39302").await);
    assert_eq!(
        ask(a.registry, &format!("DEREGISTER|{id}|{secret}")).await,
        "OK"
    );
    registered(&ask(a.registry, "REGISTER|after|127.0.0.1:39303").await);
    let mut c = etcd.client().await;
    let rev = c.get("/", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.unwrap();
    b.signal("-CONT");
    until(Duration::from_secs(10), "b converges", || async {
        resolve(&b, "after").await.is_some()
            && resolve(&b, "during").await.is_none()
            && view(&b).await == view(&a).await
    })
    .await;
    assert!(
        b.log().contains("listing again"),
        "b listed again:\n{}",
        b.log()
    );
}

/// The same name keeps its VIP through its hold across the cluster, and another name
/// never gets it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_is_held_for_its_name_cluster_wide() {
    let Some(Pair {
        etcd: _etcd,
        dir: _dir,
        cfg: _cfg,
        a,
        b,
    }) = Pair::start().await
    else {
        return;
    };
    let (id, secret, vip) = registered(&ask(a.registry, "REGISTER|held|127.0.0.1:39401").await);
    assert_eq!(
        ask(a.registry, &format!("DEREGISTER|{id}|{secret}")).await,
        "OK"
    );
    until(Duration::from_secs(2), "b drops held", || async {
        resolve(&b, "held").await.is_none()
    })
    .await;
    // Back on the other node: the same address.
    let (_, _, again) = registered(&ask(b.registry, "REGISTER|held|127.0.0.1:39402").await);
    assert_eq!(again, vip);
    let addr: SocketAddr = b.registry;
    let _ = addr;
}

/// What a load test saw: acknowledged registrations and the views nodes answered.
#[derive(Default)]
struct History {
    /// (name, instance id, VIP) of every acknowledged registration.
    acks: Vec<(String, String, IpAddr)>,
    /// (name, VIP) answered by any node's RESOLVE during the run.
    observed: Vec<(String, IpAddr)>,
}

impl History {
    /// VIP uniqueness and stability: one VIP per name, one name per VIP, over every
    /// acknowledgement and every observation.
    fn check_vips(&self) {
        let mut by_name: HashMap<&str, IpAddr> = HashMap::new();
        let mut by_vip: HashMap<IpAddr, &str> = HashMap::new();
        let seen = self
            .acks
            .iter()
            .map(|(n, _, v)| (n.as_str(), *v))
            .chain(self.observed.iter().map(|(n, v)| (n.as_str(), *v)));
        for (name, vip) in seen {
            let first = *by_name.entry(name).or_insert(vip);
            assert_eq!(first, vip, "{name} had {first} and then {vip}");
            let owner = *by_vip.entry(vip).or_insert(name);
            assert_eq!(owner, name, "{vip} was given to {owner} and to {name}");
        }
    }

    /// No lost acknowledgement: every acknowledged instance is in `instances`.
    fn check_acks(&self, node: &str, instances: &BTreeSet<String>) {
        for (name, id, _) in &self.acks {
            assert!(
                instances.contains(id),
                "{node} lost acknowledged {name} {id}"
            );
        }
    }
}

/// Every instance id a node's API lists.
async fn instance_ids(node: &Node) -> BTreeSet<String> {
    let (status, body) = get(node.api, "/v1/services?detail=true").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_under_load_loses_no_acknowledged_registration() {
    let Some(mut etcd) = Etcd::start(3).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig::new(&etcd, dir.path());
    let nodes = [
        Node::start(&cfg, "a"),
        Node::start(&cfg, "b"),
        Node::start(&cfg, "c"),
    ];
    let registries: Vec<SocketAddr> = nodes.iter().map(|n| n.registry).collect();
    let history = std::sync::Arc::new(std::sync::Mutex::new(History::default()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6u16 {
        let (registries, history, stop) = (registries.clone(), history.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut k = 0u16;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Names shared between workers race for one VIP; ports keep instances apart.
                let name = format!("load-{}", (w + k) % 40);
                let port = 42000 + w * 1000 + k;
                let node = registries[usize::from(w + k) % registries.len()];
                let answer = ask(node, &format!("REGISTER|{name}|127.0.0.1:{port}")).await;
                if answer.starts_with("REGISTERED") {
                    let (id, _, vip) = registered(&answer);
                    history.lock().unwrap().acks.push((name.clone(), id, vip));
                } else {
                    assert!(
                        answer.starts_with("FAILED|cluster store unavailable"),
                        "{answer}"
                    );
                }
                if let Some(r) = ask(node, &format!("RESOLVE|{name}"))
                    .await
                    .strip_prefix("RESOLVED|")
                    .map(str::to_string)
                {
                    let vip = r.split('|').nth(1).unwrap().parse().unwrap();
                    history.lock().unwrap().observed.push((name, vip));
                }
                k += 1;
            }
        }));
    }
    until(Duration::from_secs(10), "some registrations", || async {
        history.lock().unwrap().acks.len() >= 50
    })
    .await;
    let leader = etcd.leader().await;
    etcd.kill(leader);
    let acked_at_kill = history.lock().unwrap().acks.len();
    until(
        Duration::from_secs(10),
        "registrations go on after the kill",
        || async { history.lock().unwrap().acks.len() >= acked_at_kill + 50 },
    )
    .await;
    etcd.restart(leader);
    // Registrations go on with the old leader back in the cluster.
    let acked_at_restart = history.lock().unwrap().acks.len();
    until(
        Duration::from_secs(10),
        "registrations go on after the restart",
        || async { history.lock().unwrap().acks.len() >= acked_at_restart + 50 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    history.check_vips();
    // Every node converges on one view holding every acknowledged instance.
    until(
        Duration::from_secs(5),
        "the three views converge",
        || async {
            let mut views = Vec::new();
            for n in &nodes {
                views.push((view(n).await, instance_ids(n).await));
            }
            views[0] == views[1] && views[1] == views[2]
        },
    )
    .await;
    for n in &nodes {
        history.check_acks(&n.log.display().to_string(), &instance_ids(n).await);
    }
    eprintln!(
        "{} acknowledged registrations, {} observations",
        history.acks.len(),
        history.observed.len()
    );
}

/// A node that joins lists the catalog in pages (one answer would exceed gRPC's message
/// limit on a large catalog) and holds all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_lists_a_catalog_larger_than_one_page() {
    let Some(etcd) = Etcd::start(1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ClusterConfig::new(&etcd, dir.path());
    cfg.max_heartbeat_age = 300;
    let a = Node::start(&cfg, "a");
    let total = 2500u32;
    let mut tasks = Vec::new();
    for w in 0..25u32 {
        let addr = a.registry;
        tasks.push(tokio::spawn(async move {
            let mut line = common::Line::connect(addr).await;
            for k in 0..total / 25 {
                let i = w * (total / 25) + k;
                let ip = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                let answer = line
                    .ask(&format!("REGISTER|page-{}|{ip}:7000", i % 50))
                    .await;
                assert!(answer.starts_with("REGISTERED"), "{answer}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let joiner = Node::start(&cfg, "joiner");
    let ids = instance_ids(&joiner).await;
    assert_eq!(ids.len(), total as usize);
    assert_eq!(ids, instance_ids(&a).await);
    assert_eq!(view(&joiner).await, view(&a).await);
}

/// A node whose lease ran out (cut off from etcd longer than the TTL; here: revoked) grants
/// a new one and puts its instances back; their clients' heartbeats go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_granted_again_and_its_instances_put_back() {
    let Some(Pair {
        etcd,
        dir: _dir,
        cfg: _cfg,
        a,
        b,
    }) = Pair::start().await
    else {
        return;
    };
    let (id, secret, vip) = registered(&ask(a.registry, "REGISTER|kept|127.0.0.1:39501").await);
    until(Duration::from_secs(2), "b sees kept", || async {
        resolve(&b, "kept").await.is_some()
    })
    .await;
    // Revoke every lease: etcd deletes the node's keys at once.
    let c = etcd.client().await;
    let mut leases = c.lease_client();
    for l in leases.leases().await.unwrap().leases() {
        leases.revoke(l.id()).await.unwrap();
    }
    until(Duration::from_secs(5), "a put kept back", || async {
        let (s, body) = get(b.api, "/v1/services/kept").await;
        s == 200 && body.contains(&id) && body.contains("\"owner\":\"a\"")
    })
    .await;
    assert_eq!(resolve(&b, "kept").await, Some((vip, 1)));
    until(
        Duration::from_secs(3),
        "heartbeats work on a again",
        || async { ask(a.registry, &format!("HEARTBEAT|{id}|{secret}")).await == "HEARTBEAT_OK" },
    )
    .await;
    assert!(
        a.log().contains("putting its instances back"),
        "{}",
        a.log()
    );
    // a is listed again too.
    let (_, nodes) = get(b.api, "/v1/nodes").await;
    assert!(nodes.contains("\"id\":\"a\""), "{nodes}");
}

/// A node reaches etcd over TLS with a client certificate (`[store] ca_file`,
/// `cert_file`, `key_file`), as a production etcd requires; without the certificate it
/// fails to start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_to_etcd_over_tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    if common::cluster::etcd_binary().is_none() {
        return;
    }
    let Some(etcd) = Etcd::start_tls(certs.path()).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ClusterConfig::new(&etcd, dir.path());
    let f = |n: &str| certs.path().join(n).display().to_string();
    cfg.store_extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        f("ca.pem"),
        f("client.pem"),
        f("client-key.pem")
    );
    let a = Node::start(&cfg, "a");
    let b = Node::start(&cfg, "b");
    let (_, _, vip) = registered(&ask(a.registry, "REGISTER|secure|127.0.0.1:39601").await);
    until(
        Duration::from_secs(2),
        "b answers over TLS-fed views",
        || async { resolve(&b, "secure").await == Some((vip, 1)) },
    )
    .await;
    let (_, health) = get(a.api, "/v1/health").await;
    assert!(health.contains("\"status\":\"ok\""), "{health}");

    // Without a client certificate etcd refuses the node, and start-up says so.
    cfg.store_extra = format!("ca_file = \"{}\"", f("ca.pem"));
    let config = dir.path().join("nocert.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{}\"\n{}\n[network]\nvip_cidr = \"{}\"\n",
            cfg.url(),
            cfg.store_extra,
            cfg.vip_cidr
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_netsel"));
    cmd.arg("serve").arg("--config").arg(&config);
    for flag in common::LISTEN_FLAGS {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd") && err.contains("cert_file"), "{err}");
}
