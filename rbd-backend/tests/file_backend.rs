//! FileBackend on regular files, on every engine, with and without O_DIRECT.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rbd_backend::{
    AlignedBuf, Backend, BlockIo, ErrorKind, ExclusiveLock, FileBackend, FileKind, OpenOptions,
};
use testkit::backends::{for_each_engine, for_each_file_setup, make_file, misaligned};
use testkit::{pattern, scratch_dir, Rng};

const MIB: usize = 1 << 20;

#[test]
fn aligned_round_trip_reaches_the_file() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let path = make_file(&dir, "a.img", &vec![0u8; 4 * MIB]);
        let b = s.open(&path);
        assert_eq!(b.size(), 4 * MIB as u64);
        assert_eq!(b.kind(), FileKind::File);
        let bs = b.block_size();
        assert!(bs >= 512 && bs.is_power_of_two(), "block size {bs}");
        if !s.direct {
            assert_eq!(bs, 512);
        }

        // 64 KiB and a request longer than the bounce size, both aligned.
        for (off, len, seed) in [(3 * 4096, 64 * 1024, 1u8), (MIB, 2 * MIB + 4096, 2)] {
            let mut w = AlignedBuf::new(len).expect("buf");
            w.as_mut_slice().copy_from_slice(&pattern(seed as u64, len));
            b.write_at(off as u64, w.as_slice()).expect("write");
            let mut r = AlignedBuf::new(len).expect("buf");
            b.read_at(off as u64, r.as_mut_slice()).expect("read");
            assert_eq!(r.as_slice(), w.as_slice(), "{}", s.label());
        }
        b.flush().expect("flush");
        // Check through an independent path: the file's bytes as std reads them.
        let on_disk = std::fs::read(&path).expect("read file");
        assert_eq!(
            &on_disk[3 * 4096..3 * 4096 + 64 * 1024],
            &pattern(1, 64 * 1024)[..]
        );
        assert_eq!(
            &on_disk[MIB..3 * MIB + 4096],
            &pattern(2, 2 * MIB + 4096)[..]
        );
        assert!(on_disk[..3 * 4096].iter().all(|&x| x == 0));
    });
}

#[test]
fn unaligned_offsets_lengths_and_buffers() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let size = 4 * MIB;
        let mut shadow = pattern(9, size);
        let path = make_file(&dir, "u.img", &shadow);
        let b = s.open(&path);
        let mut rng = Rng::new(7);
        let mut scratch = Vec::new();
        let cases: Vec<(usize, usize)> = vec![
            (0, 1),
            (1, 1),
            (511, 2),
            (513, 1000),
            (4095, 4098),
            (4096, 4096), // aligned offsets, but the buffer below is misaligned
            (8191, 5000),
            (100_000, MIB + 12_345), // several bounce pieces, partial at both ends
            (size - 1, 1),
            (size - 4097, 4097),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = rng.bytes(len);
            let w = misaligned(&mut scratch, len);
            w.copy_from_slice(&data);
            b.write_at(off as u64, w).expect("write");
            shadow[off..off + len].copy_from_slice(&data);

            let r = misaligned(&mut scratch, len);
            b.read_at(off as u64, r).expect("read");
            assert!(r == &data[..], "case {i} ({off},{len}) {}", s.label());
            // Neighbouring bytes of a read-modify-write must survive.
            let lo = off.saturating_sub(4096);
            let hi = (off + len + 4096).min(size);
            let mut around = vec![0u8; hi - lo];
            b.read_at(lo as u64, &mut around).expect("read around");
            assert!(
                around == shadow[lo..hi],
                "case {i} neighbours {}",
                s.label()
            );
        }
        b.flush().expect("flush");
        assert!(
            std::fs::read(&path).expect("read file") == shadow,
            "{}",
            s.label()
        );
    });
}

