//! The front-end's decisions. A TM script (run by oned as oneadmin) hands its
//! arguments and the VM/datastore XML to `ublk-cache-one plan`, which answers
//! with steps, one per line, that the script executes as they are: which host
//! runs which helper verb, which VM directory is copied or removed, which other
//! TM is delegated to. Nothing here touches a host, so it needs no root.
//!
//! Step lines (words never contain spaces; every word is checked here):
//!
//! ```text
//! info TEXT...                  a line for the VM log
//! mkdir HOST DIR                make the VM directory as oneadmin (ssh_make_path)
//! host HOST VERB ARGS...        the root helper on HOST; a failure fails the action
//! host-try HOST VERB ARGS...    the same; a failure is only logged
//! host-print HOST VERB ARGS...  the same; its stdout is the action's stdout
//! copy-dir SRC DIR DST DIR      tar the VM directory over, unless both are one (shared) path
//! rm-dir HOST DIR [OTHER]       rm -rf on HOST, unless DIR on OTHER is the same (shared) path
//! rm-dir-try HOST DIR [OTHER]   the same; a failure is only logged
//! delegate TM                   run ../TM/<this script> with our arguments + "ublk_cache"
//! delegate-try TM               the same; a failure is only logged
//! ```

use crate::bundle::{Bundle, Vm};
use crate::error::{Error, Result};
use crate::names::{check_host, check_id, fix_slashes, is_disk_path, split_host_path};

/// Our TM's name in oned.conf and in DISK/TM_MAD.
pub const TM: &str = "ublk_cache";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Info(String),
    Mkdir(String, String),
    Host {
        host: String,
        args: Vec<String>,
        kind: HostKind,
    },
    CopyDir {
        src: String,
        src_dir: String,
        dst: String,
        dst_dir: String,
    },
    RmDir {
        host: String,
        dir: String,
        unless_same_as: Option<String>,
        try_only: bool,
    },
    Delegate {
        tm: String,
        try_only: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    Must,
    Try,
    Print,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Info(t) => write!(f, "info {}", t.replace('\n', " ")),
            Step::Mkdir(h, d) => write!(f, "mkdir {h} {d}"),
            Step::Host { host, args, kind } => {
                let k = match kind {
                    HostKind::Must => "host",
                    HostKind::Try => "host-try",
                    HostKind::Print => "host-print",
                };
                write!(f, "{k} {host} {}", args.join(" "))
            }
            Step::CopyDir {
                src,
                src_dir,
                dst,
                dst_dir,
            } => write!(f, "copy-dir {src} {src_dir} {dst} {dst_dir}"),
            Step::RmDir {
                host,
                dir,
                unless_same_as,
                try_only,
            } => {
                write!(
                    f,
                    "{} {host} {dir}",
                    if *try_only { "rm-dir-try" } else { "rm-dir" }
                )?;
                if let Some(o) = unless_same_as {
                    write!(f, " {o}")?;
                }
                Ok(())
            }
            Step::Delegate { tm, try_only } => {
                write!(
                    f,
                    "{} {tm}",
                    if *try_only {
                        "delegate-try"
                    } else {
                        "delegate"
                    }
                )
            }
        }
    }
}

/// A path argument: absolute, plain characters only, `//` squeezed.
fn path_word(p: &str) -> Result<String> {
    let p = fix_slashes(p);
    let ok = p.starts_with('/')
        && !p.split('/').any(|c| c == "..")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
    if !ok {
        return Err(Error::Usage(format!(
            "'{p}' is not a path this driver accepts"
        )));
    }
    Ok(p)
}

/// `host:path`.
fn host_path(arg: &str) -> Result<(String, String)> {
    match split_host_path(arg) {
        (Some(h), p) => Ok((check_host(h)?.to_string(), path_word(p)?)),
        (None, _) => Err(Error::Usage(format!("'{arg}' is not HOST:PATH"))),
    }
}

/// `.../<ds>/<vm>/disk.<n>` of VM `vm`: (VM directory, disk id).
fn disk_of(path: &str, vm: u32) -> Result<(String, u32)> {
    let bad = || Error::Usage(format!("'{path}' is not the path of a disk of VM {vm}"));
    let (dir, file) = path.rsplit_once('/').ok_or_else(bad)?;
    let n = check_id("disk", file.strip_prefix("disk.").ok_or_else(bad)?).map_err(|_| bad())?;
    let (_, v) = dir.rsplit_once('/').ok_or_else(bad)?;
    if check_id("VM", v).map_err(|_| bad())? != vm {
        return Err(bad());
    }
    Ok((dir.to_string(), n))
}

