//! ublk-cache: a per-disk block device server with a local cache in front of a
//! slow backend. The data path runs one way: a frontend (ublk, NBD) calls the
//! [`engine`] through [`target::BlockTarget`]; the engine calls the cache store
//! and the `rbd_backend::Backend` trait.

pub mod boot_trace;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod format;
pub mod frontend;
pub mod io_trace;
pub mod target;
pub mod unix_socket;

pub use engine::{Engine, EngineConfig};
pub use error::{EngineError, EngineErrorKind, Remedy};
