//! The virtual network: one VIP per service name from a CIDR pool, and a port pool for
//! registrations that name no endpoint.
//!
//! Invariants (proved by the property tests at the bottom):
//! * no two live services share a VIP;
//! * a service keeps its VIP for as long as it exists;
//! * a released VIP goes to no other name until its hold time has passed (the same name
//!   coming back gets it again);
//! * no two live pool registrations share a port, and pool ports never include NetSel's
//!   own default ports.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::ServiceName;

/// NetSel's own default ports; the port pool may never contain them.
pub const RESERVED_PORTS: [u16; 5] = [5353, 8080, 8081, 9000, 9001];

/// Default VIP pool: inside 127.0.0.0/8, so a VIP works on one host with no privileges.
pub const DEFAULT_VIP_CIDR: &str = "127.77.0.0/16";
/// Default port pool for bare-name registrations (clear of NetSel's own ports and of
/// Linux's ephemeral range).
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;

/// Why an address or port could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// Every address is live or held back.
    #[error("VIP pool {0} is exhausted")]
    VipPoolExhausted(IpNet),
    /// Every port is taken.
    #[error("port pool {0}-{1} is exhausted")]
    PortPoolExhausted(u16, u16),
    /// A pool that cannot work.
    #[error("invalid pool: {0}")]
    InvalidPool(String),
}

/// Allocates service VIPs from a CIDR.
#[derive(Debug, Clone)]
pub struct VipPool {
    net: IpNet,
    /// First usable offset and number of usable addresses.
    first: u128,
    size: u128,
    live: HashMap<IpAddr, ServiceName>,
    /// Released addresses: who had them, and until when (ms, catalog clock) they are held.
    held: HashMap<IpAddr, (ServiceName, u64)>,
    hold_ms: u64,
    probe_bind: bool,
}

impl VipPool {
    /// A pool over `net`, holding released addresses for `hold_ms` milliseconds.
    ///
    /// For IPv4 prefixes shorter than /31 the network and broadcast addresses are not
    /// used; nor is 127.0.0.1. If the pool is on loopback, each candidate is test-bound
    /// first and skipped if the host refuses it.
    pub fn new(net: IpNet, hold_ms: u64) -> Result<Self, NetworkError> {
        let net = net.trunc();
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let total: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let (first, size) = match net {
            IpNet::V4(_) if host_bits >= 2 => (1, total - 2),
            IpNet::V6(_) if host_bits >= 2 => (1, total - 1),
            _ => (0, total),
        };
        if size == 0 {
            return Err(NetworkError::InvalidPool(format!(
                "{net} has no usable addresses"
            )));
        }
        let probe_bind = match net.network() {
            IpAddr::V4(a) => a.is_loopback(),
            IpAddr::V6(a) => a.is_loopback(),
        };
        Ok(VipPool {
            net,
            first,
            size,
            live: HashMap::new(),
            held: HashMap::new(),
            hold_ms,
            probe_bind,
        })
    }

    /// Turns bind-probing of candidates on or off (tests use it off).
    pub fn set_probe_bind(&mut self, probe: bool) {
        self.probe_bind = probe;
    }

    /// The pool's network.
    pub fn net(&self) -> IpNet {
        self.net
    }

