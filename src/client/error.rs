//! [`ClientError`], why a client call failed: the registry client's, the watch's and the
//! DNS resolver's one error type.

use std::io;
use std::time::Duration;

use crate::protocol::ProtocolError;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network trouble talking to every registry tried.
    #[error("registry unreachable: {0}")]
    Io(#[from] io::Error),
    /// The registry did not answer in time.
    #[error("registry did not answer within {0:?}")]
    Timeout(Duration),
    /// The registry answered `FAILED|<reason>` (or `HEARTBEAT_FAILED`).
    #[error("registry refused: {0}")]
    Rejected(String),
    /// No such service.
    #[error("unknown service {0}")]
    UnknownService(String),
    /// Heartbeat or deregister before a successful register.
    #[error("not registered")]
    NotRegistered,
    /// The registry's answer did not parse.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}
