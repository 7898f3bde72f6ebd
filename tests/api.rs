//! The HTTP/JSON API, in-process through the router (tower `oneshot`) and on port 0.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use netsel::api::{self, ApiState};
use netsel::catalog::Catalog;
use netsel::config::{AclSettings, AclToken, ApiSettings, Settings};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    catalog: Catalog,
    _shutdown: tokio_util::sync::DropGuard,
}

fn api_with(settings: ApiSettings, acl: AclSettings) -> Api {
    let catalog = Catalog::in_memory(Settings::ephemeral().catalog_settings()).unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let c = catalog.clone();
        let s = shutdown.clone();
        async move { c.run(s).await }
    });
    let state = ApiState::new(catalog.clone(), &settings, &acl, None, shutdown.clone());
    Api {
        router: api::router(state),
        catalog,
        _shutdown: shutdown.drop_guard(),
    }
}

fn api() -> Api {
    api_with(ApiSettings::default(), AclSettings::default())
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

impl Api {
    async fn call(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            json,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn send(&self, method: &str, path: &str, body: Value, extra: &[(&str, &str)]) -> Reply {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        self.call(b.body(body).unwrap()).await
    }

    async fn register(&self, body: Value) -> Reply {
        self.send("POST", "/v1/instances", body, &[]).await
    }
}

fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.json);
    let msg = r.json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {}", r.json));
    assert!(msg.contains(needle), "error '{msg}' lacks '{needle}'");
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

#[tokio::test]
async fn register_list_get_heartbeat_deregister() {
    let api = api();
    let r = api
        .register(json!({
            "name": "Web", "address": "127.0.0.1", "port": 8000,
            "tags": ["v2", "blue"], "meta": {"zone": "a"}, "weight": 3, "ttl_secs": 30,
            "protocol": "http1", "check": {"type": "http", "path": "/healthz"}
        }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let id = r.json["id"].as_str().unwrap().to_string();
    let secret = r.json["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 32);
    assert_eq!(r.json["service"], "web");
    assert_eq!(r.json["service_port"], 8000);
    assert_eq!(r.json["ttl_secs"], 30);
    assert_eq!(r.json["endpoint"], "127.0.0.1:8000");
    let vip = r.json["vip"].as_str().unwrap().to_string();
    assert!(vip.starts_with("127."), "{vip}");

    let list = api.get("/v1/services").await;
    assert_eq!(list.status, StatusCode::OK);
    let svc = &list.json["services"][0];
    assert_eq!(svc["name"], "web");
    assert_eq!(svc["vip"], vip.as_str());
    assert_eq!(svc["instance_count"], 1);
    // Registered with a check, nothing checked yet (no health checker runs here): not
    // used until its first check passes.
    assert_eq!(svc["healthy_count"], 0);
    assert_eq!(svc["health"], "critical");
    assert_eq!(svc["tags"], json!(["blue", "v2"]));
    assert!(svc.get("instances").is_none());
    let index: u64 = list.headers["x-netsel-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(list.json["index"], index);

    let one = api.get("/v1/services/WEB").await;
    assert_eq!(one.status, StatusCode::OK);
    let inst = &one.json["instances"][0];
    assert_eq!(inst["id"], id.as_str());
    assert_eq!(inst["health"], "critical");
    assert_eq!(
        inst["check_result"],
        json!({"status": "pending", "output": "waiting for the first check", "consecutive": 0})
    );
    assert_eq!(inst["weight"], 3);
    assert_eq!(inst["protocol"], "http1");
    assert_eq!(inst["meta"]["zone"], "a");
    assert_eq!(inst["check"], json!({"type": "http", "path": "/healthz"}));
    let remaining = inst["lease_remaining_ms"].as_u64().unwrap();
    assert!(remaining > 25_000 && remaining <= 30_000, "{remaining}");
    assert!(inst["lease_deadline_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(inst.get("secret").is_none(), "secrets are never listed");

    let hb = api
        .send(
            "PUT",
            &format!("/v1/instances/{id}/heartbeat"),
            Value::Null,
            &[("x-netsel-secret", &secret)],
        )
        .await;
    assert_eq!(hb.status, StatusCode::OK, "{}", hb.json);
    assert_eq!(hb.json["ttl_secs"], 30);
    // The secret may come in the body instead.
    let hb = api
        .send(
            "PUT",
            &format!("/v1/instances/{id}/heartbeat"),
            json!({ "secret": secret }),
            &[],
        )
        .await;
    assert_eq!(hb.status, StatusCode::OK, "{}", hb.json);

    let got = api.get(&format!("/v1/instances/{id}")).await;
    assert_eq!(got.json["service"], "web");

    let del = api
        .send(
            "DELETE",
            &format!("/v1/instances/{id}"),
            Value::Null,
            &[("x-netsel-secret", &secret)],
        )
        .await;
    assert_eq!(del.status, StatusCode::OK, "{}", del.json);
    assert_error(
        &api.get("/v1/services/web").await,
        404,
        "unknown service web",
    );
    assert!(api.catalog.snapshot().service("web").is_none());
}

#[tokio::test]
async fn errors_have_fitting_statuses_and_name_the_field() {
    let api = api();
    let ok = json!({"name": "db", "address": "127.0.0.1", "port": 5432, "service_port": 5432});
    let r = api.register(ok.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json["id"].as_str().unwrap().to_string();

    // 400, naming the field.
    for (body, field) in [
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1, "weight": "x"}),
            "weight",
        ),
        (json!({"address": "127.0.0.1", "port": 1}), "name"),
        (
            json!({"name": "a_b", "address": "127.0.0.1", "port": 1}),
            "name",
        ),
        (
            json!({"name": "db", "address": "not-an-ip", "port": 1}),
            "address",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 70000}),
            "port",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 0}),
            "port",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1, "protocol": "smtp"}),
            "protocol",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1, "weight": 0}),
            "weight",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1, "ttl_secs": 0}),
            "ttl_secs",
        ),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1, "bogus": 1}),
            "bogus",
        ),
        (
            json!({"name": "db", "address": "0.0.0.0", "port": 1}),
            "address",
        ),
        (json!({"name": "db", "address": "0.0.0.0"}), "address"),
        (json!({"name": "db", "address": "224.0.0.1"}), "address"),
        (
            json!({"name": "db", "address": "127.0.0.1", "port": 1.5}),
            "port",
        ),
    ] {
        let r = api.register(body.clone()).await;
        assert_error(&r, 400, field);
        assert_eq!(r.json["field"], field, "{body}");
    }
    let bad_json = api
        .call(
            Request::post("/v1/instances")
                .header("content-type", "application/json")
                .body(Body::from("{\"name\":"))
                .unwrap(),
        )
        .await;
    assert_error(&bad_json, 400, "not valid JSON");
    assert_error(&api.get("/v1/services?index=abc").await, 400, "index");
    assert_error(&api.get("/v1/services?wait=forever").await, 400, "wait");

    // 403: wrong secret.
    let r = api
        .send(
            "PUT",
            &format!("/v1/instances/{id}/heartbeat"),
            Value::Null,
            &[("x-netsel-secret", "0123456789abcdef0123456789abcdef")],
        )
        .await;
    assert_error(&r, 403, "wrong secret");
    let r = api
        .send(
            "DELETE",
            &format!("/v1/instances/{id}"),
            json!({"secret": "nope"}),
            &[],
        )
        .await;
    assert_error(&r, 403, "wrong secret");
    // Without a secret (and without ACLs) deregistration is refused.
    let r = api
        .send("DELETE", &format!("/v1/instances/{id}"), Value::Null, &[])
        .await;
    assert_error(&r, 403, "secret is required");

    // 404: unknown names, ids and paths.
    assert_error(&api.get("/v1/services/nope").await, 404, "unknown service");
    assert_error(
        &api.get("/v1/instances/ffff").await,
        404,
        "unknown instance",
    );
    let r = api
        .send(
            "PUT",
            "/v1/instances/ffff/heartbeat",
            json!({"secret": "x"}),
            &[],
        )
        .await;
    assert_error(&r, 404, "unknown instance");
    assert_error(&api.get("/v2/nothing").await, 404, "no such path");

    // 405 is JSON too.
    assert_error(
        &api.send("PATCH", "/v1/services", Value::Null, &[]).await,
        405,
        "method",
    );

    // 409: another service port.
    let mut conflict = ok.clone();
    conflict["port"] = json!(5433);
    conflict["service_port"] = json!(6000);
    assert_error(
        &api.register(conflict).await,
        409,
        "already answers on port 5432",
    );

    // 413: body too large.
    let big =
        json!({"name": "db", "address": "127.0.0.1", "port": 1, "meta": {"k": "x".repeat(70_000)}});
    assert_error(&api.register(big).await, 413, "larger than");

    // 415: not JSON.
    let r = api
        .call(
            Request::post("/v1/instances")
                .header("content-type", "text/plain")
                .body(Body::from("name=db"))
                .unwrap(),
        )
        .await;
    assert_error(&r, 415, "application/json");
}

