//! `ublk-cache-one`: the host helper of the `ublk_cache` OpenNebula TM driver
//! (root, through sudo, on the hosts) and its planner (as oneadmin, on the
//! front-end). One plain line on stderr on failure: oned shows it as the
//! action's error; progress goes out as `INFO:` lines for the VM log.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ublk_cache_one::bundle::Bundle;
use ublk_cache_one::conf::HostConf;
use ublk_cache_one::ops::{AttachAction, Host, SnapOp};
use ublk_cache_one::{monitor, plan, probe};

#[derive(Parser)]
#[command(
    name = "ublk-cache-one",
    version,
    about = "OpenNebula host helper for ublk-cache"
)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Clone, Copy, ValueEnum)]
enum ActionArg {
    Clone,
    Ln,
    Resume,
    MigrateIn,
}

#[derive(Clone, Copy, ValueEnum)]
enum OpArg {
    Create,
    Delete,
    Revert,
}

#[derive(clap::Args)]
struct DiskArgs {
    #[arg(long)]
    vm: u32,
    #[arg(long)]
    disk: u32,
}

#[derive(Subcommand)]
enum Verb {
    /// Serve a disk and link SYSDIR/disk.N to it (VM and datastore XML on stdin).
    Attach {
        #[command(flatten)]
        d: DiskArgs,
        /// SYSDIR/disk.N.
        #[arg(long)]
        path: String,
        #[arg(long, value_enum)]
        action: ActionArg,
    },
    /// Stop serving a disk (everything written back), free its cache.
    Detach {
        #[command(flatten)]
        d: DiskArgs,
        /// Keep the cache for a warm return (undeploy, stop).
        #[arg(long)]
        park: bool,
        /// Leave SYSDIR/disk.N in place.
        #[arg(long)]
        keep_links: bool,
    },
    /// Remove a non-persistent disk's RBD clone (XML on stdin).
    DeleteClone {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Live migration, source: write back everything, lend the image's lock.
    MigrateOut {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Undo migrate-out.
    MigrateAbort {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Live migration done: the destination's config loses migrate-in.
    Settle {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Stop every disk of a VM on this host.
    VmCleanup {
        #[arg(long)]
        vm: u32,
    },
    /// Before a unit starts (its ExecStartPre): refuse a cache this host lost to another.
    BootCheck {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Drop a disk's cache WITHOUT writing it back (a stale one): its writes are lost.
    Discard {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Write everything back and flush the image.
    Flush {
        #[command(flatten)]
        d: DiskArgs,
    },
    /// Copy a disk (or a snapshot of it) to a new image (XML on stdin).
    Cpds {
        #[command(flatten)]
        d: DiskArgs,
        #[arg(long)]
        dst: String,
        #[arg(long)]
        snap: Option<u32>,
    },
    /// Disk snapshots of a powered-off VM (XML on stdin).
    Snap {
        #[command(flatten)]
        d: DiskArgs,
        #[arg(long, value_enum)]
        op: OpArg,
        #[arg(long)]
        snap: u32,
    },
    /// Grow a powered-off VM's disk to SIZE MB (XML on stdin).
    Resize {
        #[command(flatten)]
        d: DiskArgs,
        #[arg(long)]
        size: u64,
    },
    /// USED_MB/TOTAL_MB/FREE_MB of a datastore's pool from `ceph df` (XML on stdin).
    DsMonitor {
        #[arg(long)]
        ds: u32,
    },
    /// Host attributes for the scheduler (never fails).
    Probe,
    /// What this host serves (JSON).
    List,
    /// Front-end: the steps of a TM action (its arguments as oned gave them; XML on stdin).
    Plan {
        action: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Front-end: the datastore ids whose XML the bundle needs (VM XML on stdin).
    PlanDatastores,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("bad arguments").trim();
            eprintln!("ublk-cache-one: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if matches!(cli.verb, Verb::Probe) {
        for l in probe::probe_lines(HostConf::load().map_err(|e| e.to_string())) {
            println!("{l}");
        }
        return ExitCode::SUCCESS;
    }
    match run(cli.verb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("ublk_cache: {}", chain.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn stdin_bundle() -> Result<Bundle> {
    let mut text = String::new();
    std::io::stdin()
        .take(64 << 20)
        .read_to_string(&mut text)
        .context("reading the XML on stdin")?;
    if text.trim().is_empty() {
        bail!("no VM/datastore XML on stdin (the TM script sends it)");
    }
    Ok(Bundle::parse(&text)?)
}

fn host() -> Result<Host> {
    Ok(Host::new(HostConf::load()?)?)
}

fn run(verb: Verb) -> Result<()> {
    match verb {
        Verb::Attach { d, path, action } => {
            let b = stdin_bundle()?;
            let action = match action {
                ActionArg::Clone => AttachAction::Clone,
                ActionArg::Ln => AttachAction::Ln,
                ActionArg::Resume => AttachAction::Resume,
                ActionArg::MigrateIn => AttachAction::MigrateIn,
            };
            host()?.attach(&b, d.vm, d.disk, &path, action)?;
        }
        Verb::Detach {
            d,
            park,
            keep_links,
        } => host()?.detach(d.vm, d.disk, park, keep_links)?,
        Verb::DeleteClone { d } => {
            let b = stdin_bundle()?;
            host()?.delete_clone(&b, d.vm, d.disk)?
        }
        Verb::MigrateOut { d } => host()?.migrate_out(d.vm, d.disk)?,
        Verb::MigrateAbort { d } => host()?.migrate_abort(d.vm, d.disk)?,
        Verb::Settle { d } => host()?.settle(d.vm, d.disk)?,
        Verb::VmCleanup { vm } => host()?.vm_cleanup(vm)?,
        Verb::Flush { d } => host()?.flush(d.vm, d.disk)?,
        Verb::BootCheck { d } => host()?.boot_check(d.vm, d.disk)?,
        Verb::Discard { d } => host()?.discard(d.vm, d.disk)?,
        Verb::Cpds { d, dst, snap } => {
            let b = stdin_bundle()?;
            host()?.cpds(&b, d.vm, d.disk, &dst, snap)?
        }
        Verb::Snap { d, op, snap } => {
            let b = stdin_bundle()?;
            let op = match op {
                OpArg::Create => SnapOp::Create,
                OpArg::Delete => SnapOp::Delete,
                OpArg::Revert => SnapOp::Revert,
            };
            host()?.snap(&b, d.vm, d.disk, op, snap)?
        }
        Verb::Resize { d, size } => {
            let b = stdin_bundle()?;
            host()?.resize(&b, d.vm, d.disk, size)?
        }
        Verb::DsMonitor { ds } => {
            let b = stdin_bundle()?;
            let conf = HostConf::load()?;
            print!(
                "{}",
                monitor::ds_monitor(&conf.ceph, &conf.ceph_paths, &b, ds)?
            );
        }
        Verb::Probe => unreachable!("handled before"),
        Verb::List => println!("{}", host()?.list_json()?),
        Verb::Plan { action, args } => {
            let b = stdin_bundle()?;
            for s in plan::plan(&action, &args, &b)? {
                println!("{s}");
            }
        }
        Verb::PlanDatastores => {
            let b = stdin_bundle()?;
            for id in plan::datastore_ids(&b)? {
                println!("{id}");
            }
        }
    }
    Ok(())
}
