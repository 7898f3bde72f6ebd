//! The catalog's data model: service names, instances, leases, secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{AppProtocol, Check, MAX_NAME_LEN};

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
    /// `passing` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Critical => "critical",
        }
    }
}

/// A lease: the deadline by which the instance must heartbeat. Shared between snapshots so
/// a heartbeat renews it with one atomic store and no new snapshot.
#[derive(Debug)]
pub struct Lease {
    /// Milliseconds since the catalog's clock epoch.
    deadline_ms: AtomicU64,
}

impl Lease {
    pub(crate) fn new(deadline_ms: u64) -> Self {
        Lease {
            deadline_ms: AtomicU64::new(deadline_ms),
        }
    }

    /// The deadline, in milliseconds of the catalog clock (see [`super::Catalog::now_ms`]).
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(Ordering::Acquire)
    }

    pub(crate) fn renew(&self, deadline_ms: u64) {
        // fetch_max: a late heartbeat never moves the deadline backwards.
        self.deadline_ms.fetch_max(deadline_ms, Ordering::AcqRel);
    }
}

/// One registered instance of a service. Immutable once in a snapshot, except for the
/// shared [`Lease`].
#[derive(Debug, Clone)]
pub struct Instance {
    /// Unique id.
    pub id: InstanceId,
    /// The service it belongs to.
    pub service: ServiceName,
    /// Where it really listens.
    pub endpoint: SocketAddr,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form metadata.
    pub meta: BTreeMap<String, String>,
    /// Balancing weight, at least 1.
    pub weight: u32,
    /// What it speaks.
    pub protocol: AppProtocol,
    /// Its active health check, if any.
    pub check: Option<Check>,
    /// Lease TTL.
    pub ttl: Duration,
    /// For bare-name (seed) registrations: the peer IP that registered it, the only address
    /// from which a name-only heartbeat is accepted.
    pub owner_peer: Option<IpAddr>,
    /// Whether its port came from the port pool (and returns there when it goes).
    pub pool_port: bool,
    /// Current health.
    pub health: Health,
    /// Catalog index at which it was registered.
    pub registered_index: u64,
    pub(crate) secret: Secret,
    pub(crate) lease: Arc<Lease>,
}

impl Instance {
    /// Whether DNS and the proxies should use it.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Passing
    }

    /// Its lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Checks a claimed secret in constant time.
    pub fn secret_matches(&self, candidate: &str) -> bool {
        self.secret.matches(candidate)
    }
}

/// A service: a name, its VIP and service port, and its instances (sorted by id).
#[derive(Debug, Clone)]
pub struct Service {
    /// Canonical name.
    pub name: ServiceName,
    /// Virtual IP, stable for as long as the service exists.
    pub vip: IpAddr,
    /// The port it answers on at its VIP.
    pub port: u16,
    /// Catalog index at which it was created.
    pub created_index: u64,
    /// Catalog index of its last change.
    pub modify_index: u64,
    /// Instances, sorted by id. A persistent vector: a write clones O(log n), not the
    /// whole list, so registering into a service with thousands of instances stays cheap.
    pub instances: imbl::Vector<Arc<Instance>>,
}

impl Service {
    /// The instances that DNS answers and proxies route to.
    pub fn healthy(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.iter().filter(|i| i.is_healthy())
    }

    /// Number of healthy instances.
    pub fn healthy_count(&self) -> usize {
        self.healthy().count()
    }
}

#[cfg(test)]
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

    #[test]
    fn lease_never_moves_backwards() {
        let l = Lease::new(1000);
        l.renew(500);
        assert_eq!(l.deadline_ms(), 1000);
        l.renew(2000);
        assert_eq!(l.deadline_ms(), 2000);
    }
}
