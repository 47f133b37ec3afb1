"""The ``disk-full`` drill's fault: MariaDB's binlog on a small tmpfs that fills under the drill's load, then grown.

Why the binlog, and how (each checked on this machine, see docs/reliability.md):

* Binlogs live in the datadir (``log_bin = mysql-bin``). MariaDB opens the *next* binlog file by name when it
  rotates, following a symlink, so the drill makes ``<datadir>/mysql-bin.<N+1>`` a symlink onto the tmpfs and
  ``FLUSH BINARY LOGS``: from then on every commit writes there. No restart, nothing else moves.
* On a full binlog disk MariaDB does not fail and does not corrupt: the committing thread logs "Disk is full writing
  ... Waiting for someone to free space" and retries every 60 s, holding the binlog lock; reads go on. So the app's
  writes wait (it answers 503 after PAYAPP_DB_QUERY_TIMEOUT_MS) and resume by themselves once there is space.
* Lab hosts are entered with ``ip netns exec``, which gives each program tree its own mount namespace; this
  machine's ``/`` is a private mount, so a tmpfs mounted here would not be seen by the node's MariaDB. Every step on
  the tmpfs runs in mariadbd's own mount namespace (``nsenter --target <pid> --mount``, the pid its supervisord
  reports). The symlink and the copy back are on the real disk, seen by both.

Steps: mount the tmpfs (``SMALL_BYTES``) under the node's prefix, symlink, rotate; wait until it is full (at most
``FILL_BOUND_S``); keep it full ``fault_s``; grow it (``mount -o remount,size=GROWN_BYTES``: the remediation);
wait until MariaDB wrote again (a second rotate returns once the binlog lock is free) — and always, in ``finally``:
grow it if not yet, rotate off the tmpfs, copy the binlog file back over its symlink (``cp`` then ``mv``, compared
with ``cmp``), unmount and remove the directories. Nothing here can write to the real filesystem but that one copy.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable

from payctl.drillfaults import Fault, FaultError, Node, running_pid
from payctl.serverchecks import CommandResult, CommandRunner

SMALL_BYTES = 256 * 1024  # fills in a few seconds at 15 payment flows/s (about 5 KB of binlog each)
GROWN_BYTES = 64 * 1024 * 1024
MAX_BYTES = 256 * 1024 * 1024  # never more than this, whatever the caller asks
FILL_BOUND_S = 30.0
RESUME_BOUND_S = 90.0  # MariaDB retries a full disk every 60 s
PROGRAM = "payctl-mariadb"


def mount_dir(node: Node) -> str:
    return f"{node.prefix}/drill/disk-full"


def sql_argv(node: Node, statement: str) -> list[str]:
    """The node's ``mariadb`` client as the backup account (RELOAD, BINLOG MONITOR: rotate, read the position)."""
    return ["ip", "netns", "exec", node.namespace, "mariadb", f"--defaults-file={node.prefix}/mariadb/backup.cnf",
            "-N", "-B", "-e", statement]  # fmt: skip


def in_mounts(pid: int, *argv: str) -> list[str]:
    """``argv`` in mariadbd's mount namespace, where the tmpfs is."""
    return ["nsenter", f"--target={pid}", "--mount", "--", *argv]


def next_binlog(current: str) -> str:
    """``mysql-bin.000007`` -> ``mysql-bin.000008`` (the width kept)."""
    stem, _, number = current.rpartition(".")
    if not stem or not number.isdigit():
        raise FaultError(f"unexpected binlog file name {current!r}", hint="is binlog on? (log_bin in my.cnf)")
    return f"{stem}.{int(number) + 1:0{len(number)}d}"


def _check(res: CommandResult, what: str) -> str:
    if res.returncode != 0:
        detail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-2:]) or f"exit {res.returncode}"
        raise FaultError(f"{what} failed: {detail}")
    return res.stdout


