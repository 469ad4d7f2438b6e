//! The `ublk-cache` binary: command line, logging, and the commands.

mod cli;
mod config;
mod control;
mod progress;
mod ranges;
mod server;
mod size;
mod spec;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ublk_cache::frontend::ublk as fe;

use cli::{Cli, Command, ServeArgs};
use server::registry;

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ublk-cache: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-cache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parse the command line; for `serve`/`recover --config FILE`, with the file's
/// options added (those not given on the command line) before parsing, so
/// that required options (`--backend`) may come from the file alone.
fn parse_cli() -> Result<Cli> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let Some(path) = config::config_path(&argv) else {
        return Ok(Cli::parse_from(&argv));
    };
    let mut full = argv.clone();
    full.extend(config::config_args(&path, &argv)?);
    Cli::try_parse_from(&full)
        .map_err(|e| anyhow::anyhow!("with the options from config {}: {e}", path.display()))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UBLK_CACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `init` also routes the `log` records of libublk into tracing.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes would break the drivers' and tests' greps of the log.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(cli: Cli) -> Result<()> {
    let run_dir = registry::run_dir(cli.run_dir.as_deref());
    match cli.command {
        Command::Serve(args) => server::serve(&args, &run_dir),
        Command::Recover { device, mut serve } => {
            serve.recover = Some(device);
            server::serve(&serve, &run_dir)
        }
        Command::List { json } => list(&run_dir, json),
        Command::Stop {
            target,
            detach,
            timeout,
        } => stop(&run_dir, &target, detach, timeout),
        Command::Demo {
            dir,
            size,
            cache_size,
        } => demo(dir.as_deref(), size, cache_size, &run_dir),
        Command::Ctl { target, verb, json } => ctl(&run_dir, &target, verb, json),
        Command::MigrateOut { target, json } => {
            control_call(&run_dir, &target, control::Request::MigrateOut, json)
        }
        Command::MigrateAbort { target, json } => {
            control_call(&run_dir, &target, control::Request::MigrateAbort, json)
        }
    }
}

fn ctl(run_dir: &Path, target: &str, verb: cli::CtlVerb, json: bool) -> Result<()> {
    use cli::CtlVerb;
    use control::Request;
    let req = match verb {
        CtlVerb::Stats => Request::Stats,
        CtlVerb::Mode { mode } => Request::Mode {
            mode: mode.to_string(),
        },
        CtlVerb::Flush => Request::Flush,
        CtlVerb::Preload { range } => Request::Preload {
            ranges: range
                .map(|r| ranges::parse_range(&r))
                .transpose()?
                .map(|r| vec![r]),
        },
        CtlVerb::Invalidate => Request::Invalidate,
    };
    control_call(run_dir, target, req, json)
}

/// Send one request to a server's control socket; progress goes to stderr, the
/// result to stdout (JSON with --json, else a readable form).
fn control_call(run_dir: &Path, target: &str, req: control::Request, json: bool) -> Result<()> {
    let id = parse_target(target)?;
    let path = control::socket_path(run_dir, id);
    let view = progress::ProgressView::new(json);
    let is_stats = matches!(req, control::Request::Stats);
    let result = control::client::call(&path, &req, |p| view.show(p))?;
    if json {
        println!("{}", serde_json::to_string(&result)?);
    } else if is_stats {
        print_stats(&result);
    } else {
        println!("{}", human_result(&result));
    }
    Ok(())
}

/// `key=value` pairs of a flat JSON object, one line.
fn human_result(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => v.to_string(),
    }
}

