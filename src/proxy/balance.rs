//! Load balancing and passive health, shared by the TCP and HTTP proxies.
//!
//! A [`Balancer`] picks one healthy instance of a service under a [`Policy`], skipping
//! instances that are *ejected*: an instance whose connection failed is left out for a
//! backoff period that doubles with each consecutive failure (capped), and comes back
//! when the backoff ends, when a connection to it succeeds, or as soon as it heartbeats
//! again. If every healthy instance is ejected, they are all tried anyway (a service
//! with some chance beats one with none).
//!
//! Per-instance state (active connections, failures, ejection) is kept by instance id and
//! survives catalog changes; state of instances that left the catalog is pruned.
//!
//! A pick takes no lock and allocates nothing in the common case: each thread keeps the
//! state handles of the services it picked for lately, per `Arc<Service>` (a service's
//! `Arc` changes whenever its instances do), and goes to the shared table only when a
//! service changed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Instance, InstanceId, Service, ServiceName};

/// How to choose among healthy instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The instance with the fewest active connections (ties in turn).
    LeastConnections,
    /// In turn, each instance as often as its weight.
    Weighted,
}

/// Which healthy instances of a service a pick may choose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Subset<'a> {
    /// Every one.
    #[default]
    All,
    /// Those carrying this tag (ASCII case-insensitively, as in DNS).
    Tagged(&'a str),
}

impl Subset<'_> {
    /// Whether `inst` belongs to the subset.
    #[inline]
    pub fn admits(self, inst: &Instance) -> bool {
        match self {
            Subset::All => true,
            Subset::Tagged(tag) => carries(inst, tag),
        }
    }
}

/// Whether `inst` carries `tag`, ASCII case-insensitively.
pub fn carries(inst: &Instance, tag: &str) -> bool {
    inst.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
}

/// Most tags in one [`Split`].
pub const MAX_SPLIT_TAGS: usize = 64;

/// A service's traffic split between tags by weight (`[http_proxy.splits.NAME]`): each
/// request goes to the instances of one tag, chosen in proportion to the weights among
/// the tags that have a healthy instance. Instances carrying none of the tags get none.
///
/// The choice is a Weyl sequence over a shared counter (request *n* takes the tag whose
/// share of `[0, 1)` holds the fractional part of *n*·φ): no lock, no allocation, no
/// randomness, and over any run of requests every tag's share is within a few requests
/// of its weight, spread out rather than in bursts.
#[derive(Debug)]
pub struct Split {
    tags: Vec<(String, u64)>,
    turn: AtomicU64,
}

impl Split {
    /// A split over `weights` (tag, weight ≥ 1), at most [`MAX_SPLIT_TAGS`] of them
    /// (settings validation enforces both; extra tags are ignored, zero weights count 1).
    pub fn new<'a>(weights: impl IntoIterator<Item = (&'a str, u32)>) -> Split {
        Split {
            tags: weights
                .into_iter()
                .take(MAX_SPLIT_TAGS)
                .map(|(t, w)| (t.to_string(), u64::from(w.max(1))))
                .collect(),
            turn: AtomicU64::new(0),
        }
    }

    /// The tags and their weights.
    pub fn tags(&self) -> impl Iterator<Item = (&str, u64)> {
        self.tags.iter().map(|(t, w)| (t.as_str(), *w))
    }

    /// The tag the next request of `svc` goes to, among the tags with a healthy instance
    /// `usable` lets through; `None` when no tag of the split has one. O(instances ×
    /// tags), no allocation.
    pub fn choose(&self, svc: &Service, usable: impl Fn(&Instance) -> bool) -> Option<&str> {
        let mut live = 0u64;
        for i in svc.instances.iter() {
            if !i.is_healthy() || !usable(i) {
                continue;
            }
            for (n, (tag, _)) in self.tags.iter().enumerate() {
                if carries(i, tag) {
                    live |= 1 << n;
                }
            }
        }
        let weights = || {
            self.tags
                .iter()
                .enumerate()
                .filter(move |(n, _)| live & (1 << n) != 0)
                .map(|(_, (t, w))| (t.as_str(), *w))
        };
        let total: u64 = weights().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let n = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut at = weyl(n, total);
        for (tag, w) in weights() {
            if at < w {
                return Some(tag);
            }
            at -= w;
        }
        None
    }
}

