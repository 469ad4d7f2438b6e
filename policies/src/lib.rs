//! Pure decision logic for ublk-cache: per-mode request rules, eviction and
//! write-back ordering. Nothing here does I/O, so all of it is unit-tested directly.

pub mod boot_trace;
pub mod dirty_control;
pub mod eviction;
pub mod mode;
pub mod pacing;
pub mod writeback;

pub use boot_trace::BootTraceMode;
pub use dirty_control::{DirtyController, DirtyLevel, Regime};
pub use eviction::{
    ClockPolicy, EvictionBuilder, EvictionKind, EvictionPolicy, LruPolicy, ParseEvictionError,
};
pub use mode::{CacheMode, FlushAction, ParseModeError, WriteRoute};
pub use pacing::{BackendPriority, Pacer, WritebackLimit};
pub use writeback::WritebackOrder;
