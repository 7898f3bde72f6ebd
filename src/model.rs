//! The shared model: the names, ids, secrets, records and operations that every part of
//! NetSel speaks. A leaf: it imports nothing else of NetSel, so the catalog, the stores,
//! the network pools and the front ends can all depend on it without depending on each
//! other.
//!
//! The wire enums ([`AppProtocol`], [`Check`]) build in the client-only build too; the
//! rest needs the `server` feature.

/// Longest service name (one DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// The application protocol an instance speaks, used by the HTTP proxy upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[cfg_attr(feature = "server", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "server", serde(rename_all = "lowercase"))]
pub enum AppProtocol {
    /// Plain TCP (HTTP/1.1 when proxied over HTTP).
    #[default]
    Tcp,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 over cleartext (prior knowledge).
    Http2,
}

impl AppProtocol {
    /// The protocol's wire name (`tcp`, `http1`, `http2`).
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Tcp => "tcp",
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
        }
    }
}

/// An active health check NetSel runs against an instance every `health_check_interval`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "server", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "server", serde(rename_all = "lowercase", tag = "type"))]
pub enum Check {
    /// A TCP connect to the endpoint succeeds.
    Tcp,
    /// `GET <path>` on the endpoint answers 2xx or 3xx.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
}

impl Check {
    /// The wire form: `tcp` or `http:<path>`.
    pub fn to_wire(&self) -> String {
        match self {
            Check::Tcp => "tcp".into(),
            Check::Http { path } => format!("http:{path}"),
        }
    }
}

#[cfg(feature = "server")]
pub use server_model::*;

#[cfg(feature = "server")]
mod server_model {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde::{Deserialize, Serialize};

    use super::{AppProtocol, Check, MAX_NAME_LEN};

    /// A cluster node's id: chosen at start-up, unique among the nodes of one cluster.
    pub type NodeId = Arc<str>;

    /// A validated service name: one DNS label, stored lower-case.
    ///
    /// Names are matched case-insensitively, so `Web` and `web` are one service.
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[serde(try_from = "String", into = "String")]
    pub struct ServiceName(Arc<str>);

