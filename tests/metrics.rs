//! What an operator scrapes: a real server (port 0, a durable data dir) gets a little of
//! every kind of traffic (an API registration and reads, a DNS query, a request through the
//! HTTP proxy, a connection through the TCP gateway), then `/metrics` is parsed with a
//! Prometheus text parser (`prometheus-parse`) and checked family by family. The Grafana
//! dashboard in `dist/` is then loaded as JSON, and every metric its queries use must be
//! in that scrape; with `promtool` installed (Debian's `prometheus`), the scrape passes
//! `promtool check metrics` and every dashboard query parses as PromQL.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use netsel::client::http::{self, HttpRequest};
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(10);

/// An HTTP/1.1 backend answering every request `200 ok` and closing.
async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Writes `request` to `addr` and reads until the peer closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// One UDP DNS query for `name` type A; the response code.
async fn dns_a(dns: SocketAddr, name: &str) -> u8 {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, dns).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    assert!(n >= 12 && buf[..2] == [0x12, 0x34]);
    buf[3] & 0x0f
}

async fn scrape(api: SocketAddr) -> (String, Scrape) {
    let r = http::send(api, &HttpRequest::new("GET", "/metrics"), T)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let text = r.text();
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("/metrics parses as Prometheus text");
    (text, parsed)
}

fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

/// Whether counter `metric` with `labels` is there and at least 1.
fn counted_once(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> bool {
    find(scrape, metric, labels)
        .is_some_and(|s| matches!(s.value, Value::Counter(v) | Value::Untyped(v) if v >= 1.0))
}

/// A counter's or gauge's value, or a histogram's count.
fn value(scrape: &Scrape, text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let s =
        find(scrape, metric, labels).unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{text}"));
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(b) => b.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => panic!("{metric} is a summary"),
    }
}

/// Every series name the scrape has (a histogram also by its `_bucket` name).
fn names(scrape: &Scrape) -> HashSet<String> {
    let mut out = HashSet::new();
    for s in &scrape.samples {
        out.insert(s.metric.clone());
        if let Value::Histogram(_) = s.value {
            out.insert(format!("{}_bucket", s.metric));
            out.insert(format!("{}_sum", s.metric));
            out.insert(format!("{}_count", s.metric));
        }
    }
    out
}

/// PromQL words that are not metric names.
const PROMQL: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression reads: identifiers that are not functions (followed
/// by `(`), keywords, label names (inside `{…}` or `by (…)`), durations (`[…]`) or strings.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    // Blank out strings, label matchers and range selectors first.
    let mut plain = String::with_capacity(expr.len());
    let (mut depth_brace, mut depth_bracket, mut quote) = (0, 0, None);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{') => depth_brace += 1,
            (None, '}') => depth_brace -= 1,
            (None, '[') => depth_bracket += 1,
            (None, ']') => depth_bracket -= 1,
            (None, c) if depth_brace == 0 && depth_bracket == 0 => {
                plain.push(c);
                continue;
            }
            _ => {}
        }
        plain.push(' ');
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let mut grouping = false; // inside by (…) / without (…)
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
            {
                grouping = true;
            } else if next == Some(&'(') || PROMQL.contains(&word.to_lowercase().as_str()) {
                // A function or an aggregation.
            } else if !grouping {
                out.insert(word);
            }
            continue;
        }
        if c == ')' {
            grouping = false;
        }
        if c.is_ascii_digit() || c == '.' {
            // A number (possibly 1e-3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || ".+-".contains(chars[i]))
            {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    let got = metrics_in(
        r#"histogram_quantile(0.99, sum by (service, le) (rate(netsel_x_bucket{instance=~"$instance",route!="/v1/{name}"}[$__rate_interval]))) / ignoring(le) max without (a) (process_open_fds) * 1e-3"#,
    );
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        ["netsel_x_bucket", "process_open_fds"]
    );
    assert!(
        metrics_in("time() - process_start_time_seconds").contains("process_start_time_seconds")
    );
}

