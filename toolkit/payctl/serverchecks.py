"""Server-side criteria of the verify gate, judged after the load: the event backlog drains, reconciliation balances.

The interface is a ``ServerCheck``: a name, ``applies(phase)`` and ``run(deadline_s) -> Criterion``. Whoever can reach
the servers provides them; ``payapp_checks(runner)`` builds the two standard ones over a ``CommandRunner``, a callable
that runs an argv somewhere (locally for a loopback target, on a node over SSH for the deploy engine) and returns its
exit code and output. The commands are the service's own:

* ``payapp lag``: consumer lag, measured from outside the consumer. Polled until the total is 0, within a bound.
  Output read as JSON (``{"total": N}``, ``{"lag": N}``, or per-partition objects whose ``lag`` fields are summed) or
  as text (the number after ``total``, else the sum of the numbers ending each line).
* ``payapp reconcile``: waits for a running reconciliation and prints the id of the report it wrote; exit code 0 means
  balanced, non-zero unbalanced (its output names the mismatches).

A check that does not apply to the phase (no reconciliation before phase 2) is reported as skipped, never as passed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from payctl.gate import Criterion
from payctl.phase import Phase


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult: ...


class ServerCheck(Protocol):
    name: str

    def applies(self, phase: Phase | None) -> bool: ...

    def run(self, deadline_s: float) -> Criterion: ...


def local_runner(env: dict[str, str] | None = None) -> CommandRunner:
    """Runs commands on this machine (a loopback target); a missing binary or a timeout is a failed command."""

    def run(argv: Sequence[str], timeout: float) -> CommandResult:
        try:
            p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except FileNotFoundError:
            return CommandResult(127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(124, "", f"{' '.join(argv)}: timed out after {timeout:g}s")
        return CommandResult(p.returncode, p.stdout, p.stderr)

    return run


def netns_runner(namespace: str, env: dict[str, str] | None = None) -> CommandRunner:
    """Runs commands inside a lab node's network namespace (``ip netns exec``): lab hosts share this machine's
    filesystem, so the node's own venv and env file are reachable, and the node's database grants (which admit the
    node's address, not the bridge's) apply."""
    inner = local_runner(env)

    def run(argv: Sequence[str], timeout: float) -> CommandResult:
        return inner(["ip", "netns", "exec", namespace, *argv], timeout)

    return run


def _sum_lag(data: Any) -> int | None:
    if isinstance(data, bool):
        return None
    if isinstance(data, int):
        return data
    if isinstance(data, dict):
        for key in ("total", "total_lag", "lag"):
            v = data.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        parts = [_sum_lag(v) for v in data.values() if isinstance(v, dict | list)]
        found = [p for p in parts if p is not None]
        return sum(found) if found else None
    if isinstance(data, list):
        found = [p for p in (_sum_lag(v) for v in data) if p is not None]
        return sum(found) if found else None
    return None


def parse_lag(text: str) -> int | None:
    """Total consumer lag from ``payapp lag`` output (JSON or text); None when it cannot be read."""
    try:
        return _sum_lag(json.loads(text))
    except ValueError:
        pass
    m = re.search(r"total\D{0,20}?(\d+)", text, re.IGNORECASE)
    if m:
        return int(m.group(1))
    ends = [int(m.group(1)) for line in text.splitlines() if (m := re.search(r"(\d+)\s*$", line))]
    return sum(ends) if ends else None


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(t.strip() for t in text.strip().splitlines()[-lines:])


@dataclass
class BacklogDrained:
    """``payapp lag`` reaches 0 within ``bound_s`` after the load stops."""

    runner: CommandRunner
    payapp: tuple[str, ...] = ("payapp",)
    bound_s: float = 60.0
    interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    name: str = "event backlog drained"

    def applies(self, phase: Phase | None) -> bool:
        return phase is not None and phase.has("outbox_relay")

    def run(self, deadline_s: float) -> Criterion:
        bound = min(self.bound_s, deadline_s)
        start = self.clock()
        last: int | None = None
        detail = ""
        while True:
            res = self.runner([*self.payapp, "lag"], max(1.0, bound))
            lag = parse_lag(res.stdout) if res.returncode == 0 else None
            if res.returncode != 0:
                detail = f"payapp lag exited {res.returncode}: {_tail(res.stderr or res.stdout)}"
            elif lag is None:
                detail = f"cannot read payapp lag output: {_tail(res.stdout)}"
            last = lag if lag is not None else last
            waited = self.clock() - start
            if lag == 0:
                return Criterion(self.name, True, f"lag 0 after {waited:.1f}s", f"0 within {bound:g}s")
            if waited + self.interval_s > bound:
                measured = f"lag {last} after {waited:.1f}s" if last is not None else "lag unknown"
                return Criterion(self.name, False, measured, f"0 within {bound:g}s", detail=detail)
            self.sleep(self.interval_s)


@dataclass
class ReconciliationBalanced:
    """A reconciliation run, triggered now and waited for, reports the ledger balanced."""

    runner: CommandRunner
    payapp: tuple[str, ...] = ("payapp",)
    timeout_s: float = 300.0
    unbalanced_exit: int = 3  # payapp reconcile's exit code for "ran, and found a mismatch"
    name: str = "reconciliation balanced"

    def applies(self, phase: Phase | None) -> bool:
        return phase is not None and phase.has("reconciliation")

    def run(self, deadline_s: float) -> Criterion:
        res = self.runner([*self.payapp, "reconcile"], min(self.timeout_s, max(1.0, deadline_s)))
        out = (res.stdout + "\n" + res.stderr).strip()
        m = re.search(r"report\D{0,12}?(\d+)", out, re.IGNORECASE)
        report = f"report {m.group(1)}" if m else "no report id printed"
        if res.returncode == 0:
            return Criterion(self.name, True, f"balanced ({report})", "balanced")
        if res.returncode == self.unbalanced_exit or "balanced=false" in out:
            measured = f"not balanced: exit {res.returncode} ({report})"
        else:
            measured = f"reconciliation did not run: exit {res.returncode}"
        return Criterion(self.name, False, measured, "balanced", detail=_tail(out, 5))


def local_payapp() -> tuple[str, ...]:
    """``payapp`` next to this Python (the venv payctl runs from), else whatever PATH finds."""
    here = Path(sys.executable).parent / "payapp"
    return (str(here),) if here.is_file() else ("payapp",)


def payapp_checks(
    runner: CommandRunner, payapp: Sequence[str] | None = None, backlog_bound_s: float = 60.0
) -> list[ServerCheck]:
    """The standard server-side checks, run with ``payapp`` commands through ``runner`` (default: the local one)."""
    cmd = tuple(payapp) if payapp is not None else local_payapp()
    return [BacklogDrained(runner, cmd, bound_s=backlog_bound_s), ReconciliationBalanced(runner, cmd)]


def run_server_checks(checks: Sequence[ServerCheck], phase: Phase | None, deadline_s: float = 300.0) -> list[Criterion]:
    """Each check that applies to ``phase`` run in order; the others reported as skipped."""
    out: list[Criterion] = []
    for check in checks:
        if not check.applies(phase):
            why = f"not part of phase {phase.number}" if phase is not None else "no phase given"
            out.append(Criterion(check.name, True, "skipped", "", skipped=True, detail=why))
            continue
        out.append(check.run(deadline_s))
    return out
