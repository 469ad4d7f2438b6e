#!/usr/bin/env python3
"""Benchmark runner: fio over NBD against our export and its peers, interleaved.

Every configuration runs the same fio job in turn (A B C D, A B C D, ...), each
run a fresh process on a server started for it, so slow drifts of a shared,
noisy machine hit every configuration alike. Per cell it reports the median,
min and max over the repeats, and ratios against the peer measured in the
same run (the median of the per-repeat ratios). Prints markdown tables and
writes JSON.

Configurations (README.md, section "Benchmarks", says more):
  local  our export (`ublk-cache serve`, back mode, warm cache) over a file
         backend; qemu-nbd --cache=none --aio=io_uring and nbdkit file on an
         identical raw file; fio io_uring on a raw file beside the cache (the
         physical limit).
  slow   a slow backend (FaultyBackend over the file: BENCH_READ_DELAY_MS
         reads, BENCH_WRITE_DELAY_MS writes and flushes) without a cache, and
         behind our cache in `back` and `through` (warm), and in `back` with a
         cache formatted empty before each run (cold; read jobs only).
  drain  write-back drain throughput (benches writeback-drain). Each peer moves
         the drain's bytes once and ends with a flush, as a drain does (fio
         1 MiB QD16, --end_fsync, its job runtime). With the cache in memory
         (tmpfs: a cache device much faster than the backend, as NVMe in front
         of Ceph), against fio's sequential write of the backend file, and over
         the slow backend against its sequential write through NBD: the
         backend is the bound. With the cache on the backend's own disk,
         against a fio copy on that disk (a sequential read of a file there
         and the sequential write of the backend at once, timed until both
         end): the disk's reads and writes together are the bound.
  bw     a backend of limited bandwidth (BENCH_BW_MBPS, default 80 MB/s, the
         figure of Ceph in the original request; reads and writes share it) on
         a BENCH_BW_SIZE disk: read jobs without a cache, behind our cache warm
         (`back`), and cold (a cache formatted empty before each run).
  ram    metadata RAM per GiB of cache at 64 KiB lines (benches metadata-ram).
  pacing two disks on one backend link of BENCH_BW_MBPS (benches
         writeback-pacing, in one process): one drains BENCH_PACING_DIRTY of
         dirty data from a 1 GiB cache, the other (mode none) reads 4 KiB at
         random, QD1, for BENCH_PACING_SECONDS; the reader's latency against
         the same reads with no drain, and the drain's rate, unpaced, with a
         static --writeback-rate of half the link, and with the dirty-level
         controller (its default watermarks, 10 % and 70 %); then the reader on
         the draining disk itself (lines it never cached) while unpaced
         write-back keeps its full window, and while it makes way for the
         guest's backend reads (the default).
  sparse nbdcopy of a sparse export (1/64 of it data, in 1 MiB extents) to null:,
         ours (serve --mode none) against qemu-nbd on the same file: both answer
         block status, so the copy skips the holes; the ratio is of copy speed.

Environment (defaults in brackets):
  BENCH_DIR [/var/tmp]  where the scratch files go (needs ~6x BENCH_SIZE free)
  BENCH_SIZE [1G]  disk size; BENCH_RUNTIME [1.5] and BENCH_RAMP [0.5] seconds per run;
  BENCH_REPEATS [3]; BENCH_GROUPS [local,slow,bw,drain,ram,sparse,pacing]; BENCH_JOBS [all];
  BENCH_READ_DELAY_MS [1]; BENCH_WRITE_DELAY_MS [2]; BENCH_DRAIN_BYTES [1G];
  BENCH_BW_MBPS [80]; BENCH_BW_SIZE [256M];
  BENCH_RAM_GIB [2]; BENCH_PACING_DIRTY [256M]; BENCH_PACING_SECONDS [10];
  BENCH_JSON [target/bench/results-DATE.json];
  BENCH_BIN_DIR [target/release]  where ublk-cache and the bench binaries are;
  BENCH_LONG=1   a longer run: 4G, 20 s runs, 5 s ramp, 5 repeats, 1G drain, 4 GiB RAM probe;
  BENCH_SMOKE=1  a tiny run that only checks the machinery (well under a minute).
Build first: cargo build --release -p ublk-cache -p ublk-cache-benches
"""

import datetime
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIO_DIR = ROOT / "benches" / "fio"
MIB = 1 << 20

# name -> (job file, main metric). IOPS for 4 KiB jobs, MiB/s for 1 MiB jobs.
JOBS = {
    "randread-4k-qd32": "iops",
    "randwrite-4k-qd32": "iops",
    "randwrite-4k-qd1": "iops",
    "seqread-1m-qd16": "mib_s",
    "seqwrite-1m-qd16": "mib_s",
    "randrw-70-30-zipf": "iops",
}
READ_JOBS = ["randread-4k-qd32", "seqread-1m-qd16"]
# The slow backend's default set (BENCH_JOBS, when given, applies to it too).
SLOW_JOBS_DEFAULT = ["randread-4k-qd32", "randwrite-4k-qd32", "randwrite-4k-qd1",
                     "seqread-1m-qd16"]


class BenchError(Exception):
    pass


def env(name, default):
    v = os.environ.get(name)
    return default if v is None or v == "" else v


def parse_size(s):
    s = s.strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if s and s[-1].upper() in units:
        mult = units[s[-1].upper()]
        s = s[:-1]
    try:
        n = int(s) * mult
    except ValueError:
        raise BenchError(f"size {s!r}: not a number of bytes (e.g. 1G, 256M)") from None
    if n <= 0:
        raise BenchError(f"size {s!r} must be positive")
    return n


def seconds(name, v):
    try:
        x = float(v)
    except ValueError:
        raise BenchError(f"{name}={v!r}: not a number of seconds") from None
    if not 0 <= x < 86400:
        raise BenchError(f"{name}={v!r}: out of range")
    return x


