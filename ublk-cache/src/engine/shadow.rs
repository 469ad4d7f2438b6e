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
//! The file is mapped shared, so an update is two small copies into memory, not
//! a system call under a lock: what a thread stored is in the file's pages the
//! moment it is stored, and stays there when the process dies. A process can be
//! killed between any two instructions, though, so a copy can be cut short
//! (the entry's checksum shows it). So every update goes twice: first into the
//! staging record of the line map's shard whose lock the writer holds (no two
//! writers share one; it carries the slot, a sequence number and a checksum),
//! then into the slot's entry in the table. A kill tears at most one of the
//! two. Loading takes each slot's entry from the table; only where that one is
//! torn, from the staged record of that slot with the highest sequence number,
//! which is the update the kill cut short (a later update of the slot would
//! have needed the lock of the writer that died holding it). An intact table
//! entry is always the one to take: if it is older than a staged record, that
//! update's request was never acknowledged.
//!
//! ```text
//! header (4 KiB):  magic | uuid | attach_gen | nr_lines | entry_size | stages | crc
//! staging:         stages × (slot u32 | crc u32 | seq u64 | entry), padded to 4 KiB
//! table:           nr_lines × entry
//! ```
//! A shadow written by a release before this layout (magic `UBLKSHDW`: the
//! header, then bare entries) is still read, so that a server upgraded after a
//! crash recovers what the old one acknowledged.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::MmapRaw;

use crate::format::{EntryCodec, Layout, LineEntry};

/// Where shadows live unless `EngineConfig::shadow_dir` says otherwise.
pub const DEFAULT_DIR: &str = "/dev/shm/ublk-cache";
const MAGIC: &[u8; 8] = b"UBLKSHD2";
/// The layout before staging records: the header, then one bare entry a slot.
const MAGIC_V1: &[u8; 8] = b"UBLKSHDW";
const HEADER: u64 = 4096;
/// Slot, checksum and sequence number in front of a staged entry.
const PREFIX: usize = 16;
/// The largest entry (`Layout::entry_size_for` of the largest line).
const MAX_ENTRY: usize = 512;