fn vm_dir_of(path: &str, vm: u32) -> Result<String> {
    let last = path.rsplit('/').next().unwrap_or("");
    if check_id("VM", last).ok() != Some(vm) {
        return Err(Error::Usage(format!(
            "'{path}' is not the directory of VM {vm}"
        )));
    }
    Ok(path.to_string())
}

fn helper(verb: &str, vm: u32, disk: Option<u32>, extra: &[String]) -> Vec<String> {
    let mut a = vec![verb.to_string(), "--vm".into(), vm.to_string()];
    if let Some(d) = disk {
        a.extend(["--disk".into(), d.to_string()]);
    }
    a.extend_from_slice(extra);
    a
}

fn host(h: &str, args: Vec<String>) -> Step {
    Step::Host {
        host: h.to_string(),
        args,
        kind: HostKind::Must,
    }
}

fn host_try(h: &str, args: Vec<String>) -> Step {
    Step::Host {
        host: h.to_string(),
        args,
        kind: HostKind::Try,
    }
}

/// A host of the datastore's BRIDGE_LIST, chosen by the VM id (as
/// `get_destination_host` does with an id).
fn bridge(b: &Bundle, ds: u32, vm: u32, why: &str) -> Result<String> {
    let list = b
        .datastore(ds)
        .and_then(|d| d.template.get("BRIDGE_LIST"))
        .ok_or_else(|| {
            Error::Refused(format!(
                "datastore {ds} has no BRIDGE_LIST, which {why} needs (a host that reaches Ceph)"
            ))
        })?;
    let hosts: Vec<&str> = list.split_whitespace().collect();
    let h = hosts[vm as usize % hosts.len()];
    Ok(check_host(h)?.to_string())
}

/// The disk's image datastore id.
fn image_ds(vm: &Vm, disk: u32) -> Option<u32> {
    vm.disk(disk)
        .and_then(|d| d.get("DATASTORE_ID"))
        .and_then(|s| s.parse().ok())
}

fn args_n<'a>(action: &str, args: &'a [String], n: usize) -> Result<&'a [String]> {
    if args.len() < n {
        return Err(Error::Usage(format!(
            "{action}: expected {n} arguments as oned writes them, got {}",
            args.len()
        )));
    }
    Ok(args)
}

/// The datastore ids whose XML a plan or an attach needs: the image datastores
/// of the VM's disks and the system datastore of its last history record.
pub fn datastore_ids(b: &Bundle) -> Result<Vec<u32>> {
    let vm = b.vm()?;
    let mut ids: Vec<u32> = vm
        .disks
        .iter()
        .filter_map(|d| d.get("DATASTORE_ID").and_then(|s| s.parse().ok()))
        .collect();
    ids.extend(vm.history.iter().filter_map(|h| h.ds_id));
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The disks this TM serves, by DISK_ID; and the other TMs of the VM's disks,
/// in disk order (for delegation, as `migrate_other` does).
fn our_disks_and_other_tms(vm: &Vm) -> (Vec<u32>, Vec<String>) {
    let mut ours = Vec::new();
    let mut others: Vec<String> = Vec::new();
    for d in &vm.disks {
        let Some(id) = d.get("DISK_ID").and_then(|s| s.parse().ok()) else {
            continue;
        };
        match d.get("TM_MAD") {
            Some(TM) => ours.push(id),
            Some(tm)
                if !others.iter().any(|o| o == tm)
                    && tm
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) =>
            {
                others.push(tm.to_string());
            }
            _ => {}
        }
    }
    ours.sort_unstable();
    (ours, others)
}