    /// Why a service name is not acceptable.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum NameError {
        /// No characters.
        #[error("service name is empty")]
        Empty,
        /// More than 63 bytes.
        #[error("service name is longer than {MAX_NAME_LEN} characters")]
        TooLong,
        /// A character outside `a-z`, `0-9`, `-`.
        #[error("service name '{0}' may only contain letters, digits and '-'")]
        BadChar(String),
        /// Starts or ends with `-`.
        #[error("service name '{0}' may not start or end with '-'")]
        Hyphen(String),
    }

    impl ServiceName {
        /// Validates `name` against DNS label rules (letters, digits, inner hyphens, at most
        /// 63 characters) and lower-cases it.
        pub fn new(name: &str) -> Result<Self, NameError> {
            if name.is_empty() {
                return Err(NameError::Empty);
            }
            if name.len() > MAX_NAME_LEN {
                return Err(NameError::TooLong);
            }
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                let shown: String = name.chars().take(MAX_NAME_LEN).collect();
                return Err(NameError::BadChar(shown));
            }
            if name.starts_with('-') || name.ends_with('-') {
                return Err(NameError::Hyphen(name.into()));
            }
            Ok(ServiceName(name.to_ascii_lowercase().into()))
        }

        /// The canonical (lower-case) name.
        pub fn as_str(&self) -> &str {
            &self.0
        }
    }

    impl TryFrom<String> for ServiceName {
        type Error = NameError;
        fn try_from(s: String) -> Result<Self, Self::Error> {
            ServiceName::new(&s)
        }
    }

    impl From<ServiceName> for String {
        fn from(n: ServiceName) -> String {
            n.0.to_string()
        }
    }

    impl fmt::Display for ServiceName {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::borrow::Borrow<str> for ServiceName {
        fn borrow(&self) -> &str {
            &self.0
        }
    }

    /// An instance id: 16 lower-case hex digits, ordered by creation time (like a UUIDv7):
    /// the top 44 bits are the Unix time in milliseconds, the low 20 bits start random. Ids
    /// made by one process strictly increase, so a new instance lands at the end of its
    /// service's id-sorted list (an append, not an insert in the middle).
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct InstanceId(Arc<str>);

    impl InstanceId {
        /// A fresh id, greater than every id this process made before.
        pub fn generate() -> Self {
            static LAST: AtomicU64 = AtomicU64::new(0);
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let mut low = [0u8; 4];
            getrandom::fill(&mut low).expect("the operating system's random source failed");
            let fresh = (ms << 20) | u64::from(u32::from_le_bytes(low) & 0xf_ffff);
            let mut last = LAST.load(Ordering::Relaxed);
            loop {
                let next = fresh.max(last.wrapping_add(1));
                match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return InstanceId(format!("{next:016x}").into()),
                    Err(seen) => last = seen,
                }
            }
        }

        /// The id as text.
        pub fn as_str(&self) -> &str {
            &self.0
        }
    }

    impl From<&str> for InstanceId {
        fn from(s: &str) -> Self {
            InstanceId(s.into())
        }
    }

    impl fmt::Display for InstanceId {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::borrow::Borrow<str> for InstanceId {
        fn borrow(&self) -> &str {
            &self.0
        }
    }

    /// The secret that proves ownership of an instance. It never prints: `Debug` and
    /// `Display` show `***`, so it cannot reach a log by accident.
    #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct Secret(String);

    impl Secret {
        /// A fresh secret: 128 random bits as 32 hex digits.
        pub fn generate() -> Self {
            Secret(random_hex(16))
        }

        /// Wraps a known secret (loaded from a store, or given by a client).
        pub fn from_string(s: String) -> Self {
            Secret(s)
        }

        /// The secret itself, for handing to its owner.
        pub fn expose(&self) -> &str {
            &self.0
        }

        /// Compares with `candidate` in time independent of where they differ.
        pub fn matches(&self, candidate: &str) -> bool {
            let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
            if a.len() != b.len() {
                return false;
            }
            a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        }
    }

    impl fmt::Debug for Secret {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Secret(***)")
        }
    }

    impl fmt::Display for Secret {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("***")
        }
    }

    fn random_hex(bytes: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = vec![0u8; bytes];
        getrandom::fill(&mut buf).expect("the operating system's random source failed");
        let mut out = String::with_capacity(bytes * 2);
        for b in buf {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// Health of an instance. Only `Passing` instances are answered by DNS or routed to.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
    #[serde(rename_all = "lowercase")]
    pub enum Health {
        /// Heartbeating and passing its checks.
        #[default]
        Passing,
        /// Heartbeating but failing an active check.
        Critical,
    }

    impl Health {
        /// Whether it is `Passing`.
        pub fn is_passing(&self) -> bool {
            *self == Health::Passing
        }

        /// `passing` or `critical`.
        pub fn as_str(self) -> &'static str {
            match self {
                Health::Passing => "passing",
                Health::Critical => "critical",
            }
        }
    }

    /// A service as stored.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ServiceRecord {
        /// Name.
        pub name: ServiceName,
        /// Its VIP.
        pub vip: IpAddr,
        /// Its port on the VIP.
        pub port: u16,
        /// Catalog index at creation.
        pub created_index: u64,
    }

    /// An instance as stored.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct InstanceRecord {
        /// Id.
        pub id: InstanceId,
        /// Service.
        pub service: ServiceName,
        /// Endpoint.
        pub endpoint: SocketAddr,
        /// Tags.
        pub tags: Vec<String>,
        /// Metadata.
        pub meta: BTreeMap<String, String>,
        /// Weight.
        pub weight: u32,
        /// Protocol.
        pub protocol: AppProtocol,
        /// Active health check.
        #[serde(default)]
        pub check: Option<Check>,
        /// Lease TTL in milliseconds.
        pub ttl_ms: u64,
        /// How long it may stay critical before it is deregistered, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deregister_critical_after_ms: Option<u64>,
        /// Registering peer for bare-name registrations.
        pub owner_peer: Option<IpAddr>,
        /// Whether the port came from the pool.
        pub pool_port: bool,
        /// Owner secret.
        pub secret: Secret,
        /// Catalog index at registration.
        pub registered_index: u64,
        /// Lease deadline as wall-clock Unix milliseconds.
        pub deadline_unix_ms: u64,
        /// The cluster node that holds its lease and takes its heartbeats (none on a single
        /// node).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub owner: Option<NodeId>,
        /// Its health as last checked (kept by cluster stores; a single node starts every
        /// instance passing).
        #[serde(default, skip_serializing_if = "Health::is_passing")]
        pub health: Health,
        /// The write that put it, as `node/sequence`: after a timed-out write, reading the
        /// record back tells whether that write committed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub request: Option<String>,
    }

    /// A VIP held back after its service went away.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VipHold {
        /// The address.
        pub vip: IpAddr,
        /// Who had it.
        pub name: ServiceName,
        /// Held until (wall-clock Unix milliseconds).
        pub until_unix_ms: u64,
    }

    /// One committed operation on the catalog's state, in catalog order.
    ///
    /// Every state change is one of these, applied by the catalog's one `apply`: a local
    /// write applies the operations it planned, the embedded store's restore and log replay
    /// fold them over what was kept, and a cluster node applies what its etcd watch delivers.
    /// The variant names are the embedded store's on-disk encoding: never rename one.
    // `PutInstance` is most operations (every registration): boxing it would add an
    // allocation to the common case to shrink the rare ones.
    #[allow(clippy::large_enum_variant)]
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum Op {
        /// Create or replace a service.
        PutService(ServiceRecord),
        /// Remove a service.
        DeleteService(ServiceName),
        /// Create or replace an instance.
        PutInstance(InstanceRecord),
        /// Remove an instance.
        DeleteInstance(InstanceId),
        /// Record a VIP hold.
        PutHold(VipHold),
        /// Drop a VIP hold (the address was reused or the hold ended).
        DeleteHold(IpAddr),
        /// The catalog index after this batch.
        SetIndex(u64),
        /// An instance's health, from its active check.
        SetHealth {
            /// Which instance.
            id: InstanceId,
            /// Its new health.
            health: Health,
        },
    }

    /// What a node tells the others about itself (`nodes/<id>`).
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct NodeInfo {
        /// Node id.
        pub id: String,
        /// Its addresses by part (`registry`, `api`, `dns`, …).
        pub addrs: BTreeMap<String, String>,
        /// When it started (Unix ms).
        pub started_unix_ms: u64,
        /// Its NetSel version.
        pub version: String,
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        assert_eq!(ServiceName::new("Web-1").unwrap().as_str(), "web-1");
        assert_eq!(ServiceName::new(""), Err(NameError::Empty));
        assert_eq!(ServiceName::new(&"a".repeat(64)), Err(NameError::TooLong));
        assert!(ServiceName::new(&"a".repeat(63)).is_ok());
        assert!(matches!(
            ServiceName::new("a.b"),
            Err(NameError::BadChar(_))
        ));
        assert!(matches!(
            ServiceName::new("a_b"),
            Err(NameError::BadChar(_))
        ));
        assert!(matches!(ServiceName::new("-a"), Err(NameError::Hyphen(_))));
        assert!(matches!(ServiceName::new("a-"), Err(NameError::Hyphen(_))));
        assert!(matches!(
            ServiceName::new("ünï"),
            Err(NameError::BadChar(_))
        ));
    }

    #[test]
    fn secrets_never_print_and_compare_exactly() {
        let s = Secret::generate();
        assert_eq!(s.expose().len(), 32);
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert!(s.matches(s.expose()));
        assert!(!s.matches(""));
        assert!(!s.matches(&s.expose()[1..]));
        let mut other = s.expose().to_string();
        other.replace_range(0..1, if other.starts_with('0') { "1" } else { "0" });
        assert!(!s.matches(&other));
        assert_ne!(Secret::generate(), s);
    }
}
