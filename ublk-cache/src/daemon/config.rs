//! How a server is started: [`ServeConfig`], one typed configuration that a
//! TOML file, the command line and a library caller all fill.
//!
//! The keys are the `serve` long option names (`cache-size = "20G"`, `export =
//! ["ublk", "nbd:unix:/run/d.sock"]`, `format = true`): a config file says what
//! a command line would. Unknown keys are refused. In Rust the on/off options
//! are enums that say what they do ([`OnForeignCache::Format`],
//! [`DirtyData::Discard`], ...); in TOML they stay booleans.
//!
//! [`ServeConfig::validate`] checks everything that can be checked without
//! touching data and returns the [`Plan`] the server runs.

use std::fmt::Display;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use policies::{CacheMode, EvictionKind, WritebackOrder};
use serde::{Deserialize, Serialize};

use super::error::{DaemonError, DaemonResult};
use super::jobs::PreloadPlan;
use super::ranges;
use super::size::parse_size;
use super::spec::{parse_mode, BackendSpec, ExportSpec};
use super::tls::TlsMode;
use crate::boot_trace::BootTraceMode;

/// Where crash shadows live unless configured (a tmpfs: it must not survive a
/// power cut, see `engine::shadow`).
pub const DEFAULT_SHADOW_DIR: &str = crate::engine::shadow::DEFAULT_DIR;

/// A size in bytes, written `4096`, `64K`, `512M`, `20G`, `1.5G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(ByteSize)
    }
}

impl Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A share of the cache, written `10` or `10%` (0 to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let n = t.strip_suffix('%').unwrap_or(t).trim();
        match n.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(Percent(p)),
            _ => Err(format!(
                "'{s}' is not a percentage of the cache (a whole number from 0 to 100, as 10 or 10%)"
            )),
        }
    }
}

impl Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// Which I/O engine file backends use (`UBLK_CACHE_IO_ENGINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// io_uring, falling back to psync where the kernel or a seccomp filter refuses it.
    #[default]
    Auto,
    Sync,
    Uring,
}

impl IoEngine {
    pub fn choice(self) -> rbd_backend::EngineChoice {
        use rbd_backend::{EngineChoice, EngineKind};
        match self {
            IoEngine::Auto => EngineChoice::Auto,
            IoEngine::Sync => EngineChoice::Force(EngineKind::Sync),
            IoEngine::Uring => EngineChoice::Force(EngineKind::Uring),
        }
    }
}

impl FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use rbd_backend::{EngineChoice, EngineKind};
        match EngineChoice::parse(s) {
            Some(EngineChoice::Auto) => Ok(IoEngine::Auto),
            Some(EngineChoice::Force(EngineKind::Sync)) => Ok(IoEngine::Sync),
            Some(EngineChoice::Force(EngineKind::Uring)) => Ok(IoEngine::Uring),
            None => Err(format!(
                "I/O engine {s:?}: expected \"sync\", \"uring\" or \"auto\""
            )),
        }
    }
}

impl Display for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngine::Auto => "auto",
            IoEngine::Sync => "sync",
            IoEngine::Uring => "uring",
        })
    }
}

