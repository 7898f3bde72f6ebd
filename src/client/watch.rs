//! Watching one service through the HTTP API's blocking queries.
//!
//! ```no_run
//! # async fn run() -> Result<(), netsel::client::ClientError> {
//! let mut watch = netsel::client::watch("127.0.0.1:9001".parse().unwrap(), "web");
//! loop {
//!     match watch.next().await? {
//!         Some(r) => println!("web: {} healthy instances at {}:{}", r.instances.len(), r.vip, r.service_port),
//!         None => println!("web is not registered"),
//!     }
//! }
//! # }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use super::error::ClientError;
use super::http::{self, HttpError, HttpRequest};
use super::resolution::Resolution;
use crate::protocol::{ProtocolError, Response};

/// How long each blocking query waits on the server by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Follows one service: [`next`](Self::next) returns its state at once the first time,
/// then whenever it changes (instances come or go, health changes).
#[derive(Debug, Clone)]
pub struct ServiceWatch {
    api: SocketAddr,
    name: String,
    token: Option<String>,
    wait: Duration,
    index: Option<u64>,
    last: Option<Option<Resolution>>,
}

/// Watches service `name` through the API at `api`.
pub fn watch(api: SocketAddr, name: impl Into<String>) -> ServiceWatch {
    ServiceWatch::new(api, name)
}

impl From<HttpError> for ClientError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Io(e) => ClientError::Io(e),
            HttpError::Timeout(d) => ClientError::Timeout(d),
            HttpError::Malformed(m) => ClientError::Protocol(ProtocolError::BadResponse(m)),
        }
    }
}

/// Equal but for lease countdowns (which change on every answer).
fn same(a: &Option<Resolution>, b: &Option<Resolution>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.name == b.name
                && a.vip == b.vip
                && a.service_port == b.service_port
                && a.instances.len() == b.instances.len()
                && a.instances
                    .iter()
                    .zip(&b.instances)
                    .all(|(x, y)| x.id == y.id && x.endpoint == y.endpoint && x.weight == y.weight)
        }
        _ => false,
    }
}

impl ServiceWatch {
    /// A watch of `name` through the API at `api`.
    pub fn new(api: SocketAddr, name: impl Into<String>) -> Self {
        ServiceWatch {
            api,
            name: name.into(),
            token: None,
            wait: DEFAULT_WAIT,
            index: None,
            last: None,
        }
    }

    /// Presents an ACL token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long each blocking query may wait on the server (default 60 s).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.max(Duration::from_secs(1));
        self
    }

    /// The catalog index of the last answer.
    pub fn index(&self) -> Option<u64> {
        self.index
    }

    /// The service's healthy instances now (first call) or at its next change; `None`
    /// while no such service is registered.
    pub async fn next(&mut self) -> Result<Option<Resolution>, ClientError> {
        loop {
            let state = self.poll().await?;
            if !self.last.as_ref().is_some_and(|last| same(last, &state)) {
                self.last = Some(state.clone());
                return Ok(state);
            }
        }
    }

    async fn poll(&mut self) -> Result<Option<Resolution>, ClientError> {
        let mut path = format!(
            "/v1/services/{}?format=line",
            http::encode_component(&self.name)
        );
        if let Some(i) = self.index {
            path.push_str(&format!("&index={i}&wait={}ms", self.wait.as_millis()));
        }
        let mut req = HttpRequest::new("GET", &path);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let timeout = self.wait + Duration::from_secs(15);
        let resp = http::send(self.api, &req, timeout).await?;
        let index = resp
            .header("x-netsel-index")
            .and_then(|v| v.parse::<u64>().ok());
        let text = resp.text();
        let result = match resp.status {
            200 => match Response::parse(text.trim_end())? {
                Response::Resolved {
                    name,
                    vip,
                    service_port,
                    instances,
                } => Some(Resolution {
                    name,
                    vip,
                    service_port,
                    instances,
                }),
                other => {
                    return Err(ClientError::Protocol(ProtocolError::BadResponse(
                        other.to_string(),
                    )));
                }
            },
            404 if index.is_some() => None,
            status => {
                return Err(ClientError::Rejected(format!(
                    "HTTP {status}: {}",
                    text.trim()
                )));
            }
        };
        // Never go backwards past a reset: start over from the server's index.
        self.index = index;
        Ok(result)
    }
}
