//! systemd readiness (`Type=notify`): once every export is live, `READY=1`
//! and a `STATUS=` naming them go to `$NOTIFY_SOCKET`. Without that variable
//! (not started by systemd) nothing is sent. A unit's `systemctl start` then
//! returns when the device can be opened, not merely when the process runs.

use tracing::warn;

/// Tell systemd that the server is ready and what it serves.
pub fn ready(exports: &[String]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let status = format!("serving {}", exports.join(" "));
    let states = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ];
    // `false`: keep NOTIFY_SOCKET, so a child (none today) could notify too;
    // it also keeps the variable visible in /proc for operators.
    if let Err(e) = sd_notify::notify(false, &states) {
        warn!("could not notify systemd of readiness ($NOTIFY_SOCKET): {e}");
    }
}