/// An on/off option: an enum in Rust, a boolean in TOML and on the command line.
macro_rules! switch {
    ($(#[$m:meta])* $name:ident { $(#[$offm:meta])* $off:ident, $(#[$onm:meta])* $on:ident }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub enum $name {
            $(#[$offm])*
            #[default]
            $off,
            $(#[$onm])*
            $on,
        }

        impl $name {
            /// The option as given: on (`true`) or off.
            pub fn from_flag(on: bool) -> Self {
                if on { $name::$on } else { $name::$off }
            }

            pub fn is_on(self) -> bool {
                self == $name::$on
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bool(self.is_on())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                bool::deserialize(d).map($name::from_flag)
            }
        }
    };
}

switch!(
    /// A cache device that holds something that is not a ublk-cache (`format`).
    OnForeignCache {
        /// Refuse it, naming the problem.
        Refuse,
        /// Initialize it. Destroys its contents.
        Format
    }
);

switch!(
    /// Dirty data found in the cache at start (`discard-dirty`).
    DirtyData {
        /// Keep it and write it back; refuse to start where that is unsafe.
        Keep,
        /// Drop it: LOSES every write the cache holds that has not reached the backend.
        Discard
    }
);

switch!(
    /// A backend changed since the cache detached while the cache holds dirty
    /// data for the changed ranges (`accept-backend-change`).
    OnBackendChange {
        /// Refuse to start.
        Refuse,
        /// Keep and write back the dirty data over the backend's newer data.
        WriteBack
    }
);

switch!(
    /// When the exports appear relative to the start preload (`preload-wait`).
    PreloadStart {
        /// At once; the preload runs in the background.
        Background,
        /// Only after the preload is done.
        BeforeExports
    }
);

switch!(
    /// How the cache's clean data is trusted at start (`migrate-in`).
    Start {
        /// Warm: clean data is served again (unless the backend says it changed).
        Warm,
        /// A live-migration destination: cold (the source may write the backend
        /// until switchover); an RBD image's lock is taken at the first write.
        MigrateIn
    }
);

switch!(
    /// How the backend is opened (`read-only`).
    Access {
        /// Read and write, holding the backend exclusively.
        ReadWrite,
        /// Read-only and shared (CD-ROMs, images several VMs read): an RBD
        /// image without its exclusive lock, a file or device with a shared
        /// flock. Guest writes fail with EIO. Needs mode none, around or through.
        ReadOnly
    }
);

/// serde through `Display`/`FromStr`, accepting a string or a number (TOML
/// `depth = 64` and `depth = "64"` mean the same, as on the command line).
pub mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::de::{self, Visitor};

    pub fn serialize<T: Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: serde::Deserializer<'de>,
    {
        let word = d.deserialize_any(Word)?;
        word.parse().map_err(de::Error::custom)
    }

    struct Word;

    impl Visitor<'_> for Word {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
}

/// [`text`] for an optional value.
pub mod opt_text {
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: serde::Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: serde::Deserializer<'de>,
    {
        super::text::deserialize(d).map(Some)
    }
}

/// Permission bits, written in octal (`socket-mode = "0600"`).
mod octal {
    use serde::de;

    pub fn serialize<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:04o}"))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let word: String = super::text::deserialize(d)?;
        super::parse_mode(&word).map_err(de::Error::custom)
    }
}

/// `export = "ublk"` or `export = ["ublk", "nbd:unix:/run/d.sock"]`.
mod exports {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;

    use super::ExportSpec;