class _Binlog:
    """One disk-full fault on ``node``: the state the undo needs, filled in as the steps go."""

    def __init__(self, node: Node, runner: CommandRunner) -> None:
        self.node = node
        self.run = runner
        self.pid = running_pid(node, PROGRAM, runner)
        self.mount = mount_dir(node)
        self.mounted = self.grown = False
        self.link = ""  # the symlink in the datadir, once made
        self.moved = ""  # the binlog file on the tmpfs

    def sql(self, statement: str, timeout: float = 30) -> str:
        return _check(self.run(sql_argv(self.node, statement), timeout), f"{self.node.name}: {statement}")

    def current(self) -> str:
        return self.sql("SHOW MASTER STATUS").split()[0]

    def free_bytes(self) -> tuple[str, int, int]:
        """(file system type, total bytes, available bytes) of the mount point, seen by mariadbd."""
        out = _check(self.run(in_mounts(self.pid, "stat", "-f", "-c", "%T %b %a %S", self.mount), 10), "stat -f")
        kind, blocks, avail, size = out.split()
        return kind, int(blocks) * int(size), int(avail) * int(size)

    def setup(self, small: int) -> None:
        basename = self.sql("SELECT @@log_bin_basename").strip()
        if basename in ("", "NULL"):
            raise FaultError(f"{self.node.name}: MariaDB has no binlog", hint="disk-full needs log_bin (phase 1+)")
        self.moved = next_binlog(self.current())
        link = f"{posixpath.dirname(basename)}/{self.moved}"
        if self.run(["test", "-e", link], 10).returncode == 0 or self.run(["test", "-L", link], 10).returncode == 0:
            raise FaultError(f"{link} already exists", hint="a binlog rotated meanwhile? run the drill again")
        if self.run(in_mounts(self.pid, "mountpoint", "-q", self.mount), 10).returncode == 0:
            raise FaultError(f"{self.mount} is already a mount point on {self.node.name} (an earlier drill's?)",
                             hint=f"nsenter --target={self.pid} --mount -- umount {self.mount}")  # fmt: skip
        _check(self.run(["mkdir", "-p", self.mount], 10), f"mkdir {self.mount}")
        mount = in_mounts(self.pid, "mount", "-t", "tmpfs", "-o", f"size={small},mode=0700", "payctl-drill-disk-full",
                          self.mount)  # fmt: skip
        _check(self.run(mount, 10), f"mount a tmpfs on {self.mount}")
        self.mounted = True
        kind, total, _ = self.free_bytes()
        if kind != "tmpfs" or total > MAX_BYTES:
            raise FaultError(f"{self.mount} is {kind} of {total} bytes, not the small tmpfs just mounted")
        _check(self.run(["ln", "-s", f"{self.mount}/{self.moved}", link], 10), f"ln -s {link}")
        self.link = link

    def rotate_onto_tmpfs(self) -> None:
        self.sql("FLUSH BINARY LOGS")
        now = self.current()
        if now != self.moved:
            raise FaultError(f"after FLUSH BINARY LOGS MariaDB writes {now}, not {self.moved}")

    def wait_full(self, bound_s: float, sleep: Callable[[float], None]) -> float:
        start = time.time()
        while True:
            _, _, avail = self.free_bytes()
            if avail == 0:
                return time.time()
            if time.time() - start > bound_s:
                raise FaultError(f"the {self.mount} tmpfs did not fill within {bound_s:g}s ({avail} bytes left)",
                                 hint="more load (--rps) or a longer --duration")  # fmt: skip
            sleep(0.2)

    def grow(self, size: int) -> None:
        _check(self.run(in_mounts(self.pid, "mount", "-o", f"remount,size={size}", self.mount), 10),
               f"grow the tmpfs on {self.mount}")  # fmt: skip
        self.grown = True

    def undo(self, grown: int, sleep: Callable[[float], None]) -> list[str]:
        """Put everything back; returns what could not be done (empty: all of it)."""
        left: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> bool:
            try:
                fn()
                return True
            except FaultError as exc:
                left.append(f"{what}: {exc.message}")
                return False

        if self.mounted and not self.grown:
            step("grow the tmpfs", lambda: self.grow(grown))
        if self.link:
            try:
                writing = self.current()
            except FaultError as exc:
                left.append(f"read the binlog position: {exc.message}")
                writing = ""
            if writing == self.moved:  # rotate off the tmpfs (waits until MariaDB can write again)
                step("rotate the binlog off the tmpfs", lambda: self.sql("FLUSH BINARY LOGS", RESUME_BOUND_S))
            src = f"{self.mount}/{self.moved}"
            if self.run(in_mounts(self.pid, "test", "-f", src), 10).returncode == 0:
                copy = f"{self.link}.drill-copy"
                if (step("copy the binlog back", lambda: _check(self.run(in_mounts(
                        self.pid, "cp", "--preserve=mode,timestamps", src, copy), 120), f"cp {src}"))
                        and step("sync it", lambda: _check(self.run(["sync", copy], 60), f"sync {copy}"))
                        and step("put it in place", lambda: _check(self.run(["mv", "-fT", copy, self.link], 10),
                                                                   f"mv {copy} {self.link}"))):  # fmt: skip
                    step("compare", lambda: _check(self.run(in_mounts(self.pid, "cmp", src, self.link), 60),
                                                   f"cmp {src} {self.link}"))  # fmt: skip
            elif self.run(["test", "-L", self.link], 10).returncode == 0:  # never rotated onto it: just the link
                step("remove the symlink", lambda: _check(self.run(["rm", "-f", self.link], 10), "rm"))
        if self.mounted and not left:
            for _ in range(30):  # a replica's binlog dump thread may still have the file open for a moment
                res = self.run(in_mounts(self.pid, "umount", self.mount), 10)
                if res.returncode == 0:
                    self.mounted = False
                    break
                sleep(1)
            if self.mounted:
                left.append(f"umount {self.mount} in mariadbd's mount namespace failed: {res.stderr.strip()}")
        if not self.mounted:
            self.run(["rmdir", self.mount], 10)
            self.run(["rmdir", posixpath.dirname(self.mount)], 10)  # only if empty
        return left