/// The steps for `action` (a TM script name) called with `args`.
pub fn plan(action: &str, args: &[String], b: &Bundle) -> Result<Vec<Step>> {
    match action {
        "clone" | "ln" => {
            let a = args_n(action, args, 4)?;
            let vm = check_id("VM", &a[2])?;
            let (h, p) = host_path(&a[1])?;
            let (dir, n) = disk_of(&p, vm)?;
            Ok(vec![
                Step::Mkdir(h.clone(), dir),
                host(
                    &h,
                    helper(
                        "attach",
                        vm,
                        Some(n),
                        &["--path".into(), p, "--action".into(), action.into()],
                    ),
                ),
            ])
        }
        "mv" => plan_mv(args, b),
        "mvds" => {
            let a = args_n(action, args, 4)?;
            let vm_id = check_id("VM", &a[2])?;
            let (h, p) = host_path(&a[0])?;
            let (_, n) = disk_of(&p, vm_id)?;
            let vm = b.vm()?;
            Ok(detach_where_served(vm, &h, n))
        }
        "delete" => plan_delete(args, b),
        "cpds" => {
            let a = args_n(action, args, 5)?;
            let vm_id = check_id("VM", &a[3])?;
            let ds = check_id("datastore", &a[4])?;
            let (h, p) = host_path(&a[0])?;
            let (_, n) = disk_of(&p, vm_id)?;
            let dst = a[1].clone();
            crate::names::RbdName::parse_source(&dst)?;
            let vm = b.vm()?;
            let target = if matches!(vm.lcm_state, 67 | 68) {
                bridge(
                    b,
                    ds,
                    vm_id,
                    "saving the disk of an undeployed or stopped VM",
                )?
            } else {
                h
            };
            let mut extra = vec!["--dst".to_string(), dst];
            if a[2] != "-1" {
                extra.extend(["--snap".into(), check_id("snapshot", &a[2])?.to_string()]);
            }
            Ok(vec![host(&target, helper("cpds", vm_id, Some(n), &extra))])
        }
        "snap_create" | "snap_delete" | "snap_revert" => {
            let a = args_n(action, args, 4)?;
            let vm_id = check_id("VM", &a[2])?;
            let (h, p) = host_path(&a[0])?;
            let (_, n) = disk_of(&p, vm_id)?;
            let snap = check_id("snapshot", &a[1])?;
            let vm = b.vm()?;
            if !matches!(vm.lcm_state, 51..=53) {
                return Err(Error::Refused(format!(
                    "ublk_cache: disk snapshots of a running or suspended VM are not supported in this version \
                     (LCM_STATE={}); power the VM off first",
                    vm.lcm_state
                )));
            }
            let op = action.trim_start_matches("snap_");
            Ok(vec![host(
                &h,
                helper(
                    "snap",
                    vm_id,
                    Some(n),
                    &["--op".into(), op.into(), "--snap".into(), snap.to_string()],
                ),
            )])
        }
        "resize" => {
            let a = args_n(action, args, 4)?;
            let vm_id = check_id("VM", &a[2])?;
            let ds = check_id("datastore", &a[3])?;
            let (h, p) = host_path(&a[0])?;
            let (_, n) = disk_of(&p, vm_id)?;
            let size = check_id("size", &a[1])?;
            let vm = b.vm()?;
            let target = match vm.lcm_state {
                62 => {
                    return Err(Error::Refused(
                        "ublk_cache: resizing a disk of a running VM is not supported in this version (the \
                         device cannot change its size while served); power the VM off first"
                            .into(),
                    ))
                }
                63 => h,
                64 => bridge(b, image_ds(vm, n).unwrap_or(ds), vm_id, "resizing the disk of an undeployed VM")?,
                s => {
                    return Err(Error::Refused(format!(
                        "ublk_cache: resize in LCM_STATE={s} is not expected"
                    )))
                }
            };
            Ok(vec![host(
                &target,
                helper(
                    "resize",
                    vm_id,
                    Some(n),
                    &["--size".into(), size.to_string()],
                ),
            )])
        }
        "premigrate" | "postmigrate" | "failmigrate" => plan_migrate(action, args, b),
        "monitor" => {
            let a = args_n(action, args, 1)?;
            let ds = check_id("datastore", &a[0])?;
            let h = bridge(b, ds, 0, "monitoring the datastore")?;
            Ok(vec![Step::Host {
                host: h,
                args: vec!["ds-monitor".into(), "--ds".into(), ds.to_string()],
                kind: HostKind::Print,
            }])
        }
        other => Err(Error::Usage(format!("plan: unknown action '{other}'"))),
    }
}

