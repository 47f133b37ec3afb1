"""CPU and memory of each lab node during a verify run, read from this machine (lab hosts share its /proc).

A lab node's processes live in its own cgroup (``payctl.lab``): memory is the cgroup's own counter
(``memory.usage_in_bytes`` on v1, ``memory.current`` on v2); CPU is the sum of user+system time of the processes
listed in the cgroup, from ``/proc/<pid>/stat`` (cgroup v1 here has no cpuacct group per node). Sampled about once a
second by ``verification.gate_run`` through its progress callback; the series feed the report's server sections.
A node whose cgroup is gone simply has no point at that second. Real VMs get these series from monitoring instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from payctl.lab import Cgroups, NodeLayout
from payctl.report import ServerSeries

_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cpu_ticks(pids: Sequence[int], proc: Path) -> int:
    total = 0
    for pid in pids:
        stat = _read(proc / str(pid) / "stat")
        if stat is None:
            continue
        # Fields after the command (which may hold spaces) start at state; utime and stime are fields 14 and 15.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 12:
            total += int(rest[11]) + int(rest[12])
    return total


@dataclass
class _Node:
    name: str
    procs: Path
    memory: Path
    last: tuple[float, int] | None = None
    cpu: list[tuple[float, float | None]] = field(default_factory=list)
    mem: list[tuple[float, float | None]] = field(default_factory=list)


class LabSampler:
    """Per-node CPU (% of one core) and memory (MB) over a run."""

    def __init__(self, nodes: Sequence[NodeLayout], cgroups: Cgroups, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._nodes = []
        for n in nodes:
            procs = cgroups.procs_files(n.cgroup)[0]
            mem_dir = cgroups.dirs(n.cgroup)[-1]
            mem = mem_dir / ("memory.current" if cgroups.version == 2 else "memory.usage_in_bytes")
            self._nodes.append(_Node(n.node, procs, mem))

    def sample(self, t: float) -> None:
        for n in self._nodes:
            raw = _read(n.procs)
            if raw is None:
                continue
            ticks = _cpu_ticks([int(p) for p in raw.split()], self._proc)
            if n.last is not None and t > n.last[0]:
                pct = 100.0 * (ticks - n.last[1]) / _TICKS / (t - n.last[0])
                n.cpu.append((t, max(0.0, pct)))
            n.last = (t, ticks)
            mem = _read(n.memory)
            if mem is not None and mem.strip().isdigit():
                n.mem.append((t, int(mem) / 1e6))

    def series(self) -> ServerSeries:
        return ServerSeries(
            cpu_percent={n.name: n.cpu for n in self._nodes if n.cpu},
            memory_mb={n.name: n.mem for n in self._nodes if n.mem},
        )
