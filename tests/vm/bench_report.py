#!/usr/bin/env python3
"""Report of a tests/vm/bench.sh run: medians, ratios, CPU use, targets.

Reads WORKDIR/results/ (fio JSON, CPU snapshots, ublk-cache counters, written by
tests/vm/guest/bench.sh), prints markdown on stdout and writes
WORKDIR/results.json with every sample.

Cells are the median (min-max) over the rounds; a ratio is the median (min-max)
of the per-round ratios, each between runs made side by side in one round.
"""

import argparse
import datetime
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PEERS = ["raw", "loop", "rublk", "ucache"]
PEER_NAMES = {
    "raw": "raw virtio (fio io_uring)",
    "loop": "kernel loop (dio)",
    "rublk": "rublk loop",
    "ucache": "ublk-cache (back, warm)",
}
MIB = 1 << 20
# Issue 10's targets over ublk: (job, peer, minimum ratio ublk-cache / peer).
TARGETS = [
    ("randread-4k-qd32", "rublk", 1.0),
    ("randread-4k-qd32", "loop", 1.0),
    ("randread-4k-qd1", "rublk", 0.9),
    ("read-1m-qd8", "rublk", 0.9),
    ("randwrite-4k-qd32", "rublk", 0.8),
]


def load_json(path):
    text = path.read_text()
    # fio may print a warning line before its JSON.
    return json.loads(text[text.index("{"):])


def metric_of(job):
    return "MiB/s" if "-1m-" in job else "IOPS"


