//! The superblock: geometry, state, and the identity of the backend the cache
//! belongs to. Two copies are written alternately, each with a sequence number
//! and a checksum, so a torn superblock write always leaves one good copy.

use super::codec::{Decoder, Encoder};
use super::layout::{FormatVersion, Layout};
use super::{FormatError, SECTOR_SIZE};

pub const MAGIC: &[u8; 8] = b"UBLKCACH";
/// The newest format this build writes; it reads every version up to it.
pub const VERSION: u32 = 2;
pub const SB_BYTES: usize = 4096;
/// Format v2: several entries per line (copy-on-write versions), a metadata log
/// and two checkpoint tables. Set in every v2 superblock, so that a v1-only
/// build refuses the cache (by version and by this bit) instead of misreading it.
pub const INCOMPAT_VERSIONED_LOG: u32 = 1;
/// Format v2: the log may hold records of rounds that made only their FUA
/// writes and themselves durable, with no device flush
/// (`log::FLAG_UNFLUSHED`); recovery must check the data of every record
/// since the last completed flush, not only the newest one's. Set while a
/// server that writes them has the cache attached (a clean detach writes a
/// checkpoint and clears it), so that a build that does not know them
/// refuses a crashed cache instead of trusting their data.
pub const INCOMPAT_UNFLUSHED_RECORDS: u32 = 2;
/// Both formats: the cache is attached by a server whose crash shadow has
/// staged copies (`engine::shadow`), a layout that earlier builds do not
/// read. Set at attach, cleared at a clean detach (which removes the shadow),
/// so that an earlier build refuses a crashed cache instead of ignoring the
/// shadow and losing the writes acknowledged since the last FLUSH.
pub const INCOMPAT_STAGED_SHADOW: u32 = 4;
/// Incompatible features this build understands.
pub const KNOWN_INCOMPAT: u32 =
    INCOMPAT_VERSIONED_LOG | INCOMPAT_UNFLUSHED_RECORDS | INCOMPAT_STAGED_SHADOW;

const KIND_CAP: usize = 16;
const NAME_CAP: usize = 1024;
const FP_CAP: usize = 256;
const MARKER_CAP: usize = 256;
/// Encoded length before the checksum; every field is fixed-size.
const BODY_LEN: usize = 120 + KIND_CAP + NAME_CAP + 8 + FP_CAP + MARKER_CAP;
/// Format v2 adds the log and checkpoint fields after the v1 body.
const BODY_LEN_V2: usize = BODY_LEN + 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbState {
    /// Detached cleanly: metadata is complete and (in back mode) nothing is dirty
    /// unless `dirty_lines` says so.
    Clean,
    /// A server has it attached, or crashed while attached.
    Active,
}

impl SbState {
    fn code(self) -> u32 {
        match self {
            SbState::Clean => 1,
            SbState::Active => 2,
        }
    }

    fn from_code(c: u32) -> Result<Self, FormatError> {
        match c {
            1 => Ok(SbState::Clean),
            2 => Ok(SbState::Active),
            other => Err(FormatError::Field {
                field: "state",
                problem: format!("unknown state {other}"),
            }),
        }
    }
}

