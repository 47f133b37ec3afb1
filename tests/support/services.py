"""Real MariaDB and Redis servers for tests: private data dir, port and socket under a temp dir.

Each server is started by a fixture and stopped by pid; nothing depends on a service left running on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class MariaDB:
    """A private mariadbd: durable settings as production (binlog ROW, GTID strict, sync_binlog=1)."""

    base: Path
    port: int = field(default_factory=free_port)
    server_id: int = 1
    root_password: str = "test-root-pw"
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socket_path(self) -> Path:
        return self.base / "mysqld.sock"

    @property
    def cnf(self) -> Path:
        return self.base / "my.cnf"

    @property
    def client_cnf(self) -> Path:
        return self.base / "client.cnf"

    def url(self, user: str = "root", password: str | None = None, db: str = "") -> str:
        pw = self.root_password if password is None else password
        return f"mysql://{user}:{pw}@127.0.0.1:{self.port}/{db}"

    def start(self) -> MariaDB:
        self.base.mkdir(parents=True, exist_ok=True)
        settings = {
            "datadir": str(self.datadir),
            "socket": str(self.socket_path),
            "pid-file": str(self.base / "mysqld.pid"),
            "port": str(self.port),
            "bind-address": "127.0.0.1",
            "log-error": str(self.base / "error.log"),
            "server_id": str(self.server_id),
            "log_bin": str(self.base / "binlog"),
            "binlog_format": "ROW",
            "gtid_strict_mode": "1",
            "log_slave_updates": "1",
            "sync_binlog": "1",
            "innodb_flush_log_at_trx_commit": "1",
            "innodb_buffer_pool_size": "256M",
            "innodb_log_file_size": "128M",
            "max_connections": "500",
            "character-set-server": "utf8mb4",
            "collation-server": "utf8mb4_unicode_ci",
            "skip-name-resolve": "1",
            **self.extra,
        }
        self.cnf.write_text("[mariadbd]\n" + "".join(f"{k}={v}\n" for k, v in settings.items()))
        self.client_cnf.write_text(
            f"[client]\nuser=root\npassword={self.root_password}\nsocket={self.socket_path}\n"
        )
        os.chmod(self.client_cnf, 0o600)
        if not (self.datadir / "mysql").exists():
            subprocess.run(
                ["mariadb-install-db", f"--defaults-file={self.cnf}", "--user=root",
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                check=True, capture_output=True,
            )
            fresh = True
        else:
            fresh = False
        self.proc = subprocess.Popen(
            ["mariadbd", f"--defaults-file={self.cnf}", "--user=root"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            wait_until(lambda: self.socket_path.exists() and _port_open("127.0.0.1", self.port), 60,
                       f"mariadbd on port {self.port} (log: {self.base / 'error.log'})")
            if fresh:
                self._secure_root()
        except BaseException:
            self.stop()
            raise
        return self

    def _secure_root(self) -> None:
        self.sql(
            f"ALTER USER 'root'@'localhost' IDENTIFIED BY '{self.root_password}';"
            f"CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '{self.root_password}';"
            f"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{self.root_password}';"
            "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;",
            password="",
        )

    def sql(self, statements: str, db: str = "", password: str | None = None) -> str:
        """Run SQL through the mariadb client over the socket; returns tab-separated output."""
        args = ["mariadb", "--no-defaults", "-uroot", f"--socket={self.socket_path}", "-N", "-B"]
        env = dict(os.environ)
        env["MYSQL_PWD"] = self.root_password if password is None else password
        if db:
            args.append(db)
        out = subprocess.run(args, input=statements.encode(), capture_output=True, env=env, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb failed: {out.stderr.decode()}")
        return out.stdout.decode()

    def stop(self) -> None:
        _stop(self.proc, timeout=60)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class Redis:
    """A private redis-server on loopback with a password."""

    base: Path
    port: int = field(default_factory=free_port)
    password: str = "test-redis-pw"
    proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> Redis:
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self.base / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {self.port}\ndir {self.base}\nrequirepass {self.password}\n"
            "appendonly yes\nappendfsync everysec\nsave \"\"\ndaemonize no\n"
            f"logfile {self.base / 'redis.log'}\n"
        )
        self.proc = subprocess.Popen(
            ["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: _port_open("127.0.0.1", self.port), 20, f"redis on port {self.port}")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
