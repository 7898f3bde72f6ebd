//! The API's side of ACL tokens ([`crate::acl`]): where a request presents its token, and
//! the status a refusal gets (401 without a token, else 403).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

pub(crate) use crate::acl::{Acl, Caller};

use super::error::ApiError;
use super::state::ApiState;

/// The API's refusals.
pub(crate) trait Deny {
    /// The error for a caller without a right: 401 without a token, else 403.
    fn denied(&self, caller: Caller, what: &str) -> ApiError;
}

impl Deny for Acl {
    fn denied(&self, caller: Caller, what: &str) -> ApiError {
        match caller {
            Caller::Anonymous => {
                ApiError::Unauthorized(format!("an ACL token is required to {what}"))
            }
            _ => ApiError::Forbidden(format!("permission denied: {what}")),
        }
    }
}

/// The token a request presents: `Authorization: Bearer TOKEN`, a bare `Authorization:
/// TOKEN` (what Prometheus 2.42 sends when its `authorization` has no `type`),
/// `X-Netsel-Token`, or `?token=`.
fn presented_token(parts: &Parts) -> Option<String> {
    let h = &parts.headers;
    if let Some(v) = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        match v.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => {
                return Some(t.trim().to_string());
            }
            None if !v.is_empty() => return Some(v.to_string()),
            // Another scheme (Basic, …) carries no NetSel token.
            _ => {}
        }
    }
    if let Some(v) = h.get("x-netsel-token").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    let query = parts.uri.query()?;
    query.split('&').find_map(|kv| {
        let v = kv.strip_prefix("token=")?;
        Some(super::extract::percent_decode(v))
    })
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let acl = &state.inner.acl;
        if !acl.enabled() {
            return Ok(Caller::Open);
        }
        acl.identify(presented_token(parts).as_deref())
            .map_err(|e| ApiError::Forbidden(e.to_string()))
    }
}
