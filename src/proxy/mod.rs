//! The proxies: TCP (gateway and per-VIP listeners) and HTTP, sharing one
//! [`balance::Balancer`] for instance selection and passive health.

pub mod balance;
pub mod http;
pub(crate) mod listen;
pub mod tcp;
pub(crate) mod worker;
