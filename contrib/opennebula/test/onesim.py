#!/usr/bin/python3
"""The ublk_cache OpenNebula driver, driven as oned drives it, without oned.

What is simulated, faithfully (from OpenNebula's sources, see the README's
OpenNebula section):
  * one_tm.rb's TRANSFER: the transfer file oned writes (one line per action,
    TransferManager.cc's formats: `CLONE.ublk_cache ublk_cache fe:SOURCE
    host:DIR//disk.0 VMID DSID`, ...), comment and blank lines skipped, CMD
    lower-cased, tm/<TM>/<cmd> with the `.suffix` fallback, the TM allowed
    list, arguments Shellwords-escaped into one /bin/sh -c command line, an
    empty stdin closed at once, a process group of its own, cwd
    ONE_LOCATION/var, the first failure stopping the script;
  * DriverExecHelper's reading of the result: exit 0 = success; stderr lines
    `^(ERROR|INFO|WARN|DEBUG):\\s+(\\d+)?\\s*(.*)$` are log lines, every other
    line (stripped) is appended, without a separator, to the error message;
  * one_vmm_exec.rb's live migration: PREMIGRATE (on failure FAILMIGRATE,
    no_fail, and the migration fails), the hypervisor step (here a hook that
    plays QEMU's switchover with NBD clients; on failure FAILMIGRATE),
    POSTMIGRATE (no_fail), the TM actions with the VM XML in base64 without
    newlines on stdin, every TM allowed (TransferManagerDriver.new(nil));
  * the datastore driver's monitor call (stdin: base64 DS_DRIVER_ACTION_DATA).

Real: the TM scripts as installed by install.sh, the ublk-cache-one helper,
ublk-cache servers (NBD exports), the Ceph test cluster (rbd clone, snap,
export, ceph df), file caches on real (loop-mounted ext4) filesystems.
Test doubles (named, in shim/): onevm/onedatastore/onehost serving fixtures,
ssh running each host in its own mount namespace, tm/common/context, another
TM's migrate scripts (recorder), a fault-injecting wrapper of ublk-cache.
"""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

T = Path(os.environ["UBLKC_T"])
HERE = Path(__file__).resolve().parent
CONTRIB = HERE.parent
HELPER = os.environ["UBLKC_HELPER_BIN"]
UBLK = os.environ["UBLKC_REAL_UBLK_CACHE"]
CEPH_CONF = os.environ["CEPH_CONF"]
ONE = T / "one"
REMOTES = ONE / "var" / "remotes"
SHIM = HERE / "shim"
FE = "frontend"
POOL = "rbd"
# oned's DATASTORE_LOCATION often ends with '/', so paths carry '//'.
DSLOC = f"{T}/datastores/"
SYS_DS, IMG_DS, CEPH_DS = 100, 101, 1
MIB = 1 << 20
DISK_MB = 32
BASE = int(time.time()) % 100000 * 10 + 1000000

ENV = dict(os.environ)
ENV.update(
    {
        "PATH": f"{SHIM}:{os.environ['PATH']}",
        "SSH": str(SHIM / "ssh"),
        "UBLKC_SUDO": "",
        "UBLKC_HELPER": HELPER,
        "UBLKC_PLANNER": HELPER,
        "ONE_LOCATION": str(ONE),
        "CEPH_CONF": CEPH_CONF,
    }
)

PASSED, FAILED = [], []


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def log(msg):
    print(msg, flush=True)


def run(argv, input=None, check_rc=True, env=None, timeout=600, cwd=None):
    r = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        env=env or ENV,
        timeout=timeout,
        cwd=cwd,
    )
    if check_rc and r.returncode != 0:
        raise Fail(
            f"{argv} failed ({r.returncode}):\n{r.stdout.decode(errors='replace')}"
            f"\n{r.stderr.decode(errors='replace')}"
        )
    return r


def on(host, cmd, check_rc=True, input=None, timeout=600):
    """A command on a fake host, through the ssh test double."""
    return run([str(SHIM / "ssh"), host, cmd], input=input, check_rc=check_rc, timeout=timeout)


# --------------------------------------------------------------- one_tm.rb

SHELLWORDS_SAFE = re.compile(r"([^A-Za-z0-9_\-.,:+/@\n])")


def shellwords_escape(s):
    """Ruby's Shellwords.escape."""
    if s == "":
        return "''"
    return SHELLWORDS_SAFE.sub(r"\\\1", s).replace("\n", "'\n'")


LOG_LINE = re.compile(r"^(ERROR|INFO|WARN|DEBUG):\s+(\d+)?\s*(.*)$")


class Result:
    def __init__(self, ok, info, logs, action):
        self.ok, self.info, self.logs, self.action = ok, info, logs, action

    def __repr__(self):
        return f"<{self.action}: {'SUCCESS' if self.ok else 'FAILURE'} info={self.info!r} logs={self.logs}>"


def do_transfer_action(command, stdin=b"", allowed=None):
    """one_tm.rb#do_transfer_action + DriverExecHelper#get_info_from_execution."""
    cmd, tm, args = command[0].lower(), command[1], command[2:]
    if allowed is not None and tm not in allowed:
        return Result(False, f"Transfer Driver '{tm}' not available", [], cmd)
    path = REMOTES / "tm" / tm / cmd
    if not path.exists():
        m = re.match(r"(.*)\.(.*)", cmd)
        if not m or not m.group(1):
            return Result(False, f"Driver path '{path}' does not exists", [], cmd)
        short = REMOTES / "tm" / tm / m.group(1)
        if not short.exists():
            return Result(False, f"Driver path '{path}' nor '{short}' exists", [], cmd)
        path = short
    line = str(path) + " " + " ".join(shellwords_escape(a) for a in args)
    p = subprocess.run(
        ["/bin/sh", "-c", line],
        input=stdin,
        capture_output=True,
        env=ENV,
        cwd=ONE / "var",
        process_group=0,
        timeout=900,
    )
    logs, err_info = [], ""
    for raw in p.stderr.decode(errors="replace").splitlines():
        l = raw.strip()
        m = LOG_LINE.match(l)
        if not m:
            err_info += l
            continue
        logs.append((m.group(1), m.group(3).strip()))
    if p.returncode == 0:
        info = p.stdout.decode(errors="replace")
    else:
        info = err_info.replace("\n", " ").strip()
    return Result(p.returncode == 0, info or "-", logs, " ".join(command))


SEQ = {}


def transfer(vm, kind, lines):
    """one_tm.rb#action_transfer of a transfer file oned wrote."""
    n = SEQ.get(vm.id, 0)
    SEQ[vm.id] = n + 1
    d = ONE / "var" / "vms" / str(vm.id)
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"transfer.{n}.{kind}"
    f.write_text("".join(l + "\n" for l in lines))
    write_vm(vm)
    logs = []
    for raw in f.read_text().splitlines():
        if re.match(r"^\s*#", raw) or re.match(r"^\s*$", raw):
            continue
        r = do_transfer_action(raw.split(), allowed={"ublk_cache", "ceph", "ssh"})
        logs += r.logs
        if not r.ok:
            return Result(False, r.info, logs, r.action)
    return Result(True, "-", logs, kind)


def vmm_migrate(vm, src, dst, hook=None):
    """one_vmm_exec.rb#migrate (shared system datastore): PRE, the hypervisor
    step, POST; FAIL after a failed PRE or hypervisor step."""
    write_vm(vm)
    tm_command = f"MIGRATE ublk_cache {src} {dst} {sysdir(vm)} {vm.id} {SYS_DS}"
    stdin = base64.b64encode(vm.xml().encode())
    steps = {}
    pre = do_transfer_action(("PRE" + tm_command).split(), stdin)
    steps["pre"] = pre
    if not pre.ok:
        steps["fail"] = do_transfer_action(("FAIL" + tm_command).split(), stdin)
        return False, steps
    ok = True
    if hook:
        try:
            hook()
        except Fail as e:
            steps["hook_error"] = str(e)
            ok = False
    if not ok:
        steps["fail"] = do_transfer_action(("FAIL" + tm_command).split(), stdin)
        return False, steps
    steps["post"] = do_transfer_action(("POST" + tm_command).split(), stdin)
    return True, steps


