//! Attaching a cache device: format a new one, or validate and load an existing
//! one (refusing anything corrupt or foreign), recover after a crash, and detach.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use policies::{
    BackendPriority, CacheMode, DirtyController, DirtyLevel, EvictionKind, Pacer, WritebackLimit,
    WritebackOrder,
};
use rbd_backend::{Backend, BackendChanges, BlockIo};
use tracing::{info, warn};

use super::map::LineMap;
use super::persist::{encode_block, PersistCtl};
use super::recover::{self, LogReplay};
use super::shadow::Shadow;
use super::slots::{Rec, SlotTable, NO_SLOT};
use super::state::LogState;
use super::state::{Alloc, AtomicBits, Epochs, State};
use super::store::{read_superblock, write_superblock, CacheStore};
use super::sync::Gate;
use super::{bits, Cache, Engine, Events, Stats};
use crate::error::{EngineError, EngineErrorKind, EngineResult, Remedy};
use crate::format::superblock::BackendRecord;
use crate::format::{
    EntryCodec, FormatError, FormatVersion, Layout, LineEntry, SbState, Superblock, META_BLOCK,
    SECTOR_SIZE,
};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub mode: CacheMode,
    pub order: WritebackOrder,
    /// Line size for a new cache; `None` takes an existing cache's (64 KiB when new).
    pub line_size: Option<u32>,
    /// Bytes of the cache device to use; `None` uses all of it (or the existing
    /// cache's size).
    pub cache_bytes: Option<u64>,
    /// Format the cache device even though it holds data that is not ours.
    pub format: bool,
    /// Drop dirty data instead of refusing. Loses every write not yet on the backend.
    pub discard_dirty: bool,
    /// Keep dirty data (and write it back) even though the backend changed since
    /// the cache detached; clean data is dropped.
    pub accept_backend_change: bool,
    /// Drop all clean cached data at attach (a live-migration destination: the
    /// source may write the backend until switchover); refuse dirty data.
    pub cold_start: bool,
    /// The on-disk format of a cache formatted now (an existing cache keeps its
    /// own). Format v1 exists for tests of the upgrade path.
    pub format_version: FormatVersion,
    /// Test-only fault: trust the newest log record without checking its
    /// data's checksums. The crash harness must catch it.
    #[doc(hidden)]
    pub skip_log_checksums_for_tests: bool,
    /// Test-only fault: check only the newest record's data, as before
    /// rounds for FUA writes flushed nothing. The crash harness must catch it.
    #[doc(hidden)]
    pub check_only_newest_record_for_tests: bool,
    /// Where the crash shadow lives: a tmpfs directory (see `shadow`).
    pub shadow_dir: std::path::PathBuf,
    /// Which clean line to give up when space is needed.
    pub eviction: EvictionKind,
    /// How fast background write-back may go (a drain asked for, at stop, a
    /// mode switch or `ctl flush`, is not paced).
    pub writeback_limit: WritebackLimit,
    /// Pace background write-back by the dirty level between these
    /// watermarks (`None`: only by `writeback_limit`).
    pub dirty_level: Option<DirtyLevel>,
    /// Whether write-back makes way for the guest's backend reads.
    pub backend_priority: BackendPriority,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mode: CacheMode::Back,
            order: WritebackOrder::Ordered,
            line_size: None,
            cache_bytes: None,
            format: false,
            discard_dirty: false,
            accept_backend_change: false,
            cold_start: false,
            format_version: FormatVersion::V2,
            skip_log_checksums_for_tests: false,
            check_only_newest_record_for_tests: false,
            shadow_dir: super::shadow::DEFAULT_DIR.into(),
            eviction: EvictionKind::default(),
            writeback_limit: WritebackLimit::default(),
            dirty_level: None,
            backend_priority: BackendPriority::default(),
        }
    }
}

pub const DEFAULT_LINE_SIZE: u32 = 64 * 1024;
/// Bytes at the start of a device that must be zero before we format it unasked.
const EMPTY_PROBE: u64 = 1024 * 1024;

fn refuse(kind: EngineErrorKind, msg: impl Into<String>) -> EngineError {
    EngineError::new(kind, msg)
}

fn backend_record(b: &dyn Backend) -> BackendRecord {
    let id = b.identity();
    BackendRecord {
        kind: id.kind,
        name: id.name,
        size: id.size,
        fingerprint: id.fingerprint,
        change_marker: String::new(),
    }
}

