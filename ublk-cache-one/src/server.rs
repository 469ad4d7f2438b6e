//! The per-disk `ublk-cache` server: its config file, starting it (systemd
//! unit or a detached process), waiting until its export is live, stopping it
//! cleanly, and the control verbs (migrate-out, migrate-abort, flush, stats).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::attrs::{BootTraceMode, OneMode, OneOrder};
use crate::cmd::one_line;
use crate::conf::{Export, HostConf, Launcher};
use crate::disk::DiskSpec;
use crate::error::{io_at, Error, Result};
use crate::state::{write_atomic, DiskRecord, State};

/// A row of `ublk-cache list --json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    pub id: u32,
    pub device: String,
    pub pid: u32,
    pub alive: bool,
    pub mode: String,
    pub backend: String,
    pub state: String,
    pub kernel_state: String,
    pub exports: Vec<String>,
}

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Exit 0: everything written back, the backend flushed and released.
    Clean,
    /// It was not running.
    NotRunning,
}

/// The serve options of one disk, as `ublk-cache serve --config` reads them.
pub fn server_toml(conf: &HostConf, spec: &DiskSpec, rec: &DiskRecord) -> String {
    let mut t = toml::Table::new();
    let s = |v: &str| toml::Value::String(v.to_string());
    t.insert("backend".into(), s(&format!("rbd:{}", spec.image.backend)));
    if let Some(u) = &spec.image.ceph.user {
        t.insert("ceph-id".into(), s(u));
    }
    if let Some(k) = &spec.image.ceph.key {
        t.insert("ceph-keyfile".into(), s(&k.display().to_string()));
    }
    if let Some(c) = &spec.image.ceph.conf {
        t.insert("ceph-conf".into(), s(&c.display().to_string()));
    }
    t.insert("mode".into(), s(spec.mode.ublk()));
    if let Some(ls) = &rec.ls {
        t.insert("cache".into(), s(&ls.path.display().to_string()));
        t.insert("cache-size".into(), s(&format!("{}M", ls.mb)));
        t.insert("writeback-order".into(), s(&spec.order.ublk()));
        if spec.preload_mb > 0 {
            t.insert("preload".into(), s(&format!("{}M", spec.preload_mb)));
        }
        if spec.preload_rate_mb > 0 {
            t.insert(
                "preload-rate".into(),
                s(&format!("{}M", spec.preload_rate_mb)),
            );
        }
        if spec.writeback_rate_mb > 0 {
            t.insert(
                "writeback-rate".into(),
                s(&format!("{}M", spec.writeback_rate_mb)),
            );
        }
        if let Some(p) = spec.writeback_low_pct {
            t.insert("writeback-low".into(), s(&format!("{p}%")));
        }
    }
    if spec.boot_trace != BootTraceMode::Off {
        t.insert("boot-trace".into(), s(&spec.boot_trace.to_string()));
        if let Some(k) = &spec.boot_trace_key {
            t.insert("boot-trace-key".into(), s(k));
        }
    }
    let export = match (rec.export, &rec.socket) {
        (Export::Nbd, Some(sock)) => format!("nbd:unix:{}", sock.display()),
        _ => "ublk".into(),
    };
    t.insert("export".into(), toml::Value::Array(vec![s(&export)]));
    if let Some(id) = rec.ublk_id {
        t.insert("id".into(), toml::Value::Integer(id.into()));
    }
    if spec.read_only {
        t.insert("read-only".into(), toml::Value::Boolean(true));
    }
    if rec.migrate_in {
        t.insert("migrate-in".into(), toml::Value::Boolean(true));
    }
    if conf.run_dir != Path::new("/run/ublk-cache") {
        t.insert("run-dir".into(), s(&conf.run_dir.display().to_string()));
    }
    format!(
        "# Written by ublk-cache-one for OpenNebula VM {} disk {}; do not edit (rewritten at attach).\n{}",
        spec.image.vm,
        spec.image.disk,
        toml::to_string(&t).unwrap_or_default()
    )
}

pub fn write_toml(conf: &HostConf, spec: &DiskSpec, rec: &DiskRecord) -> Result<()> {
    std::fs::create_dir_all(&conf.conf_dir)
        .map_err(io_at(format!("creating {}", conf.conf_dir.display())))?;
    let tmp = rec.toml.with_extension("toml.tmp");
    write_atomic(
        &tmp,
        &rec.toml,
        server_toml(conf, spec, rec).as_bytes(),
        0o600,
    )
}