    fn addr_at(&self, offset: u128) -> IpAddr {
        match self.net {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()).wrapping_add(offset as u32),
            )),
            IpNet::V6(n) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(offset)))
            }
        }
    }

    /// The VIP of `name` if it is live.
    pub fn get(&self, name: &ServiceName) -> Option<IpAddr> {
        self.live
            .iter()
            .find_map(|(ip, n)| (n == name).then_some(*ip))
    }

    /// Number of live VIPs.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Allocates a VIP for `name` at time `now_ms`: [`pick`](Self::pick), then
    /// [`take`](Self::take).
    pub fn allocate(&mut self, name: &ServiceName, now_ms: u64) -> Result<IpAddr, NetworkError> {
        let ip = self.pick(name, now_ms)?;
        self.take(ip, name);
        Ok(ip)
    }

    /// The address `name` would get at time `now_ms`, changing nothing.
    ///
    /// A name that held an address recently gets it back. Otherwise the search starts at a
    /// position derived from the name's hash, so a name tends to get the same address even
    /// in a registry that lost its state.
    pub fn pick(&self, name: &ServiceName, now_ms: u64) -> Result<IpAddr, NetworkError> {
        if let Some(ip) = self
            .held
            .iter()
            .find_map(|(ip, (n, until))| (n == name && *until > now_ms).then_some(*ip))
        {
            return Ok(ip);
        }
        let start = fnv1a(name.as_str().as_bytes()) as u128 % self.size;
        // Bound the probe so a huge IPv6 pool never loops for long.
        let attempts = self.size.min(1 << 20);
        for step in 0..attempts {
            let offset = self.first + (start + step) % self.size;
            let ip = self.addr_at(offset);
            if self.live.contains_key(&ip) || is_reserved(ip) {
                continue;
            }
            if self.held.get(&ip).is_some_and(|(_, until)| *until > now_ms) {
                continue;
            }
            if self.probe_bind && !can_bind(ip) {
                continue;
            }
            return Ok(ip);
        }
        Err(NetworkError::VipPoolExhausted(self.net))
    }

    /// Marks `ip` live for `name`, ending any hold on it. An address outside the pool is
    /// recorded too (a cluster peer may run another pool): it simply never collides with
    /// one this pool hands out. Returns false if another name had it live.
    pub fn take(&mut self, ip: IpAddr, name: &ServiceName) -> bool {
        self.held.remove(&ip);
        match self.live.insert(ip, name.clone()) {
            Some(other) => other == *name,
            None => true,
        }
    }

    /// Whether `ip` can be taken by `name`: inside the pool, and neither live for nor
    /// held for another name.
    pub fn available(&self, ip: IpAddr, name: &ServiceName, now_ms: u64) -> bool {
        self.net.contains(&ip)
            && self.live.get(&ip).is_none_or(|n| n == name)
            && self
                .held
                .get(&ip)
                .is_none_or(|(n, until)| n == name || *until <= now_ms)
    }

    /// Forgets holds that ended by `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        self.held.retain(|_, (_, until)| *until > now_ms);
    }

    /// Frees a live address at once, with no hold.
    pub fn free(&mut self, ip: IpAddr) {
        self.live.remove(&ip);
    }

    /// Holds `ip` back for `name` until `until_ms` (an address that is live stays live).
    pub fn hold(&mut self, ip: IpAddr, name: ServiceName, until_ms: u64) {
        if !self.live.contains_key(&ip) {
            self.held.insert(ip, (name, until_ms));
        }
    }

    /// Ends a hold early.
    pub fn unhold(&mut self, ip: IpAddr) {
        self.held.remove(&ip);
    }

    /// Releases `ip` at `now_ms`; it is held back for the hold time. Returns the hold's end.
    pub fn release(&mut self, ip: IpAddr, now_ms: u64) -> Option<u64> {
        let name = self.live.remove(&ip)?;
        let until = now_ms.saturating_add(self.hold_ms);
        self.held.insert(ip, (name, until));
        Some(until)
    }

    /// How long a released address is held back, in milliseconds.
    pub fn hold_ms(&self) -> u64 {
        self.hold_ms
    }

    /// Addresses held back at `now_ms`, with who had them and until when.
    pub fn holds(&self, now_ms: u64) -> impl Iterator<Item = (IpAddr, &ServiceName, u64)> {
        self.held
            .iter()
            .filter(move |(_, (_, until))| *until > now_ms)
            .map(|(ip, (n, until))| (*ip, n, *until))
    }
}

/// Whether this host can serve VIPs from `net`: it must be able to bind an address of the
/// pool (VIP listeners bind them). A loopback pool always can on Linux; another range
/// must be on a local interface. Binding sends nothing.
pub fn check_pool_usable(net: IpNet) -> Result<(), String> {
    let probe = match VipPool::new(net, 0) {
        Ok(p) => p.addr_at(p.first),
        Err(e) => return Err(e.to_string()),
    };
    match std::net::TcpListener::bind((probe, 0)) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "this host cannot serve VIPs from {net}: binding {probe} fails ({e}); add the \
             range to a local interface (e.g. `ip addr add {net} dev lo`) or use a pool \
             inside 127.0.0.0/8 (e.g. --vip-cidr {DEFAULT_VIP_CIDR})"
        )),
    }
}

fn is_reserved(ip: IpAddr) -> bool {
    ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
}

/// Whether the host lets us bind `ip` (an address in 127.0.0.0/8 always works on Linux;
/// elsewhere, or in odd network namespaces, it may not).
fn can_bind(ip: IpAddr) -> bool {
    std::net::TcpListener::bind((ip, 0)).is_ok()
}

