//! `GET /v1/sd/prometheus`: the catalog in Prometheus's HTTP service-discovery format
//! (<https://prometheus.io/docs/prometheus/latest/http_sd/>), so `http_sd_configs` finds
//! every healthy instance. One target group per instance:
//!
//! ```json
//! [{"targets": ["127.0.0.1:8000"],
//!   "labels": {"__meta_netsel_service": "web", "__meta_netsel_instance_id": "…",
//!              "__meta_netsel_vip": "127.77.41.72", "__meta_netsel_health": "passing",
//!              "__meta_netsel_tags": ",v1,canary,", "__meta_netsel_meta_version": "1.2"}}]
//! ```
//!
//! Tags are wrapped in commas as Prometheus does for Consul, so a relabel rule can match
//! `.*,v1,.*`. Metadata keys become label names with every character outside
//! `[a-zA-Z0-9_]` replaced by `_`. `?service=a,b` and `?tag=x,y` (every tag required)
//! narrow the answer; instances the endpoint policy forbids are left out, as the proxies
//! never connect to them either.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::acl::{Caller, Deny as _};
use super::error::ApiError;
use super::extract::{QueryMap, index_header};
use super::state::ApiState;

/// One Prometheus target group.
#[derive(Debug, Serialize)]
pub(crate) struct TargetGroup {
    targets: [String; 1],
    labels: BTreeMap<String, String>,
}

/// A comma-separated list parameter; absent or empty means no filter.
pub(crate) fn list<'a>(q: &'a BTreeMap<String, String>, key: &str) -> Vec<&'a str> {
    q.get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `i` carries every tag of `tags` (exactly, case-sensitively); the `?tag=` rule
/// of this endpoint and of `GET /v1/services[/{name}]`.
pub(crate) fn carries_all(i: &crate::catalog::Instance, tags: &[&str]) -> bool {
    tags.iter().all(|t| i.tags.iter().any(|have| have == t))
}

/// `svc` with only its instances carrying every tag of `tags` (`svc` itself when there is
/// no filter).
pub(crate) fn with_tags<'s>(
    svc: &'s crate::catalog::Service,
    tags: &[&str],
) -> std::borrow::Cow<'s, crate::catalog::Service> {
    if tags.is_empty() {
        return std::borrow::Cow::Borrowed(svc);
    }
    let mut s = svc.clone();
    s.instances.retain(|i| carries_all(i, tags));
    std::borrow::Cow::Owned(s)
}

/// `key` as a Prometheus label-name suffix.
fn label_suffix(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `GET /v1/sd/prometheus[?service=a,b][&tag=x,y]`.
pub(crate) async fn prometheus(
    State(state): State<ApiState>,
    caller: Caller,
    QueryMap(q): QueryMap,
) -> Result<Response, ApiError> {
    let acl = &state.inner.acl;
    let services = list(&q, "service");
    let tags = list(&q, "tag");
    for name in &services {
        if !acl.can_read(caller, name) {
            return Err(acl.denied(caller, &format!("read {name}")));
        }
    }
    if services.is_empty() && caller == Caller::Anonymous && !acl.can_read_all(caller) {
        return Err(acl.denied(caller, "list services"));
    }
    let catalog = &state.inner.catalog;
    let snap = catalog.snapshot();
    let mut groups = Vec::new();
    for s in snap.services() {
        let name = s.name.as_str();
        let wanted = services.is_empty() || services.iter().any(|n| n.eq_ignore_ascii_case(name));
        if !wanted || !acl.can_read(caller, name) {
            continue;
        }
        for i in s.healthy() {
            if !carries_all(i, &tags) || !catalog.settings().allows_endpoint(i.endpoint.ip()) {
                continue;
            }
            let mut labels = BTreeMap::new();
            labels.insert("__meta_netsel_service".into(), name.to_string());
            labels.insert("__meta_netsel_instance_id".into(), i.id.to_string());
            labels.insert("__meta_netsel_vip".into(), s.vip.to_string());
            labels.insert("__meta_netsel_health".into(), i.health.as_str().into());
            labels.insert(
                "__meta_netsel_tags".into(),
                format!(",{},", i.tags.join(",")),
            );
            for (k, v) in &i.meta {
                labels.insert(format!("__meta_netsel_meta_{}", label_suffix(k)), v.clone());
            }
            groups.push(TargetGroup {
                targets: [i.endpoint.to_string()],
                labels,
            });
        }
    }
    Ok((index_header(snap.index), Json(groups)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_keys_become_label_names() {
        assert_eq!(label_suffix("version"), "version");
        assert_eq!(
            label_suffix("app.kubernetes/io-name"),
            "app_kubernetes_io_name"
        );
    }

    #[test]
    fn lists_split_on_commas_and_drop_blanks() {
        let q = BTreeMap::from([("tag".to_string(), "v1, ,canary,".to_string())]);
        assert_eq!(list(&q, "tag"), ["v1", "canary"]);
        assert!(list(&q, "service").is_empty());
    }
}
