//! Active health checks: for instances registered with a [`Check`], NetSel connects (TCP)
//! or sends `GET <path>` (HTTP) every interval. `fall` consecutive failures mark an
//! instance critical (DNS and the proxies stop using it); `rise` consecutive successes
//! mark it passing again. The lease still decides whether the instance exists at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, Health, InstanceId};
use crate::protocol::Check;

/// Active check settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Milliseconds between check rounds; 0 uses `health_check_interval`.
    pub interval_ms: u64,
    /// Milliseconds one check may take. Default 2000 (capped at the interval).
    pub timeout_ms: u64,
    /// Consecutive successes that make a critical instance passing. Default 2.
    pub rise: u32,
    /// Consecutive failures that make a passing instance critical. Default 3.
    pub fall: u32,
    /// Checks run at once at most. Default 64.
    pub concurrency: usize,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval_ms: 0,
            timeout_ms: 2000,
            rise: 2,
            fall: 3,
            concurrency: 64,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    ok: u32,
    failed: u32,
}

/// Runs check rounds every `interval` until `shutdown`.
pub async fn run(
    catalog: Catalog,
    settings: HealthSettings,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let timeout = Duration::from_millis(settings.timeout_ms).min(interval);
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut streaks: HashMap<InstanceId, Streak> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = catalog.snapshot();
        let mut round = JoinSet::new();
        for inst in snap.instances() {
            let Some(check) = inst.check.clone() else {
                continue;
            };
            // Checks run where the instance's lease is held, and never connect outside the
            // endpoint policy.
            if !catalog.owns(inst) || !catalog.settings().allows_endpoint(inst.endpoint.ip()) {
                continue;
            }
            let (id, endpoint, slots) = (inst.id.clone(), inst.endpoint, slots.clone());
            round.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let ok = tokio::time::timeout(timeout, probe(&check, endpoint))
                    .await
                    .unwrap_or(false);
                (id, ok)
            });
        }
        let results = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = round.join_all() => r,
        };
        streaks.retain(|id, _| snap.instance(id.as_str()).is_some());
        for (id, ok) in results {
            let s = streaks.entry(id.clone()).or_default();
            if ok {
                s.ok = s.ok.saturating_add(1);
                s.failed = 0;
            } else {
                s.failed = s.failed.saturating_add(1);
                s.ok = 0;
            }
            let Some(inst) = snap.instance(id.as_str()) else {
                continue;
            };
            let next = match inst.health {
                Health::Passing if s.failed >= settings.fall.max(1) => Health::Critical,
                Health::Critical if s.ok >= settings.rise.max(1) => Health::Passing,
                _ => continue,
            };
            // The audit log (catalog::audit) reports the change once it is recorded.
            if let Err(e) = catalog.set_health(id.as_str(), next).await {
                tracing::error!(error = %e, "recording health");
            }
        }
    }
}

/// One check. True when it passes.
pub async fn probe(check: &Check, endpoint: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(endpoint).await else {
        return false;
    };
    match check {
        Check::Tcp => true,
        Check::Http { path } => {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nUser-Agent: netsel-health\r\n\
                 Connection: close\r\n\r\n"
            );
            if stream.write_all(request.as_bytes()).await.is_err() {
                return false;
            }
            // Only the status line matters: "HTTP/1.x NNN ...".
            let mut head = [0u8; 12];
            if stream.read_exact(&mut head).await.is_err() {
                return false;
            }
            head.starts_with(b"HTTP/1.") && matches!(head[9], b'2' | b'3')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Endpoint, Registration};
    use crate::config::Settings;
    use tokio::net::TcpListener;

    async fn http_server(status: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn probes() {
        let (ok, _t1) = http_server("200 OK").await;
        let (bad, _t2) = http_server("503 Service Unavailable").await;
        let path = Check::Http {
            path: "/health".into(),
        };
        assert!(probe(&Check::Tcp, ok).await);
        assert!(probe(&path, ok).await);
        assert!(!probe(&path, bad).await);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!probe(&Check::Tcp, closed).await);
    }

    #[tokio::test]
    async fn fall_then_rise() {
        let mut cs = Settings::default().catalog_settings();
        cs.probe_vip_bind = false;
        let catalog = Catalog::in_memory(cs).unwrap();
        // Reserve a port, then free it: the check fails until we listen there again.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut reg = Registration::new("checked", Endpoint::Explicit(addr));
        reg.check = Some(Check::Tcp);
        let id = catalog.register(reg).await.unwrap().id;
        let settings = HealthSettings {
            rise: 2,
            fall: 2,
            ..HealthSettings::default()
        };
        let stop = CancellationToken::new();
        tokio::spawn(run(
            catalog.clone(),
            settings,
            Duration::from_millis(50),
            stop.clone(),
        ));
        let health = |c: &Catalog| c.snapshot().instance(id.as_str()).unwrap().health;
        let mut idx = catalog.watch_index();
        tokio::time::timeout(Duration::from_secs(5), async {
            while health(&catalog) != Health::Critical {
                idx.changed().await.unwrap();
            }
        })
        .await
        .expect("goes critical");
        assert_eq!(
            catalog
                .snapshot()
                .service("checked")
                .unwrap()
                .healthy_count(),
            0
        );
        let _listener = TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while health(&catalog) != Health::Passing {
                idx.changed().await.unwrap();
            }
        })
        .await
        .expect("passes again");
        stop.cancel();
    }
}
