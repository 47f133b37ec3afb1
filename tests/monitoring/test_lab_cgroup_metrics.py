"""The lab hosts' cgroup loop (templates/exporters/lab-cgroup-metrics.py) in a real cgroup, started exactly as a lab
host's supervisor starts it: inside a network namespace (``ip netns exec`` hides /sys/fs/cgroup) under
``unshare --mount``. No lab network: the namespace has no address and is deleted at the end; the cgroup is ours."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from payctl.errors import PayctlError
from payctl.lab import Cgroups, detect_cgroups
from payctl.paths import data_dir
from payctl.render import LAB_CGROUP_SCRIPT
from tests.support.services import wait_until

SCRIPT = data_dir("templates") / LAB_CGROUP_SCRIPT
CPUS, MEMORY = 0.5, 256 * 1024 * 1024


def _cgroups() -> Cgroups:
    try:
        cg = detect_cgroups()
    except PayctlError as exc:
        pytest.skip(exc.message)
    if cg.version != 1 or os.geteuid() != 0:
        pytest.skip("needs root and cgroup v1 (this machine's lab)")
    return cg


@dataclass
class Node:
    group: str
    cgroups: Cgroups
    netns: str
    out: Path

    def run(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """A process born inside the group (it joins before exec), as everything under a lab host's sshd is."""
        procs = [str(p) for p in self.cgroups.procs_files(self.group)]

        def join() -> None:
            for f in procs:
                Path(f).write_text(str(os.getpid()))

        with log.open("ab") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, preexec_fn=join)

    def metrics(self) -> dict[str, float]:
        text = self.out.read_text() if self.out.exists() else ""
        return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln and not ln.startswith("#"))}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    cg = _cgroups()
    name = f"payctl-cgtest-{os.getpid()}"
    for d in cg.dirs(name):
        d.mkdir()
    netns = f"pcgt{os.getpid()}"
    try:
        for path, value in cg.limits(name, CPUS, MEMORY).items():
            path.write_text(value)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        yield Node(name, cg, netns, tmp_path / "textfile" / "payctl_lab_cgroup.prom")
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        for d in cg.dirs(name):
            wait_until(lambda d=d: not (d / "cgroup.procs").read_text().strip(), 10, f"{d} empty")
            d.rmdir()


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        p.wait(10)


def test_the_loop_reports_its_own_cgroup_from_inside_a_lab_namespace(node: Node, tmp_path: Path) -> None:
    assert subprocess.run(["ip", "netns", "exec", node.netns, "ls", "/sys/fs/cgroup"], capture_output=True,
                          text=True).stdout.strip() == ""  # what a lab host sees: nothing mounted  # fmt: skip
    loop = node.run(["ip", "netns", "exec", node.netns, "unshare", "--mount", sys.executable, str(SCRIPT),
                     "--out", str(node.out), "--mount-dir", str(tmp_path / "cgroup"), "--interval", "0.5"],
                    tmp_path / "loop.log")  # fmt: skip
    burner: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: "payctl_lab_node_processes" in node.metrics(), 15, "first sample")
        first = node.metrics()
        assert first["payctl_lab_node_cpu_limit_cores"] == CPUS
        assert first["payctl_lab_node_memory_limit_bytes"] == MEMORY
        group_mem = int((node.cgroups.dirs(node.group)[-1] / "memory.usage_in_bytes").read_text())
        assert 0 < first["payctl_lab_node_memory_usage_bytes"] <= MEMORY
        assert abs(first["payctl_lab_node_memory_usage_bytes"] - group_mem) < 16 * 1024 * 1024
        meminfo = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())
        machine_used = (int(meminfo["MemTotal"].split()[0]) - int(meminfo["MemAvailable"].split()[0])) * 1024
        assert machine_used > 4 * first["payctl_lab_node_memory_usage_bytes"]  # the node is not the machine

        # 3 s of busy loop in the group, throttled to its 0.5-core quota: about 1.5 s of CPU.
        burner = node.run([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"],
                          tmp_path / "burner.log")  # fmt: skip
        assert burner.wait(20) == 0
        time.sleep(1.2)  # a sample after the burner's exit still holds its time (counted while it was alive)
        used = node.metrics()["payctl_lab_node_cpu_seconds_total"] - first["payctl_lab_node_cpu_seconds_total"]
        assert 0.9 < used < 2.0, used
        assert node.metrics()["payctl_lab_node_processes"] >= 1
    finally:
        if burner is not None:
            _stop(burner)
        _stop(loop)
    assert "cgroup v1" in (tmp_path / "loop.log").read_text()
    assert not list((tmp_path / "cgroup").glob("*/cgroup.procs"))  # the mounts lived in the loop's namespace only


def test_status_keeps_prometheus_cgroup_figures_and_fills_only_the_missing() -> None:
    from payctl.monitoring import LiveFigures, lab_cgroups_missing, with_lab_cgroups

    figures = LiveFigures({"node1": {"cpu": 41.0, "memory": 900.0, "rps": 3.0}, "node2": {"rps": 1.0}}, (), "prom")
    assert lab_cgroups_missing(figures, ["node1", "node2"]) == ["node2"]
    out = with_lab_cgroups(figures, {"node2": {"cpu": 120.0, "memory": 700.0}})
    assert out.node("node1") == {"cpu": 41.0, "memory": 900.0, "rps": 3.0}  # Prometheus's cgroup figures stay
    assert out.node("node2") == {"rps": 1.0, "cpu": 120.0, "memory": 700.0}
    assert any("node2.cpu, node2.memory read from the host's cgroup by payctl" in n for n in out.notes)
    quiet = with_lab_cgroups(figures, {})
    assert len(quiet.notes) == 1 and "textfile collector" in quiet.notes[0]
