//! The registry line protocol: typed requests and responses, parsed and encoded by pure
//! functions shared by the server (`registry`) and the client library.
//!
//! Two framings share one port (see `docs/protocol.md` for the full grammar):
//!
//! * **Seed frames**: exactly [`SEED_FRAME_LEN`] bytes, the text NUL-padded. A bare service
//!   name registers; `HEARTBEAT|<name>` renews. This is what the netsel 0.1 client sends.
//! * **Lines**: `|`-separated fields ending in `\n` (a preceding `\r` is ignored), each
//!   answered by one line.
//!
//! Parsing never panics: every malformed input maps to a [`ProtocolError`] whose `Display`
//! is the reason sent back as `FAILED|<reason>`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Length of a seed-protocol frame: the name, NUL-padded to this many bytes.
pub const SEED_FRAME_LEN: usize = 256;
/// Longest accepted line, terminator included.
pub const MAX_LINE_LEN: usize = 8 * 1024;
/// Most tags on one registration.
pub const MAX_TAGS: usize = 64;
/// Most metadata entries on one registration.
pub const MAX_META: usize = 64;
/// Longest tag, metadata key or metadata value, in bytes.
pub const MAX_VALUE_LEN: usize = 512;
pub use crate::model::{AppProtocol, Check, MAX_NAME_LEN};

/// How a request arrived, which decides how its answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A 256-byte NUL-padded seed frame.
    Seed,
    /// A newline-terminated line.
    Line,
}

impl std::str::FromStr for AppProtocol {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(AppProtocol::Tcp),
            "http" | "http1" | "http/1.1" => Ok(AppProtocol::Http1),
            "h2" | "h2c" | "http2" => Ok(AppProtocol::Http2),
            _ => Err(ProtocolError::BadOption {
                key: "proto".into(),
                reason: format!("unknown protocol '{s}' (expected tcp, http1 or http2)"),
            }),
        }
    }
}

impl std::str::FromStr for Check {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ProtocolError::BadOption {
            key: "check".into(),
            reason: reason.into(),
        };
        if s.eq_ignore_ascii_case("tcp") {
            return Ok(Check::Tcp);
        }
        let path = s
            .strip_prefix("http:")
            .ok_or_else(|| bad("expected tcp or http:/path"))?;
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "the HTTP path must start with '/' and contain no spaces",
            ));
        }
        Ok(Check::Http { path: path.into() })
    }
}

/// Options of an extended registration; every field is optional on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form key/value metadata.
    pub meta: BTreeMap<String, String>,
    /// Balancing weight (1..=10000); the server's default is 1.
    pub weight: Option<u32>,
    /// Lease TTL; the server's default is `max_heartbeat_age`.
    pub ttl: Option<Duration>,
    /// The port the service answers on at its VIP; defaults to the first instance's port.
    pub service_port: Option<u16>,
    /// For registrations without an endpoint: the pool port to take if it is free.
    pub port_hint: Option<u16>,
    /// What the instance speaks.
    pub protocol: Option<AppProtocol>,
    /// An active health check.
    pub check: Option<Check>,
    /// The ACL token that allows this registration (when the registry has `[acl]` on).
    pub token: Option<Token>,
    /// `replace=no`: register a new instance beside one already at this endpoint instead
    /// of taking it over (sent by clients registering again after losing their instance).
    pub replace: Option<bool>,
    /// `deregister_critical_after=90s`: deregister the instance once its check has kept it
    /// critical this long.
    pub deregister_critical_after: Option<Duration>,
}

/// An ACL token on the wire. It never prints: `Debug` shows `Token(***)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Seed registration by bare name; the endpoint is the peer's IP and a pool port.
    SeedRegister {
        /// Service name as sent (validated by the catalog).
        name: String,
    },
    /// Name-only heartbeat, accepted only from the peer IP that registered the name.
    SeedHeartbeat {
        /// Service name as sent.
        name: String,
    },
    /// `PING`.
    Ping,
    /// `REGISTER|<name>|<endpoint or ->|<key=value>...`
    Register {
        /// Service name as sent.
        name: String,
        /// Where the instance listens; `None` takes the peer IP and a pool port.
        endpoint: Option<SocketAddr>,
        /// Everything else.
        options: RegisterOptions,
    },
    /// `HEARTBEAT|<id>|<secret>`
    Heartbeat {
        /// Instance id.
        id: String,
        /// Instance secret returned at registration.
        secret: String,
    },
    /// `DEREGISTER|<id>|<secret>`
    Deregister {
        /// Instance id.
        id: String,
        /// Instance secret returned at registration.
        secret: String,
    },
    /// `RESOLVE|<name>`
    Resolve {
        /// Service name as sent.
        name: String,
    },
    /// `AUTH|<token>`: the ACL token for the rest of the connection.
    Auth {
        /// The token.
        token: Token,
    },
}

/// One instance in a `RESOLVED` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInstance {
    /// Instance id.
    pub id: String,
    /// Where it listens.
    pub endpoint: SocketAddr,
    /// Balancing weight.
    pub weight: u32,
    /// Time left on its lease when the registry answered (absent from older servers).
    pub lease_remaining: Option<Duration>,
}