/// The backend a cache belongs to, as recorded in the superblock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendRecord {
    pub kind: String,
    pub name: String,
    pub size: u64,
    pub fingerprint: String,
    /// The backend's change marker taken after our last flush at clean detach
    /// (an mtime, an RBD snapshot); empty if the backend has none. Compared at
    /// attach to find writes made behind our back.
    pub change_marker: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub uuid: [u8; 16],
    pub incompat: u32,
    pub compat: u32,
    pub layout: Layout,
    pub cache_bytes: u64,
    pub state: SbState,
    pub mode: u32,
    /// Write-back epoch in force at the last persist.
    pub epoch: u64,
    /// How many times the cache was attached (for logs and coherency markers).
    pub attach_gen: u64,
    pub backend: BackendRecord,
    /// Format v2 only (zero in v1): which table copy holds the last checkpoint,
    /// the sequence number of the last log record it includes, where the log
    /// records after it begin (block index), the write-back watermark (every
    /// version of an epoch up to it is on the backend), and since which epoch,
    /// if any, the backend alone is not a flush-point state (0: it is).
    pub active_table: u32,
    pub ckpt_seq: u64,
    pub log_start: u32,
    pub flushed_epoch: u64,
    pub order_broken_since: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; SB_BYTES];
        let mut e = Encoder::new(&mut buf);
        let v2 = self.layout.version() == FormatVersion::V2;
        e.bytes(MAGIC);
        e.u32(if v2 { 2 } else { 1 });
        e.u32(self.incompat);
        e.u32(self.compat);
        e.u32(SECTOR_SIZE);
        e.u64(self.seq);
        e.bytes(&self.uuid);
        e.u32(self.layout.line_size);
        e.u32(self.layout.entry_size);
        e.u64(self.layout.nr_lines);
        e.u64(self.layout.meta_offset);
        e.u64(self.layout.meta_len);
        e.u64(self.layout.data_offset);
        e.u64(self.cache_bytes);
        e.u32(self.state.code());
        e.u32(self.mode);
        e.u64(self.epoch);
        e.u64(self.attach_gen);
        e.fixed_str(&self.backend.kind, KIND_CAP);
        e.fixed_str(&self.backend.name, NAME_CAP);
        e.u64(self.backend.size);
        e.fixed_str(&self.backend.fingerprint, FP_CAP);
        e.fixed_str(&self.backend.change_marker, MARKER_CAP);
        if v2 {
            e.u32(self.active_table);
            e.u32(0);
            e.u64(self.layout.log_len);
            e.u64(self.ckpt_seq);
            e.u32(self.log_start);
            e.u32(0);
            e.u64(self.flushed_epoch);
            e.u64(self.order_broken_since);
        }
        let end = e.pos();
        debug_assert_eq!(end, if v2 { BODY_LEN_V2 } else { BODY_LEN });
        let crc = crc32c::crc32c(&buf[..end]);
        buf[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decode and validate one copy.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut d = Decoder::new(buf);
        if d.bytes(8)? != MAGIC {
            return Err(FormatError::NoMagic);
        }
        let version = d.u32()?;
        let incompat = d.u32()?;
        let compat = d.u32()?;
        let sector = d.u32()?;
        let seq = d.u64()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(d.bytes(16)?);
        let line_size = d.u32()?;
        let entry_size = d.u32()?;
        let nr_lines = d.u64()?;
        let meta_offset = d.u64()?;
        let meta_len = d.u64()?;
        let data_offset = d.u64()?;
        let cache_bytes = d.u64()?;
        let state = d.u32()?;
        let mode = d.u32()?;
        let epoch = d.u64()?;
        let attach_gen = d.u64()?;
        let kind = d.fixed_str(KIND_CAP, "backend kind")?;
        let name = d.fixed_str(NAME_CAP, "backend name")?;
        let bsize = d.u64()?;
        let fingerprint = d.fixed_str(FP_CAP, "backend fingerprint")?;
        let change_marker = d.fixed_str(MARKER_CAP, "backend change marker")?;
        let v2 = version == 2;
        let (mut active_table, mut log_len, mut ckpt_seq, mut log_start) = (0, 0, 0, 0);
        let (mut flushed_epoch, mut order_broken_since) = (0, 0);
        if v2 {
            active_table = d.u32()?;
            d.u32()?;
            log_len = d.u64()?;
            ckpt_seq = d.u64()?;
            log_start = d.u32()?;
            d.u32()?;
            flushed_epoch = d.u64()?;
            order_broken_since = d.u64()?;
        }
        let end = d.pos();
        let stored = d.u32()?;
        if crc32c::crc32c(&buf[..end]) != stored {
            return Err(FormatError::Checksum {
                what: "superblock".into(),
            });
        }
        // Checksum first, then meaning: a version we do not know is reported as
        // such only when the bytes are intact.
        if !(1..=VERSION).contains(&version) {
            return Err(FormatError::Version {
                found: version,
                supported: VERSION,
            });
        }
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(FormatError::Features(incompat & !KNOWN_INCOMPAT));
        }
        if v2 != (incompat & INCOMPAT_VERSIONED_LOG != 0)
            || (!v2 && incompat & INCOMPAT_UNFLUSHED_RECORDS != 0)
        {
            return Err(FormatError::Field {
                field: "incompatible features",
                problem: format!("{incompat:#x} does not match format version {version}"),
            });
        }
        if active_table > 1 {
            return Err(FormatError::Field {
                field: "active table",
                problem: format!("{active_table}, expected 0 or 1"),
            });
        }
        if sector != SECTOR_SIZE {
            return Err(FormatError::Field {
                field: "sector size",
                problem: format!("{sector}, expected {SECTOR_SIZE}"),
            });
        }
        let layout = Layout {
            line_size,
            nr_lines,
            entry_size,
            meta_offset,
            meta_len,
            tables: if v2 { 2 } else { 1 },
            log_len,
            data_offset,
        };
        Self::check_layout(&layout, cache_bytes)?;
        if v2 && log_start >= layout.log_blocks() {
            return Err(FormatError::Field {
                field: "log start",
                problem: format!(
                    "block {log_start} past the log's {} blocks",
                    layout.log_blocks()
                ),
            });
        }
        Ok(Self {
            seq,
            uuid,
            incompat,
            compat,
            layout,
            cache_bytes,
            state: SbState::from_code(state)?,
            mode,
            epoch,
            attach_gen,
            backend: BackendRecord {
                kind,
                name,
                size: bsize,
                fingerprint,
                change_marker,
            },
            active_table,
            ckpt_seq,
            log_start,
            flushed_epoch,
            order_broken_since,
        })
    }

    /// A checksummed superblock can still describe an impossible geometry (a bug
    /// in whoever wrote it); recompute it rather than trust it.
    fn check_layout(l: &Layout, cache_bytes: u64) -> Result<(), FormatError> {
        Layout::check_line_size(l.line_size)?;
        let expect = Layout::for_cache_as(l.version(), l.line_size, cache_bytes)?;
        if expect != *l {
            return Err(FormatError::Field {
                field: "layout",
                problem: format!(
                    "{l:?} does not match the geometry of a {cache_bytes}-byte cache ({expect:?})"
                ),
            });
        }
        Ok(())
    }

    /// Offset of the copy this superblock is written to (alternating by sequence).
    pub fn copy_offset(&self) -> u64 {
        super::layout::SB_COPY_OFFSETS[(self.seq % 2) as usize]
    }

    /// Pick the newest intact copy. `NoMagic` only if neither copy has the magic;
    /// otherwise the error of the best copy.
    pub fn choose(a: &[u8], b: &[u8]) -> Result<Self, FormatError> {
        match (Self::decode(a), Self::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if y.seq > x.seq { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(FormatError::NoMagic), Err(e)) | (Err(e), Err(_)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            seq: 7,
            uuid: [9; 16],
            incompat: 0,
            compat: 0,
            layout: Layout::for_cache(65536, 64 << 20).unwrap(),
            cache_bytes: 64 << 20,
            state: SbState::Active,
            mode: 3,
            epoch: 42,
            attach_gen: 3,
            backend: BackendRecord {
                kind: "file".into(),
                name: "/var/lib/one/disk.0".into(),
                size: 1 << 30,
                fingerprint: "dev=2049,ino=12".into(),
                change_marker: "mtime:123".into(),
            },
            active_table: 0,
            ckpt_seq: 0,
            log_start: 0,
            flushed_epoch: 0,
            order_broken_since: 0,
        }
    }

    fn sample_v2() -> Superblock {
        Superblock {
            incompat: INCOMPAT_VERSIONED_LOG,
            layout: Layout::for_cache_as(FormatVersion::V2, 65536, 64 << 20).unwrap(),
            active_table: 1,
            ckpt_seq: 77,
            log_start: 5,
            flushed_epoch: 40,
            order_broken_since: 12,
            ..sample()
        }
    }

    #[test]
    fn v2_round_trips_and_v1_stays_readable() {
        let sb = sample_v2();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        // A v2 superblock without its feature bit, or v1 with it, is refused.
        let mut bad = sb.clone();
        bad.incompat = 0;
        assert!(Superblock::decode(&bad.encode()).is_err());
        let mut bad = sample();
        bad.incompat = INCOMPAT_VERSIONED_LOG;
        assert!(Superblock::decode(&bad.encode()).is_err());
        assert_eq!(Superblock::decode(&sample().encode()).unwrap(), sample());
    }

    #[test]
    fn round_trips() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let enc = sample().encode();
        for i in (0..600).step_by(7) {
            let mut b = enc.clone();
            b[i] ^= 0x40;
            assert!(Superblock::decode(&b).is_err(), "byte {i}");
        }
    }

    #[test]
    fn newest_intact_copy_wins_and_torn_copy_is_ignored() {
        let old = sample();
        let mut new = sample();
        new.seq = 8;
        new.epoch = 50;
        assert_eq!(
            Superblock::choose(&old.encode(), &new.encode()).unwrap(),
            new
        );
        let mut torn = new.encode();
        torn[100] ^= 1;
        assert_eq!(Superblock::choose(&old.encode(), &torn).unwrap(), old);
        assert_eq!(
            Superblock::choose(&[0; SB_BYTES], &[0; SB_BYTES]).unwrap_err(),
            FormatError::NoMagic
        );
    }

    #[test]
    fn newer_version_and_features_are_named() {
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        fix_crc(&mut b);
        assert!(matches!(
            Superblock::decode(&b),
            Err(FormatError::Version { found: 3, .. })
        ));
        let mut sb = sample();
        sb.incompat = 0x10;
        assert_eq!(
            Superblock::decode(&sb.encode()).unwrap_err(),
            FormatError::Features(0x10)
        );
    }

    fn fix_crc(b: &mut [u8]) {
        let crc = crc32c::crc32c(&b[..BODY_LEN]);
        b[BODY_LEN..BODY_LEN + 4].copy_from_slice(&crc.to_le_bytes());
    }
}
