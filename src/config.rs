//! Configuration: the seed's six-field [`NetSelConfig`], and [`Settings`], which holds it
//! plus everything NetSel added since. Every default is written once, here.
//!
//! A TOML file (`netsel serve --config FILE`) sets any of it: the six seed fields at the
//! top level, the rest at the top level or in tables. Unknown keys are rejected, and
//! [`Settings::validate`] runs before anything binds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::catalog::CatalogSettings;
use crate::health::HealthSettings;
use crate::network::{DEFAULT_PORT_RANGE, DEFAULT_VIP_CIDR, PortPool, VipPool};
use crate::proxy::balance::BalanceSettings;
use crate::proxy::http::HttpProxySettings;

/// The seed's configuration, field for field. Richer settings live in [`Settings`].
///
/// ```
/// use std::net::{IpAddr, SocketAddr};
/// use netsel::NetSelConfig;
///
/// let config = NetSelConfig {
///     registry_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 9000),
///     tcp_proxy_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 8080),
///     http_proxy_addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 8081),
///     dns_addr: SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5353),
///     health_check_interval: 30,
///     max_heartbeat_age: 60,
/// };
/// assert_eq!(config.max_heartbeat_age, NetSelConfig::default().max_heartbeat_age);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSelConfig {
    /// Address of the registry (line protocol). Default `0.0.0.0:9000`.
    pub registry_addr: SocketAddr,
    /// Address of the TCP proxy gateway. Default `0.0.0.0:8080`.
    pub tcp_proxy_addr: SocketAddr,
    /// Address of the HTTP proxy. Default `0.0.0.0:8081`.
    pub http_proxy_addr: SocketAddr,
    /// Address of the DNS server (UDP and TCP). Default `127.0.0.1:5353`.
    pub dns_addr: SocketAddr,
    /// Seconds between health sweeps and active checks. Default 30.
    pub health_check_interval: u64,
    /// Seconds without a heartbeat before an instance is removed (its lease TTL).
    /// Default 60.
    pub max_heartbeat_age: u64,
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl Default for NetSelConfig {
    fn default() -> Self {
        NetSelConfig {
            registry_addr: SocketAddr::new(ANY, 9000),
            tcp_proxy_addr: SocketAddr::new(ANY, 8080),
            http_proxy_addr: SocketAddr::new(ANY, 8081),
            dns_addr: SocketAddr::new(LOCAL, 5353),
            health_check_interval: 30,
            max_heartbeat_age: 60,
        }
    }
}

/// Why configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for NetSel (unknown keys included).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value that cannot work.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// Registry listener limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryLimits {
    /// Most simultaneous connections; more are refused with `FAILED|too many connections`.
    pub max_connections: usize,
    /// Seconds a connection may sit idle between requests.
    pub idle_timeout_secs: u64,
    /// Seconds a request may take to arrive once it has begun (a deadline from its first
    /// byte, however steadily the rest trickles in).
    pub frame_timeout_secs: u64,
    /// Seconds an answer may wait for the client to take it; a client that stops reading
    /// is disconnected after this long. Default 10.
    pub write_timeout_secs: u64,
    /// Registrations per second allowed from one peer IP (a token bucket); 0 disables.
    pub register_rate_per_ip: u32,
    /// Registrations one peer IP may make in a burst.
    pub register_burst_per_ip: u32,
    /// Exempt loopback peers (processes on this host) from the registration rate limit.
    pub rate_limit_exempt_loopback: bool,
    /// Where instance endpoints may be; empty (the default) allows any address except
    /// unspecified, multicast, broadcast and link-local ones, which are always refused.
    pub allowed_endpoint_cidrs: Vec<IpNet>,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_connections: 4096,
            idle_timeout_secs: 300,
            frame_timeout_secs: 10,
            write_timeout_secs: 10,
            register_rate_per_ip: 200,
            register_burst_per_ip: 1000,
            rate_limit_exempt_loopback: true,
            allowed_endpoint_cidrs: Vec::new(),
        }
    }
}