    pub fn serialize<S: serde::Serializer>(v: &[ExportSpec], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for e in v {
            seq.serialize_element(&e.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<ExportSpec>, D::Error> {
        d.deserialize_any(Exports)
    }

    struct Exports;

    impl<'de> Visitor<'de> for Exports {
        type Value = Vec<ExportSpec>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an export or a list of exports")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.parse().map(|e| vec![e]).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s.parse().map_err(de::Error::custom)?);
            }
            Ok(out)
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_socket_mode() -> u32 {
    0o600
}

fn is_default_socket_mode(m: &u32) -> bool {
    *m == default_socket_mode()
}

fn default_ceph_id() -> String {
    "admin".into()
}

fn is_default_ceph_id(s: &str) -> bool {
    s == "admin"
}

fn default_depth() -> u16 {
    128
}

fn is_default_depth(d: &u16) -> bool {
    *d == default_depth()
}

/// Everything that says how one server runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeConfig {
    /// The slow disk: `file:PATH`, `dev:/dev/X`, or `rbd:POOL/IMAGE[@SNAP]`. Required.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    /// Where the disk is served, in this order; `ublk` when empty.
    #[serde(
        default,
        rename = "export",
        with = "exports",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub exports: Vec<ExportSpec>,
    /// Permissions of NBD unix sockets.
    #[serde(
        default = "default_socket_mode",
        with = "octal",
        skip_serializing_if = "is_default_socket_mode"
    )]
    pub socket_mode: u32,
    /// TLS on the NBD exports: the server's certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls-cert` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): NBD clients must present a certificate one of them signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// `require` (the default with a certificate), `optional` or `off`.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    /// rbd: the cluster's ceph.conf (default: `$CEPH_CONF`, then /etc/ceph/ceph.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_conf: Option<PathBuf>,
    /// rbd: the client name, without "client.".
    #[serde(
        default = "default_ceph_id",
        skip_serializing_if = "is_default_ceph_id"
    )]
    pub ceph_id: String,
    /// rbd: the keyring (default: the one ceph.conf names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_keyring: Option<PathBuf>,
    /// rbd: a file that holds only the client's key, as `rbd --keyfile` takes
    /// it (OpenNebula's CEPH_KEY), instead of a keyring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph_keyfile: Option<PathBuf>,
    /// rbd: seconds a backend request waits for the cluster (default 30; 0 forever).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<u64>,
    /// The cache device or file (created with `cache_size` bytes if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
    /// Bytes of the cache to use (default: all of it).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<ByteSize>,
    #[serde(default, with = "text")]
    pub mode: CacheMode,
    /// Line size of a new cache, 4K to 1M (default 64K).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub line_size: Option<ByteSize>,
    #[serde(default, with = "text", skip_serializing_if = "is_default")]
    pub writeback_order: WritebackOrder,
    /// Backend bytes per second that background write-back may use at most
    /// (0 or absent: no limit). A drain asked for (stop, `ctl flush`, a mode
    /// switch, migration) is not paced.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub writeback_rate: Option<ByteSize>,
    /// Backend writes per second that background write-back may issue at
    /// most (0 or absent: no limit).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub writeback_iops: Option<u64>,
    /// Pace background write-back by the dirty level: at `writeback_min_rate`
    /// while at most this share of the cache's lines is dirty, faster above it
    /// (a PI controller, see `policies::dirty_control`). Giving this or
    /// `writeback_high` turns the controller on; absent, write-back runs as
    /// fast as `writeback_rate` lets it.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub writeback_low: Option<Percent>,
    /// The share of dirty lines at and above which write-back runs unpaced.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub writeback_high: Option<Percent>,
    /// The controller's lowest rate (default 1M).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub writeback_min_rate: Option<ByteSize>,
    /// Which clean line to give up when the cache is full (`lru`).
    #[serde(default, with = "text", skip_serializing_if = "is_default")]
    pub eviction: EvictionKind,
    /// ublk hardware queues (default `min(CPUs, 4)`).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// ublk requests in flight per queue.
    #[serde(
        default = "default_depth",
        with = "text",
        skip_serializing_if = "is_default_depth"
    )]
    pub depth: u16,
    /// The ublk device id N of `/dev/ublkbN` (default: the kernel picks one).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Re-attach to the existing ublk device with this id instead of creating one.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub recover: Option<u32>,
    #[serde(default, rename = "format", skip_serializing_if = "is_default")]
    pub on_foreign_cache: OnForeignCache,
    #[serde(default, rename = "discard-dirty", skip_serializing_if = "is_default")]
    pub dirty_data: DirtyData,
    #[serde(
        default,
        rename = "accept-backend-change",
        skip_serializing_if = "is_default"
    )]
    pub on_backend_change: OnBackendChange,
    /// Preload the first this many bytes at start.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub preload: Option<ByteSize>,
    /// Preload the ranges listed in this file instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_ranges: Option<PathBuf>,
    /// Backend bytes per second for preload and hydration at most.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub preload_rate: Option<ByteSize>,
    #[serde(default, rename = "preload-wait", skip_serializing_if = "is_default")]
    pub preload_start: PreloadStart,
    /// Record what the guest reads while it boots (`boot-trace`).
    #[serde(default, with = "text", skip_serializing_if = "is_default")]
    pub boot_trace: BootTraceMode,
    /// Where boot traces live (default /var/lib/ublk-cache/traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_trace_dir: Option<PathBuf>,
    /// The key of this disk's trace (default: the backend's kind and name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_trace_key: Option<String>,
    /// Seconds from the guest's first request that count as its boot (120).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub boot_trace_window: Option<u32>,
    /// How far (seconds of the trace) prefetch may run ahead of the guest (5).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub boot_trace_ahead: Option<u32>,
    /// Record every guest request, with its submit and completion time, in
    /// this file (`io-trace`; a debug tool, see `crate::io_trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_trace: Option<PathBuf>,
    /// Prometheus metrics at `http://ADDR/metrics` (`PORT` or `HOST:PORT`).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    #[serde(default, rename = "migrate-in", skip_serializing_if = "is_default")]
    pub start: Start,
    #[serde(default, rename = "read-only", skip_serializing_if = "is_default")]
    pub access: Access,
    /// Where crash shadows live (default /dev/shm/ublk-cache; the binary takes
    /// `$UBLK_CACHE_SHADOW_DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_dir: Option<PathBuf>,
    /// The I/O engine of file and device backends (default: io_uring, falling
    /// back to psync; the binary takes `$UBLK_CACHE_IO_ENGINE`).
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// The run-time registry and control sockets. A config file may name it
    /// (`run-dir`, as the global `--run-dir`), which then goes over the base's.
    #[serde(skip, default = "default_run_dir")]
    pub run_dir: PathBuf,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from(super::registry::DEFAULT_RUN_DIR)
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            backend: None,
            exports: Vec::new(),
            socket_mode: default_socket_mode(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls: None,
            ceph_conf: None,
            ceph_id: default_ceph_id(),
            ceph_keyring: None,
            ceph_keyfile: None,
            backend_timeout: None,
            cache: None,
            cache_size: None,
            mode: CacheMode::default(),
            line_size: None,
            writeback_order: WritebackOrder::default(),
            writeback_rate: None,
            writeback_iops: None,
            writeback_low: None,
            writeback_high: None,
            writeback_min_rate: None,
            eviction: EvictionKind::default(),
            queues: None,
            depth: default_depth(),
            id: None,
            recover: None,
            on_foreign_cache: OnForeignCache::default(),
            dirty_data: DirtyData::default(),
            on_backend_change: OnBackendChange::default(),
            preload: None,
            preload_ranges: None,
            preload_rate: None,
            preload_start: PreloadStart::default(),
            boot_trace: BootTraceMode::default(),
            boot_trace_dir: None,
            boot_trace_key: None,
            boot_trace_window: None,
            boot_trace_ahead: None,
            io_trace: None,
            metrics: None,
            start: Start::default(),
            access: Access::default(),
            shadow_dir: None,
            io_engine: None,
            run_dir: default_run_dir(),
        }
    }
}

