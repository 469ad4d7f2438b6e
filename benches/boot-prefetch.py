#!/usr/bin/env python3
"""Boot-prefetch benchmark (issue 13): a boot replayed over a slow backend, with
learned boot prefetch against the peers it has to beat, interleaved.

The boot is the deterministic synthetic one of `synthetic-boot` (its shape:
benches/src/synthetic_boot.rs; 6.5 % of a 2 GiB disk, 4 streams), replayed by
`io-replay` with its dependencies kept: a faster disk shortens the boot where
it waited for I/O, not where it computed. The backend is a file behind
FaultyBackend with BOOT_READ_DELAY_MS per read and one link of BOOT_BW_MBPS that
reads and writes share (nbd-bench-server, `back` mode, 64 KiB lines; 0: no
bandwidth limit). "Boot time" is the replay's span.

Arms, each on a fresh server, in turn, BOOT_REPEATS times:
  cold     an empty cache, no prefetch
  preload  an empty cache and `--preload` of the boot's read-set size from the
           start of the disk (PRELOAD_SIZE of the original feature request)
  learned  an empty cache and `--boot-trace replay` of a trace recorded (with
           `--boot-trace record`, once before the repeats) from this boot
  drift    the same trace, replayed while the guest boots a drifted system
           (BOOT_DRIFT_PCT % of its runs are others)
  warm     the cache the cold run of this repeat left, right after it (the
           lower bound; a run in between would write the backend, and a
           cache is dropped at attach when the backend changed behind it)

Ratios are medians of the per-repeat ratios. Also reported: backend bytes read
per arm against the boot's read set, and prefetch precision and recall.

Environment: BOOT_REPEATS [3]; BOOT_READ_DELAY_MS [5]; BOOT_BW_MBPS [80]; BOOT_DRIFT_PCT [10];
BOOT_DISK [2G]; BOOT_DIR [/var/tmp]; BOOT_JSON [target/bench/boot-DATE.json];
BENCH_BIN_DIR [target/release]; BOOT_SMOKE=1 a tiny run that only checks the
machinery (its numbers mean nothing).
Build first: cargo build --release -p ublk-cache-benches
"""

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (Server, BenchError, parse_size)

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["cold", "preload", "learned", "drift", "warm"]


def env(name, default):
    return os.environ.get(name, default)


def log(msg):
    print(msg, flush=True)