/// Virtual network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSettings {
    /// VIP pool. Default `127.77.0.0/16` (loopback: works on one host without root).
    pub vip_cidr: IpNet,
    /// Seconds a released VIP is held back from other names. Default 600.
    pub vip_hold_secs: u64,
    /// First port of the pool for registrations without an endpoint. Default 20000.
    pub port_pool_start: u16,
    /// Last port of that pool. Default 29999.
    pub port_pool_end: u16,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            vip_cidr: DEFAULT_VIP_CIDR.parse().expect("default CIDR parses"),
            vip_hold_secs: 600,
            port_pool_start: *DEFAULT_PORT_RANGE.start(),
            port_pool_end: *DEFAULT_PORT_RANGE.end(),
        }
    }
}

/// HTTP API limits (`[api]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Largest request body accepted; larger ones get 413. Default 65536.
    pub max_body_bytes: usize,
    /// Requests per second each client IP may make (token bucket refill); 0 turns the
    /// limit off. Default 200.
    pub rate_limit_per_sec: u32,
    /// Burst size of each client's bucket. Default 400.
    pub rate_limit_burst: u32,
    /// Longest `wait` a blocking query may ask for, in seconds. Default 600.
    pub max_wait_secs: u64,
    /// Most simultaneous server-sent-event streams. Default 1024.
    pub max_event_streams: usize,
    /// Most simultaneous HTTP connections; more wait to be accepted. Default 4096.
    pub max_connections: usize,
    /// Milliseconds a client has to send a request's head, its first one included (against
    /// slowloris and silent connections); a keep-alive connection waiting for its next
    /// request also closes after this long. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a response (or an event stream) may wait for the client to read it;
    /// a client that stops reading is disconnected after this long. Default 30000.
    pub write_timeout_ms: u64,
    /// How often the dashboard's traffic series (`/v1/traffic`) sample the proxies, in
    /// milliseconds; each service keeps 180 samples (15 minutes at the default).
    /// 100..=60000, default 5000.
    pub traffic_interval_ms: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_body_bytes: 64 * 1024,
            rate_limit_per_sec: 200,
            rate_limit_burst: 400,
            max_wait_secs: 600,
            max_event_streams: 1024,
            max_connections: 4096,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            traffic_interval_ms: 5000,
        }
    }
}

/// How the TCP proxy relays bytes between a client and an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    /// Zero-copy `splice(2)` through a kernel pipe on Linux; elsewhere the same as `copy`.
    #[default]
    Splice,
    /// Read into a user-space buffer and write it out (`tokio::io::copy_bidirectional`).
    Copy,
}

/// TCP proxy settings (the gateway on `tcp_proxy_addr` and the per-VIP listeners).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpProxySettings {
    /// Seconds a relayed connection may pass no bytes either way before it is closed.
    /// Default 300.
    pub idle_timeout_secs: u64,
    /// Milliseconds to wait for one instance to accept before trying another. Default 2000.
    pub connect_timeout_ms: u64,
    /// Instances tried per client connection before it is refused. Default 3.
    pub connect_attempts: usize,
    /// Most client connections relayed at once (gateway and VIP listeners together).
    /// Default 8192.
    pub max_connections: usize,
    /// Longest gateway name line in bytes, line ending included. Default 256.
    pub name_line_max: usize,
    /// Milliseconds a gateway client has to send its name line. Default 5000.
    pub name_timeout_ms: u64,
    /// Listen on `VIP:service-port` for every service. Default true.
    pub vip_listeners: bool,
    /// Seconds relayed connections may run on after shutdown begins (never longer than
    /// the server's `drain_secs`). Default 10.
    pub drain_secs: u64,
    /// How bytes are relayed. Default `splice` (zero-copy on Linux).
    pub relay: RelayMode,
    /// Event-loop threads of the proxy, each with its own listening socket per address
    /// (`SO_REUSEPORT`): a connection is accepted, connected and relayed on one thread.
    /// 0 (the default) means `TOKIO_WORKER_THREADS` if set, else one per CPU (the worker
    /// rule, `sys::worker_threads`).
    pub workers: usize,
    /// With at least as many workers as CPUs, bind worker `n` to the `n`-th CPU the
    /// process may use, so each stays on its own. Default false: unlike the HTTP
    /// proxy's, the TCP proxy's figures did not gain from it, and a single bulk stream
    /// relayed by a bound worker lost throughput to the iperf3 client and server that
    /// shared its CPU.
    pub pin_workers: bool,
    /// The time slice each worker asks the scheduler for, in microseconds (Linux 6.12 and
    /// later), as for the HTTP proxy. 0 leaves the kernel's default. Default 100.
    pub sched_slice_us: u64,
}