fn print_stats(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    println!(
        "disk {}  mode {} ({})  backend {}  cache {}",
        g("id"),
        s("mode"),
        s("order"),
        s("backend"),
        s("cache")
    );
    println!(
        "cache: {} of {} used, {} dirty, line {} KiB, epoch {}",
        mib(g("valid_bytes")),
        mib(g("cache_lines") * g("line_size")),
        mib(g("dirty_bytes")),
        g("line_size") >> 10,
        g("epoch")
    );
    println!(
        "reads:  {} hits, {} misses, {} partial; {} from cache, {} from backend",
        g("read_hits"),
        g("read_misses"),
        g("read_partial"),
        mib(g("read_hit_bytes")),
        mib(g("read_miss_bytes"))
    );
    println!(
        "writes: {} hits, {} misses, {} partial; {} written",
        g("write_hits"),
        g("write_misses"),
        g("write_partial"),
        mib(g("write_bytes"))
    );
    let rate = |k: &str| {
        v.get("rates")
            .and_then(|r| r.get(k))
            .and_then(|x| x.as_u64())
            .unwrap_or(0)
    };
    println!(
        "backend: {} read, {} written ({} write-back, {}/s now); errors {}, write-back retries {}",
        mib(g("backend_read_bytes")),
        mib(g("backend_write_bytes")),
        mib(g("writeback_bytes")),
        mib(rate("writeback_bps")),
        g("backend_errors"),
        g("writeback_retries")
    );
    println!(
        "cache device: {} read, {} written; errors {}; preload fetched {}",
        mib(g("cache_read_bytes")),
        mib(g("cache_write_bytes")),
        g("cache_errors"),
        mib(g("preload_bytes"))
    );
    if let Some(lat) = v.get("latency").and_then(|l| l.as_array()) {
        println!("latency (µs)   count      p50      p90      p99    p99.9");
        for l in lat {
            let f = |k: &str| l.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            println!(
                "  {:<8} {:>9} {:>8} {:>8} {:>8} {:>8}",
                l.get("op").and_then(|x| x.as_str()).unwrap_or("?"),
                f("count"),
                f("p50_us"),
                f("p90_us"),
                f("p99_us"),
                f("p999_us")
            );
        }
    }
}

#[derive(serde::Serialize)]
struct ListRow {
    id: u32,
    device: String,
    pid: u32,
    alive: bool,
    mode: String,
    backend: String,
    cache: String,
    state: String,
    kernel_state: String,
    /// The device path and/or NBD URIs.
    exports: Vec<String>,
}

fn list(run_dir: &Path, json: bool) -> Result<()> {
    let (recs, problems) = registry::all(run_dir);
    for p in &problems {
        eprintln!("ublk-cache: warning: unreadable registry record: {p}");
    }
    let kernel = fe::list_devices().unwrap_or_default();
    let mut rows: Vec<ListRow> = recs
        .into_iter()
        .map(|r| {
            let k = kernel.iter().find(|d| d.id == r.id);
            let kernel_state = match k {
                Some(d) => d.state.to_string(),
                None if r.has_device() => "absent".into(),
                None => "-".into(), // NBD only: no ublk device
            };
            ListRow {
                alive: registry::pid_alive(r.pid),
                kernel_state,
                exports: r.exports,
                id: r.id,
                device: r.device,
                pid: r.pid,
                mode: r.mode,
                backend: r.backend,
                cache: r.cache,
                state: r.state,
            }
        })
        .collect();
    // Devices the kernel has that no record names (a server that crashed before
    // writing one, or another ublk program).
    for d in &kernel {
        if !rows.iter().any(|r| r.id == d.id) {
            rows.push(ListRow {
                id: d.id,
                device: d.bdev.display().to_string(),
                pid: d.daemon_pid.max(0) as u32,
                alive: d.daemon_alive,
                mode: "?".into(),
                backend: "?".into(),
                cache: "?".into(),
                state: "unregistered".into(),
                kernel_state: d.state.to_string(),
                exports: vec![d.bdev.display().to_string()],
            });
        }
    }
    rows.sort_by_key(|r| r.id);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<7} {:<14} {:<8} {:<6} {:<8} {:<10} {:<9} BACKEND -> CACHE",
        "ID", "DEVICE", "PID", "ALIVE", "MODE", "STATE", "KERNEL"
    );
    for r in rows {
        let device = if r.device.is_empty() { "-" } else { &r.device };
        println!(
            "{:<7} {:<14} {:<8} {:<6} {:<8} {:<10} {:<9} {} -> {}",
            r.id, device, r.pid, r.alive, r.mode, r.state, r.kernel_state, r.backend, r.cache
        );
        // NBD exports on their own lines: URIs are long.
        for e in r.exports.iter().filter(|e| **e != r.device) {
            println!("        export {e}");
        }
    }
    Ok(())
}

fn parse_target(target: &str) -> Result<u32> {
    let t = target.trim();
    let digits = t.strip_prefix("/dev/ublkb").unwrap_or(t);
    digits
        .parse()
        .with_context(|| format!("'{target}' is neither a device id nor /dev/ublkbN"))
}

