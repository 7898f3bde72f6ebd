//! The Consul-compatible API (docs/consul.md) on the real `netsel serve` binary with
//! `--consul-addr 127.0.0.1:0`: every endpoint over plain HTTP, ACL tokens, blocking
//! queries, and the real Consul client libraries (tests/consul/client.py with Debian's
//! python3-consul and PyPI's python-consul2 and py-consul; skipped with a note when one
//! is missing, failed when `CI` is set).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netsel::client::http::{self, HttpRequest, HttpResponse};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

/// A running `netsel serve` with the Consul listener on.
struct Server {
    child: Child,
    api: SocketAddr,
    consul: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary in memory with every listener on 127.0.0.1:0, a lease TTL of
/// `ttl_secs`, and `config` (TOML) as its configuration file.
fn serve(ttl_secs: u64, config: &str) -> Server {
    let pool = format!("127.{}.{}.0/24", fastrand::u8(1..=250), fastrand::u8(..));
    serve_with(ttl_secs, config, None, &pool)
}

/// [`serve`], durable in `data_dir` when given, with VIP pool `pool`.
fn serve_with(ttl_secs: u64, config: &str, data_dir: Option<&Path>, pool: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("netsel.toml");
    std::fs::write(&conf, format!("min_ttl_ms = 100\n{config}")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netsel"));
    cmd.arg("serve").arg("--config").arg(&conf);
    match data_dir {
        Some(d) => cmd.arg("--data-dir").arg(d),
        None => cmd.arg("--in-memory"),
    };
    for flag in common::LISTEN_FLAGS.iter().chain(&["--consul-addr"]) {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    cmd.args(["--vip-cidr", pool])
        .args(["--max-heartbeat-age", &ttl_secs.to_string()])
        .args(["--health-check-interval", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn netsel serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let (mut api, mut consul) = (None, None);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(lines.read_line(&mut line).unwrap() > 0, "serve exited");
        let l = line.trim();
        if let Some(a) = l.strip_prefix("api: ") {
            api = Some(a.parse().unwrap());
        }
        if let Some(a) = l.strip_prefix("consul: ") {
            consul = Some(a.parse().unwrap());
        }
        if l == "ready" {
            break;
        }
    }
    Server {
        child,
        api: api.expect("api address printed"),
        consul: consul.expect("consul address printed"),
        _dir: dir,
    }
}

async fn send(addr: SocketAddr, req: HttpRequest<'_>) -> HttpResponse {
    http::send(addr, &req, T).await.unwrap()
}

async fn get(s: &Server, path: &str) -> HttpResponse {
    send(s.consul, HttpRequest::new("GET", path)).await
}

async fn put(s: &Server, path: &str, body: Value) -> HttpResponse {
    send(
        s.consul,
        HttpRequest::new("PUT", path).json(body.to_string()),
    )
    .await
}

fn body(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.text()))
}

fn index(r: &HttpResponse) -> u64 {
    r.header("x-consul-index")
        .expect("X-Consul-Index")
        .parse()
        .unwrap()
}

/// The string at `pointer` in each element of the array `v`.
fn pluck(v: &Value, pointer: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|e| {
            e.pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

/// A TTL-checked registration of `name` with ID `id` on 127.0.0.1:`port`.
fn ttl_reg(name: &str, id: &str, port: u16, tags: &[&str]) -> Value {
    json!({
        "Name": name, "ID": id, "Address": "127.0.0.1", "Port": port, "Tags": tags,
        "Meta": {"version": "1"},
        "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "1m"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_pass_read_and_deregister_over_http() {
    let s = serve(30, "");
    // Reads carry the Consul headers, with an index above 0 on an empty catalog.
    let r = get(&s, "/v1/catalog/services").await;
    assert_eq!(r.status, 200);
    assert!(index(&r) > 0);
    assert_eq!(r.header("x-consul-knownleader"), Some("true"));
    assert!(r.header("x-consul-lastcontact").is_some());
    assert_eq!(body(&r), json!({}));
    let r = get(&s, "/v1/status/leader").await;
    assert_eq!(body(&r), json!(s.consul.to_string()));
    assert_eq!(
        body(&get(&s, "/v1/status/peers").await)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = get(&s, "/v1/agent/self").await;
    assert_eq!(body(&r)["Config"]["Datacenter"], "dc1");
    assert_eq!(
        body(&get(&s, "/v1/catalog/datacenters").await),
        json!(["dc1"])
    );

    for (id, port, tags) in [
        ("web-1", 8001, &["blue", "v1"][..]),
        ("web-2", 8002, &["green"][..]),
        ("web-3", 8003, &["blue"][..]),
    ] {
        let r = put(
            &s,
            "/v1/agent/service/register",
            ttl_reg("web", id, port, tags),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = get(&s, "/v1/catalog/services").await;
    assert_eq!(body(&r), json!({"web": ["blue", "green", "v1"]}));
    let i1 = index(&r);

    // A TTL check starts critical: listed, but not with ?passing.
    let r = get(&s, "/v1/health/service/web").await;
    let health = body(&r);
    assert_eq!(health.as_array().unwrap().len(), 3);
    let e = &health[0];
    assert_eq!(e["Service"]["Service"], "web");
    assert_eq!(e["Service"]["Port"], 8001);
    assert_eq!(e["Service"]["Address"], "127.0.0.1");
    assert_eq!(
        e["Service"]["Meta"],
        json!({"version": "1"}),
        "no consul- keys"
    );
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    let checks = e["Checks"].as_array().unwrap();
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[1]["CheckID"], "service:web-1");
    assert_eq!(checks[1]["Status"], "critical");
    assert_eq!(checks[1]["ServiceID"], "web-1");
    assert_eq!(checks[1]["Type"], "ttl");
    let r = get(&s, "/v1/health/service/web?passing").await;
    assert_eq!(body(&r), json!([]));

    // Pass two of them (GET, as old clients send it, and PUT).
    let r = get(&s, "/v1/agent/check/pass/service:web-1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = put(&s, "/v1/agent/check/pass/service:web-3?note=ok", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/health/service/web?passing=1").await;
    assert!(index(&r) > i1, "the index moved with the health");
    assert_eq!(pluck(&body(&r), "/Service/ID"), ["web-1", "web-3"]);
    let passing = body(&r);
    assert_eq!(passing[0]["Checks"][1]["Status"], "passing");

    // Catalog and health list the instances in the same order; tags filter both.
    let cat = body(&get(&s, "/v1/catalog/service/web").await);
    let health = body(&get(&s, "/v1/health/service/web").await);
    assert_eq!(pluck(&cat, "/ServiceID"), pluck(&health, "/Service/ID"));
    assert_eq!(pluck(&cat, "/ServiceID").len(), 3);
    assert_eq!(cat[1]["ServiceName"], "web");
    assert_eq!(cat[1]["ServicePort"], 8002);
    assert_eq!(cat[1]["ServiceAddress"], "127.0.0.1");
    assert_eq!(cat[1]["ServiceTags"], json!(["green"]));
    let r = get(&s, "/v1/catalog/service/web?tag=blue").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 2);
    let r = get(&s, "/v1/health/service/web?tag=blue&tag=v1").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 1);
    let r = get(&s, "/v1/health/service/web?tag=blue&passing").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 2);

    // Fail one: critical, out of ?passing; warn counts as passing.
    assert_eq!(
        get(&s, "/v1/agent/check/fail/service:web-1").await.status,
        200
    );
    let r = get(&s, "/v1/health/service/web?passing").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 1);
    let r = get(&s, "/v1/health/state/critical").await;
    assert_eq!(pluck(&body(&r), "/ServiceID"), ["web-1", "web-2"]);
    let r = put(
        &s,
        "/v1/agent/check/update/service:web-1",
        json!({"Status": "warning", "Output": "slow"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(&s, "/v1/agent/check/warn/service:web-2").await.status,
        200
    );
    let r = get(&s, "/v1/health/service/web?passing").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 3);

    // The agent's view.
    let services = body(&get(&s, "/v1/agent/services").await);
    assert_eq!(services["web-2"]["Service"], "web");
    assert_eq!(services["web-2"]["Port"], 8002);
    let checks = body(&get(&s, "/v1/agent/checks").await);
    assert_eq!(checks["service:web-3"]["Status"], "passing");
    let r = get(&s, "/v1/health/checks/web").await;
    assert_eq!(
        pluck(&body(&r), "/CheckID"),
        ["service:web-1", "service:web-2", "service:web-3"]
    );

    // The same instances through NetSel's own API.
    let r = send(s.api, HttpRequest::new("GET", "/v1/services/web")).await;
    let native = body(&r);
    assert_eq!(native["instance_count"], 3);
    assert_eq!(native["instances"][0]["meta"]["consul-id"], "web-1");

    // Deregister (PUT, and GET as old clients send it); unknown IDs are 404.
    let r = put(&s, "/v1/agent/service/deregister/web-1", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/agent/service/deregister/web-2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/agent/service/deregister/web-2").await;
    assert_eq!(r.status, 404);
    let r = get(&s, "/v1/agent/check/pass/service:nope").await;
    assert_eq!(r.status, 404);
    let r = get(&s, "/v1/catalog/service/web").await;
    assert_eq!(pluck(&body(&r), "/ServiceID"), ["web-3"]);
    put(&s, "/v1/agent/service/deregister/web-3", json!({})).await;
    let r = get(&s, "/v1/catalog/services").await;
    assert_eq!(body(&r), json!({}));
    let r = get(&s, "/v1/health/service/web").await;
    assert_eq!(
        (r.status, body(&r)),
        (200, json!([])),
        "an unknown service is []"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_return_when_the_answer_changes() {
    let s = serve(30, "");
    let r = put(
        &s,
        "/v1/agent/service/register",
        ttl_reg("api", "api-1", 9001, &[]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/health/service/api?passing").await;
    assert_eq!(body(&r), json!([]));
    let seen = index(&r);

    // Nothing changes: the wait elapses and the same answer comes back.
    let r = get(
        &s,
        &format!("/v1/health/service/api?passing&index={seen}&wait=200ms"),
    )
    .await;
    assert_eq!(body(&r), json!([]));

    // A blocked health query returns once the check passes, with a higher index.
    let consul = s.consul;
    let path = format!("/v1/health/service/api?passing&index={seen}&wait=60s");
    let blocked = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = send(consul, HttpRequest::new("GET", &path)).await;
        (r, started.elapsed())
    });
    // A change to another service does not wake it.
    let r = put(
        &s,
        "/v1/agent/service/register",
        ttl_reg("other", "o-1", 9100, &[]),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(&s, "/v1/agent/check/pass/service:api-1").await;
    assert_eq!(r.status, 200);
    let (r, took) = blocked.await.unwrap();
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(index(&r) > seen);
    assert_eq!(body(&r)[0]["Service"]["ID"], "api-1");

    // The services list blocks too, and wakes on a new service.
    let r = get(&s, "/v1/catalog/services").await;
    let seen = index(&r);
    let path = format!("/v1/catalog/services?index={seen}&wait=60s");
    let blocked = tokio::spawn(async move { send(consul, HttpRequest::new("GET", &path)).await });
    let r = put(
        &s,
        "/v1/agent/service/register",
        ttl_reg("db", "db-1", 5432, &["x"]),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = blocked.await.unwrap();
    assert!(index(&r) > seen);
    assert_eq!(body(&r)["db"], json!(["x"]));

    // The critical checks wake when one turns critical (Traefik watches health/state).
    let r = get(&s, "/v1/health/state/critical").await;
    let seen = index(&r);
    assert_eq!(pluck(&body(&r), "/ServiceID"), ["db-1", "o-1"]);
    let path = format!("/v1/health/state/critical?index={seen}&wait=60s");
    let blocked = tokio::spawn(async move { send(consul, HttpRequest::new("GET", &path)).await });
    assert_eq!(
        get(&s, "/v1/agent/check/fail/service:api-1").await.status,
        200
    );
    let r = blocked.await.unwrap();
    assert!(index(&r) > seen);
    assert_eq!(pluck(&body(&r), "/ServiceID"), ["api-1", "db-1", "o-1"]);

    // The catalog view of one service wakes when it is deregistered.
    let r = get(&s, "/v1/catalog/service/db").await;
    let seen = index(&r);
    let path = format!("/v1/catalog/service/db?index={seen}&wait=60s");
    let blocked = tokio::spawn(async move { send(consul, HttpRequest::new("GET", &path)).await });
    put(&s, "/v1/agent/service/deregister/db-1", json!({})).await;
    let r = blocked.await.unwrap();
    assert!(index(&r) > seen);
    assert_eq!(body(&r), json!([]));

    // Waits are Go durations; a bad one is a 400.
    let r = get(&s, "/v1/catalog/services?index=1&wait=soon").await;
    assert_eq!(r.status, 400);
    let r = get(&s, "/v1/catalog/services?index=1&wait=1m30s").await;
    assert_eq!(r.status, 200, "the client is behind: answered at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_are_leases_and_checkless_services_are_held() {
    let s = serve(1, "");
    // A 1 s TTL check nobody passes, and a service with no check (the listener holds its
    // lease, whose TTL is the 1 s default).
    let mut reg = ttl_reg("short", "short-1", 7001, &[]);
    reg["Check"]["TTL"] = json!("1s");
    assert_eq!(put(&s, "/v1/agent/service/register", reg).await.status, 200);
    let held = json!({"Name": "held", "Port": 7002});
    let r = put(&s, "/v1/agent/service/register", held).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Without an ID the name is the ID; without an address, the client's.
    let r = get(&s, "/v1/catalog/service/held").await;
    assert_eq!(body(&r)[0]["ServiceID"], "held");
    assert_eq!(body(&r)[0]["ServiceAddress"], "127.0.0.1");
    let r = get(&s, "/v1/health/service/held?passing").await;
    assert_eq!(body(&r).as_array().unwrap().len(), 1, "no check: passing");
    assert_eq!(pluck(&body(&r)[0]["Checks"], "/CheckID"), ["serfHealth"]);
    assert_eq!(
        get(&s, "/v1/agent/check/pass/service:held").await.status,
        404
    );

    // The TTL instance leaves when its lease runs out; block until the list changes.
    let mut seen = index(&get(&s, "/v1/catalog/services").await);
    loop {
        let r = get(&s, &format!("/v1/catalog/services?index={seen}&wait=10s")).await;
        if body(&r).get("short").is_none() {
            break;
        }
        assert!(index(&r) > seen, "short never expired");
        seen = index(&r);
    }
    // By then (over 1 s after it registered) the held service is still there.
    let r = get(&s, "/v1/catalog/services").await;
    assert!(body(&r).get("held").is_some(), "{}", r.text());
}

/// Consul registrations are ordinary instances: they survive a restart of a durable
/// server with their Consul IDs, check IDs and held leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_registrations_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let pool = format!("127.{}.{}.0/24", fastrand::u8(1..=250), fastrand::u8(..));
    let mut reg = ttl_reg("pay", "pay-1", 7100, &["v2"]);
    reg["Check"] = json!({"CheckID": "pay-ttl", "TTL": "30s"});
    let held = json!({"Name": "ledger", "ID": "ledger-1", "Port": 7200});
    {
        let s = serve_with(2, "", Some(data.path()), &pool);
        assert_eq!(put(&s, "/v1/agent/service/register", reg).await.status, 200);
        assert_eq!(
            put(&s, "/v1/agent/service/register", held).await.status,
            200
        );
        assert_eq!(get(&s, "/v1/agent/check/pass/pay-ttl").await.status, 200);
    } // killed
    let s = serve_with(2, "", Some(data.path()), &pool);
    let r = get(&s, "/v1/catalog/services").await;
    assert_eq!(body(&r), json!({"ledger": [], "pay": ["v2"]}));
    let r = get(&s, "/v1/health/service/pay").await;
    assert_eq!(pluck(&body(&r), "/Service/ID"), ["pay-1"]);
    assert_eq!(
        pluck(&body(&r)[0]["Checks"], "/CheckID"),
        ["serfHealth", "pay-ttl"]
    );
    assert_eq!(get(&s, "/v1/agent/check/fail/pay-ttl").await.status, 200);
    // The held lease (2 s) is renewed after the restart too: the ledger outlives the
    // moment its restored lease would have run out.
    let r = get(&s, "/v1/health/service/ledger").await;
    let seen = index(&r);
    let r = get(
        &s,
        &format!("/v1/health/service/ledger?index={seen}&wait=3s"),
    )
    .await;
    assert_eq!(
        pluck(&body(&r), "/Service/ID"),
        ["ledger-1"],
        "{}",
        r.text()
    );
    assert_eq!(
        put(&s, "/v1/agent/service/deregister/ledger-1", json!({}))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_read_like_consul_and_refused_with_reasons() {
    let s = serve(30, "");
    // Keys in any case, snake_case too; Weights; an HTTP check becomes an active check.
    let r = put(
        &s,
        "/v1/agent/service/register",
        json!({
            "name": "Shop", "id": "shop-a", "address": "127.0.0.1", "port": 8443,
            "tags": ["a"], "meta": {"k": "v"}, "weights": {"passing": 5, "warning": 1},
            "enable_tag_override": true, "tagged_addresses": {},
            "check": {"http": "http://127.0.0.1:8443/healthz", "interval": "10s",
                      "timeout": "1s", "status": "passing"},
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/health/service/shop").await;
    let e = &body(&r)[0];
    assert_eq!(
        e["Service"]["Service"], "shop",
        "names are answered lower-case"
    );
    assert_eq!(e["Service"]["Weights"]["Passing"], 5);
    assert_eq!(e["Checks"][1]["Type"], "http");
    assert_eq!(e["Checks"][1]["Status"], "passing");
    let r = send(s.api, HttpRequest::new("GET", "/v1/services/shop")).await;
    assert_eq!(
        body(&r)["instances"][0]["check"],
        json!({"type": "http", "path": "/healthz"})
    );

    // Registering the same ID again at another port moves it: still one instance.
    let r = put(
        &s,
        "/v1/agent/service/register",
        json!({"Name": "shop", "ID": "shop-a", "Address": "127.0.0.1", "Port": 8444,
               "Check": {"CheckID": "shop-alive", "TTL": "10s", "Status": "passing"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/catalog/service/shop").await;
    let list = body(&r);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["ServicePort"], 8444);
    // Its TTL check has the ID the client chose.
    assert_eq!(get(&s, "/v1/agent/check/fail/shop-alive").await.status, 200);
    let r = get(&s, "/v1/health/service/shop").await;
    assert_eq!(body(&r)[0]["Checks"][1]["CheckID"], "shop-alive");
    assert_eq!(body(&r)[0]["Checks"][1]["Status"], "critical");
    // Registered again without checks, it has none and is passing.
    let r = put(
        &s,
        "/v1/agent/service/register",
        json!({"Name": "shop", "ID": "shop-a", "Address": "127.0.0.1", "Port": 8444}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/v1/health/service/shop?passing").await;
    assert_eq!(pluck(&body(&r), "/Service/ID"), ["shop-a"]);
    assert_eq!(pluck(&body(&r)[0]["Checks"], "/CheckID"), ["serfHealth"]);

    // A TCP check becomes NetSel's tcp check (to the instance's own endpoint); nothing
    // has checked it yet, so it is critical and left out of `passing`.
    let r = put(
        &s,
        "/v1/agent/service/register",
        json!({"Name": "cart", "ID": "cart-a", "Address": "127.0.0.1", "Port": 8445,
               "Check": {"TCP": "127.0.0.1:8445", "Interval": "10s"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(s.api, HttpRequest::new("GET", "/v1/services/cart")).await;
    assert_eq!(body(&r)["instances"][0]["check"], json!({"type": "tcp"}));
    let r = get(&s, "/v1/health/service/cart").await;
    assert_eq!(body(&r)[0]["Checks"][1]["Type"], "tcp");
    assert_eq!(body(&r)[0]["Checks"][1]["Status"], "critical");
    let r = get(&s, "/v1/health/service/cart?passing").await;
    assert_eq!(body(&r), json!([]));

    // Refusals: 400 with a reason.
    for (bad, why) in [
        (json!({"Port": 1}), "name"),
        (json!({"Name": "a_b", "Port": 1}), "name"),
        (json!({"Name": "x"}), "Port"),
        (
            json!({"Name": "x", "Port": 1, "Address": "db.example"}),
            "host name",
        ),
        (
            json!({"Name": "x", "Port": 1, "Meta": {"consul-x": "1"}}),
            "reserved",
        ),
        (
            json!({"Name": "x", "Port": 1, "Check": {"Args": ["true"], "Interval": "1s"}}),
            "args",
        ),
        (
            json!({"Name": "x", "Port": 1, "Check": {"TTL": "soon"}}),
            "TTL",
        ),
        (
            json!({"Name": "x", "Port": 1, "Check": {"HTTP": "http://a/", "TCP": "a:1"}}),
            "both",
        ),
        (
            json!({"Name": "x", "Port": 1, "Check": {"TTL": "1h", "HTTP": "http://a/"}}),
            "one of",
        ),
        (
            json!({"Name": "x", "Port": 1, "Kind": "connect-proxy"}),
            "kind",
        ),
        (json!({"Name": "x", "ID": "a/b", "Port": 1}), "service ID"),
        (
            json!({"Name": "x", "Port": 1, "Checks": [{"TTL": "5s"}, {"TTL": "6s"}]}),
            "one TTL",
        ),
    ] {
        let r = put(&s, "/v1/agent/service/register", bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains(why), "{bad}: {}", r.text());
    }
    let r = send(
        s.consul,
        HttpRequest::new("PUT", "/v1/agent/service/register").json("{not json"),
    )
    .await;
    assert_eq!(r.status, 400);
    // A body without a content type (what python-consul sends) is read as JSON.
    let raw = br#"{"Name":"plain","Port":4000}"#;
    let mut stream = std::net::TcpStream::connect(s.consul).unwrap();
    write!(
        stream,
        "PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        raw.len()
    )
    .unwrap();
    stream.write_all(raw).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Reads refuse what they cannot honour.
    assert_eq!(get(&s, "/v1/catalog/services?dc=eu1").await.status, 500);
    assert_eq!(get(&s, "/v1/catalog/services?dc=dc1").await.status, 200);
    assert_eq!(
        get(&s, "/v1/health/service/shop?filter=x").await.status,
        400
    );
    assert_eq!(get(&s, "/v1/kv/a").await.status, 404);
    assert_eq!(get(&s, "/v1/health/state/bogus").await.status, 400);
    // Nodes carry no metadata: a node-meta filter matches nothing.
    let r = get(&s, "/v1/health/service/shop?node-meta=rack:a").await;
    assert_eq!((r.status, body(&r)), (200, json!([])));
    let r = get(&s, "/v1/catalog/services?node-meta=rack:a").await;
    assert_eq!(body(&r), json!({}));
    // Instances registered through NetSel's own API are read, not written, here.
    let r = send(
        s.api,
        HttpRequest::new("POST", "/v1/instances")
            .json(json!({"name": "native", "address": "127.0.0.1", "port": 6000}).to_string()),
    )
    .await;
    assert_eq!(r.status, 201);
    let id = body(&r)["id"].as_str().unwrap().to_string();
    let r = get(&s, "/v1/catalog/service/native").await;
    assert_eq!(body(&r)[0]["ServiceID"], id.as_str());
    let r = put(&s, &format!("/v1/agent/service/deregister/{id}"), json!({})).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_tokens_map_onto_netsel_acls() {
    let s = serve(
        30,
        r#"
[acl]
enabled = true
[[acl.tokens]]
name = "web"
token = "web-token-0123456789"
write = ["web"]
[[acl.tokens]]
name = "reader"
token = "read-token-0123456789"
read = ["*"]
"#,
    );
    let reg = ttl_reg("web", "web-1", 8080, &[]);
    // No token, or a reader: 403. A writer, by header or ?token=: 200.
    let r = put(&s, "/v1/agent/service/register", reg.clone()).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = put(
        &s,
        "/v1/agent/service/register?token=read-token-0123456789",
        reg.clone(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = put(
        &s,
        "/v1/agent/service/register?token=unknown-token-0123456789",
        reg.clone(),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("ACL not found"), "{}", r.text());
    let r = send(
        s.consul,
        HttpRequest::new("PUT", "/v1/agent/service/register")
            .header("X-Consul-Token", "web-token-0123456789")
            .json(reg.to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut api = ttl_reg("api", "api-1", 8081, &[]);
    api["Check"] = json!({"TTL": "30s", "Status": "passing"});
    let r = put(
        &s,
        "/v1/agent/service/register?token=web-token-0123456789",
        api,
    )
    .await;
    assert_eq!(r.status, 403, "the web token may not register api");

    // Reads without a token are filtered to nothing; the reader sees everything; the web
    // token sees web.
    let r = get(&s, "/v1/catalog/services").await;
    assert_eq!((r.status, body(&r)), (200, json!({})));
    let r = get(&s, "/v1/health/service/web").await;
    assert_eq!(body(&r), json!([]));
    let r = get(&s, "/v1/catalog/services?token=read-token-0123456789").await;
    assert_eq!(body(&r), json!({"web": []}));
    let r = send(
        s.consul,
        HttpRequest::new("GET", "/v1/health/service/web")
            .header("X-Consul-Token", "web-token-0123456789"),
    )
    .await;
    assert_eq!(body(&r).as_array().unwrap().len(), 1);
    assert_eq!(get(&s, "/v1/agent/self").await.status, 403);
    let r = get(&s, "/v1/agent/self?token=read-token-0123456789").await;
    assert_eq!(r.status, 200);

    // Check updates and deregistration need write rights on the service.
    let r = get(
        &s,
        "/v1/agent/check/pass/service:web-1?token=read-token-0123456789",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = get(&s, "/v1/agent/check/pass/service:web-1").await;
    assert_eq!(r.status, 404, "anonymous cannot even see it");
    let r = get(
        &s,
        "/v1/agent/check/pass/service:web-1?token=web-token-0123456789",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = put(
        &s,
        "/v1/agent/service/deregister/web-1?token=read-token-0123456789",
        json!({}),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = put(
        &s,
        "/v1/agent/service/deregister/web-1?token=web-token-0123456789",
        json!({}),
    )
    .await;
    assert_eq!(r.status, 200);
}

// ---- real clients ----

/// How to run a Python Consul client: an interpreter and an optional PYTHONPATH.
struct PyClient {
    label: &'static str,
    python: PathBuf,
    path: Option<PathBuf>,
}

fn have_module(python: &Path, path: Option<&Path>) -> bool {
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import consul"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = path {
        cmd.env("PYTHONPATH", p);
    }
    cmd.status().is_ok_and(|s| s.success())
}

/// The client, or `None` (with a note) when it is not installed; in CI, missing is a
/// failure.
fn py_client(label: &'static str) -> Option<PyClient> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consul");
    let found = match label {
        // Debian's package lives under the system interpreter.
        "python3-consul" => {
            let python = PathBuf::from("/usr/bin/python3");
            have_module(&python, None).then_some(PyClient {
                label,
                python,
                path: None,
            })
        }
        // PyPI's, each in its own directory (they share the module name `consul`).
        _ => {
            let dir = root.join("pydeps").join(label);
            let python = PathBuf::from("python3");
            (dir.is_dir() && have_module(&python, Some(&dir))).then_some(PyClient {
                label,
                python,
                path: Some(dir),
            })
        }
    };
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{label} is required in CI (.ci/run installs it)"
        );
        let how = match label {
            "python3-consul" => "apt-get install python3-consul".to_string(),
            _ => format!("python3 -m pip install --target tests/consul/pydeps/{label} {label}"),
        };
        eprintln!("note: {label} not installed; skipping ({how}; .ci/run does)");
    }
    found
}

fn run_client(label: &'static str) {
    let Some(client) = py_client(label) else {
        return;
    };
    let s = serve(30, "");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consul/client.py");
    let mut cmd = Command::new(&client.python);
    cmd.arg(script)
        .arg(s.consul.ip().to_string())
        .arg(s.consul.port().to_string())
        .arg(format!("svc-{}", client.label.replace('.', "-")))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(p) = &client.path {
        cmd.env("PYTHONPATH", p);
    }
    let out = cmd.output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        client.label
    );
    assert!(stdout.starts_with("ok"), "{stdout}");
    eprintln!("{}: {}", client.label, stdout.trim());
}

#[test]
fn debian_python3_consul() {
    run_client("python3-consul");
}

#[test]
fn pypi_python_consul2() {
    run_client("python-consul2");
}

#[test]
fn pypi_py_consul() {
    run_client("py-consul");
}