impl Default for TcpProxySettings {
    fn default() -> Self {
        TcpProxySettings {
            idle_timeout_secs: 300,
            connect_timeout_ms: 2000,
            connect_attempts: 3,
            max_connections: 8192,
            name_line_max: 256,
            name_timeout_ms: 5000,
            vip_listeners: true,
            drain_secs: 10,
            relay: RelayMode::default(),
            workers: 0,
            pin_workers: false,
            sched_slice_us: 100,
        }
    }
}

/// DNS server settings (the `[dns]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSettings {
    /// The zone NetSel is authoritative for. Default `netsel.`.
    pub domain: String,
    /// TTL of positive answers, in seconds. Short, because discovery data changes.
    /// Default 5.
    pub ttl_secs: u32,
    /// TTL of negative answers (the SOA minimum, RFC 2308), in seconds. Default 5.
    pub negative_ttl_secs: u32,
    /// Also answer a bare service name (`web.`) as `web.<domain>`. Default off.
    pub bare_names: bool,
    /// Resolvers that names outside the zone are forwarded to, in order. Empty (the
    /// default) refuses them: NetSel is never an open resolver unless told to be.
    pub upstreams: Vec<SocketAddr>,
    /// Milliseconds to wait for an upstream before trying the next. Default 2000.
    pub forward_timeout_ms: u64,
    /// Most forwarded queries in flight; more are answered SERVFAIL. Default 256.
    pub max_forwards: usize,
    /// Seconds a DNS-over-TCP connection may stay idle, and the most a query may take to
    /// arrive or an answer to be read by the client. Default 10.
    pub tcp_idle_secs: u64,
    /// Most DNS-over-TCP connections open at once; more are closed as soon as they are
    /// accepted (and counted in `netsel_dns_tcp_refused_connections_total`). Default 1024.
    pub tcp_max_connections: usize,
    /// Threads answering UDP; 0 means the worker rule (`TOKIO_WORKER_THREADS` if set, else
    /// one per CPU; see `sys::worker_threads`), at most 8. Default 0.
    pub udp_workers: usize,
    /// Serve UDP from precomputed wire answers (rebuilt on every catalog change) instead
    /// of hickory's generic UDP loop. Default on; off exists to measure the difference.
    pub fast_path: bool,
    /// Most precomputed answers each UDP worker keeps. Default 16384.
    pub cache_entries: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            domain: "netsel.".into(),
            ttl_secs: 5,
            negative_ttl_secs: 5,
            bare_names: false,
            upstreams: Vec::new(),
            forward_timeout_ms: 2000,
            max_forwards: 256,
            tcp_idle_secs: 10,
            tcp_max_connections: 1024,
            udp_workers: 0,
            fast_path: true,
            cache_entries: 16_384,
        }
    }
}

/// Access control for the HTTP API and the line protocol (`[acl]` table). Off by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclSettings {
    /// Whether tokens are required.
    pub enabled: bool,
    /// Whether requests without a token may read (list, get, watch, UI data). Default
    /// false.
    pub anonymous_read: bool,
    /// The tokens.
    pub tokens: Vec<AclToken>,
    /// Where seed-form frames (a bare name; `HEARTBEAT|<name>`), which carry no token, are
    /// accepted from while ACLs are on. Default: loopback (`127.0.0.0/8`, `::1/128`).
    pub trusted_cidrs: Vec<IpNet>,
}

