//! What the API-talking verbs share: `--api-addr`/`--token`/`--json`, a JSON-over-HTTP
//! helper on the library's small HTTP client, exit codes, and the register/heartbeat
//! loop of `netsel register` and `netsel run`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::http::{self, HttpRequest};

/// How long one API call may take (blocking queries add their wait).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags every API verb takes.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The NetSel API to talk to; several, comma-separated (the nodes of a cluster), are
    /// tried in turn when one cannot be reached.
    #[arg(
        long,
        env = "NETSEL_API_ADDR",
        default_value = "127.0.0.1:9001",
        value_name = "HOST:PORT"
    )]
    pub api_addr: String,
    /// ACL token, when the server has `[acl]` on.
    #[arg(
        long,
        env = "NETSEL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Why a verb failed, and the exit code that says so.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The API could not be reached or answered nonsense (exit 1).
    Unreachable(String),
    /// The API refused (exit code by status).
    Api {
        /// HTTP status.
        status: u16,
        /// Its `error` message.
        message: String,
    },
    /// Bad command-line input (exit 2).
    Usage(String),
}

impl Failure {
    /// Exit codes: 1 unreachable or server error, 2 invalid input, 3 not found,
    /// 4 refused (secret or token), 5 conflict, 6 rate-limited.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Unreachable(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Api { status, .. } => match status {
                400 | 413 | 415 => 2,
                404 => 3,
                401 | 403 => 4,
                409 => 5,
                429 => 6,
                _ => 1,
            },
        }
    }

    /// Prints the failure to stderr and returns its exit code.
    pub(crate) fn report(&self) -> ExitCode {
        eprintln!("netsel: {self}");
        ExitCode::from(self.exit_code())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(m) | Failure::Usage(m) => f.write_str(m),
            Failure::Api { status, message } => write!(f, "{message} (HTTP {status})"),
        }
    }
}

/// Resolves `HOST:PORT` (names allowed).
pub(crate) async fn resolve_addr(what: &str, s: &str) -> Result<SocketAddr, Failure> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let mut addrs = tokio::net::lookup_host(s)
        .await
        .map_err(|e| Failure::Usage(format!("{what} '{s}': {e}")))?;
    addrs
        .next()
        .ok_or_else(|| Failure::Usage(format!("{what} '{s}' resolves to no address")))
}

/// A JSON answer: status and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

/// The API at one or more addresses (the nodes of a cluster): requests go to the current
/// one and move on to the next when it cannot be reached.
#[derive(Clone)]
pub(crate) struct Api {
    addrs: Vec<SocketAddr>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("addrs", &self.addrs)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Api {
    pub(crate) async fn new(args: &ApiArgs) -> Result<Api, Failure> {
        let mut addrs = Vec::new();
        for a in args
            .api_addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let a = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
            addrs.push(resolve_addr("--api-addr", a).await?);
        }
        if addrs.is_empty() {
            return Err(Failure::Usage("--api-addr names no address".into()));
        }
        Ok(Api {
            addrs,
            current: Default::default(),
            token: args.token.clone(),
        })
    }

    /// The address requests go to now.
    pub(crate) fn addr(&self) -> SocketAddr {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.addrs[i % self.addrs.len()]
    }

    /// Moves on to the next address, after the current one could not be reached.
    pub(crate) fn fail_over(&self) {
        if self.addrs.len() > 1 {
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn request<'a>(&'a self, method: &'a str, path: &'a str) -> HttpRequest<'a> {
        let req = HttpRequest::new(method, path);
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// Sends `req`; any status is returned (use [`Answer::ok`] to turn errors into a
    /// [`Failure`]).
    pub(crate) async fn send(
        &self,
        req: HttpRequest<'_>,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let mut tried = 0;
        let (addr, r) = loop {
            let addr = self.addr();
            match http::send(addr, &req, timeout).await {
                Ok(r) => break (addr, r),
                Err(e) => {
                    tried += 1;
                    if tried >= self.addrs.len() {
                        return Err(Failure::Unreachable(format!(
                            "cannot reach the NetSel API at {addr}: {e}"
                        )));
                    }
                    self.fail_over();
                }
            }
        };
        let body = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).map_err(|_| {
                Failure::Unreachable(format!(
                    "the API at {addr} answered HTTP {} with something that is not JSON",
                    r.status
                ))
            })?
        };
        Ok(Answer {
            status: r.status,
            body,
        })
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Answer, Failure> {
        self.send(self.request("GET", path), CALL_TIMEOUT)
            .await?
            .ok()
    }
}

