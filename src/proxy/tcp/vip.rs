//! VIP listeners: one per service at `VIP:service-port`, following the catalog.
//!
//! When a service appears or disappears (and every [`RETRY`] as a backstop; other catalog
//! changes at most every [`REFRESH`]) the wanted set of listeners is computed from a snapshot and compared with the open set: listeners of
//! services that left (or moved) stop accepting — connections they relay run on — and
//! listeners of new services are bound. An address that cannot be bound (taken by another
//! program, not an address of this host) leaves that service *affected*: logged once,
//! reported by [`super::TcpProxy::affected_services`] and the
//! `netsel_tcp_proxy_vip_bind_failed` gauge, and retried. Other listeners carry on.
//!
//! A listener is one socket per worker thread on the same address (`SO_REUSEPORT`; see
//! `proxy::listen::bind_listeners`), each accepted on by its own worker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connection::serve_on_workers;
use super::context::{AffectedService, Route, Shared, VipRoute, Worker};
use crate::catalog::{Service, ServiceName};
use crate::proxy::listen::{bind_listeners, bind_shared_listeners};

/// How often listeners that could not be bound are tried again.
pub const RETRY: Duration = Duration::from_secs(5);
/// Longest a change to a service's instances waits before the listeners' view of them is
/// refreshed (services coming and going are acted on at once).
pub const REFRESH: Duration = Duration::from_millis(100);

struct Open {
    addr: SocketAddr,
    stop: CancellationToken,
    /// One accept loop per worker.
    tasks: Vec<JoinHandle<()>>,
    /// The service as last seen in the catalog (for connections accepted just before it
    /// left).
    last_seen: Arc<Mutex<Arc<Service>>>,
}

/// Keeps the VIP listeners in step with the catalog until `shutdown`.
pub(super) async fn run(
    shared: Arc<Shared>,
    workers: Vec<Arc<Worker>>,
    shutdown: CancellationToken,
) {
    // Listeners are per service (a service's VIP and port are fixed for its life): a
    // service appearing or disappearing reconciles at once. Other changes only refresh
    // what each listener last knew of its instances, at most every REFRESH, so a
    // registration storm does not rebuild listener state for every registration.
    let mut services = shared.balancer.catalog().watch_services();
    let mut index = shared.balancer.catalog().watch_index();
    let mut open: HashMap<ServiceName, Open> = HashMap::new();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        services.borrow_and_update();
        index.borrow_and_update();
        reconcile(&shared, &workers, &mut open, &shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = services.changed() => if changed.is_err() { break },
            changed = index.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH) => {}
                    _ = services.changed() => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            _ = retry.tick() => {}
        }
    }
    for (_, o) in open.drain() {
        o.stop.cancel();
        for task in o.tasks {
            let _ = task.await;
        }
        shared.remove_own(o.addr);
    }
    let mut t = shared.lock_vips();
    t.open.clear();
}

async fn reconcile(
    shared: &Arc<Shared>,
    workers: &[Arc<Worker>],
    open: &mut HashMap<ServiceName, Open>,
    shutdown: &CancellationToken,
) {
    let snapshot = shared.balancer.catalog().snapshot();
    let mut services: HashMap<ServiceName, Arc<Service>> = HashMap::new();
    let wanted: HashMap<ServiceName, SocketAddr> = snapshot
        .services()
        .filter(|s| s.port != 0)
        .map(|s| {
            services.insert(s.name.clone(), s.clone());
            (s.name.clone(), SocketAddr::new(s.vip, s.port))
        })
        .collect();
    drop(snapshot);

    // Close first, and wait for each accept loop to drop its socket, so a service that
    // comes back on the same address can bind it again at once.
    let stale: Vec<ServiceName> = open
        .iter()
        .filter(|(name, o)| wanted.get(*name) != Some(&o.addr))
        .map(|(name, _)| name.clone())
        .collect();
    for name in stale {
        let Some(o) = open.remove(&name) else {
            continue;
        };
        o.stop.cancel();
        for task in o.tasks {
            let _ = task.await;
        }
        shared.remove_own(o.addr);
        shared.lock_vips().open.remove(&name);
        tracing::info!(service = %name, addr = %o.addr, "VIP listener closed");
    }
    {
        let mut t = shared.lock_vips();
        let gone: Vec<ServiceName> = t
            .affected
            .iter()
            .filter(|(name, a)| wanted.get(*name) != Some(&a.addr))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            t.affected.remove(&name);
            shared.metrics.set_vip_bind_failed(name.as_str(), false);
        }
    }

    for (name, addr) in wanted {
        let Some(svc) = services.remove(&name) else {
            continue;
        };
        if let Some(o) = open.get(&name) {
            *o.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = svc;
            continue;
        }
        // Cluster nodes on one host share each VIP's listeners instead of fighting over them.
        let bound = if shared.balancer.catalog().node().is_some() {
            bind_shared_listeners(addr, workers.len())
        } else {
            bind_listeners(addr, workers.len())
        };
        match bound {
            Ok(listeners) => {
                let stop = shutdown.child_token();
                shared.add_own(addr);
                let metrics = shared.metrics.service(name.as_str());
                let last_seen = Arc::new(Mutex::new(svc));
                // A route per worker, so connections on different threads share no
                // reference count.
                let route = |_: &Worker| {
                    Route::Vip(Arc::new(VipRoute {
                        service: name.clone(),
                        metrics: Arc::new(metrics.clone()),
                        last_seen: last_seen.clone(),
                    }))
                };
                let tasks = serve_on_workers(workers, listeners, route, &stop);
                let mut t = shared.lock_vips();
                t.open.insert(name.clone(), addr);
                if t.affected.remove(&name).is_some() {
                    shared.metrics.set_vip_bind_failed(name.as_str(), false);
                }
                drop(t);
                tracing::info!(service = %name, %addr, "VIP listener open");
                open.insert(
                    name,
                    Open {
                        addr,
                        stop,
                        tasks,
                        last_seen,
                    },
                );
            }
            Err(e) => {
                let error = e.to_string();
                let mut t = shared.lock_vips();
                let known = t
                    .affected
                    .get(&name)
                    .is_some_and(|a| a.addr == addr && a.error == error);
                if !known {
                    // Logged once per address and cause; retries stay quiet.
                    tracing::warn!(
                        service = %name,
                        %addr,
                        %error,
                        "cannot open VIP listener; service affected (retrying)"
                    );
                    shared.metrics.set_vip_bind_failed(name.as_str(), true);
                    t.affected.insert(
                        name.clone(),
                        AffectedService {
                            service: name,
                            addr,
                            error,
                        },
                    );
                }
            }
        }
    }
}
