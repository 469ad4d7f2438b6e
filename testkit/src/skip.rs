//! The rule for a missing test bed, in one place: the test prints
//! `SKIP: ...` loudly and passes, unless CI asked for the bed with
//! `UBLK_CACHE_REQUIRE_*=1` (scripts/test.sh installs and starts what is
//! needed and sets them): then the test fails, so nothing skips in CI.

use std::path::PathBuf;

/// A test bed that CI provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bed {
    /// qemu-io, qemu-img, nbdinfo, nbdcopy, fio (Debian packages).
    NbdClients,
    /// The single-node Ceph cluster of scripts/ceph-cluster.sh.
    Ceph,
}

impl Bed {
    /// The variable that makes this bed mandatory.
    pub fn require_var(self) -> &'static str {
        match self {
            Bed::NbdClients => "UBLK_CACHE_REQUIRE_NBD_CLIENTS",
            Bed::Ceph => "UBLK_CACHE_REQUIRE_CEPH",
        }
    }

    /// Whether a missing bed must fail the test.
    pub fn required(self) -> bool {
        std::env::var(self.require_var()).as_deref() == Ok("1")
    }
}

/// `bed` is missing (`why`): fail if it is required, else print `SKIP:` and
/// return `None` for the caller to return with.
pub fn missing<T>(bed: Bed, why: &str) -> Option<T> {
    if bed.required() {
        panic!("{why}, and {}=1", bed.require_var());
    }
    note(why);
    None
}

/// Print a `SKIP:` line for something this machine cannot do (io_uring
/// refused, a filesystem without O_DIRECT) that no variable can require.
pub fn note(why: &str) {
    eprintln!("SKIP: {why}");
}

/// The path of a client tool, or `None` after the SKIP rule.
pub fn tool(name: &str) -> Option<PathBuf> {
    // /usr/bin first: a pyenv python earlier on PATH breaks Debian's python tools.
    let path = format!(
        "/usr/bin:/usr/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    missing(
        Bed::NbdClients,
        &format!("{name} is not installed (scripts/install-deps.sh installs it)"),
    )
}

/// fio, if it is installed and has its nbd engine.
pub fn fio_with_nbd() -> Option<PathBuf> {
    let fio = tool("fio")?;
    let help = std::process::Command::new(&fio)
        .arg("--enghelp")
        .output()
        .unwrap_or_else(|e| panic!("running {} --enghelp: {e}", fio.display()));
    if !String::from_utf8_lossy(&help.stdout).contains("nbd") {
        return missing(Bed::NbdClients, "this fio has no nbd engine");
    }
    Some(fio)
}