/// What [`ServeConfig::validate`] found the configuration to mean.
#[derive(Debug, Clone)]
pub struct Plan {
    pub backend: BackendSpec,
    /// At least one; `ublk` unless others were given.
    pub exports: Vec<ExportSpec>,
    pub line_size: Option<u32>,
    pub metrics: Option<SocketAddr>,
    pub preload: PreloadPlan,
}

impl Plan {
    pub fn has_ublk(&self) -> bool {
        self.exports.contains(&ExportSpec::Ublk)
    }
}

impl ServeConfig {
    /// The demo: a sparse backend file and a 256 MiB cache file in `dir`,
    /// served in `back` mode as a ublk device.
    pub fn demo(dir: &Path) -> Self {
        Self {
            backend: Some(BackendSpec::File(dir.join("backend.img"))),
            cache: Some(dir.join("cache.img")),
            cache_size: Some(ByteSize(256 << 20)),
            mode: CacheMode::Back,
            ..Self::default()
        }
    }

    /// Parse a TOML config file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> DaemonResult<Self> {
        Self::over(&Self::default(), text, origin)
    }

    /// `base` with the keys of the TOML text `text` put over it (each key the
    /// text has replaces base's); `origin` names the text in errors.
    pub fn over(base: &Self, text: &str, origin: &str) -> DaemonResult<Self> {
        let bad = |m: String| DaemonError::config(format!("config {origin}: {m}"));
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| bad(format!("not valid TOML: {e}")))?;
        let run_dir = Self::run_dir_key(&mut table).map_err(bad)?;
        for key in table.keys() {
            if key == "config" {
                return Err(bad(
                    "a config file cannot name another (`config` key)".into()
                ));
            }
            if key.starts_with('-') || key.contains('_') || key.is_empty() {
                return Err(bad(format!(
                    "key '{key}' is not an option name; write it as on the command line without \
                     the dashes, e.g. cache-size"
                )));
            }
        }
        let mut merged = toml::Table::try_from(base)
            .map_err(|e| bad(format!("the configuration below it: {e}")))?;
        merged.extend(table);
        let mut c =
            ServeConfig::deserialize(toml::Value::Table(merged)).map_err(|e| bad(e.to_string()))?;
        c.run_dir = run_dir.unwrap_or_else(|| base.run_dir.clone());
        Ok(c)
    }

    /// Take the `run-dir` key out of a config file's table (it is the global
    /// `--run-dir`, not a serve option).
    fn run_dir_key(table: &mut toml::Table) -> Result<Option<PathBuf>, String> {
        match table.remove("run-dir") {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(PathBuf::from(s))),
            Some(v) => Err(format!("run-dir = {v}: expected a directory path")),
        }
    }

    /// The `run-dir` a config file names, if any (read before the registry is:
    /// `recover ID --config FILE` looks for ID's record there).
    pub fn run_dir_of_file(path: &Path) -> DaemonResult<Option<PathBuf>> {
        let origin = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::io(format!("config {origin}: cannot read it"), e))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| DaemonError::config(format!("config {origin}: not valid TOML: {e}")))?;
        Self::run_dir_key(&mut table)
            .map_err(|m| DaemonError::config(format!("config {origin}: {m}")))
    }

    /// [`ServeConfig::over`] with the file at `path`.
    pub fn over_file(base: &Self, path: &Path) -> DaemonResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DaemonError::io(format!("config {}: cannot read it", path.display()), e)
        })?;
        Self::over(base, &text, &path.display().to_string())
    }

    /// A configuration to recover device `id` with, against the one `recorded`
    /// when it was started: the same backend always (another one would serve
    /// the guest another disk), and the same cache unless the cache given is
    /// new (a cache lost for good is replaced by a fresh one). Refusals name both.
    pub fn check_recovers(&self, id: u32, recorded: &ServeConfig) -> DaemonResult<()> {
        let show = |b: &Option<BackendSpec>| b.as_ref().map_or("none".into(), |b| b.to_string());
        if self.backend != recorded.backend {
            return Err(DaemonError::refused(format!(
                "recover {id}: the device was served with backend {}, and this names backend {}; \
                 recovering it onto another backend would show the guest another disk",
                show(&recorded.backend),
                show(&self.backend)
            )));
        }
        let showp = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("none".into(), |p| p.display().to_string())
        };
        if self.cache != recorded.cache {
            let fresh = self.cache.as_ref().is_some_and(|p| !p.exists());
            if !fresh {
                return Err(DaemonError::refused(format!(
                    "recover {id}: the device was served with cache {}, and this names cache {}; \
                     give the recorded cache, or a new one (a path that does not exist yet, with \
                     --cache-size) if that one is lost",
                    showp(&recorded.cache),
                    showp(&self.cache)
                )));
            }
            tracing::warn!(
                "recover {id}: onto a new cache {} instead of {} (the old cache's data is not used)",
                showp(&self.cache),
                showp(&recorded.cache)
            );
        }
        Ok(())
    }

    /// The exports, `ublk` when none is given, each at most once.
    fn exports(&self) -> DaemonResult<Vec<ExportSpec>> {
        if self.exports.is_empty() {
            return Ok(vec![ExportSpec::Ublk]);
        }
        for (i, e) in self.exports.iter().enumerate() {
            if self.exports[..i].contains(e) {
                return Err(DaemonError::config(format!("--export {e} is given twice")));
            }
        }
        Ok(self.exports.clone())
    }

    /// Check what can be checked without touching any data.
    pub fn validate(&self) -> DaemonResult<Plan> {
        let config = |m: String| Err(DaemonError::config(m));
        let Some(backend) = self.backend.clone() else {
            return config("no backend: give --backend (or `backend` in the config file)".into());
        };
        let exports = self.exports()?;
        let preload = PreloadPlan::from_config(self)?;
        let metrics = self.metrics.as_deref().map(parse_addr).transpose()?;
        let with_ublk = exports.contains(&ExportSpec::Ublk);
        if !with_ublk && self.recover.is_some() {
            return config("recover re-attaches a ublk device; it needs --export ublk".into());
        }
        if !with_ublk && self.id.is_some() {
            return config("--id is the ublk device id; it needs --export ublk".into());
        }
        let line_size = match self.line_size {
            Some(ls) if ls.0 > u32::MAX as u64 => {
                return config(format!("--line-size {} is too large", ls.0))
            }
            Some(ls) => Some(ls.0 as u32),
            None => None,
        };
        if self.mode.uses_cache() && self.cache.is_none() {
            return config(format!("--mode {} needs --cache", self.mode));
        }
        if self.access.is_on() && matches!(self.mode, CacheMode::Back | CacheMode::Offline) {
            return config(format!(
                "--read-only cannot serve --mode {}: it would keep guest writes in the cache that can never \
                 reach the read-only backend; use --mode none, around or through",
                self.mode
            ));
        }
        if self.ceph_keyring.is_some() && self.ceph_keyfile.is_some() {
            return config(
                "--ceph-keyring and --ceph-keyfile both name the client's key: give one of them"
                    .into(),
            );
        }
        if !backend.is_rbd() {
            if self.ceph_conf.is_some()
                || self.ceph_keyring.is_some()
                || self.ceph_keyfile.is_some()
            {
                return config(format!(
                    "backend {backend}: --ceph-conf, --ceph-keyring and --ceph-keyfile apply to rbd: backends only"
                ));
            }
            if self.backend_timeout.is_some() {
                return config(format!(
                    "backend {backend}: --backend-timeout applies to rbd: backends only (a file or kernel \
                     block device has the kernel's own timeouts, e.g. iSCSI's replacement_timeout)"
                ));
            }
        }
        if let Some(r) = self.writeback_limit().bytes_per_sec {
            policies::pacing::check_rate(r)
                .map_err(|e| DaemonError::config(format!("--writeback-rate {e}")))?;
        }
        self.dirty_level()?;
        super::boot_trace::BootTraceJob::validate(self)?;
        Ok(Plan {
            backend,
            exports,
            line_size,
            metrics,
            preload,
        })
    }

    /// The write-back limit in effect (0 means none, as for `--preload-rate`).
    pub fn writeback_limit(&self) -> policies::WritebackLimit {
        policies::WritebackLimit {
            bytes_per_sec: self.writeback_rate.map(|r| r.0).filter(|&r| r > 0),
            writes_per_sec: self.writeback_iops.filter(|&r| r > 0),
        }
    }

    /// The dirty-level controller's settings, if it is on (`--writeback-low`
    /// or `--writeback-high` given; the other and the minimum rate default).
    pub fn dirty_level(&self) -> DaemonResult<Option<policies::DirtyLevel>> {
        if self.writeback_low.is_none() && self.writeback_high.is_none() {
            if self.writeback_min_rate.is_some() {
                return Err(DaemonError::config(
                    "--writeback-min-rate is the dirty-level controller's floor: give \
                     --writeback-low or --writeback-high to turn the controller on",
                ));
            }
            return Ok(None);
        }
        let d = policies::DirtyLevel::default();
        let level = policies::DirtyLevel {
            low_pct: self.writeback_low.map_or(d.low_pct, |p| p.0),
            high_pct: self.writeback_high.map_or(d.high_pct, |p| p.0),
            min_rate: self.writeback_min_rate.map_or(d.min_rate, |r| r.0),
        };
        level.check().map_err(|e| {
            DaemonError::config(format!(
                "--writeback-low {}% / --writeback-high {}% / --writeback-min-rate {}: {e}",
                level.low_pct, level.high_pct, level.min_rate
            ))
        })?;
        Ok(Some(level))
    }

    /// The shadow directory in effect.
    pub fn shadow_dir(&self) -> PathBuf {
        self.shadow_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SHADOW_DIR))
    }
}