#[test]
fn out_of_range_requests_are_refused() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let size = MIB as u64;
        let original = pattern(3, MIB);
        let path = make_file(&dir, "r.img", &original);
        let b = s.open(&path);
        let mut buf = vec![0u8; 512];

        let e = b.read_at(size - 511, &mut buf).expect_err("read past end");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        assert_eq!(e.errno(), libc::EINVAL);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("offset={}", size - 511)) && msg.contains("len=512"),
            "{msg}"
        );
        assert!(msg.contains(&format!("size={size}")), "{msg}");

        for (off, len) in [
            (size - 511, 512u64),
            (size, 1),
            (u64::MAX, 1),
            (u64::MAX - 1, 4),
        ] {
            let w = vec![0xffu8; len as usize];
            let kinds = [
                b.write_at(off, &w),
                b.discard(off, len),
                b.write_zeroes(off, len),
                b.read_at(off, &mut vec![0u8; len as usize]),
            ];
            for r in kinds {
                assert_eq!(r.expect_err("refused").kind(), ErrorKind::InvalidRequest);
            }
        }
        assert_eq!(
            b.discard(0, u64::MAX).expect_err("huge").kind(),
            ErrorKind::InvalidRequest
        );
        // Empty requests at the very end are fine; the last byte is reachable.
        b.read_at(size, &mut []).expect("empty read at end");
        b.write_at(size - 1, &[0x42]).expect("last byte");
        b.flush().expect("flush");
        let mut expected = original;
        expected[MIB - 1] = 0x42;
        assert!(std::fs::read(&path).expect("read") == expected);
    });
}

#[test]
fn discard_reads_back_zeroes_and_spares_neighbours() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let mut shadow = pattern(5, 4 * MIB);
        let path = make_file(&dir, "d.img", &shadow);
        let b = s.open(&path);
        for (off, len) in [(MIB, MIB), (12_345, 100_001), (3 * MIB + 1, 511)] {
            b.discard(off as u64, len as u64).expect("discard");
            shadow[off..off + len].fill(0);
        }
        let mut all = vec![0u8; 4 * MIB];
        b.read_at(0, &mut all).expect("read");
        assert!(all == shadow, "{}", s.label());
        b.flush().expect("flush");
        assert!(std::fs::read(&path).expect("read") == shadow);
    });
}

#[test]
fn write_zeroes_zeroes_exactly_the_range() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let mut shadow = pattern(6, 8 * MIB);
        let path = make_file(&dir, "z.img", &shadow);
        let b = s.open(&path);
        for (off, len) in [
            (0, 4096),
            (4097, 3),
            (MIB - 3, 3 * MIB + 7),
            (8 * MIB - 1, 1),
        ] {
            b.write_zeroes(off as u64, len as u64).expect("zero");
            shadow[off..off + len].fill(0);
        }
        b.flush().expect("flush");
        let mut all = vec![0u8; 8 * MIB];
        b.read_at(0, &mut all).expect("read");
        assert!(all == shadow, "{}", s.label());
        assert!(std::fs::read(&path).expect("read") == shadow);
        // The file keeps its size (KEEP_SIZE), so identity stays stable.
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            8 * MIB as u64
        );
    });
}

#[test]
fn read_only_refuses_changes_but_reads_and_flushes() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let data = pattern(8, MIB);
        let path = make_file(&dir, "ro.img", &data);
        let opts = OpenOptions {
            read_only: true,
            direct: s.direct,
            ..OpenOptions::default()
        };
        let b = FileBackend::open_with_engine(&path, opts, Arc::clone(&s.engine)).expect("open");
        assert!(b.is_read_only());
        let mut r = vec![0u8; 1000];
        b.read_at(77, &mut r).expect("read");
        assert!(r == data[77..1077]);
        for res in [
            b.write_at(0, &[1, 2, 3]),
            b.discard(0, 4096),
            b.write_zeroes(0, 4096),
        ] {
            let e = res.expect_err("read-only");
            assert_eq!(e.kind(), ErrorKind::ReadOnly);
            assert_eq!(e.errno(), libc::EROFS);
        }
        b.flush().expect("flush on read-only");
        assert!(std::fs::read(&path).expect("read") == data);
    });
}

