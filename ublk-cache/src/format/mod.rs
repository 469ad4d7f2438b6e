//! The cache device's on-disk format: two superblock copies, a table of line
//! entries, then the data lines. Every structure carries a checksum and the
//! superblock a version and feature flags, so that a corrupt or foreign cache is
//! refused rather than served.
//!
//! ```text
//! 0        4 KiB     8 KiB          64 KiB                 data_offset (1 MiB aligned)
//! | sb copy 0 | sb copy 1 | reserved | line entries (4 KiB blocks) | line 0 | line 1 | ...
//! ```

pub(crate) mod codec;
pub mod entry;
pub mod layout;
pub mod log;
pub mod superblock;

pub use entry::{EntryCodec, LineEntry};
pub use layout::{FormatVersion, Layout};
pub use superblock::{BackendRecord, SbState, Superblock};

/// Why on-disk bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("structure is truncated")]
    Truncated,
    #[error("no ublk-cache superblock (bad magic)")]
    NoMagic,
    #[error("checksum mismatch in {what}")]
    Checksum { what: String },
    #[error(
        "on-disk format version {found} is not supported (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32 },
    #[error("unknown incompatible feature flags {0:#x}: written by a newer ublk-cache")]
    Features(u32),
    #[error("field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

/// The unit of validity and dirtiness inside a line.
pub const SECTOR_SIZE: u32 = 4096;
/// Metadata is written in whole blocks of this size.
pub const META_BLOCK: u32 = 4096;
