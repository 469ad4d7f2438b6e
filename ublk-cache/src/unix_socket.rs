//! Binding a unix socket that no one else may use: never more permissive than
//! asked, even for an instant, and never replacing a live socket or a file that
//! is not a socket. Shared by the NBD export and the control socket.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::info;

/// Bind `path` with permissions `mode`. A stale socket (nobody listening) is
/// removed first. Returns the listener and the absolute path. Errors are
/// sentences naming the problem; `what` names the socket's use in them.
pub fn bind(path: &Path, mode: u32, what: &str) -> Result<(UnixListener, PathBuf), String> {
    if mode & !0o777 != 0 {
        return Err(format!("socket mode {mode:o} is not a permission mode"));
    }
    // An absolute path, so what we print works from any directory.
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(path)
    };
    // sockaddr_un holds 108 bytes including the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(format!(
            "the path is {} bytes long; unix socket paths are limited to 107",
            path.as_os_str().len()
        ));
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(&path) {
            Ok(_) => return Err("another server is listening on it (see `ublk-cache list`)".into()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing stale {what} socket (nobody listens on it)");
                std::fs::remove_file(&path).map_err(|e| format!("removing stale socket: {e}"))?;
            }
            Err(e) => return Err(format!("exists and cannot be probed: {e}")),
        },
        Ok(_) => return Err("exists and is not a socket; refusing to replace it".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    // The socket is created with 0777 & !umask. Tighten the umask around bind so
    // it is never more permissive than asked, even for an instant; the umask is
    // process-wide, so another thread creating a file meanwhile gets at most
    // stricter permissions, never looser ones.
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_bits_truncate(0o177));
    let res = UnixListener::bind(&path);
    rustix::process::umask(old);
    let listener = res.map_err(|e| format!("bind: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o}: {e}"))?;
    Ok((listener, path))
}

/// Wait until one of `fds` is readable or `timeout` passes; returns which are.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let t = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    match poll(&mut pfds, Some(&t)) {
        Ok(_) => Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect()),
        Err(rustix::io::Errno::INTR) => Ok(vec![false; fds.len()]),
        Err(e) => Err(e.into()),
    }
}