impl Default for AclSettings {
    fn default() -> Self {
        AclSettings {
            enabled: false,
            anonymous_read: false,
            tokens: Vec::new(),
            trusted_cidrs: vec![
                IpNet::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)), 8)
                    .unwrap_or_default(),
                IpNet::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128).unwrap_or_default(),
            ],
        }
    }
}

/// One ACL token and what it may do. Rights are service-name prefixes; `""` or `"*"`
/// means every name.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AclToken {
    /// A label for logs (the token itself is never logged).
    pub name: String,
    /// The token: sent as `Authorization: Bearer <token>` or `X-Netsel-Token`.
    pub token: String,
    /// Name prefixes it may read.
    pub read: Vec<String>,
    /// Name prefixes it may register, heartbeat and deregister (without the instance
    /// secret, for operators).
    pub write: Vec<String>,
}

impl std::fmt::Debug for AclToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclToken")
            .field("name", &self.name)
            .field("token", &"***")
            .field("read", &self.read)
            .field("write", &self.write)
            .finish()
    }
}

/// Everything `netsel serve` can be told: the seed's [`NetSelConfig`] plus the rest.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The seed's six fields.
    pub config: NetSelConfig,
    /// HTTP API, UI and metrics. Default `127.0.0.1:9001`.
    pub api_addr: SocketAddr,
    /// The Consul-compatible API (docs/consul.md); off unless set. Consul's usual address
    /// is `127.0.0.1:8500`.
    pub consul_addr: Option<SocketAddr>,
    /// Where the embedded store lives; `None` keeps state in memory only.
    pub data_dir: Option<PathBuf>,
    /// The cluster store (etcd); when set, `data_dir` is not used.
    pub store: crate::store::StoreSettings,
    /// Virtual network.
    pub network: NetworkSettings,
    /// Registry limits.
    pub registry: RegistryLimits,
    /// Load balancing and passive ejection, shared by both proxies.
    pub balance: BalanceSettings,
    /// Active health checks.
    pub health: HealthSettings,
    /// HTTP proxy limits, timeouts, pooling and retries.
    pub http_proxy: HttpProxySettings,
    /// DNS server.
    pub dns: DnsSettings,
    /// TCP proxy.
    pub tcp_proxy: TcpProxySettings,
    /// Shortest lease TTL a registration may ask for, in milliseconds. Default 1000.
    pub min_ttl_ms: u64,
    /// Longest lease TTL a registration may ask for, in seconds. Default 86400.
    pub max_ttl_secs: u64,
    /// Most instances held. Default 1,000,000.
    pub max_instances: usize,
    /// Seconds to drain connections at shutdown. Default 10.
    pub drain_secs: u64,
    /// HTTP API limits.
    pub api: ApiSettings,
    /// HTTP API access control.
    pub acl: AclSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from(NetSelConfig::default())
    }
}

impl From<NetSelConfig> for Settings {
    fn from(config: NetSelConfig) -> Self {
        Settings {
            config,
            api_addr: SocketAddr::new(LOCAL, 9001),
            consul_addr: None,
            data_dir: None,
            store: crate::store::StoreSettings::default(),
            network: NetworkSettings::default(),
            registry: RegistryLimits::default(),
            balance: BalanceSettings::default(),
            health: HealthSettings::default(),
            http_proxy: HttpProxySettings::default(),
            dns: DnsSettings::default(),
            tcp_proxy: TcpProxySettings::default(),
            min_ttl_ms: 1000,
            max_ttl_secs: 86_400,
            max_instances: 1_000_000,
            drain_secs: 10,
            api: ApiSettings::default(),
            acl: AclSettings::default(),
        }
    }
}

