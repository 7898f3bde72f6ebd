//! ACL tokens: who may read and who may write which service names, on every door (the
//! HTTP API and the line protocol).
//!
//! Off by default. When on, a request presents a token (API: `Authorization: Bearer
//! <token>`, `X-Netsel-Token: <token>`, or `?token=` for browsers' `EventSource`; line
//! protocol: a `token=` option on `REGISTER`, or an `AUTH|<token>` line for the rest of the
//! connection). Tokens are compared in constant time against every configured token, and
//! never logged. Seed-form frames carry no token: with ACLs on they are accepted only from
//! `[acl] trusted_cidrs` (loopback by default).

use std::net::IpAddr;

use ipnet::IpNet;

use serde::{Deserialize, Serialize};

/// A token that matches no configured token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown ACL token")]
pub struct UnknownToken;

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub(crate) struct Acl {
    enabled: bool,
    anonymous_read: bool,
    tokens: Vec<Rights>,
    trusted: Vec<IpNet>,
}

#[derive(Clone)]
struct Rights {
    name: String,
    token: Vec<u8>,
    read: Vec<String>,
    write: Vec<String>,
}

impl std::fmt::Debug for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rights").field("name", &self.name).finish()
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// ACLs are off: anyone may read and register (secrets still guard instances).
    Open,
    /// ACLs are on and no token was given.
    Anonymous,
    /// A known token (index into the token list).
    Token(usize),
}

fn normalize(prefixes: &[String]) -> Vec<String> {
    prefixes
        .iter()
        .map(|p| {
            if p == "*" {
                String::new()
            } else {
                p.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Acl {
    pub(crate) fn new(s: &AclSettings) -> Self {
        Acl {
            enabled: s.enabled,
            anonymous_read: s.anonymous_read,
            tokens: s
                .tokens
                .iter()
                .map(|t| Rights {
                    name: t.name.clone(),
                    token: t.token.as_bytes().to_vec(),
                    read: normalize(&t.read),
                    write: normalize(&t.write),
                })
                .collect(),
            trusted: s.trusted_cidrs.clone(),
        }
    }

    /// Whether seed-form frames (which carry no token) are accepted from `ip`: always with
    /// ACLs off, else only from `[acl] trusted_cidrs`.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        !self.enabled || self.trusted.iter().any(|n| n.contains(&ip.to_canonical()))
    }

    /// Whether tokens are enforced.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who presents `token`. An unknown token is refused outright.
    pub(crate) fn identify(&self, token: Option<&str>) -> Result<Caller, UnknownToken> {
        if !self.enabled {
            return Ok(Caller::Open);
        }
        let Some(token) = token else {
            return Ok(Caller::Anonymous);
        };
        // Compare with every token, without stopping at a match.
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if constant_time_eq(&t.token, token.as_bytes()) && found.is_none() {
                found = Some(i);
            }
        }
        match found {
            Some(i) => {
                tracing::debug!(token = %self.tokens[i].name, "ACL token accepted");
                Ok(Caller::Token(i))
            }
            None => Err(UnknownToken),
        }
    }

    fn allowed(prefixes: &[String], name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Whether `caller` may read `name`.
    pub(crate) fn can_read(&self, caller: Caller, name: &str) -> bool {
        match caller {
            Caller::Open => true,
            Caller::Anonymous => self.anonymous_read,
            Caller::Token(i) => {
                let t = &self.tokens[i];
                Acl::allowed(&t.read, name) || Acl::allowed(&t.write, name)
            }
        }
    }

    /// Whether `caller` may read everything (metrics, unfiltered streams).
    pub(crate) fn can_read_all(&self, caller: Caller) -> bool {
        match caller {
            Caller::Open => true,
            Caller::Anonymous => self.anonymous_read,
            Caller::Token(i) => {
                let t = &self.tokens[i];
                t.read.iter().chain(&t.write).any(|p| p.is_empty())
            }
        }
    }

    /// Whether `caller` may register `name`, or deregister its instances without their
    /// secret (`admin` = the latter, which needs a token even when ACLs are off).
    pub(crate) fn can_write(&self, caller: Caller, name: &str, admin: bool) -> bool {
        match caller {
            Caller::Open => !admin,
            Caller::Anonymous => false,
            Caller::Token(i) => Acl::allowed(&self.tokens[i].write, name),
        }
    }
}

/// Access control for the HTTP API and the line protocol (`[acl]` table). Off by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclSettings {
    /// Whether tokens are required.
    pub enabled: bool,
    /// Whether requests without a token may read (list, get, watch, UI data). Default
    /// false.
    pub anonymous_read: bool,
    /// The tokens.
    pub tokens: Vec<AclToken>,
    /// Where seed-form frames (a bare name; `HEARTBEAT|<name>`), which carry no token, are
    /// accepted from while ACLs are on. Default: loopback (`127.0.0.0/8`, `::1/128`).
    pub trusted_cidrs: Vec<IpNet>,
}

impl Default for AclSettings {
    fn default() -> Self {
        AclSettings {
            enabled: false,
            anonymous_read: false,
            tokens: Vec::new(),
            trusted_cidrs: vec![
                IpNet::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)), 8)
                    .unwrap_or_default(),
                IpNet::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128).unwrap_or_default(),
            ],
        }
    }
}

