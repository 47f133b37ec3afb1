"""The disk-full fault for real, on a local MariaDB standing in for a lab node at the command-runner seam: the real
mount, symlink, FLUSH BINARY LOGS, nsenter into mariadbd's mount namespace, remount, copy back and umount. A writer
thread is the load. Afterwards the binlog file is a regular file on the real disk that mariadb-binlog reads, nothing
is mounted, every write that MariaDB acknowledged is there, and MariaDB restarts cleanly on it."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from payctl.drilldisk import disk_full, mount_dir
from payctl.drillfaults import Node
from tests.support.runners import LoopbackRunner
from tests.support.services import MariaDB

pytestmark = pytest.mark.slow


def test_the_fault_fills_the_binlog_disk_and_puts_everything_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root (CI runs as root)")
    server = MariaDB(tmp_path / "mariadb").start()
    assert server.proc is not None
    prefix = tmp_path / "node1"
    (prefix / "mariadb").mkdir(parents=True)
    (prefix / "mariadb" / "backup.cnf").write_text(
        f"[client]\nuser=root\npassword={server.root_password}\nsocket={server.socket_path}\n"
    )
    node = Node("node1", "pl-test-node1", str(prefix), "vpl-test-node1", "127.0.0.1")
    stop = threading.Event()
    acknowledged: list[int] = []
    unknown: list[int] = []  # the client gave up (60 s): committed or not

    def write() -> None:
        while not stop.is_set() and len(acknowledged) < 2000:
            try:
                server.sql("INSERT INTO t.ballast (v) VALUES (REPEAT('x', 4096))")
            except (RuntimeError, subprocess.TimeoutExpired):
                unknown.append(1)
                continue
            acknowledged.append(1)

    writer = threading.Thread(target=write, daemon=True)
    try:
        server.sql("CREATE DATABASE t; CREATE TABLE t.ballast (id INT AUTO_INCREMENT PRIMARY KEY, v TEXT)")
        before = server.sql("SHOW MASTER STATUS").split()[0]
        writer.start()
        runner = LoopbackRunner(server.proc.pid, "payctl-mariadb")
        fault = disk_full(node, runner, 2.0)
        stop.set()
        writer.join(90)
        assert not writer.is_alive()
        moved = f"binlog.{int(before.rsplit('.', 1)[1]) + 1:06d}"
        assert f"binlog {moved} on a 256 KiB tmpfs: full after" in fault.detail
        assert fault.end - fault.start >= 2.0
        # The rotation onto the tmpfs and the grow ran in mariadbd's mount namespace, through nsenter.
        assert any(c[:3] == ["nsenter", f"--target={server.proc.pid}", "--mount"] and "tmpfs" in c
                   for c in runner.calls)  # fmt: skip
        binlog = server.base / moved
        assert binlog.is_file() and not binlog.is_symlink() and binlog.stat().st_size > 200 * 1024
        assert subprocess.run(["mariadb-binlog", str(binlog)], capture_output=True, check=False).returncode == 0
        assert not Path(mount_dir(node)).exists() and not (prefix / "drill").exists()
        assert subprocess.run(["mountpoint", "-q", mount_dir(node)], check=False).returncode != 0
        assert not list(server.base.glob("*.drill-copy"))
        assert moved in server.sql("SHOW BINARY LOGS")
        rows = int(server.sql("SELECT COUNT(*) FROM t.ballast").strip())
        # Every acknowledged insert is there; one the client gave up on may have committed once space came back.
        assert len(acknowledged) <= rows <= len(acknowledged) + len(unknown)
        server.stop()
        server.start()
        assert int(server.sql("SELECT COUNT(*) FROM t.ballast").strip()) == rows
    finally:
        stop.set()
        subprocess.run(["umount", mount_dir(node)], capture_output=True, check=False)  # only if a step failed
        server.remove()