def params():
    long_run = env("BENCH_LONG", "0") == "1"
    smoke = env("BENCH_SMOKE", "0") == "1"
    if smoke:
        d = dict(size="64M", runtime="1", ramp="0", repeats="1", drain="16M", ram="1",
                 bw_size="32M", jobs="randread-4k-qd32", groups="local,slow,bw,drain,sparse,pacing")
    elif long_run:
        d = dict(size="4G", runtime="20", ramp="5", repeats="5", drain="1G", ram="4",
                 bw_size="1G", jobs="", groups="local,slow,bw,drain,ram,sparse,pacing")
    else:
        d = dict(size="1G", runtime="1.5", ramp="0.5", repeats="3", drain="1G", ram="2",
                 bw_size="256M", jobs="", groups="local,slow,bw,drain,ram,sparse,pacing")
    p = {
        "size": parse_size(env("BENCH_SIZE", d["size"])),
        "runtime": seconds("BENCH_RUNTIME", env("BENCH_RUNTIME", d["runtime"])),
        "ramp": seconds("BENCH_RAMP", env("BENCH_RAMP", d["ramp"])),
        "repeats": int(env("BENCH_REPEATS", d["repeats"])),
        "drain_bytes": parse_size(env("BENCH_DRAIN_BYTES", d["drain"])),
        "ram_gib": int(env("BENCH_RAM_GIB", d["ram"])),
        "pacing_dirty": parse_size(env("BENCH_PACING_DIRTY", "16M" if smoke else "256M")),
        "pacing_cache": parse_size("64M" if smoke else "1G"),
        "pacing_seconds": seconds("BENCH_PACING_SECONDS",
                                  env("BENCH_PACING_SECONDS", "0.5" if smoke else "10")),
        "read_delay_ms": float(env("BENCH_READ_DELAY_MS", "1")),
        "write_delay_ms": float(env("BENCH_WRITE_DELAY_MS", "2")),
        "bw_mbps": float(env("BENCH_BW_MBPS", "80")),
        "bw_size": parse_size(env("BENCH_BW_SIZE", d["bw_size"])),
        "groups": [g for g in env("BENCH_GROUPS", d["groups"]).split(",") if g],
        "jobs": [j for j in env("BENCH_JOBS", d["jobs"]).split(",") if j] or list(JOBS),
        "dir": env("BENCH_DIR", "/var/tmp"),
        "bin_dir": Path(env("BENCH_BIN_DIR", str(ROOT / "target" / "release"))),
        "smoke": smoke,
        "long": long_run,
    }
    for j in p["jobs"]:
        if j not in JOBS:
            raise BenchError(f"BENCH_JOBS: unknown job {j!r} (known: {', '.join(JOBS)})")
    for g in p["groups"]:
        if g not in ("local", "slow", "bw", "drain", "ram", "sparse", "pacing"):
            raise BenchError(f"BENCH_GROUPS: unknown group {g!r} "
                             "(known: local, slow, bw, drain, ram, sparse, pacing)")
    if p["pacing_dirty"] % MIB or not 0 < p["pacing_dirty"] <= p["pacing_cache"]:
        raise BenchError("BENCH_PACING_DIRTY must be a positive multiple of 1 MiB, "
                         f"at most the {p['pacing_cache'] >> 20} MiB cache")
    if p["pacing_seconds"] <= 0:
        raise BenchError("BENCH_PACING_SECONDS must be positive")
    if p["runtime"] <= 0:
        raise BenchError("BENCH_RUNTIME must be positive")
    if p["repeats"] < 1:
        raise BenchError("BENCH_REPEATS must be at least 1")
    if p["size"] % MIB:
        raise BenchError("BENCH_SIZE must be a multiple of 1 MiB")
    if p["bw_size"] % MIB or p["bw_size"] == 0:
        raise BenchError("BENCH_BW_SIZE must be a positive multiple of 1 MiB")
    if p["bw_mbps"] <= 0:
        raise BenchError("BENCH_BW_MBPS must be positive")
    p["drain_bytes"] = min(p["drain_bytes"], p["size"])
    p["bw_jobs"] = [j for j in p["jobs"] if j in READ_JOBS]
    if p["smoke"]:
        p["slow_jobs"] = [j for j in p["jobs"]]
    else:
        p["slow_jobs"] = [j for j in p["jobs"] if j in SLOW_JOBS_DEFAULT or
                          env("BENCH_JOBS", "") != ""]
    return p


def tool(name):
    # /usr/bin first: a pyenv python earlier on PATH breaks Debian's python tools.
    path = "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")
    t = shutil.which(name, path=path)
    if not t:
        raise BenchError(f"{name} is not installed (scripts/install-deps.sh installs it)")
    return t


def uri_for(sock):
    return f"nbd+unix:///?socket={sock}"