/// The TOML file's shape. Every key optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    registry_addr: Option<SocketAddr>,
    tcp_proxy_addr: Option<SocketAddr>,
    http_proxy_addr: Option<SocketAddr>,
    dns_addr: Option<SocketAddr>,
    health_check_interval: Option<u64>,
    max_heartbeat_age: Option<u64>,
    api_addr: Option<SocketAddr>,
    consul_addr: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<crate::store::StoreSettings>,
    min_ttl_ms: Option<u64>,
    max_ttl_secs: Option<u64>,
    max_instances: Option<usize>,
    drain_secs: Option<u64>,
    network: Option<NetworkSettings>,
    registry: Option<RegistryLimits>,
    api: Option<ApiSettings>,
    acl: Option<AclSettings>,
    balance: Option<BalanceSettings>,
    health: Option<HealthSettings>,
    http_proxy: Option<HttpProxySettings>,
    dns: Option<DnsSettings>,
    tcp_proxy: Option<TcpProxySettings>,
}

impl Settings {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text over the defaults.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        let mut s = Settings::default();
        let c = &mut s.config;
        macro_rules! set {
            ($($dst:expr => $src:expr),* $(,)?) => {$( if let Some(v) = $src { $dst = v; } )*};
        }
        set!(
            c.registry_addr => f.registry_addr,
            c.tcp_proxy_addr => f.tcp_proxy_addr,
            c.http_proxy_addr => f.http_proxy_addr,
            c.dns_addr => f.dns_addr,
            c.health_check_interval => f.health_check_interval,
            c.max_heartbeat_age => f.max_heartbeat_age,
            s.api_addr => f.api_addr,
            s.min_ttl_ms => f.min_ttl_ms,
            s.max_ttl_secs => f.max_ttl_secs,
            s.max_instances => f.max_instances,
            s.drain_secs => f.drain_secs,
            s.network => f.network,
            s.registry => f.registry,
            s.api => f.api,
            s.acl => f.acl,
            s.balance => f.balance,
            s.health => f.health,
            s.http_proxy => f.http_proxy,
            s.dns => f.dns,
            s.tcp_proxy => f.tcp_proxy,
        );
        if f.data_dir.is_some() {
            s.data_dir = f.data_dir;
        }
        if f.consul_addr.is_some() {
            s.consul_addr = f.consul_addr;
        }
        if let Some(store) = f.store {
            s.store = store;
            if let Some(url) = s.store.url.clone() {
                s.store
                    .set_url(&url)
                    .map_err(|reason| ConfigError::Invalid {
                        key: "store.url",
                        reason,
                    })?;
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks that the settings can work, before anything binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.config.health_check_interval == 0 {
            return bad("health_check_interval", "must be at least 1 second");
        }
        if self.config.max_heartbeat_age == 0 {
            return bad("max_heartbeat_age", "must be at least 1 second");
        }
        if self.config.max_heartbeat_age > self.max_ttl_secs {
            return bad("max_heartbeat_age", "exceeds max_ttl_secs");
        }
        if self.min_ttl_ms == 0 || self.min_ttl_ms > self.config.max_heartbeat_age * 1000 {
            return bad("min_ttl_ms", "must be 1..=max_heartbeat_age*1000");
        }
        if self.max_instances == 0 {
            return bad("max_instances", "must be at least 1");
        }
        if self.registry.max_connections == 0 {
            return bad("registry.max_connections", "must be at least 1");
        }
        if self.registry.idle_timeout_secs == 0
            || self.registry.frame_timeout_secs == 0
            || self.registry.write_timeout_secs == 0
        {
            return bad("registry timeouts", "must be at least 1 second");
        }
        if self.api.max_body_bytes < 1024 {
            return bad("api.max_body_bytes", "must be at least 1024");
        }
        if self.api.rate_limit_per_sec > 0 && self.api.rate_limit_burst == 0 {
            return bad(
                "api.rate_limit_burst",
                "must be at least 1 when rate limiting",
            );
        }
        if !(100..=60_000).contains(&self.api.traffic_interval_ms) {
            return bad("api.traffic_interval_ms", "must be between 100 and 60000");
        }
        if self.api.max_wait_secs == 0 || self.api.max_event_streams == 0 {
            return bad("api.max_wait_secs/max_event_streams", "must be at least 1");
        }
        if self.api.max_connections == 0 {
            return bad("api.max_connections", "must be at least 1");
        }
        if self.api.header_read_timeout_ms == 0 {
            return bad("api.header_read_timeout_ms", "must be at least 1 ms");
        }
        if self.api.write_timeout_ms == 0 {
            return bad("api.write_timeout_ms", "must be at least 1 ms");
        }
        for t in &self.acl.tokens {
            if t.token.len() < 16 {
                return bad("acl.tokens.token", "must be at least 16 characters");
            }
            if t.token.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return bad(
                    "acl.tokens.token",
                    "may not contain spaces or control characters",
                );
            }
        }
        self.http_proxy
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
        self.validate_dns()?;
        self.store
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
        let t = &self.tcp_proxy;
        if t.idle_timeout_secs == 0 || t.connect_timeout_ms == 0 || t.name_timeout_ms == 0 {
            return bad("tcp_proxy timeouts", "must be greater than 0");
        }
        if t.connect_attempts == 0 || t.max_connections == 0 {
            return bad(
                "tcp_proxy.connect_attempts/max_connections",
                "must be at least 1",
            );
        }
        if !(16..=65_536).contains(&t.name_line_max) {
            return bad("tcp_proxy.name_line_max", "must be 16..=65536");
        }
        if t.workers > 1024 {
            return bad("tcp_proxy.workers", "must be 0..=1024");
        }
        if !crate::proxy::worker::valid_slice_setting(t.sched_slice_us) {
            return bad("tcp_proxy.sched_slice_us", "must be 0 or 100..=100000");
        }
        VipPool::new(self.network.vip_cidr, 0).map_err(|e| ConfigError::Invalid {
            key: "network.vip_cidr",
            reason: e.to_string(),
        })?;
        PortPool::new(self.port_range()).map_err(|e| ConfigError::Invalid {
            key: "network.port_pool_start/end",
            reason: e.to_string(),
        })?;
        Ok(())
    }

