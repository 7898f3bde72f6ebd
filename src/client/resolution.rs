//! [`Resolution`], what resolving a service returns: from the registry (RESOLVE) and from
//! a [`ServiceWatch`](super::ServiceWatch).

use std::net::IpAddr;

use crate::protocol::ResolvedInstance;

/// What RESOLVE returns: the service's VIP and port and its healthy instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// Canonical service name.
    pub name: String,
    /// Service VIP.
    pub vip: IpAddr,
    /// Service port on the VIP.
    pub service_port: u16,
    /// Healthy instances.
    pub instances: Vec<ResolvedInstance>,
}