/// The answer to a successful registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterReply {
    /// Instance id, used with the secret to heartbeat and deregister.
    pub id: String,
    /// The instance secret. Never log it.
    pub secret: String,
    /// The service's virtual IP.
    pub vip: IpAddr,
    /// The service's port on its VIP.
    pub service_port: u16,
    /// Where the instance is expected to listen.
    pub endpoint: SocketAddr,
    /// Lease TTL in whole seconds (at least 1).
    pub ttl_secs: u64,
}

/// A response, framed according to the request it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Seed registration success: `SUCCESS|<vip>|<port>|<ttl>` + NUL.
    SeedSuccess {
        /// Service VIP.
        vip: IpAddr,
        /// The instance's (pool) port.
        port: u16,
        /// Lease TTL in seconds.
        ttl_secs: u64,
    },
    /// `HEARTBEAT_OK`
    HeartbeatOk,
    /// `HEARTBEAT_FAILED` (seed heartbeat only; extended heartbeats fail with a reason).
    HeartbeatFailed,
    /// `PONG`
    Pong,
    /// `REGISTERED|<id>|<secret>|<vip>|<service-port>|<endpoint>|<ttl>`
    Registered(RegisterReply),
    /// `OK`
    Ok,
    /// `RESOLVED|<name>|<vip>|<service-port>|<count>|<id> <endpoint> <weight> <lease-ms>|...`
    Resolved {
        /// Canonical service name.
        name: String,
        /// Service VIP.
        vip: IpAddr,
        /// Service port on the VIP.
        service_port: u16,
        /// Healthy instances.
        instances: Vec<ResolvedInstance>,
    },
    /// `FAILED|<reason>`
    Failed(String),
}

/// Why a frame or line could not be understood. `Display` is the wire reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame was empty.
    #[error("empty request")]
    Empty,
    /// Bytes that are not UTF-8.
    #[error("request is not valid UTF-8")]
    NotUtf8,
    /// A control character other than the terminators.
    #[error("request contains a control character")]
    ControlChar,
    /// A seed frame with bytes after its NUL padding began.
    #[error("seed frame has data after its NUL padding")]
    BadPadding,
    /// More bytes than the framing allows.
    #[error("request longer than {0} bytes")]
    TooLong(usize),
    /// The first field is not a command this server knows.
    #[error("unknown command '{0}'")]
    UnknownCommand(String),
    /// A command with the wrong number of fields.
    #[error("{command} takes {expected}")]
    Arity {
        /// The command.
        command: &'static str,
        /// A description of the expected fields.
        expected: &'static str,
    },
    /// A required field is empty.
    #[error("{0} is empty")]
    EmptyField(&'static str),
    /// The endpoint is not `IP:PORT` or `-`.
    #[error("endpoint '{0}' is not IP:PORT or '-'")]
    BadEndpoint(String),
    /// An option that is not `key=value`.
    #[error("option '{0}' is not key=value")]
    NotKeyValue(String),
    /// An option key this server does not know.
    #[error("unknown option '{0}'")]
    UnknownOption(String),
    /// An option appears twice where only one is allowed.
    #[error("option '{0}' given twice")]
    DuplicateOption(String),
    /// An option with an invalid value.
    #[error("option '{key}': {reason}")]
    BadOption {
        /// The option key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A malformed `%XX` escape.
    #[error("bad percent-escape in '{0}'")]
    BadEscape(String),
    /// A response line that does not parse (client side).
    #[error("malformed response '{0}'")]
    BadResponse(String),
}

fn check_text(s: &str) -> Result<(), ProtocolError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(ProtocolError::ControlChar);
    }
    Ok(())
}

/// Parses the text of a seed frame: the bytes before the first NUL. `frame` is the whole
/// frame as received (at most [`SEED_FRAME_LEN`] bytes).
pub fn parse_seed_frame(frame: &[u8]) -> Result<Request, ProtocolError> {
    if frame.len() > SEED_FRAME_LEN {
        return Err(ProtocolError::TooLong(SEED_FRAME_LEN));
    }
    let end = frame.iter().position(|&b| b == 0).unwrap_or(frame.len());
    if end == SEED_FRAME_LEN {
        // No room left for the NUL that ends the text: no registry frames this as a seed
        // frame, and no seed frame can carry it.
        return Err(ProtocolError::TooLong(SEED_FRAME_LEN - 1));
    }
    if frame[end..].iter().any(|&b| b != 0) {
        return Err(ProtocolError::BadPadding);
    }
    let text = std::str::from_utf8(&frame[..end]).map_err(|_| ProtocolError::NotUtf8)?;
    // The seed server trimmed surrounding whitespace from names; so do we.
    let text = text.trim();
    if text.is_empty() {
        return Err(ProtocolError::Empty);
    }
    check_text(text)?;
    if let Some(rest) = text.strip_prefix("HEARTBEAT|") {
        let name = rest.trim();
        if name.is_empty() {
            return Err(ProtocolError::EmptyField("service name"));
        }
        if name.contains('|') {
            return Err(ProtocolError::Arity {
                command: "HEARTBEAT",
                expected: "one name in a seed frame",
            });
        }
        return Ok(Request::SeedHeartbeat { name: name.into() });
    }
    if text.contains('|') {
        // Seed frames carry a bare name; anything else belongs on a line.
        let command = text.split('|').next().unwrap_or_default();
        return Err(ProtocolError::UnknownCommand(command.into()));
    }
    Ok(Request::SeedRegister { name: text.into() })
}