    fn validate_dns(&self) -> Result<(), ConfigError> {
        let d = &self.dns;
        let bad = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let domain = d.domain.strip_suffix('.').unwrap_or(&d.domain);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if domain.is_empty() || domain.len() > 200 || !domain.split('.').all(label_ok) {
            return bad(
                "dns.domain",
                format!("'{}' is not a domain name like netsel.", d.domain),
            );
        }
        if d.ttl_secs > 86_400 || d.negative_ttl_secs > 86_400 {
            return bad("dns.ttl_secs", "TTLs must be at most 86400".into());
        }
        if d.forward_timeout_ms == 0 || d.max_forwards == 0 {
            return bad(
                "dns.forward_timeout_ms/max_forwards",
                "must be at least 1".into(),
            );
        }
        if d.tcp_idle_secs == 0 {
            return bad("dns.tcp_idle_secs", "must be at least 1".into());
        }
        if d.tcp_max_connections == 0 {
            return bad("dns.tcp_max_connections", "must be at least 1".into());
        }
        if d.udp_workers > 64 {
            return bad("dns.udp_workers", "at most 64".into());
        }
        if d.upstreams.contains(&self.config.dns_addr) {
            return bad("dns.upstreams", "may not name NetSel's own dns_addr".into());
        }
        Ok(())
    }