fn random_uuid() -> [u8; 16] {
    uuid::Uuid::new_v4().into_bytes()
}

/// Give the heap's free memory back to the system once attached. Attach reads
/// the table and builds the first round in large buffers (about a MiB per GiB
/// of cache); glibc keeps freed memory in its heap, so the server would hold
/// that much for its whole life for nothing (see the metadata-ram bench).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_freed_heap() {
    // SAFETY: FFI without arguments to pass: malloc_trim only walks and
    // shrinks glibc's own free lists, under its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_heap() {}

impl Engine {
    /// Attach `cache_dev` (if any) in front of `backend` and start serving.
    pub fn open(
        backend: Arc<dyn Backend>,
        cache_dev: Option<Arc<dyn BlockIo>>,
        cfg: EngineConfig,
    ) -> EngineResult<Arc<Engine>> {
        let size = backend.size();
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(refuse(
                EngineErrorKind::Config,
                format!("backend size {size} is not a positive multiple of 4096 bytes"),
            ));
        }
        if let Some(l) = cfg.dirty_level {
            l.check().map_err(|e| {
                refuse(
                    EngineErrorKind::Config,
                    format!("write-back dirty-level control: {e}"),
                )
            })?;
        }
        let cache = match cache_dev {
            Some(dev) => Some(Self::attach_cache(backend.as_ref(), dev, &cfg)?),
            None if cfg.mode.uses_cache() => {
                return Err(refuse(
                    EngineErrorKind::Config,
                    format!("mode '{}' needs a cache device", cfg.mode),
                ))
            }
            None => None,
        };
        let engine = Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            mode: AtomicU32::new(cfg.mode.code()),
            gate: Gate::default(),
            switch_lock: Mutex::new(()),
            hydrated: AtomicBool::new(false),
            started_offline: cfg.mode == CacheMode::Offline,
            writeback_failing: AtomicBool::new(false),
            warned_ordering: AtomicBool::new(false),
            born: std::time::Instant::now(),
            writeback_progress_ms: AtomicU64::new(0),
            guest_durability_us: AtomicU64::new(0),
            order: cfg.order,
            pacer: Mutex::new(Pacer::new(cfg.writeback_limit)),
            paced_until_ms: AtomicU64::new(0),
            control: Mutex::new(cfg.dirty_level.and_then(|l| {
                let c = cache.as_ref()?;
                Some(DirtyController::new(
                    l,
                    c.layout.nr_lines * c.layout.line_size as u64,
                ))
            })),
            held_back: AtomicBool::new(false),
            backend_priority: cfg.backend_priority,
            guest_backend_reads: AtomicU32::new(0),
            writeback_writes: AtomicU32::new(0),
            guest_read_end_us: AtomicU64::new(0),
            backend,
            size,
            cache,
            stats: Stats::default(),
            flusher: Mutex::new(None),
            closed: AtomicBool::new(false),
            io_trace: std::sync::OnceLock::new(),
            boot_recorder: std::sync::OnceLock::new(),
            boot_replay: std::sync::OnceLock::new(),
            #[cfg(feature = "testing")]
            reverse_writeback_for_tests: AtomicBool::new(false),
        });
        engine.start_flusher()?;
        if let Some(c) = engine.cache.as_ref() {
            let dirty = c.st.dirty_lines();
            if dirty > 0 && !cfg.mode.holds_dirty() {
                info!(dirty_lines = dirty, mode = %cfg.mode, "writing back dirty data left by an earlier mode before serving");
                engine.drain()?;
            }
            if !cfg.mode.uses_cache() {
                // Pass-through writes would make any cached data stale.
                engine.drop_clean_lines();
            }
            engine.persist_blocking()?;
            return_freed_heap();
        }
        Ok(engine)
    }

    fn attach_cache(
        backend: &dyn Backend,
        dev: Arc<dyn BlockIo>,
        cfg: &EngineConfig,
    ) -> EngineResult<Cache> {
        let dev_size = dev.size();
        let rec = backend_record(backend);
        let sb = match read_superblock(dev.as_ref())? {
            Ok(sb) => {
                if cfg.format {
                    return Err(refuse(
                        EngineErrorKind::Config,
                        "the cache device holds a ublk-cache; formatting re-creates only caches that are unreadable or \
                         foreign. To start over, detach cleanly and delete or wipe the cache first",
                    ));
                }
                Self::validate(&sb, &rec, dev_size, cfg)?
            }
            Err(FormatError::NoMagic) => {
                if !cfg.format && !Self::looks_empty(dev.as_ref())? {
                    return Err(refuse(
                        EngineErrorKind::NotEmpty,
                        "the cache device has no ublk-cache superblock and its first MiB is not empty",
                    )
                    .with_remedies(&[Remedy::Format]));
                }
                Self::format(&dev, dev_size, &rec, cfg)?
            }
            Err(e) if cfg.format => {
                warn!("re-formatting the cache device as requested (it was unreadable: {e})");
                Self::format(&dev, dev_size, &rec, cfg)?
            }
            Err(e) => {
                return Err(EngineError::corrupt(
                    "the cache superblock is unreadable (no copy is intact); refusing to use it",
                    e,
                )
                .with_remedies(&[Remedy::Format]))
            }
        };
        let layout = sb.layout;
        let capacity = layout.nr_lines * layout.line_size as u64;
        if cfg.mode == CacheMode::Offline && capacity < backend.size() {
            return Err(EngineError::offline_capacity(capacity, backend.size()));
        }
        let codec = EntryCodec::new(layout.entry_size, layout.spl(), &sb.uuid);
        let store = CacheStore::new(Arc::clone(&dev), layout);
        let backend_lines = backend.size().div_ceil(layout.line_size as u64);
        let version = layout.version();
        let (entries, replay) = match version {
            FormatVersion::V1 => (
                super::recover::load_table(&store, &codec, &layout, 0)?,
                LogReplay::default(),
            ),
            FormatVersion::V2 => recover::load_v2(&store, &codec, &layout, &sb)?,
        };
        let mut entries = Some(entries);
        // After a daemon crash (not a power cut) the shadow holds every entry
        // change up to the last acknowledged request.
        let mut from_shadow = false;
        let mut source = "cache metadata";
        if sb.state == SbState::Active {
            match Shadow::load(&cfg.shadow_dir, &sb.uuid, sb.attach_gen, &layout, &codec) {
                Ok(Some(e)) => {
                    entries = Some(e);
                    source = "the crash shadow";
                    from_shadow = true;
                }
                Ok(None) => {}
                Err(why) => warn!(
                    "crash shadow not used ({why}); using the on-disk metadata of the last flush"
                ),
            }
        }
        let mut entries = entries.expect("entries loaded");
        let check = !from_shadow && !cfg.skip_log_checksums_for_tests;
        let mut replay = replay;
        if cfg.check_only_newest_record_for_tests {
            let older = replay.unconfirmed.len().saturating_sub(1);
            replay.unconfirmed.drain(..older);
        }
        if check && !replay.unconfirmed.is_empty() {
            // A power cut (or a stop) after rounds that no completed flush is
            // known to cover: keep only the data that did arrive.
            let dropped =
                recover::verify_unconfirmed(&store, &layout, &replay.unconfirmed, &mut entries)?;
            if dropped > 0 {
                warn!(
                    sectors = dropped,
                    "metadata records name data that did not reach the cache device (a power cut before a \
                     flush of the cache device covered it): those writes were not yet promised and are \
                     dropped; older data is kept"
                );
            }
        }
        let recs = Self::recs_from_entries(entries, backend_lines, source, version)?;
        if from_shadow && version == FormatVersion::V1 {
            // Make the disk agree with the shadow before anything else: the shadow
            // is replaced below, and free slots must be durably free before reuse.
            store.sync()?;
            let mut buf = vec![0u8; META_BLOCK as usize];
            for b in 0..layout.meta_blocks() as u32 {
                encode_block(&codec, &layout, |s| recs[s as usize].entry(), b, &mut buf);
                store.write_meta_block(b, &buf)?;
            }
            store.sync()?;
        }
        let flushed = replay.flushed_epoch.max(sb.flushed_epoch);
        let state = Self::build_state(
            &recs,
            &layout,
            sb.epoch.max(replay.cur_epoch),
            flushed,
            cfg.eviction,
        );
        if version == FormatVersion::V2 {
            let mut log = state.log.lock();
            *log = LogState {
                seq: replay.seq,
                ckpt_seq: sb.ckpt_seq,
                active_table: sb.active_table,
                start: sb.log_start,
                head: replay.head,
                used: replay.used,
                // The recovered state is written whole before serving.
                must_checkpoint: true,
                unsure: None,
            };
            state
                .order_broken_since
                .store(replay.order_broken_since, Ordering::Release);
            state
                .order_broken_durable
                .store(replay.order_broken_since != 0, Ordering::Release);
        }
        let dirty = state.dirty_lines();
        let clean_detach = sb.state == SbState::Clean;
        // Only a clean detach recorded a marker; after a crash our own unfinished
        // writes changed the backend anyway, and dirty data must win.
        let changes = if clean_detach && !sb.backend.change_marker.is_empty() {
            match backend.change_tracking() {
                Some(t) => t
                    .changes_since(&sb.backend.change_marker)
                    .map_err(|e| EngineError::backend("change check", e))?,
                // A marker was recorded, but this backend cannot compare it:
                // anything may have changed.
                None => BackendChanges::Unknown,
            }
        } else {
            BackendChanges::Unchanged
        };
        let changed_ranges: Option<Vec<(u64, u64)>> = match &changes {
            BackendChanges::Unchanged => None,
            BackendChanges::Ranges(r) => Some(r.clone()),
            BackendChanges::Unknown => Some(vec![(0, backend.size())]),
        };
        if let Some(ranges) = &changed_ranges {
            let ls = layout.line_size as u64;
            let dirty_hit = state.mapped_slots().into_iter().any(|slot| {
                let r = state.slots.get(slot);
                let t = r.tag;
                r.is_dirty()
                    && ranges
                        .iter()
                        .any(|&(o, n)| t * ls < o.saturating_add(n) && o < (t + 1) * ls)
            });
            if dirty_hit && !cfg.discard_dirty && !cfg.accept_backend_change {
                return Err(refuse(
                    EngineErrorKind::DirtyData,
                    format!(
                        "the backend was modified since this cache detached, and the cache holds dirty data \
                         ({dirty} lines) for changed ranges"
                    ),
                )
                .with_remedies(&[Remedy::AcceptBackendChange, Remedy::DiscardDirty]));
            }
        }
        if cfg.discard_dirty && dirty > 0 {
            warn!(
                dirty_lines = dirty,
                "discarding dirty data as requested: these writes are lost"
            );
            for slot in state.mapped_slots() {
                let r = state.slots.get(slot);
                if r.is_dirty() {
                    let mut sh = state.map.shard(r.tag).write();
                    let new = Rec {
                        valid: bits::and_not(&r.valid, &r.dirty),
                        dirty: bits::none(),
                        epoch: if version == FormatVersion::V2 {
                            r.epoch
                        } else {
                            0
                        },
                        ..r
                    };
                    if bits::is_empty(&new.valid) {
                        state.remove_version(&mut sh, slot);
                    } else {
                        state.set_rec(&mut sh, slot, new, true);
                    }
                }
            }
        }
        if cfg.cold_start {
            if state.dirty_lines() > 0 {
                return Err(refuse(
                    EngineErrorKind::DirtyData,
                    format!(
                        "a migration destination: this cache holds dirty data ({} lines) from an earlier server \
                         that did not write it back, and the source host may have written the same disk since. \
                         Refusing to serve it",
                        state.dirty_lines()
                    ),
                )
                .with_remedies(&[Remedy::DiscardDirty]));
            }
            // The source keeps writing to the backend until switchover, so no
            // clean data cached here before can be trusted.
            info!(
                cached_lines = state.map.len(),
                "migration destination: starting with a cold cache"
            );
            Self::drop_clean_in(&state);
        }
        if from_shadow {
            info!(
                dirty_lines = state.dirty_lines(),
                "recovering from a daemon crash with the crash shadow: every acknowledged write is kept"
            );
        } else if !clean_detach {
            warn!(
                dirty_lines = state.dirty_lines(),
                "the cache was not detached cleanly and no crash shadow is left (power cut?): keeping dirty data \
                 from the last flush, dropping clean data"
            );
            Self::drop_clean_in(&state);
        } else if let Some(ranges) = &changed_ranges {
            warn!(
                ranges = ranges.len(),
                "the backend was modified since this cache detached: dropping clean cached data of the changed ranges"
            );
            Self::drop_clean_ranges(&state, layout.line_size as u64, ranges);
        }
        let mut sb = sb;
        let shadow = Shadow::create(
            &cfg.shadow_dir,
            &sb.uuid,
            sb.attach_gen + 1,
            &layout,
            codec,
            super::map::SHARDS,
            (0..layout.nr_lines as u32).map(|s| state.entry_of(&state.slots.get(s))),
        );
        match shadow {
            Ok(sh) => *state.shadow.write() = Some(sh),
            Err(e) if cfg.mode.holds_dirty() => {
                return Err(refuse(
                    EngineErrorKind::Config,
                    format!(
                        "cannot create the crash shadow in {} ({e}); in {} mode it is what keeps acknowledged \
                         writes across a daemon crash",
                        cfg.shadow_dir.display(),
                        cfg.mode
                    ),
                )
                .with_remedies(&[Remedy::ShadowDir]))
            }
            Err(e) => warn!("no crash shadow ({e}); clean cached data is dropped after a daemon crash"),
        }
        sb.state = SbState::Active;
        // Until a clean detach, a crash leaves a shadow of the staged layout.
        sb.incompat |= crate::format::superblock::INCOMPAT_STAGED_SHADOW;
        if version == FormatVersion::V2 {
            // From now on the log may hold rounds that flushed nothing.
            sb.incompat |= crate::format::superblock::INCOMPAT_UNFLUSHED_RECORDS;
        }
        sb.seq += 1;
        sb.attach_gen += 1;
        sb.mode = cfg.mode.code();
        sb.epoch = state.cur_epoch();
        // Mark the cache in use before serving, so a crash from here on is seen
        // as one at the next attach.
        store.sync()?;
        write_superblock(dev.as_ref(), &sb)?;
        info!(
            lines = layout.nr_lines,
            line_size = layout.line_size,
            cached = state.map.len(),
            dirty = state.dirty_lines(),
            attach = sb.attach_gen,
            "cache attached"
        );
        Ok(Cache {
            store,
            layout,
            codec,
            st: state,
            ev: Events::default(),
            persist: PersistCtl::default(),
            refilling: AtomicBool::new(false),
            sb: Mutex::new(sb),
        })
    }

    fn validate(
        sb: &Superblock,
        rec: &BackendRecord,
        dev_size: u64,
        cfg: &EngineConfig,
    ) -> EngineResult<Superblock> {
        let mism = |m: String| refuse(EngineErrorKind::Mismatch, m);
        if let Some(ls) = cfg.line_size {
            if ls != sb.layout.line_size {
                return Err(mism(format!(
                    "the cache was formatted with {}-byte lines, but {ls} was requested",
                    sb.layout.line_size
                )));
            }
        }
        if let Some(cb) = cfg.cache_bytes {
            if cb != sb.cache_bytes {
                return Err(mism(format!(
                    "the cache was formatted with a size of {} bytes, but {cb} was requested",
                    sb.cache_bytes
                )));
            }
        }
        if sb.cache_bytes > dev_size {
            return Err(mism(format!(
                "the cache device is {dev_size} bytes, smaller than the {} bytes it was formatted with",
                sb.cache_bytes
            )));
        }
        let b = &sb.backend;
        let mut diffs = Vec::new();
        if b.kind != rec.kind || b.name != rec.name {
            diffs.push(format!(
                "it belongs to {}:{}, not {}:{}",
                b.kind, b.name, rec.kind, rec.name
            ));
        }
        if b.fingerprint != rec.fingerprint {
            diffs.push(format!(
                "backend identity was '{}', now '{}'",
                b.fingerprint, rec.fingerprint
            ));
        }
        if b.size != rec.size {
            diffs.push(format!(
                "backend size was {} bytes, now {}",
                b.size, rec.size
            ));
        }
        if !diffs.is_empty() {
            return Err(mism(format!(
                "this cache belongs to another backend: {}",
                diffs.join("; ")
            )));
        }
        Ok(sb.clone())
    }

    fn looks_empty(dev: &dyn BlockIo) -> EngineResult<bool> {
        let n = EMPTY_PROBE.min(dev.size()) as usize;
        let mut buf = vec![0u8; n];
        dev.read_at(0, &mut buf)
            .map_err(|e| EngineError::cache("read while checking that it is empty", e))?;
        Ok(buf.iter().all(|&b| b == 0))
    }

    fn format(
        dev: &Arc<dyn BlockIo>,
        dev_size: u64,
        rec: &BackendRecord,
        cfg: &EngineConfig,
    ) -> EngineResult<Superblock> {
        let cache_bytes = cfg.cache_bytes.unwrap_or(dev_size);
        if cache_bytes > dev_size {
            return Err(refuse(
                EngineErrorKind::Config,
                format!(
                    "cache size {cache_bytes} is larger than the cache device ({dev_size} bytes)"
                ),
            ));
        }
        let layout = Layout::for_cache_as(
            cfg.format_version,
            cfg.line_size.unwrap_or(DEFAULT_LINE_SIZE),
            cache_bytes,
        )
        .map_err(|e| refuse(EngineErrorKind::Config, e.to_string()))?;
        let uuid = random_uuid();
        let codec = EntryCodec::new(layout.entry_size, layout.spl(), &uuid);
        if layout.version() == FormatVersion::V2 {
            let store = CacheStore::new(Arc::clone(dev), layout);
            recover::format_v2_meta(&store, &codec, &layout)?;
        }
        // Every entry is written as an explicit free entry: an all-zero block is
        // then recognisably corrupt, never "empty".
        let free = Rec::FREE.entry();
        let epb = layout.entries_per_block();
        let chunk_blocks = 256u32;
        let total = if layout.version() == FormatVersion::V1 {
            layout.meta_blocks() as u32
        } else {
            0
        };
        let mut b = 0u32;
        while b < total {
            let n = chunk_blocks.min(total - b);
            let mut buf = vec![0u8; (n * META_BLOCK) as usize];
            for i in 0..n * epb {
                let slot = b * epb + i;
                if (slot as u64) < layout.nr_lines {
                    let at = (i * layout.entry_size) as usize;
                    codec.encode(slot, &free, &mut buf[at..]);
                }
            }
            dev.write_at(layout.meta_block_offset(b), &buf)
                .map_err(|e| EngineError::cache("metadata write while formatting", e))?;
            b += n;
        }
        dev.flush()
            .map_err(|e| EngineError::cache("flush while formatting", e))?;
        let mut sb = Superblock {
            seq: 1,
            uuid,
            incompat: match layout.version() {
                FormatVersion::V1 => 0,
                FormatVersion::V2 => crate::format::superblock::INCOMPAT_VERSIONED_LOG,
            },
            compat: 0,
            layout,
            cache_bytes,
            state: SbState::Clean,
            mode: cfg.mode.code(),
            epoch: 0,
            attach_gen: 0,
            backend: rec.clone(),
            active_table: 0,
            ckpt_seq: 0,
            log_start: 0,
            flushed_epoch: 0,
            order_broken_since: 0,
        };
        // Both copies, so neither holds a stale superblock of an earlier format.
        write_superblock(dev.as_ref(), &sb)?;
        sb.seq = 2;
        write_superblock(dev.as_ref(), &sb)?;
        info!(
            lines = layout.nr_lines,
            line_size = layout.line_size,
            cache_bytes,
            "formatted the cache device"
        );
        Ok(sb)
    }

    /// Turn entries into slot records, checking what a checksum cannot: every
    /// mapped line lies inside the backend, and is mapped once (format v1) or
    /// once per epoch (format v2, whose versions are ordered by epoch).
    fn recs_from_entries(
        entries: Vec<LineEntry>,
        backend_lines: u64,
        source: &str,
        version: FormatVersion,
    ) -> EngineResult<Vec<Rec>> {
        let mut seen: HashSet<(u64, u64)> = HashSet::new();
        let mut recs = Vec::with_capacity(entries.len());
        for (slot, e) in entries.into_iter().enumerate() {
            let mut r = Rec::from_entry(&e);
            if bits::is_empty(&r.valid) {
                // A slot mapped but never filled is as good as free.
                r = Rec::FREE;
            }
            if !r.is_free() {
                let t = r.tag;
                if t >= backend_lines {
                    return Err(refuse(
                        EngineErrorKind::Corrupt,
                        format!("{source} is corrupt: slot {slot} maps line {t}, past the backend's end ({backend_lines} lines)"),
                    ));
                }
                let key = match version {
                    FormatVersion::V1 => (t, 0),
                    FormatVersion::V2 => (t, r.epoch),
                };
                if !seen.insert(key) {
                    return Err(refuse(
                        EngineErrorKind::Corrupt,
                        match version {
                            FormatVersion::V1 => format!(
                                "{source} is corrupt: backend line {t} is mapped twice (slot {slot})"
                            ),
                            FormatVersion::V2 => format!(
                                "{source} is corrupt: backend line {t} has two versions of epoch {} (slot {slot})",
                                r.epoch
                            ),
                        },
                    ));
                }
            }
            recs.push(r);
        }
        Ok(recs)
    }

    /// The in-memory state of loaded records. Format v2: the versions of a line
    /// are chained newest (highest epoch) first, and a version of an epoch the
    /// watermark covers is clean.
    fn build_state(
        recs: &[Rec],
        layout: &Layout,
        sb_epoch: u64,
        flushed: u64,
        eviction: EvictionKind,
    ) -> State {
        let n = recs.len();
        let version = layout.version();
        let st = State {
            slots: SlotTable::new(n, layout.spl()),
            map: Arc::new(LineMap::new()),
            snap: RwLock::new(()),
            alloc: Mutex::new(Alloc::default()),
            epochs: Mutex::new(Epochs::new(0)),
            evict: RwLock::new(eviction.builder().slots(n).build()),
            meta_dirty: AtomicBits::new(layout.meta_blocks() as usize),
            cleaned: AtomicBits::new(n),
            entries_per_block: layout.entries_per_block(),
            shadow: RwLock::new(None),
            valid_sectors: AtomicI64::new(0),
            dirty_sectors: AtomicI64::new(0),
            dirty_lines: AtomicI64::new(0),
            stopping: AtomicBool::new(false),
            drain_requests: AtomicU32::new(0),
            space_waiters: AtomicU32::new(0),
            version,
            flushed: AtomicU64::new(flushed),
            flushed_durable: AtomicU64::new(flushed),
            // Raised by the first metadata round (attach ends with a checkpoint).
            durable_below: AtomicU64::new(0),
            order_broken_since: AtomicU64::new(0),
            order_broken_durable: AtomicBool::new(false),
            slot_changed: AtomicBits::new(n),
            fresh: Mutex::new(HashMap::new()),
            table_stale: [
                AtomicBits::new(layout.meta_blocks() as usize),
                AtomicBits::new(layout.meta_blocks() as usize),
            ],
            log: Mutex::new(LogState::default()),
        };
        let mut max_epoch = sb_epoch.max(flushed);
        let mut free = Vec::new();
        // Versions of each line, newest first.
        let mut lines: HashMap<u64, Vec<u32>> = HashMap::new();
        // Free slots are handed out from the end of `free`: reverse so the
        // lowest slots are used first (a nicer layout to look at, nothing more).
        for slot in (0..n as u32).rev() {
            let r = recs[slot as usize];
            if r.is_free() {
                free.push(slot);
            } else {
                lines.entry(r.tag).or_default().push(slot);
                max_epoch = max_epoch.max(r.epoch);
            }
        }
        for (tag, mut versions) in lines {
            versions.sort_by_key(|&s| std::cmp::Reverse(recs[s as usize].epoch));
            let mut sh = st.map.shard(tag).write();
            // Link oldest first, so every set_rec sees its final chain.
            for (i, &slot) in versions.iter().enumerate().rev() {
                let next = versions.get(i + 1).copied().unwrap_or(NO_SLOT);
                let mut r = recs[slot as usize];
                r.next = next;
                if version == FormatVersion::V2 && r.epoch <= flushed {
                    r.dirty = bits::none();
                }
                st.slots.put(
                    slot,
                    &Rec {
                        tag,
                        next,
                        ..Rec::FREE
                    },
                );
                if i == 0 {
                    sh.set_head(&st.slots, tag, slot);
                }
                st.set_rec(&mut sh, slot, r, false);
            }
        }
        st.alloc.lock().free = free;
        st.epochs.lock().open(max_epoch + 1);
        // Loading is not a change: the metadata on disk says all this already.
        st.meta_dirty.clear_all();
        st.slot_changed.take();
        if version == FormatVersion::V2 {
            // Neither table copy holds this state (the active one lacks the log,
            // the other is older still): the first checkpoint writes all of it.
            for t in &st.table_stale {
                for b in 0..layout.meta_blocks() as u32 {
                    t.set(b);
                }
            }
        }
        st
    }

    /// Drop clean data of every line; dirty lines keep their dirty sectors only.
    pub(super) fn drop_clean_in(st: &State) {
        Self::drop_clean_where(st, |_| true);
    }

    /// Drop clean data of lines overlapping `ranges` (the caller has decided
    /// that dirty data wins over the backend's changes).
    fn drop_clean_ranges(st: &State, line_size: u64, ranges: &[(u64, u64)]) {
        Self::drop_clean_where(st, |t| {
            ranges
                .iter()
                .any(|&(o, n)| t * line_size < o.saturating_add(n) && o < (t + 1) * line_size)
        });
    }

    fn drop_clean_where(st: &State, hit: impl Fn(u64) -> bool) {
        let mut tags: Vec<u64> = st.mapped_slots().iter().map(|&s| st.slots.tag(s)).collect();
        tags.sort_unstable();
        tags.dedup();
        for tag in tags.into_iter().filter(|&t| hit(t)) {
            let mut sh = st.map.shard(tag).write();
            // Version by version, keeping the chain linked: freeing a version
            // the chain still names would let its slot's next owner show
            // through, and unmapping a head would orphan older dirty versions.
            for slot in st.chain(&sh, tag) {
                let r = st.slots.get(slot);
                if r.is_dirty() {
                    if r.valid != r.dirty {
                        let new = Rec {
                            valid: r.dirty,
                            ..r
                        };
                        st.set_rec(&mut sh, slot, new, false);
                    }
                } else {
                    st.remove_version(&mut sh, slot);
                }
            }
        }
    }

    pub(super) fn drop_clean_lines(&self) {
        if let Some(c) = self.cache.as_ref() {
            Self::drop_clean_in(&c.st);
        }
    }

    /// Clean stop: write back everything (in the dirty-holding modes), persist,
    /// and mark the cache cleanly detached. After this the engine refuses I/O.
    pub fn shutdown(&self) -> EngineResult<()> {
        self.detach(true)
    }

    /// Stop without writing back dirty data (for an upgrade or a handover to a
    /// restarted server): metadata is persisted and the cache marked cleanly
    /// detached, so the next attach keeps its data warm.
    pub fn detach_keep_dirty(&self) -> EngineResult<()> {
        self.detach(false)
    }

    fn detach(&self, write_back: bool) -> EngineResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(c) = self.cache.as_ref() else {
            return self
                .backend
                .flush()
                .map_err(|e| EngineError::backend("flush", e));
        };
        if write_back {
            self.drain()?;
        }
        self.stop_flusher();
        self.backend
            .flush()
            .map_err(|e| EngineError::backend("flush", e))?;
        super::blocking(self.persist_checkpoint())?;
        let mut sb = c.sb.lock();
        sb.state = SbState::Clean;
        // The checkpoint above describes everything; no record follows it,
        // and the shadow is removed below.
        sb.incompat &= !(crate::format::superblock::INCOMPAT_UNFLUSHED_RECORDS
            | crate::format::superblock::INCOMPAT_STAGED_SHADOW);
        sb.seq += 1;
        sb.epoch = c.st.cur_epoch();
        // Without change tracking no marker is recorded, and the next attach
        // cannot notice writes made behind the detached cache (a block device).
        sb.backend.change_marker = match self.backend.change_tracking() {
            Some(t) => t
                .change_marker()
                .map_err(|e| EngineError::backend("change marker", e))?
                .unwrap_or_default(),
            None => String::new(),
        };
        c.store.write_superblock(&sb)?;
        // Cleanly detached, the on-disk table is complete: the shadow would
        // only keep tmpfs RAM (and a list of what is cached) for nothing.
        if let Some(sh) = c.st.shadow.write().take() {
            sh.remove();
        }
        info!(
            cached_lines = c.st.map.len(),
            cached_bytes =
                c.st.valid_sectors.load(Ordering::Relaxed).max(0) as u64 * SECTOR_SIZE as u64,
            dirty_lines = c.st.dirty_lines(),
            "cache detached cleanly"
        );
        Ok(())
    }
}

#[cfg(feature = "testing")]
impl Engine {
    /// Stop serving and stop the flusher without persisting anything: the cache
    /// is left exactly as a crash would leave it (tests and crash harnesses).
    pub fn abandon(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop_flusher();
    }

    /// Delete the crash shadow, as a host reboot does: after `abandon`, the next
    /// attach then recovers as after a power cut (tests and crash harnesses).
    pub fn forget_crash_shadow(&self) {
        if let Some(c) = self.cache.as_ref() {
            if let Some(sh) = c.st.shadow.write().take() {
                sh.remove();
            }
        }
    }
}
