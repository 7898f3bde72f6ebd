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

use crate::catalog::{Catalog, CheckResult, Health, InstanceId};
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
    /// Seconds an instance may stay critical before it is deregistered, for instances
    /// that do not set their own `deregister_critical_after`; 0 (the default) never.
    pub deregister_critical_after_secs: u64,
}

impl HealthSettings {
    /// The default `deregister_critical_after`, if any.
    pub fn deregister_critical_after(&self) -> Option<Duration> {
        (self.deregister_critical_after_secs > 0)
            .then(|| Duration::from_secs(self.deregister_critical_after_secs))
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval_ms: 0,
            timeout_ms: 2000,
            rise: 2,
            fall: 3,
            concurrency: 64,
            deregister_critical_after_secs: 0,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    ok: u32,
    failed: u32,
    /// Catalog time (Unix ms) of the first failure of the current failing streak.
    failing_since: Option<u64>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
                let outcome = tokio::time::timeout(timeout, probe(&check, endpoint))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer within {}",
                            crate::protocol::format_duration(timeout)
                        ))
                    });
                (id, outcome)
            });
        }
        let results = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = round.join_all() => r,
        };
        streaks.retain(|id, _| snap.instance(id.as_str()).is_some());
        catalog.retain_check_results(|id| snap.instance(id.as_str()).is_some());
        let now = unix_ms();
        for (id, outcome) in results {
            let first = !streaks.contains_key(&id);
            let s = streaks.entry(id.clone()).or_default();
            let passing = outcome.is_ok();
            if passing {
                s.ok = s.ok.saturating_add(1);
                s.failed = 0;
                s.failing_since = None;
            } else {
                s.failed = s.failed.saturating_add(1);
                s.ok = 0;
                s.failing_since.get_or_insert(now);
            }
            let Some(inst) = snap.instance(id.as_str()) else {
                continue;
            };
            let failing_since = match inst.health {
                Health::Critical => s.failing_since.or(Some(now)),
                Health::Passing => s.failing_since,
            };
            catalog.record_check(
                &id,
                CheckResult {
                    passing,
                    output: outcome.unwrap_or_else(|e| e),
                    checked_at_unix_ms: now,
                    consecutive: if passing { s.ok } else { s.failed },
                    failing_since_unix_ms: failing_since,
                },
            );
            // Removes an instance that stayed critical for its `deregister_critical_after`.
            if let (Health::Critical, Some(after)) = (
                inst.health,
                inst.deregister_critical_after
                    .or(settings.deregister_critical_after()),
            ) && let Some(since) = s.failing_since
                && now.saturating_sub(since) >= after.as_millis() as u64
            {
                tracing::info!(target: "netsel::audit", service = %inst.service, instance = %id,
                    critical_for = %crate::protocol::format_duration(Duration::from_millis(now - since)),
                    "deregistering an instance that stayed critical (deregister_critical_after)");
                if let Err(e) = catalog.deregister_admin(id.as_str()).await {
                    tracing::warn!(instance = %id, error = %e, "deregistering a critical instance");
                }
                continue;
            }
            let next = match inst.health {
                Health::Passing if s.failed >= settings.fall.max(1) => Health::Critical,
                // Its first check since it registered (or since a restart) passing is
                // enough: it started critical only because nothing had checked it.
                Health::Critical if passing && first => Health::Passing,
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

/// One check: what it saw when it passes, why not when it fails.
pub async fn probe(check: &Check, endpoint: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(endpoint)
        .await
        .map_err(|e| format!("connect {endpoint}: {}", plain_io(&e)))?;
    match check {
        Check::Tcp => Ok(format!("connected to {endpoint}")),
        Check::Http { path } => {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nUser-Agent: netsel-health\r\n\
                 Connection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send GET {path} to {endpoint}: {}", plain_io(&e)))?;
            // Only the status line matters: "HTTP/1.x NNN ...".
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.map_err(|e| {
                format!(
                    "no HTTP status line from {path} on {endpoint}: {}",
                    plain_io(&e)
                )
            })?;
            if !head.starts_with(b"HTTP/1.") || !head[9..12].iter().all(u8::is_ascii_digit) {
                return Err(format!("not an HTTP answer from {path} on {endpoint}"));
            }
            let status = String::from_utf8_lossy(&head[9..12]).to_string();
            if matches!(head[9], b'2' | b'3') {
                Ok(format!("HTTP {status} from {path}"))
            } else {
                Err(format!("HTTP {status} from {path}"))
            }
        }
    }
}

/// An I/O error as people write it: `connection refused`, not `Connection refused (os
/// error 111)`.
fn plain_io(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text.to_string(),
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
        assert_eq!(
            probe(&Check::Tcp, ok).await,
            Ok(format!("connected to {ok}"))
        );
        assert_eq!(
            probe(&path, ok).await,
            Ok("HTTP 200 from /health".to_string())
        );
        assert_eq!(
            probe(&path, bad).await,
            Err("HTTP 503 from /health".to_string())
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(
            probe(&Check::Tcp, closed).await,
            Err(format!("connect {closed}: connection refused"))
        );
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