pub struct Shadow {
    map: MmapRaw,
    path: PathBuf,
    codec: EntryCodec,
    entry_size: usize,
    stages: usize,
    table_at: usize,
    /// The last sequence number given to an update.
    seq: AtomicU64,
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

fn header(
    magic: &[u8; 8],
    uuid: &[u8; 16],
    attach_gen: u64,
    layout: &Layout,
    stages: Option<u32>,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(magic);
    h.extend_from_slice(uuid);
    h.extend_from_slice(&attach_gen.to_le_bytes());
    h.extend_from_slice(&layout.nr_lines.to_le_bytes());
    h.extend_from_slice(&layout.entry_size.to_le_bytes());
    if let Some(n) = stages {
        h.extend_from_slice(&n.to_le_bytes());
    }
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Where the table starts, after the staging records of `stages` writers.
fn table_offset(stages: usize, entry_size: usize) -> usize {
    HEADER as usize + (stages * (PREFIX + entry_size)).next_multiple_of(4096)
}

/// A staging record: `slot | crc(slot, seq, entry) | seq | entry`.
fn seal_staged_record(rec: &mut [u8], slot: u32, seq: u64) {
    rec[..4].copy_from_slice(&slot.to_le_bytes());
    rec[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..4]), &rec[8..]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Shadow {
    /// Create the shadow of attach `attach_gen` in `dir`, holding `entries`,
    /// with one staging record for each of `stages` writers that exclude
    /// each other (the line map's shards).
    pub fn create(
        dir: &Path,
        uuid: &[u8; 16],
        attach_gen: u64,
        layout: &Layout,
        codec: EntryCodec,
        stages: usize,
        entries: impl Iterator<Item = LineEntry>,
    ) -> io::Result<Shadow> {
        let es = layout.entry_size as usize;
        if es > MAX_ENTRY || stages == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "crash shadow: entries of {es} bytes and {stages} stages are not supported"
                ),
            ));
        }
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
        let table_at = table_offset(stages, es);
        let len = table_at as u64 + layout.nr_lines * es as u64;
        file.set_len(len)?;
        // Every byte is written here, staging records included (zeroes, which
        // no checksum matches): the pages exist before the file is mapped,
        // so a store into the mapping never needs a page that tmpfs has no
        // room for (which would be a SIGBUS instead of an error here).
        file.write_all_at(&vec![0u8; table_at - HEADER as usize], HEADER)?;
        let per = 256;
        let mut buf = vec![0u8; per * es];
        let (mut start, mut used) = (0u64, 0usize);
        for (slot, e) in entries.enumerate() {
            codec.encode(slot as u32, &e, &mut buf[used..used + es]);
            used += es;
            if used == buf.len() {
                file.write_all_at(&buf, table_at as u64 + start * es as u64)?;
                start = slot as u64 + 1;
                used = 0;
            }
        }
        if used > 0 {
            file.write_all_at(&buf[..used], table_at as u64 + start * es as u64)?;
        }
        if start * es as u64 + used as u64 != layout.nr_lines * es as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "crash shadow: fewer entries than the cache has lines",
            ));
        }
        // The header last: a shadow without a valid header is never used.
        file.write_all_at(
            &header(MAGIC, uuid, attach_gen, layout, Some(stages as u32)),
            0,
        )?;
        let map = MmapRaw::map_raw(&file)?;
        Ok(Shadow {
            map,
            path,
            codec,
            entry_size: es,
            stages,
            table_at,
            seq: AtomicU64::new(0),
        })
    }

    /// Mirror one entry. `stage` names the writer's staging record: the
    /// caller holds the lock that gives it that record alone (the line map's
    /// shard), and for `slot` the lock under which every change of it is made.
    pub fn write(&self, stage: usize, slot: u32, e: &LineEntry) {
        let rs = PREFIX + self.entry_size;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut rec = [0u8; PREFIX + MAX_ENTRY];
        let rec = &mut rec[..rs];
        self.codec.encode(slot, e, &mut rec[PREFIX..]);
        seal_staged_record(rec, slot, seq);
        let stage_at = HEADER as usize + (stage % self.stages) * rs;
        self.store(stage_at, rec);
        // The staged copy is complete before the slot's entry is touched, so
        // a kill between the two leaves one of them whole.
        fence(Ordering::SeqCst);
        self.store(
            self.table_at + slot as usize * self.entry_size,
            &rec[PREFIX..],
        );
    }

    fn store(&self, at: usize, bytes: &[u8]) {
        assert!(
            at + bytes.len() <= self.map.len(),
            "crash shadow record out of the file"
        );
        // SAFETY: the range lies inside the mapping (asserted above), which
        // lives as long as `self`, and does not overlap `bytes` (a local
        // buffer). The caller's locks give this range one writer at a time
        // (see `write`); nothing in this process reads the mapping (`load`
        // reads the file, after the writer is gone).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(at),
                bytes.len(),
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
        let name = path.display();
        if data.starts_with(MAGIC_V1) {
            return load_v1(&data, uuid, attach_gen, layout, codec)
                .map(Some)
                .map_err(|e| format!("{name}: {e}"));
        }
        let nr = layout.nr_lines as usize;
        let es = layout.entry_size as usize;
        let rs = PREFIX + es;
        // Magic, uuid, attach_gen, nr_lines and entry_size come first.
        let stages = data.get(44..48).map_or(0, |b| u32_at(b, 0));
        let want = header(MAGIC, uuid, attach_gen, layout, Some(stages));
        if data.get(..want.len()) != Some(&want[..]) {
            return Err(format!(
                "{name} belongs to another attach of this cache (or is damaged)"
            ));
        }
        let table_at = table_offset(stages as usize, es);
        if data.len() < table_at + nr * es {
            return Err(format!("{name} is truncated"));
        }
        let mut table: Vec<Option<LineEntry>> = (0..nr)
            .map(|slot| {
                codec
                    .decode(slot as u32, &data[table_at + slot * es..][..es])
                    .ok()
            })
            .collect();
        // For each torn entry, the staged copy of its slot with the highest
        // sequence number (the update that was cut short).
        let mut staged: std::collections::HashMap<u32, (u64, LineEntry)> =
            std::collections::HashMap::new();
        for stage in 0..stages as usize {
            let rec = &data[HEADER as usize + stage * rs..][..rs];
            let (slot, seq) = (u32_at(rec, 0), u64_at(rec, 8));
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..4]), &rec[8..]);
            if seq == 0 || crc != u32_at(rec, 4) || slot as usize >= nr {
                // Never used, or cut short (then the slot's record is whole).
                continue;
            }
            if table[slot as usize].is_some() {
                continue;
            }
            let Ok(e) = codec.decode(slot, &rec[PREFIX..]) else {
                continue;
            };
            let b = staged.entry(slot).or_insert((seq, e));
            if b.0 < seq {
                *b = (seq, e);
            }
        }
        for (slot, (_, e)) in staged {
            table[slot as usize] = Some(e);
        }
        table
            .into_iter()
            .enumerate()
            .map(|(slot, e)| {
                e.ok_or_else(|| {
                    format!("{name}: the entry of slot {slot} is damaged, and no staged copy of it is whole")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Remove this shadow's file (a clean detach needs it no more; a test
    /// forgets it as a reboot would).
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A shadow of the layout before staging records.
fn load_v1(
    data: &[u8],
    uuid: &[u8; 16],
    attach_gen: u64,
    layout: &Layout,
    codec: &EntryCodec,
) -> Result<Vec<LineEntry>, String> {
    let want = header(MAGIC_V1, uuid, attach_gen, layout, None);
    if data.get(..want.len()) != Some(&want[..]) {
        return Err("it belongs to another attach of this cache (or is damaged)".into());
    }
    let es = layout.entry_size as usize;
    (0..layout.nr_lines as usize)
        .map(|slot| {
            let at = HEADER as usize + slot * es;
            let bytes = data.get(at..at + es).ok_or("it is truncated")?;
            codec.decode(slot as u32, bytes).map_err(|e| e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::FormatVersion;

    const UUID: [u8; 16] = [7; 16];

    fn setup() -> (tempfile::TempDir, Layout, EntryCodec) {
        let layout = Layout::for_cache_as(FormatVersion::V2, 65536, 64 << 20).expect("layout");
        let codec = EntryCodec::new(layout.entry_size, layout.spl(), &UUID);
        (tempfile::tempdir().expect("tempdir"), layout, codec)
    }

    fn entry(tag: u64, epoch: u64) -> LineEntry {
        LineEntry {
            tag: Some(tag),
            epoch,
            valid: [0b1011, 0, 0, 0],
            dirty: [0b0010, 0, 0, 0],
        }
    }

    fn create(dir: &Path, layout: &Layout, codec: EntryCodec) -> Shadow {
        let free = (0..layout.nr_lines).map(|_| LineEntry::default());
        Shadow::create(dir, &UUID, 5, layout, codec, 4, free).expect("create")
    }

    fn load(dir: &Path, layout: &Layout, codec: &EntryCodec) -> Result<Vec<LineEntry>, String> {
        Shadow::load(dir, &UUID, 5, layout, codec).map(|e| e.expect("a shadow"))
    }

    /// Overwrite bytes of the shadow file, as a kill in the middle of a copy
    /// leaves them.
    fn tear(dir: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(path_for(dir, &UUID))
            .expect("open");
        f.write_all_at(bytes, at).expect("tear");
    }

    fn table_at(sh: &Shadow, slot: u32) -> u64 {
        (sh.table_at + slot as usize * sh.entry_size) as u64
    }

    #[test]
    fn updates_are_in_the_file_without_a_system_call_of_their_own() {
        let (dir, layout, codec) = setup();
        let sh = create(dir.path(), &layout, codec);
        sh.write(0, 3, &entry(40, 2));
        sh.write(1, 9, &entry(41, 2));
        sh.write(0, 3, &entry(40, 3));
        let got = load(dir.path(), &layout, &codec).expect("load");
        assert_eq!(got.len(), layout.nr_lines as usize);
        assert_eq!(got[3], entry(40, 3));
        assert_eq!(got[9], entry(41, 2));
        assert_eq!(got[0], LineEntry::default());
        // Another attach's shadow is never taken.
        let other = Shadow::load(dir.path(), &UUID, 6, &layout, &codec);
        assert!(other
            .expect_err("another attach")
            .contains("another attach"));
    }

    #[test]
    fn a_torn_entry_is_taken_from_its_staged_copy() {
        let (dir, layout, codec) = setup();
        let sh = create(dir.path(), &layout, codec);
        sh.write(2, 7, &entry(70, 1));
        sh.write(2, 7, &entry(70, 2));
        // The second update's copy into the table was cut short.
        tear(dir.path(), table_at(&sh, 7) + 8, &[0xee; 4]);
        let got = load(dir.path(), &layout, &codec).expect("load");
        assert_eq!(got[7], entry(70, 2));
    }

    #[test]
    fn a_torn_staged_copy_leaves_the_entry_as_it_was() {
        let (dir, layout, codec) = setup();
        let sh = create(dir.path(), &layout, codec);
        sh.write(1, 4, &entry(10, 1));
        // The next update of slot 4 died while staging: its table entry is
        // still the last complete one.
        tear(
            dir.path(),
            HEADER + (PREFIX + sh.entry_size) as u64 + 20,
            &[0xaa; 6],
        );
        let got = load(dir.path(), &layout, &codec).expect("load");
        assert_eq!(got[4], entry(10, 1));
    }

    #[test]
    fn the_newest_staged_copy_of_a_reused_slot_wins() {
        let (dir, layout, codec) = setup();
        let sh = create(dir.path(), &layout, codec);
        // Slot 5 freed under one shard, reused under another, which then
        // tears its table entry: the older staged copy (free) must not win.
        sh.write(0, 5, &entry(50, 1));
        sh.write(0, 5, &LineEntry::default());
        sh.write(3, 5, &entry(99, 4));
        tear(dir.path(), table_at(&sh, 5), &[0x11; 3]);
        let got = load(dir.path(), &layout, &codec).expect("load");
        assert_eq!(got[5], entry(99, 4));
        // With no whole copy of it anywhere, the shadow is refused (and the
        // on-disk metadata used), not half taken.
        tear(
            dir.path(),
            HEADER + 3 * (PREFIX + sh.entry_size) as u64 + 9,
            &[0x22; 2],
        );
        tear(dir.path(), HEADER + 9, &[0x22; 2]);
        let err = load(dir.path(), &layout, &codec).expect_err("damaged");
        assert!(err.contains("slot 5"), "{err}");
    }

    #[test]
    fn a_shadow_of_the_layout_before_staging_is_still_read() {
        let (dir, layout, codec) = setup();
        let es = layout.entry_size as usize;
        let mut data = vec![0u8; HEADER as usize + layout.nr_lines as usize * es];
        let h = header(MAGIC_V1, &UUID, 5, &layout, None);
        data[..h.len()].copy_from_slice(&h);
        for slot in 0..layout.nr_lines as usize {
            let e = if slot == 2 {
                entry(20, 1)
            } else {
                LineEntry::default()
            };
            codec.encode(
                slot as u32,
                &e,
                &mut data[HEADER as usize + slot * es..][..es],
            );
        }
        fs::write(path_for(dir.path(), &UUID), &data).expect("write");
        let got = load(dir.path(), &layout, &codec).expect("load");
        assert_eq!(got[2], entry(20, 1));
        data[HEADER as usize + 2 * es + 3] ^= 1;
        fs::write(path_for(dir.path(), &UUID), &data).expect("write");
        assert!(load(dir.path(), &layout, &codec).is_err());
    }
}
