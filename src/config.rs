//! Configuration: the seed's six-field [`NetSelConfig`], and [`Settings`], which holds it
//! plus everything NetSel added since.
//!
//! Each part owns its settings type and writes its defaults there: `[network]`
//! [`NetworkSettings`] (`network`), `[registry]` [`RegistryLimits`] (`registry`), `[api]`
//! [`ApiSettings`] (`api`), `[acl]` [`AclSettings`] (`acl`), `[balance]`
//! [`BalanceSettings`] (`proxy::balance`), `[health]` [`HealthSettings`] (`health`),
//! `[http_proxy]` [`HttpProxySettings`] (`proxy::http`), `[dns]` [`DnsSettings`] (`dns`),
//! `[tcp_proxy]` [`TcpProxySettings`] (`proxy::tcp`) and `[store]`
//! [`StoreSettings`](crate::store::StoreSettings) (`store`); the types are re-exported here.
//! This module owns the rest: the seed's six fields and the top-level keys (`api_addr`,
//! `consul_addr`, `data_dir`, the lease limits, `drain_secs`) with their defaults, the
//! catalog's [`CatalogSettings`] assembled from them, and the rules between parts.
//!
//! A TOML file (`netsel serve --config FILE`) sets any of it: the six seed fields at the
//! top level, the rest at the top level or in tables; `netsel serve`'s flags are laid over
//! the file (`cli::serve`). Unknown keys are rejected, and [`Settings::validate`] (each
//! part's own checks, then the rules between parts) runs before anything binds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::acl::{AclSettings, AclToken};
pub use crate::api::ApiSettings;
use crate::catalog::CatalogSettings;
pub use crate::dns::DnsSettings;
pub use crate::health::HealthSettings;
pub use crate::network::NetworkSettings;
pub use crate::proxy::balance::BalanceSettings;
pub use crate::proxy::http::HttpProxySettings;
pub use crate::proxy::tcp::{RelayMode, TcpProxySettings};
pub use crate::registry::RegistryLimits;

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
        let part = |r: Result<(), (&'static str, String)>| {
            r.map_err(|(key, reason)| ConfigError::Invalid { key, reason })
        };
        part(self.registry.validate())?;
        part(self.api.validate())?;
        part(self.acl.validate())?;
        part(self.http_proxy.validate())?;
        part(self.dns.validate())?;
        if self.dns.upstreams.contains(&self.config.dns_addr) {
            return bad("dns.upstreams", "may not name NetSel's own dns_addr");
        }
        part(self.store.validate())?;
        part(self.tcp_proxy.validate())?;
        part(self.network.validate())?;
        Ok(())
    }

    /// The port pool range.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        self.network.port_range()
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
