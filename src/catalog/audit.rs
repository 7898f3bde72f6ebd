//! The audit trail: every registration, deregistration, expiry and health change, logged
//! at `info` under the target `netsel::audit` with the service and instance id (never a
//! secret). It reads the catalog's change events like any other front end, so a slow log
//! (a full stderr pipe) never holds up a write; if it falls more than the event channel's
//! capacity behind, it says how many changes it did not log.

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_util::sync::CancellationToken;

use super::{Catalog, Change, ChangeKind};

/// Logs `changes` (a fresh [`Catalog::subscribe`], taken before the catalog accepts its
/// first write) until `shutdown`, then the changes already queued.
pub async fn log_changes(
    catalog: Catalog,
    mut changes: broadcast::Receiver<Change>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            c = changes.recv() => c,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Ok(c) => log(&catalog, &c),
            Err(RecvError::Lagged(n)) => lagged(n),
            Err(RecvError::Closed) => return,
        }
    }
    loop {
        match changes.try_recv() {
            Ok(c) => log(&catalog, &c),
            Err(TryRecvError::Lagged(n)) => lagged(n),
            Err(TryRecvError::Empty | TryRecvError::Closed) => return,
        }
    }
}

fn lagged(n: u64) {
    tracing::warn!(target: "netsel::audit", missed = n, "audit log fell behind: {n} changes not logged");
}

/// One log line for `c`, with what the newest snapshot still knows of its instance.
fn log(catalog: &Catalog, c: &Change) {
    let snap = catalog.snapshot();
    let service = c.service.as_str();
    let index = c.index;
    let id = c.instance.as_ref().map_or("", |i| i.as_str());
    let inst = c.instance.as_ref().and_then(|i| snap.instance(i.as_str()));
    let endpoint = inst.map_or_else(String::new, |i| i.endpoint.to_string());
    // The node holding the lease, in a cluster ("-" on a single node).
    let owner = inst.and_then(|i| i.owner.as_deref()).unwrap_or("-");
    macro_rules! audit {
        ($($field:tt)*) => {
            tracing::info!(target: "netsel::audit", %service, index, $($field)*)
        };
    }
    match c.kind {
        ChangeKind::ServiceCreated => {
            let vip = snap
                .service(service)
                .map_or_else(String::new, |s| format!("{}:{}", s.vip, s.port));
            audit!(%vip, "service created")
        }
        ChangeKind::ServiceRemoved => audit!("service removed (its VIP is held back for reuse)"),
        ChangeKind::InstanceRegistered => {
            audit!(instance = %id, %endpoint, %owner, "instance registered")
        }
        ChangeKind::InstanceUpdated => {
            audit!(instance = %id, %endpoint, %owner, "instance re-registered")
        }
        ChangeKind::InstanceDeregistered => audit!(instance = %id, "instance deregistered"),
        ChangeKind::InstanceExpired => {
            audit!(
                instance = id,
                "instance expired: no heartbeat within its TTL"
            )
        }
        ChangeKind::HealthChanged => {
            let health = inst.map_or("gone", |i| i.health.as_str());
            let check = catalog
                .check_result(id)
                .map_or_else(String::new, |r| r.output);
            audit!(instance = %id, %endpoint, %health, %check, "instance health changed")
        }
    }
}