/// One ACL token and what it may do. Rights are service-name prefixes; `""` or `"*"`
/// means every name.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AclToken {
    /// A label for logs (the token itself is never logged).
    pub name: String,
    /// The token: sent as `Authorization: Bearer <token>` or `X-Netsel-Token`.
    pub token: String,
    /// Name prefixes it may read.
    pub read: Vec<String>,
    /// Name prefixes it may register, heartbeat and deregister (without the instance
    /// secret, for operators).
    pub write: Vec<String>,
}

impl std::fmt::Debug for AclToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclToken")
            .field("name", &self.name)
            .field("token", &"***")
            .field("read", &self.read)
            .field("write", &self.write)
            .finish()
    }
}

impl AclSettings {
    /// Checks every token can work: the key and the reason when one cannot.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for t in &self.tokens {
            if t.token.len() < 16 {
                return Err(("acl.tokens.token", "must be at least 16 characters".into()));
            }
            if t.token.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err((
                    "acl.tokens.token",
                    "may not contain spaces or control characters".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::AclToken;
    use super::*;

    fn acl() -> Acl {
        Acl::new(&AclSettings {
            enabled: true,
            anonymous_read: false,
            tokens: vec![
                AclToken {
                    name: "web-deployer".into(),
                    token: "t-web-0123456789abcdef".into(),
                    read: vec![],
                    write: vec!["web".into()],
                },
                AclToken {
                    name: "reader".into(),
                    token: "t-read-0123456789abcdef".into(),
                    read: vec!["*".into()],
                    write: vec![],
                },
            ],
            trusted_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        })
    }

    #[test]
    fn seed_frames_are_trusted_only_from_trusted_cidrs_with_acls_on() {
        let acl = acl();
        assert!(acl.trusts("10.1.2.3".parse().unwrap()));
        assert!(acl.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!acl.trusts("127.0.0.1".parse().unwrap()));
        let open = Acl::new(&AclSettings::default());
        assert!(open.trusts("192.0.2.1".parse().unwrap()));
        assert!(
            AclSettings::default()
                .trusted_cidrs
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()))
        );
    }

    #[test]
    fn rights_follow_prefixes() {
        let acl = acl();
        let web = acl.identify(Some("t-web-0123456789abcdef")).unwrap();
        let reader = acl.identify(Some("t-read-0123456789abcdef")).unwrap();
        assert!(acl.identify(Some("t-web-0123456789abcdeX")).is_err());
        assert!(acl.can_write(web, "web-front", false));
        assert!(acl.can_write(web, "Web-front", true));
        assert!(!acl.can_write(web, "api", false));
        assert!(acl.can_read(web, "web"));
        assert!(!acl.can_read(web, "api"));
        assert!(!acl.can_read_all(web));
        assert!(acl.can_read(reader, "anything"));
        assert!(acl.can_read_all(reader));
        assert!(!acl.can_write(reader, "web", false));
        let anon = acl.identify(None).unwrap();
        assert!(!acl.can_read(anon, "web"));
        assert!(!acl.can_write(anon, "web", false));
    }

    #[test]
    fn open_acl_allows_reads_and_registration_but_not_admin() {
        let acl = Acl::new(&AclSettings::default());
        let c = acl.identify(Some("whatever")).unwrap();
        assert_eq!(c, Caller::Open);
        assert!(acl.can_read_all(c));
        assert!(acl.can_write(c, "x", false));
        assert!(!acl.can_write(c, "x", true));
    }

    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