# ---------------------------------------------------------------- fixtures


def cdata(v):
    return f"<![CDATA[{v}]]>"


class Disk:
    def __init__(self, disk_id, image_id, persistent, **attrs):
        self.id, self.image_id, self.persistent = disk_id, image_id, persistent
        self.tm = attrs.pop("TM_MAD", "ublk_cache")
        self.ds = attrs.pop("DATASTORE_ID", IMG_DS)
        self.tsys = attrs.pop("tsys", True)
        self.attrs = attrs

    def source(self):
        return f"{POOL}/one-{self.image_id}"

    def backend(self, vm):
        return self.source() if self.persistent else f"{self.source()}-{vm.id}-{self.id}"

    def xml(self):
        a = {
            "DISK_ID": self.id,
            "IMAGE_ID": self.image_id,
            "SOURCE": self.source(),
            "CLONE": "NO" if self.persistent else "YES",
            "SAVE": "YES" if self.persistent else "NO",
            "PERSISTENT": "YES" if self.persistent else None,
            "TYPE": "BLOCK",
            "DISK_TYPE": "BLOCK",
            "DRIVER": "raw",
            "FORMAT": "raw",
            "SIZE": DISK_MB,
            "ORIGINAL_SIZE": DISK_MB,
            "DATASTORE_ID": self.ds,
            "DATASTORE": "ceph-ublk",
            "TM_MAD": self.tm,
            "TM_MAD_SYSTEM": "ublk_cache" if self.tsys else None,
            "POOL_NAME": POOL,
            "CEPH_USER": "admin",
            "CEPH_CONF": CEPH_CONF,
            "CLONE_TARGET": "SELF",
            "LN_TARGET": "NONE",
            "TARGET": f"vd{chr(97 + self.id)}",
        }
        a.update(self.attrs)
        body = "".join(f"<{k}>{cdata(v)}</{k}>" for k, v in a.items() if v is not None)
        return f"<DISK>{body}</DISK>"


class VM:
    """Enough of share/doc/xsd/vm.xsd: ID, STATE, LCM_STATE, TEMPLATE/DISK,
    HISTORY_RECORDS/HISTORY (SEQ, HOSTNAME, DS_ID, TM_MAD, VM_MAD)."""

    def __init__(self, vm_id, disks):
        self.id, self.disks = vm_id, disks
        self.state, self.lcm = 3, 1
        self.history = []

    def xml(self):
        disks = "".join(d.xml() for d in self.disks)
        ctx = f"<CONTEXT><DISK_ID>{cdata(len(self.disks))}</DISK_ID></CONTEXT>"
        hist = "".join(
            f"<HISTORY><OID>{self.id}</OID><SEQ>{i}</SEQ><HOSTNAME>{h}</HOSTNAME><HID>{i}</HID>"
            f"<CID>0</CID><DS_ID>{SYS_DS}</DS_ID><TM_MAD>{cdata('ublk_cache')}</TM_MAD>"
            f"<VM_MAD>{cdata('kvm')}</VM_MAD></HISTORY>"
            for i, h in enumerate(self.history)
        )
        return (
            f"<VM><ID>{self.id}</ID><UID>0</UID><GID>0</GID><NAME>vm-{self.id}</NAME>"
            f"<STATE>{self.state}</STATE><LCM_STATE>{self.lcm}</LCM_STATE>"
            f"<TEMPLATE>{disks}{ctx}</TEMPLATE><USER_TEMPLATE/>"
            f"<HISTORY_RECORDS>{hist}</HISTORY_RECORDS></VM>"
        )

    def host(self):
        return self.history[-1]


def write_vm(vm):
    f = ONE / "fixtures" / "vm" / f"{vm.id}.xml"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(vm.xml())


def datastore_xml(ds_id, kind):
    tmpl = {
        "BRIDGE_LIST": "host1 host2",
        "POOL_NAME": POOL,
        "CEPH_USER": "admin",
        "CEPH_CONF": CEPH_CONF,
        "DISK_TYPE": "BLOCK",
    }
    if kind == "image":
        name, ty, ds_mad, tm = "ceph-ublk", 0, "ceph", "ublk_cache"
        tmpl.update({"CACHE_MODE": "BACK", "CACHE_SIZE": "16"})
    elif kind == "system":
        name, ty, ds_mad, tm = "ublk-system", 1, "-", "ublk_cache"
        tmpl.update({"CACHE_MODE": "THRU", "SHARED": "YES"})
    else:
        name, ty, ds_mad, tm = "ceph", 0, "ceph", "ceph"
    t = "".join(f"<{k}>{cdata(v)}</{k}>" for k, v in tmpl.items())
    return (
        f"<DATASTORE><ID>{ds_id}</ID><UID>0</UID><NAME>{name}</NAME><TYPE>{ty}</TYPE>"
        f"<DS_MAD>{cdata(ds_mad)}</DS_MAD><TM_MAD>{cdata(tm)}</TM_MAD>"
        f"<BASE_PATH>{cdata(DSLOC + str(ds_id))}</BASE_PATH><TEMPLATE>{t}</TEMPLATE></DATASTORE>"
    )


def sysdir(vm, slashes=True):
    d = f"{DSLOC}/{SYS_DS}/{vm.id}"
    return d if slashes else re.sub("/+", "/", d)


# TransferManager.cc's transfer lines


def prolog_lines(vm, host):
    out = []
    for d in vm.disks:
        if d.tm != "ublk_cache":
            continue
        verb = "LN" if d.persistent else "CLONE"
        tsys = ".ublk_cache" if d.tsys else ""
        src = d.source()
        src = src if ":" in src else f"{FE}:{src}"
        out.append(f"{verb}{tsys} {d.tm} {src} {host}:{sysdir(vm)}/disk.{d.id} {vm.id} {d.ds}")
    ctx = len(vm.disks)
    out.append(
        f"CONTEXT ublk_cache {ONE}/var/vms/{vm.id}/context.sh {host}:{sysdir(vm)}/disk.{ctx} {vm.id} {SYS_DS}"
    )
    return out


def mv_lines(vm, src, dst):
    out = [
        f"MV{'.ublk_cache' if d.tsys else ''} {d.tm} {src}:{sysdir(vm)}/disk.{d.id} {dst}:{sysdir(vm)}/disk.{d.id} {vm.id} {d.ds}"
        for d in vm.disks
        if d.tm == "ublk_cache"
    ]
    out.append(f"MV ublk_cache {src}:{sysdir(vm)} {dst}:{sysdir(vm)} {vm.id} {SYS_DS}")
    return out


def epilog_lines(vm, host):
    out = []
    for d in vm.disks:
        if d.tm != "ublk_cache":
            continue
        tsys = ".ublk_cache" if d.tsys else ""
        if d.persistent:
            out.append(f"MVDS{tsys} {d.tm} {host}:{sysdir(vm)}/disk.{d.id} {d.source()} {vm.id} {d.ds}")
        else:
            out.append(f"DELETE{tsys} {d.tm} {host}:{sysdir(vm)}/disk.{d.id} {vm.id} {d.ds}")
    out.append(f"DELETE ublk_cache {host}:{sysdir(vm)} {vm.id} {SYS_DS}")
    return out


def delete_lines(vm, host):
    """epilog_delete (recover --delete): DELETE for every disk, persistent too."""
    out = [
        f"DELETE {d.tm} {host}:{sysdir(vm)}/disk.{d.id} {vm.id} {d.ds}"
        for d in vm.disks
        if d.tm == "ublk_cache"
    ]
    out.append(f"DELETE ublk_cache {host}:{sysdir(vm)} {vm.id} {SYS_DS}")
    return out


# -------------------------------------------------------------------- ceph


