//! Frontends: what turns kernel or network requests into
//! [`crate::target::AsyncTarget`] (or blocking [`crate::target::BlockTarget`]) calls.

pub(crate) mod dispatch;
pub mod nbd;
pub mod ublk;
