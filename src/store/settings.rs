//! `[store]`: which store holds the catalog. Empty means the embedded store in `data_dir`
//! (or memory); an etcd URL or endpoint list makes this node one of a cluster.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Key prefix in etcd when the URL names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/netsel";

/// The `[store]` table, and `--store URL`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`: the same as `endpoints` and `prefix`.
    pub url: Option<String>,
    /// etcd endpoints (`HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`). Nodes
    /// given the same endpoints and prefix form one cluster.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster's keys. Default `/netsel`.
    pub prefix: String,
    /// Milliseconds to establish a connection to an etcd member. Default 1000.
    pub dial_timeout_ms: u64,
    /// Milliseconds a write may take before it fails with "cluster store unavailable"
    /// (retries on other members included). Default 1800, so a write without quorum
    /// fails within 2 s.
    pub request_timeout_ms: u64,
    /// Seconds of this node's etcd leases: a node that dies takes its instances with it
    /// within this time. Default 10.
    pub lease_ttl_secs: u64,
    /// Most instance keys on one etcd lease (etcd 3.4 slows down sharply as one lease
    /// holds more keys). Default 1000.
    pub keys_per_lease: usize,
    /// This node's id in the cluster. Default: the host name and a random suffix, new at
    /// every start.
    pub node_id: Option<String>,
    /// etcd user name (with `password`).
    pub username: Option<String>,
    /// etcd password.
    pub password: Option<String>,
    /// CA certificate (PEM) to verify etcd's TLS certificate; setting any TLS file makes
    /// the connection TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: None,
            endpoints: Vec::new(),
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
            dial_timeout_ms: 1000,
            request_timeout_ms: 1800,
            lease_ttl_secs: 10,
            keys_per_lease: 1000,
            node_id: None,
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl StoreSettings {
    /// Whether this node keeps its catalog in etcd.
    pub fn is_cluster(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Reads `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]` into `endpoints` and `prefix`.
    pub fn set_url(&mut self, url: &str) -> Result<(), String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            format!("store URL '{url}' is not etcd://HOST:PORT[,HOST:PORT…][/PREFIX]")
        })?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("store URL '{url}' names no etcd endpoint"));
        }
        for e in &endpoints {
            let port = e.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(format!(
                    "etcd endpoint '{e}' in '{url}' is not HOST:PORT (e.g. 127.0.0.1:2379)"
                ));
            }
        }
        self.url = Some(url.to_string());
        self.endpoints = endpoints;
        if !prefix.is_empty() && prefix != "/" {
            self.prefix = prefix.trim_end_matches('/').to_string();
        }
        Ok(())
    }

    /// Checks the settings; `Err((key, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = &self.url {
            let mut probe = StoreSettings::default();
            probe.set_url(url).map_err(|e| ("store.url", e))?;
        }
        if !self.is_cluster() {
            return Ok(());
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            return Err((
                "store.prefix",
                "must start with '/' and name something".into(),
            ));
        }
        if self.dial_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err(("store timeouts", "must be greater than 0".into()));
        }
        if !(2..=3600).contains(&self.lease_ttl_secs) {
            return Err(("store.lease_ttl_secs", "must be 2..=3600".into()));
        }
        if !(1..=10_000).contains(&self.keys_per_lease) {
            return Err(("store.keys_per_lease", "must be 1..=10000".into()));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(("store.username/password", "give both or neither".into()));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(("store.cert_file/key_file", "give both or neither".into()));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
        {
            return Err((
                "store.node_id",
                "1-64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        Ok(())
    }

    /// Whether the connection to etcd uses TLS.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// The dial timeout.
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_endpoints_and_prefix() {
        let mut s = StoreSettings::default();
        s.set_url("etcd://127.0.0.1:2379,127.0.0.2:2379/team-a/")
            .unwrap();
        assert_eq!(s.endpoints, ["127.0.0.1:2379", "127.0.0.2:2379"]);
        assert_eq!(s.prefix, "/team-a");
        assert!(s.is_cluster());
        s.validate().unwrap();

        let mut s = StoreSettings::default();
        s.set_url("etcd://localhost:2379").unwrap();
        assert_eq!(s.prefix, DEFAULT_ETCD_PREFIX);

        for bad in [
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd:///x",
            "etcd://127.0.0.1",
            "etcd://127.0.0.1:99999",
        ] {
            let e = StoreSettings::default().set_url(bad).unwrap_err();
            assert!(e.contains(bad) || e.contains("127.0.0.1"), "{bad}: {e}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = StoreSettings::default();
        s.set_url("etcd://127.0.0.1:2379").unwrap();
        s.lease_ttl_secs = 1;
        assert_eq!(s.validate().unwrap_err().0, "store.lease_ttl_secs");
        s.lease_ttl_secs = 10;
        s.username = Some("u".into());
        assert_eq!(s.validate().unwrap_err().0, "store.username/password");
        s.password = Some("p".into());
        s.validate().unwrap();
        assert!(!format!("{s:?}").contains("\"p\""), "password never prints");
    }
}
