"""payctl status names the latest audited change, so a failed gate is visible after the apply that ran it."""

from __future__ import annotations

from pathlib import Path

from payctl import audit
from payctl.cli.status import _last_change_line


def _record(result: str, command: str, error: str = "") -> audit.AuditRecord:
    return audit.AuditRecord(deployment="lab", command=command, phase=3, inventory="lab-1node",
                             inventory_sha256="0" * 64, nodes=("node1",), result=result, error=error)


def test_no_audit_log_means_no_last_change(tmp_path: Path) -> None:
    assert audit.last_change(tmp_path, "lab") is None


def test_a_failed_gate_after_an_apply_is_the_last_change(tmp_path: Path) -> None:
    audit.append_local(tmp_path, _record("ok", "payctl phase3 apply -i lab-1node"), lambda s: s)
    audit.append_local(tmp_path, _record("gate-failed", "payctl verify -i lab-1node --phase 3 (gate of apply)",
                                         "payctl verify exited 1"), lambda s: s)
    last = audit.last_change(tmp_path, "lab")
    assert last is not None
    assert last["result"] == "gate-failed" and last["phase"] == 3
    line = _last_change_line(last)
    assert line.startswith("last change: payctl verify -i lab-1node --phase 3 (gate of apply) -> [red]gate-failed[/]")
    assert line.endswith("(payctl verify exited 1)")
