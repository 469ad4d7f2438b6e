//! The `ublk-cache` binary: command line, logging, and the commands.

mod cli;
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
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-cache: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        Command::Recover { id, mut serve } => {
            serve.recover = Some(id);
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
            ListRow {
                alive: registry::pid_alive(r.pid),
                kernel_state: k.map_or("absent".into(), |d| d.state.to_string()),
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
            });
        }
    }
    rows.sort_by_key(|r| r.id);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<8} {:<6} {:<8} {:<10} {:<9} BACKEND -> CACHE",
        "ID", "DEVICE", "PID", "ALIVE", "MODE", "STATE", "KERNEL"
    );
    for r in rows {
        println!(
            "{:<4} {:<14} {:<8} {:<6} {:<8} {:<10} {:<9} {} -> {}",
            r.id, r.device, r.pid, r.alive, r.mode, r.state, r.kernel_state, r.backend, r.cache
        );
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
    let pid = match registry::read(run_dir, id)? {
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
    if let Err(e) = fe::check_control() {
        bail!(
            "{e}\n\nThe demo serves a disk as /dev/ublkbN, which needs the kernel's ublk driver (Linux 6.0 or newer \
             with CONFIG_BLK_DEV_UBLK). Load it with `modprobe ublk_drv` as root. On a kernel without ublk, run the \
             VM test bed instead (tests/vm/run-suite.sh), which boots a kernel that has it."
        );
    }
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
    let args = ServeArgs {
        backend: spec::BackendSpec::File(backend),
        ceph: cli::CephArgs {
            ceph_conf: None,
            ceph_id: "admin".into(),
            ceph_keyring: None,
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
    };
    server::serve(&args, run_dir)
}