def rbd(*args, check_rc=True):
    return run(["rbd", "--conf", CEPH_CONF, *args], check_rc=check_rc)


def rbd_exists(name):
    return rbd("info", name, check_rc=False).returncode == 0


def rbd_export(name):
    return rbd("export", "--no-progress", name, "-").stdout


def base_content(seed):
    return b"".join(bytes([(i * 7 + seed) & 0xFF or 1]) * MIB for i in range(DISK_MB))


IMAGES = []


def make_image(image_id, seed):
    IMAGES.append(image_id)
    f = T / f"base-{image_id}.img"
    f.write_bytes(base_content(seed))
    rbd("import", "--no-progress", str(f), f"{POOL}/one-{image_id}")
    f.unlink()
    return bytearray(base_content(seed))


# ------------------------------------------------------------- disk access


def sock_of(host, vm, disk_id):
    r = on(host, f"readlink -f {sysdir(vm)}/disk.{disk_id}")
    return r.stdout.decode().strip()


def qemu_io(host, vm, disk_id, cmds, expect_ok=True):
    sock = sock_of(host, vm, disk_id)
    args = " ".join(f"-c '{c}'" for c in cmds)
    r = on(host, f"qemu-io -f raw {args} 'nbd+unix:///?socket={sock}'", check_rc=False)
    out = r.stdout.decode() + r.stderr.decode()
    if expect_ok:
        check(
            r.returncode == 0 and "failed" not in out and "error" not in out.lower(),
            f"qemu-io through {host}:{sysdir(vm)}/disk.{disk_id} ({sock}): {out}",
        )
    return out


def write(model, host, vm, disk_id, off_mb, len_mb, val):
    qemu_io(host, vm, disk_id, [f"write -P {val} {off_mb}M {len_mb}M", "flush"])
    model[off_mb * MIB : (off_mb + len_mb) * MIB] = bytes([val]) * (len_mb * MIB)


def verify(model, host, vm, disk_id):
    """Every MiB read back through disk.N equals the model."""
    cmds = []
    for mb in range(DISK_MB):
        blk = model[mb * MIB : (mb + 1) * MIB]
        check(blk == bytes([blk[0]]) * MIB, "model blocks are uniform")
        cmds.append(f"read -P {blk[0]} {mb}M 1M")
    qemu_io(host, vm, disk_id, cmds)


def records(host):
    r = on(host, f"{HELPER} list")
    return json.loads(r.stdout)


def record(host, vm, disk_id):
    for r in records(host):
        if r["vm"] == vm.id and r["disk"] == disk_id:
            return r
    return None


def stats(host, vm, disk_id):
    r = record(host, vm, disk_id)
    check(r and r["server"], f"VM {vm.id} disk {disk_id} is served on {host}: {r}")
    out = on(host, f"{UBLK} --run-dir {T}/host/run ctl {r['server']['id']} stats --json")
    return json.loads(out.stdout)


def probe(host, env_prefix=""):
    script = REMOTES / "im" / "kvm-probes.d" / "host" / "system" / "ublk_cache.sh"
    r = on(host, f"{env_prefix} {script} </dev/null", check_rc=False)
    check(r.returncode == 0, f"the probe exited {r.returncode}")
    vals = {}
    for l in r.stdout.decode().splitlines():
        m = re.match(r'^([A-Z_]+)=(?:"([^"]*)"|(\d+))$', l)
        check(m, f"probe line '{l}' is not KEY=VALUE / KEY=\"value\"")
        vals[m.group(1)] = m.group(2) if m.group(2) is not None else int(m.group(3))
    return vals


def nothing_left(host, vm, disk_id, clone_name=None):
    check(record(host, vm, disk_id) is None, f"no record of VM {vm.id} disk {disk_id} on {host}")
    name = f"one-{vm.id}-{disk_id}"
    hr = T / "hosts" / host / "root"
    check(not (hr / "ls" / f"{name}.cache").exists(), f"no cache file {name} on {host}")
    check(not (hr / "etc" / "ublk-cache" / f"{name}.toml").exists(), f"no toml {name} on {host}")
    check(not (hr / "state" / "dev" / f"{vm.id}-{disk_id}").is_symlink(), f"no link {vm.id}-{disk_id} on {host}")
    for f in (hr / "run").glob("*.json"):
        rec = json.loads(f.read_text())
        if name in f.read_text():
            check(not Path(f"/proc/{rec['pid']}").exists(), f"no live server of {name} on {host}: {rec}")
    if clone_name:
        check(not rbd_exists(clone_name), f"no RBD clone {clone_name}")


def must(res, what):
    check(res.ok, f"{what}: {res}")
    return res


def expect_error(res, *words):
    check(not res.ok, f"{res.action} must fail")
    for w in words:
        check(w in res.info, f"the error names '{w}': {res.info!r}")
    check("\n" not in res.info, "the error is one line")


def set_conf(host, **kv):
    f = T / "hosts" / host / "root" / "etc" / "one.conf"
    lines = [l for l in f.read_text().splitlines() if l.split("=")[0] not in kv]
    lines += [f"{k}={v}" for k, v in kv.items()]
    f.write_text("\n".join(lines) + "\n")


def fault(kind, text):
    d = T / "faults"
    d.mkdir(exist_ok=True)
    for c in d.glob("count.*"):
        c.unlink()
    if text:
        (d / kind).write_text(text + "\n")
    elif (d / kind).exists():
        (d / kind).unlink()


def kill_host_servers(host):
    """A host crash: its servers die with kill -9."""
    for f in (T / "hosts" / host / "root" / "run").glob("*.json"):
        pid = json.loads(f.read_text())["pid"]
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    time.sleep(0.5)


# --------------------------------------------------------------- scenarios

SCENARIOS = []


def scenario(fn):
    SCENARIOS.append(fn)
    return fn


class World:
    pass


W = World()


@scenario
def deploy_persistent_and_non_persistent():
    """CLONE (clone.ublk_cache: the suffix fallback) and LN on host1, with '//'
    in paths and fe: prefixes; read and write through disk.N."""
    W.a, W.b = BASE + 1, BASE + 2
    W.model_a = make_image(W.a, 1)
    W.model_b = make_image(W.b, 2)
    # A protected @snap on the persistent image: LN must remove it (tm/ceph/ln).
    rbd("snap", "create", f"{POOL}/one-{W.b}@snap")
    rbd("snap", "protect", f"{POOL}/one-{W.b}@snap")
    vm = VM(10, [Disk(0, W.a, False), Disk(1, W.b, True, tsys=False)])
    vm.history = ["host1"]
    W.vm10 = vm
    W.m0, W.m1 = bytearray(W.model_a), bytearray(W.model_b)
    mon = T / "hosts" / "host1" / "datastores" / str(SYS_DS) / ".monitor"
    mon.parent.mkdir(parents=True, exist_ok=True)
    mon.write_text("ssh\n")
    before = probe("host1")
    r = transfer(vm, "prolog", prolog_lines(vm, "host1"))
    check(r.ok, f"prolog: {r}")
    check(any(l[0] == "INFO" and "served BACK" in l[1] for l in r.logs), f"INFO lines in the VM log: {r.logs}")
    info = json.loads(rbd("info", "--format", "json", f"{POOL}/one-{W.a}-10-0").stdout)
    check(info["parent"]["image"] == f"one-{W.a}" and info["parent"]["snapshot"] == "snap", f"clone parent: {info}")
    snaps = json.loads(rbd("snap", "ls", "--format", "json", f"{POOL}/one-{W.b}").stdout)
    check(not any(s["name"] == "snap" for s in snaps), "LN removed the persistent image's @snap")
    link = on("host1", f"readlink {sysdir(vm, False)}/disk.0").stdout.decode().strip()
    check(link == f"{T}/host/state/dev/10-0", f"disk.0 -> LINK_DIR/10-0: {link}")
    check(sock_of("host1", vm, 0) == f"{T}/host/state/sock/one-10-0.sock", "10-0 -> the socket")
    check(not mon.exists(), "the datastore's .monitor was removed (disable_local_monitoring)")
    ctx = T / "hosts" / "host1" / "datastores" / str(SYS_DS) / "10" / "disk.2"
    check(ctx.is_file(), "CONTEXT ran the stock script (test double) into the VM dir")
    verify(W.m0, "host1", vm, 0)
    verify(W.m1, "host1", vm, 1)
    write(W.m0, "host1", vm, 0, 0, 2, 0x11)
    write(W.m1, "host1", vm, 1, 4, 3, 0x22)
    s = stats("host1", vm, 1)
    # BACK: the writes went to the cache and are written back from there (the
    # flusher may already have done so).
    check(
        s["mode"] == "back" and s["dirty_bytes"] + s["writeback_bytes"] >= 3 * MIB,
        f"BACK caches the writes: {s['mode']} dirty={s['dirty_bytes']} written back={s['writeback_bytes']}",
    )
    check(s["backend"] == f"rbd:{POOL}/one-{W.b}", f"persistent backend: {s['backend']}")
    after = probe("host1")
    check(after["LS_USED_MB"] == before["LS_USED_MB"] + 32, f"LS_USED_MB grew by 2 x 16: {before} -> {after}")
    check(after["LC_DISKS"] == 2, f"LC_DISKS: {after}")
    # The same prolog again (a retried deploy): one server per disk, exit 0.
    r = transfer(vm, "prolog", prolog_lines(vm, "host1"))
    check(r.ok, f"a repeated prolog succeeds: {r}")
    servers = [f for f in (T / "hosts" / "host1" / "root" / "run").glob("*.json")]
    check(len(servers) == 2, f"still two servers: {[f.name for f in servers]}")
    verify(W.m0, "host1", vm, 0)