fn stop(run_dir: &Path, target: &str, detach: bool, timeout: u64) -> Result<()> {
    let id = parse_target(target)?;
    let record = registry::read(run_dir, id)?;
    let pid = match &record {
        Some(r) => r.pid,
        None => match fe::device_info(id) {
            Ok(d) if d.daemon_pid > 0 => d.daemon_pid as u32,
            _ => bail!(
                "no server for device {id} (no record in {} and no such live device)",
                run_dir.display()
            ),
        },
    };
    if !registry::pid_alive(pid) {
        if record.as_ref().is_some_and(|r| !r.has_device()) {
            bail!("the NBD server {id} (pid {pid}) is not running; start `ublk-cache serve` again on the same cache to recover its data");
        }
        bail!("the server of device {id} (pid {pid}) is not running; use `ublk-cache recover {id}` to take over the device");
    }
    let sig = if detach { libc::SIGUSR1 } else { libc::SIGTERM };
    // SAFETY: sending a signal to a pid; no memory is involved.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("signalling pid {pid}"));
    }
    eprintln!(
        "ublk-cache: asked pid {pid} to {}; waiting for it to exit",
        if detach { "detach" } else { "stop" }
    );
    let start = Instant::now();
    while registry::pid_alive(pid) {
        if timeout > 0 && start.elapsed() > Duration::from_secs(timeout) {
            bail!("pid {pid} is still running after {timeout}s (write-back may still be in progress; see its log)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn demo(dir: Option<&Path>, size: u64, cache_size: u64, run_dir: &Path) -> Result<()> {
    // Without the ublk driver the demo serves over NBD; any other problem with
    // /dev/ublk-control (permissions) is reported as it is.
    let over_nbd = match fe::check_control() {
        Ok(()) => false,
        Err(fe::UblkError::ControlMissing) => true,
        Err(e) => bail!(
            "{e}\n\nThe demo serves a disk as /dev/ublkbN, which needs access to the kernel's ublk driver."
        ),
    };
    let base = match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => tempfile::Builder::new()
            .prefix("ublk-cache-demo.")
            .tempdir()?
            .keep(),
    };
    let backend = base.join("backend.img");
    if !backend.exists() {
        let f = std::fs::File::create(&backend)?;
        f.set_len(size)?;
    }
    let cache = base.join("cache.img");
    eprintln!(
        "ublk-cache demo: backend {} ({size} bytes, sparse), cache {} ({cache_size} bytes), mode back. Stop with Ctrl-C.",
        backend.display(),
        cache.display()
    );
    let mut exports = vec![spec::ExportSpec::Ublk];
    if over_nbd {
        let sock = base.join("nbd.sock");
        let uri = ublk_cache::frontend::nbd::uri_for_unix(&sock);
        eprintln!(
            "ublk-cache demo: /dev/ublk-control is missing (this kernel has no ublk driver), so the disk is \
             served over NBD on {} instead. Connect with, for example:\n\
             \x20   nbdinfo '{uri}'\n\
             \x20   qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{uri}'\n\
             \x20   qemu-img info '{uri}'\n\
             \x20   qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio\n\
             (For /dev/ublkbN: load the ublk driver with `modprobe ublk_drv` on Linux 6.0 or newer, or use \
             the VM test bed, tests/vm/run-suite.sh.)",
            sock.display()
        );
        exports = vec![spec::ExportSpec::Nbd(
            ublk_cache::frontend::nbd::ListenSpec::Unix(sock),
        )];
    }
    let args = ServeArgs {
        backend: spec::BackendSpec::File(backend),
        exports,
        socket_mode: 0o600,
        tls: cli::TlsArgs {
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls: None,
        },
        ceph: cli::CephArgs {
            ceph_conf: None,
            ceph_id: "admin".into(),
            ceph_keyring: None,
            ceph_keyfile: None,
            backend_timeout: None,
        },
        cache: Some(cache),
        cache_size: Some(cache_size),
        mode: policies::CacheMode::Back,
        line_size: None,
        writeback_order: policies::WritebackOrder::Ordered,
        queues: None,
        depth: 128,
        id: None,
        recover: None,
        format: false,
        discard_dirty: false,
        accept_backend_change: false,
        config: None,
        preload: None,
        preload_ranges: None,
        preload_rate: None,
        preload_wait: false,
        metrics: None,
        migrate_in: false,
        read_only: false,
    };
    server::serve(&args, run_dir)
}