/// `nbd+unix:///?socket=PATH` (percent-encoded) to PATH.
fn uri_socket(uri: &str) -> Option<PathBuf> {
    let enc = uri.strip_prefix("nbd+unix:///?socket=")?;
    let b = enc.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

pub struct Servers<'a> {
    conf: &'a HostConf,
    state: &'a State,
}

impl<'a> Servers<'a> {
    pub fn new(conf: &'a HostConf, state: &'a State) -> Self {
        Servers { conf, state }
    }

    fn ublk(&self, args: &[&str]) -> Result<String> {
        let mut a = vec![
            "--run-dir".to_string(),
            self.conf.run_dir.display().to_string(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        self.conf.ublk_cache.run(&a)
    }

    pub fn list(&self) -> Result<Vec<Row>> {
        let out = self.ublk(&["list", "--json"])?;
        serde_json::from_str(&out)
            .map_err(|e| Error::Server(format!("ublk-cache list --json: unexpected output ({e})")))
    }

    /// The running server of this record, found by its export.
    pub fn find(&self, rec: &DiskRecord) -> Result<Option<Row>> {
        let rows = self.list()?;
        Ok(rows.into_iter().find(|r| {
            r.alive
                && match (rec.export, rec.ublk_id, &rec.socket) {
                    (Export::Ublk, Some(id), _) => r.id == id,
                    (Export::Nbd, _, Some(sock)) => r
                        .exports
                        .iter()
                        .any(|e| uri_socket(e).as_deref() == Some(sock.as_path())),
                    _ => false,
                }
        }))
    }

    /// What the disk link points at once the server is live.
    pub fn target_of(rec: &DiskRecord) -> Result<PathBuf> {
        match (rec.export, rec.ublk_id, &rec.socket) {
            (Export::Ublk, Some(id), _) => Ok(PathBuf::from(format!("/dev/ublkb{id}"))),
            (Export::Nbd, _, Some(s)) => Ok(s.clone()),
            _ => Err(Error::Server(format!(
                "the record of {} names no export",
                rec.name()
            ))),
        }
    }

    fn unit(rec: &DiskRecord) -> String {
        format!("ublk-cache@{}.service", rec.name())
    }

    fn files(&self, rec: &DiskRecord) -> (PathBuf, PathBuf, PathBuf) {
        let d = self.state.run_dir();
        let n = rec.name();
        (
            d.join(format!("{n}.out")),
            d.join(format!("{n}.log")),
            d.join(format!("{n}.exit")),
        )
    }

    /// Start the server and wait until its export is live.
    pub fn start(&self, rec: &DiskRecord) -> Result<()> {
        match rec.launcher {
            Launcher::Exec => self.start_exec(rec),
            Launcher::Systemd => self.start_systemd(rec),
        }
    }

    fn start_exec(&self, rec: &DiskRecord) -> Result<()> {
        let (out, log, exit) = self.files(rec);
        for p in [&out, &exit] {
            let _ = std::fs::remove_file(p);
        }
        // sh records the exit status, which tells a clean stop from a failed one.
        let script = r#""$@" >"$UBLKC_OUT" 2>>"$UBLKC_LOG" </dev/null; echo $? >"$UBLKC_EXIT.tmp"; mv -f "$UBLKC_EXIT.tmp" "$UBLKC_EXIT""#;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script).arg("sh");
        cmd.args(&self.conf.ublk_cache.0);
        cmd.arg("serve").arg("--config").arg(&rec.toml);
        cmd.env("UBLKC_OUT", &out)
            .env("UBLKC_LOG", &log)
            .env("UBLKC_EXIT", &exit)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // Its own process group: nothing aimed at ours (the TM's) reaches it, and
        // it outlives this helper and the ssh session.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .map_err(io_at(format!("starting ublk-cache for {}", rec.name())))?;
        let pgid = child.id();
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(self.conf.wait_live_s);
        loop {
            if let Ok(t) = std::fs::read_to_string(&out) {
                if let Some(first) = t.lines().next().filter(|l| !l.is_empty()) {
                    return self.check_live(rec, first);
                }
            }
            if let Ok(code) = std::fs::read_to_string(&exit) {
                return Err(Error::Server(format!(
                    "the ublk-cache server of {} exited ({}) before its device was live: {}",
                    rec.name(),
                    status_text(code.trim()),
                    log_tail(&log)
                )));
            }
            if Instant::now() > deadline {
                if let Some(pid) = rustix::process::Pid::from_raw(pgid as i32) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                return Err(Error::Server(format!(
                    "the ublk-cache server of {} was not live after {} s (WAIT_LIVE_S): {}",
                    rec.name(),
                    self.conf.wait_live_s,
                    log_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server printed `first`: it must be the export the record expects.
    fn check_live(&self, rec: &DiskRecord, first: &str) -> Result<()> {
        let ok = match rec.export {
            Export::Ublk => Some(first) == Self::target_of(rec)?.to_str(),
            Export::Nbd => uri_socket(first) == rec.socket,
        };
        if !ok {
            return Err(Error::Server(format!(
                "the ublk-cache server of {} serves '{first}', not the export it was configured with",
                rec.name()
            )));
        }
        Ok(())
    }

    fn journal(&self, unit: &str) -> String {
        match self
            .conf
            .journalctl
            .run(&["-u", unit, "-n", "20", "--no-pager", "-o", "cat"])
        {
            Ok(t) => one_line(&t, 8),
            Err(e) => format!("(no journal: {e})"),
        }
    }

    /// The unit's drop-in: before every start (a reboot included) the helper
    /// checks that this host still owns the disk (`boot-check`).
    fn dropin(&self, rec: &DiskRecord) -> PathBuf {
        self.conf
            .systemd_dir
            .join(format!("{}.d", Self::unit(rec)))
            .join("ublk-cache-one.conf")
    }

    fn write_dropin(&self, rec: &DiskRecord) -> Result<()> {
        let exe = std::env::current_exe().map_err(io_at(
            "finding the helper's own path for the unit's boot check",
        ))?;
        let p = self.dropin(rec);
        let dir = p.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io_at(format!("creating {}", dir.display())))?;
        let text = format!(
            "# Written by ublk-cache-one: a host that lost this disk to another one never serves\n\
             # (nor writes back) its old cache; see `ublk-cache-one boot-check`.\n\
             [Service]\nExecStartPre={} boot-check --vm {} --disk {}\n",
            exe.display(),
            rec.vm,
            rec.disk
        );
        write_atomic(&p.with_extension("conf.tmp"), &p, text.as_bytes(), 0o644)?;
        self.conf.systemctl.run(&["daemon-reload"])?;
        Ok(())
    }

    fn start_systemd(&self, rec: &DiskRecord) -> Result<()> {
        let unit = Self::unit(rec);
        self.write_dropin(rec)?;
        // Type=notify: this returns once the server said READY=1 (every export live).
        if let Err(e) = self.conf.systemctl.run(&["enable", "--now", unit.as_str()]) {
            let _ = self
                .conf
                .systemctl
                .run(&["disable", "--now", unit.as_str()]);
            return Err(Error::Server(format!(
                "starting {unit} failed ({e}); its journal: {}",
                self.journal(&unit)
            )));
        }
        match self.find(rec)? {
            Some(_) => Ok(()),
            None => Err(Error::Server(format!(
                "{unit} started, but ublk-cache list shows no live server for it; its journal: {}",
                self.journal(&unit)
            ))),
        }
    }

    /// Stop cleanly (all dirty data written back). `disable`: also keep systemd
    /// from starting it at boot. A stop that does not end in exit 0 is an error:
    /// the cache may still hold data the image lacks, so nothing may be freed.
    pub fn stop(&self, rec: &DiskRecord, disable: bool) -> Result<Stopped> {
        match rec.launcher {
            Launcher::Exec => self.stop_exec(rec),
            Launcher::Systemd => self.stop_systemd(rec, disable),
        }
    }

    fn stop_exec(&self, rec: &DiskRecord) -> Result<Stopped> {
        let Some(row) = self.find(rec)? else {
            return Ok(Stopped::NotRunning);
        };
        let (_, log, exit) = self.files(rec);
        let timeout = self.conf.stop_timeout_s.to_string();
        self.ublk(&["stop", &row.id.to_string(), "--timeout", &timeout])
            .map_err(|e| Error::Server(format!("stopping {}: {e}", rec.name())))?;
        // The server is gone; sh writes its status right after.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(code) = std::fs::read_to_string(&exit) {
                return match code.trim() {
                    "0" => Ok(Stopped::Clean),
                    c => Err(Error::Server(format!(
                        "the ublk-cache server of {} did not stop cleanly ({}); its cache keeps what it \
                         holds: {}",
                        rec.name(),
                        status_text(c),
                        log_tail(&log)
                    ))),
                };
            }
            if Instant::now() > deadline {
                return Err(Error::Server(format!(
                    "the ublk-cache server of {} stopped but left no exit status in {}",
                    rec.name(),
                    exit.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_systemd(&self, rec: &DiskRecord, disable: bool) -> Result<Stopped> {
        let unit = Self::unit(rec);
        let active = self
            .conf
            .systemctl
            .output(&["is-active", "--quiet", unit.as_str()])?
            .status
            .success();
        let verb: &[&str] = if disable {
            &["disable", "--now"]
        } else {
            &["stop"]
        };
        let mut args: Vec<&str> = verb.to_vec();
        args.push(&unit);
        self.conf.systemctl.run(&args)?;
        if !active {
            return Ok(Stopped::NotRunning);
        }
        let result =
            self.conf
                .systemctl
                .run(&["show", "-p", "Result", "--value", unit.as_str()])?;
        if result.trim() != "success" {
            return Err(Error::Server(format!(
                "{unit} did not stop cleanly (Result={}); its cache keeps what it holds; its journal: {}",
                result.trim(),
                self.journal(&unit)
            )));
        }
        Ok(Stopped::Clean)
    }

    /// `systemctl disable` without stopping (a unit of a disk that is gone),
    /// and its drop-in removed.
    pub fn disable(&self, rec: &DiskRecord) {
        if rec.launcher == Launcher::Systemd {
            let unit = Self::unit(rec);
            let _ = self.conf.systemctl.run(&["disable", unit.as_str()]);
            let p = self.dropin(rec);
            let _ = std::fs::remove_file(&p);
            if let Some(d) = p.parent() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    /// A control verb with `--json`; progress lines (JSON on stderr) are
    /// relayed as INFO lines for the VM log.
    pub fn control(&self, rec: &DiskRecord, verb: &[&str]) -> Result<serde_json::Value> {
        let row = self.find(rec)?.ok_or_else(|| {
            Error::Server(format!("no running ublk-cache server for {}", rec.name()))
        })?;
        let id = row.id.to_string();
        let mut a = vec![
            "--run-dir".to_string(),
            self.conf.run_dir.display().to_string(),
        ];
        let mut words: Vec<&str> = verb.to_vec();
        if words.first() == Some(&"ctl") {
            words.insert(1, &id);
        } else {
            words.push(&id);
        }
        a.extend(words.iter().map(|s| s.to_string()));
        a.push("--json".into());
        let out = self.conf.ublk_cache.output(&a)?;
        for l in String::from_utf8_lossy(&out.stderr).lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                if let Some(p) = v.get("progress") {
                    crate::log::info(&format!("{}: {}", rec.name(), p));
                }
            }
        }
        if !out.status.success() {
            return Err(self.conf.ublk_cache.failure(&a, &out));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            Error::Server(format!(
                "ublk-cache {}: unexpected output ({e})",
                verb.join(" ")
            ))
        })
    }
}

fn status_text(code: &str) -> String {
    match code.parse::<i32>() {
        Ok(c) if c > 128 => format!("killed by signal {}", c - 128),
        Ok(c) => format!("exit {c}"),
        Err(_) => format!("status '{code}'"),
    }
}

/// The server log's last lines, one line for the TM's error.
fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(t) => one_line(&t, 6),
        Err(_) => "(no log)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_uris() {
        assert_eq!(
            uri_socket("nbd+unix:///?socket=/var/lib/x/one-1-0.sock"),
            Some(PathBuf::from("/var/lib/x/one-1-0.sock"))
        );
        assert_eq!(
            uri_socket("nbd+unix:///?socket=/a%20b"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(uri_socket("/dev/ublkb3"), None);
        assert_eq!(status_text("143"), "killed by signal 15");
    }
}
