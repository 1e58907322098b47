//! mxgate: a transparent TCP connection-limiting proxy for SMTP servers.
//!
//! It caps inbound connections globally and per source, answers clients over a limit with its
//! own RFC 5321 `421` reply, and forwards everyone else to the backend byte for byte.
//!
//! | concern | module |
//! | --- | --- |
//! | flags, file, validation | [`config`] |
//! | who gets in | [`admission`] |
//! | mxgate's own replies and graceful close | [`reply`] |
//! | refusals answered by the accept loop itself (Linux) | `linger` |
//! | moving bytes (splice, copy) | [`forward`] |
//! | connecting to the mail server | [`backend`] |
//! | several backends: balancing, caps, health checks | [`backends`] |
//! | Prometheus series and endpoint | [`metrics`] |
//! | listening sockets, accept errors | [`listener`] |
//! | source policy: lists, per-network rules, rate limits | [`policy`] |
//! | accept loops, reload, shutdown | [`server`] |
//! | one connection's life | [`session`] |
//! | systemd notify, socket activation, signals, drain | [`service`] |
//! | the SMTP load simulator and its sink | [`load`] |
//! | `mxgate demo` | [`demo`] |

pub mod admission;
pub mod backend;
pub mod backends;
pub mod cli;
pub mod config;
pub mod demo;
pub mod forward;
#[cfg(target_os = "linux")]
pub mod linger;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod policy;
pub mod proxy_protocol;
pub mod reply;
pub mod server;
pub mod service;
pub mod session;

pub use config::Config;
pub use server::{start, start_with, Running};
