"""A node for the backup/restore core that is this machine: commands in a local bash, files copied with shutil."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class LocalNode:
    """``payctl.backup.NodeFiles`` on this machine (the seam the core owns; SSH in a deployment)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str) -> tuple[bool, str, str]:
        self.commands.append(command)
        p = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        return p.returncode == 0, p.stdout, p.stderr

    def put_private(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)

    def fetch(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def push(self, local: Path, remote: str) -> None:
        shutil.copyfile(local, remote)