def run(argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise bench.BenchError(f"{' '.join(map(str, argv))} failed ({r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
    return r.stdout


def stop_counts(log_path):
    """The counts nbd-bench-server printed at its last stop."""
    text = Path(log_path).read_text(errors="replace")
    lines = [l for l in text.splitlines() if "nbd-bench-server: stopped" in l]
    if not lines:
        raise bench.BenchError(f"no stop line in {log_path}:\n{bench.tail(log_path)}")
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", lines[-1])}


class Boot:
    def __init__(self, work, bins, p):
        self.work, self.bins, self.p = work, bins, p
        self.backend = work / "backend.img"
        with open(self.backend, "wb") as f:
            f.truncate(p["disk"])
        self.traces = work / "traces"
        self.n = 0

    def server(self, cache, extra):
        self.n += 1
        sock = self.work / "boot.sock"
        log_ = self.work / f"server-{self.n}.log"
        argv = [str(self.bins / "nbd-bench-server"), "--backend", str(self.backend),
                "--socket", str(sock), "--mode", "back", "--cache", str(cache),
                "--cache-size", str(self.p["cache"]),
                "--read-delay-ms", str(self.p["delay_ms"]),
                "--write-delay-ms", str(self.p["delay_ms"]),
                "--flush-delay-ms", str(self.p["delay_ms"]),
                "--bandwidth", str(int(self.p["bw_mbps"] * 1e6))] + extra
        return bench.Server(argv, log_, sock, stop="stdin",
                            env_extra={"UBLK_CACHE_SHADOW_DIR": str(self.work / "shadow")}), log_

    def boot(self, trace, cache, extra, fresh=True):
        """Replay `trace` on a server with `cache` (emptied first if `fresh`)."""
        if fresh and cache.exists():
            cache.unlink()
        srv, log_ = self.server(cache, extra)
        out = self.work / "replay.json"
        try:
            # The guest starts at once, as a VM does when its disk is there.
            run([str(self.bins / "io-replay"), "--trace", str(trace), "--target", srv.uri,
                 "--workers", "8", "--json", str(out)])
        finally:
            srv.stop()
        r = json.loads(out.read_text())
        c = stop_counts(log_)
        return {"boot_ms": r["replay_ms"], "recorded_ms": r["recorded_ms"],
                "read_p99_ms": r["read_p99_ms"], **c}


def params():
    smoke = env("BOOT_SMOKE", "0") == "1"
    disk = bench.parse_size(env("BOOT_DISK", "256M" if smoke else "2G"))
    return {
        "smoke": smoke,
        "disk": disk,
        "cache": max(disk // 4, 64 << 20),
        "repeats": int(env("BOOT_REPEATS", "1" if smoke else "3")),
        "delay_ms": float(env("BOOT_READ_DELAY_MS", "1" if smoke else "5")),
        "bw_mbps": int(env("BOOT_BW_MBPS", "80")),
        "drift_pct": int(env("BOOT_DRIFT_PCT", "10")),
        "read_pct": 2.0 if smoke else 6.5,
    }


def main():
    p = params()
    bins = Path(env("BENCH_BIN_DIR", str(ROOT / "target" / "release")))
    for b in ["nbd-bench-server", "io-replay", "synthetic-boot"]:
        if not (bins / b).exists():
            log(f"boot-prefetch.py: {bins / b} is missing; build first: "
                "cargo build --release -p ublk-cache-benches")
            return 1
    work = Path(tempfile.mkdtemp(prefix="boot-bench.", dir=env("BOOT_DIR", "/var/tmp")))
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        b = Boot(work, bins, p)
        gen = [str(bins / "synthetic-boot"), "--disk", str(p["disk"]),
               "--read-pct", str(p["read_pct"]),
               "--read-latency-ms", str(p["delay_ms"])]
        base, drift = work / "boot.iotrace", work / "drift.iotrace"
        log(run(gen + ["--out", str(base)]).strip())
        log(run(gen + ["--out", str(drift), "--drift-pct", str(p["drift_pct"])]).strip())
        read_set = sum(int(l.split()[4]) for l in base.read_text().splitlines()
                       if not l.startswith("#") and l.split()[2] == "R")
        trace_opts = ["--boot-trace-dir", str(b.traces), "--boot-trace-key", "bench"]
        # Learn: one recorded boot (cold), its window covering the whole boot.
        rec = b.boot(base, work / "learn.cache",
                     ["--boot-trace", "record", "--boot-trace-window", "600"] + trace_opts)
        log(f"learned from one boot of {rec['boot_ms']:.0f} ms: "
            f"{rec['boot_recorded_lines']:.0f} lines")
        arms = {
            "cold": (base, []),
            "preload": (base, ["--preload", str(read_set)]),
            "learned": (base, ["--boot-trace", "replay"] + trace_opts),
            "drift": (drift, ["--boot-trace", "replay"] + trace_opts),
        }
        res = {a: [] for a in ARMS}
        for rep in range(p["repeats"]):
            for arm, (trace, extra) in arms.items():
                res[arm].append(b.boot(trace, work / f"{arm}.cache", extra))
                if arm == "cold":
                    # The cold run's cache, warm now, for the same boot again,
                    # at once: a boot writes, and a cache that another server
                    # wrote the backend behind is dropped at attach (it is no
                    # longer the backend's).
                    res["warm"].append(b.boot(base, work / "cold.cache", [], fresh=False))
            log(f"repeat {rep + 1}: " + ", ".join(
                f"{a} {res[a][-1]['boot_ms']:.0f} ms" for a in ARMS))
        report(p, res, read_set, started)
        return 0
    except bench.BenchError as e:
        log(f"boot-prefetch.py: {e}")
        return 1
    finally:
        if env("BENCH_KEEP", "0") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


def report(p, res, read_set, started):
    med = lambda arm, k: statistics.median(r[k] for r in res[arm])
    ratio = lambda a, b_: statistics.median(
        x["boot_ms"] / max(y["boot_ms"], 1e-9) for x, y in zip(res[a], res[b_]))
    log("")
    log(f"## Boot prefetch, {started:%Y-%m-%d %H:%M} UTC "
        f"({p['repeats']} repeats, {p['disk'] >> 20} MiB disk, read set {read_set >> 20} MiB, "
        f"backend reads {p['delay_ms']} ms, link {p['bw_mbps'] or 'unlimited'} MB/s"
        f"{'; SMOKE: the numbers mean nothing' if p['smoke'] else ''})")
    log("")
    log("| arm | boot ms (median) | / cold | / warm | backend read / read set | precision | recall |")
    log("|---|---|---|---|---|---|---|")
    for a in ARMS:
        prec = f"{med(a, 'boot_precision'):.2f}" if a in ("learned", "drift") else "-"
        rec = f"{med(a, 'boot_recall'):.2f}" if a in ("learned", "drift") else "-"
        log(f"| {a} | {med(a, 'boot_ms'):.0f} | {ratio(a, 'cold'):.2f}x | {ratio(a, 'warm'):.2f}x | "
            f"{med(a, 'backend_read_bytes') / read_set:.2f} | {prec} | {rec} |")
    doc = {"started": started.isoformat(), "params": p, "read_set_bytes": read_set,
           "results": res,
           "ratios": {f"{a}/{b_}": ratio(a, b_) for a in ARMS for b_ in ("cold", "warm")}}
    out = Path(env("BOOT_JSON", str(ROOT / "target" / "bench" /
                                    f"boot-{started:%Y%m%d-%H%M%S}.json")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"JSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
