"""The one error root of payctl.

Every failure a user can act on is a ``PayctlError`` (or a subclass) carrying a message and a hint. The core raises
them; only ``payctl.cli`` formats them and chooses the exit code. Third-party errors are translated at the boundary.

    PayctlError                 exit 1 unless a subclass says otherwise
    ├── ConfigError             bad inventory / phase / flag values (exit 2)
    ├── ValidationFailed        a rendered file was rejected by its real validator (exit 1)
    ├── DeployError             a step on a host failed (exit 1)
    │   ├── LockHeld            another apply holds the deployment lock (exit 1)
    │   └── LockNodeDown        the node that holds the lock does not answer; --break-lock moves it (exit 1)
    ├── GateFailed              a verify gate criterion failed (exit 1)
    ├── TargetUnreachable       the load target or k6 could not be used (exit 3)
    └── Interrupted             Ctrl-C (SIGINT) stopped a command part-way (exit 130)

Ctrl-C arrives as ``KeyboardInterrupt``; a command that can be stopped half-way translates it into ``Interrupted``
(with what was left and how to finish) once its own cleanup has run, because typer turns a bare KeyboardInterrupt
into a silent exit 130.
"""

from __future__ import annotations


class PayctlError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(PayctlError):
    exit_code = 2

    def __init__(self, message: str, hint: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems or []


class ValidationFailed(PayctlError):
    exit_code = 1


class DeployError(PayctlError):
    exit_code = 1


class LockHeld(DeployError):
    exit_code = 1


class LockNodeDown(DeployError):
    exit_code = 1


class GateFailed(PayctlError):
    exit_code = 1


class TargetUnreachable(PayctlError):
    exit_code = 3


class Interrupted(PayctlError):
    exit_code = 130
