//! mxgate: a transparent TCP connection-limiting proxy for SMTP servers.
//!
//! It caps inbound connections globally and per source, answers clients over a limit with its
//! own RFC 5321 `421` reply, and forwards everyone else to the backend byte for byte.
//!
//! | concern | module |
//! | --- | --- |
//! | flags, file, validation, warnings | [`config`] |
//! | where a connection is admitted: counts and limits | [`admission`], with [`policy`] (lists, per-network rules, rates) |
//! | where a client waits for a slot, fair between sources | [`queue`] |
//! | the pregreet test (bots that speak first) and its cache | [`pregreet`] |
//! | why mxgate answered a client itself | [`reason`] |
//! | where a refusal is written and its connection closed | [`reply`] |
//! | where bytes move (splice, copy) | [`forward`] |
//! | the mail servers: connect, pool and failover, health | [`backend`] |
//! | reading SMTP replies (health checks, load tool) | [`smtp`] |
//! | Prometheus series, the process's own included | [`metrics`] |
//! | the live view: `/status`, the page, `/metrics` endpoint, `mxgate status`, systemd's `STATUS=` | [`status`] |
//! | listening sockets, accept errors | [`listener`] |
//! | the descriptor budget against RLIMIT_NOFILE | [`descriptors`] |
//! | mxgate's own resource failures (EMFILE, ENOBUFS): counted, paced, logged at a bounded rate | [`local_errors`] |
//! | log lines under systemd: journald priorities | [`logging`] |
//! | shared state, worker threads, accept loops, reload, shutdown | [`server`] |
//! | one connection's life | [`session`] |
//! | PROXY protocol, both ways | [`proxy_protocol`] |
//! | systemd notify, socket activation, signals, drain | [`service`] |
//! | the SMTP load simulator and its sink | [`load`] |
//! | `mxgate demo` | [`demo`] |

pub mod admission;
pub mod backend;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod descriptors;
pub mod forward;
pub mod gate;
pub mod listener;
pub mod load;
pub mod local_errors;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod pregreet;
pub mod proxy_protocol;
pub mod queue;
pub mod reason;
pub mod reference;
pub mod reply;
pub mod server;
pub mod service;
pub mod session;
pub mod smtp;
pub mod status;
pub mod wake;

pub use config::Config;
pub use server::{start, start_with, Running};
