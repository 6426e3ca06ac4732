#!/usr/bin/python3
"""Plots `celer bench cluster` output (the text it prints, saved by
scripts/bench-cluster.sh as round-N.txt) as PNG charts for docs/benchmarks.md.

Usage: scripts/plot-bench.py ROUND.txt [ROUND.txt ...] --out DIR

For each workload it reads Celer's and Ceph's IOPS, mean latency and CPU time
per I/O (medians over the rounds given) and draws three bar charts with log
scales: iops.png, latency.png, cpu.png. Missing matplotlib is installed with
apt (python3-matplotlib) on first use.
"""

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path


def need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot-bench: installing python3-matplotlib", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3-matplotlib"],
            check=True,
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# "randwrite QD1   914 1093.1 5473.5 649.4 1.36 |  158 6302.4 15138.8 5468.2 1.14 | 5.77 5.77"
ROW = re.compile(
    r"^(?P<name>rand(?:read|write) QD\d+(?: \dq)?)\s+"
    r"(?P<iops>[\d.]+)\s+(?P<mean>[\d.]+)\s+(?P<p99>[\d.]+)\s+(?P<cpu>[\d.]+)\s+(?P<other>[\d.]+)"
    r"(?:\s*\|\s*(?P<c_iops>[\d.]+)\s+(?P<c_mean>[\d.]+)\s+(?P<c_p99>[\d.]+)\s+(?P<c_cpu>[\d.]+)\s+[\d.]+)?"
)
FLOOR = re.compile(r"durable 4K write QD1 (?P<w>[\d.]+) µs.*O_DIRECT read QD1 (?P<r>[\d.]+) µs.*round trip (?P<rtt>[\d.]+) µs")


def parse(paths):
    rows, floors = {}, []
    for p in paths:
        for line in Path(p).read_text(errors="replace").splitlines():
            m = ROW.match(line.strip())
            if m:
                d = rows.setdefault(m["name"], {})
                for k in ("iops", "mean", "cpu", "c_iops", "c_mean", "c_cpu"):
                    if m[k] is not None:
                        d.setdefault(k, []).append(float(m[k]))
            f = FLOOR.search(line)
            if f:
                floors.append({k: float(v) for k, v in f.groupdict().items()})
    if not rows:
        sys.exit("plot-bench: no workload rows found (is this `celer bench cluster` output?)")
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in rows.items()}
    floor = {k: statistics.median(f[k] for f in floors) for k in ("w", "r", "rtt")} if floors else None
    return med, floor, len(paths)


def bars(plt, med, key, ckey, ylabel, title, out, floor_lines=None):
    names = [n for n in med if key in med[n]]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = range(len(names))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [med[n][key] for n in names], w, label="Celer", color="#2b7bba")
    ceph = [med[n].get(ckey) for n in names]
    if any(c is not None for c in ceph):
        ax.bar([i + w / 2 for i in x], [c or 0 for c in ceph], w, label="Ceph 16 (rbd, size 3)", color="#d9822b")
    for line in floor_lines or []:
        ax.axhline(line[0], linestyle="--", color="grey", linewidth=1)
        ax.text(len(names) - 0.5, line[0] * 1.08, line[1], ha="right", fontsize=8, color="grey")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot-bench: wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rounds", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    med, floor, n = parse(a.rounds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = need_matplotlib()
    sub = f"4 KiB random, 3 replicas on one machine (median of {n} round(s))"
    bars(plt, med, "iops", "c_iops", "IOPS (log)", f"IOPS — {sub}", out / "iops.png")
    lines = []
    if floor:
        lines = [(floor["w"] + floor["rtt"], "floor: durable write + RTT"), (floor["r"], "floor: O_DIRECT read")]
    bars(plt, med, "mean", "c_mean", "mean latency, µs (log)", f"Latency — {sub}", out / "latency.png", lines)
    bars(plt, med, "cpu", "c_cpu", "CPU µs per I/O, all processes (log)", f"CPU per I/O — {sub}", out / "cpu.png")


if __name__ == "__main__":
    main()