    /// The port pool range.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        self.network.port_pool_start..=self.network.port_pool_end
    }

    /// Time between active health-check rounds.
    pub fn check_interval(&self) -> Duration {
        match self.health.interval_ms {
            0 => Duration::from_secs(self.config.health_check_interval),
            ms => Duration::from_millis(ms),
        }
    }

    /// What the catalog needs from these settings.
    pub fn catalog_settings(&self) -> CatalogSettings {
        let ttl = Duration::from_secs(self.config.max_heartbeat_age);
        CatalogSettings {
            vip_cidr: self.network.vip_cidr,
            vip_hold: Duration::from_secs(self.network.vip_hold_secs),
            port_range: self.port_range(),
            default_ttl: ttl,
            max_ttl: Duration::from_secs(self.max_ttl_secs),
            min_ttl: Duration::from_millis(self.min_ttl_ms),
            sweep_interval: Duration::from_secs(self.config.health_check_interval),
            restart_grace: ttl,
            max_instances: self.max_instances,
            probe_vip_bind: true,
            allowed_endpoints: self.registry.allowed_endpoint_cidrs.clone(),
        }
    }

    /// Settings with every listener on an ephemeral loopback port: for tests and examples.
    pub fn ephemeral() -> Settings {
        let any = SocketAddr::new(LOCAL, 0);
        let mut s = Settings::from(NetSelConfig {
            registry_addr: any,
            tcp_proxy_addr: any,
            http_proxy_addr: any,
            dns_addr: any,
            ..NetSelConfig::default()
        });
        s.api_addr = any;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults() {
        // The seed's six defaults are checked in tests/seed_snippets.rs.
        let s = Settings::default();
        assert_eq!(s.config, NetSelConfig::default());
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:9001");
        s.validate().unwrap();
    }

    #[test]
    fn toml_sets_seed_fields_and_tables() {
        let s = Settings::from_toml(
            r#"
            registry_addr = "127.0.0.1:9100"
            max_heartbeat_age = 5
            health_check_interval = 2
            [network]
            vip_cidr = "127.88.0.0/24"
            [registry]
            max_connections = 10
            "#,
        )
        .unwrap();
        assert_eq!(s.config.registry_addr.port(), 9100);
        assert_eq!(s.config.max_heartbeat_age, 5);
        assert_eq!(s.network.vip_cidr.to_string(), "127.88.0.0/24");
        assert_eq!(s.network.vip_hold_secs, 600);
        assert_eq!(s.registry.max_connections, 10);
        assert_eq!(s.registry.idle_timeout_secs, 300);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Settings::from_toml("registy_addr = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.to_string().contains("registy_addr"), "{e}");
        let e = Settings::from_toml("[network]\nvip = \"x\"").unwrap_err();
        assert!(e.to_string().contains("vip"), "{e}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        for text in [
            "max_heartbeat_age = 0",
            "health_check_interval = 0",
            "[network]\nport_pool_start = 8000\nport_pool_end = 9500",
            "[network]\nport_pool_start = 30000\nport_pool_end = 20000",
            "[network]\nvip_cidr = \"127.0.0.0/40\"",
            "[registry]\nmax_connections = 0",
            "[registry]\nwrite_timeout_secs = 0",
            "[api]\nheader_read_timeout_ms = 0",
            "[api]\nwrite_timeout_ms = 0",
            "[http_proxy]\nmax_header_bytes = 100",
            "[http_proxy]\ndefault_service = \"no such\"",
            "[http_proxy]\nsched_slice_us = 50",
            "[http_proxy]\nsched_slice_us = 200000",
            "[tcp_proxy]\nsched_slice_us = 1",
            "[tcp_proxy]\nmax_connections = 0",
            "[tcp_proxy]\nname_line_max = 1",
            "[tcp_proxy]\nrelay = \"magic\"",
            "[tcp_proxy]\nconnect_timeout_ms = 0",
            "registry_addr = \"nope\"",
        ] {
            assert!(Settings::from_toml(text).is_err(), "{text}");
        }
    }

    #[test]
    fn http_proxy_splits_parse_and_bad_ones_name_the_key() {
        let s = Settings::from_toml(
            "[http_proxy.splits.web]\nv1 = 95\ncanary = 5\n[http_proxy.splits.api]\nblue = 1",
        )
        .unwrap();
        assert_eq!(s.http_proxy.splits["web"]["canary"], 5);
        assert_eq!(s.http_proxy.splits["api"]["blue"], 1);
        for (text, want) in [
            (
                "[http_proxy.splits.web]\nv1 = 95\ncanary = 0",
                "invalid setting http_proxy.splits: web.canary: weight must be at least 1",
            ),
            (
                "[http_proxy.splits.web]",
                "invalid setting http_proxy.splits: web: names no tag",
            ),
            (
                "[http_proxy.splits.\"we b\"]\nv1 = 1",
                "invalid setting http_proxy.splits: 'we b' is not a valid service name",
            ),
            (
                "[http_proxy.splits.web]\nv1 = 1\nV1 = 2",
                "invalid setting http_proxy.splits: web.v1: tags match case-insensitively",
            ),
            ("[http_proxy.splits.web]\nv1 = -1", "v1"),
            ("[http_proxy.splits.web]\nv1 = \"x\"", "v1"),
        ] {
            let e = Settings::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn dns_table() {
        let s = Settings::from_toml(
            "[dns]\ndomain = \"svc.local.\"\nttl_secs = 30\nupstreams = [\"127.0.0.1:53\"]",
        )
        .unwrap();
        assert_eq!(s.dns.domain, "svc.local.");
        assert_eq!(s.dns.ttl_secs, 30);
        assert_eq!(s.dns.negative_ttl_secs, 5);
        assert!(!s.dns.bare_names);
        assert_eq!(s.dns.upstreams.len(), 1);
        assert!(Settings::default().dns.upstreams.is_empty());
        for text in [
            "[dns]\ndomain = \"bad domain\"",
            "[dns]\ndomain = \"a..b\"",
            "[dns]\nttl_secs = 100000",
            "[dns]\ntcp_max_connections = 0",
            "[dns]\ncolour = 1",
        ] {
            assert!(Settings::from_toml(text).is_err(), "{text}");
        }
    }

    #[test]
    fn a_worker_time_slice_of_0_or_100_to_100000_us_is_accepted() {
        assert_eq!(Settings::default().http_proxy.sched_slice_us, 100);
        assert_eq!(Settings::default().tcp_proxy.sched_slice_us, 100);
        for v in [0, 100, 100_000] {
            let s = Settings::from_toml(&format!(
                "[http_proxy]\nsched_slice_us = {v}\n[tcp_proxy]\nsched_slice_us = {v}"
            ))
            .unwrap();
            assert_eq!(
                (s.http_proxy.sched_slice_us, s.tcp_proxy.sched_slice_us),
                (v, v)
            );
        }
    }

    #[test]
    fn consul_addr_is_off_unless_set() {
        assert_eq!(Settings::default().consul_addr, None);
        let s = Settings::from_toml("consul_addr = \"127.0.0.1:8500\"").unwrap();
        assert_eq!(s.consul_addr, Some("127.0.0.1:8500".parse().unwrap()));
        assert!(Settings::from_toml("consul_addr = \"nowhere\"").is_err());
    }

    #[test]
    fn traffic_interval_is_bounded() {
        let mut s = Settings::default();
        assert_eq!(s.api.traffic_interval_ms, 5000);
        for (ms, ok) in [(99, false), (100, true), (60_000, true), (60_001, false)] {
            s.api.traffic_interval_ms = ms;
            assert_eq!(s.validate().is_ok(), ok, "{ms}");
        }
        let s = Settings::from_toml("[api]\ntraffic_interval_ms = 250").unwrap();
        assert_eq!(s.api.traffic_interval_ms, 250);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../examples/netsel.toml");
        let s = Settings::from_toml(text).unwrap();
        assert_eq!(s.store, crate::store::StoreSettings::default());
    }

    #[test]
    fn store_url_in_the_file_sets_endpoints_and_prefix() {
        let s = Settings::from_toml(
            "[store]\nurl = \"etcd://127.0.0.1:2379,127.0.0.2:2379/a\"\nlease_ttl_secs = 5",
        )
        .unwrap();
        assert!(s.store.is_cluster());
        assert_eq!(s.store.endpoints, ["127.0.0.1:2379", "127.0.0.2:2379"]);
        assert_eq!((s.store.prefix.as_str(), s.store.lease_ttl_secs), ("/a", 5));
        let e = Settings::from_toml("[store]\nurl = \"etcd://nohost\"").unwrap_err();
        assert!(e.to_string().contains("store.url"), "{e}");
        let e =
            Settings::from_toml("[store]\nendpoints = [\"a:1\"]\nlease_ttl_secs = 0").unwrap_err();
        assert!(e.to_string().contains("lease_ttl_secs"), "{e}");
    }
}
