//! Backends: everything between an admitted client and its mail server.
//!
//! | concern | module |
//! | --- | --- |
//! | opening one connection (transparent bind, whose fault a failure is) | `connect` |
//! | choosing a backend, per-backend caps, failover within a deadline | `pool` |
//! | SMTP health checks (a busy backend is not a failed one) | `health` |
//! | the learned limit for `max_connections = "auto"` | `limit` |
//! | keeping learned limits across a restart (`state_dir`) | `state` |
//! | reading the backend's greeting before the client sees it | `greeting` |
//!
//! A session asks the pool once, [`Pool::connect`], for a connected backend before its deadline.
//! Nothing here is done in the accept loop, and nothing here writes to the client.

mod connect;
pub mod greeting;
mod health;
pub mod limit;
mod pool;
pub mod state;

pub use connect::{connect, set_transparent, transparent_preflight, ConnectError};
pub use greeting::Greeting;
pub use health::{check, examine, probe, Check};
pub use pool::{BusyAbout, Lease, Member, NoBackend, Pool, Unconnected};
