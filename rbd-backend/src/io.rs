//! The asynchronous data path of a disk: what the engine asks of the slow backend
//! and of the local cache device, on the event loop of the thread that asks
//! (see [`crate::aio`]).
//!
//! A request's memory is a [`BufSlice`]: the request owns it until it completes, so
//! a future dropped early never frees memory that the kernel or librbd still uses.

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;

/// The future of one data-path request.
pub type IoFut<'a, T = ()> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// A request that completed at once (in-memory backends, refusals).
pub fn ready<'a, T: 'a>(r: Result<T>) -> IoFut<'a, T> {
    Box::pin(std::future::ready(r))
}

/// How a write must reach the media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Acknowledged when the device has it; durable after the next flush.
    #[default]
    Normal,
    /// Durable when it completes (FUA / `RWF_DSYNC`).
    Durable,
}