/// 8 threads write and read back random pieces of their own regions. Regions are
/// an odd number of bytes long, so neighbours share O_DIRECT blocks at the borders:
/// a read-modify-write that raced with the neighbour would lose its bytes.
#[test]
fn concurrent_writers_on_disjoint_ranges() {
    const THREADS: usize = 8;
    const REGION: usize = 100_003;
    const OPS: usize = 150;
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let size = (THREADS * REGION).next_multiple_of(4096); // aligned: else buffered
        let path = make_file(&dir, "c.img", &vec![0u8; size]);
        let b = Arc::new(s.open(&path));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let b = Arc::clone(&b);
                thread::spawn(move || {
                    let base = t * REGION;
                    let mut shadow = vec![0u8; REGION];
                    let mut rng = Rng::new(t as u64 + 100);
                    for _ in 0..OPS {
                        // Mostly small, some block-aligned, some touching region edges.
                        let (off, len) = match rng.below(4) {
                            0 => (0, 1 + rng.below(5000) as usize),
                            1 => {
                                let len = 1 + rng.below(5000) as usize;
                                (REGION - len, len)
                            }
                            _ => {
                                let off = rng.below(REGION as u64 - 1) as usize;
                                (
                                    off,
                                    1 + rng.below((REGION - off).min(70_000) as u64) as usize,
                                )
                            }
                        };
                        let data = rng.bytes(len);
                        b.write_at((base + off) as u64, &data).expect("write");
                        shadow[off..off + len].copy_from_slice(&data);
                        let mut r = vec![0u8; len];
                        b.read_at((base + off) as u64, &mut r).expect("read");
                        assert!(r == data, "thread {t} read back");
                    }
                    shadow
                })
            })
            .collect();
        let shadows: Vec<Vec<u8>> = handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect();
        b.flush().expect("flush");
        let mut all = vec![0u8; size];
        b.read_at(0, &mut all).expect("read all");
        for (t, shadow) in shadows.iter().enumerate() {
            assert!(
                all[t * REGION..(t + 1) * REGION] == shadow[..],
                "region {t} corrupted ({})",
                s.label()
            );
        }
        assert!(std::fs::read(&path).expect("read file") == all);
    });
}

#[test]
fn open_errors_name_the_path_and_the_problem() {
    for_each_engine(|engine| {
        let dir = scratch_dir!();
        let open = |p: &str| {
            FileBackend::open_spec_with_engine(p, OpenOptions::default(), Arc::clone(&engine))
        };
        let missing = dir.path().join("nope.img");
        let cases = [
            (format!("file:{}", missing.display()), "does not exist"),
            (format!("file:{}", dir.path().display()), "is a directory"),
            (
                "file:/dev/null".to_string(),
                "neither a regular file nor a block device",
            ),
            (
                "nbd:somewhere".to_string(),
                "expected file:PATH or dev:PATH",
            ),
        ];
        for (spec, why) in cases {
            let e = open(&spec).expect_err("open must fail");
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{spec}");
            let msg = e.to_string();
            assert!(msg.contains(why), "{spec}: {msg}");
        }
        let e = open(&format!("file:{}", missing.display())).expect_err("missing");
        assert!(e.to_string().contains(&missing.display().to_string()));

        let regular = make_file(&dir, "plain.img", &[0u8; 4096]);
        let e = open(&format!("dev:{}", regular.display())).expect_err("not a device");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("is not a block device"), "{e}");
        assert!(e.to_string().contains(&regular.display().to_string()));

        // Plain path without the spec prefix still opens.
        let b = FileBackend::open_with_engine(&regular, OpenOptions::default(), engine.clone())
            .expect("open plain");
        assert_eq!(b.size(), 4096);
        let b = open(&format!("file:{}", regular.display())).expect("file: spec");
        assert_eq!(b.kind(), FileKind::File);
    });
}

