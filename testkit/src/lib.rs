//! The test kit shared by the integration tests, the benches and the crash
//! harness (never by production code; `publish = false`):
//!
//! - [`rng`]: one seeded generator and one recognisable data pattern;
//! - [`skip`]: the `SKIP:` / `UBLK_CACHE_REQUIRE_*` rule, in one place;
//! - [`backends`]: the backend factory (mem, file × {io_uring, psync} ×
//!   {O_DIRECT, buffered}, rbd when the Ceph test cluster is up) and
//!   [`backends::for_each_backend`];
//! - [`ceph`] (feature `rbd`): the throw-away Ceph cluster of
//!   `scripts/ceph-cluster.sh`: images, the `rbd` CLI, a frozen OSD, a watchdog;
//! - [`serve`]: the real `ublk-cache serve` process and the real NBD clients;
//! - [`nbd_client`]: an NBD client written from the protocol document,
//!   independently of the server's code, so that the two check each other;
//! - [`rig`]: the engine test rig (configs, in-memory devices, refusals);
//! - [`watchdog`]: a hang becomes a named failure instead of CI's time-out.

pub mod backends;
#[cfg(feature = "rbd")]
pub mod ceph;
pub mod nbd_client;
pub mod rig;
pub mod rng;
pub mod serve;
pub mod skip;
pub mod watchdog;

pub use rng::{pattern, Rng};

/// A scratch directory on the build's filesystem (a real disk filesystem, so
/// O_DIRECT is exercised, unlike a tmpfs `/tmp` might be). A macro because
/// `CARGO_TARGET_TMPDIR` exists only while an integration test or bench of the
/// calling crate is compiled.
#[macro_export]
macro_rules! scratch_dir {
    () => {
        $crate::backends::scratch_in(::std::path::Path::new(env!("CARGO_TARGET_TMPDIR")))
    };
}
