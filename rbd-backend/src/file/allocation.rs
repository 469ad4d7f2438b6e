//! Where a sparse file's data is: `SEEK_DATA` / `SEEK_HOLE`. Block devices have no
//! holes to report (their [`Backend::allocation_map`](crate::Backend) is `None`).

use super::FileBackend;
use crate::allocation::{Allocation, AllocationMap};
use crate::error::Result;
use crate::sys::seek_data_or_hole;

/// Extents gathered per query at most: a badly fragmented file is answered in
/// parts rather than in one huge list (the caller asks again from `covered_to`).
const MAX_EXTENTS: usize = 64 * 1024;

impl AllocationMap for FileBackend {
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation> {
        self.check_range("allocation query", offset, len)?;
        let end = offset + len;
        let mut data = Vec::new();
        let mut pos = offset;
        while pos < end {
            if data.len() == MAX_EXTENTS {
                return Ok(Allocation {
                    data,
                    covered_to: pos,
                });
            }
            let start = match seek_data_or_hole(&self.file, pos, true) {
                Ok(Some(d)) => d,
                // No data from here to the end of the file.
                Ok(None) => break,
                // A filesystem without SEEK_DATA: the kernel's generic fallback
                // already says "all data", but an error here means the same.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    data.push((pos, end - pos));
                    break;
                }
                Err(e) => return Err(self.io_error("SEEK_DATA", pos, end - pos, e)),
            };
            if start >= end {
                break;
            }
            let stop = match seek_data_or_hole(&self.file, start, false) {
                Ok(Some(h)) => h.min(end),
                // Cannot happen (there is always a hole at the end of the file),
                // but if it did, the rest is data.
                Ok(None) => end,
                Err(e) => return Err(self.io_error("SEEK_HOLE", start, end - start, e)),
            };
            if stop <= start {
                // A file that changed under us between the two calls; count the
                // rest as data rather than loop.
                data.push((start, end - start));
                break;
            }
            data.push((start, stop - start));
            pos = stop;
        }
        Ok(Allocation {
            data,
            covered_to: end,
        })
    }
}
