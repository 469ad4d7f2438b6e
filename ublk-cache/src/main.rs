//! The `ublk-cache` binary: parse the command line (and the environment),
//! run the command, turn the result into an exit code. The server itself is
//! `ublk_cache::daemon`.

mod cli;
mod commands;
mod notify;
mod report;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

use cli::Cli;
use commands::Failure;

/// What the environment says. Read here and nowhere else: the libraries take
/// it as configuration.
pub struct Environment {
    /// `UBLK_CACHE_RUN_DIR`: the registry and control sockets.
    pub run_dir: Option<OsString>,
    /// `UBLK_CACHE_SHADOW_DIR`: where crash shadows live.
    pub shadow_dir: Option<OsString>,
    /// `UBLK_CACHE_IO_ENGINE`: sync, uring or auto.
    pub io_engine: Option<OsString>,
}

impl Environment {
    pub const RUN_DIR: &str = "UBLK_CACHE_RUN_DIR";
    pub const SHADOW_DIR: &str = "UBLK_CACHE_SHADOW_DIR";
    pub const IO_ENGINE: &str = "UBLK_CACHE_IO_ENGINE";

    fn read() -> Self {
        Self {
            run_dir: std::env::var_os(Self::RUN_DIR),
            shadow_dir: std::env::var_os(Self::SHADOW_DIR),
            io_engine: std::env::var_os(Self::IO_ENGINE),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Environment::read();
    init_logging();
    match commands::run(cli, &env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("ublk-cache: error: {}", report::error(&e));
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("ublk-cache: error: {}", report::error(&e));
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