def wait_socket(sock, proc, log, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before listening; "
                             f"its log:\n{tail(log)}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
            return
        except OSError:
            time.sleep(0.02)
    raise BenchError(f"server did not listen on {sock} within {timeout:.0f} s; log:\n{tail(log)}")


def tail(path, n=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Server:
    """A server process for one configuration, started for one run."""

    def __init__(self, argv, log, sock, stop="term", prints_uri=True, env_extra=None):
        self.sock, self.log, self.stop_how = sock, log, stop
        if sock.exists():
            sock.unlink()
        e = dict(os.environ)
        e.update(env_extra or {})
        self.logf = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.logf, env=e,
            stdin=subprocess.PIPE if stop == "stdin" else subprocess.DEVNULL)
        self.uri = None
        try:
            if prints_uri:
                self.uri = self._read_uri()
            else:
                wait_socket(sock, self.proc, log)
                self.uri = uri_for(sock)
        except BaseException:
            self.kill()
            raise

    def _read_uri(self, timeout=120.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline().decode(errors="replace").strip()
                if line:
                    return line
            if self.proc.poll() is not None:
                raise BenchError(f"{self.proc.args[0]} exited with {self.proc.returncode} "
                                 f"before serving; its log:\n{tail(self.log)}")
        raise BenchError(f"no URI from {self.proc.args[0]} within {timeout:.0f} s; log:\n{tail(self.log)}")

    def stop(self, timeout=900.0):
        """Clean stop; our servers write back all dirty data first."""
        if self.stop_how == "stdin":
            self.proc.stdin.close()
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.proc.args[0]} did not stop within {timeout:.0f} s")
        self.logf.close()
        # qemu-nbd and nbdkit exit on SIGTERM with a signal status; ours exit 0.
        if rc not in (0, -signal.SIGTERM):
            raise BenchError(f"{self.proc.args[0]} exited with {rc}; log:\n{tail(self.log)}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


class Bench:
    def __init__(self, p, work):
        self.p, self.work = p, work
        self.results = {}  # group -> config -> job -> [sample]
        # Cached configurations: warmed at the start, and again before a run
        # that follows one that wrote (see `cell`).
        self.warmed, self.rewarm, self.last_job = [], set(), {}
        self.fio = tool("fio")
        self.pacing = None
        self.bin = {n: p["bin_dir"] / n for n in
                    ("ublk-cache", "nbd-bench-server", "writeback-drain", "metadata-ram",
                     "writeback-pacing")}
        for n, b in self.bin.items():
            if not b.is_file():
                raise BenchError(f"{b} is missing: build first with "
                                 "`cargo build --release -p ublk-cache -p ublk-cache-benches`")
        self.shadow = Path(tempfile.mkdtemp(prefix="ublk-cache-bench-",
                                            dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        self.env = {"UBLK_CACHE_SHADOW_DIR": str(self.shadow),
                    "UBLK_CACHE_RUN_DIR": str(work / "run"),
                    # fio time values; milliseconds so that 1.5 s works too.
                    "BENCH_RUNTIME": f"{round(p['runtime'] * 1000)}ms",
                    "BENCH_RAMP": f"{round(p['ramp'] * 1000)}ms"}
        self.cache_size = p["size"] + p["size"] // 4 + 16 * MIB
        self.sock = work / "nbd.sock"

    # ---- files -------------------------------------------------------------
    def fill(self, path, size):
        """A fully written file (no holes: reads must reach the disk)."""
        self.fio_run(["--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
                      f"--size={size}", "--ioengine=io_uring", "--direct=1",
                      "--iodepth=16"], None)

    def make_sparse(self, path, size):
        """A sparse file with 1/64 of it data: 1 MiB extents, evenly spread."""
        log(f"preparing {path} ({size >> 20} MiB, sparse)")
        with open(path, "wb") as f:
            f.truncate(size)
            step = 64 * MIB
            for off in range(0, size, step):
                f.seek(off)
                f.write(os.urandom(MIB))
            f.flush()
            os.fsync(f.fileno())

    def sparse_cell(self, cfg):
        """nbdcopy of the sparse export to null:, timed (server start and stop outside)."""
        w, sock = self.work, self.sock
        if cfg == "ours-sparse":
            s = Server([str(self.bin["ublk-cache"]), "serve", "--backend", f"file:{w / 'sparse.img'}",
                        "--mode", "none", "--export", f"nbd:unix:{sock}"],
                       w / f"{cfg}.log", sock, env_extra=self.env)
        else:
            s = Server([tool("qemu-nbd"), "--persistent", "--format=raw", "--cache=none",
                        "--aio=io_uring", "--read-only", f"--socket={sock}", str(w / "sparse.img")],
                       w / f"{cfg}.log", sock, prints_uri=False)
        try:
            t0 = time.monotonic()
            r = subprocess.run([tool("nbdcopy"), s.uri, "null:"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            secs = time.monotonic() - t0
        finally:
            s.stop()
        if r.returncode != 0:
            raise BenchError(f"nbdcopy from {cfg} failed: {r.stdout.decode(errors='replace')[-2000:]}")
        sample = {"mib_s": self.p["size"] / MIB / secs, "seconds": secs}
        self.results.setdefault("sparse", {}).setdefault(cfg, {}).setdefault(
            "nbdcopy", []).append(sample)
        log(f"  sparse {cfg:14} nbdcopy of {self.p['size'] >> 20} MiB in {secs:.3f} s "
            f"({sample['mib_s']:.0f} MiB/s of disk)")

    def wipe_cache_header(self, path):
        """Zero the superblocks (the first MiB): the next start formats the
        cache afresh, empty, on the same allocated blocks."""
        with open(path, "r+b") as f:
            f.write(bytes(MIB))
            f.flush()
            os.fsync(f.fileno())

    def prepare(self):
        w = self.work
        g = self.p["groups"]
        files = []
        if "local" in g:
            files += ["peer.img", "ours.img", "raw.img"]
        if "slow" in g:
            files += ["slow-peer.img", "slow-back.img", "slow-through.img"]
        if "drain" in g:
            files += ["drain.img"] if "slow-peer.img" not in files else []
            files += ["copy-src.img"]
        for f in dict.fromkeys(files):
            log(f"preparing {w / f} ({self.p['size'] >> 20} MiB)")
            self.fill(w / f, self.p["size"])
        if "bw" in g:
            for f in ("bw-peer.img", "bw-back.img"):
                log(f"preparing {w / f} ({self.p['bw_size'] >> 20} MiB)")
                self.fill(w / f, self.p["bw_size"])
            log(f"preparing {w / 'bw-cold.cache'} ({self.cache_bytes('bw-back-cold') >> 20} MiB)")
            self.fill(w / "bw-cold.cache", self.cache_bytes("bw-back-cold"))
        if "sparse" in g:
            self.make_sparse(w / "sparse.img", self.p["size"])
        if "slow" in g:
            # The cold cache lives on written (allocated) storage like a real
            # cache device, not on a fresh sparse file whose first writes pay
            # the filesystem's block allocation.
            log(f"preparing {w / 'cold.cache'} ({self.cache_size >> 20} MiB)")
            self.fill(w / "cold.cache", self.cache_size)
        # Warm caches: one sequential pass through each cached configuration.
        if "local" in g:
            self.warmed.append("ours-file")
        if "slow" in g:
            self.warmed += ["slow-back", "slow-through"]
        if "bw" in g:
            self.warmed.append("bw-back")
        for cfg in self.warmed:
            log(f"warming the cache of {cfg}")
            self.warm(cfg)

    def warm(self, cfg):
        """One sequential pass through cfg's export (outside any timing)."""
        s = self.start(cfg)
        try:
            self.fio_run(["--name=warm", "--ioengine=nbd", f"--uri={s.uri}", "--rw=read",
                          "--bs=1M", "--iodepth=16", f"--size={self.disk_bytes(cfg)}"], None)
        finally:
            s.stop()

    def disk_bytes(self, cfg):
        return self.p["bw_size"] if cfg.startswith("bw-") else self.p["size"]

    def cache_bytes(self, cfg):
        """A cache of 1.25x the disk (and 16 MiB for the metadata)."""
        d = self.disk_bytes(cfg)
        return d + d // 4 + 16 * MIB

    def logged_number(self, cfg, what):
        """The last `what=N` (cached_bytes=, ...) in cfg's server log, or None."""
        try:
            text = (self.work / f"{cfg}.log").read_text(errors="replace")
        except OSError:
            return None
        hits = re.findall(rf"\b{what}=(\d+)", text)
        return int(hits[-1]) if hits else None

    # ---- servers -----------------------------------------------------------
    def start(self, cfg):
        w, sock, log_ = self.work, self.sock, self.work / f"{cfg}.log"
        rd, wd = str(self.p["read_delay_ms"]), str(self.p["write_delay_ms"])
        if cfg == "ours-file":
            return Server([str(self.bin["ublk-cache"]), "serve", "--backend", f"file:{w / 'ours.img'}",
                           "--cache", str(w / "ours.cache"), "--cache-size", str(self.cache_size),
                           "--mode", "back", "--export", f"nbd:unix:{sock}"],
                          log_, sock, env_extra=self.env)
        if cfg == "qemu-nbd":
            return Server([tool("qemu-nbd"), "--persistent", "--format=raw", "--cache=none",
                           "--aio=io_uring", f"--socket={sock}", str(w / "peer.img")],
                          log_, sock, prints_uri=False)
        if cfg == "nbdkit":
            return Server([tool("nbdkit"), "--foreground", "--exit-with-parent", "--unix", str(sock),
                           "file", str(w / "peer.img"), "cache=none"],
                          log_, sock, prints_uri=False)
        slow = {"slow-nocache": ("none", "slow-peer.img", None),
                "slow-back": ("back", "slow-back.img", "slow-back.cache"),
                "slow-through": ("through", "slow-through.img", "slow-through.cache"),
                "slow-back-cold": ("back", "slow-peer.img", "cold.cache")}
        if cfg in slow:
            mode, img, cache = slow[cfg]
            argv = [str(self.bin["nbd-bench-server"]), "--backend", str(w / img), "--socket", str(sock),
                    "--mode", mode, "--read-delay-ms", rd, "--write-delay-ms", wd,
                    "--flush-delay-ms", wd]
            if cache:
                if cfg == "slow-back-cold":
                    self.wipe_cache_header(w / cache)
                argv += ["--cache", str(w / cache), "--cache-size", str(self.cache_size)]
            return Server(argv, log_, sock, stop="stdin", env_extra=self.env)
        bw = {"bw-nocache": ("none", "bw-peer.img", None),
              "bw-back": ("back", "bw-back.img", "bw-back.cache"),
              "bw-back-cold": ("back", "bw-peer.img", "bw-cold.cache")}
        if cfg in bw:
            mode, img, cache = bw[cfg]
            argv = [str(self.bin["nbd-bench-server"]), "--backend", str(w / img), "--socket", str(sock),
                    "--mode", mode, "--bandwidth", str(round(self.p["bw_mbps"] * 1e6))]
            if cache:
                if cfg == "bw-back-cold":
                    self.wipe_cache_header(w / cache)
                argv += ["--cache", str(w / cache), "--cache-size", str(self.cache_bytes(cfg))]
            return Server(argv, log_, sock, stop="stdin", env_extra=self.env)
        raise BenchError(f"unknown configuration {cfg}")

    # ---- fio ---------------------------------------------------------------
    def fio_run(self, args, jobfile):
        out = self.work / "fio.json"
        argv = [self.fio, "--output-format=json", f"--output={out}"] + args
        if jobfile:
            argv.append(str(FIO_DIR / f"{jobfile}.fio"))
        e = dict(os.environ)
        e.update(self.env)
        r = subprocess.run(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise BenchError(f"fio failed ({r.returncode}): {' '.join(argv)}\n"
                             f"{r.stdout.decode(errors='replace')[-2000:]}\n{tail(out)}")
        try:
            return json.loads(out.read_text())
        except ValueError as e:
            raise BenchError(f"fio wrote no JSON ({e}): {tail(out)}") from None

    def cell(self, group, cfg, job):
        if cfg in self.rewarm:
            # A write job leaves a cache less warm than its label says: its
            # versions take free slots, and once none are left clean lines are
            # evicted (and a line written again after that is cached only in
            # part). Warm it again, and count what had gone.
            self.rewarm.discard(cfg)
            left = self.logged_number(cfg, "cached_bytes")
            disk = self.disk_bytes(cfg)
            if left is not None:
                self.results.setdefault("rewarm", {}).setdefault(cfg, {}).setdefault(
                    self.last_job[cfg], []).append(
                    {"cached_mib": left / MIB, "disk_mib": disk / MIB, "share": left / disk})
            log(f"  re-warming {cfg} after {self.last_job[cfg]}: "
                f"{'?' if left is None else left >> 20} of {disk >> 20} MiB were cached")
            self.warm(cfg)
        if cfg in self.warmed:
            self.last_job[cfg] = job
            if job not in READ_JOBS:
                self.rewarm.add(cfg)
        if cfg in ("raw", "raw-backend"):
            f = self.work / ("raw.img" if cfg == "raw" else
                             ("slow-peer.img" if (self.work / "slow-peer.img").exists() else "drain.img"))
            d = self.fio_run(["--ioengine=io_uring", f"--filename={f}"], job)
        else:
            s = self.start(cfg)
            try:
                d = self.fio_run(["--ioengine=nbd", f"--uri={s.uri}"], job)
            finally:
                s.stop()
        j = d["jobs"][0]
        if j.get("error"):
            raise BenchError(f"fio job {job} on {cfg}: error {j['error']}")
        r, w = j["read"], j["write"]
        sample = {
            "iops": r["iops"] + w["iops"],
            "mib_s": (r["bw_bytes"] + w["bw_bytes"]) / MIB,
        }
        main = w if w["total_ios"] >= r["total_ios"] else r
        pct = main["clat_ns"].get("percentile", {})
        sample["lat_mean_us"] = main["lat_ns"]["mean"] / 1000
        sample["lat_p50_us"] = pct.get("50.000000", 0) / 1000
        sample["lat_p99_us"] = pct.get("99.000000", 0) / 1000
        self.results.setdefault(group, {}).setdefault(cfg, {}).setdefault(job, []).append(sample)
        log(f"  {group:5} {cfg:15} {job:18} {sample['iops']:10.0f} IOPS {sample['mib_s']:8.1f} MiB/s "
            f"p99 {sample['lat_p99_us']:8.0f} us")

    def drain_backend(self):
        return self.work / ("slow-peer.img" if (self.work / "slow-peer.img").exists() else "drain.img")

    def drain_in_memory(self):
        """Where a cache in memory goes (tmpfs), or None with the reason logged."""
        d = self.shadow
        need = self.p["drain_bytes"] * 5 // 4 + 64 * MIB
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        if free < need:
            log(f"SKIP: drain with the cache in memory: {d} has {free >> 20} MiB free, "
                f"needs {need >> 20} MiB")
            return None
        return d / "drain.cache"

    def once_cell(self, cfg):
        """A peer of the drain: fio moves the drain's bytes once (1 MiB QD16,
        sequential) and flushes at the end; MiB/s over the longest job's runtime.
        raw-backend: a write of the backend file; slow-nocache: a write through
        NBD of the slow backend without a cache; copy: a read of a file on the
        backend's disk and the write of the backend file, at once."""
        n = self.p["drain_bytes"]
        one = ["--bs=1M", "--iodepth=16", f"--size={n}"]
        local = ["--ioengine=io_uring", "--direct=1"]
        server = None
        if cfg == "slow-nocache":
            server = self.start(cfg)
            args = ["--name=write", "--rw=write", "--end_fsync=1", "--ioengine=nbd",
                    f"--uri={server.uri}"] + one
        else:
            args = ["--name=write", "--rw=write", "--end_fsync=1",
                    f"--filename={self.drain_backend()}"] + local + one
            if cfg == "copy":
                args += ["--name=read", "--rw=read",
                         f"--filename={self.work / 'copy-src.img'}"] + local + one
        try:
            d = self.fio_run(args, None)
        finally:
            if server:
                server.stop()
        for j in d["jobs"]:
            if j.get("error"):
                raise BenchError(f"fio job {j['jobname']} on {cfg}: error {j['error']}")
        secs = max(j["job_runtime"] for j in d["jobs"]) / 1000
        sample = {"mib_s": n / MIB / max(secs, 1e-3), "seconds": secs}
        self.results.setdefault("drain", {}).setdefault(cfg, {}).setdefault(
            "once", []).append(sample)
        log(f"  drain {cfg:15} {n >> 20} MiB once in {secs:.2f} s: {sample['mib_s']:.1f} MiB/s")

    def drain_cell(self, delay_ms, cache):
        argv = [str(self.bin["writeback-drain"]), "--backend", str(self.drain_backend()),
                "--cache", str(cache), "--bytes", str(self.p["drain_bytes"]),
                "--write-delay-ms", str(delay_ms)]
        e = dict(os.environ)
        e.update(self.env)
        r = subprocess.run(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if r.returncode != 0:
            raise BenchError(f"writeback-drain failed: {r.stderr.decode(errors='replace')[-2000:]}")
        d = json.loads(r.stdout)
        on_disk = Path(cache).parent == self.work
        cfg = "drain-slow" if delay_ms else ("drain-disk" if on_disk else "drain-mem")
        self.results.setdefault("drain", {}).setdefault(cfg, {}).setdefault(
            "drain", []).append({"mib_s": d["mib_s"], "bytes": d["bytes"], "seconds": d["seconds"]})
        log(f"  drain {cfg:15} {d['bytes'] >> 20} MiB in {d['seconds']:.2f} s: {d['mib_s']:.1f} MiB/s")

    # ---- the run -----------------------------------------------------------
    def run(self):
        p = self.p
        self.prepare()
        local = ["ours-file", "qemu-nbd", "nbdkit", "raw"]
        slow = ["slow-nocache", "slow-back", "slow-through"]
        for rep in range(p["repeats"]):
            log(f"repeat {rep + 1}/{p['repeats']}")
            if "local" in p["groups"]:
                for job in p["jobs"]:
                    for cfg in local:
                        self.cell("local", cfg, job)
            if "slow" in p["groups"]:
                for job in p["slow_jobs"]:
                    for cfg in slow + (["slow-back-cold"] if job in READ_JOBS else []):
                        self.cell("slow", cfg, job)
            if "bw" in p["groups"]:
                for job in p["bw_jobs"]:
                    for cfg in ("bw-nocache", "bw-back", "bw-back-cold"):
                        self.cell("bw", cfg, job)
            if "drain" in p["groups"]:
                mem = self.drain_in_memory()
                if mem:
                    self.once_cell("raw-backend")
                    self.drain_cell(0, mem)
                self.once_cell("copy")
                self.drain_cell(0, self.work / "drain.cache")
                if "slow" in p["groups"] and mem:
                    self.once_cell("slow-nocache")
                    self.drain_cell(p["write_delay_ms"], mem)
            if "sparse" in p["groups"]:
                for cfg in ("ours-sparse", "qemu-nbd-sparse"):
                    self.sparse_cell(cfg)
        ram = None
        if "ram" in p["groups"]:
            log(f"metadata RAM probe ({p['ram_gib']} GiB cache)")
            e = dict(os.environ)
            e["BENCH_DIR"] = str(self.work)
            r = subprocess.run([str(self.bin["metadata-ram"]), "--json", str(p["ram_gib"])],
                               env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if r.returncode != 0:
                raise BenchError(f"metadata-ram failed: {r.stderr.decode(errors='replace')[-2000:]}")
            ram = json.loads(r.stdout.decode().splitlines()[0])
        if "pacing" in p["groups"]:
            # Interleaved inside the binary (its arms take turns in every repeat).
            log(f"write-back pacing ({p['repeats']} repeats of {p['pacing_seconds']:g} s per arm)")
            argv = [str(self.bin["writeback-pacing"]),
                    "--dirty", str(p["pacing_dirty"]), "--cache", str(p["pacing_cache"]),
                    "--bandwidth", str(int(p["bw_mbps"] * 1e6)),
                    "--read-delay", str(p["read_delay_ms"]),
                    "--write-delay", str(p["write_delay_ms"]),
                    "--static-rate", str(int(p["bw_mbps"] * 1e6 / 2)),
                    "--seconds", str(p["pacing_seconds"]), "--repeats", str(p["repeats"])]
            r = subprocess.run(argv, env=dict(os.environ, **self.env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if r.returncode != 0:
                raise BenchError("writeback-pacing failed: "
                                 f"{r.stderr.decode(errors='replace')[-2000:]}")
            self.pacing = json.loads(r.stdout.decode().splitlines()[0])
        return ram


# ---- reporting -------------------------------------------------------------
def log(msg):
    print(msg, file=sys.stderr, flush=True)


def stat(vals):
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def samples(res, group, cfg, job, metric):
    return [s[metric] for s in res.get(group, {}).get(cfg, {}).get(job, [])]


def paired_ratio(a, b):
    """Median (min, max) of per-repeat ratios a[i]/b[i]: each pair was measured side by side."""
    r = [x / y for x, y in zip(a, b) if y > 0]
    return stat(r) if r else None


def fmt_num(v, metric):
    if metric in ("iops",):
        return f"{v:.0f}"
    if metric.startswith("lat"):
        return f"{v:.0f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_cell(vals, metric):
    if not vals:
        return "-"
    s = stat(vals)
    if len(vals) == 1:
        return fmt_num(s["median"], metric)
    return f"{fmt_num(s['median'], metric)} ({fmt_num(s['min'], metric)}-{fmt_num(s['max'], metric)})"


def fmt_ratio(r):
    if not r:
        return "-"
    if r["min"] == r["max"]:
        return f"{r['median']:.2f}"
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


UNIT = {"iops": "IOPS", "mib_s": "MiB/s", "lat_p99_us": "p99 latency, us"}


def table(res, group, configs, jobs, ratios, names, ratio_jobs=None):
    """ratios: [(label, num cfg, den cfg)]; lower-is-better rows invert nothing: the label says."""
    lines = []
    head = ["job", "metric"] + [names.get(c, c) for c in configs] + [r[0] for r in ratios]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    out = []
    for job in jobs:
        metrics = [JOBS[job]] + (["lat_p99_us"] if job.endswith("qd1") else [])
        for m in metrics:
            row = [job, UNIT[m]]
            for c in configs:
                row.append(fmt_cell(samples(res, group, c, job, m), m))
            for label, num, den in ratios:
                a, b = samples(res, group, num, job, m), samples(res, group, den, job, m)
                r = paired_ratio(a, b) if a and b else None
                row.append(fmt_ratio(r))
                if r:
                    out.append({"group": group, "job": job, "metric": m, "num": num, "den": den, **r})
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), out


NAMES = {
    "ours-file": "ours (back, warm)",
    "qemu-nbd": "qemu-nbd",
    "nbdkit": "nbdkit file",
    "raw": "raw file (fio io_uring)",
    "slow-nocache": "no cache",
    "bw-nocache": "no cache",
    "bw-back": "back, warm",
    "bw-back-cold": "back, cold",
    "slow-back": "back, warm",
    "slow-through": "through, warm",
    "slow-back-cold": "back, cold",
}


def report(p, res, ram, started, host, pacing=None):
    out = []
    all_ratios = []
    out.append(f"Run {started:%Y-%m-%d %H:%M} on {host['cpus']} CPUs ({host['cpu']}), kernel "
               f"{host['kernel']}; disk {p['size'] >> 20} MiB, {p['runtime']:g} s runs after {p['ramp']:g} s ramp, "
               f"{p['repeats']} interleaved repeats; cells are median (min-max); ratios are the median "
               f"(min-max) of per-repeat ratios.")
    out.append("")
    if "local" in res:
        out.append("Local file backend (higher is better, except latency):")
        out.append("")
        t, r = table(res, "local", ["ours-file", "qemu-nbd", "nbdkit", "raw"], p["jobs"],
                     [("ours / qemu-nbd", "ours-file", "qemu-nbd"),
                      ("ours / nbdkit", "ours-file", "nbdkit"),
                      ("ours / raw", "ours-file", "raw")], NAMES)
        out += [t, ""]
        all_ratios += r
    if "slow" in res:
        out.append(f"Slow backend ({p['read_delay_ms']:g} ms reads, {p['write_delay_ms']:g} ms writes "
                   f"and flushes), through our NBD export:")
        out.append("")
        t, r = table(res, "slow", ["slow-nocache", "slow-back", "slow-through", "slow-back-cold"],
                     p["slow_jobs"],
                     [("back / no cache", "slow-back", "slow-nocache"),
                      ("through / no cache", "slow-through", "slow-nocache"),
                      ("cold / no cache", "slow-back-cold", "slow-nocache"),
                      ("warm / cold", "slow-back", "slow-back-cold")], NAMES)
        out += [t, ""]
        all_ratios += r
    if "bw" in res:
        out.append(f"Backend of {p['bw_mbps']:g} MB/s (reads and writes share it), a "
                   f"{p['bw_size'] >> 20} MiB disk, through our NBD export:")
        out.append("")
        t, r = table(res, "bw", ["bw-nocache", "bw-back", "bw-back-cold"], p["bw_jobs"],
                     [("warm / no cache", "bw-back", "bw-nocache"),
                      ("cold / no cache", "bw-back-cold", "bw-nocache"),
                      ("warm / cold", "bw-back", "bw-back-cold")], NAMES)
        out += [t, ""]
        all_ratios += r
    if "rewarm" in res:
        out.append("Warm caches after a job that wrote (the data cached when its server "
                   "stopped; the next run starts warm again):")
        out.append("")
        out.append("| configuration | after | cached MiB (of the disk's) | share |")
        out.append("|---|---|---|---|")
        for cfg, jobs in res["rewarm"].items():
            for job, rows in jobs.items():
                v = [r["cached_mib"] for r in rows]
                total = rows[0]["disk_mib"]
                sh = stat([r["share"] for r in rows])
                share = (f"{sh['median']:.2f}" if len(v) == 1 else
                         f"{sh['median']:.2f} ({sh['min']:.2f}-{sh['max']:.2f})")
                out.append(f"| {cfg} | {job} | {fmt_cell(v, 'iops')} of {total:.0f} | {share} |")
        out += [""]
    if "drain" in res:
        d = res["drain"]
        out.append("Write-back drain (MiB/s):")
        out.append("")
        out.append("| backend | cache | peer | peer's MiB/s | drain of dirty 64 KiB lines | drain / peer |")
        out.append("|---|---|---|---|---|---|")
        rows = [("file", "in memory (tmpfs)", "raw-backend",
                 "fio sequential write of the backend file", "drain-mem"),
                (f"slow ({p['write_delay_ms']:g} ms writes and flushes)", "in memory (tmpfs)",
                 "slow-nocache", "fio sequential write through NBD, no cache", "drain-slow"),
                ("file", "on the backend's disk", "copy",
                 "fio copy on that disk (read and write at once)", "drain-disk")]
        for label, where, peer, pname, cfg in rows:
            a = [s["mib_s"] for s in d.get(cfg, {}).get("drain", [])]
            b = [s["mib_s"] for s in d.get(peer, {}).get("once", [])]
            if not a:
                continue
            r = paired_ratio(a, b)
            out.append(f"| {label} | {where} | {pname} | {fmt_cell(b, 'mib_s')} | "
                       f"{fmt_cell(a, 'mib_s')} | {fmt_ratio(r)} |")
            if r:
                all_ratios.append({"group": "drain", "job": "drain", "metric": "mib_s",
                                   "num": cfg, "den": peer, **r})
        out += [""]
    if "sparse" in res:
        d = res["sparse"]
        a = [x["mib_s"] for x in d.get("ours-sparse", {}).get("nbdcopy", [])]
        b = [x["mib_s"] for x in d.get("qemu-nbd-sparse", {}).get("nbdcopy", [])]
        out.append(f"Sparse copy: `nbdcopy URI null:` of a {p['size'] >> 20} MiB export with 1/64 "
                   "of it data (MiB of disk per second, higher is better):")
        out.append("")
        out.append("| ours (serve --mode none) | qemu-nbd | ours / qemu-nbd |")
        out.append("|---|---|---|")
        r = paired_ratio(a, b)
        out.append(f"| {fmt_cell(a, 'mib_s')} | {fmt_cell(b, 'mib_s')} | {fmt_ratio(r)} |")
        if r:
            all_ratios.append({"group": "sparse", "job": "nbdcopy", "metric": "mib_s",
                               "num": "ours-sparse", "den": "qemu-nbd-sparse", **r})
        out += [""]
    if ram:
        per_gib = ram["lines"] * 65536 / (1 << 30)
        mib = lambda x: x / MIB / per_gib
        out.append(f"Metadata RAM at 64 KiB lines ({ram['cache_gib']} GiB cache, {ram['lines']} lines; "
                   f"RSS growth of the process, plus the crash shadow in tmpfs): "
                   f"{mib(ram['clean_bytes']):.2f} MiB/GiB all clean, {mib(ram['dirty_bytes']):.2f} MiB/GiB "
                   f"all dirty, shadow {mib(ram['shadow_bytes']):.2f} MiB/GiB; the per-line record alone is "
                   f"{ram['line_record_bytes']} bytes ({ram['line_record_bytes'] * 16384 / MIB:.2f} MiB/GiB).")
        out.append("")
    if pacing:
        a = pacing["arms"]
        out.append(f"Write-back pacing: two disks on one {pacing['bandwidth'] / 1e6:g} MB/s link, one "
                   f"draining {pacing['dirty_mib']} MiB dirty of a {pacing['cache_mib']} MiB cache, the "
                   f"other reading 4 KiB at random, QD1, for up to {pacing['seconds']:g} s "
                   "(medians of the repeats; a read stuck behind a long queue is one sample, so the mean "
                   "and the maximum are given too; the own- arms read the draining disk itself, "
                   "against own-alone):")
        out.append("")
        out.append("| arm | reader p50 ms | reader p99 ms | p99 / alone | mean / alone | max ms | "
                   "drain MiB/s | drain / unpaced |")
        out.append("|---|---|---|---|---|---|---|---|")
        for name in ("alone", "unpaced", "static", "controlled",
                     "own-alone", "own-equal", "own-reads-first"):
            c = a[name]
            out.append(f"| {name} | {c['victim_p50_ms']:.2f} | {c['victim_p99_ms']:.2f} | "
                       f"{c['p99_vs_alone']:.2f}x | {c['mean_vs_alone']:.2f}x | {c['victim_max_ms']:.1f} | "
                       f"{c['drain_mib_s']:.1f} | {c['drain_vs_unpaced']:.3f}x |")
        out.append("")
    targets = evaluate_targets(p, res, ram, all_ratios, pacing)
    if targets:
        out.append("Targets (issue 5):")
        out.append("")
        out.append("| target | measured | met |")
        out.append("|---|---|---|")
        for t in targets:
            out.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        out.append("")
    return "\n".join(out), all_ratios, targets


def find_ratio(ratios, num, den, job, metric):
    for r in ratios:
        if (r["num"], r["den"], r["job"], r["metric"]) == (num, den, job, metric):
            return r
    return None


def evaluate_targets(p, res, ram, ratios, pacing=None):
    t = []

    def add(desc, r, goal):
        if r:
            t.append({"target": desc, "measured": fmt_ratio(r), "value": r["median"],
                      "met": r["median"] >= goal})

    add("warm 4k randread QD32 >= 1.3x qemu-nbd",
        find_ratio(ratios, "ours-file", "qemu-nbd", "randread-4k-qd32", "iops"), 1.3)
    add("warm 4k randread QD32 >= 0.8x raw fio on a file beside the cache",
        find_ratio(ratios, "ours-file", "raw", "randread-4k-qd32", "iops"), 0.8)
    a = samples(res, "slow", "slow-back", "randwrite-4k-qd32", "iops")
    b = samples(res, "local", "ours-file", "randwrite-4k-qd32", "iops")
    if a and b:
        add(f"write-back 4k randwrite QD32 over the {p['write_delay_ms']:g} ms backend >= 0.8x the "
            "same job over the local file", paired_ratio(a, b), 0.8)
    r = find_ratio(ratios, "slow-back-cold", "slow-nocache", "randread-4k-qd32", "iops")
    if r:
        t.append({"target": "cold-miss overhead <= 5% (cold 4k randread QD32 vs the slow backend alone)",
                  "measured": (f"{cost:.1f}% slower" if (cost := (1 - r['median']) * 100) >= 0
                               else f"{-cost:.1f}% faster") + f" (ratio {fmt_ratio(r)})",
                  "value": r["median"], "met": r["median"] >= 0.95})
    mbps = f"{p['bw_mbps']:g} MB/s"
    add(f"warm 1 MiB reads >= 3x the {mbps} backend alone (the prototype's 80 -> 240 MB/s)",
        find_ratio(ratios, "bw-back", "bw-nocache", "seqread-1m-qd16", "mib_s"), 3.0)
    add(f"warm / cold 1 MiB reads over the {mbps} backend >= 3x",
        find_ratio(ratios, "bw-back", "bw-back-cold", "seqread-1m-qd16", "mib_s"), 3.0)
    add(f"cold 1 MiB reads >= 0.95x the {mbps} backend alone",
        find_ratio(ratios, "bw-back-cold", "bw-nocache", "seqread-1m-qd16", "mib_s"), 0.95)
    add("drain >= 0.9x the backend's sequential write (file backend, cache in memory)",
        find_ratio(ratios, "drain-mem", "raw-backend", "drain", "mib_s"), 0.9)
    add("drain over the slow backend >= 0.9x its sequential write (cache in memory)",
        find_ratio(ratios, "drain-slow", "slow-nocache", "drain", "mib_s"), 0.9)
    add("drain with the cache on the backend's disk >= 0.9x a fio copy on that disk",
        find_ratio(ratios, "drain-disk", "copy", "drain", "mib_s"), 0.9)
    if ram:
        per_gib = ram["lines"] * 65536 / (1 << 30)
        v = (ram["clean_bytes"] + ram["shadow_bytes"]) / MIB / per_gib
        heap = ram["clean_bytes"] / MIB / per_gib
        t.append({"target": "metadata RAM <= 1 MiB per GiB of cache at 64 KiB lines",
                  "measured": f"{v:.2f} MiB/GiB ({heap:.2f} process + "
                              f"{ram['shadow_bytes'] / MIB / per_gib:.2f} crash shadow in tmpfs)",
                  "value": v, "met": v <= 1.0})
    if pacing:
        c = pacing["arms"]["controlled"]
        t.append({"target": "pacing: the reader's p99 with the controller <= 2x its p99 with no drain",
                  "measured": f"{c['p99_vs_alone']:.2f}x (unpaced {pacing['arms']['unpaced']['p99_vs_alone']:.0f}x, "
                              f"static {pacing['arms']['static']['p99_vs_alone']:.1f}x); the controlled drain "
                              f"ran at {c['drain_vs_unpaced']:.3f}x the unpaced one",
                  "value": c["p99_vs_alone"], "met": c["p99_vs_alone"] <= 2.0})
        o = pacing["arms"]["own-reads-first"]
        t.append({"target": "pacing: the disk's own reads during an unpaced drain <= 2x their p99 with no drain",
                  "measured": f"{o['p99_vs_alone']:.1f}x (full window: "
                              f"{pacing['arms']['own-equal']['p99_vs_alone']:.0f}x); the drain ran at "
                              f"{o['drain_vs_unpaced']:.2f}x the unpaced one",
                  "value": o["p99_vs_alone"], "met": o["p99_vs_alone"] <= 2.0})
    return t


def host_info():
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def main():
    try:
        p = params()
    except BenchError as e:
        log(f"run.py: {e}")
        return 2
    started = datetime.datetime.now()
    Path(p["dir"]).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ublk-cache-bench.", dir=p["dir"]))
    (work / "run").mkdir()
    bench = None
    try:
        bench = Bench(p, work)
        ram = bench.run()
        host = host_info()
        text, ratios, targets = report(p, bench.results, ram, started, host, bench.pacing)
        print(text)
        jpath = Path(env("BENCH_JSON", str(ROOT / "target" / "bench" /
                                            f"results-{started:%Y%m%d-%H%M%S}.json")))
        jpath.parent.mkdir(parents=True, exist_ok=True)
        cells = {g: {c: {j: {"samples": s, **{m: stat([x[m] for x in s]) for m in s[0]
                                               if isinstance(s[0][m], (int, float))}}
                         for j, s in jobs.items()} for c, jobs in cfgs.items()}
                 for g, cfgs in bench.results.items()}
        doc = {"date": started.isoformat(timespec="seconds"), "host": host,
               "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in p.items()},
               "cells": cells, "ratios": ratios, "targets": targets, "metadata_ram": ram,
               "pacing": bench.pacing}
        jpath.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"JSON: {jpath}")
        return 0
    except BenchError as e:
        log(f"run.py: {e}")
        return 1
    except KeyboardInterrupt:
        log("run.py: interrupted")
        return 130
    finally:
        if bench is not None:
            shutil.rmtree(bench.shadow, ignore_errors=True)
        if env("BENCH_KEEP", "0") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
