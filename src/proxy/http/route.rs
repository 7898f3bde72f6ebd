//! Which service a request is for: the authority (`:authority` for HTTP/2, `Host` for
//! HTTP/1.1, the request target's authority when it is in absolute form), reduced to a
//! service name (pure functions, tested here); then the service in the catalog
//! ([`service`]) and the tag whose instances it goes to ([`tag`]). Both request paths
//! route through here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use hyper::header::HOST;
use hyper::{Request, StatusCode, Version};

use crate::catalog::Service;
use crate::proxy::balance::{Balancer, Split, Subset};

/// The request header naming the tag whose instances a request goes to.
pub const TAG_HEADER: &str = "x-netsel-tag";

/// Where a request says it is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    /// The authority as the client sent it (`web`, `web.netsel:8081`): forwarded as `Host`.
    pub authority: &'a str,
    /// The service name it names, lower-cased only when needed by the catalog lookup.
    pub name: &'a str,
    /// The tag named by the host's `TAG.tag.NAME[.<domain>]` form, if it has that form.
    pub tag: Option<&'a str>,
    /// Whether the HTTP/1 request target was in absolute form (`GET http://host/ ...`):
    /// such a request names its host explicitly and is never routed to a default service.
    pub absolute: bool,
}

/// The authority of `req`: the URI's (HTTP/2 `:authority`, or HTTP/1 absolute form) when
/// present, else the `Host` header. `None` when there is neither or `Host` is not text.
pub(crate) fn authority<B>(req: &Request<B>) -> Option<(&str, bool)> {
    if let Some(a) = req.uri().authority() {
        let absolute = req.version() < Version::HTTP_2;
        return Some((a.as_str(), absolute));
    }
    let host = req.headers().get(HOST)?.to_str().ok()?;
    Some((host, false))
}

/// The host part of an authority: no userinfo, no port, no trailing dot. IPv6 literals
/// keep their brackets.
pub(crate) fn host_of(authority: &str) -> &str {
    let a = authority.rsplit('@').next().unwrap_or(authority);
    let host = if a.starts_with('[') {
        match a.find(']') {
            Some(end) => &a[..=end],
            None => a,
        }
    } else {
        match a.rfind(':') {
            Some(colon) => &a[..colon],
            None => a,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// The service name in `host`: `NAME` or `NAME.<domain>` (case-insensitive). Anything
/// else (another domain, an IP literal, more labels) yields `None`.
pub(crate) fn service_name<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let name = without_domain(host, domain);
    is_label(name).then_some(name)
}

/// `host` without a trailing `.<domain>` (case-insensitive), if it has one.
fn without_domain<'a>(host: &'a str, domain: &str) -> &'a str {
    match host.len().checked_sub(domain.len() + 1) {
        Some(cut)
            if host.as_bytes()[cut] == b'.'
                && host.is_char_boundary(cut)
                && host[cut + 1..].eq_ignore_ascii_case(domain) =>
        {
            &host[..cut]
        }
        _ => host,
    }
}

fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The (tag, service name) in `host` of the form `TAG.tag.NAME` or
/// `TAG.tag.NAME.<domain>` (as in DNS; `tag` case-insensitive), TAG one DNS label.
pub(crate) fn tagged_name<'a>(host: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = without_domain(host, domain);
    let (tag, rest) = rest.split_once('.')?;
    let name = rest
        .get(..4)
        .filter(|t| t.eq_ignore_ascii_case("tag."))
        .map(|_| &rest[4..])?;
    (is_label(tag) && is_label(name)).then_some((tag, name))
}

/// The target of `req`, given the catalog domain (`netsel`, without dots at either end).
pub(crate) fn target<'a, B>(req: &'a Request<B>, domain: &str) -> Option<Target<'a>> {
    let (authority, absolute) = authority(req)?;
    Some(target_of(authority, absolute, domain))
}

/// The target named by `authority` (from a request or a raw HTTP/1 `Host` header).
pub(crate) fn target_of<'a>(authority: &'a str, absolute: bool, domain: &str) -> Target<'a> {
    let host = host_of(authority);
    let (name, tag) = match service_name(host, domain) {
        Some(name) => (name, None),
        None => match tagged_name(host, domain) {
            Some((tag, name)) => (name, Some(tag)),
            None => (host, None),
        },
    };
    Target {
        authority,
        name,
        tag,
        absolute,
    }
}

/// The service `target` names (or `default_service`): the 404 or 400 answer otherwise.
pub(super) fn service(
    balancer: &Balancer,
    default_service: Option<&str>,
    target: Option<&Target>,
) -> Result<Arc<Service>, (StatusCode, String)> {
    let snap = balancer.catalog().snapshot();
    if let Some(svc) = target.and_then(|t| snap.service(t.name)) {
        return Ok(svc.clone());
    }
    let fallback = match (default_service, target) {
        (Some(d), None) => snap.service(d),
        (Some(d), Some(t)) if !t.absolute => snap.service(d),
        _ => None,
    };
    match (fallback, target) {
        (Some(svc), _) => Ok(svc.clone()),
        (None, Some(t)) => {
            let body = format!("no service named '{}'\n", t.name);
            Err((StatusCode::NOT_FOUND, body))
        }
        (None, None) => Err((
            StatusCode::BAD_REQUEST,
            "request names no host\n".to_string(),
        )),
    }
}