/// FNV-1a: a stable hash, so a name's preferred address does not change between builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Allocates ports for registrations that give no endpoint.
#[derive(Debug, Clone)]
pub struct PortPool {
    start: u16,
    end: u16,
    used: HashSet<u16>,
    /// Next-fit cursor, so a port just released is the last to be reused.
    cursor: u16,
}

impl PortPool {
    /// A pool over `range`. Refuses a range that contains one of [`RESERVED_PORTS`].
    pub fn new(range: RangeInclusive<u16>) -> Result<Self, NetworkError> {
        let (start, end) = (*range.start(), *range.end());
        if start == 0 || start > end {
            return Err(NetworkError::InvalidPool(format!(
                "port range {start}-{end} is empty or starts at 0"
            )));
        }
        if let Some(p) = RESERVED_PORTS.iter().find(|p| range.contains(p)) {
            return Err(NetworkError::InvalidPool(format!(
                "port range {start}-{end} contains NetSel's own port {p}"
            )));
        }
        Ok(PortPool {
            start,
            end,
            used: HashSet::new(),
            cursor: start,
        })
    }

    /// Allocates a port, `hint` if it is in range and free: [`pick`](Self::pick), then
    /// [`take`](Self::take).
    pub fn allocate(&mut self, hint: Option<u16>) -> Result<u16, NetworkError> {
        let port = self.pick(hint)?;
        self.take(port);
        if hint != Some(port) {
            self.advance_past(port);
        }
        Ok(port)
    }

    /// The port an allocation would get, `hint` if it is in range and free, changing
    /// nothing.
    pub fn pick(&self, hint: Option<u16>) -> Result<u16, NetworkError> {
        if let Some(h) = hint
            && (self.start..=self.end).contains(&h)
            && !self.used.contains(&h)
        {
            return Ok(h);
        }
        let len = u32::from(self.end - self.start) + 1;
        for step in 0..len {
            let port = self.start + ((u32::from(self.cursor - self.start) + step) % len) as u16;
            if !self.used.contains(&port) {
                return Ok(port);
            }
        }
        Err(NetworkError::PortPoolExhausted(self.start, self.end))
    }

    /// Marks `port` used. A port outside the range is ignored. Returns false if it was
    /// already used.
    pub fn take(&mut self, port: u16) -> bool {
        !(self.start..=self.end).contains(&port) || self.used.insert(port)
    }

    /// Moves the next-fit search past `port` (after handing out a port the search found,
    /// not a hint), so a port just released is the last to be reused.
    pub fn advance_past(&mut self, port: u16) {
        if (self.start..=self.end).contains(&port) {
            self.cursor = if port == self.end {
                self.start
            } else {
                port + 1
            };
        }
    }

