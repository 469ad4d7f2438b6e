//! The portable engine: one pread/pwrite/fdatasync syscall per request on the
//! calling thread. Used where io_uring is refused and as the reference in tests.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{offset_plus, EngineKind, IoEngine};

#[derive(Debug, Default, Clone, Copy)]
pub struct SyncEngine;

impl SyncEngine {
    pub fn new() -> Self {
        Self
    }
}

impl IoEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn read_upto(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset_plus(offset, done)?) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match file.write_at(&buf[done..], offset_plus(offset, done)?) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("write made no progress at offset {offset}+{done}"),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fdatasync(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}