/// Parses one line (without its terminator; a trailing `\r` is ignored).
pub fn parse_line(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_LINE_LEN {
        return Err(ProtocolError::TooLong(MAX_LINE_LEN));
    }
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(ProtocolError::Empty);
    }
    check_text(text)?;
    let mut fields = text.split('|');
    let command = fields.next().unwrap_or_default();
    let fields: Vec<&str> = fields.collect();
    match command.to_ascii_uppercase().as_str() {
        "PING" => {
            if !fields.is_empty() {
                return Err(ProtocolError::Arity {
                    command: "PING",
                    expected: "no fields",
                });
            }
            Ok(Request::Ping)
        }
        "REGISTER" => parse_register(&fields),
        "HEARTBEAT" => match fields.as_slice() {
            [name] => {
                let name = name.trim();
                if name.is_empty() {
                    return Err(ProtocolError::EmptyField("service name"));
                }
                Ok(Request::SeedHeartbeat { name: name.into() })
            }
            [id, secret] => {
                let (id, secret) = id_and_secret(id, secret)?;
                Ok(Request::Heartbeat { id, secret })
            }
            _ => Err(ProtocolError::Arity {
                command: "HEARTBEAT",
                expected: "<id>|<secret> (or a service name)",
            }),
        },
        "DEREGISTER" => match fields.as_slice() {
            [id, secret] => {
                let (id, secret) = id_and_secret(id, secret)?;
                Ok(Request::Deregister { id, secret })
            }
            _ => Err(ProtocolError::Arity {
                command: "DEREGISTER",
                expected: "<id>|<secret>",
            }),
        },
        "AUTH" => match fields.as_slice() {
            [""] => Err(ProtocolError::EmptyField("token")),
            [token] => Ok(Request::Auth {
                token: Token(percent_decode(token)?),
            }),
            _ => Err(ProtocolError::Arity {
                command: "AUTH",
                expected: "<token>",
            }),
        },
        "RESOLVE" => match fields.as_slice() {
            [name] if name.trim().is_empty() => Err(ProtocolError::EmptyField("service name")),
            [name] => Ok(Request::Resolve {
                name: name.trim().into(),
            }),
            _ => Err(ProtocolError::Arity {
                command: "RESOLVE",
                expected: "<name>",
            }),
        },
        _ => Err(ProtocolError::UnknownCommand(truncate(command, 32))),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn id_and_secret(id: &str, secret: &str) -> Result<(String, String), ProtocolError> {
    if id.is_empty() {
        return Err(ProtocolError::EmptyField("instance id"));
    }
    if secret.is_empty() {
        return Err(ProtocolError::EmptyField("secret"));
    }
    Ok((id.into(), secret.into()))
}

fn parse_register(fields: &[&str]) -> Result<Request, ProtocolError> {
    let (name, rest) = match fields {
        [name, rest @ ..] => (name.trim(), rest),
        [] => {
            return Err(ProtocolError::Arity {
                command: "REGISTER",
                expected: "<name>[|<IP:PORT or ->[|key=value...]]",
            });
        }
    };
    if name.is_empty() {
        return Err(ProtocolError::EmptyField("service name"));
    }
    let (endpoint, opts) = match rest {
        [] => (None, &[][..]),
        [ep, opts @ ..] => {
            let ep = ep.trim();
            let endpoint = if ep == "-" || ep.is_empty() {
                None
            } else {
                Some(
                    ep.parse::<SocketAddr>()
                        .map_err(|_| ProtocolError::BadEndpoint(truncate(ep, 64)))?,
                )
            };
            (endpoint, opts)
        }
    };
    let mut options = RegisterOptions::default();
    for opt in opts {
        if opt.is_empty() {
            continue;
        }
        let (key, raw) = opt
            .split_once('=')
            .ok_or_else(|| ProtocolError::NotKeyValue(truncate(opt, 64)))?;
        let value = percent_decode(raw)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(bad(key, format!("longer than {MAX_VALUE_LEN} bytes")));
        }
        match key {
            "tag" => {
                if value.is_empty() {
                    return Err(bad(key, "empty tag".into()));
                }
                if options.tags.len() == MAX_TAGS {
                    return Err(bad(key, format!("more than {MAX_TAGS} tags")));
                }
                options.tags.push(value);
            }
            "weight" => {
                let w: u32 = value
                    .parse()
                    .map_err(|_| bad(key, format!("'{value}' is not a number")))?;
                if !(1..=10_000).contains(&w) {
                    return Err(bad(key, "must be 1..=10000".into()));
                }
                set_once(&mut options.weight, w, key)?;
            }
            "ttl" => {
                let ttl = parse_duration(&value).map_err(|reason| bad(key, reason))?;
                set_once(&mut options.ttl, ttl, key)?;
            }
            "service_port" | "port" => {
                let port: u16 = value
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(key, format!("'{value}' is not a port (1..=65535)")))?;
                if key == "port" {
                    set_once(&mut options.port_hint, port, key)?;
                } else {
                    set_once(&mut options.service_port, port, key)?;
                }
            }
            "proto" => {
                let p: AppProtocol = value.parse()?;
                set_once(&mut options.protocol, p, key)?;
            }
            "check" => {
                let c: Check = value.parse()?;
                set_once(&mut options.check, c, key)?;
            }
            "replace" => {
                let r = match value.to_ascii_lowercase().as_str() {
                    "yes" | "true" | "1" => true,
                    "no" | "false" | "0" => false,
                    _ => return Err(bad(key, format!("'{value}' is not yes or no"))),
                };
                set_once(&mut options.replace, r, key)?;
            }
            "deregister_critical_after" => {
                let d = parse_duration(&value).map_err(|reason| bad(key, reason))?;
                set_once(&mut options.deregister_critical_after, d, key)?;
            }
            "token" => {
                if value.is_empty() {
                    return Err(bad(key, "empty token".into()));
                }
                set_once(&mut options.token, Token(value), key)?;
            }
            _ => {
                if let Some(mkey) = key.strip_prefix("meta.") {
                    let mkey = percent_decode(mkey)?;
                    if mkey.is_empty() {
                        return Err(bad(key, "empty metadata key".into()));
                    }
                    if options.meta.len() == MAX_META {
                        return Err(bad(key, format!("more than {MAX_META} metadata entries")));
                    }
                    if options.meta.insert(mkey, value).is_some() {
                        return Err(ProtocolError::DuplicateOption(truncate(key, 64)));
                    }
                } else {
                    return Err(ProtocolError::UnknownOption(truncate(key, 64)));
                }
            }
        }
    }
    if endpoint.is_some() && options.port_hint.is_some() {
        return Err(bad(
            "port",
            "only for registrations without an endpoint".into(),
        ));
    }
    Ok(Request::Register {
        name: name.into(),
        endpoint,
        options,
    })
}