    /// Whether `port` is in range and unused.
    pub fn is_free(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port) && !self.used.contains(&port)
    }

    /// Returns `port` to the pool.
    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    /// Ports in use.
    pub fn used_count(&self) -> usize {
        self.used.len()
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

impl NetworkSettings {
    /// The port pool range.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        self.port_pool_start..=self.port_pool_end
    }

    /// Checks the pools can be built: the key and the reason when they cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        VipPool::new(self.vip_cidr, 0).map_err(|e| ("network.vip_cidr", e.to_string()))?;
        PortPool::new(self.port_range())
            .map_err(|e| ("network.port_pool_start/end", e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn pool(cidr: &str, hold: u64) -> VipPool {
        let mut p = VipPool::new(cidr.parse().unwrap(), hold).unwrap();
        p.set_probe_bind(false);
        p
    }

    #[test]
    fn skips_network_broadcast_and_localhost() {
        let mut p = pool("127.0.0.0/30", 0);
        let a = p.allocate(&name("a"), 0).unwrap();
        let b = p.allocate(&name("b"), 0);
        // Only .1 and .2 are usable, and .1 is localhost.
        assert_eq!(a, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(b, Err(NetworkError::VipPoolExhausted(p.net())));
    }

    #[test]
    fn same_name_gets_its_held_vip_back() {
        let mut p = pool("127.77.0.0/24", 1000);
        let a = p.allocate(&name("a"), 0).unwrap();
        p.release(a, 10);
        assert_eq!(p.allocate(&name("a"), 20).unwrap(), a);
    }

    #[test]
    fn held_vip_goes_to_nobody_else_until_hold_ends() {
        let mut p = pool("127.77.0.0/30", 1000); // two usable: .1 .2
        let a = p.allocate(&name("a"), 0).unwrap();
        let b = p.allocate(&name("b"), 0).unwrap();
        p.release(a, 0);
        assert!(p.allocate(&name("c"), 999).is_err());
        assert_eq!(p.allocate(&name("c"), 1000).unwrap(), a);
        assert_ne!(a, b);
    }

    #[test]
    fn ipv6_pool_works() {
        let mut p = pool("fd00:77::/64", 0);
        let a = p.allocate(&name("a"), 0).unwrap();
        assert!(p.net().contains(&a));
        assert!(a.is_ipv6());
    }

    #[test]
    fn loopback_pool_probes_bind() {
        let mut p = VipPool::new("127.77.1.0/24".parse().unwrap(), 0).unwrap();
        let a = p.allocate(&name("a"), 0).unwrap();
        assert!(p.net().contains(&a));
    }

    #[test]
    fn a_pool_the_host_cannot_bind_is_reported_with_what_to_do() {
        check_pool_usable("127.77.0.0/16".parse().unwrap()).unwrap();
        // TEST-NET-1 (RFC 5737) is on no interface here; binding it sends nothing.
        let e = check_pool_usable("192.0.2.0/24".parse().unwrap()).unwrap_err();
        assert!(
            e.contains("192.0.2.0/24") && e.contains("ip addr add"),
            "{e}"
        );
    }

    #[test]
    fn port_pool_refuses_reserved_ports() {
        assert!(PortPool::new(8000..=8100).is_err());
        assert!(PortPool::new(9000..=9000).is_err());
        assert!(PortPool::new(0..=10).is_err());
        assert!(PortPool::new(DEFAULT_PORT_RANGE).is_ok());
    }

    #[test]
    fn port_pool_hint_and_next_fit() {
        let mut p = PortPool::new(20000..=20002).unwrap();
        assert_eq!(p.allocate(Some(20001)), Ok(20001));
        assert_eq!(p.allocate(Some(20001)), Ok(20000));
        assert_eq!(p.allocate(None), Ok(20002));
        assert!(p.allocate(None).is_err());
        p.release(20000);
        assert_eq!(p.allocate(Some(1)), Ok(20000));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register(u8),
        Release(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12).prop_map(Op::Register),
            (0u8..12).prop_map(Op::Release),
            (0u16..2000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Random register/release/time sequences over a small pool never break the VIP
        /// invariants. (The catalog-level property test drives the same pools through
        /// register/deregister/expire.)
        #[test]
        fn vip_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let hold = 1000;
            let mut p = pool("127.77.0.0/29", hold); // 6 usable
            let mut now = 0u64;
            let mut live: HashMap<String, IpAddr> = HashMap::new();
            // ip -> (name that released it, when)
            let mut released: HashMap<IpAddr, (String, u64)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Register(n) => {
                        let n = format!("s{n}");
                        if live.contains_key(&n) { continue; }
                        if let Ok(ip) = p.allocate(&name(&n), now) {
                            prop_assert!(!live.values().any(|v| *v == ip), "VIP shared");
                            if let Some((who, at)) = released.get(&ip) {
                                prop_assert!(who == &n || now >= at + hold, "held VIP reused early");
                            }
                            live.insert(n, ip);
                        }
                    }
                    Op::Release(n) => {
                        if let Some(ip) = live.remove(&format!("s{n}")) {
                            p.release(ip, now);
                            released.insert(ip, (format!("s{n}"), now));
                        }
                    }
                    Op::Advance(ms) => now += u64::from(ms),
                }
                for (n, ip) in &live {
                    prop_assert_eq!(p.get(&name(n)), Some(*ip), "live service lost its VIP");
                }
                prop_assert_eq!(p.live_count(), live.len());
            }
        }

        #[test]
        fn port_invariants(ops in proptest::collection::vec((any::<bool>(), 0u16..40), 1..300)) {
            let mut p = PortPool::new(21000..=21015).unwrap();
            let mut taken: HashSet<u16> = HashSet::new();
            for (alloc, k) in ops {
                if alloc {
                    if let Ok(port) = p.allocate(Some(21000 + k)) {
                        prop_assert!(taken.insert(port), "port handed out twice");
                        prop_assert!(!RESERVED_PORTS.contains(&port));
                    } else {
                        prop_assert_eq!(taken.len(), 16);
                    }
                } else if let Some(&port) = taken.iter().next() {
                    taken.remove(&port);
                    p.release(port);
                }
                prop_assert_eq!(p.used_count(), taken.len());
            }
        }
    }
}
