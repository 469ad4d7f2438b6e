//! Writes the man pages and shell completions of `ublk-cache` from its clap
//! definitions (src/cli.rs, included as is, so the CLI is defined in one place):
//! `ublk-cache-gen-docs OUT_DIR` creates `OUT_DIR/man/*.1` (one page for the
//! command and one per subcommand) and `OUT_DIR/completions/{ublk-cache.bash,
//! _ublk-cache, ublk-cache.fish}`. scripts/build-deb.sh runs it.

#[path = "../cli.rs"]
#[allow(dead_code)]
mod cli;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

fn write_man(cmd: &clap::Command, dir: &Path, name: &str) -> Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut buf)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))
}

fn main() -> Result<()> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: ublk-cache-gen-docs OUT_DIR")?
        .into();
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = cli::Cli::command();
    cmd.build();
    write_man(&cmd, &man, "ublk-cache")?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("ublk-cache-{}", sub.get_name());
        write_man(sub, &man, &name)?;
    }
    for (shell, file) in [
        (Shell::Bash, "ublk-cache.bash"),
        (Shell::Zsh, "_ublk-cache"),
        (Shell::Fish, "ublk-cache.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "ublk-cache", &mut buf);
        let path = comp.join(file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", out.display());
    Ok(())
}