/// Parse `PORT`, `:PORT` or `HOST:PORT` (HOST defaults to 127.0.0.1).
pub fn parse_addr(s: &str) -> DaemonResult<SocketAddr> {
    let s = s.trim();
    let full = if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
        format!("127.0.0.1:{port}")
    } else {
        s.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| DaemonError::config(format!("--metrics {s}: not PORT or HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| DaemonError::config(format!("--metrics {s}: resolves to no address")))
}

/// A `ranges` argument of `ctl preload`, as the control protocol carries it.
pub fn parse_range(s: &str) -> DaemonResult<(u64, u64)> {
    ranges::parse_range(s).map_err(DaemonError::config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_option_names_and_values_strings_or_numbers() {
        let c = ServeConfig::from_toml(
            "backend = \"file:/b\"\ncache-size = \"1G\"\nexport = [\"ublk\", \"nbd:unix:/s\"]\n\
             format = true\npreload-wait = false\ndepth = 64\nqueues = \"2\"\nsocket-mode = 660\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.backend, Some(BackendSpec::File("/b".into())));
        assert_eq!(c.cache_size, Some(ByteSize(1 << 30)));
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.on_foreign_cache, OnForeignCache::Format);
        assert_eq!(c.preload_start, PreloadStart::Background);
        assert_eq!((c.depth, c.queues, c.socket_mode), (64, Some(2), 0o660));
        assert_eq!(c.mode, CacheMode::Back);
        assert_eq!(c.eviction, EvictionKind::Clock);
        let c =
            ServeConfig::from_toml("backend = \"file:/b\"\nexport = \"nbd:tcp::0\"", "t").unwrap();
        assert_eq!(c.exports.len(), 1);
        assert!(c.writeback_limit().is_unlimited());
        let c = ServeConfig::from_toml(
            "backend = \"file:/b\"\nwriteback-rate = \"50M\"\nwriteback-iops = 200\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.writeback_limit(),
            policies::WritebackLimit {
                bytes_per_sec: Some(50 << 20),
                writes_per_sec: Some(200)
            }
        );
        let c = ServeConfig::from_toml("backend = \"file:/b\"\nwriteback-rate = 0\n", "t").unwrap();
        assert!(c.writeback_limit().is_unlimited(), "0 is no limit");
        assert_eq!(
            c.dirty_level().unwrap(),
            None,
            "the controller is off unless asked for"
        );
        let c = ServeConfig::from_toml(
            "backend = \"file:/b\"\nwriteback-low = \"20%\"\nwriteback-min-rate = \"4M\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.dirty_level().unwrap(),
            Some(policies::DirtyLevel {
                low_pct: 20,
                high_pct: 70,
                min_rate: 4 << 20
            })
        );
        let c =
            ServeConfig::from_toml("backend = \"file:/b\"\nwriteback-high = 50\n", "t").unwrap();
        assert_eq!(
            c.dirty_level().unwrap().map(|l| (l.low_pct, l.high_pct)),
            Some((10, 50))
        );
        let e = ServeConfig::from_toml("backend = \"file:/b\"\nwriteback-low = \"150%\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'150%' is not a percentage of the cache"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let e = ServeConfig::from_toml("backend = [1, [2]]", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend"), "{e}");
        let e = ServeConfig::from_toml("cache_size = \"1G\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache-size"), "{e}");
        let e = ServeConfig::from_toml("this is not toml", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("TOML"), "{e}");
        let e = ServeConfig::from_toml("wat = 1", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `wat`"), "{e}");
        let e = ServeConfig::from_toml("mode = \"writeback\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown cache mode 'writeback'"), "{e}");
        let e = ServeConfig::from_toml("config = \"/x\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot name another"), "{e}");
        let e = ServeConfig::from_toml("format = \"yes\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boolean"), "{e}");
    }

    #[test]
    fn a_config_round_trips_through_toml_and_json() {
        let c = ServeConfig {
            backend: Some("file:/b".parse().unwrap()),
            exports: vec![ExportSpec::Ublk, "nbd:tcp:[::1]:5".parse().unwrap()],
            socket_mode: 0o640,
            cache: Some("/c".into()),
            cache_size: Some(ByteSize(20 << 30)),
            mode: CacheMode::Offline,
            writeback_order: WritebackOrder::Relaxed,
            id: Some(42),
            dirty_data: DirtyData::Discard,
            start: Start::MigrateIn,
            preload: Some(ByteSize(512 << 20)),
            io_engine: Some(IoEngine::Sync),
            ..ServeConfig::default()
        };
        let t = toml::to_string(&c).unwrap();
        assert_eq!(ServeConfig::from_toml(&t, "t").unwrap(), c, "{t}");
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ServeConfig>(&j).unwrap(), c, "{j}");
        // Defaults are left out.
        let t = toml::to_string(&ServeConfig::default()).unwrap();
        assert_eq!(t.trim(), "mode = \"back\"");
    }

    #[test]
    fn a_file_goes_over_a_configuration_key_by_key() {
        let base = ServeConfig {
            backend: Some("file:/b".parse().unwrap()),
            cache: Some("/c".into()),
            mode: CacheMode::Through,
            depth: 64,
            run_dir: "/run/x".into(),
            ..ServeConfig::default()
        };
        let c = ServeConfig::over(&base, "mode = \"back\"\npreload = \"1M\"", "t").unwrap();
        assert_eq!(c.mode, CacheMode::Back);
        assert_eq!(c.preload, Some(ByteSize(1 << 20)));
        assert_eq!((c.depth, c.cache.clone()), (64, Some("/c".into())));
        assert_eq!(c.run_dir, PathBuf::from("/run/x"));
        assert!(ServeConfig::over(&base, "cache_size = 1", "t").is_err());
        // The global --run-dir may come from the file (ublk-cache-one writes it).
        let c = ServeConfig::over(&base, "run-dir = \"/run/y\"", "t").unwrap();
        assert_eq!(c.run_dir, PathBuf::from("/run/y"));
        assert!(ServeConfig::over(&base, "run-dir = 3", "t").is_err());
    }

    #[test]
    fn recover_keeps_the_backend_and_the_cache_unless_the_cache_is_new() {
        let d = tempfile::tempdir().unwrap();
        let old_cache = d.path().join("c.img");
        std::fs::write(&old_cache, b"x").unwrap();
        let other = d.path().join("other.img");
        std::fs::write(&other, b"x").unwrap();
        let recorded = ServeConfig {
            backend: Some("file:/b".parse().unwrap()),
            cache: Some(old_cache.clone()),
            ..ServeConfig::default()
        };
        recorded.check_recovers(7, &recorded).unwrap();
        let e = ServeConfig {
            backend: Some("file:/other".parse().unwrap()),
            ..recorded.clone()
        }
        .check_recovers(7, &recorded)
        .unwrap_err()
        .to_string();
        assert!(e.contains("file:/b") && e.contains("file:/other"), "{e}");
        let e = ServeConfig {
            cache: Some(other.clone()),
            ..recorded.clone()
        }
        .check_recovers(7, &recorded)
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&old_cache.display().to_string())
                && e.contains(&other.display().to_string()),
            "{e}"
        );
        ServeConfig {
            cache: Some(d.path().join("fresh.img")),
            ..recorded.clone()
        }
        .check_recovers(7, &recorded)
        .expect("a new cache replaces a lost one");
    }

    #[test]
    fn validate_names_the_problem() {
        let base = ServeConfig {
            backend: Some("file:/x".parse().unwrap()),
            cache: Some("/c".into()),
            ..ServeConfig::default()
        };
        let plan = base.validate().unwrap();
        assert_eq!(plan.exports, vec![ExportSpec::Ublk]);
        for (c, want) in [
            (
                ServeConfig {
                    backend: None,
                    ..base.clone()
                },
                "no backend",
            ),
            (
                ServeConfig {
                    writeback_rate: Some(ByteSize(64 << 10)),
                    ..base.clone()
                },
                "--writeback-rate 65536 bytes/s is below the lowest allowed, 1M",
            ),
            (
                ServeConfig {
                    writeback_low: Some(Percent(80)),
                    ..base.clone()
                },
                "--writeback-low 80% / --writeback-high 70% / --writeback-min-rate 1048576: \
                 the low watermark 80% is not below the high one 70%",
            ),
            (
                ServeConfig {
                    writeback_high: Some(Percent(0)),
                    ..base.clone()
                },
                "the high watermark 0% is not in 1..=100",
            ),
            (
                ServeConfig {
                    writeback_high: Some(Percent(50)),
                    writeback_min_rate: Some(ByteSize(1000)),
                    ..base.clone()
                },
                "the minimum write-back rate 1000 bytes/s is below the lowest allowed, 1M",
            ),
            (
                ServeConfig {
                    writeback_min_rate: Some(ByteSize(8 << 20)),
                    ..base.clone()
                },
                "--writeback-min-rate is the dirty-level controller's floor: give --writeback-low or \
                 --writeback-high to turn the controller on",
            ),
            (
                ServeConfig {
                    cache: None,
                    mode: CacheMode::Offline,
                    ..base.clone()
                },
                "--mode offline needs --cache",
            ),
            (
                ServeConfig {
                    backend_timeout: Some(5),
                    ..base.clone()
                },
                "--backend-timeout applies to rbd: backends only",
            ),
            (
                ServeConfig {
                    exports: vec!["nbd:tcp::0".parse().unwrap()],
                    recover: Some(3),
                    ..base.clone()
                },
                "needs --export ublk",
            ),
            (
                ServeConfig {
                    line_size: Some(ByteSize(1 << 40)),
                    ..base.clone()
                },
                "too large",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}

#[cfg(all(test, feature = "rbd"))]
mod example_tests {
    use super::*;

    /// The example shipped for the systemd unit must stay valid.
    #[test]
    fn the_shipped_example_config_parses() {
        let c = ServeConfig::from_toml(
            include_str!("../../../contrib/systemd/ublk-cache.toml.example"),
            "example",
        )
        .unwrap();
        assert_eq!(c.id, Some(42));
        assert_eq!(c.preload, Some(ByteSize(512 << 20)));
        assert_eq!(c.mode, CacheMode::Back);
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9842"));
        c.validate().unwrap();
    }
}
