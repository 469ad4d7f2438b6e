//! ublk-cache-one: the OpenNebula side of ublk-cache. The `ublk_cache` TM
//! scripts (contrib/opennebula) are thin: they ask [`plan`] what to do, and run
//! the host verbs of [`ops`] as root on the hosts. Every decision (names,
//! sizes, modes, which host does what, the order of a migration) lives here.

pub mod attrs;
pub mod bundle;
pub mod cmd;
pub mod conf;
pub mod disk;
pub mod error;
pub mod links;
pub mod log;
pub mod ls;
pub mod monitor;
pub mod names;
pub mod ops;
pub mod plan;
pub mod probe;
pub mod rbd;
pub mod server;
pub mod state;

pub use error::{Error, Result};