/// Every PromQL expression of the dashboard (panel targets and variable queries).
fn dashboard_exprs() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).expect("dist/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "netsel");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut out = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if p["datasource"]["uid"] != "${DS_PROMETHEUS}" {
                panic!("panel {} does not use ${{DS_PROMETHEUS}}", p["title"]);
            }
            let expr = t["expr"].as_str().expect("a target with an expr");
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                expr.to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        // label_values(METRIC, label)
        let q = v["definition"].as_str().unwrap_or("");
        if let Some(args) = q.strip_prefix("label_values(") {
            let metric = args.split(',').next().unwrap().trim();
            out.push((format!("variable {}", v["name"]), metric.to_string()));
        }
    }
    assert!(out.len() > 20, "the dashboard has its panels: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_scrape_has_every_family_and_the_dashboard_queries_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(30);
    settings.data_dir = Some(dir.path().to_path_buf());
    let (server, registry) = common::start(settings).await;
    let bound = server.bound().unwrap();
    let api = bound.api.unwrap();

    let register = async |body: serde_json::Value| {
        let r = http::send(
            api,
            &HttpRequest::new("POST", "/v1/instances").json(body.to_string()),
            T,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    };
    // A registration through the API (one durable write: one fsync), and reads.
    let web = backend().await;
    register(json!({"name": "web", "address": "127.0.0.1", "port": web.port()})).await;
    for path in [
        "/v1/services",
        "/v1/services/web",
        "/v1/services/nope",
        "/no/such/path",
    ] {
        http::send(api, &HttpRequest::new("GET", path), T)
            .await
            .unwrap();
    }
    // An instance whose lease runs out (the line protocol takes a 200 ms TTL), and one
    // with a check that passes: an expiry and a health transition to count.
    let mut line = tokio::io::BufReader::new(TcpStream::connect(registry).await.unwrap());
    line.write_all(format!("REGISTER|brief|127.0.0.1:{}|ttl=200ms\n", web.port()).as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut line, &mut reply)
        .await
        .unwrap();
    assert!(reply.starts_with("REGISTERED|"), "{reply}");
    register(
        json!({"name": "checked", "address": "127.0.0.1", "port": web.port(),
                    "check": {"type": "tcp"}}),
    )
    .await;
    // A DNS query, a request through the HTTP proxy, a connection through the TCP gateway.
    assert_eq!(dns_a(bound.dns.unwrap(), "web.netsel.").await, 0, "NOERROR");
    let answer = exchange(
        bound.http_proxy.unwrap(),
        b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = exchange(
        bound.tcp_proxy.unwrap(),
        b"web\nGET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("200 OK"), "{answer}");

    // The proxies count when the exchange ends, a moment after the client sees it.
    let deadline = tokio::time::Instant::now() + T;
    let (text, s) = loop {
        let (text, s) = scrape(api).await;
        let counted = find(
            &s,
            "netsel_tcp_proxy_connections_total",
            &[("service", "web")],
        )
        .is_some()
            && find(
                &s,
                "netsel_http_proxy_requests_total",
                &[("service", "web")],
            )
            .is_some()
            && counted_once(&s, "netsel_expiries_total", &[])
            && counted_once(&s, "netsel_health_transitions_total", &[("to", "passing")]);
        if counted {
            break (text, s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "proxy traffic, the expiry and the check are counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v = |m: &str, l: &[(&str, &str)]| value(&s, &text, m, l);

    // process_* and build info.
    assert!(v("process_resident_memory_bytes", &[]) > 0.0);
    assert!(v("process_virtual_memory_bytes", &[]) > 0.0);
    assert!(v("process_open_fds", &[]) > 0.0);
    assert!(v("process_max_fds", &[]) >= v("process_open_fds", &[]));
    assert!(v("process_cpu_seconds_total", &[]) >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = v("process_start_time_seconds", &[]);
    assert!(start > now - 86_400.0 && start <= now + 1.0, "{start}");
    assert_eq!(
        v(
            "netsel_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // The catalog, DNS and the API.
    assert_eq!(v("netsel_registrations_total", &[]), 3.0);
    assert_eq!(v("netsel_expiries_total", &[]), 1.0);
    assert_eq!(
        v("netsel_health_transitions_total", &[("to", "passing")]),
        1.0
    );
    assert_eq!(
        v("netsel_health_transitions_total", &[("to", "critical")]),
        0.0
    );
    assert_eq!(
        v(
            "netsel_dns_queries_total",
            &[("qtype", "A"), ("rcode", "NOERROR")]
        ),
        1.0
    );
    assert!(v("netsel_dns_query_duration_seconds", &[]) >= 1.0);
    let api_count = |route, method, status| {
        v(
            "netsel_api_requests_total",
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert_eq!(api_count("/v1/instances", "POST", "201"), 2.0);
    assert_eq!(api_count("/v1/services", "GET", "200"), 1.0);
    // prometheus-parse 0.2 skips a sample whose label value holds a `}` (its regex stops
    // at the first one); the exposition format allows it and promtool below checks it.
    for status in ["200", "404"] {
        let line = format!(
            "netsel_api_requests_total{{route=\"/v1/services/{{name}}\",method=\"GET\",status=\"{status}\"}} 1\n"
        );
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    assert_eq!(api_count("unmatched", "GET", "404"), 1.0);
    assert!(
        !text.contains("route=\"/v1/services/web\""),
        "routes are templates, never raw paths"
    );
    assert!(
        v(
            "netsel_api_request_duration_seconds",
            &[("route", "/v1/services")]
        ) >= 1.0
    );
    // The embedded store: the registration was one log write and one fsync.
    assert!(v("netsel_store_fsync_duration_seconds", &[]) >= 1.0);
    assert!(v("netsel_store_commit_batch_size", &[]) >= 1.0);
    assert!(v("netsel_store_wal_bytes", &[]) > 0.0);
    let _ = v("netsel_store_checkpoint_duration_seconds", &[]);
    // The proxies.
    assert_eq!(
        v(
            "netsel_http_proxy_requests_total",
            &[("service", "web"), ("class", "2xx")]
        ),
        1.0
    );
    assert_eq!(
        v("netsel_tcp_proxy_connections_total", &[("service", "web")]),
        1.0
    );

    // Every metric the dashboard queries is in the scrape.
    let have = names(&s);
    let mut missing = Vec::new();
    let exprs = dashboard_exprs();
    for (panel, expr) in &exprs {
        let used = metrics_in(expr);
        assert!(
            !used.is_empty(),
            "panel {panel:?} queries no metric: {expr}"
        );
        for m in used {
            if !have.contains(&m) {
                missing.push(format!("{m} (panel {panel:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not have: {missing:#?}"
    );

    // Every family served is in docs/api.md's table (the proxies' under their wildcard).
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md"))
        .expect("docs/api.md");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let name = if kind == "counter" {
            format!("{family}_total")
        } else {
            family.to_string()
        };
        let documented = docs.contains(&format!("| `{name}` |"))
            || ["netsel_http_proxy_", "netsel_tcp_proxy_"]
                .iter()
                .any(|p| name.starts_with(p) && docs.contains(&format!("| `{p}*` |")));
        assert!(documented, "{name} is not in docs/api.md's metrics table");
    }

    if common::have_tool(
        "promtool",
        &["--version"],
        "apt-get install prometheus (.ci/run does)",
    ) {
        promtool_checks(&text, &exprs, dir.path());
    }
    server.shutdown().await;
}

/// `promtool check metrics` on the scrape, and `promtool check rules` on every dashboard
/// query as a recording rule (Grafana's variables replaced by what they stand for).
fn promtool_checks(text: &str, exprs: &[(String, String)], dir: &std::path::Path) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // promtool lints the classic text format, where a counter's HELP names the `_total`
    // series; OpenMetrics (what `/metrics` serves) names the family. That complaint, for a
    // counter whose family has its HELP, is the only one allowed.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in said.lines().filter(|l| !l.trim().is_empty()) {
        let family = line
            .strip_suffix("_total no help text")
            .unwrap_or_else(|| panic!("promtool check metrics: {said}"));
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "promtool check metrics: {line}"
        );
    }

    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = dir.join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "every dashboard query parses as PromQL: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