#[tokio::test(start_paused = true)]
async fn clients_over_their_rate_get_429() {
    let settings = ApiSettings {
        rate_limit_per_sec: 1,
        rate_limit_burst: 3,
        ..ApiSettings::default()
    };
    let api = api_with(settings, AclSettings::default());
    for _ in 0..3 {
        assert_eq!(api.get("/v1/services").await.status, StatusCode::OK);
    }
    let r = api.get("/v1/services").await;
    assert_error(&r, 429, "rate limit");
    assert_eq!(r.headers["retry-after"], "1");
    // Health is never rate-limited (probes must see the truth).
    assert_eq!(api.get("/v1/health").await.status, StatusCode::OK);
    tokio::time::advance(Duration::from_millis(1100)).await;
    assert_eq!(api.get("/v1/services").await.status, StatusCode::OK);
}

#[tokio::test]
async fn health_reports_liveness_and_readiness() {
    let catalog = Catalog::in_memory(Settings::ephemeral().catalog_settings()).unwrap();
    let shutdown = CancellationToken::new();
    let state = ApiState::new(
        catalog,
        &ApiSettings::default(),
        &AclSettings::default(),
        None,
        shutdown.clone(),
    );
    let router = api::router(state);
    let get = |path: &'static str| {
        let router = router.clone();
        async move {
            let r = router
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (status, body) = get("/v1/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["live"], true);
    assert_eq!(body["ready"], true);
    shutdown.cancel();
    let (status, body) = get("/v1/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert_eq!(body["status"], "shutting_down");
    let (status, _) = get("/v1/health/live").await;
    assert_eq!(status, StatusCode::OK);
}

/// Returns once every other task of this (paused, current-thread) runtime has run as far
/// as it can: paused time moves on only when nothing else is ready to run. What has not
/// finished by then is waiting for something, not slow.
async fn until_idle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

// Paused time, so that "the watcher did not wake" is shown by `until_idle`, not assumed
// after a sleep.
#[tokio::test(start_paused = true)]
async fn blocking_query_returns_when_the_service_changes() {
    let api = api();
    let r = api
        .register(json!({"name": "cache", "address": "127.0.0.1", "port": 6379}))
        .await;
    let secret = r.json["secret"].as_str().unwrap().to_string();
    let id = r.json["id"].as_str().unwrap().to_string();
    let first = api.get("/v1/services/cache").await;
    let index = first.headers["x-netsel-index"]
        .to_str()
        .unwrap()
        .to_string();

    // A change to another service does not wake a watcher of `cache`.
    let waiter = {
        let router = api.router.clone();
        let path = format!("/v1/services/cache?index={index}&wait=20s");
        tokio::spawn(async move {
            let r = router
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let idx = r.headers()["x-netsel-index"].to_str().unwrap().to_string();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (idx, serde_json::from_slice::<Value>(&body).unwrap())
        })
    };
    until_idle().await;
    api.register(json!({"name": "other", "address": "127.0.0.1", "port": 7000}))
        .await;
    until_idle().await;
    assert!(!waiter.is_finished(), "woke for an unrelated change");
    api.register(json!({"name": "cache", "address": "127.0.0.1", "port": 6380}))
        .await;
    let (new_index, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("blocking query did not return after the change")
        .unwrap();
    assert!(new_index.parse::<u64>().unwrap() > index.parse::<u64>().unwrap());
    assert_eq!(body["instances"].as_array().unwrap().len(), 2);

    // Deregistering the last instances wakes a watcher with 404.
    let idx: u64 = new_index.parse().unwrap();
    let waiter = {
        let router = api.router.clone();
        let path = format!("/v1/services/cache?index={idx}&wait=20s");
        tokio::spawn(async move {
            router
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        })
    };
    // The query waits before the two deregistrations, so it sees them end as one 404.
    until_idle().await;
    api.catalog.deregister(&id, &secret).await.unwrap();
    let snap = api.catalog.snapshot();
    let other_id = snap.service("cache").unwrap().instances[0].id.to_string();
    api.catalog.deregister_admin(&other_id).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn blocking_query_times_out_with_the_same_index() {
    let api = api();
    let first = api.get("/v1/services").await;
    let index = first.headers["x-netsel-index"]
        .to_str()
        .unwrap()
        .to_string();
    let started = tokio::time::Instant::now();
    let r = api
        .get(&format!("/v1/services?index={index}&wait=30s"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-netsel-index"].to_str().unwrap(), index);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
}

#[tokio::test]
async fn line_format_serves_the_resolve_answer() {
    let api = api();
    api.register(json!({"name": "lf", "address": "127.0.0.1", "port": 9999, "weight": 2}))
        .await;
    let r = api
        .router
        .clone()
        .oneshot(
            Request::get("/v1/services/lf?format=line")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    match netsel::protocol::Response::parse(text.trim_end()).unwrap() {
        netsel::protocol::Response::Resolved {
            name, instances, ..
        } => {
            assert_eq!(name, "lf");
            assert_eq!(instances[0].endpoint.port(), 9999);
            assert_eq!(instances[0].weight, 2);
        }
        other => panic!("{other:?}"),
    }
}

fn acl() -> AclSettings {
    AclSettings {
        enabled: true,
        anonymous_read: false,
        tokens: vec![
            AclToken {
                name: "web-deployer".into(),
                token: "web-token-0123456789".into(),
                read: vec![],
                write: vec!["web".into()],
            },
            AclToken {
                name: "ops".into(),
                token: "ops-token-0123456789".into(),
                read: vec!["*".into()],
                write: vec!["*".into()],
            },
        ],
        ..AclSettings::default()
    }
}

#[tokio::test]
async fn acl_tokens_gate_reads_and_writes_by_name_prefix() {
    let api = api_with(ApiSettings::default(), acl());
    let web = ("authorization", "Bearer web-token-0123456789");
    let ops = ("x-netsel-token", "ops-token-0123456789");
    let body = json!({"name": "web-front", "address": "127.0.0.1", "port": 8080});

    assert_error(
        &api.send("POST", "/v1/instances", body.clone(), &[]).await,
        401,
        "token",
    );
    assert_error(
        &api.send(
            "POST",
            "/v1/instances",
            body.clone(),
            &[("authorization", "Bearer wrong-token-0123456")],
        )
        .await,
        403,
        "unknown ACL token",
    );
    let other = json!({"name": "api", "address": "127.0.0.1", "port": 8081});
    assert_error(
        &api.send("POST", "/v1/instances", other.clone(), &[web])
            .await,
        403,
        "permission denied",
    );
    let r = api.send("POST", "/v1/instances", body, &[web]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let r2 = api.send("POST", "/v1/instances", other, &[ops]).await;
    assert_eq!(r2.status, StatusCode::CREATED, "{}", r2.json);

    // Reads: anonymous refused; the web token sees only web*; ops sees all.
    assert_error(&api.get("/v1/services").await, 401, "token");
    let list = api
        .call(
            Request::get("/v1/services")
                .header(web.0, web.1)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let names: Vec<&str> = list.json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-front"]);
    let list = api
        .call(
            Request::get("/v1/services?token=ops-token-0123456789")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(list.json["services"].as_array().unwrap().len(), 2);

    // Operators deregister without the secret when the token may write the name.
    let id = r2.json["id"].as_str().unwrap();
    assert_error(
        &api.send(
            "DELETE",
            &format!("/v1/instances/{id}"),
            Value::Null,
            &[web],
        )
        .await,
        403,
        "permission denied",
    );
    let del = api
        .send(
            "DELETE",
            &format!("/v1/instances/{id}"),
            Value::Null,
            &[ops],
        )
        .await;
    assert_eq!(del.status, StatusCode::OK, "{}", del.json);
    // Health stays open for probes.
    assert_eq!(api.get("/v1/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_lagging_event_subscriber_gets_a_resync_event() {
    let api = api();
    let resp = api
        .router
        .clone()
        .oneshot(Request::get("/v1/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // More changes than the event channel holds, while nobody reads the stream.
    for i in 0..2100u16 {
        let ep = std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + i));
        let reg = netsel::catalog::Registration::new(
            format!("lag{i}"),
            netsel::catalog::Endpoint::Explicit(ep),
        );
        api.catalog.register(reg).await.unwrap();
    }
    let mut text = String::new();
    while !text.contains("event: resync") {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("stream stalled")
            .expect("stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.starts_with("event: hello"), "{text}");
    let resync = text.split("event: resync").nth(1).unwrap();
    assert!(resync.contains("\"missed\":"), "{resync}");
}

#[test]
fn api_and_acl_settings_are_validated() {
    let s = Settings::from_toml(
        r#"
        [api]
        max_body_bytes = 4096
        rate_limit_per_sec = 5
        [acl]
        enabled = true
        [[acl.tokens]]
        name = "ops"
        token = "0123456789abcdef0123"
        read = ["*"]
        write = ["web"]
        "#,
    )
    .unwrap();
    assert_eq!(s.api.max_body_bytes, 4096);
    assert_eq!(
        s.api.rate_limit_burst, 400,
        "unset keys keep their defaults"
    );
    assert!(s.acl.enabled);
    assert!(
        !format!("{s:?}").contains("0123456789abcdef0123"),
        "tokens never print"
    );
    for bad in [
        "[api]\nmax_body_bytes = 10",
        "[api]\nmax_connections = 0",
        "[api]\nrate_limit_burst = 0",
        "[api]\nbogus = 1",
        "[acl]\nenabled = true\n[[acl.tokens]]\ntoken = \"short\"",
        "[acl]\n[[acl.tokens]]\ntoken = \"has spaces in the token\"",
    ] {
        assert!(Settings::from_toml(bad).is_err(), "accepted: {bad}");
    }
}

#[tokio::test]
async fn prometheus_sd_lists_healthy_instances_with_labels_and_filters() {
    let api = api_with(ApiSettings::default(), acl());
    let ops = ("authorization", "ops-token-0123456789");
    for (name, port, tags) in [
        ("web", 8001, json!(["v1", "canary"])),
        ("web", 8002, json!(["v2"])),
        ("db", 8003, json!([])),
    ] {
        let r = api
            .send(
                "POST",
                "/v1/instances",
                json!({"name": name, "address": "127.0.0.1", "port": port, "tags": tags,
                       "meta": {"build.id": "7"}}),
                &[ops],
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    }
    // An instance whose check has not passed (none runs here) is not a target.
    let r = api
        .send(
            "POST",
            "/v1/instances",
            json!({"name": "web", "address": "127.0.0.1", "port": 8004, "tags": ["v1"],
                   "check": {"type": "tcp"}}),
            &[ops],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let sd = async |query: &str, auth: &[(&str, &str)]| {
        api.send(
            "GET",
            &format!("/v1/sd/prometheus{query}"),
            Value::Null,
            auth,
        )
        .await
    };

    // A bare `Authorization: TOKEN` (Prometheus 2.42) is a token like `Bearer TOKEN`.
    let all = sd("", &[ops]).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.json);
    assert!(all.headers.contains_key("x-netsel-index"));
    let groups = all.json.as_array().unwrap();
    assert_eq!(groups.len(), 3, "{}", all.json);
    let canary = groups
        .iter()
        .find(|g| g["targets"][0] == "127.0.0.1:8001")
        .unwrap();
    assert_eq!(canary["labels"]["__meta_netsel_service"], "web");
    assert_eq!(canary["labels"]["__meta_netsel_tags"], ",v1,canary,");
    assert_eq!(canary["labels"]["__meta_netsel_meta_build_id"], "7");
    assert_eq!(canary["labels"]["__meta_netsel_health"], "passing");

    let targets = |r: &Reply| -> Vec<String> {
        let mut t: Vec<String> = r
            .json
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["targets"][0].as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    let web = sd("?service=WEB", &[ops]).await;
    assert_eq!(targets(&web), ["127.0.0.1:8001", "127.0.0.1:8002"]);
    let v1 = sd("?service=web,db&tag=v1", &[ops]).await;
    assert_eq!(targets(&v1), ["127.0.0.1:8001"]);
    let both = sd("?tag=v1,canary", &[ops]).await;
    assert_eq!(targets(&both), ["127.0.0.1:8001"]);

    // ACLs: no token, no list; a token reads only what it may.
    assert_error(&sd("", &[]).await, 401, "ACL token is required");
    let deployer = ("authorization", "Bearer web-token-0123456789");
    assert_error(
        &sd("?service=db", &[deployer]).await,
        403,
        "permission denied",
    );
    // Another scheme carries no NetSel token.
    let basic = ("authorization", "Basic b3BzOm9wcw==");
    assert_error(&sd("", &[basic]).await, 401, "ACL token is required");
}