/// MVDS and the front-end variants of DELETE: stop the disk where it is served.
fn detach_where_served(vm: &Vm, h: &str, n: u32) -> Vec<Step> {
    if vm.ran_on(h) {
        return vec![host(h, helper("detach", vm.id, Some(n), &[]))];
    }
    // The front-end ("local" epilog of an undeployed VM): no server anywhere;
    // the cache kept at undeploy is on the last host.
    match vm.last_host() {
        Some(last) if check_host(last).is_ok() => vec![
            Step::Info(format!(
                "disk {n} is on the front-end; freeing the cache kept on {last} if it is reachable"
            )),
            host_try(last, helper("detach", vm.id, Some(n), &[])),
        ],
        _ => vec![],
    }
}

fn plan_delete(args: &[String], b: &Bundle) -> Result<Vec<Step>> {
    let a = args_n("delete", args, 3)?;
    let vm_id = check_id("VM", &a[1])?;
    let (h, p) = host_path(&a[0])?;
    let vm = b.vm()?;
    if !is_disk_path(&p) {
        let dir = vm_dir_of(&p, vm_id)?;
        let mut steps = Vec::new();
        if vm.ran_on(&h) {
            steps.push(host(&h, helper("vm-cleanup", vm_id, None, &[])));
        }
        steps.push(Step::Info(format!("Deleting {dir}")));
        steps.push(Step::RmDir {
            host: h,
            dir,
            unless_same_as: None,
            try_only: false,
        });
        return Ok(steps);
    }
    let (_, n) = disk_of(&p, vm_id)?;
    let clone = vm.disk(n).is_some_and(|d| d.yes("CLONE"));
    let mut steps = detach_where_served(vm, &h, n);
    if clone {
        let target = if vm.ran_on(&h) {
            h
        } else {
            let ds = image_ds(vm, n)
                .ok_or_else(|| Error::Xml(format!("DISK {n} has no DATASTORE_ID")))?;
            bridge(
                b,
                ds,
                vm_id,
                "removing the clone of a disk on the front-end",
            )?
        };
        steps.push(host(&target, helper("delete-clone", vm_id, Some(n), &[])));
    }
    Ok(steps)
}

fn plan_mv(args: &[String], b: &Bundle) -> Result<Vec<Step>> {
    let a = args_n("mv", args, 4)?;
    let vm_id = check_id("VM", &a[2])?;
    let (sh, sp) = host_path(&a[0])?;
    let (dh, dp) = host_path(&a[1])?;
    let vm = b.vm()?;
    let lcm = vm.lcm_state;
    if !is_disk_path(&dp) {
        let sdir = vm_dir_of(&sp, vm_id)?;
        let ddir = vm_dir_of(&dp, vm_id)?;
        if matches!(lcm, 16 | 60 | 61) {
            return Ok(vec![Step::Info(format!(
                "Not moving files from {sh} in FT mode or VM unknown"
            ))]);
        }
        if sh == dh && sdir == ddir {
            return Ok(vec![Step::Info(format!(
                "Not moving {sh}:{sdir}: same host and path"
            ))]);
        }
        return Ok(vec![
            Step::Info(format!("Moving {sh}:{sdir} to {dh}:{ddir}")),
            Step::CopyDir {
                src: sh.clone(),
                src_dir: sdir.clone(),
                dst: dh.clone(),
                dst_dir: ddir,
            },
            Step::RmDir {
                host: sh,
                dir: sdir,
                unless_same_as: Some(dh),
                try_only: false,
            },
        ]);
    }
    let (_, n) = disk_of(&sp, vm_id)?;
    let (ddir, dn) = disk_of(&dp, vm_id)?;
    if n != dn {
        return Err(Error::Usage(format!(
            "mv: {sp} and {dp} are different disks"
        )));
    }
    // The disk links stay in the directory: they lead to LINK_DIR/V-N, which
    // exists on whichever host serves the disk.
    let keep = ["--keep-links".to_string()];
    let attach = |h: &str| {
        host(
            h,
            helper(
                "attach",
                vm_id,
                Some(n),
                &[
                    "--path".into(),
                    dp.clone(),
                    "--action".into(),
                    "resume".into(),
                ],
            ),
        )
    };
    Ok(match lcm {
        // EPILOG_STOP, EPILOG_UNDEPLOY (and their failures): the VM leaves the
        // host but runs nowhere; keep the cache for a warm return.
        10 | 30 | 41 | 42 => vec![host(
            &sh,
            helper("detach", vm_id, Some(n), &["--park".into(), keep[0].clone()]),
        )],
        // PROLOG_RESUME, PROLOG_UNDEPLOY (and failures): from the front-end.
        9 | 31 | 49 | 50 => vec![Step::Mkdir(dh.clone(), ddir), attach(&dh)],
        // PROLOG_MIGRATE[_POWEROFF|_SUSPEND] (and failures): a cold migration.
        8 | 43 | 45 | 38 | 44 | 46 => {
            if sh == dh {
                vec![Step::Info(format!("disk {n} stays on {sh}"))]
            } else {
                vec![
                    host(&sh, helper("detach", vm_id, Some(n), &keep)),
                    Step::Mkdir(dh.clone(), ddir),
                    attach(&dh),
                ]
            }
        }
        // PROLOG_MIGRATE_UNKNOWN[_FAILURE]: the source host is down.
        60 | 61 => vec![
            Step::Info(format!(
                "the previous host {sh} is unknown: disk {n} is not stopped there; if its cache was BACK, \
                 writes it held may be missing from Ceph (see the README's crash procedure)"
            )),
            Step::Mkdir(dh.clone(), ddir),
            attach(&dh),
        ],
        s => {
            return Err(Error::Refused(format!(
                "ublk_cache: moving disk {n} in LCM_STATE={s} is not expected"
            )))
        }
    })
}