def disk_full(node: Node, runner: CommandRunner, fault_s: float, sleep: Callable[[float], None] = time.sleep,
              small: int = SMALL_BYTES, grown: int = GROWN_BYTES) -> Fault:  # fmt: skip
    """Fill MariaDB's binlog disk on ``node`` for ``fault_s`` seconds, then grow it; returns once MariaDB writes again
    and everything is back on the real disk (also on an error or Ctrl-C: then the error is raised after the undo).
    The fault starts at the rotation onto the tmpfs and ends when it was grown."""
    if not 0 < small < grown <= MAX_BYTES:
        raise FaultError(f"tmpfs sizes must be 0 < {small} < {grown} <= {MAX_BYTES}")
    b = _Binlog(node, runner)
    start = end = full = resumed = 0.0
    try:
        b.setup(small)
        start = time.time()
        b.rotate_onto_tmpfs()
        full = b.wait_full(FILL_BOUND_S, sleep)
        sleep(fault_s)
        b.grow(grown)
        end = time.time()
        b.sql("FLUSH BINARY LOGS", RESUME_BOUND_S)  # returns when the waiting commit got its space and wrote
        resumed = time.time()
    finally:
        left = b.undo(grown, sleep)
        if left:  # replaces an error in flight (it is the __context__): what is left matters more now
            raise FaultError(
                f"{node.name}: the disk-full fault was not fully undone: {'; '.join(left)}",
                hint=f"by hand, in mariadbd's mount namespace (nsenter --target={b.pid} --mount): make {b.link or '-'} "
                "the regular file it links to, then umount " + b.mount,
            )
    detail = (f"binlog {b.moved} on a {small // 1024} KiB tmpfs: full after {full - start:.1f}s, kept full "
              f"{fault_s:g}s, grown to {grown // (1024 * 1024)} MiB; MariaDB wrote again {resumed - end:.1f}s later; "
              "binlog copied back, tmpfs unmounted")  # fmt: skip
    return Fault(node.name, "disk-full", start, end, {}, detail)