impl Answer {
    /// The answer if 2xx, else its failure.
    pub(crate) fn ok(self) -> Result<Answer, Failure> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let message = self.body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {}", self.status));
        Err(Failure::Api {
            status: self.status,
            message,
        })
    }
}

/// A lease or an age in the CLI's columns: [`crate::protocol::format_duration`] to the
/// whole second (as the UI shows it): `45s`, `57m22s`, `2h05m`.
pub(crate) fn human_duration(d: Duration) -> String {
    crate::protocol::format_duration(Duration::from_secs(d.as_secs()))
}

/// Prints JSON, pretty.
pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as aligned columns.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = *w));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A duration flag: `30s`, `2m`, `1500ms`, or a bare number of seconds.
fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let d = crate::protocol::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// `--check`: `tcp` or `http:/PATH`, as the API's check object.
fn parse_check_arg(s: &str) -> Result<Value, String> {
    match s {
        "tcp" => Ok(serde_json::json!({ "type": "tcp" })),
        _ => match s.strip_prefix("http:") {
            Some(path) if path.starts_with('/') => {
                Ok(serde_json::json!({ "type": "http", "path": path }))
            }
            _ => Err("expected tcp or http:/PATH (for example http:/healthz)".into()),
        },
    }
}

/// Whole seconds for the API, rounded up (a 1500ms TTL is 2 s, never 0).
fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Options of `netsel register` and `netsel run` that describe the instance.
#[derive(Debug, Clone, Args)]
pub struct InstanceArgs {
    /// Tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Metadata entry (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Balancing weight, 1..=10000.
    #[arg(long)]
    pub weight: Option<u32>,
    /// Lease TTL: `30s`, `2m`, `1500ms` (a bare number is seconds) [default: the
    /// server's max_heartbeat_age].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub ttl: Option<Duration>,
    /// Active health check run by NetSel: `tcp` (connect) or `http:/PATH` (GET, 2xx or 3xx
    /// passes). With a check, the instance gets no traffic until its first check passes.
    #[arg(long, value_name = "tcp|http:/PATH", value_parser = parse_check_arg)]
    pub check: Option<Value>,
    /// Deregister the instance once its check has kept it critical this long (`90s`, `10m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub deregister_critical_after: Option<Duration>,
    /// The service's port on its VIP [default: the first instance's port].
    #[arg(long, value_name = "PORT")]
    pub service_port: Option<u16>,
    /// What the instance speaks: tcp, http1 or http2.
    #[arg(long, value_name = "PROTO")]
    pub protocol: Option<String>,
}

impl InstanceArgs {
    /// The registration body for `name` at `endpoint`.
    pub(crate) fn body(&self, name: &str, endpoint: SocketAddr) -> Result<Value, Failure> {
        let mut meta = serde_json::Map::new();
        for kv in &self.meta {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Failure::Usage(format!("--meta '{kv}' is not KEY=VALUE")))?;
            meta.insert(k.to_string(), Value::String(v.to_string()));
        }
        let mut body = serde_json::json!({
            "name": name,
            "address": endpoint.ip().to_string(),
            "port": endpoint.port(),
            "tags": self.tags,
            "meta": meta,
        });
        let opt = |v: Option<Value>| v.unwrap_or(Value::Null);
        for (k, v) in [
            ("weight", opt(self.weight.map(Value::from))),
            (
                "ttl_secs",
                opt(self.ttl.map(|d| Value::from(whole_secs(d)))),
            ),
            ("check", opt(self.check.clone())),
            (
                "deregister_critical_after_secs",
                opt(self
                    .deregister_critical_after
                    .map(|d| Value::from(whole_secs(d)))),
            ),
            ("service_port", opt(self.service_port.map(Value::from))),
            ("protocol", opt(self.protocol.clone().map(Value::from))),
        ] {
            if !v.is_null() {
                body[k] = v;
            }
        }
        Ok(body)
    }
}

