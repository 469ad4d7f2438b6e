//! Frontends: what turns kernel or network requests into [`crate::target::BlockTarget`] calls.

pub mod nbd;
pub mod ublk;