/// The tag a request for `svc` goes to: the one it names (`X-Netsel-Tag`, else the
/// host's `TAG.tag.NAME` form), else the one the service's split chooses, else none
/// (every instance). `Err` with the `503` body when that leaves no healthy instance.
pub(super) fn tag<'p>(
    balancer: &Balancer,
    splits: &'p HashMap<String, Split>,
    svc: &Service,
    named: Option<&str>,
) -> Result<Option<Cow<'p, str>>, String> {
    if let Some(tag) = named {
        if balancer.has_healthy(svc, Subset::Tagged(tag)) {
            return Ok(Some(Cow::Owned(tag.to_string())));
        }
        return Err(format!(
            "service '{}' has no healthy instance tagged '{tag}'\n",
            svc.name
        ));
    }
    if !splits.is_empty()
        && let Some(split) = splits.get(svc.name.as_str())
    {
        return match balancer.split_tag(split, svc) {
            Some(tag) => Ok(Some(Cow::Borrowed(tag))),
            None => {
                let tags: Vec<&str> = split.tags().map(|(t, _)| t).collect();
                Err(format!(
                    "service '{}' has no healthy instance tagged {} (its split)\n",
                    svc.name,
                    tags.join(" or ")
                ))
            }
        };
    }
    if svc.healthy_count() == 0 {
        return Err(format!("service '{}' has no healthy instance\n", svc.name));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_strips_port_userinfo_and_dot() {
        assert_eq!(host_of("web"), "web");
        assert_eq!(host_of("web:8081"), "web");
        assert_eq!(host_of("web.netsel.:80"), "web.netsel");
        assert_eq!(host_of("u:p@web:1"), "web");
        assert_eq!(host_of("[::1]:8081"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }

    #[test]
    fn names_in_and_out_of_the_domain() {
        assert_eq!(service_name("web", "netsel"), Some("web"));
        assert_eq!(service_name("Web.NetSel", "netsel"), Some("Web"));
        assert_eq!(service_name("web.netsel", "corp"), None);
        assert_eq!(service_name("web.example.com", "netsel"), None);
        assert_eq!(service_name("a.b.netsel", "netsel"), None);
        assert_eq!(service_name("127.0.0.1", "netsel"), None);
        assert_eq!(service_name("[::1]", "netsel"), None);
        assert_eq!(service_name(".netsel", "netsel"), None);
        assert_eq!(service_name("", "netsel"), None);
        assert_eq!(service_name("netsel", "netsel"), Some("netsel"));
    }

    #[test]
    fn the_tag_form_names_a_tag_and_a_service() {
        assert_eq!(tagged_name("v1.tag.web", "netsel"), Some(("v1", "web")));
        assert_eq!(
            tagged_name("V1.TAG.Web.NetSel", "netsel"),
            Some(("V1", "Web"))
        );
        assert_eq!(tagged_name("v1.tag.web.corp", "netsel"), None);
        assert_eq!(tagged_name("v1.web", "netsel"), None);
        assert_eq!(tagged_name("v1.tags.web", "netsel"), None);
        assert_eq!(tagged_name(".tag.web", "netsel"), None);
        assert_eq!(tagged_name("v1.tag.", "netsel"), None);
        assert_eq!(tagged_name("a.v1.tag.web", "netsel"), None);
        assert_eq!(tagged_name("web", "netsel"), None);
        let t = target_of("v1.tag.web.netsel:8081", false, "netsel");
        assert_eq!((t.name, t.tag), ("web", Some("v1")));
        let t = target_of("web:8081", false, "netsel");
        assert_eq!((t.name, t.tag), ("web", None));
    }

    #[test]
    fn authority_wins_over_host() {
        let req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://api:80/x")
            .header(HOST, "web")
            .body(())
            .unwrap();
        let t = target(&req, "netsel").unwrap();
        assert_eq!((t.name, t.absolute), ("api", false));
        let req = Request::builder()
            .uri("/x")
            .header(HOST, "web.netsel:8081")
            .body(())
            .unwrap();
        let t = target(&req, "netsel").unwrap();
        assert_eq!(
            (t.name, t.authority, t.absolute),
            ("web", "web.netsel:8081", false)
        );
        let req = Request::builder()
            .uri("http://example.com/")
            .header(HOST, "web")
            .body(())
            .unwrap();
        let t = target(&req, "netsel").unwrap();
        assert_eq!((t.name, t.absolute), ("example.com", true));
        let req = Request::builder().uri("/").body(()).unwrap();
        assert!(target(&req, "netsel").is_none());
    }
}