/// One live registration: registers, heartbeats (re-registering when the server forgot
/// it), deregisters. The secret stays in memory and is never printed.
pub(crate) struct Registrar {
    api: Api,
    body: Value,
    current: Option<Current>,
}

struct Current {
    id: String,
    secret: String,
    ttl: Duration,
}

impl Registrar {
    pub(crate) fn new(api: Api, body: Value) -> Self {
        Registrar {
            api,
            body,
            current: None,
        }
    }

    /// Registers; returns the API's answer (without the secret).
    pub(crate) async fn register(&mut self) -> Result<Value, Failure> {
        let req = self
            .api
            .request("POST", "/v1/instances")
            .json(self.body.to_string());
        let mut a = self.api.send(req, CALL_TIMEOUT).await?.ok()?;
        let secret = a.body["secret"].as_str().unwrap_or_default().to_string();
        let id = a.body["id"].as_str().unwrap_or_default().to_string();
        let ttl = Duration::from_secs(a.body["ttl_secs"].as_u64().unwrap_or(60).max(1));
        if let Some(o) = a.body.as_object_mut() {
            o.remove("secret");
        }
        self.current = Some(Current { id, secret, ttl });
        Ok(a.body)
    }

    /// Whether it is registered.
    pub(crate) fn is_registered(&self) -> bool {
        self.current.is_some()
    }

    /// How often to heartbeat: a third of the TTL, at most the seed's 10 s.
    pub(crate) fn interval(&self) -> Duration {
        match &self.current {
            Some(c) => (c.ttl / 3).clamp(Duration::from_millis(300), Duration::from_secs(10)),
            None => Duration::from_secs(1),
        }
    }

    /// Renews the lease, or registers again if the server has forgotten the instance (or
    /// it was never registered).
    pub(crate) async fn keep_alive(&mut self) -> Result<(), Failure> {
        let Some(c) = &self.current else {
            let r = self.register().await?;
            tracing::info!(id = %r["id"].as_str().unwrap_or(""), "registered");
            return Ok(());
        };
        let path = format!("/v1/instances/{}/heartbeat", http::encode_component(&c.id));
        let req = self
            .api
            .request("PUT", &path)
            .header("X-Netsel-Secret", c.secret.clone());
        let a = self.api.send(req, CALL_TIMEOUT).await?;
        if a.status == 404 || a.status == 403 {
            // Gone (expired, or the registry lost it) or superseded (another process took
            // the address over): register again as a new instance, never displacing one
            // that replaced this one meanwhile.
            tracing::warn!(
                status = a.status,
                "this instance is gone or superseded; registering again"
            );
            self.current = None;
            self.body["replace"] = Value::Bool(false);
            let r = self.register().await?;
            tracing::info!(id = %r["id"].as_str().unwrap_or(""), "registered again");
            return Ok(());
        }
        a.ok().map(|_| ())
    }

    /// Deregisters, if registered.
    pub(crate) async fn deregister(&mut self) -> Result<(), Failure> {
        let Some(c) = self.current.take() else {
            return Ok(());
        };
        let path = format!("/v1/instances/{}", http::encode_component(&c.id));
        let req = self
            .api
            .request("DELETE", &path)
            .header("X-Netsel-Secret", c.secret);
        let a = self.api.send(req, CALL_TIMEOUT).await?;
        if a.status == 404 {
            return Ok(());
        }
        a.ok().map(|_| ())
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT as a stream of signal numbers.
pub(crate) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> Result<Signals, Failure> {
        use tokio::signal::unix::{SignalKind, signal};
        let e = |e: std::io::Error| Failure::Unreachable(format!("cannot watch signals: {e}"));
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(e)?,
            term: signal(SignalKind::terminate()).map_err(e)?,
            hup: signal(SignalKind::hangup()).map_err(e)?,
            quit: signal(SignalKind::quit()).map_err(e)?,
        })
    }

    /// The next of those signals.
    pub(crate) async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
            _ = self.quit.recv() => libc::SIGQUIT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_as_the_ui_shows_them() {
        let d = |s| human_duration(Duration::from_secs(s));
        assert_eq!(
            [d(0), d(45), d(60), d(3442), d(3600), d(7500)],
            ["0s", "45s", "1m00s", "57m22s", "1h00m", "2h05m"]
        );
    }
}
