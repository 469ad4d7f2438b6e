//! The crash shadow: a copy of the line table in a tmpfs file, updated on every
//! entry change before the request that caused it is acknowledged.
//!
//! The on-disk table is only brought up to date at a FLUSH (that is what makes a
//! power cut safe). Between flushes a daemon crash (kill -9, a bug, an upgrade
//! gone wrong) must not lose acknowledged writes, because the guest's kernel is
//! still running and will read them back. The shadow survives the daemon but not
//! the host, which is exactly the difference: after a daemon crash the next
//! attach takes the shadow (every acknowledged write is in it); after a power cut
//! the shadow is gone and the on-disk table from the last FLUSH is used.
//!
//! Each update is one `pwrite` of one entry. A process is never killed in the
//! middle of a system call's copy, so an entry cannot be torn by a daemon crash;
//! the entry checksum guards against anything else.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::error;

use crate::format::{EntryCodec, Layout, LineEntry};

/// Where shadows live unless `EngineConfig::shadow_dir` says otherwise.
pub const DEFAULT_DIR: &str = "/dev/shm/ublk-cache";
const MAGIC: &[u8; 8] = b"UBLKSHDW";
const HEADER: u64 = 4096;

pub struct Shadow {
    file: File,
    path: PathBuf,
    codec: EntryCodec,
    entry_size: u64,
    failed: std::sync::atomic::AtomicBool,
}

/// Create `dir` as 0700, or make it 0700 if it is ours: a shadow says which
/// blocks of which disk are cached, which no other user may read.
fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() == me && meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn path_for(dir: &Path, uuid: &[u8; 16]) -> PathBuf {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}.shadow"))
}

fn header(uuid: &[u8; 16], attach_gen: u64, layout: &Layout) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(uuid);
    h.extend_from_slice(&attach_gen.to_le_bytes());
    h.extend_from_slice(&layout.nr_lines.to_le_bytes());
    h.extend_from_slice(&layout.entry_size.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

impl Shadow {
    /// Create the shadow of attach `attach_gen` in `dir`, holding `entries`.
    pub fn create(
        dir: &Path,
        uuid: &[u8; 16],
        attach_gen: u64,
        layout: &Layout,
        codec: EntryCodec,
        entries: impl Iterator<Item = LineEntry>,
    ) -> io::Result<Shadow> {
        private_dir(dir)?;
        let path = path_for(dir, uuid);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        // A file left by an older version may be more open than that.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        let es = layout.entry_size as u64;
        file.set_len(HEADER + layout.nr_lines * es)?;
        let mut buf = vec![0u8; (256 * es) as usize];
        let (mut start, mut used) = (0u64, 0usize);
        for (slot, e) in entries.enumerate() {
            codec.encode(slot as u32, &e, &mut buf[used..]);
            used += es as usize;
            if used == buf.len() {
                file.write_all_at(&buf, HEADER + start * es)?;
                start = slot as u64 + 1;
                used = 0;
            }
        }
        if used > 0 {
            file.write_all_at(&buf[..used], HEADER + start * es)?;
        }
        // The header last: a shadow without a valid header is never used.
        file.write_all_at(&header(uuid, attach_gen, layout), 0)?;
        Ok(Shadow {
            file,
            path,
            codec,
            entry_size: es,
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Mirror one entry. A failure is logged loudly once; the server keeps
    /// serving (the on-disk table still protects flushed data).
    pub fn write(&self, slot: u32, e: &LineEntry) {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut buf = [0u8; 512];
        let n = self.entry_size as usize;
        self.codec.encode(slot, e, &mut buf[..n]);
        if let Err(err) = self
            .file
            .write_all_at(&buf[..n], HEADER + slot as u64 * self.entry_size)
        {
            self.failed.store(true, Ordering::Relaxed);
            error!(
                "crash shadow {} failed ({err}): until the next FLUSH, a daemon crash would lose acknowledged writes",
                self.path.display()
            );
        }
    }

    /// The entries a crashed attach `attach_gen` left, if its shadow exists.
    /// `Err` names why an existing shadow cannot be trusted.
    pub fn load(
        dir: &Path,
        uuid: &[u8; 16],
        attach_gen: u64,
        layout: &Layout,
        codec: &EntryCodec,
    ) -> Result<Option<Vec<LineEntry>>, String> {
        let path = path_for(dir, uuid);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let want = header(uuid, attach_gen, layout);
        if data.get(..want.len()) != Some(&want[..]) {
            return Err(format!(
                "{} belongs to another attach of this cache (or is damaged)",
                path.display()
            ));
        }
        let es = layout.entry_size as usize;
        let mut out = Vec::with_capacity(layout.nr_lines as usize);
        for slot in 0..layout.nr_lines as usize {
            let at = HEADER as usize + slot * es;
            let bytes = data
                .get(at..at + es)
                .ok_or_else(|| format!("{} is truncated", path.display()))?;
            out.push(
                codec
                    .decode(slot as u32, bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            );
        }
        Ok(Some(out))
    }

    /// Remove this shadow's file (a clean detach needs it no more; a test
    /// forgets it as a reboot would).
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}
