//! The commands. `serve`, `recover` and `demo` build a `ServeConfig` (config
//! file, command line, environment) and run `daemon::Server`; the others read
//! the registry, signal a server, or speak to its control socket.
//!
//! What `main` read from the environment (`UBLK_CACHE_RUN_DIR`,
//! `UBLK_CACHE_SHADOW_DIR`, `UBLK_CACHE_IO_ENGINE`) becomes configuration here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ublk_cache::daemon::config::{ByteSize, IoEngine, ServeConfig};
use ublk_cache::daemon::control::{self, client, Reply, Request, StatsReply};
use ublk_cache::daemon::progress::ProgressView;
use ublk_cache::daemon::registry::{self, DEFAULT_RUN_DIR};
use ublk_cache::daemon::spec::{BackendSpec, ExportSpec};
use ublk_cache::daemon::{config, Server, StopToken};
use ublk_cache::engine::BootPhase;
use ublk_cache::frontend::ublk as fe;

use crate::cli::{Cli, Command, CtlVerb, ServeArgs};
use crate::Environment;

/// Why a command failed: its input (exit code 2) or its work (1).
pub enum Failure {
    Usage(anyhow::Error),
    Run(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Run(e.into())
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

pub fn run(cli: Cli, env: &Environment) -> Result<(), Failure> {
    let given_run_dir = cli.run_dir.clone();
    let run_dir = cli
        .run_dir
        .or_else(|| env.run_dir.clone().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
    match cli.command {
        Command::Serve(args) => {
            let run_dir = serve_run_dir(&args, given_run_dir, run_dir).map_err(usage)?;
            let cfg = serve_config(args, None, &run_dir, env).map_err(usage)?;
            serve(cfg)?
        }
        Command::Recover {
            device,
            serve: args,
        } => {
            let run_dir = serve_run_dir(&args, given_run_dir, run_dir).map_err(usage)?;
            let cfg = serve_config(args, Some(device), &run_dir, env).map_err(usage)?;
            serve(cfg)?
        }
        Command::List { json } => list(&run_dir, json)?,
        Command::Stop {
            target,
            detach,
            timeout,
        } => stop(&run_dir, &target, detach, timeout)?,
        Command::Demo {
            dir,
            size,
            cache_size,
        } => demo(dir.as_deref(), size, cache_size, &run_dir, env)?,
        Command::Ctl { target, verb, json } => ctl(&run_dir, &target, verb, json)?,
        Command::MigrateOut { target, json } => {
            control_call(&run_dir, &target, Request::MigrateOut, json)?
        }
        Command::MigrateAbort { target, json } => {
            control_call(&run_dir, &target, Request::MigrateAbort, json)?
        }
    }
    Ok(())
}

/// The run directory of `serve`/`recover`: `--run-dir`, else the config
/// file's `run-dir`, else `$UBLK_CACHE_RUN_DIR` or the default (`otherwise`).
fn serve_run_dir(args: &ServeArgs, given: Option<PathBuf>, otherwise: PathBuf) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let from_file = match &args.config {
        Some(path) => ServeConfig::run_dir_of_file(path)?,
        None => None,
    };
    Ok(from_file.unwrap_or(otherwise))
}

/// The configuration of `serve` (and `recover DEVICE`): the config file, with
/// the command line over it, then what the environment says where neither did.
/// To recover a device whose server is in the registry, its recorded
/// configuration is the base: `recover ID` needs nothing else, and what is
/// given still wins (but not another backend, and not another existing cache).
fn serve_config(
    args: ServeArgs,
    recover: Option<u32>,
    run_dir: &Path,
    env: &Environment,
) -> Result<ServeConfig> {
    let recover = recover.or(args.recover);
    let recorded = match recover {
        Some(id) => match registry::read(run_dir, id) {
            Ok(r) => r.and_then(|r| r.config),
            Err(e) => {
                tracing::warn!("the registry record of {id} is unreadable ({e}); recovering with what is given");
                None
            }
        },
        None => None,
    };
    let mut base = recorded.clone().unwrap_or_default();
    base.run_dir = run_dir.to_path_buf();
    let mut cfg = match &args.config {
        Some(path) => ServeConfig::over_file(&base, path)?,
        None => base,
    };
    args.apply(&mut cfg);
    // The resolved run directory wins over the recorded one and the file's.
    cfg.run_dir = run_dir.to_path_buf();
    if recover.is_some() {
        cfg.recover = recover;
    }
    from_environment(&mut cfg, env)?;
    if let (Some(id), Some(recorded)) = (cfg.recover, &recorded) {
        cfg.check_recovers(id, recorded)?;
        tracing::info!(
            id,
            "recovering with the configuration recorded when it was started"
        );
    }
    Ok(cfg)
}

/// `UBLK_CACHE_SHADOW_DIR` and `UBLK_CACHE_IO_ENGINE`, where the configuration
/// does not say. A misspelt engine is an error: the operator asked for something.
fn from_environment(cfg: &mut ServeConfig, env: &Environment) -> Result<()> {
    if cfg.shadow_dir.is_none() {
        cfg.shadow_dir = env.shadow_dir.clone().map(PathBuf::from);
    }
    if let (None, Some(v)) = (cfg.io_engine, &env.io_engine) {
        let name = Environment::IO_ENGINE;
        let v = v
            .to_str()
            .ok_or_else(|| anyhow!("{name} is not valid UTF-8"))?;
        let e: IoEngine = v.parse().map_err(|e| anyhow!("{name}: {e}"))?;
        cfg.io_engine = Some(e);
    }
    Ok(())
}

/// Run a server in the foreground until it is stopped.
fn serve(cfg: ServeConfig) -> Result<()> {
    let server = Server::new(cfg);
    install_signals(server.stop_token())?;
    let running = server.start()?;
    announce(running.export_lines());
    running.wait()?;
    Ok(())
}

/// Print what the drivers and tests wait for, all at once, and tell systemd
/// (`Type=notify`) that the server is ready.
fn announce(lines: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    crate::notify::ready(lines);
}

/// SIGTERM/SIGINT: clean stop. SIGUSR1: detach for an upgrade.
fn install_signals(stop: StopToken) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    tracing::info!("SIGUSR1: detaching, the device stays for recover");
                    stop.detach();
                } else {
                    tracing::info!(signal = sig, "stop requested");
                    stop.stop();
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn ctl(run_dir: &Path, target: &str, verb: CtlVerb, json: bool) -> Result<()> {
    let req = match verb {
        CtlVerb::Stats => Request::Stats,
        CtlVerb::Mode { mode } => Request::Mode { mode },
        CtlVerb::Flush => Request::Flush,
        CtlVerb::Preload { range } => Request::Preload {
            ranges: range
                .map(|r| config::parse_range(&r))
                .transpose()?
                .map(|r| vec![r]),
        },
        CtlVerb::Invalidate => Request::Invalidate,
        CtlVerb::WritebackLimit { rate, iops } => Request::WritebackLimit {
            bytes_per_sec: rate,
            writes_per_sec: iops,
        },
    };
    control_call(run_dir, target, req, json)
}

/// Send one request to a server's control socket; progress goes to stderr, the
/// result to stdout (JSON with --json, else a readable form).
fn control_call(run_dir: &Path, target: &str, req: Request, json: bool) -> Result<()> {
    let id = parse_target(target)?;
    let path = control::socket_path(run_dir, id);
    let view = ProgressView::new(json);
    let answer = client::call(&path, &req, |p| view.show(p))?;
    if json {
        println!("{}", serde_json::to_string(&answer.json)?);
        return Ok(());
    }
    match &answer.reply {
        Reply::Stats(s) => print_stats(s),
        _ => println!("{}", human_result(&answer.json)),
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

fn print_stats(r: &StatsReply) {
    let e = &r.engine;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    println!(
        "disk {}  mode {} ({})  backend {}  cache {}",
        r.id, e.mode, e.order, r.backend, r.cache
    );
    println!(
        "cache: {} of {} used, {} dirty, line {} KiB, epoch {}",
        mib(e.valid_bytes),
        mib(e.cache_lines * e.line_size),
        mib(e.dirty_bytes),
        e.line_size >> 10,
        e.epoch
    );
    println!(
        "reads:  {} hits, {} misses, {} partial; {} from cache, {} from backend",
        e.read_hits,
        e.read_misses,
        e.read_partial,
        mib(e.read_hit_bytes),
        mib(e.read_miss_bytes)
    );
    println!(
        "writes: {} hits, {} misses, {} partial; {} written",
        e.write_hits,
        e.write_misses,
        e.write_partial,
        mib(e.write_bytes)
    );
    println!(
        "backend: {} read, {} written ({} write-back, {}/s now); errors {}, write-back retries {}",
        mib(e.backend_read_bytes),
        mib(e.backend_write_bytes),
        mib(e.writeback_bytes),
        mib(r.rates.writeback_bps),
        e.backend_errors,
        e.writeback_retries
    );
    if e.writeback_rate_limit > 0 || e.writeback_iops_limit > 0 || e.writeback_paced_ms > 0 {
        let none = |v: u64, what: String| if v > 0 { what } else { "no limit".into() };
        println!(
            "write-back limit: {} and {}; waited {:.1} s for it",
            none(
                e.writeback_rate_limit,
                format!("{}/s", mib(e.writeback_rate_limit))
            ),
            none(
                e.writeback_iops_limit,
                format!("{} writes/s", e.writeback_iops_limit)
            ),
            e.writeback_paced_ms as f64 / 1000.0
        );
    }
    if e.writeback_controlled() {
        let rate = if e.writeback_control_rate > 0 {
            format!(
                "{}/s ({}/s of it integral)",
                mib(e.writeback_control_rate),
                mib(e.writeback_control_integral_rate)
            )
        } else {
            "unpaced".into()
        };
        println!(
            "write-back control: {} at {rate}; low {}%, high {}%, minimum {}/s",
            e.writeback_control,
            e.writeback_low_pct,
            e.writeback_high_pct,
            mib(e.writeback_min_rate)
        );
    }
    println!(
        "cache device: {} read, {} written; errors {}; preload fetched {}",
        mib(e.cache_read_bytes),
        mib(e.cache_write_bytes),
        e.cache_errors,
        mib(e.preload_bytes)
    );
    let per_flush = |v: u64| {
        if e.flushes > 0 {
            format!("{:.2}", v as f64 / e.flushes as f64)
        } else {
            "-".into()
        }
    };
    println!(
        "durability: {} guest FLUSH/FUA ({} with nothing new, {} FUA in one pass); cache device: {} flushes ({} per guest FLUSH), {} metadata ({} bytes per guest FLUSH); write-back watermarks: {} in shared rounds, {} in own rounds",
        e.flushes,
        e.flushes_with_nothing_new,
        e.fua_one_pass,
        e.cache_flushes,
        per_flush(e.cache_flushes),
        mib(e.meta_write_bytes),
        per_flush(e.meta_write_bytes),
        e.watermark_shared_rounds,
        e.watermark_own_rounds
    );
    let b = &e.boot_trace;
    if b.record != BootPhase::Off {
        println!(
            "boot recording: {}, {} lines read first",
            b.record.as_str(),
            b.recorded_lines
        );
    }
    if b.replay != BootPhase::Off {
        println!(
            "boot prefetch: {}; {} of {} lines fetched ({}), {} used by the guest ({}; {} unused); precision {:.2}, recall {:.2}; ran up to {:.1} s ahead",
            b.replay.as_str(),
            b.fetched_lines,
            b.planned_lines,
            mib(b.fetched_bytes),
            b.used_lines,
            mib(b.used_bytes),
            mib(b.unused_bytes),
            b.precision,
            b.recall,
            b.max_lead_ms as f64 / 1000.0
        );
    }
    if !e.latency.is_empty() {
        println!("latency (µs)   count      p50      p90      p99    p99.9");
        for l in &e.latency {
            println!(
                "  {:<8} {:>9} {:>8} {:>8} {:>8} {:>8}",
                l.op, l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us
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
    let kernel = match fe::list_devices() {
        Ok(k) => k,
        // A host without ublk (NBD only): nothing to say unless a record
        // claims a ublk device.
        Err(fe::UblkError::ControlMissing) if !recs.iter().any(|r| r.has_device()) => Vec::new(),
        Err(e) => {
            // Say so: otherwise every device would show as "absent".
            eprintln!("ublk-cache: warning: cannot query the kernel's ublk devices: {e}");
            Vec::new()
        }
    };
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
                id: r.id,
                device: r.device,
                pid: r.pid,
                mode: r.mode.to_string(),
                backend: r.backend,
                cache: r.cache,
                state: r.state.to_string(),
                exports: r.exports,
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
    use rustix::process::{kill_process, Pid, Signal};
    let sig = if detach { Signal::USR1 } else { Signal::TERM };
    let p = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("pid {pid} is not a process id"))?;
    kill_process(p, sig)
        .map_err(std::io::Error::from)
        .with_context(|| format!("signalling pid {pid}"))?;
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
    // The process is gone, but the kernel quiesces a detached device only afterwards,
    // asynchronously (ublk frontend docs). Until it has, `recover` and other control
    // commands would wait in the kernel; so "detached" means QUIESCED, not "exited".
    let has_device = record.as_ref().is_none_or(|r| r.has_device());
    if detach && has_device {
        let left = match timeout {
            0 => DETACH_SETTLE_LIMIT,
            t => Duration::from_secs(t)
                .saturating_sub(start.elapsed())
                .max(MIN_SETTLE),
        };
        let old_pid = i32::try_from(pid).unwrap_or(-1);
        let d = match fe::wait_settled(id, old_pid, left) {
            Ok(d) => d,
            Err(fe::UblkError::NoSuchDevice(_)) => bail!(
                "pid {pid} exited, but deleted /dev/ublkb{id} instead of keeping it for `recover` \
                 (it stopped fully, e.g. because its device was stopped; see its log)"
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "pid {pid} exited, but /dev/ublkb{id} did not settle"
                )))
            }
        };
        match d.state {
            fe::DeviceState::Quiesced | fe::DeviceState::FailIo => eprintln!(
                "ublk-cache: /dev/ublkb{id} is {}; take it over with `ublk-cache recover {id}`",
                d.state
            ),
            fe::DeviceState::Live => eprintln!(
                "ublk-cache: /dev/ublkb{id} was already recovered by pid {}",
                d.daemon_pid
            ),
            other => bail!("/dev/ublkb{id} is {other} after the detach: it cannot be recovered"),
        }
    }
    Ok(())
}

/// How long `stop --detach` (without `--timeout`) waits for the kernel to quiesce the
/// device after the server exited. Normally well under a second; before Linux 6.15 a
/// queue whose every request the server held waits for the 30 s request timeout.
const DETACH_SETTLE_LIMIT: Duration = Duration::from_secs(90);
/// With `--timeout`, the settle wait gets what is left of it, but at least this.
const MIN_SETTLE: Duration = Duration::from_secs(5);

fn demo(
    dir: Option<&Path>,
    size: u64,
    cache_size: u64,
    run_dir: &Path,
    env: &Environment,
) -> Result<()> {
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
    let mut cfg = ServeConfig::demo(&base);
    cfg.cache_size = Some(ByteSize(cache_size));
    cfg.run_dir = run_dir.to_path_buf();
    let Some(BackendSpec::File(backend)) = cfg.backend.clone() else {
        bail!("the demo's backend is a file");
    };
    if !backend.exists() {
        let f = std::fs::File::create(&backend)?;
        f.set_len(size)?;
    }
    eprintln!(
        "ublk-cache demo: backend {} ({size} bytes, sparse), cache {} ({cache_size} bytes), mode back. Stop with Ctrl-C.",
        backend.display(),
        cfg.cache.as_deref().unwrap_or(Path::new("?")).display()
    );
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
        cfg.exports = vec![ExportSpec::Nbd(
            ublk_cache::frontend::nbd::ListenSpec::Unix(sock),
        )];
    }
    from_environment(&mut cfg, env)?;
    serve(cfg)
}