@scenario
def undeploy_then_image_equals_what_was_written():
    """EPILOG_UNDEPLOY: MV disks and dir to the front-end; servers stop after
    writing everything back; caches kept; `rbd export` equals the model."""
    vm = W.vm10
    vm.state, vm.lcm = 3, 30
    r = transfer(vm, "epilog", mv_lines(vm, "host1", FE))
    check(r.ok, f"undeploy: {r}")
    check(not list((T / "hosts" / "host1" / "root" / "run").glob("*.json")), "no server left on host1")
    for d in (0, 1):
        rec = record("host1", vm, d)
        check(rec and rec["state"] == "parked", f"disk {d} cache kept: {rec}")
    check(rbd_export(f"{POOL}/one-{W.b}") == bytes(W.m1), "rbd export of the persistent image = what was written")
    check(rbd_export(f"{POOL}/one-{W.a}-10-0") == bytes(W.m0), "rbd export of the clone = what was written")
    fe_dir = T / "hosts" / FE / "datastores" / str(SYS_DS) / "10"
    check((fe_dir / "disk.0").is_symlink() and (fe_dir / "disk.2").is_file(), "the VM dir is on the front-end")
    p = probe("host1")
    check(p["LS_PARKED_MB"] == 32 and p["LC_DISKS"] == 0, f"probe: {p}")


@scenario
def resume_is_warm():
    """PROLOG_UNDEPLOY back on host1: the kept caches serve at once."""
    vm = W.vm10
    vm.lcm = 31
    vm.history.append("host1")
    r = transfer(vm, "prolog", mv_lines(vm, FE, "host1"))
    check(r.ok, f"resume: {r}")
    s = stats("host1", vm, 1)
    check(s["valid_bytes"] > 0, f"warm: valid_bytes={s['valid_bytes']} right after the start")
    verify(W.m1, "host1", vm, 1)
    verify(W.m0, "host1", vm, 0)
    s2 = stats("host1", vm, 1)
    check(s2["read_hits"] > 0, f"reads hit the kept cache: {s2['read_hits']}")
    vm.lcm = 3


@scenario
def live_migration():
    """host1 -> host2 with dirty BACK data; the hook plays the switchover."""
    vm = W.vm10
    write(W.m1, "host1", vm, 1, 8, 2, 0x33)
    vm.lcm = 4
    vm.history.append("host2")
    seen = {}

    def switchover():
        s1 = stats("host1", vm, 1)
        seen["src"] = (s1["mode"], s1["dirty_bytes"], s1["migrated_out"])
        rec = record("host2", vm, 1)
        seen["dst"] = rec and rec["state"] == "serving" and rec["migrate_in"]
        # QEMU on the source writes until the switchover...
        write(W.m1, "host1", vm, 1, 12, 1, 0x44)
        # ...then the destination takes over.
        write(W.m1, "host2", vm, 1, 13, 1, 0x55)
        write(W.m0, "host2", vm, 0, 3, 1, 0x66)

    ok, steps = vmm_migrate(vm, "host1", "host2", switchover)
    check(ok and steps["post"].ok, f"migration: {steps}")
    check(seen["src"] == ("through", 0, True), f"after PRE the source is migrated out, nothing dirty: {seen}")
    check(seen["dst"], "after PRE the destination serves --migrate-in")
    check(not list((T / "hosts" / "host1" / "root" / "run").glob("*.json")), "POST stopped the source")
    check(record("host1", vm, 0) is None and record("host1", vm, 1) is None, "host1 forgot the disks")
    check(probe("host1")["LS_USED_MB"] == 0, "host1's cache space is free")
    check(not (T / "hosts" / "host1" / "datastores" / str(SYS_DS) / "10").exists(), "POST removed the source dir")
    check(not record("host2", vm, 1)["migrate_in"], "POST settled the destination (no migrate-in at restart)")
    toml = (T / "hosts" / "host2" / "root" / "etc" / "ublk-cache" / "one-10-1.toml").read_text()
    check("migrate-in" not in toml, f"the destination's toml has no migrate-in: {toml}")
    verify(W.m1, "host2", vm, 1)
    verify(W.m0, "host2", vm, 0)
    vm.lcm = 3


def check_src_intact(host):
    vm = W.vm10
    for d in (0, 1):
        s = stats(host, vm, d)
        check(s["mode"] == "back" and not s["migrated_out"], f"{host} disk {d} as before: {s['mode']} {s['migrated_out']}")
    verify(W.m1, host, vm, 1)
    verify(W.m0, host, vm, 0)


def check_dst_clean(host):
    vm = W.vm10
    for d in (0, 1):
        nothing_left(host, vm, d)
    check(not (T / "hosts" / host / "datastores" / str(SYS_DS) / "10").exists(), f"no VM dir on {host}")


@scenario
def migrations_that_fail_at_each_step():
    """host2 -> host1 failing in PRE (destination full; migrate-out of the
    second disk; the dir copy), in the hypervisor step, and FAIL undoing it."""
    vm = W.vm10
    vm.lcm = 4
    vm.history.append("host1")
    write(W.m1, "host2", vm, 1, 16, 1, 0x77)  # dirty on the source
    # 1. The destination cannot hold both caches.
    set_conf("host1", LS_TOTAL_MAX_MB=20)
    ok, steps = vmm_migrate(vm, "host2", "host1")
    set_conf("host1", LS_TOTAL_MAX_MB=0)
    check(not ok and "fail" in steps, f"PRE must fail: {steps}")
    expect_error(steps["pre"], "not enough local cache space", "16 MB needed", "4 MB free")
    check(steps["fail"].ok, f"FAIL ran: {steps['fail']}")
    check_dst_clean("host1")
    check_src_intact("host2")
    # 2. migrate-out of the second disk fails after the first one succeeded.
    fault("ublk-cache", "migrate-out 2")
    ok, steps = vmm_migrate(vm, "host2", "host1")
    fault("ublk-cache", "")
    check(not ok, "PRE must fail")
    expect_error(steps["pre"], "injected failure of migrate-out")
    check(any("migration aborted" in l[1] for l in steps["fail"].logs), f"FAIL aborted disk 0: {steps['fail'].logs}")
    check_dst_clean("host1")
    check_src_intact("host2")
    # 3. The VM directory cannot be copied.
    fault("ssh", "host2 tar -C")
    ok, steps = vmm_migrate(vm, "host2", "host1")
    fault("ssh", "")
    check(not ok, "PRE must fail")
    expect_error(steps["pre"], "copying", "failed")
    check_dst_clean("host1")
    check_src_intact("host2")
    # 4. The hypervisor step fails after PRE.
    def broken():
        raise Fail("virsh migrate failed (injected)")

    ok, steps = vmm_migrate(vm, "host2", "host1", broken)
    check(not ok and steps["fail"].ok, f"FAIL after the hypervisor step: {steps}")
    check_dst_clean("host1")
    check_src_intact("host2")
    # FAIL again (oned may run it twice): nothing to undo, still fine.
    stdin = base64.b64encode(vm.xml().encode())
    r = do_transfer_action(f"FAILMIGRATE ublk_cache host2 host1 {sysdir(vm)} 10 {SYS_DS}".split(), stdin)
    check(r.ok, f"a second FAIL is harmless: {r}")
    check_src_intact("host2")
    vm.history.pop()
    vm.lcm = 3


