"""Per-node CPU and memory from a real cgroup: a busy process in a throwaway group reads as about one core."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from payctl.lab import detect_cgroups
from payctl.labmetrics import LabSampler


@dataclass(frozen=True)
class Group:  # what LabSampler reads of a lab.NodeLayout
    node: str
    cgroup: str


def test_sampler_reads_cpu_and_memory_of_the_processes_in_a_node_cgroup() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (cgroups); CI runs as root")
    cg = detect_cgroups()
    group = f"pgate-{os.getpid()}"
    dirs = cg.dirs(group)
    for d in dirs:
        d.mkdir()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 10\nwhile time.time() < t: pass"])
    try:
        for procs in cg.procs_files(group):
            procs.write_text(str(busy.pid))
        node: Any = Group("node1", group)
        sampler = LabSampler([node], cg)
        sampler.sample(0.0)
        time.sleep(1.5)
        sampler.sample(1.5)
        series = sampler.series()
        ((t, cpu),) = series.cpu_percent["node1"]
        # One busy process: at most a core, and clearly more than idle even on a machine others load heavily.
        assert t == 1.5 and cpu is not None and 15 <= cpu <= 110
        mem = series.memory_mb["node1"]
        # cgroup v1 charges only what the process touches after it moved in: more than nothing, by the second sample
        assert len(mem) == 2 and mem[-1][1] is not None and mem[-1][1] > 0.5
        assert series.consumer_lag == ()
    finally:
        busy.kill()
        busy.wait(10)
        time.sleep(0.2)
        for d in dirs:
            Path(d).rmdir()


def test_an_idle_process_reads_near_zero() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (cgroups); CI runs as root")
    cg = detect_cgroups()
    group = f"pgate-idle-{os.getpid()}"
    dirs = cg.dirs(group)
    for d in dirs:
        d.mkdir()
    idle = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(10)"])
    try:
        time.sleep(0.3)  # past the interpreter's start-up
        for procs in cg.procs_files(group):
            procs.write_text(str(idle.pid))
        node: Any = Group("node1", group)
        sampler = LabSampler([node], cg)
        sampler.sample(0.0)
        time.sleep(1.0)
        sampler.sample(1.0)
        ((_, cpu),) = sampler.series().cpu_percent["node1"]
        assert cpu is not None and cpu < 5
    finally:
        idle.kill()
        idle.wait(10)
        time.sleep(0.2)
        for d in dirs:
            Path(d).rmdir()


def test_a_missing_cgroup_gives_no_points() -> None:
    node: Any = Group("gone", f"pgate-missing-{os.getpid()}")
    sampler = LabSampler([node], detect_cgroups())
    sampler.sample(0.0)
    sampler.sample(1.0)
    assert sampler.series().cpu_percent == {} and sampler.series().memory_mb == {}
