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

/// Picks instances for the proxies. One per server, shared by both proxies.
pub struct Balancer {
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
        Balancer {
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
    pub fn pick(&self, svc: &Service, exclude: &[InstanceId]) -> Option<Pick> {
        let (backends, turn) = self.state_for(svc);
        let now = self.catalog.now_ms();
        let candidates: Vec<(usize, bool)> = svc
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.is_healthy() && !exclude.contains(&i.id))
            .map(|(n, i)| (n, self.is_available(i, &backends[n], now)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let available: Vec<usize> = candidates
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(n, _)| *n)
            .collect();
        // All ejected: try them anyway rather than fail outright.
        let pool: Vec<usize> = if available.is_empty() {
            candidates.iter().map(|(n, _)| *n).collect()
        } else {
            available
        };
        let t = turn.fetch_add(1, Ordering::Relaxed);
        let chosen = match self.policy(svc.name.as_str()) {
            Policy::RoundRobin => pool[t % pool.len()],
            Policy::LeastConnections => {
                let start = t % pool.len();
                (0..pool.len())
                    .map(|k| pool[(start + k) % pool.len()])
                    .min_by_key(|n| backends[*n].active())
                    .unwrap_or(pool[start])
            }
            Policy::Weighted => {
                let total: u64 = pool
                    .iter()
                    .map(|n| u64::from(svc.instances[*n].weight.max(1)))
                    .sum();
                let mut target = (t as u64) % total.max(1);
                let mut chosen = pool[0];
                for n in &pool {
                    let w = u64::from(svc.instances[*n].weight.max(1));
                    if target < w {
                        chosen = *n;
                        break;
                    }
                    target -= w;
                }
                chosen
            }
        };
        Some(Pick {
            instance: svc.instances[chosen].clone(),
            backend: backends[chosen].clone(),
        })
    }

    fn is_available(&self, inst: &Instance, b: &Backend, now: u64) -> bool {
        let until = b.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let heartbeated = inst.lease().deadline_ms() > b.lease_at_ejection.load(Ordering::Acquire);
        if now >= until || heartbeated {
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
}
