//! A throw-away device for one crash state: a shared base image plus the
//! sectors that differ, so building a state costs what differs, not a copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rbd_backend::{Backend, BackendIdentity, BlockIo, Result};

const SECTOR: u64 = 512;

/// Sectors that differ from the base image, by sector number.
pub type Delta = HashMap<u64, Box<[u8; 512]>>;

pub struct Overlay {
    base: Arc<Vec<u8>>,
    delta: Mutex<Delta>,
    identity: BackendIdentity,
}

impl Overlay {
    /// `identity` is the recorded device's, so recovery sees the same disk.
    pub fn new(
        base: Arc<Vec<u8>>,
        delta: HashMap<u64, Box<[u8; 512]>>,
        identity: BackendIdentity,
    ) -> Self {
        Self {
            base,
            delta: Mutex::new(delta),
            identity,
        }
    }

    fn for_sectors(&self, offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize)) {
        // (sector, byte offset within the sector, byte offset within the buffer)
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let s = abs / SECTOR;
            let within = (abs % SECTOR) as usize;
            f(s, within, pos);
            pos += SECTOR as usize - within;
        }
    }
}

impl BlockIo for Overlay {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        let len = buf.len();
        self.for_sectors(offset, len, |s, within, pos| {
            let n = (SECTOR as usize - within).min(len - pos);
            let src: &[u8] = match delta.get(&s) {
                Some(d) => &d[within..within + n],
                None => {
                    let at = (s * SECTOR) as usize + within;
                    &self.base[at..at + n]
                }
            };
            buf[pos..pos + n].copy_from_slice(src);
        });
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut delta = self.delta.lock().unwrap_or_else(|p| p.into_inner());
        let len = buf.len();
        self.for_sectors(offset, len, |s, within, pos| {
            let n = (SECTOR as usize - within).min(len - pos);
            let base = &self.base;
            let d = delta.entry(s).or_insert_with(|| {
                let at = (s * SECTOR) as usize;
                let mut b = Box::new([0u8; 512]);
                b.copy_from_slice(&base[at..at + SECTOR as usize]);
                b
            });
            d[within..within + n].copy_from_slice(&buf[pos..pos + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write_at(offset, &vec![0u8; len as usize])
    }
}

impl Backend for Overlay {
    fn identity(&self) -> BackendIdentity {
        self.identity.clone()
    }
}