@scenario
def migrating_back_to_a_host_with_an_old_cache():
    """POST cannot reach the source, so its migrated-out server and cache stay;
    coming back there later must not serve that old data."""
    vm = W.vm10
    # host2's cache (16 MB for a 32 MB disk) holds blocks 0-7 for sure: read last.
    qemu_io("host2", vm, 1, [f"read -P {W.m1[mb * MIB]} {mb}M 1M" for mb in range(8)])
    vm.lcm = 4
    vm.history.append("host1")
    fault("ssh", "host2 ublk-cache-one detach")

    def switch():
        write(W.m1, "host1", vm, 1, 20, 1, 0x88)

    ok, steps = vmm_migrate(vm, "host2", "host1", switch)
    fault("ssh", "")
    check(ok, f"the migration succeeds though POST fails (no_fail): {steps}")
    check(any(l[0] == "ERROR" and "detach" in l[1] for l in steps["post"].logs), f"POST logged it: {steps['post']}")
    old = stats("host2", vm, 1)
    check(old["migrated_out"] and old["valid_bytes"] >= 8 * MIB, f"host2's old server holds blocks 0-7: {old['valid_bytes']}")
    write(W.m1, "host1", vm, 1, 0, 8, 0x99)  # newer than host2's copy of them
    # Back to host2, whose cache holds the old data of blocks 0-7.
    vm.history.append("host2")

    def back():
        verify(W.m1, "host2", vm, 1)
        write(W.m1, "host2", vm, 1, 20, 1, 0xAA)

    ok, steps = vmm_migrate(vm, "host1", "host2", back)
    check(ok, f"migration back: {steps}")
    check(
        any("left from an earlier stay" in l[1] for l in steps["pre"].logs),
        f"PRE replaced the old server: {steps['pre'].logs}",
    )
    verify(W.m1, "host2", vm, 1)
    verify(W.m0, "host2", vm, 0)
    vm.lcm = 3


@scenario
def terminate_keeps_persistent_removes_clone():
    """EPILOG: MVDS for the persistent disk, DELETE for the clone and the dir;
    then epilog_delete's DELETEs again (delete_both): idempotent."""
    vm = W.vm10
    vm.lcm = 11
    r = transfer(vm, "epilog", epilog_lines(vm, "host2"))
    check(r.ok, f"epilog: {r}")
    check(rbd_export(f"{POOL}/one-{W.b}") == bytes(W.m1), "the persistent image holds everything written")
    nothing_left("host2", vm, 0, clone_name=f"{POOL}/one-{W.a}-10-0")
    nothing_left("host2", vm, 1)
    check(rbd_exists(f"{POOL}/one-{W.b}"), "the persistent image is never removed")
    check(not (T / "hosts" / "host2" / "datastores" / str(SYS_DS) / "10").exists(), "the VM dir is gone")
    for _ in range(2):
        r = transfer(vm, "delete", delete_lines(vm, "host2"))
        check(r.ok, f"DELETE again is harmless: {r}")
    check(rbd_exists(f"{POOL}/one-{W.b}"), "DELETE of a persistent disk never removes the image")
    check(probe("host2")["LS_USED_MB"] == 0, "host2's cache space is free")
    check(probe("host1")["LS_PARKED_MB"] == 0, "host1's kept caches were freed when the VM moved")


@scenario
def cold_migration_with_the_source_host_down():
    """PROLOG_MIGRATE_UNKNOWN: host3 crashed; its disk moves to host1 without
    touching host3 (THRU: every acknowledged write is in Ceph)."""
    c = BASE + 3
    model = make_image(c, 3)
    vm = VM(40, [Disk(0, c, True, CACHE_MODE="THRU")])
    vm.history = ["host3"]
    r = transfer(vm, "prolog", prolog_lines(vm, "host3"))
    check(r.ok, f"prolog: {r}")
    write(model, "host3", vm, 0, 2, 4, 0x12)
    kill_host_servers("host3")
    (T / "hosts" / "host3" / "down").touch()
    vm.lcm = 60
    vm.history.append("host1")
    mark = (T / "ssh.log").stat().st_size
    t0 = time.time()
    r = transfer(vm, "prolog_migr", mv_lines(vm, "host3", "host1"))
    check(r.ok, f"cold migration from a dead host: {r}")
    calls = (T / "ssh.log").read_text()[mark:]
    check(" host3 " not in calls, "nothing was sent to the dead host")
    check(any("previous host host3 is unknown" in l[1] for l in r.logs), f"the warning is logged: {r.logs}")
    log(f"   (the destination took the dead server's lock over in {time.time() - t0:.1f} s)")
    verify(model, "host1", vm, 0)
    vm.lcm = 3
    # DELETE on the dead host (epilog_delete_previous) fails and says why.
    r = transfer(vm, "delete_prev", [f"DELETE ublk_cache host3:{sysdir(vm)}/disk.0 40 {IMG_DS}"])
    expect_error(r, "host3", "No route to host")
    (T / "hosts" / "host3" / "down").unlink()
    r = transfer(vm, "delete_prev", [f"DELETE ublk_cache host3:{sysdir(vm)} 40 {SYS_DS}"])
    check(r.ok, f"cleanup on host3 once it is back: {r}")
    nothing_left("host3", vm, 0)
    vm.lcm = 11
    r = transfer(vm, "epilog", epilog_lines(vm, "host1"))
    check(r.ok, f"epilog: {r}")
    check(rbd_export(f"{POOL}/one-{c}") == bytes(model), "the image holds the data")