fn bad(key: &str, reason: String) -> ProtocolError {
    ProtocolError::BadOption {
        key: truncate(key, 64),
        reason,
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, key: &str) -> Result<(), ProtocolError> {
    if slot.is_some() {
        return Err(ProtocolError::DuplicateOption(key.into()));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses `1500ms`, `2s`, `1m`, `1h` or a bare number of seconds. Zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 1500ms or 2m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("'{s}' has an unknown unit (use ms, s, m or h)")),
    };
    // Whole milliseconds in a u64, the form durations are sent in (`ttl=…ms`).
    let d = Duration::from_millis(ms.ok_or_else(|| format!("'{s}' is too long"))?);
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// A duration as people read it: `250ms`, `1.5s`, `45s`, `1m05s`, `2h05m` (below a minute to a tenth of a second, above it to the
/// second, above an hour to the minute). The one formatter of the check messages, the
/// logs and the CLI's columns.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.is_zero() {
        "0s".into()
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if s < 60 && d.subsec_millis() != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Bytes escaped in option values: the field and option separators, `%` itself, and
/// anything that is not a printable character.
fn needs_escape(c: char) -> bool {
    matches!(c, '%' | '|' | '=') || c.is_control()
}

/// Escapes a tag, metadata key or value for an option field.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`percent_encode`].
pub fn percent_decode(s: &str) -> Result<String, ProtocolError> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ProtocolError::BadEscape(truncate(s, 64)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProtocolError::BadEscape(truncate(s, 64)))
}

impl Request {
    /// Encodes the request as a line (with its `\n`), or for the seed forms, as a seed frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::SeedRegister { name } => seed_frame(name),
            Request::SeedHeartbeat { name } => {
                let text = format!("HEARTBEAT|{name}");
                if text.len() < SEED_FRAME_LEN {
                    seed_frame(&text)
                } else {
                    // Too long for a seed frame; the line form means the same.
                    text.into_bytes().into_iter().chain([b'\n']).collect()
                }
            }
            _ => {
                let mut s = self.to_string();
                s.push('\n');
                s.into_bytes()
            }
        }
    }
}

/// Builds a seed frame: `text` NUL-padded to [`SEED_FRAME_LEN`] bytes. Text that leaves no
/// room for a NUL is cut to `SEED_FRAME_LEN - 1` bytes (at a character boundary), which the
/// server then refuses as an invalid name; the NUL is what makes it a seed frame.
pub fn seed_frame(text: &str) -> Vec<u8> {
    let mut buf = vec![0u8; SEED_FRAME_LEN];
    let mut n = text.len().min(SEED_FRAME_LEN - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    buf
}

impl fmt::Display for Request {
    /// The line form, without terminator. The secret is part of it: never log a request.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::SeedRegister { name } => write!(f, "REGISTER|{name}"),
            Request::SeedHeartbeat { name } => write!(f, "HEARTBEAT|{name}"),
            Request::Ping => f.write_str("PING"),
            Request::Register {
                name,
                endpoint,
                options,
            } => {
                write!(f, "REGISTER|{name}|")?;
                match endpoint {
                    Some(ep) => write!(f, "{ep}")?,
                    None => f.write_str("-")?,
                }
                for tag in &options.tags {
                    write!(f, "|tag={}", percent_encode(tag))?;
                }
                for (k, v) in &options.meta {
                    write!(f, "|meta.{}={}", percent_encode(k), percent_encode(v))?;
                }
                if let Some(w) = options.weight {
                    write!(f, "|weight={w}")?;
                }
                if let Some(ttl) = options.ttl {
                    write!(f, "|ttl={}ms", ttl.as_millis().max(1))?;
                }
                if let Some(p) = options.service_port {
                    write!(f, "|service_port={p}")?;
                }
                if let Some(p) = options.port_hint {
                    write!(f, "|port={p}")?;
                }
                if let Some(p) = options.protocol {
                    write!(f, "|proto={}", p.as_str())?;
                }
                if let Some(c) = &options.check {
                    write!(f, "|check={}", percent_encode(&c.to_wire()))?;
                }
                if let Some(r) = options.replace {
                    write!(f, "|replace={}", if r { "yes" } else { "no" })?;
                }
                if let Some(d) = options.deregister_critical_after {
                    write!(f, "|deregister_critical_after={}ms", d.as_millis().max(1))?;
                }
                if let Some(t) = &options.token {
                    write!(f, "|token={}", percent_encode(&t.0))?;
                }
                Ok(())
            }
            Request::Heartbeat { id, secret } => write!(f, "HEARTBEAT|{id}|{secret}"),
            Request::Deregister { id, secret } => write!(f, "DEREGISTER|{id}|{secret}"),
            Request::Resolve { name } => write!(f, "RESOLVE|{name}"),
            Request::Auth { token } => write!(f, "AUTH|{}", percent_encode(&token.0)),
        }
    }
}