#[test]
fn identity_is_stable_across_writes_and_mtime_moves() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let path = make_file(&dir, "id.img", &vec![0u8; MIB]);
        let b = s.open(&path);
        let meta = std::fs::metadata(&path).expect("stat");
        let id = b.identity();
        assert_eq!(id.kind, "file");
        assert_eq!(
            id.name,
            std::fs::canonicalize(&path)
                .expect("canon")
                .to_string_lossy()
        );
        assert_eq!(id.size, MIB as u64);
        assert_eq!(
            id.fingerprint,
            format!("dev={},ino={}", meta.dev(), meta.ino())
        );

        let before = b.mtime_ns().expect("mtime").expect("file has mtime");
        assert_eq!(
            before,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            "mtime_ns matches stat"
        );
        thread::sleep(Duration::from_millis(30));
        assert_eq!(b.modified_ns(), Some(before as u64));
        b.write_at(4096, &[1u8; 4096]).expect("write");
        b.flush().expect("flush");
        let recorded = b.modified_ns().expect("files report modified_ns");
        let after = b.mtime_ns().expect("mtime").expect("file has mtime");
        assert!(
            after > before,
            "our write moves mtime ({before} -> {after})"
        );
        assert_eq!(recorded, after as u64);
        b.sync_all().expect("sync_all");
        assert_eq!(b.identity(), id, "fingerprint ignores our writes");
    });
}

#[test]
fn default_open_uses_an_engine_and_direct_io() {
    let dir = scratch_dir!();
    let path = make_file(&dir, "def.img", &vec![0u8; MIB]);
    let b = FileBackend::open(&path, OpenOptions::default()).expect("open");
    eprintln!("default open: {b:?}");
    b.write_at(10, b"hello").expect("write");
    let mut r = [0u8; 5];
    b.read_at(10, &mut r).expect("read");
    assert_eq!(&r, b"hello");
}

/// O_DIRECT cannot write a partial last block without growing the file, so such a
/// file is served buffered, all the way to its last byte.
#[test]
fn unaligned_file_size_falls_back_to_buffered() {
    for_each_engine(|engine| {
        let dir = scratch_dir!();
        let path = make_file(&dir, "odd.img", &pattern(2, 1000));
        let b = FileBackend::open_with_engine(&path, OpenOptions::default(), engine).expect("open");
        assert!(!b.is_direct());
        assert_eq!(b.size(), 1000);
        assert_eq!(b.block_size(), 512);
        b.write_at(990, &[7u8; 10]).expect("tail write");
        let mut r = [0u8; 20];
        b.read_at(980, &mut r).expect("tail read");
        assert_eq!(&r[10..], &[7u8; 10]);
        assert_eq!(&r[..10], &pattern(2, 1000)[980..990]);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1000);
    });
}

/// An exclusive backend holds its flock until dropped; `release_lock` lends it
/// (a migration's source), `acquire_lock` takes it back once it is free.
#[test]
fn an_exclusive_backend_holds_its_flock_and_can_lend_it() {
    let dir = scratch_dir!();
    let path = make_file(&dir, "lock.img", &vec![0u8; MIB]);
    let excl = OpenOptions {
        exclusive: true,
        ..OpenOptions::default()
    };
    let a = FileBackend::open(&path, excl).expect("first holder");
    let err = FileBackend::open(&path, excl).expect_err("a second holder is refused");
    assert!(rbd_backend::file::is_locked_elsewhere(&err), "{err}");
    assert!(
        err.to_string().contains("locked by another process"),
        "{err}"
    );
    // Without `exclusive` nothing is locked (tests, tools).
    FileBackend::open(&path, OpenOptions::default()).expect("a plain open");
    a.release_lock().expect("release");
    a.write_at(0, &[1u8; 4096])
        .expect("writes go on while the lock is lent");
    let b = FileBackend::open(&path, excl).expect("the lock is free now");
    let err = a
        .acquire_lock()
        .expect_err("taken while someone else holds it");
    assert!(rbd_backend::file::is_locked_elsewhere(&err), "{err}");
    drop(b);
    a.acquire_lock().expect("free again");
    assert!(FileBackend::open(&path, excl).is_err());
}
