//! The slow, shared disk behind the cache: the [`Backend`] trait, its error type,
//! and the file / block-device backend with its I/O engines, plus in-memory and
//! fault-injecting backends for tests and benchmarks, and (feature `rbd`) the
//! RBD backend over librbd.

pub mod aio;
pub mod aligned;
pub mod allocation;
pub mod backend;
pub mod error;
pub mod fault;
pub mod file;
pub mod io;
pub mod io_engine;
mod link;
pub mod mem;
#[cfg(feature = "rbd")]
pub mod rbd;
mod sys;

pub use aligned::AlignedBuf;
pub use allocation::{Allocation, AllocationMap};
pub use backend::{
    Backend, BackendChanges, BackendIdentity, BlockIo, ChangeTracking, ExclusiveLock, ResizeWatch,
};
pub use error::{BackendError, ErrorKind, Result};
pub use fault::{FaultStats, FaultyBackend, FaultyBackendBuilder, OpKind};
pub use file::{FileBackend, FileKind, OpenOptions};
pub use io::{IoFut, WriteMode};
pub use io_engine::{open_engine, EngineChoice, EngineKind, IoEngine, SyncEngine, UringEngine};
pub use mem::{MemBackend, MemBackendBuilder};
#[cfg(feature = "rbd")]
pub use rbd::{RbdAdmin, RbdBackend, RbdOptions, RbdRawImage, RbdSpec};