fn plan_migrate(action: &str, args: &[String], b: &Bundle) -> Result<Vec<Step>> {
    let a = args_n(action, args, 5)?;
    let src = check_host(&a[0])?.to_string();
    let dst = check_host(&a[1])?.to_string();
    let vm_id = check_id("VM", &a[3])?;
    let dir = vm_dir_of(&path_word(&a[2])?, vm_id)?;
    let called_from = a.get(5).filter(|s| !s.is_empty());
    if src == dst {
        return Ok(vec![Step::Info(format!(
            "Not moving {src} to {dst}, they are the same host"
        ))]);
    }
    let vm = b.vm()?;
    let (ours, others) = our_disks_and_other_tms(vm);
    let mut steps = Vec::new();
    if let Some(tm) = called_from {
        steps.push(Step::Info(format!(
            "called from tm/{tm}: serving the ublk_cache disks only (the system datastore's TM moves the \
             directory; a failed migration is only undone when the system datastore uses ublk_cache)"
        )));
    }
    let delegate = called_from.is_none();
    let disk_path = |n: u32| format!("{dir}/disk.{n}");
    match action {
        "premigrate" => {
            if delegate {
                steps.push(Step::CopyDir {
                    src: src.clone(),
                    src_dir: dir.clone(),
                    dst: dst.clone(),
                    dst_dir: dir.clone(),
                });
            }
            // Destination first: cheap, and it fails fast (no cache space, Ceph).
            for &n in &ours {
                steps.push(host(
                    &dst,
                    helper(
                        "attach",
                        vm_id,
                        Some(n),
                        &[
                            "--path".into(),
                            disk_path(n),
                            "--action".into(),
                            "migrate-in".into(),
                        ],
                    ),
                ));
            }
            for &n in &ours {
                steps.push(host(&src, helper("migrate-out", vm_id, Some(n), &[])));
            }
            if delegate {
                steps.extend(others.iter().map(|tm| Step::Delegate {
                    tm: tm.clone(),
                    try_only: false,
                }));
            }
        }
        "postmigrate" => {
            // The disk links stay: the directory is removed below unless it is
            // one shared path, where the destination's VM uses them.
            let keep = ["--keep-links".to_string()];
            for &n in &ours {
                steps.push(host_try(&src, helper("detach", vm_id, Some(n), &keep)));
            }
            for &n in &ours {
                steps.push(host_try(&dst, helper("settle", vm_id, Some(n), &[])));
            }
            if delegate {
                steps.extend(others.iter().map(|tm| Step::Delegate {
                    tm: tm.clone(),
                    try_only: true,
                }));
                steps.push(Step::RmDir {
                    host: src,
                    dir,
                    unless_same_as: Some(dst),
                    try_only: true,
                });
            }
        }
        _ => {
            let keep = ["--keep-links".to_string()];
            for &n in &ours {
                steps.push(host_try(&dst, helper("detach", vm_id, Some(n), &keep)));
            }
            if delegate {
                steps.push(Step::RmDir {
                    host: dst,
                    dir,
                    unless_same_as: Some(src.clone()),
                    try_only: true,
                });
            }
            for &n in &ours {
                steps.push(host_try(&src, helper("migrate-abort", vm_id, Some(n), &[])));
            }
            if delegate {
                steps.extend(others.iter().map(|tm| Step::Delegate {
                    tm: tm.clone(),
                    try_only: true,
                }));
            }
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(lcm: u32) -> Bundle {
        Bundle::parse(&format!(
            "<ONE><VM><ID>42</ID><STATE>3</STATE><LCM_STATE>{lcm}</LCM_STATE><TEMPLATE>\
             <DISK><DISK_ID>0</DISK_ID><SOURCE>one/one-5</SOURCE><CLONE>YES</CLONE><TM_MAD>ublk_cache</TM_MAD><DATASTORE_ID>101</DATASTORE_ID></DISK>\
             <DISK><DISK_ID>1</DISK_ID><SOURCE>one/one-6</SOURCE><CLONE>NO</CLONE><TM_MAD>ublk_cache</TM_MAD><DATASTORE_ID>101</DATASTORE_ID></DISK>\
             <DISK><DISK_ID>2</DISK_ID><SOURCE>one/one-7</SOURCE><CLONE>NO</CLONE><TM_MAD>ceph</TM_MAD><DATASTORE_ID>1</DATASTORE_ID></DISK>\
             </TEMPLATE><HISTORY_RECORDS><HISTORY><SEQ>0</SEQ><HOSTNAME>host1</HOSTNAME><DS_ID>100</DS_ID></HISTORY></HISTORY_RECORDS></VM>\
             <DATASTORE><ID>101</ID><TEMPLATE><BRIDGE_LIST>host1 host2</BRIDGE_LIST></TEMPLATE></DATASTORE></ONE>"
        ))
        .unwrap()
    }

    fn lines(action: &str, args: &[&str], b: &Bundle) -> Vec<String> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        plan(action, &a, b)
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    const D: &str = "/var/lib/one//datastores/100/42";

    #[test]
    fn clone_and_ln() {
        let b = vm(1);
        assert_eq!(
            lines("clone", &["fe:one/one-5", &format!("host1:{D}/disk.0"), "42", "101"], &b),
            [
                "mkdir host1 /var/lib/one/datastores/100/42",
                "host host1 attach --vm 42 --disk 0 --path /var/lib/one/datastores/100/42/disk.0 --action clone"
            ]
        );
        let a: Vec<String> = ["fe:x", "host1:/a/43/disk.0", "42", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(plan("clone", &a, &b).is_err(), "the path names another VM");
        let a: Vec<String> = ["fe:x", "host1:/a/42/disk.0;rm -rf /", "42", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(plan("clone", &a, &b).is_err());
    }

    #[test]
    fn mv_by_lcm_state() {
        let args = [
            "host1:/d/100/42/disk.0",
            "host2:/d/100/42/disk.0",
            "42",
            "101",
        ];
        assert_eq!(
            lines("mv", &args, &vm(30)),
            ["host host1 detach --vm 42 --disk 0 --park --keep-links"]
        );
        let r = lines("mv", &args, &vm(8));
        assert_eq!(r[0], "host host1 detach --vm 42 --disk 0 --keep-links");
        assert_eq!(
            r[2],
            "host host2 attach --vm 42 --disk 0 --path /d/100/42/disk.0 --action resume"
        );
        let r = lines("mv", &args, &vm(60));
        assert!(
            r[0].starts_with("info the previous host host1 is unknown"),
            "{r:?}"
        );
        assert!(!r.iter().any(|l| l.contains("host1 detach")));
        let dir = ["host1:/d/100/42", "fe:/d/100/42", "42", "100"];
        assert_eq!(
            lines("mv", &dir, &vm(30))[1],
            "copy-dir host1 /d/100/42 fe /d/100/42"
        );
        assert_eq!(lines("mv", &dir, &vm(60)).len(), 1);
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        assert!(plan("mv", &a, &vm(3))
            .unwrap_err()
            .to_string()
            .contains("LCM_STATE=3"));
    }

    #[test]
    fn delete_never_removes_a_persistent_image() {
        let b = vm(11);
        assert_eq!(
            lines("delete", &["host1:/d/100/42/disk.0", "42", "101"], &b),
            [
                "host host1 detach --vm 42 --disk 0",
                "host host1 delete-clone --vm 42 --disk 0"
            ]
        );
        assert_eq!(
            lines("delete", &["host1:/d/100/42/disk.1", "42", "101"], &b),
            ["host host1 detach --vm 42 --disk 1"]
        );
        let fe = lines("delete", &["frontend:/d/100/42/disk.0", "42", "101"], &b);
        assert_eq!(fe[1], "host-try host1 detach --vm 42 --disk 0");
        assert_eq!(
            fe[2], "host host1 delete-clone --vm 42 --disk 0",
            "BRIDGE_LIST[42 % 2]"
        );
        assert_eq!(
            lines("delete", &["host1:/d/100/42", "42", "100"], &b),
            [
                "host host1 vm-cleanup --vm 42",
                "info Deleting /d/100/42",
                "rm-dir host1 /d/100/42"
            ]
        );
    }

    #[test]
    fn migrate_sequences() {
        let b = vm(4);
        let args = ["host1", "host2", "/d/100/42", "42", "100"];
        let pre = lines("premigrate", &args, &b);
        assert_eq!(
            pre,
            [
                "copy-dir host1 /d/100/42 host2 /d/100/42",
                "host host2 attach --vm 42 --disk 0 --path /d/100/42/disk.0 --action migrate-in",
                "host host2 attach --vm 42 --disk 1 --path /d/100/42/disk.1 --action migrate-in",
                "host host1 migrate-out --vm 42 --disk 0",
                "host host1 migrate-out --vm 42 --disk 1",
                "delegate ceph"
            ]
        );
        let post = lines("postmigrate", &args, &b);
        assert_eq!(
            post[0],
            "host-try host1 detach --vm 42 --disk 0 --keep-links"
        );
        assert_eq!(post.last().unwrap(), "rm-dir-try host1 /d/100/42 host2");
        let fail = lines("failmigrate", &args, &b);
        assert_eq!(
            fail[0],
            "host-try host2 detach --vm 42 --disk 0 --keep-links"
        );
        assert_eq!(fail[2], "rm-dir-try host2 /d/100/42 host1");
        assert_eq!(fail[3], "host-try host1 migrate-abort --vm 42 --disk 0");
        assert_eq!(fail.last().unwrap(), "delegate-try ceph");
        let from_ceph = lines(
            "premigrate",
            &["host1", "host2", "/d/100/42", "42", "100", "ceph"],
            &b,
        );
        assert!(from_ceph[0].starts_with("info called from tm/ceph"));
        assert!(!from_ceph
            .iter()
            .any(|l| l.starts_with("copy-dir") || l.starts_with("delegate")));
        assert_eq!(
            lines(
                "premigrate",
                &["host1", "host1", "/d/100/42", "42", "100"],
                &b
            )
            .len(),
            1
        );
    }

    #[test]
    fn refusals() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = plan(
            "snap_create",
            &a(&["host1:/d/100/42/disk.0", "3", "42", "101"]),
            &vm(57),
        )
        .unwrap_err();
        assert!(e.to_string().contains("power the VM off"), "{e}");
        assert!(lines(
            "snap_revert",
            &["host1:/d/100/42/disk.0", "3", "42", "101"],
            &vm(52)
        )[0]
        .contains("--op revert --snap 3"));
        let e = plan(
            "resize",
            &a(&["host1:/d/100/42/disk.0", "512", "42", "101"]),
            &vm(62),
        )
        .unwrap_err();
        assert!(e.to_string().contains("running VM is not supported"), "{e}");
        assert_eq!(
            lines(
                "resize",
                &["host1:/d/100/42/disk.0", "512", "42", "101"],
                &vm(64)
            ),
            ["host host1 resize --vm 42 --disk 0 --size 512"]
        );
        assert!(plan("clone", &a(&["fe:x", "h:/d/100/42/disk.0"]), &vm(1)).is_err());
        assert_eq!(datastore_ids(&vm(1)).unwrap(), [1, 100, 101]);
    }
}