/// The `n`-th point of the golden-ratio Weyl sequence, scaled to `0..total`.
fn weyl(n: u64, total: u64) -> u64 {
    let frac = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(frac) * u128::from(total)) >> 64) as u64
}

/// Balancing settings: a global policy, per-service overrides, and ejection backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSettings {
    /// Policy for services without an override. Default `round_robin`.
    pub policy: Policy,
    /// Per-service policy, by service name.
    pub services: HashMap<String, Policy>,
    /// First ejection, in milliseconds. Default 1000.
    pub eject_base_ms: u64,
    /// Longest ejection, in milliseconds. Default 30000.
    pub eject_max_ms: u64,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        BalanceSettings {
            policy: Policy::RoundRobin,
            services: HashMap::new(),
            eject_base_ms: 1000,
            eject_max_ms: 30_000,
        }
    }
}

/// What the balancer knows about one instance.
#[derive(Debug, Default)]
pub struct Backend {
    active: AtomicUsize,
    failures: AtomicU32,
    /// Ejected until this catalog-clock millisecond (0: not ejected).
    ejected_until: AtomicU64,
    /// The instance's lease deadline when it was ejected; a later deadline means it
    /// heartbeated since, which reinstates it.
    lease_at_ejection: AtomicU64,
}

impl Backend {
    /// Connections or requests in flight to it.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// A chosen instance. Hold the [`ActiveGuard`] from [`Pick::start`] while a connection or
/// request is in flight, so least-connections sees it.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The instance.
    pub instance: Arc<Instance>,
    backend: Arc<Backend>,
}

impl Pick {
    /// Counts one in-flight connection until the guard drops.
    pub fn start(&self) -> ActiveGuard {
        self.backend.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.backend.clone())
    }
}

/// Decrements the instance's active count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Tables {
    backends: HashMap<InstanceId, Arc<Backend>>,
    turns: HashMap<ServiceName, Arc<AtomicUsize>>,
    /// Catalog index at the last prune.
    pruned_at: u64,
}

/// Services whose state one thread keeps at most (then it starts over).
const CACHED_SERVICES: usize = 64;

/// A thread's copy of one service's state handles, valid while the catalog still has
/// this very `Arc<Service>`.
struct Cached {
    /// [`Balancer::id`] of the balancer it came from.
    balancer: u64,
    svc: Arc<Service>,
    /// State of `svc.instances[n]`.
    backends: Vec<Arc<Backend>>,
    turn: Arc<AtomicUsize>,
}

thread_local! {
    static CACHE: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Picks instances for the proxies. One per server, shared by both proxies.
pub struct Balancer {
    /// Tells this balancer's entries in the per-thread caches from another's.
    id: u64,
    catalog: Catalog,
    settings: BalanceSettings,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("settings", &self.settings)
            .finish()
    }
}

/// What an ejection decided (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// How long the instance is left out.
    pub backoff: Duration,
    /// Consecutive failures so far.
    pub failures: u32,
}

