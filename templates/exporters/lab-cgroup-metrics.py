#!/usr/bin/env python3
"""payctl lab: this lab node's cgroup CPU and memory, as node-exporter textfile metrics.

Lab hosts share the machine's /proc, so the node exporter reports the whole machine on every lab host. This loop runs
under the node's supervisor, hence in the node's cgroup (the cgroup lab.py puts the node's sshd, and so everything it
starts, in). Every --interval seconds it writes the cgroup's figures to a .prom file that the node exporter's textfile
collector serves; Prometheus labels them with the node like every other node-exporter series.

Inside a lab host (``ip netns exec`` gives it a fresh /sys) no cgroup hierarchy is mounted: started under
``unshare --mount``, the loop mounts the hierarchies it is in under --mount-dir, in its own mount namespace, which
nothing else sees and which goes away with the process.

CPU: cgroup v2 ``cpu.stat`` usage_usec, or v1 ``cpuacct.usage`` where cpuacct shares the node's group; this machine's
v1 has no cpuacct group per node, so there it is the user+system time of the processes in the node's cpu cgroup,
accumulated per process (pid and start time) so the counter only grows. A process that starts and exits between two
samples is not counted (reaped children's times are not added: they would count twice those seen alive).

Reads files only; no payctl import (the lab host runs it with the system python3). ``--once`` writes one sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PREFIX = "payctl_lab_node_"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def own_groups(text: str) -> list[tuple[str, str]]:
    """``/proc/self/cgroup`` -> [(controllers, path)]; v2's unified line has controllers ""."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


class Group:
    """The node's cgroup directories: ``cpu`` (v1 cpu hierarchy or the v2 group) and ``memory``."""

    def __init__(self, version: int, cpu: Path, memory: Path) -> None:
        self.version, self.cpu, self.memory = version, cpu, memory


def locate(root: Path, groups: list[tuple[str, str]]) -> Group | None:
    """The node's cgroup under ``root`` (a mounted cgroup tree), or None when it is not visible there."""
    v1: dict[str, Path] = {}
    for controllers, path in groups:
        for c in controllers.split(","):
            if c in ("cpu", "memory"):
                for name in (controllers, c):  # "cpu,cpuacct" is often mounted as such, with "cpu" a symlink
                    d = root / name / path.lstrip("/")
                    if (d / "cgroup.procs").exists():
                        v1[c] = d
                        break
    if "cpu" in v1 and "memory" in v1:
        return Group(1, v1["cpu"], v1["memory"])
    for controllers, path in groups:
        if controllers == "":
            for base in (root, root / "unified"):
                d = base / path.lstrip("/")
                if (d / "cgroup.procs").exists() and (d / "memory.current").exists():
                    return Group(2, d, d)
    return None


def mount_own(mount_dir: Path, groups: list[tuple[str, str]]) -> None:
    """Mount the cpu and memory hierarchies (or the v2 tree) under ``mount_dir``; needs a private mount namespace."""
    wanted = [c for c, _ in groups if {"cpu", "memory"} & set(c.split(","))]
    if not wanted:  # v2 only
        wanted_v2 = mount_dir / "unified"
        wanted_v2.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(wanted_v2):
            subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(wanted_v2)], check=True)
        return
    for controllers in wanted:
        d = mount_dir / controllers
        d.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(d):
            subprocess.run(["mount", "-t", "cgroup", "-o", controllers, "cgroup", str(d)], check=True)


def _limit_cores(g: Group) -> float:
    if g.version == 2:
        raw = (_read(g.cpu / "cpu.max") or "max").split()
        if raw and raw[0] != "max" and len(raw) == 2:
            return int(raw[0]) / int(raw[1])
    else:
        quota, period = _read(g.cpu / "cpu.cfs_quota_us"), _read(g.cpu / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return float(os.cpu_count() or 1)


def _memory_total(proc: Path) -> int:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _limit_bytes(g: Group, proc: Path) -> int:
    raw = _read(g.memory / ("memory.max" if g.version == 2 else "memory.limit_in_bytes")) or ""
    total = _memory_total(proc)
    if raw.strip().isdigit():
        limit = int(raw)
        return min(limit, total) if total else limit  # "unlimited" v1 reads as a huge number
    return total


class CpuCounter:
    """Seconds of CPU used by the group, only growing (see the module docstring)."""

    def __init__(self, group: Group, proc: Path) -> None:
        self.group, self.proc = group, proc
        self.seen: dict[tuple[int, int], int] = {}
        self.ticks = 0

    def pids(self) -> list[int]:
        raw = _read(self.group.cpu / "cgroup.procs") or ""
        return [int(p) for p in raw.split() if p.isdigit()]

    def seconds(self) -> float:
        if self.group.version == 2:
            for line in (_read(self.group.cpu / "cpu.stat") or "").splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        usage = _read(self.group.cpu / "cpuacct.usage")
        if usage is not None and usage.strip().isdigit():
            return int(usage) / 1e9
        now: dict[tuple[int, int], int] = {}
        for pid in self.pids():
            stat = _read(self.proc / str(pid) / "stat")
            if stat is None:
                continue
            rest = stat.rsplit(")", 1)[-1].split()  # after the command, which may hold spaces: state is rest[0]
            if len(rest) < 20:
                continue
            key, ticks = (pid, int(rest[19])), int(rest[11]) + int(rest[12])  # starttime; utime + stime
            self.ticks += max(0, ticks - self.seen.get(key, 0))
            now[key] = ticks
        self.seen = now
        return self.ticks / TICKS


def sample(group: Group, counter: CpuCounter, proc: Path) -> str:
    """One sample in the Prometheus text format."""
    mem_raw = _read(group.memory / ("memory.current" if group.version == 2 else "memory.usage_in_bytes")) or "0"
    figures = [
        ("cpu_seconds_total", "counter", "CPU time used by this lab node's cgroup", counter.seconds()),
        ("cpu_limit_cores", "gauge", "the node's CPU quota in cores (the machine's CPUs when unlimited)",
         _limit_cores(group)),
        ("memory_usage_bytes", "gauge", "memory charged to this lab node's cgroup", int(mem_raw.strip() or 0)),
        ("memory_limit_bytes", "gauge", "the node's memory limit", _limit_bytes(group, proc)),
        ("processes", "gauge", "processes in this lab node's cgroup", len(counter.pids())),
    ]
    lines = []
    for name, kind, text, value in figures:
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}", f"{PREFIX}{name} {value}"]
    return "\n".join(lines) + "\n"


def write_atomically(out: Path, text: str) -> None:
    """The collector must never read a half-written file: write aside, then rename over."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the .prom file the textfile collector reads")
    ap.add_argument("--mount-dir", type=Path, help="where to mount the cgroup hierarchies when /sys has none")
    ap.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"))
    ap.add_argument("--proc", type=Path, default=Path("/proc"))
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args(argv)
    groups = own_groups(_read(args.proc / "self" / "cgroup") or "")
    group = locate(args.cgroup_root, groups)
    if group is None and args.mount_dir is not None:
        mount_own(args.mount_dir, groups)
        group = locate(args.mount_dir, groups)
    if group is None:
        print(f"lab-cgroup-metrics: own cgroup {groups} not found under {args.cgroup_root}"
              f"{' or ' + str(args.mount_dir) if args.mount_dir else ''}", file=sys.stderr)
        return 1
    print(f"lab-cgroup-metrics: cgroup v{group.version} cpu={group.cpu} memory={group.memory} -> {args.out}",
          file=sys.stderr, flush=True)
    counter = CpuCounter(group, args.proc)
    while True:
        write_atomically(args.out, sample(group, counter, args.proc))
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