def fio_value(job, data):
    j = data["jobs"][0]
    if metric_of(job) == "MiB/s":
        return (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / MIB
    return j["read"]["iops"] + j["write"]["iops"]


def fio_latency_us(job, data):
    j = data["jobs"][0]
    side = "write" if "write" in job else "read"
    return j[side]["lat_ns"]["mean"] / 1000.0


def parse_cpu(path):
    """Two snapshots: {thread tid: (comm, ticks)}, and the /proc/stat cpu fields."""
    snaps = []
    for part in path.read_text().split("--\n"):
        threads, cpu = {}, None
        for line in part.splitlines():
            f = line.split()
            if f and f[0] == "thread":
                # Context switches: absent in snapshots of older runs.
                threads[f[1]] = (f[2], int(f[3]) + int(f[4]), int(f[5]) if len(f) > 5 else 0)
            elif f and f[0] == "cpu":
                cpu = [int(x) for x in f[1:]]
        snaps.append((threads, cpu))
    if len(snaps) != 2 or snaps[0][1] is None or snaps[1][1] is None:
        raise ValueError(f"{path}: expected two CPU snapshots")
    return snaps


def cpu_use(path, seconds, clk_tck):
    """Server CPU in cores (per thread name and in all), guest busy fraction,
    context switches of the server's threads."""
    (t0, c0), (t1, c1) = parse_cpu(path)
    by_name = defaultdict(float)
    switches = 0
    for tid, (comm, ticks, cs) in t1.items():
        _, ticks0, cs0 = t0.get(tid, (comm, 0, 0))
        by_name[comm] += (ticks - ticks0) / clk_tck / seconds
        switches += cs - cs0
    d = [b - a for a, b in zip(c0, c1)]
    total = sum(d[:8])
    idle = d[3] + d[4]  # idle + iowait
    busy = (total - idle) / total if total else 0.0
    return dict(by_name), sum(by_name.values()), busy, switches


def med(xs):
    return statistics.median(xs) if xs else None


def cell(xs, fmt="{:.0f}"):
    if not xs:
        return "-"
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--command", default="tests/vm/bench.sh")
    ap.add_argument("--host-cpus", default="?")
    ap.add_argument("--elapsed", type=int, default=0)
    a = ap.parse_args()
    res = a.workdir / "results"
    conf = {}
    for line in (a.workdir / "bench.conf").read_text().splitlines():
        k, _, v = line.partition("=")
        conf[k] = v.strip('"')
    jobs = conf["BENCH_JOBS"].split()
    rounds = int(conf["BENCH_ROUNDS"])
    seconds = int(conf["BENCH_RUNTIME"]) + int(conf["BENCH_RAMP"])
    clk_tck = int((res / "clk_tck").read_text().strip())

    samples = defaultdict(dict)  # (job, peer) -> {round: sample}
    for r in range(1, rounds + 1):
        for job in jobs:
            for peer in PEERS:
                base = res / f"{r}-{job}-{peer}"
                f = base.with_name(base.name + ".json")
                if not f.exists():
                    sys.exit(f"bench_report: missing {f}: the run did not finish")
                data = load_json(f)
                s = {
                    "value": fio_value(job, data),
                    "lat_us": fio_latency_us(job, data),
                    "fio_cpu": (data["jobs"][0]["usr_cpu"] + data["jobs"][0]["sys_cpu"]) / 100.0,
                }
                threads, server, busy, switches = cpu_use(base.with_name(base.name + ".cpu"), seconds, clk_tck)
                s.update(threads=threads, server_cores=server, guest_busy=busy)
                # I/Os in the window: IOPS x s, or MiB/s x s for the 1 MiB job.
                ios = s["value"] * seconds
                s["server_us_per_io"] = (server * seconds / ios * 1e6
                                         if peer in ("rublk", "ucache") and ios > 0 else None)
                s["server_switches_per_io"] = (switches / ios
                                               if peer in ("rublk", "ucache") and ios > 0 else None)
                if peer == "ucache":
                    b = load_json(base.with_name(base.name + ".stats-before.json"))
                    e = load_json(base.with_name(base.name + ".stats-after.json"))
                    s["read_misses"] = (e["read_misses"] - b["read_misses"]) + (e["read_partial"] - b["read_partial"])
                    s["read_hits"] = e["read_hits"] - b["read_hits"]
                samples[(job, peer)][r] = s

    def vals(job, peer, key="value"):
        return [samples[(job, peer)][r][key] for r in range(1, rounds + 1)]

    def ratios(job, peer):
        return [samples[(job, "ucache")][r]["value"] / samples[(job, peer)][r]["value"]
                for r in range(1, rounds + 1) if samples[(job, peer)][r]["value"] > 0]

    out = []
    p = out.append
    p(f"ublk benchmark in the VM test bed, {datetime.date.today().isoformat()}")
    p("")
    p(f"Command: `{a.command.strip()}`; {rounds} rounds, {conf['BENCH_RUNTIME']} s runs after "
      f"{conf['BENCH_RAMP']} s ramp, working set {conf['BENCH_SIZE']}, ublk queues "
      f"{conf['BENCH_QUEUES']} x depth {conf['BENCH_DEPTH']} (rublk and ublk-cache); host CPUs "
      f"{a.host_cpus}; guest run {a.elapsed // 60} min {a.elapsed % 60} s.")
    p("")
    p("| job | metric | " + " | ".join(PEER_NAMES[x] for x in PEERS)
      + " | ublk-cache / rublk | ublk-cache / kernel loop | ublk-cache / raw |")
    p("|---|---|" + "---|" * (len(PEERS) + 3))
    for job in jobs:
        fmt = "{:.1f}" if metric_of(job) == "MiB/s" else "{:.0f}"
        row = [job, metric_of(job)] + [cell(vals(job, x), fmt) for x in PEERS]
        row += [cell(ratios(job, x), "{:.2f}") for x in ("rublk", "loop", "raw")]
        p("| " + " | ".join(row) + " |")
    p("")
    p("Mean latency per I/O, µs (writes for the write job, reads otherwise):")
    p("")
    p("| job | " + " | ".join(PEER_NAMES[x] for x in PEERS) + " |")
    p("|---|" + "---|" * len(PEERS))
    for job in jobs:
        p("| " + " | ".join([job] + [cell(vals(job, x, "lat_us"), "{:.0f}") for x in PEERS]) + " |")
    p("")
    p("CPU (medians over the rounds; server = all threads of the rublk or ublk-cache "
      "process, in cores, its CPU time per I/O in µs and context switches per I/O "
      "(when recorded), ramp included; guest = "
      "busy share of all guest CPUs; fio = fio's own usr+sys in cores):")
    p("")
    p("| job | rublk server | ublk-cache server | guest busy raw / loop / rublk / ublk-cache | fio raw / loop / rublk / ublk-cache |")
    p("|---|---|---|---|---|")
    for job in jobs:
        def srv(peer):
            c = med(vals(job, peer, "server_cores"))
            u = med([x for x in vals(job, peer, "server_us_per_io") if x is not None])
            w = med([x for x in vals(job, peer, "server_switches_per_io") if x is not None])
            if u is None:
                return f"{c:.2f}"
            return f"{c:.2f} ({u:.0f} µs/IO" + (f", {w:.2f} switches/IO)" if w else ")")
        busy = " / ".join(f"{med(vals(job, x, 'guest_busy')) * 100:.0f}%" for x in PEERS)
        fio = " / ".join(f"{med(vals(job, x, 'fio_cpu')):.2f}" for x in PEERS)
        p(f"| {job} | {srv('rublk')} | {srv('ucache')} | {busy} | {fio} |")
    p("")
    p("Server threads (cores, median over the rounds; threads under 0.01 left out):")
    p("")
    p("| job | rublk | ublk-cache |")
    p("|---|---|---|")
    for job in jobs:
        cols = []
        for peer in ("rublk", "ucache"):
            names = sorted({n for r in range(1, rounds + 1) for n in samples[(job, peer)][r]["threads"]})
            parts = []
            for n in names:
                m = med([samples[(job, peer)][r]["threads"].get(n, 0.0) for r in range(1, rounds + 1)])
                if m >= 0.01:
                    parts.append(f"{n} {m:.2f}")
            cols.append(", ".join(parts) or "-")
        p(f"| {job} | {cols[0]} | {cols[1]} |")
    p("")
    p("ublk-cache read requests in the measured runs that were not wholly cache hits "
      "(misses + partial hits, of all read requests; summed over the rounds): "
      + "; ".join(
          f"{j} {sum(samples[(j, 'ucache')][r]['read_misses'] for r in range(1, rounds + 1))}"
          f" of {sum(samples[(j, 'ucache')][r]['read_misses'] + samples[(j, 'ucache')][r]['read_hits'] for r in range(1, rounds + 1))}"
          for j in jobs) + ".")
    p("")
    p("Targets (issue 10, over ublk in the TCG guest):")
    p("")
    p("| target | measured (median, min-max) | met |")
    p("|---|---|---|")
    for job, peer, want in TARGETS:
        if job not in jobs:
            continue
        rs = ratios(job, peer)
        got = med(rs)
        p(f"| {job}: ublk-cache >= {want:.1f}x {PEER_NAMES[peer]} | {cell(rs, '{:.2f}')} | "
          f"{'yes' if got is not None and got >= want else 'no'} |")
    print("\n".join(out))

    dump = {f"{job}/{peer}": samples[(job, peer)] for (job, peer) in samples}
    (a.workdir / "results.json").write_text(json.dumps(
        {"conf": conf, "samples": dump}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