impl Response {
    /// Appends the response's wire bytes, framed for `framing`, to `out`.
    pub fn encode_into(&self, framing: Framing, out: &mut Vec<u8>) {
        match (self, framing) {
            (
                Response::SeedSuccess {
                    vip,
                    port,
                    ttl_secs,
                },
                _,
            ) => {
                let _ = write!(Bytes(out), "SUCCESS|{vip}|{port}|{ttl_secs}\0");
            }
            // The seed server sent heartbeat answers bare, with no terminator.
            (Response::HeartbeatOk, Framing::Seed) => out.extend_from_slice(b"HEARTBEAT_OK"),
            (Response::HeartbeatFailed, Framing::Seed) => {
                out.extend_from_slice(b"HEARTBEAT_FAILED")
            }
            (Response::Failed(reason), Framing::Seed) => {
                let _ = write!(Bytes(out), "FAILED|{}\0", one_line(reason));
            }
            (r, Framing::Line) => {
                let _ = writeln!(Bytes(out), "{r}");
            }
            (r, Framing::Seed) => {
                let _ = write!(Bytes(out), "{r}\0");
            }
        }
    }

    /// Parses a response line (terminator and trailing NULs already stripped or not).
    pub fn parse(text: &str) -> Result<Response, ProtocolError> {
        let text = text.trim_end_matches(['\0', '\n', '\r']);
        let bad = || ProtocolError::BadResponse(truncate(text, 128));
        let mut fields = text.split('|');
        let head = fields.next().unwrap_or_default();
        let fields: Vec<&str> = fields.collect();
        let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| bad());
        let port = |s: &str| s.parse::<u16>().map_err(|_| bad());
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        Ok(match (head, fields.as_slice()) {
            ("SUCCESS", [vip, p, ttl]) => Response::SeedSuccess {
                vip: ip(vip)?,
                port: port(p)?,
                ttl_secs: num(ttl)?,
            },
            ("HEARTBEAT_OK", []) => Response::HeartbeatOk,
            ("HEARTBEAT_FAILED", []) => Response::HeartbeatFailed,
            ("PONG", []) => Response::Pong,
            ("OK", []) => Response::Ok,
            ("FAILED", reason) => Response::Failed(reason.join("|")),
            ("REGISTERED", [id, secret, vip, sport, ep, ttl]) => {
                Response::Registered(RegisterReply {
                    id: id.to_string(),
                    secret: secret.to_string(),
                    vip: ip(vip)?,
                    service_port: port(sport)?,
                    endpoint: ep.parse().map_err(|_| bad())?,
                    ttl_secs: num(ttl)?,
                })
            }
            ("RESOLVED", [name, vip, sport, count, rest @ ..]) => {
                let count = num(count)? as usize;
                if count != rest.len() {
                    return Err(bad());
                }
                let mut instances = Vec::with_capacity(count);
                for item in rest {
                    let parts: Vec<&str> = item.split(' ').collect();
                    let (id, ep, w, lease) = match parts.as_slice() {
                        [id, ep, w] => (id, ep, w, None),
                        [id, ep, w, lease] => (id, ep, w, Some(num(lease)?)),
                        _ => return Err(bad()),
                    };
                    instances.push(ResolvedInstance {
                        id: id.to_string(),
                        endpoint: ep.parse().map_err(|_| bad())?,
                        weight: w.parse().map_err(|_| bad())?,
                        lease_remaining: lease.map(Duration::from_millis),
                    });
                }
                Response::Resolved {
                    name: name.to_string(),
                    vip: ip(vip)?,
                    service_port: port(sport)?,
                    instances,
                }
            }
            _ => return Err(bad()),
        })
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::SeedSuccess {
                vip,
                port,
                ttl_secs,
            } => {
                write!(f, "SUCCESS|{vip}|{port}|{ttl_secs}")
            }
            Response::HeartbeatOk => f.write_str("HEARTBEAT_OK"),
            Response::HeartbeatFailed => f.write_str("HEARTBEAT_FAILED"),
            Response::Pong => f.write_str("PONG"),
            Response::Ok => f.write_str("OK"),
            Response::Failed(reason) => write!(f, "FAILED|{}", one_line(reason)),
            Response::Registered(r) => write!(
                f,
                "REGISTERED|{}|{}|{}|{}|{}|{}",
                r.id, r.secret, r.vip, r.service_port, r.endpoint, r.ttl_secs
            ),
            Response::Resolved {
                name,
                vip,
                service_port,
                instances,
            } => {
                write!(
                    f,
                    "RESOLVED|{name}|{vip}|{service_port}|{}",
                    instances.len()
                )?;
                for i in instances {
                    write!(f, "|{} {} {}", i.id, i.endpoint, i.weight)?;
                    if let Some(lease) = i.lease_remaining {
                        write!(f, " {}", lease.as_millis())?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// `fmt::Write` over a byte vector, so responses are formatted without a String in between.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Result<Request, ProtocolError> {
        parse_line(s.as_bytes())
    }

    #[test]
    fn seed_register_frame() {
        let frame = seed_frame("my-service");
        assert_eq!(frame.len(), 256);
        assert_eq!(
            parse_seed_frame(&frame),
            Ok(Request::SeedRegister {
                name: "my-service".into()
            })
        );
    }

    #[test]
    fn seed_heartbeat_frame() {
        assert_eq!(
            parse_seed_frame(&seed_frame("HEARTBEAT|web")),
            Ok(Request::SeedHeartbeat { name: "web".into() })
        );
    }

    #[test]
    fn seed_frame_bad_inputs() {
        assert_eq!(parse_seed_frame(&seed_frame("")), Err(ProtocolError::Empty));
        assert_eq!(
            parse_seed_frame(&seed_frame("   ")),
            Err(ProtocolError::Empty)
        );
        let mut f = seed_frame("web");
        f[100] = b'x';
        assert_eq!(parse_seed_frame(&f), Err(ProtocolError::BadPadding));
        let mut f = seed_frame("we");
        f[1] = 0xff;
        f[2] = 0xfe;
        assert_eq!(parse_seed_frame(&f[..3]), Err(ProtocolError::NotUtf8));
        assert_eq!(
            parse_seed_frame(&seed_frame("HEARTBEAT|")),
            Err(ProtocolError::EmptyField("service name"))
        );
        assert!(matches!(
            parse_seed_frame(&seed_frame("HEARTBEAT|a|b")),
            Err(ProtocolError::Arity { .. })
        ));
        assert!(matches!(
            parse_seed_frame(&seed_frame("REGISTER|a")),
            Err(ProtocolError::UnknownCommand(_))
        ));
        assert_eq!(
            parse_seed_frame(&seed_frame("we\tb")),
            Err(ProtocolError::ControlChar)
        );
        assert_eq!(
            parse_seed_frame(&[b'a'; 257]),
            Err(ProtocolError::TooLong(256))
        );
        assert_eq!(
            parse_seed_frame(&[b'a'; 256]),
            Err(ProtocolError::TooLong(255))
        );
    }

    /// Found by the `line_protocol` fuzz target: `ttl=300222222222222222s` parsed, but its
    /// encoding in milliseconds did not fit a u64 and no longer parsed.
    #[test]
    fn durations_fit_their_millisecond_encoding() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        let max = format!("{}ms", u64::MAX);
        assert_eq!(parse_duration(&max), Ok(Duration::from_millis(u64::MAX)));
        for s in [
            "300222222222222222s",
            "18446744073709552s",
            "307445734561826m",
            "5124095576031h",
        ] {
            assert!(parse_duration(s).unwrap_err().contains("too long"), "{s}");
        }
        let req = Request::Register {
            name: "web".into(),
            endpoint: None,
            options: RegisterOptions {
                ttl: Some(parse_duration("18446744073709551s").unwrap()),
                ..RegisterOptions::default()
            },
        };
        let line = req.encode();
        assert_eq!(parse_line(&line[..line.len() - 1]), Ok(req));
    }

    /// Found by the `line_protocol` fuzz target: a seed frame filled to the last byte has
    /// no NUL, so the registry waits for a line end that never comes; and a seed heartbeat
    /// too long for a frame was cut, heartbeating another name.
    #[cfg(feature = "server")]
    #[test]
    fn long_seed_requests_stay_framed() {
        use crate::registry::codec::{Decoded, Frame, decode};
        let long = "a".repeat(300);
        let frame = Request::SeedRegister { name: long.clone() }.encode();
        assert_eq!(frame.len(), SEED_FRAME_LEN);
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let Decoded::Frame(Frame::Seed(f)) = decode(&mut buf) else {
            panic!("not framed as a seed frame");
        };
        assert_eq!(
            parse_seed_frame(&f),
            Ok(Request::SeedRegister {
                name: long[..SEED_FRAME_LEN - 1].into()
            })
        );
        // A multi-byte character is not split.
        let wide = "é".repeat(200);
        let frame = seed_frame(&wide);
        assert_eq!(frame[254..], [0, 0]);
        assert!(std::str::from_utf8(&frame[..254]).is_ok());
        // A seed heartbeat that does not fit a frame goes as a line, name intact.
        let hb = Request::SeedHeartbeat { name: long.clone() };
        let line = hb.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(parse_line(&line[..line.len() - 1]), Ok(hb));
    }

    #[test]
    fn register_full_roundtrip() {
        let req = Request::Register {
            name: "web".into(),
            endpoint: Some("127.0.0.1:8000".parse().unwrap()),
            options: RegisterOptions {
                tags: vec!["v1".into(), "a|b".into()],
                meta: [("zone".to_string(), "eu=1%".to_string())].into(),
                weight: Some(5),
                ttl: Some(Duration::from_millis(1500)),
                service_port: Some(80),
                port_hint: None,
                deregister_critical_after: Some(Duration::from_secs(90)),
                protocol: Some(AppProtocol::Http2),
                check: Some(Check::Http {
                    path: "/health?x=1".into(),
                }),
                token: Some(Token("t|k=%1".into())),
                replace: Some(false),
            },
        };
        let bytes = req.encode();
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert_eq!(parse_line(&bytes[..bytes.len() - 1]), Ok(req));
        let auth = Request::Auth {
            token: Token("a|b".into()),
        };
        let bytes = auth.encode();
        assert_eq!(parse_line(&bytes[..bytes.len() - 1]), Ok(auth));
        assert_eq!(format!("{:?}", Token("secret".into())), "Token(***)");
        assert!(parse_line(b"AUTH|").is_err());
        assert!(parse_line(b"AUTH|a|b").is_err());
    }

    #[test]
    fn register_minimal_forms() {
        assert_eq!(
            line("REGISTER|web"),
            Ok(Request::Register {
                name: "web".into(),
                endpoint: None,
                options: RegisterOptions::default()
            })
        );
        assert!(matches!(
            line("register|web|-|port=21000\r"),
            Ok(Request::Register {
                endpoint: None,
                options: RegisterOptions {
                    port_hint: Some(21000),
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            line("REGISTER|web|[::1]:80"),
            Ok(Request::Register { endpoint: Some(ep), .. }) if ep.port() == 80
        ));
    }

    #[test]
    fn register_bad_inputs() {
        let cases: &[(&str, ProtocolError)] = &[
            (
                "REGISTER",
                ProtocolError::Arity {
                    command: "REGISTER",
                    expected: "<name>[|<IP:PORT or ->[|key=value...]]",
                },
            ),
            ("REGISTER||-", ProtocolError::EmptyField("service name")),
            (
                "REGISTER|web|localhost:80",
                ProtocolError::BadEndpoint("localhost:80".into()),
            ),
            (
                "REGISTER|web|-|weight",
                ProtocolError::NotKeyValue("weight".into()),
            ),
            (
                "REGISTER|web|-|colour=red",
                ProtocolError::UnknownOption("colour".into()),
            ),
            (
                "REGISTER|web|-|ttl=1s|ttl=2s",
                ProtocolError::DuplicateOption("ttl".into()),
            ),
            (
                "REGISTER|web|-|meta.a=1|meta.a=2",
                ProtocolError::DuplicateOption("meta.a".into()),
            ),
            (
                "REGISTER|web|-|tag=%zz",
                ProtocolError::BadEscape("%zz".into()),
            ),
            (
                "REGISTER|web|-|tag=%FF",
                ProtocolError::BadEscape("%FF".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&line(input).unwrap_err(), want, "input {input:?}");
        }
        for input in [
            "REGISTER|web|-|weight=0",
            "REGISTER|web|-|weight=10001",
            "REGISTER|web|-|weight=x",
            "REGISTER|web|-|ttl=0",
            "REGISTER|web|-|ttl=5y",
            "REGISTER|web|-|ttl=",
            "REGISTER|web|-|service_port=0",
            "REGISTER|web|-|service_port=70000",
            "REGISTER|web|-|proto=gopher",
            "REGISTER|web|-|check=udp",
            "REGISTER|web|-|check=http:health",
            "REGISTER|web|-|check=http:/a b",
            "REGISTER|web|-|tag=",
            "REGISTER|web|-|meta.=x",
            "REGISTER|web|127.0.0.1:1|port=21000",
        ] {
            assert!(
                matches!(line(input), Err(ProtocolError::BadOption { .. })),
                "input {input:?} gave {:?}",
                line(input)
            );
        }
        let long = format!("REGISTER|web|-|tag={}", "x".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(line(&long), Err(ProtocolError::BadOption { .. })));
        let many: String = (0..=MAX_TAGS).map(|i| format!("|tag=t{i}")).collect();
        assert!(matches!(
            line(&format!("REGISTER|web|-{many}")),
            Err(ProtocolError::BadOption { .. })
        ));
        let many: String = (0..=MAX_META).map(|i| format!("|meta.k{i}=v")).collect();
        assert!(matches!(
            line(&format!("REGISTER|web|-{many}")),
            Err(ProtocolError::BadOption { .. })
        ));
    }

    #[test]
    fn other_commands_and_bad_inputs() {
        assert_eq!(line("PING"), Ok(Request::Ping));
        assert_eq!(line("ping\r"), Ok(Request::Ping));
        assert!(matches!(line("PING|x"), Err(ProtocolError::Arity { .. })));
        assert_eq!(
            line("HEARTBEAT|id1|s3cret"),
            Ok(Request::Heartbeat {
                id: "id1".into(),
                secret: "s3cret".into()
            })
        );
        assert_eq!(
            line("HEARTBEAT|web"),
            Ok(Request::SeedHeartbeat { name: "web".into() })
        );
        assert!(matches!(
            line("HEARTBEAT"),
            Err(ProtocolError::Arity { .. })
        ));
        assert!(matches!(
            line("HEARTBEAT|a|b|c"),
            Err(ProtocolError::Arity { .. })
        ));
        assert_eq!(
            line("HEARTBEAT||s"),
            Err(ProtocolError::EmptyField("instance id"))
        );
        assert_eq!(
            line("HEARTBEAT|i|"),
            Err(ProtocolError::EmptyField("secret"))
        );
        assert_eq!(
            line("HEARTBEAT| "),
            Err(ProtocolError::EmptyField("service name"))
        );
        assert_eq!(
            line("DEREGISTER|i|s"),
            Ok(Request::Deregister {
                id: "i".into(),
                secret: "s".into()
            })
        );
        assert!(matches!(
            line("DEREGISTER|i"),
            Err(ProtocolError::Arity { .. })
        ));
        assert_eq!(
            line("RESOLVE|web"),
            Ok(Request::Resolve { name: "web".into() })
        );
        assert_eq!(
            line("RESOLVE|"),
            Err(ProtocolError::EmptyField("service name"))
        );
        assert!(matches!(line("RESOLVE"), Err(ProtocolError::Arity { .. })));
        assert_eq!(line(""), Err(ProtocolError::Empty));
        assert_eq!(line("\r"), Err(ProtocolError::Empty));
        assert_eq!(
            line("FROB|x"),
            Err(ProtocolError::UnknownCommand("FROB".into()))
        );
        assert_eq!(line("PI\u{7}NG"), Err(ProtocolError::ControlChar));
        assert_eq!(parse_line(&[0xc3, 0x28]), Err(ProtocolError::NotUtf8));
        assert_eq!(
            parse_line(&vec![b'A'; MAX_LINE_LEN + 1]),
            Err(ProtocolError::TooLong(MAX_LINE_LEN))
        );
    }

    #[test]
    fn responses_roundtrip() {
        let cases = vec![
            Response::HeartbeatOk,
            Response::HeartbeatFailed,
            Response::Pong,
            Response::Ok,
            Response::Failed("unknown instance".into()),
            Response::Registered(RegisterReply {
                id: "abc".into(),
                secret: "def".into(),
                vip: "127.77.0.9".parse().unwrap(),
                service_port: 80,
                endpoint: "127.0.0.1:8080".parse().unwrap(),
                ttl_secs: 60,
            }),
            Response::Resolved {
                name: "web".into(),
                vip: "127.77.0.9".parse().unwrap(),
                service_port: 80,
                instances: vec![
                    ResolvedInstance {
                        id: "abc".into(),
                        endpoint: "[::1]:8080".parse().unwrap(),
                        weight: 3,
                        lease_remaining: Some(Duration::from_millis(59_000)),
                    },
                    ResolvedInstance {
                        id: "def".into(),
                        endpoint: "127.0.0.1:1".parse().unwrap(),
                        weight: 1,
                        lease_remaining: None,
                    },
                ],
            },
            Response::Resolved {
                name: "web".into(),
                vip: "127.77.0.9".parse().unwrap(),
                service_port: 80,
                instances: vec![],
            },
        ];
        for r in cases {
            let mut out = Vec::new();
            r.encode_into(Framing::Line, &mut out);
            assert_eq!(out.last(), Some(&b'\n'));
            let text = std::str::from_utf8(&out).unwrap();
            assert_eq!(Response::parse(text), Ok(r));
        }
    }

    #[test]
    fn seed_responses_are_byte_exact() {
        let mut out = Vec::new();
        Response::SeedSuccess {
            vip: "127.77.0.1".parse().unwrap(),
            port: 20000,
            ttl_secs: 60,
        }
        .encode_into(Framing::Seed, &mut out);
        assert_eq!(out, b"SUCCESS|127.77.0.1|20000|60\0");
        out.clear();
        Response::HeartbeatOk.encode_into(Framing::Seed, &mut out);
        assert_eq!(out, b"HEARTBEAT_OK");
        out.clear();
        Response::HeartbeatFailed.encode_into(Framing::Seed, &mut out);
        assert_eq!(out, b"HEARTBEAT_FAILED");
        out.clear();
        Response::Failed("bad\nname".into()).encode_into(Framing::Seed, &mut out);
        assert_eq!(out, b"FAILED|bad name\0");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("10d").is_err());
    }

    #[test]
    fn durations_are_written_as_people_read_them() {
        let f = |ms| format_duration(Duration::from_millis(ms));
        assert_eq!(
            [
                f(0),
                f(250),
                f(1000),
                f(1500),
                f(45_000),
                f(60_000),
                f(90_500)
            ],
            ["0s", "250ms", "1s", "1.5s", "45s", "1m00s", "1m30s"]
        );
        assert_eq!(
            [f(3_442_000), f(3_600_000), f(7_500_000)],
            ["57m22s", "1h00m", "2h05m"]
        );
        // What needs one unit reads back as it was written.
        for ms in [250, 1000, 45_000] {
            assert_eq!(parse_duration(&f(ms)), Ok(Duration::from_millis(ms)));
        }
    }

    #[test]
    fn bad_responses() {
        for s in [
            "",
            "SUCCESS|x|1|1",
            "SUCCESS|127.0.0.1|99999|1",
            "REGISTERED|a|b",
            "RESOLVED|web|127.0.0.1|80|2|a 127.0.0.1:1 1",
            "RESOLVED|web|127.0.0.1|80|1|a 127.0.0.1:1",
            "RESOLVED|web|127.0.0.1|80|1|a 127.0.0.1:1 1 x",
            "RESOLVED|web|127.0.0.1|80|1|a 127.0.0.1:1 1 2 3",
            "WHAT",
        ] {
            assert!(Response::parse(s).is_err(), "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_line_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_line(&bytes);
            let _ = parse_seed_frame(&bytes[..bytes.len().min(SEED_FRAME_LEN)]);
        }

        #[test]
        fn percent_roundtrip(s in "\\PC*") {
            proptest::prop_assert_eq!(percent_decode(&percent_encode(&s)), Ok(s));
        }
    }
}