def in_parallel(vms, fn):
    """fn(vm) for every VM at once (as oned's 15 TM threads may); results by VM id."""
    res = {}
    threads = [threading.Thread(target=lambda v=v: res.__setitem__(v.id, fn(v))) for v in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


@scenario
def parallel_deploys():
    """Two VMs' prologs on host3 at once: both succeed, accounting is exact."""
    vms = [VM(20 + i, [Disk(0, W.a, False)]) for i in range(2)]
    for vm in vms:
        vm.history = ["host3"]
    before = probe("host3")["LS_USED_MB"]
    res = in_parallel(vms, lambda v: transfer(v, "prolog", prolog_lines(v, "host3")))
    for vm in vms:
        check(res[vm.id].ok, f"VM {vm.id}: {res[vm.id]}")
        verify(W.model_a, "host3", vm, 0)
    after = probe("host3")
    check(after["LS_USED_MB"] == before + 32 and after["LC_DISKS"] == 2, f"accounting: {before} -> {after}")
    for vm in vms:
        vm.lcm = 11
    res = in_parallel(vms, lambda v: transfer(v, "epilog", epilog_lines(v, "host3")))
    for vm in vms:
        check(res[vm.id].ok, f"epilog {vm.id}: {res[vm.id]}")
        nothing_left("host3", vm, 0, clone_name=f"{POOL}/one-{W.a}-{vm.id}-0")
    check(probe("host3")["LS_USED_MB"] == before, "all freed")


@scenario
def full_local_store_is_refused_with_nothing_left():
    """A cache larger than host3's (real, 256 MiB ext4) store has free."""
    vm = VM(31, [Disk(0, W.a, False, SIZE=300, CACHE_SIZE=290)])
    vm.history = ["host3"]
    set_conf("host3", LS_MAX=400)
    r = transfer(vm, "prolog", prolog_lines(vm, "host3"))
    set_conf("host3", LS_MAX=48)
    expect_error(r, "not enough local cache space", "290 MB needed", "MB free")
    nothing_left("host3", vm, 0, clone_name=f"{POOL}/one-{W.a}-31-0")


@scenario
def a_failed_start_undoes_everything_before_it():
    """The clone is made and the cache reserved, then the server cannot start:
    the attach takes both back (and the links, config, record)."""
    vm = VM(80, [Disk(0, W.a, False)])
    vm.history = ["host1"]
    before = probe("host1")["LS_USED_MB"]
    fault("ublk-cache", "serve 1")
    r = transfer(vm, "prolog", prolog_lines(vm, "host1"))
    fault("ublk-cache", "")
    expect_error(r, "exited", "injected failure of serve call 1")
    check(any("cloned" in l[1] for l in r.logs), f"the clone had been made: {r.logs}")
    nothing_left("host1", vm, 0, clone_name=f"{POOL}/one-{W.a}-80-0")
    check(not (T / "hosts" / "host1" / "datastores" / str(SYS_DS) / "80" / "disk.0").is_symlink(), "no disk.0")
    check(probe("host1")["LS_USED_MB"] == before, "the cache space is back")


@scenario
def bad_attributes_are_refused_by_name():
    cases = [
        ({"CACHE_MODE": "FAST"}, ["CACHE_MODE 'FAST' is not a cache mode", "NONE, AROUND, THRU, BACK or OFFLINE"]),
        ({"CACHE_SIZE": "100"}, ["CACHE_SIZE=100 MB", "exceeds this host's LS_MAX=48 MB"]),
        ({"CACHE_MODE": "OFFLINE", "CACHE_SIZE": "10"}, ["OFFLINE", "CACHE_SIZE=10 MB", "smaller than the disk (SIZE=32 MB)"]),
        ({"CACHE_SIZE": "ten"}, ["CACHE_SIZE='ten' is not a size in MB"]),
        ({"TYPE": "RBD"}, ["TYPE=RBD", "DISK_TYPE"]),
        ({"CEPH_CONF": "/etc/passwd"}, ["CEPH_CONF=/etc/passwd is not a file in this host's CEPH_PATHS"]),
    ]
    for i, (attrs, words) in enumerate(cases):
        vm = VM(300 + i, [Disk(0, W.a, False, **attrs)])
        vm.history = ["host1"]
        r = transfer(vm, "prolog", prolog_lines(vm, "host1"))
        expect_error(r, *words)
        nothing_left("host1", vm, 0, clone_name=f"{POOL}/one-{W.a}-{vm.id}-0")
        # oned then deletes the failed VM: DELETE must work despite the bad value.
        vm.lcm = 11
        r = transfer(vm, "epilog", epilog_lines(vm, "host1"))
        check(r.ok, f"DELETE of a refused disk: {r}")


@scenario
def snapshots_of_a_powered_off_vm_and_resize():
    d = BASE + 4
    model = make_image(d, 4)
    vm = VM(50, [Disk(0, d, True)])
    vm.history = ["host1"]
    must(transfer(vm, "prolog", prolog_lines(vm, "host1")), "prolog")
    write(model, "host1", vm, 0, 0, 4, 0x31)
    snap0 = bytearray(model)
    vm.lcm = 51
    r = transfer(vm, "snap", [f"SNAP_CREATE.ublk_cache ublk_cache host1:{sysdir(vm)}/disk.0 0 50 {IMG_DS}"])
    check(r.ok, f"snap_create: {r}")
    write(model, "host1", vm, 0, 0, 4, 0x32)  # cached, dirty, newer than the snapshot
    vm.lcm = 52
    r = transfer(vm, "snap", [f"SNAP_REVERT ublk_cache host1:{sysdir(vm)}/disk.0 0 50 {IMG_DS}"])
    check(r.ok, f"snap_revert: {r}")
    verify(snap0, "host1", vm, 0)  # never the cached post-snapshot data
    vm.lcm = 53
    r = transfer(vm, "snap", [f"SNAP_DELETE ublk_cache host1:{sysdir(vm)}/disk.0 0 50 {IMG_DS}"])
    check(r.ok, f"snap_delete: {r}")
    snaps = json.loads(rbd("snap", "ls", "--format", "json", f"{POOL}/one-{d}").stdout)
    check(not any(s["name"] == "0" for s in snaps), f"snapshot 0 removed: {snaps}")
    vm.lcm = 57
    r = transfer(vm, "snap", [f"SNAP_CREATE ublk_cache host1:{sysdir(vm)}/disk.0 1 50 {IMG_DS}"])
    expect_error(r, "disk snapshots of a running or suspended VM are not supported", "power the VM off")
    vm.lcm = 62
    r = transfer(vm, "resize", [f"RESIZE ublk_cache host1:{sysdir(vm)}/disk.0 48 50 {IMG_DS}"])
    expect_error(r, "resizing a disk of a running VM is not supported")
    vm.lcm = 63
    r = transfer(vm, "resize", [f"RESIZE ublk_cache host1:{sysdir(vm)}/disk.0 48 50 {IMG_DS}"])
    check(r.ok, f"resize while powered off: {r}")
    info = json.loads(rbd("info", "--format", "json", f"{POOL}/one-{d}").stdout)
    check(info["size"] == 48 * MIB, f"image grown: {info['size']}")
    verify(snap0, "host1", vm, 0)
    vm.lcm = 11
    must(transfer(vm, "epilog", epilog_lines(vm, "host1")), "epilog")


@scenario
def unsupported_actions_refuse():
    vm = VM(51, [Disk(0, W.a, False)])
    vm.history = ["host1"]
    for line, words in [
        (f"MKIMAGE ublk_cache 64 raw host1:{sysdir(vm)}/disk.1 51 {SYS_DS}", ["volatile disks (MKIMAGE) is not supported"]),
        (f"MKSWAP ublk_cache 64 host1:{sysdir(vm)}/disk.1 51 {SYS_DS}", ["volatile swap disks"]),
        (f"PREBACKUP_LIVE ublk_cache host1:{sysdir(vm)} 0 51 {SYS_DS}", ["live backups"]),
    ]:
        r = transfer(vm, "x", [line])
        expect_error(r, *words)
    r = transfer(vm, "x", [f"CLONE nosuch fe:{POOL}/one-{W.a} host1:{sysdir(vm)}/disk.0 51 {IMG_DS}"])
    expect_error(r, "Transfer Driver 'nosuch' not available")


@scenario
def delegation_to_the_other_tms_of_the_vm():
    """A VM with a second disk from a ceph datastore: pre/post/failmigrate run
    tm/ceph's with our arguments + 'ublk_cache' and the same stdin."""
    vm = VM(60, [Disk(0, W.a, False, CACHE_MODE="THRU"), Disk(1, W.b, True, TM_MAD="ceph", DATASTORE_ID=CEPH_DS)])
    vm.history = ["host1"]
    must(transfer(vm, "prolog", prolog_lines(vm, "host1")), "prolog")
    vm.lcm = 4
    vm.history.append("host2")
    log_f = T / "recorder.log"
    if log_f.exists():
        log_f.unlink()
    ok, steps = vmm_migrate(vm, "host1", "host2")
    check(ok, f"migration: {steps}")
    b64 = base64.b64encode(vm.xml().encode()).decode()
    lines = log_f.read_text().splitlines()
    want = f"host1 host2 {sysdir(vm)} 60 {SYS_DS} ublk_cache stdin={b64}"
    check(lines == [f"ceph/premigrate {want}", f"ceph/postmigrate {want}"], f"recorded: {lines}")
    log_f.unlink()
    vm.history.append("host1")
    def broken():
        raise Fail("virsh migrate failed (injected)")

    ok, steps = vmm_migrate(vm, "host2", "host1", broken)
    check(not ok, "failed migration")
    lines = log_f.read_text().splitlines()
    check(
        [l.split()[0] for l in lines] == ["ceph/premigrate", "ceph/failmigrate"],
        f"FAIL delegated too (stock failmigrate never does): {lines}",
    )
    vm.history.pop()
    vm.lcm = 11
    must(transfer(vm, "epilog", epilog_lines(vm, "host2")), "epilog")
    nothing_left("host2", vm, 0, clone_name=f"{POOL}/one-{W.a}-60-0")


def use_systemd(host):
    """LAUNCHER=systemd on `host`, with the systemctl/journalctl test doubles;
    returns the environment prefix that runs that systemctl by hand."""
    sd = f"{T}/host/systemd"
    unit_env = (
        f"env UBLKC_SYSTEMD_DIR={sd} UBLKC_UNIT_FILE={CONTRIB.parent}/systemd/ublk-cache@.service "
        f"UBLKC_UNIT_CONF_DIR={T}/host/etc/ublk-cache UBLKC_UNIT_UBLK_CACHE={SHIM}/ublk-cache "
        f"UBLKC_DROPIN_DIR={sd}/system"
    )
    set_conf(host, LAUNCHER="systemd", SYSTEMCTL=f"{unit_env} {SHIM}/systemctl",
             JOURNALCTL=f"env UBLKC_SYSTEMD_DIR={sd} {SHIM}/journalctl", SYSTEMD_DIR=f"{sd}/system")
    return unit_env


def reset_conf(host):
    (T / "hosts" / host / "root" / "etc" / "one.conf").write_text(
        HOST_CONF.format(t=T, shim=SHIM, ceph_dir=Path(CEPH_CONF).parent)
    )


def flush_disk(host, vm, disk_id):
    r = record(host, vm, disk_id)
    on(host, f"{UBLK} --run-dir {T}/host/run ctl {r['server']['id']} flush --json")


@scenario
def systemd_units_come_back_after_a_reboot():
    """LAUNCHER=systemd: the real ublk-cache@.service (Type=notify), run by a
    systemctl test double. The unit is enabled, so after a crash and reboot
    of the host (servers killed, tmpfs lost) it serves the disk again."""
    unit_env = use_systemd("host3")
    try:
        e = BASE + 5
        model = make_image(e, 5)
        vm = VM(70, [Disk(0, e, True)])
        vm.history = ["host3"]
        must(transfer(vm, "prolog", prolog_lines(vm, "host3")), "prolog")
        unit = "ublk-cache@one-70-0.service"
        host3 = T / "hosts" / "host3" / "root"
        check((host3 / "systemd" / "enabled" / unit).exists(), f"{unit} is enabled")
        check((host3 / "systemd" / f"{unit}.ready").exists(), "the start returned after READY=1")
        check(record("host3", vm, 0)["launcher"] == "systemd", "the record says systemd")
        write(model, "host3", vm, 0, 5, 3, 0x5A)
        # The host crashes: the service and its supervisor die, tmpfs is lost.
        pid = int((host3 / "systemd" / f"{unit}.pid").read_text())
        ppid = int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])
        for p_ in (ppid, pid):
            os.kill(p_, 9)
        time.sleep(0.5)
        for d in ("run", "shm"):
            for f in (host3 / d).iterdir():
                f.unlink()
        t0 = time.time()
        on("host3", f"{unit_env} {SHIM}/systemctl ublkc-test-boot")
        log(f"   (the unit came back after the reboot in {time.time() - t0:.1f} s, the dead server's lock taken over)")
        verify(model, "host3", vm, 0)
        # A server that cannot start: the error carries its journal; nothing is left.
        bad = VM(71, [Disk(0, e, True)])
        bad.history = ["host3"]
        fault("ublk-cache", "serve 1")
        r = transfer(bad, "prolog", prolog_lines(bad, "host3"))
        fault("ublk-cache", "")
        expect_error(r, "ublk-cache@one-71-0.service", "its journal", "injected failure of serve call 1")
        nothing_left("host3", bad, 0)
        check(not (host3 / "systemd" / "enabled" / "ublk-cache@one-71-0.service").exists(), "the failed unit is disabled")
        vm.lcm = 11
        must(transfer(vm, "epilog", epilog_lines(vm, "host3")), "epilog")
        check(not (host3 / "systemd" / "enabled" / unit).exists(), f"{unit} is disabled at the end")
        check((host3 / "systemd" / f"{unit}.result").read_text().strip() == "success", "the service stopped cleanly")
        check(rbd_export(f"{POOL}/one-{e}") == bytes(model), "the image holds everything written")
        nothing_left("host3", vm, 0)
    finally:
        reset_conf("host3")