impl Balancer {
    /// A balancer over `catalog`.
    pub fn new(catalog: Catalog, settings: BalanceSettings) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Balancer {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            catalog,
            settings,
            tables: Mutex::new(Tables::default()),
        }
    }

    /// The catalog it balances over.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The policy for `service`.
    pub fn policy(&self, service: &str) -> Policy {
        self.settings
            .services
            .get(service)
            .copied()
            .unwrap_or(self.settings.policy)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// State for each instance of `svc`, and the service's turn counter.
    fn state_for(&self, svc: &Service) -> (Vec<Arc<Backend>>, Arc<AtomicUsize>) {
        let index = self.catalog.index();
        let mut t = self.lock();
        if index != t.pruned_at && t.backends.len() > 64 {
            // Forget instances that left the catalog (cheap relative to how rarely the
            // catalog changes compared with connections).
            let snap = self.catalog.snapshot();
            t.backends
                .retain(|id, _| snap.instance(id.as_str()).is_some());
            t.turns
                .retain(|name, _| snap.service(name.as_str()).is_some());
            t.pruned_at = index;
        }
        let backends = svc
            .instances
            .iter()
            .map(|i| t.backends.entry(i.id.clone()).or_default().clone())
            .collect();
        let turn = t.turns.entry(svc.name.clone()).or_default().clone();
        (backends, turn)
    }

    /// Picks an instance of `svc`, skipping any in `exclude` (already tried by this
    /// connection). `None` when no healthy instance is left to try.
    pub fn pick(&self, svc: &Arc<Service>, exclude: &[InstanceId]) -> Option<Pick> {
        self.pick_in(svc, exclude, Subset::All)
    }

    /// As [`Balancer::pick`], among the instances of `subset` only.
    pub fn pick_in(
        &self,
        svc: &Arc<Service>,
        exclude: &[InstanceId],
        subset: Subset<'_>,
    ) -> Option<Pick> {
        let hit = CACHE.with_borrow(|cache| {
            cache
                .iter()
                .find(|c| c.balancer == self.id && Arc::ptr_eq(&c.svc, svc))
                .map(|c| self.choose(svc, &c.backends, &c.turn, exclude, subset))
        });
        if let Some(pick) = hit {
            return pick;
        }
        let (backends, turn) = self.state_for(svc);
        let pick = self.choose(svc, &backends, &turn, exclude, subset);
        CACHE.with_borrow_mut(|cache| {
            // One entry per service: the older version of this one goes.
            cache.retain(|c| c.balancer != self.id || c.svc.name != svc.name);
            if cache.len() >= CACHED_SERVICES {
                cache.clear();
            }
            cache.push(Cached {
                balancer: self.id,
                svc: svc.clone(),
                backends,
                turn,
            });
        });
        pick
    }

    /// The choice among `svc`'s instances (`backends[n]` is the state of instance `n`).
    fn choose(
        &self,
        svc: &Service,
        backends: &[Arc<Backend>],
        turn: &AtomicUsize,
        exclude: &[InstanceId],
        subset: Subset<'_>,
    ) -> Option<Pick> {
        // Never an endpoint outside the policy, whatever the catalog holds.
        let settings = self.catalog.settings();
        let candidate = |i: &Instance| {
            i.is_healthy()
                && !exclude.contains(&i.id)
                && subset.admits(i)
                && settings.allows_endpoint(i.endpoint.ip())
        };
        let (mut candidates, mut available) = (0usize, 0usize);
        for (i, b) in svc.instances.iter().zip(backends) {
            if candidate(i) {
                candidates += 1;
                available += usize::from(self.is_available(i, b));
            }
        }
        if candidates == 0 {
            return None;
        }
        let t = turn.fetch_add(1, Ordering::Relaxed);
        // All ejected: try them anyway rather than fail outright. Ejections can change
        // under us (other threads report), so when the available ones no longer match
        // the count, the choice is among all candidates (which cannot change).
        let chosen = (available > 0)
            .then(|| {
                let keep = |i: &Instance, b: &Backend| candidate(i) && self.is_available(i, b);
                self.select(svc, backends, t, available, keep)
            })
            .flatten()
            .or_else(|| self.select(svc, backends, t, candidates, |i, _| candidate(i)))?;
        Some(Pick {
            instance: svc.instances[chosen].clone(),
            backend: backends[chosen].clone(),
        })
    }

    /// Instance `n` of the `size` ones `keep` lets through, by the service's policy at
    /// turn `t`. None if fewer than `size` are let through.
    fn select(
        &self,
        svc: &Service,
        backends: &[Arc<Backend>],
        t: usize,
        size: usize,
        keep: impl Fn(&Instance, &Backend) -> bool + Copy,
    ) -> Option<usize> {
        let pool = || {
            svc.instances
                .iter()
                .zip(backends)
                .enumerate()
                .filter(move |(_, (i, b))| keep(i, b))
                .map(|(n, _)| n)
        };
        match self.policy(svc.name.as_str()) {
            Policy::RoundRobin => pool().nth(t % size),
            Policy::LeastConnections => {
                let start = t % size;
                pool().nth(size - 1)?; // as many as counted (see `choose`)
                pool()
                    .skip(start)
                    .chain(pool().take(start))
                    .min_by_key(|n| backends[*n].active())
            }
            Policy::Weighted => {
                let weight = |n: usize| u64::from(svc.instances[n].weight.max(1));
                let total: u64 = pool().map(weight).sum();
                let mut target = (t as u64) % total.max(1);
                for n in pool() {
                    if target < weight(n) {
                        return Some(n);
                    }
                    target -= weight(n);
                }
                None
            }
        }
    }

    /// The tag `split` sends the next request of `svc` to (see [`Split::choose`]), among
    /// instances the endpoint policy allows.
    pub fn split_tag<'s>(&self, split: &'s Split, svc: &Service) -> Option<&'s str> {
        let settings = self.catalog.settings();
        split.choose(svc, |i| settings.allows_endpoint(i.endpoint.ip()))
    }

    /// Whether `svc` has a healthy instance in `subset` that the endpoint policy allows.
    pub fn has_healthy(&self, svc: &Service, subset: Subset<'_>) -> bool {
        let settings = self.catalog.settings();
        svc.healthy()
            .any(|i| subset.admits(i) && settings.allows_endpoint(i.endpoint.ip()))
    }

    fn is_available(&self, inst: &Instance, b: &Backend) -> bool {
        let until = b.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let heartbeated = inst.lease().deadline_ms() > b.lease_at_ejection.load(Ordering::Acquire);
        if self.catalog.now_ms() >= until || heartbeated {
            b.ejected_until.store(0, Ordering::Release);
            return true;
        }
        false
    }

    /// Reports a failed connection attempt to the picked instance: it is ejected for a
    /// backoff that doubles with each consecutive failure.
    pub fn report_failure(&self, pick: &Pick) -> Ejection {
        let b = &pick.backend;
        let failures = b.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let base = self.settings.eject_base_ms.max(1);
        let backoff = base
            .saturating_mul(1u64 << (failures - 1).min(20))
            .min(self.settings.eject_max_ms.max(base));
        b.lease_at_ejection
            .store(pick.instance.lease().deadline_ms(), Ordering::Release);
        b.ejected_until
            .store(self.catalog.now_ms() + backoff, Ordering::Release);
        Ejection {
            backoff: Duration::from_millis(backoff),
            failures,
        }
    }

    /// Reports a successful connection: failures reset, ejection lifted.
    pub fn report_success(&self, pick: &Pick) {
        let b = &pick.backend;
        if b.failures.load(Ordering::Relaxed) != 0 {
            b.failures.store(0, Ordering::Release);
            b.ejected_until.store(0, Ordering::Release);
        }
    }

    /// Connections (TCP proxy) and requests (HTTP proxy) in flight to `svc`'s instances
    /// now, from both proxies. Reads the table; creates nothing.
    pub fn in_flight(&self, svc: &Service) -> usize {
        let t = self.lock();
        svc.instances
            .iter()
            .filter_map(|i| t.backends.get(&i.id))
            .map(|b| b.active())
            .sum()
    }

    /// Whether an instance is currently ejected.
    pub fn is_ejected(&self, id: &InstanceId) -> bool {
        let t = self.lock();
        t.backends
            .get(id)
            .is_some_and(|b| b.ejected_until.load(Ordering::Acquire) > self.catalog.now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Endpoint, Registration};
    use crate::config::Settings;
    use std::collections::HashMap as Map;

    async fn catalog_with(weights: &[u32]) -> Catalog {
        let mut s = Settings::default().catalog_settings();
        s.probe_vip_bind = false;
        let catalog = Catalog::in_memory(s).unwrap();
        for (n, w) in weights.iter().enumerate() {
            let mut reg = Registration::new(
                "web",
                Endpoint::Explicit(format!("127.0.0.1:{}", 8000 + n).parse().unwrap()),
            );
            reg.weight = Some(*w);
            catalog.register(reg).await.unwrap();
        }
        catalog
    }

    fn counts(b: &Balancer, catalog: &Catalog, n: usize) -> Map<u16, usize> {
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let mut out = Map::new();
        for _ in 0..n {
            let p = b.pick(svc, &[]).unwrap();
            *out.entry(p.instance.endpoint.port()).or_default() += 1;
        }
        out
    }

    async fn catalog_tagged(tags: &[&[&str]]) -> Catalog {
        let mut s = Settings::default().catalog_settings();
        s.probe_vip_bind = false;
        let catalog = Catalog::in_memory(s).unwrap();
        for (n, t) in tags.iter().enumerate() {
            let mut reg = Registration::new(
                "web",
                Endpoint::Explicit(format!("127.0.0.1:{}", 8000 + n).parse().unwrap()),
            );
            reg.tags = t.iter().map(|t| t.to_string()).collect();
            catalog.register(reg).await.unwrap();
        }
        catalog
    }

    #[tokio::test]
    async fn a_tagged_pick_stays_within_the_tag() {
        let catalog = catalog_tagged(&[&["v1"], &["V1", "canary"], &[]]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let ports: std::collections::BTreeSet<u16> = (0..20)
            .map(|_| {
                b.pick_in(svc, &[], Subset::Tagged("v1"))
                    .unwrap()
                    .instance
                    .endpoint
                    .port()
            })
            .collect();
        assert_eq!(ports, [8000, 8001].into(), "case-insensitive, both v1");
        let canary = b.pick_in(svc, &[], Subset::Tagged("canary")).unwrap();
        assert_eq!(canary.instance.endpoint.port(), 8001);
        let only = std::slice::from_ref(&canary.instance.id);
        assert!(b.pick_in(svc, only, Subset::Tagged("canary")).is_none());
        assert!(b.pick_in(svc, &[], Subset::Tagged("v2")).is_none());
        assert!(b.has_healthy(svc, Subset::Tagged("CANARY")));
        assert!(!b.has_healthy(svc, Subset::Tagged("v2")));
    }

    #[tokio::test]
    async fn a_split_follows_its_weights_spread_out() {
        let catalog = catalog_tagged(&[&["v1"], &["canary"], &[]]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let split = Split::new([("v1", 95), ("canary", 5)]);
        let picks: Vec<&str> = (0..2000)
            .map(|_| b.split_tag(&split, svc).unwrap())
            .collect();
        // Every window of 100 requests holds 5 canaries, give or take 1 (a Weyl sequence,
        // not coin flips); no two canaries are ever adjacent.
        for w in picks.windows(100).step_by(7) {
            let c = w.iter().filter(|t| **t == "canary").count();
            assert!((4..=6).contains(&c), "{c} canaries in a window");
        }
        assert_eq!(picks.iter().filter(|t| **t == "canary").count(), 100);
        assert!(picks.windows(2).all(|w| w != ["canary", "canary"]));
        // A tag with no healthy instance gives its share to the others; none: None.
        let split = Split::new([("v1", 1), ("v2", 1)]);
        assert!((0..10).all(|_| b.split_tag(&split, svc) == Some("v1")));
        assert_eq!(b.split_tag(&Split::new([("v3", 1)]), svc), None);
    }

    #[tokio::test]
    async fn round_robin_is_even() {
        let catalog = catalog_with(&[1, 1, 1]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let c = counts(&b, &catalog, 300);
        assert_eq!(c.len(), 3);
        assert!(c.values().all(|v| *v == 100), "{c:?}");
    }

    #[tokio::test]
    async fn weighted_follows_weights() {
        let catalog = catalog_with(&[1, 2, 5]).await;
        let settings = BalanceSettings {
            policy: Policy::Weighted,
            ..Default::default()
        };
        let b = Balancer::new(catalog.clone(), settings);
        let c = counts(&b, &catalog, 800);
        assert_eq!((c[&8000], c[&8001], c[&8002]), (100, 200, 500), "{c:?}");
    }

    #[tokio::test]
    async fn least_connections_avoids_busy_instances() {
        let catalog = catalog_with(&[1, 1, 1]).await;
        let settings = BalanceSettings {
            services: [("web".to_string(), Policy::LeastConnections)].into(),
            ..Default::default()
        };
        let b = Balancer::new(catalog.clone(), settings);
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let busy = b.pick(svc, &[]).unwrap();
        let _guards: Vec<_> = (0..5).map(|_| busy.start()).collect();
        for _ in 0..20 {
            let p = b.pick(svc, &[]).unwrap();
            assert_ne!(p.instance.id, busy.instance.id);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backs_off_and_returns() {
        let catalog = catalog_with(&[1, 1]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let bad = b.pick(svc, &[]).unwrap();
        assert_eq!(b.report_failure(&bad).backoff, Duration::from_secs(1));
        assert!(b.is_ejected(&bad.instance.id));
        for _ in 0..10 {
            assert_ne!(b.pick(svc, &[]).unwrap().instance.id, bad.instance.id);
        }
        tokio::time::advance(Duration::from_millis(1001)).await;
        let seen: Vec<_> = (0..4)
            .map(|_| b.pick(svc, &[]).unwrap().instance.id.clone())
            .collect();
        assert!(seen.contains(&bad.instance.id));
        // Consecutive failures double the backoff; success resets it.
        assert_eq!(b.report_failure(&bad).backoff, Duration::from_secs(2));
        b.report_success(&bad);
        assert!(!b.is_ejected(&bad.instance.id));
        assert_eq!(b.report_failure(&bad).backoff, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_reinstates_an_ejected_instance() {
        let catalog = catalog_with(&[1, 1]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let bad = b.pick(svc, &[]).unwrap();
        b.report_failure(&bad);
        tokio::time::advance(Duration::from_millis(10)).await;
        catalog
            .heartbeat(bad.instance.id.as_str(), bad.instance.secret.expose())
            .unwrap();
        let seen: Vec<_> = (0..4)
            .map(|_| b.pick(svc, &[]).unwrap().instance.id.clone())
            .collect();
        assert!(seen.contains(&bad.instance.id));
    }

    #[tokio::test]
    async fn all_ejected_still_tries_and_exclude_is_honoured() {
        let catalog = catalog_with(&[1, 1]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let first = b.pick(svc, &[]).unwrap();
        let second = b
            .pick(svc, std::slice::from_ref(&first.instance.id))
            .unwrap();
        assert_ne!(first.instance.id, second.instance.id);
        b.report_failure(&first);
        b.report_failure(&second);
        assert!(b.pick(svc, &[]).is_some());
        let both = [first.instance.id.clone(), second.instance.id.clone()];
        assert!(b.pick(svc, &both).is_none());
    }

    #[tokio::test]
    async fn picks_follow_catalog_changes_and_balancers_keep_their_own_state() {
        let catalog = catalog_with(&[1, 1]).await;
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let c = counts(&b, &catalog, 100);
        assert_eq!((c.len(), c[&8000], c[&8001]), (2, 50, 50));
        // A third instance: the next picks include it (the thread's cached state for the
        // old version of the service is not used).
        let reg = Registration::new("web", Endpoint::Explicit("127.0.0.1:8002".parse().unwrap()));
        catalog.register(reg).await.unwrap();
        let c = counts(&b, &catalog, 99);
        assert_eq!((c.len(), c[&8002]), (3, 33));
        // Another balancer over the same catalog has its own ejections.
        let other = Balancer::new(catalog.clone(), BalanceSettings::default());
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let bad = b.pick(svc, &[]).unwrap();
        b.report_failure(&bad);
        assert!(b.is_ejected(&bad.instance.id));
        let picked: std::collections::HashSet<_> = (0..30)
            .map(|_| other.pick(svc, &[]).unwrap().instance.id.clone())
            .collect();
        assert!(
            picked.contains(&bad.instance.id),
            "ejected in one balancer only"
        );
        assert!((0..30).all(|_| b.pick(svc, &[]).unwrap().instance.id != bad.instance.id));
    }

    /// A store that hands the catalog what an older policy let in: 127.0.0.1 and
    /// 127.0.0.2, under a policy that now allows only 127.0.0.1.
    struct OlderPolicy;

    impl crate::store::Store for OlderPolicy {
        fn load(&self) -> Result<crate::store::Persisted, crate::store::StoreError> {
            use crate::model::{InstanceRecord, Secret, ServiceName, ServiceRecord};
            let name = ServiceName::new("web").unwrap();
            let instance = |id: &str, ip: &str| InstanceRecord {
                id: crate::model::InstanceId::from(id),
                service: name.clone(),
                endpoint: format!("{ip}:8000").parse().unwrap(),
                tags: vec![],
                meta: Default::default(),
                weight: 1,
                protocol: Default::default(),
                check: None,
                ttl_ms: 60_000,
                deregister_critical_after_ms: None,
                owner_peer: None,
                pool_port: false,
                secret: Secret::generate(),
                registered_index: 1,
                deadline_unix_ms: u64::MAX / 2,
                owner: None,
                health: Default::default(),
                request: None,
            };
            Ok(crate::store::Persisted {
                index: 1,
                services: vec![ServiceRecord {
                    name: name.clone(),
                    vip: "127.77.0.9".parse().unwrap(),
                    port: 8000,
                    created_index: 1,
                }],
                instances: vec![
                    instance("00000000000000a1", "127.0.0.1"),
                    instance("00000000000000a2", "127.0.0.2"),
                ],
                holds: vec![],
            })
        }
        fn apply(&self, _: Vec<crate::model::Op>) -> crate::store::Commit {
            crate::store::Commit::Done(Ok(()))
        }
        fn renew(&self, _: &InstanceId, _: u64) {}
        fn describe(&self) -> String {
            "older-policy".into()
        }
    }

    #[tokio::test]
    async fn the_proxies_never_pick_an_endpoint_outside_the_policy() {
        let mut s = Settings::default();
        s.registry.allowed_endpoint_cidrs = vec!["127.0.0.1/32".parse().unwrap()];
        let mut cs = s.catalog_settings();
        cs.probe_vip_bind = false;
        let catalog = Catalog::new(cs, Arc::new(OlderPolicy)).unwrap();
        assert_eq!(
            catalog.snapshot().instance_count(),
            2,
            "the store holds both"
        );
        let b = Balancer::new(catalog.clone(), BalanceSettings::default());
        let c = counts(&b, &catalog, 20);
        assert_eq!(c.len(), 1);
        let snap = catalog.snapshot();
        let svc = snap.service("web").unwrap();
        let only = b.pick(svc, &[]).unwrap();
        assert_eq!(only.instance.endpoint.ip().to_string(), "127.0.0.1");
        assert!(
            b.pick(svc, std::slice::from_ref(&only.instance.id))
                .is_none()
        );
        // And a registration there is refused, naming the setting.
        let reg = Registration::new("web", Endpoint::Explicit("127.0.0.2:8001".parse().unwrap()));
        let e = catalog.register(reg).await.unwrap_err();
        assert!(e.to_string().contains("allowed_endpoint_cidrs"), "{e}");
    }
}
