"""A stand-in for lab hosts at the drills' command-runner seam (``payctl.drillfaults``): commands run on this
machine, and supervisord's status names one real local process."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from payctl.serverchecks import CommandResult


class LoopbackRunner:
    """``ip netns exec NS argv`` runs argv here; ``supervisorctl ... status`` answers that ``program`` is RUNNING as
    ``pid`` (a real process: pgrep, kill and nsenter act on it); every call is recorded."""

    def __init__(self, pid: int, program: str = "payctl-app") -> None:
        self.pid = pid
        self.program = program
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:3] == ["ip", "netns", "exec"]:
            argv = argv[4:]
        if argv[0] == "supervisorctl":
            return CommandResult(0, f"{self.program}   RUNNING   pid {self.pid}, uptime 0:01:00\n", "")
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        return CommandResult(p.returncode, p.stdout, p.stderr)