@scenario
def a_host_that_lost_its_disk_never_writes_its_cache_back():
    """BACK data left in a crashed host's cache after the disk moved on
    (PROLOG_MIGRATE_UNKNOWN) and was written elsewhere: when the host is back,
    neither its enabled unit (at boot) nor a migration back writes that old
    data over the image; `ublk-cache-one discard` drops it on the operator's word."""
    unit_env = use_systemd("host3")
    try:
        f = BASE + 6
        make_image(f, 6)
        vm = VM(73, [Disk(0, f, True)])
        vm.history = ["host3"]
        must(transfer(vm, "prolog", prolog_lines(vm, "host3")), "prolog")
        # Writes that certainly stay dirty: the OSD is frozen, nothing is written back.
        osd = int((Path(os.environ["UBLK_CACHE_CEPH_DIR"]) / "run" / "osd.0.pid").read_text())
        os.kill(osd, signal.SIGSTOP)
        try:
            qemu_io("host3", vm, 0, ["write -P 97 0 4M", "flush"])
            kill_host_servers("host3")
        finally:
            os.kill(osd, signal.SIGCONT)
        (T / "hosts" / "host3" / "down").touch()
        time.sleep(1)
        model = bytearray(rbd_export(f"{POOL}/one-{f}"))
        vm.lcm = 60
        vm.history.append("host1")
        must(transfer(vm, "prolog_migr", mv_lines(vm, "host3", "host1")), "migration from the dead host")
        vm.lcm = 3
        write(model, "host1", vm, 0, 0, 4, 0x62)
        flush_disk("host1", vm, 0)
        # host3 is back and boots: its unit must not start on the old cache.
        (T / "hosts" / "host3" / "down").unlink()
        r = on("host3", f"{unit_env} {SHIM}/systemctl ublkc-test-boot", check_rc=False)
        check(r.returncode != 0, "the unit of the lost disk did not start at boot")
        journal = (T / "hosts" / "host3" / "root" / "systemd" / "ublk-cache@one-73-0.service.journal").read_text()
        check("now served by host1" in journal, f"the boot check says why: {journal[-600:]}")
        check(rbd_export(f"{POOL}/one-{f}") == bytes(model), "nothing was written back at boot")
        check(record("host3", vm, 0)["state"] == "stale", "host3 keeps the cache as stale")
        # The VM comes back to host3 (a cold migration): refused, nothing written.
        vm.lcm = 8
        vm.history.append("host3")
        r = transfer(vm, "prolog_migr", mv_lines(vm, "host1", "host3"))
        expect_error(r, "served by host1", "ublk-cache-one discard --vm 73 --disk 0")
        check(rbd_export(f"{POOL}/one-{f}") == bytes(model), "nothing was written back at the attach")
        out = on("host3", f"{HELPER} discard --vm 73 --disk 0").stderr.decode()
        check("dropped" in out, f"discard: {out}")
        must(transfer(vm, "prolog_migr", mv_lines(vm, "host1", "host3")), "the migration retried")
        vm.lcm = 3
        verify(model, "host3", vm, 0)
        vm.lcm = 11
        must(transfer(vm, "epilog", epilog_lines(vm, "host3")), "epilog")
        nothing_left("host3", vm, 0)
        check(rbd_export(f"{POOL}/one-{f}") == bytes(model), "the image holds what host1 wrote")
    finally:
        reset_conf("host3")


