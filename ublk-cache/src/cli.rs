//! Command line (clap). Machine-readable on purpose: the OpenNebula drivers and
//! the tests script it. Logs go to stderr; stdout carries only results.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use policies::{CacheMode, EvictionKind, WritebackOrder};
use ublk_cache::boot_trace::BootTraceMode;
use ublk_cache::daemon::config::{
    Access, ByteSize, DirtyData, OnBackendChange, OnForeignCache, Percent, PreloadStart,
    ServeConfig, Start,
};
use ublk_cache::daemon::size::parse_size;
use ublk_cache::daemon::spec::{parse_mode, BackendSpec, ExportSpec};
use ublk_cache::daemon::tls::TlsMode;

#[derive(Debug, Parser)]
#[command(
    name = "ublk-cache",
    version,
    about = "Per-disk block device server with a local cache in front of a slow backend"
)]
pub struct Cli {
    /// Directory of the run-time registry (default /run/ublk-cache, or $UBLK_CACHE_RUN_DIR).
    #[arg(long, global = true)]
    pub run_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a disk in the foreground, as /dev/ublkbN and/or over NBD. Once every export
    /// is live, prints one line per export on stdout: the device path or the NBD URI.
    Serve(ServeArgs),
    /// Re-attach a new server to device ID after the old one died or detached (same as serve --recover ID).
    Recover {
        /// The ublk device id (N of /dev/ublkbN). (Not named `id`: that clashes
        /// with serve's `--id`, which clap rejects.)
        #[arg(value_name = "ID")]
        device: u32,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// List the servers on this host.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a server cleanly: finish I/O, write back dirty data, remove the device.
    Stop {
        /// Device id or /dev/ublkbN.
        target: String,
        /// Leave the device in place for `recover` (upgrade) instead of removing it; dirty data stays in the cache.
        #[arg(long)]
        detach: bool,
        /// Seconds to wait for the server to exit (0 waits forever; write-back can take long).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// Talk to a running server through its control socket.
    Ctl {
        /// Server id (as in `ublk-cache list`) or /dev/ublkbN.
        target: String,
        #[command(subcommand)]
        verb: CtlVerb,
        /// Print the result as JSON (progress lines on stderr are JSON too).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Live migration, source side (premigrate): switch to write-through, write all
    /// dirty data back, flush the backend, release the backend's lock, keep serving.
    MigrateOut {
        /// Server id or /dev/ublkbN.
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Undo migrate-out (failmigrate): take the backend's lock back, return to the
    /// previous mode.
    MigrateAbort {
        /// Server id or /dev/ublkbN.
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a sparse backend and cache in a temporary directory and serve them in back
    /// mode as /dev/ublkbN, or over NBD on a unix socket where the kernel has no ublk.
    Demo {
        /// Where to put the backend and cache files (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the demo disk.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Size of the demo cache.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        cache_size: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// Counters, rates and latency percentiles.
    Stats,
    /// Switch the cache mode live (leaving back/offline writes everything back first).
    Mode {
        /// none, around, through or back.
        mode: CacheMode,
    },
    /// Write all dirty data back and flush the backend; returns when it is durable there.
    Flush,
    /// Read a range into the cache: LEN (from the start) or OFFSET+LEN, e.g. 512M or 1G+256M
    /// (default: the server's --preload ranges).
    Preload { range: Option<String> },
    /// Drop all clean cached data (refused while dirty data remains).
    Invalidate,
    /// Show or change background write-back's limit while serving (until the
    /// server stops): an option given replaces that part, 0 lifts it.
    WritebackLimit {
        /// Backend bytes per second, e.g. 50M (0: no limit).
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        rate: Option<u64>,
        /// Backend writes per second (0: no limit).
        #[arg(long, value_name = "N")]
        iops: Option<u64>,
    },
}

/// The options of `serve` and `recover`. Every one is optional here: what is
/// not given comes from the config file (`--config`), or, for `recover`, from
/// the registry record of the server being recovered, else the default.
#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)]
pub struct ServeArgs {
    /// A TOML file of serve options: keys are the long option names (backend = "file:/x",
    /// cache-size = "20G", export = ["ublk"], …). Options on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The slow disk: file:PATH, dev:/dev/X, or rbd:POOL/IMAGE[@SNAP] (a snapshot is served read-only).
    #[arg(long)]
    pub backend: Option<BackendSpec>,
    /// Where to serve the disk (repeatable): ublk (a /dev/ublkbN device; the default),
    /// nbd:unix:PATH, or nbd:tcp:[HOST]:PORT (HOST defaults to 127.0.0.1, PORT to 10809).
    #[arg(long = "export", value_name = "EXPORT")]
    pub exports: Vec<ExportSpec>,
    /// Permissions of NBD unix sockets, octal [default: 0600].
    #[arg(long, value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub ceph: CephArgs,
    /// The cache: a file (created and sized from --cache-size if missing) or a block device such as an LV.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Bytes of the cache to use, e.g. 512M or 20G (default: the whole cache device or file).
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// none, around, through, back or offline [default: back].
    #[arg(long)]
    pub mode: Option<CacheMode>,
    /// Cache line size, 4K to 1M (a new cache only; default 64K).
    #[arg(long, value_parser = parse_size)]
    pub line_size: Option<u64>,
    /// ordered (the backend is always at one of the guest's flush points) or relaxed
    /// (faster; see README) [default: ordered].
    #[arg(long)]
    pub writeback_order: Option<WritebackOrder>,
    /// Background write-back backend bytes per second at most, e.g. 50M (0: no
    /// limit). stop, ctl flush, mode switches and migration drain unpaced.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub writeback_rate: Option<u64>,
    /// Background write-back backend writes per second at most (0: no limit).
    #[arg(long, value_name = "N")]
    pub writeback_iops: Option<u64>,
    /// Pace background write-back by how much of the cache is dirty: at
    /// --writeback-min-rate up to this share of dirty lines, faster above it,
    /// unpaced from --writeback-high on, when the guest has not written for 5 s,
    /// or while a guest write waits for room (e.g. 10%; giving this or
    /// --writeback-high turns the controller on; default: off, write-back as
    /// fast as --writeback-rate lets it).
    #[arg(long, value_name = "PERCENT")]
    pub writeback_low: Option<Percent>,
    /// The share of dirty lines from which write-back runs unpaced [default
    /// with the controller on: 70%].
    #[arg(long, value_name = "PERCENT")]
    pub writeback_high: Option<Percent>,
    /// The controller's lowest write-back rate [default: 1M].
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub writeback_min_rate: Option<u64>,
    /// Which clean line to give up when the cache is full: clock or lru [default: clock].
    #[arg(long)]
    pub eviction: Option<EvictionKind>,
    /// ublk hardware queues (default min(CPUs, 4)).
    #[arg(long)]
    pub queues: Option<u16>,
    /// Requests in flight per queue [default: 128].
    #[arg(long)]
    pub depth: Option<u16>,
    /// Device id N for /dev/ublkbN (default: the kernel picks one).
    #[arg(long)]
    pub id: Option<u32>,
    /// Re-attach to existing device ID after a crash or upgrade instead of creating one.
    #[arg(long, value_name = "ID")]
    pub recover: Option<u32>,
    /// Initialize a cache device that holds something else. Destroys its contents.
    #[arg(long)]
    pub format: bool,
    /// Drop dirty data found in the cache instead of refusing to start. LOSES every
    /// write the cache holds that has not reached the backend.
    #[arg(long)]
    pub discard_dirty: bool,
    /// Keep and write back dirty data although the backend changed since the cache
    /// detached; the backend's newer data in those ranges is overwritten.
    #[arg(long)]
    pub accept_backend_change: bool,
    /// Read the first SIZE of the disk into the cache at start (in the background
    /// unless --preload-wait).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub preload: Option<u64>,
    /// Preload the ranges listed in FILE instead: one `OFFSET LEN` (or `OFFSET+LEN`)
    /// per line, sizes like 4K/1M/2G, `#` comments.
    #[arg(long, value_name = "FILE")]
    pub preload_ranges: Option<PathBuf>,
    /// Preload (and offline hydration) backend bytes per second at most, e.g. 100M.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub preload_rate: Option<u64>,
    /// Make the device appear only after the preload is done.
    #[arg(long)]
    pub preload_wait: bool,
    /// Record what the guest reads while it boots into the disk's boot trace
    /// (record), prefetch that trace ahead of the guest (replay), or both (auto)
    /// [default: off].
    #[arg(long, value_name = "MODE")]
    pub boot_trace: Option<BootTraceMode>,
    /// Where boot traces are kept [default: /var/lib/ublk-cache/traces].
    #[arg(long, value_name = "DIR")]
    pub boot_trace_dir: Option<PathBuf>,
    /// The key of this disk's trace: disks with one key share it (clones of one
    /// image) [default: the backend's kind and name].
    #[arg(long, value_name = "KEY")]
    pub boot_trace_key: Option<String>,
    /// Seconds from the guest's first request that count as its boot [default: 120].
    #[arg(long, value_name = "SECS")]
    pub boot_trace_window: Option<u32>,
    /// How far (seconds of the trace) prefetch may run ahead of the guest [default: 5].
    #[arg(long, value_name = "SECS")]
    pub boot_trace_ahead: Option<u32>,
    /// Record every guest request (op, offset, length, submit and completion time)
    /// in FILE, for study and replay (a debug tool; see README).
    #[arg(long, value_name = "FILE")]
    pub io_trace: Option<PathBuf>,
    /// Serve the stats in Prometheus text format at http://ADDR/metrics (PORT or HOST:PORT;
    /// HOST defaults to 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Live migration, destination side: start with a cold cache (clean data from an
    /// earlier stay on this host may be older than the source's last write).
    #[arg(long)]
    pub migrate_in: bool,
    /// Open the backend read-only and share it (CD-ROMs, images several VMs read):
    /// an RBD image without its exclusive lock, a file or device with a shared
    /// flock. Guest writes fail with EIO. Needs --mode none, around or through.
    #[arg(long)]
    pub read_only: bool,
}

/// TLS on the NBD exports (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// The server's TLS certificate chain (PEM). Offers TLS on every NBD export.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must present a certificate one of them signed.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// require (the default with --tls-cert): refuse clients that do not upgrade to TLS;
    /// optional: let them choose; off: no TLS.
    #[arg(long, value_name = "MODE")]
    pub tls: Option<TlsMode>,
}

/// How an rbd: backend reaches its cluster (refused for other backends).
#[derive(Debug, Clone, Args)]
pub struct CephArgs {
    /// ceph.conf of the cluster (default: $CEPH_CONF, then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client name, without "client." [default: admin].
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,
    /// Keyring with the client's key (default: the one ceph.conf names).
    #[arg(long, value_name = "PATH", conflicts_with = "ceph_keyfile")]
    pub ceph_keyring: Option<PathBuf>,
    /// A file that holds only the client's key, as `rbd --keyfile` takes it
    /// (OpenNebula's CEPH_KEY), instead of a keyring.
    #[arg(long, value_name = "PATH")]
    pub ceph_keyfile: Option<PathBuf>,
    /// Seconds a backend request (rbd: only) waits for the cluster before it fails
    /// with EIO (default 30; 0 waits forever). Write-back that times out is retried.
    #[arg(long, value_name = "SECS")]
    pub backend_timeout: Option<u64>,
}

impl ServeArgs {
    /// Put every option given on the command line into `cfg` (they win over
    /// the config file's and the registry's).
    pub fn apply(self, cfg: &mut ServeConfig) {
        fn set<T>(field: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *field = v;
            }
        }
        fn set_opt<T>(field: &mut Option<T>, v: Option<T>) {
            if v.is_some() {
                *field = v;
            }
        }
        set_opt(&mut cfg.backend, self.backend);
        if !self.exports.is_empty() {
            cfg.exports = self.exports;
        }
        set(&mut cfg.socket_mode, self.socket_mode);
        set_opt(&mut cfg.tls_cert, self.tls.tls_cert);
        set_opt(&mut cfg.tls_key, self.tls.tls_key);
        set_opt(&mut cfg.tls_ca, self.tls.tls_ca);
        set_opt(&mut cfg.tls, self.tls.tls);
        set_opt(&mut cfg.ceph_conf, self.ceph.ceph_conf);
        set(&mut cfg.ceph_id, self.ceph.ceph_id);
        set_opt(&mut cfg.ceph_keyring, self.ceph.ceph_keyring);
        set_opt(&mut cfg.ceph_keyfile, self.ceph.ceph_keyfile);
        set_opt(&mut cfg.backend_timeout, self.ceph.backend_timeout);
        set_opt(&mut cfg.cache, self.cache);
        set_opt(&mut cfg.cache_size, self.cache_size.map(ByteSize));
        set(&mut cfg.mode, self.mode);
        set_opt(&mut cfg.line_size, self.line_size.map(ByteSize));
        set(&mut cfg.writeback_order, self.writeback_order);
        set_opt(&mut cfg.writeback_rate, self.writeback_rate.map(ByteSize));
        set_opt(&mut cfg.writeback_iops, self.writeback_iops);
        set_opt(&mut cfg.writeback_low, self.writeback_low);
        set_opt(&mut cfg.writeback_high, self.writeback_high);
        set_opt(
            &mut cfg.writeback_min_rate,
            self.writeback_min_rate.map(ByteSize),
        );
        set(&mut cfg.eviction, self.eviction);
        set_opt(&mut cfg.queues, self.queues);
        set(&mut cfg.depth, self.depth);
        set_opt(&mut cfg.id, self.id);
        set_opt(&mut cfg.recover, self.recover);
        if self.format {
            cfg.on_foreign_cache = OnForeignCache::Format;
        }
        if self.discard_dirty {
            cfg.dirty_data = DirtyData::Discard;
        }
        if self.accept_backend_change {
            cfg.on_backend_change = OnBackendChange::WriteBack;
        }
        set_opt(&mut cfg.preload, self.preload.map(ByteSize));
        set_opt(&mut cfg.preload_ranges, self.preload_ranges);
        set_opt(&mut cfg.preload_rate, self.preload_rate.map(ByteSize));
        if self.preload_wait {
            cfg.preload_start = PreloadStart::BeforeExports;
        }
        set(&mut cfg.boot_trace, self.boot_trace);
        set_opt(&mut cfg.boot_trace_dir, self.boot_trace_dir);
        set_opt(&mut cfg.boot_trace_key, self.boot_trace_key);
        set_opt(&mut cfg.boot_trace_window, self.boot_trace_window);
        set_opt(&mut cfg.boot_trace_ahead, self.boot_trace_ahead);
        set_opt(&mut cfg.io_trace, self.io_trace);
        set_opt(&mut cfg.metrics, self.metrics);
        if self.migrate_in {
            cfg.start = Start::MigrateIn;
        }
        if self.read_only {
            cfg.access = Access::ReadOnly;
        }
    }
}
