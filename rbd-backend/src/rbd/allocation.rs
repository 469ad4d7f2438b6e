//! Where an RBD image's data is: `rbd_diff_iterate2` against nothing, which lists
//! the allocated extents (a clone's included, through its parent). Unallocated
//! extents read as zeroes.
//!
//! librbd's diff cannot be cancelled and takes no timeout, and during a cluster
//! outage it would hold the caller (an NBD worker) for as long as the outage
//! lasts. With a backend timeout it therefore runs on a helper thread that the
//! query waits for at most that long; a query that times out fails (the engine
//! then reports the range as data), its thread finishes whenever librbd returns.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use super::ffi::Errno;
use super::RbdBackend;
use crate::allocation::{Allocation, AllocationMap};
use crate::error::{BackendError, ErrorKind, Result};

/// Bytes asked of librbd per query at most: about 256 object lookups at the
/// default 4 MiB object size. The caller asks again for the rest.
const MAX_SPAN: u64 = 1 << 30;
/// Diffs still waiting for the cluster after their query timed out. Beyond this
/// many, new queries fail at once instead of adding threads.
const MAX_STUCK: usize = 4;
static STUCK: AtomicUsize = AtomicUsize::new(0);

impl AllocationMap for RbdBackend {
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation> {
        self.check_range("allocation query", offset, len)?;
        let len = len.min(MAX_SPAN);
        let image = Arc::clone(&self.image);
        let res = match self.timeout {
            None => image.allocated(offset, len),
            Some(timeout) => {
                if STUCK.load(Ordering::Acquire) >= MAX_STUCK {
                    return Err(self.alloc_timeout(
                        offset,
                        len,
                        "earlier queries are still waiting",
                    ));
                }
                let (tx, rx) = mpsc::channel();
                STUCK.fetch_add(1, Ordering::AcqRel);
                let spawned =
                    std::thread::Builder::new()
                        .name("rbd-alloc".into())
                        .spawn(move || {
                            let r = image.allocated(offset, len);
                            STUCK.fetch_sub(1, Ordering::AcqRel);
                            // The query may have given up waiting; that is fine.
                            let _ = tx.send(r);
                        });
                if let Err(e) = spawned {
                    STUCK.fetch_sub(1, Ordering::AcqRel);
                    return Err(BackendError::new(
                        ErrorKind::Io,
                        format!("rbd:{}: allocation query: cannot start a thread", self.spec),
                        e,
                    ));
                }
                match rx.recv_timeout(timeout) {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(self.alloc_timeout(offset, len, "the cluster did not answer"))
                    }
                }
            }
        };
        let extents = res.map_err(|e: Errno| {
            BackendError::from_io(
                format!(
                    "rbd:{}: allocation query (rbd_diff_iterate2) offset={offset} len={len}",
                    self.spec
                ),
                e.io_error(),
            )
        })?;
        Ok(Allocation::from_extents(offset, offset + len, extents))
    }
}

impl RbdBackend {
    fn alloc_timeout(&self, offset: u64, len: u64, why: &str) -> BackendError {
        BackendError::new(
            ErrorKind::Timeout,
            format!(
                "rbd:{}: allocation query offset={offset} len={len}: {why} within the backend timeout",
                self.spec
            ),
            io::Error::from_raw_os_error(libc::ETIMEDOUT),
        )
    }
}