@scenario
def the_probe():
    p = probe("host1")
    for k in ("LC_MAD", "LS_MAD", "LS_PATH", "LS_MAX", "LS_TOTAL_MB", "LS_USED_MB", "LS_FREE_MB"):
        check(k in p, f"{k} in {p}")
    check(p["LC_MAD"] == "ublk-cache" and p["LS_MAD"] == "file" and p["LS_MAX"] == 48, f"{p}")
    check(isinstance(p["LS_FREE_MB"], int) and 200 <= p["LS_TOTAL_MB"] <= 256, f"{p}")
    p = probe("host1", "UBLKC_HELPER=/nonexistent")
    check(p == {"LC_MAD": "none"}, f"without the helper: {p}")
    p = probe("host1", f"UBLKC_CONF={T}/nonexistent.conf")
    check("LC_ERROR" in p and p["LS_MAD"] == "none", f"without a config: {p}")


@scenario
def monitor_against_real_ceph_df():
    ds = datastore_xml(SYS_DS, "system")
    data = f"<DS_DRIVER_ACTION_DATA>{ds}<DATASTORE_LOCATION>{DSLOC}</DATASTORE_LOCATION></DS_DRIVER_ACTION_DATA>"
    for attempt in range(5):
        r = do_transfer_action(["MONITOR", "ublk_cache", str(SYS_DS)], base64.b64encode(data.encode()))
        check(r.ok, f"monitor: {r}")
        df = json.loads(run(["ceph", "--conf", CEPH_CONF, "df", "detail", "--format", "json"]).stdout)
        pool = next(p for p in df["pools"] if p["name"] == POOL)["stats"]
        stored = pool["stored"] or pool["bytes_used"]
        free = pool["max_avail"]
        want = f"USED_MB={stored // MIB}\nTOTAL_MB={(stored + free) // MIB}\nFREE_MB={free // MIB}\n"
        if r.info == want:
            return
        time.sleep(1)
    raise Fail(f"monitor printed {r.info!r}, ceph df says {want!r}")


HOST_CONF = """LS_MAD=file
LS_PATH={t}/host/ls
LS_MAX=48
LAUNCHER=exec
EXPORT=nbd
DATASTORE_LOCATION={t}/datastores
STATE_DIR={t}/host/state
CONF_DIR={t}/host/etc/ublk-cache
RUN_DIR={t}/host/run
UBLK_CACHE={shim}/ublk-cache
DEFAULT_CACHE_MB=16
WAIT_LIVE_S=120
STOP_TIMEOUT_S=300
CEPH_PATHS={ceph_dir}
"""


def setup():
    """The front-end (install.sh --frontend into a fake ONE_LOCATION), the
    test doubles, three hosts with a 256 MiB ext4 cache store each, and the
    front-end as a host (VM directories go there at undeploy)."""
    (REMOTES).mkdir(parents=True)
    run([str(CONTRIB / "install.sh"), "--frontend", "--one-location", str(ONE), "--root", str(T / "feroot"), "--helper", HELPER])
    check((REMOTES / "tm" / "ublk_cache" / "clone").is_file(), "install.sh --frontend put the TM in place")
    check(os.readlink(REMOTES / "tm" / "ublk_cache" / "context") == "../common/context", "context -> stock script")
    (REMOTES / "tm" / "common").mkdir(parents=True)
    (REMOTES / "tm" / "common" / "context").write_bytes((SHIM / "context").read_bytes())
    (REMOTES / "tm" / "common" / "context").chmod(0o755)
    (REMOTES / "tm" / "ceph").mkdir(parents=True)
    for a in ("premigrate", "postmigrate", "failmigrate"):
        f = REMOTES / "tm" / "ceph" / a
        f.write_bytes((SHIM / "recorder").read_bytes())
        f.chmod(0o755)
    hostroot = T / "hostroot"
    run([str(CONTRIB / "install.sh"), "--host", "--root", str(hostroot), "--helper", HELPER, "--ublk-cache", UBLK])
    for f in ("usr/lib/ublk-cache/ublk-cache-one", "usr/local/bin/ublk-cache", "etc/systemd/system/ublk-cache@.service",
              "etc/sudoers.d/ublk-cache-one", "etc/ublk-cache/one.conf"):
        check((hostroot / f).exists(), f"install.sh --host installed {f}")
    (hostroot / "etc" / "ublk-cache" / "one.conf").write_text("LS_MAD=dummy\n")
    run([str(CONTRIB / "install.sh"), "--host", "--root", str(hostroot), "--helper", HELPER, "--ublk-cache", UBLK])
    check((hostroot / "etc" / "ublk-cache" / "one.conf").read_text() == "LS_MAD=dummy\n", "an edited one.conf is kept")
    for d in ("host", "datastores", "faults"):
        (T / d).mkdir()
    for h in ("host1", "host2", "host3", FE):
        root = T / "hosts" / h / "root"
        for d in ("etc/ublk-cache", "state", "run", "shm", "ls"):
            (root / d).mkdir(parents=True)
        (T / "hosts" / h / "datastores").mkdir()
        if h == FE:
            continue
        img = T / "hosts" / h / "ls.img"
        run(["truncate", "-s", "256M", str(img)])
        run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)])
        run(["mount", "-o", "loop", str(img), str(root / "ls")])
        (root / "etc" / "one.conf").write_text(HOST_CONF.format(t=T, shim=SHIM, ceph_dir=Path(CEPH_CONF).parent))
    fx = ONE / "fixtures"
    for d in ("vm", "ds", "host"):
        (fx / d).mkdir(parents=True, exist_ok=True)
    (fx / "ds" / f"{SYS_DS}.xml").write_text(datastore_xml(SYS_DS, "system"))
    (fx / "ds" / f"{IMG_DS}.xml").write_text(datastore_xml(IMG_DS, "image"))
    (fx / "ds" / f"{CEPH_DS}.xml").write_text(datastore_xml(CEPH_DS, "ceph"))


def cleanup_images():
    """Every image the run made, clones first (the test cluster is kept between
    runs by hand, and memstore does not grow)."""
    names = rbd("ls", POOL).stdout.decode().split()
    ours = [n for n in names if any(n == f"one-{i}" or n.startswith(f"one-{i}-") for i in IMAGES)]
    for n in sorted(ours, key=len, reverse=True):
        for snap in json.loads(rbd("snap", "ls", "--format", "json", f"{POOL}/{n}").stdout):
            if snap["protected"] == "true":
                rbd("snap", "unprotect", f"{POOL}/{n}@{snap['name']}", check_rc=False)
        rbd("snap", "purge", "--no-progress", f"{POOL}/{n}", check_rc=False)
        rbd("rm", "--no-progress", f"{POOL}/{n}", check_rc=False)


def main():
    only = sys.argv[1:]
    setup()
    t_all = time.time()
    for fn in SCENARIOS:
        if only and fn.__name__ not in only:
            continue
        t0 = time.time()
        log(f"== {fn.__name__}")
        try:
            fn()
            PASSED.append(fn.__name__)
            log(f"PASS: {fn.__name__} ({time.time() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 - a scenario's failure is reported, the next one runs
            FAILED.append(fn.__name__)
            log(f"FAIL: {fn.__name__} ({time.time() - t0:.1f} s): {e}")
            if not isinstance(e, Fail):
                traceback.print_exc()
    try:
        cleanup_images()
    except Fail as e:
        log(f"warning: removing the run's RBD images: {e}")
    log(f"opennebula harness: {len(PASSED)} passed, {len(FAILED)} failed in {time.time() - t_all:.0f} s")
    for f in FAILED:
        log(f"  failed: {f}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
