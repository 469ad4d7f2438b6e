//! FileBackend on a real kernel block device: a loop device over a scratch file.
//! Needs root and loop support; without them the tests print SKIP and pass.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rbd_backend::{Backend, BlockIo, ErrorKind, FileBackend, FileKind, OpenOptions};
use testkit::backends::{for_each_engine, make_file, misaligned};
use testkit::{pattern, scratch_dir, Rng};

const MIB: usize = 1 << 20;

/// A loop device detached again on drop.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(file: &Path, sector_size: u32) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(Self { dev: dev.into() })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn with_loop(sector_size: u32, size: usize, f: impl FnOnce(&Path, &Path)) {
    let dir = scratch_dir!();
    let file = make_file(&dir, "loop.img", &pattern(11, size));
    match LoopDev::attach(&file, sector_size) {
        Ok(l) => f(&l.dev, &file),
        Err(why) => {
            eprintln!("==================================================");
            eprintln!("SKIP: loop device test (sector size {sector_size}): {why}");
            eprintln!("==================================================");
        }
    }
}

fn device_suite(sector_size: u32) {
    let size = 8 * MIB;
    with_loop(sector_size, size, |dev, _file| {
        for_each_engine(|engine| {
            let spec = format!("dev:{}", dev.display());
            let b =
                FileBackend::open_spec_with_engine(&spec, OpenOptions::default(), engine.clone())
                    .expect("open loop device");
            let label = format!("{} engine={}", dev.display(), engine.kind());
            assert_eq!(b.kind(), FileKind::Device);
            assert_eq!(b.size(), size as u64, "BLKGETSIZE64 {label}");
            assert_eq!(b.block_size(), sector_size, "BLKSSZGET {label}");
            assert!(b.is_direct(), "block devices take O_DIRECT");
            assert_eq!(b.mtime_ns().expect("mtime"), None);
            assert_eq!(b.modified_ns(), None);

            let meta = std::fs::metadata(dev).expect("stat dev");
            let id = b.identity();
            assert_eq!(id.kind, "dev");
            assert_eq!(id.size, size as u64);
            assert_eq!(
                id.fingerprint,
                format!(
                    "rdev={}:{}",
                    libc::major(meta.rdev()),
                    libc::minor(meta.rdev())
                )
            );

            // Restore the known contents, then change them in aligned and unaligned ways.
            let mut shadow = pattern(11, size);
            b.write_at(0, &shadow).expect("fill");
            let mut rng = Rng::new(u64::from(sector_size));
            let mut scratch = Vec::new();
            for (off, len) in [(0, 4096), (1, 1), (511, 513), (4095, 10_000), (size - 3, 3)] {
                let data = rng.bytes(len);
                misaligned(&mut scratch, len).copy_from_slice(&data);
                b.write_at(off as u64, &scratch[1..]).expect("write");
                shadow[off..off + len].copy_from_slice(&data);
            }
            for (off, len) in [(MIB, MIB), (2 * MIB + 100, 10_000), (5 * MIB - 1, 2)] {
                b.write_zeroes(off as u64, len as u64)
                    .expect("write_zeroes");
                shadow[off..off + len].fill(0);
            }
            // Discard is advisory: it must succeed, and must not touch what is outside.
            let (doff, dlen) = (6 * MIB + 777, MIB);
            b.discard(doff as u64, dlen as u64).expect("discard");
            b.flush().expect("flush");

            let mut all = vec![0u8; size];
            b.read_at(0, &mut all).expect("read");
            let outside_discard = |i: usize| !(doff..doff + dlen).contains(&i);
            let bad = (0..size).find(|&i| outside_discard(i) && all[i] != shadow[i]);
            assert_eq!(bad, None, "first differing byte {label}");

            assert_eq!(
                b.read_at(size as u64, &mut [0u8; 1])
                    .expect_err("end")
                    .kind(),
                ErrorKind::InvalidRequest
            );

            // A device is not a file.
            let e = FileBackend::open_spec_with_engine(
                &format!("file:{}", dev.display()),
                OpenOptions::default(),
                Arc::clone(&engine),
            )
            .expect_err("file: on a device");
            assert!(e.to_string().contains("is a block device"), "{e}");
        });
    });
}

#[test]
fn loop_device_512_byte_sectors() {
    device_suite(512);
}

#[test]
fn loop_device_4k_sectors() {
    device_suite(4096);
}
