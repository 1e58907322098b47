//! mxgate: a transparent TCP connection-limiting proxy for SMTP servers.
//!
//! It caps inbound connections globally and per source, answers clients over a limit with its
//! own RFC 5321 `421` reply, and forwards everyone else to the backend byte for byte.
//!
//! | concern | module |
//! | --- | --- |
//! | the command line: subcommands, man pages, completions | [`cli`] |
//! | flags, file, validation, warnings | [`config`] |
//! | the reference (keys, metrics, reply texts) the docs and man pages are generated from | [`reference`](mod@reference) |
//! | where a connection is admitted: the decision in the accept loop, the shared state, the capacity, and the queue's dispatcher that grants its slots | [`gate`] |
//! | what admission counts and the rules it applies: per-source and global counts, the guard | [`admission`], with [`policy`] (lists, per-network rules, rates) |
//! | limits shared between instances through Redis | [`cluster`] |
//! | where a client waits for a slot, fair between sources | [`queue`] |
//! | the signal that a slot may have freed, shared by all that hold slots | [`wake`] |
//! | the pregreet test (bots that speak first) and its cache | [`pregreet`] |
//! | why mxgate answered a client itself | [`reason`] |
//! | where a refusal is written, counted and its connection closed | [`reply`] |
//! | where bytes move (splice, copy) | [`forward`] |
//! | the mail servers: connect, pool and failover, health | [`backend`] |
//! | reading SMTP replies (health checks, load tool) | [`smtp`] |
//! | Prometheus series, the process's own included | [`metrics`] |
//! | the live view: `/status`, the page, `/metrics` endpoint, `mxgate status`, systemd's `STATUS=` | [`status`] |
//! | listening sockets, accept errors | [`listener`] |
//! | the descriptor budget against RLIMIT_NOFILE | [`descriptors`] |
//! | mxgate's own resource failures (EMFILE, ENOBUFS): counted, paced, logged at a bounded rate | [`local_errors`] |
//! | log lines under systemd: journald priorities | [`logging`] |
//! | binding, worker threads, accept loops, background tasks, reload, shutdown | [`server`] |
//! | one connection's life, its states drawn in the header | [`session`] |
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
