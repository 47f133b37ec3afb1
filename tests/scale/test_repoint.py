"""dbroles._repoint reads supervisorctl's per-program lines: the autorestart race is not a failure, a spawn error is.

The node seam (the deploy engine's shell and the app.env swap) is faked; what is under test is how the answer is read.
"""

from __future__ import annotations

from typing import Any

import pytest

from payctl import dbroles, deploy, scale
from payctl.errors import PayctlError

RACE = (
    "payctl-app: stopped\npayctl-relay: stopped\npayctl-consumer: ERROR (not running)\n"
    "payctl-app: started\npayctl-relay: started\npayctl-consumer: ERROR (already started)\n"
)


class Conn:
    def host(self, node: str) -> str:
        return node


def _repoint(monkeypatch: pytest.MonkeyPatch, restart_out: str) -> list[str]:
    ran: list[str] = []

    def shell(command: str) -> tuple[bool, str, str]:
        ran.append(command)
        if "supervisorctl" in command:
            return True, restart_out, ""
        return True, '{"status": "ok"}', ""  # curl of /health

    monkeypatch.setattr(deploy, "shell_of", lambda host: shell)
    monkeypatch.setattr(scale, "_swap", lambda *a, **k: None)
    conn: Any = Conn()
    dbroles._repoint(conn, "node2", "/var/lib/payctl-lab/node2", "10.77.0.12", "PAYAPP_DB_URL=x\n")
    return ran


def test_a_program_autorestarted_between_stop_and_start_is_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _repoint(monkeypatch, RACE)
    assert "restart payctl-app payctl-relay payctl-consumer" in ran[0]
    assert any("curl" in c and "10.77.0.12:8080/health" in c for c in ran[1:])  # and the app was checked after


def test_a_program_that_cannot_start_fails_the_repoint_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    out = "payctl-app: stopped\npayctl-app: ERROR (spawn error)\npayctl-relay: started\n"
    with pytest.raises(PayctlError, match=r"node2: restarting the app failed: payctl-app: ERROR \(spawn error\)"):
        _repoint(monkeypatch, out)
