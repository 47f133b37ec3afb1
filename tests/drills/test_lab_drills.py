"""Short fault drills on the shared phase-4 lab deployment (one node): k6 through nginx at 15 flows/s, the fault after
5 s, recovery, drain and the audit of every acknowledged payment. The full versions are bench/drills.py.

Each drill ends only when every program is RUNNING again and /health answers through nginx (the drill's own recovery
check), so the deployment is left as it was found; a drill that leaves it unhealthy invalidates it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from payctl import drill
from payctl.drilldisk import in_mounts, mount_dir
from payctl.serverchecks import local_runner
from tests.support.labs import SharedLab

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-1node", 4)]


def _drill(shared_lab: SharedLab, scenario: str, tmp_path: Path, duration_s: float = 15.0,
           recover_bound_s: float = 45.0, fault_s: float = 8.0) -> drill.DrillResult:  # fmt: skip
    spec = drill.DrillSpec(scenario, rps=15, duration_s=duration_s, warmup_s=5.0, recover_bound_s=recover_bound_s,
                           fault_s=fault_s)  # fmt: skip
    plan = drill.plan_drill(shared_lab.inventory, spec)
    try:
        result = drill.run_drill(plan, tmp_path / scenario)
    except BaseException:
        shared_lab.invalidate()
        raise
    if not result.healthy_after:
        shared_lab.invalidate()
    return result


def _assert_clean(result: drill.DrillResult, bound_s: float = 45) -> None:
    assert result.passed, result.problems
    row = result.row()
    assert (row["lost"], row["duplicates"], row["reconciliation"]) == (0, 0, "balanced")
    assert result.recovered_after_s is not None and result.recovered_after_s <= bound_s
    assert result.audit.acknowledged_payments >= 15 * 10  # the load really ran at the asked rate
    assert result.audit.payments >= result.audit.acknowledged_payments


@pytest.mark.parametrize("scenario", ["kill-relay", "kill-redis"])
def test_killing_a_background_program_fails_no_request_and_loses_nothing(
    shared_lab: SharedLab, tmp_path: Path, scenario: str
) -> None:
    result = _drill(shared_lab, scenario, tmp_path)
    _assert_clean(result)
    assert result.timeline.failed_during == 0  # the API does not depend on the relay; Redis has a fallback
    assert result.services_recovered_after_s is not None and result.fault.killed


def test_killing_the_broker_loses_no_event(shared_lab: SharedLab, tmp_path: Path) -> None:
    result = _drill(shared_lab, "kill-broker", tmp_path, duration_s=20.0)
    _assert_clean(result)
    assert result.audit.lost["events not applied"] == 0 and result.audit.lost["captures not settled"] == 0


def test_cli_kill_app_writes_the_table_and_exits_0(shared_lab: SharedLab, tmp_path: Path) -> None:
    out = tmp_path / "kill-app"
    res = shared_lab.payctl("drill", "-i", shared_lab.name, "kill-app", "--rps", "15", "--duration", "15s",
                            "--warmup", "5s", "--report-dir", str(out), "--yes")  # fmt: skip
    if res.returncode != 0:
        shared_lab.invalidate()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "drill kill-app PASS" in res.stdout and "| kill-app | 15 | 15.0 |" in res.stdout
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["lost"] == 0 and rows[0]["duplicates"] == 0 and rows[0]["verdict"] == "pass"
    assert rows[0]["fault"]["killed"]["worker"]  # one worker's pid
    assert (out / "results.md").read_text().startswith("# Fault drills: kill-app")
    assert sum(1 for line in (out / "k6.log").read_text().splitlines() if line.startswith("A ")) >= 150


def test_a_full_binlog_disk_gives_503s_never_a_500_loses_nothing_and_is_put_back(
    shared_lab: SharedLab, tmp_path: Path
) -> None:
    """MariaDB's binlog fills a 256 KiB tmpfs on node1, stays full 5 s, is grown; MariaDB writes again within its 60 s
    retry. The load outlasts that (90 s), so the drill sees the API recover."""
    result = _drill(shared_lab, "disk-full", tmp_path, duration_s=90.0, recover_bound_s=85.0, fault_s=5.0)
    print(f"disk-full: {result.fault.detail}; statuses during the fault: {result.timeline.statuses_text}; "
          f"row: {result.row()}")
    _assert_clean(result, bound_s=85)
    statuses = dict(result.timeline.statuses_during)
    assert statuses.get(503, 0) > 0  # the fault was real: writes were refused, with 503
    assert not [code for code in statuses if code > 500 and code != 503], statuses  # never a 502 or 504
    # Everything as it was: no symlinked binlog, the tmpfs unmounted in mariadbd's namespace, its directory gone.
    prefix = Path(shared_lab.inventory.node_prefix("node1"))
    assert not [p for p in (prefix / "data" / "mariadb").glob("mysql-bin.*") if p.is_symlink()]
    assert not (prefix / "drill").exists()
    node = next(n for n in drill.plan_drill(shared_lab.inventory, drill.DrillSpec("kill-relay")).nodes)
    pid = drill.snapshot(node, local_runner())["payctl-mariadb"].pid
    assert pid is not None
    mounted = subprocess.run(in_mounts(pid, "mountpoint", "-q", mount_dir(node)), check=False)
    assert mounted.returncode != 0
    if statuses.get(500):
        # The app logs the traceback of every 500 ("... failed"): carry it into the failure so it names the cause.
        log = (prefix / "logs" / "payctl-app.log").read_text(errors="replace").splitlines()
        at = [i for i, line in enumerate(log) if " failed" in line and "Traceback" in "".join(log[i + 1 : i + 3])]
        trace = " | ".join(" / ".join(log[i : i + 40]) for i in at[:2])[:4000]
        pytest.fail(f"{statuses[500]} answer(s) 500 during disk-full; app log: {trace or 'none'}")
