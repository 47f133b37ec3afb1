"""The disk-full fault's steps through the command-runner seam: which commands, in which order, and the undo (grow,
rotate off, copy back, unmount) in ``finally`` whatever happens. ``test_drill_disk_local.py`` runs the same steps for
real against a local MariaDB."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from payctl import drilldisk
from payctl.drilldisk import GROWN_BYTES, SMALL_BYTES, disk_full, next_binlog
from payctl.drillfaults import FaultError, Node
from payctl.serverchecks import CommandResult

NODE = Node("node1", "pl-lab-node1", "/var/lib/payctl-lab/node1", "vpl-lab-node1", "10.77.0.11")
MNT = "/var/lib/payctl-lab/node1/drill/disk-full"
DATA = "/var/lib/payctl-lab/node1/data/mariadb"
LINK = f"{DATA}/mysql-bin.000008"
NS = ["nsenter", "--target=700", "--mount", "--"]


class BinlogRunner:
    """A node whose MariaDB writes mysql-bin.000007; FLUSH rotates; the tmpfs's free bytes go down per ``stat``."""

    def __init__(self, free: Sequence[int] = (200_000, 50_000, 0), fs: str = "tmpfs",
                 fail: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.calls: list[list[str]] = []
        self.number = 7
        self.free = list(free)
        self.fs = fs
        self.fail = fail  # a command whose text contains one of these fails
        self.linked = False
        self.on_tmpfs = False

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        text = " ".join(argv)
        if any(f in text for f in self.fail):
            return CommandResult(1, "", f"failed: {text[:40]}")
        if "supervisorctl" in argv:
            return CommandResult(0, "payctl-mariadb                   RUNNING   pid 700, uptime 1:00:00\n", "")
        if argv[:3] == ["ip", "netns", "exec"] and argv[4] == "mariadb":
            sql = argv[-1]
            if sql == "SELECT @@log_bin_basename":
                return CommandResult(0, f"{DATA}/mysql-bin\n", "")
            if sql == "SHOW MASTER STATUS":
                return CommandResult(0, f"mysql-bin.{self.number:06d}\t379\t\t\n", "")
            if sql == "FLUSH BINARY LOGS":
                self.number += 1
                self.on_tmpfs = self.on_tmpfs or (self.linked and self.number == 8)
                return CommandResult(0, "", "")
        if argv[:4] == NS:
            rest = argv[4:]
            if rest[:2] == ["mountpoint", "-q"]:
                return CommandResult(1, "", "")
            if rest[:2] == ["stat", "-f"]:
                avail = self.free.pop(0) if len(self.free) > 1 else self.free[0]
                return CommandResult(0, f"{self.fs} 64 {avail // 4096} 4096\n", "")
            if rest[:2] == ["test", "-f"]:
                return CommandResult(0 if self.on_tmpfs else 1, "", "")
            return CommandResult(0, "", "")
        if argv[:2] == ["ln", "-s"]:
            self.linked = True
        if argv[0] == "test":
            return CommandResult(0 if (argv[1] == "-L" and self.linked) else 1, "", "")
        return CommandResult(0, "", "")

    def changes(self) -> list[str]:
        """The commands that change something, in order (reads left out)."""
        keep = ("mount", "umount", "mkdir", "ln", "FLUSH", "cp", "mv", "sync", "rm", "rmdir")
        out = []
        for c in self.calls:
            text = " ".join(c)
            if "mountpoint" in text or "stat -f" in text or "SHOW MASTER" in text or "@@log_bin" in text:
                continue
            if any(k in c or k in text.split() or (k == "FLUSH" and "FLUSH" in text) for k in keep):
                out.append(text.replace("ip netns exec pl-lab-node1 mariadb --defaults-file=/var/lib/payctl-lab/node1/"
                                        "mariadb/backup.cnf -N -B -e ", "SQL "))  # fmt: skip
        return out


UNDO_AFTER_ROTATION = [
    f"nsenter --target=700 --mount -- cp --preserve=mode,timestamps {MNT}/mysql-bin.000008 {LINK}.drill-copy",
    f"sync {LINK}.drill-copy",
    f"mv -fT {LINK}.drill-copy {LINK}",
    f"nsenter --target=700 --mount -- umount {MNT}",
    f"rmdir {MNT}",
    "rmdir /var/lib/payctl-lab/node1/drill",
]


def test_the_binlog_goes_onto_a_small_tmpfs_fills_is_grown_and_comes_back() -> None:
    r = BinlogRunner()
    slept: list[float] = []
    f = disk_full(NODE, r, 7, sleep=slept.append)
    assert r.changes() == [
        f"mkdir -p {MNT}",
        f"nsenter --target=700 --mount -- mount -t tmpfs -o size={SMALL_BYTES},mode=0700 payctl-drill-disk-full {MNT}",
        f"ln -s {MNT}/mysql-bin.000008 {LINK}",
        "SQL FLUSH BINARY LOGS",  # onto the tmpfs
        f"nsenter --target=700 --mount -- mount -o remount,size={GROWN_BYTES} {MNT}",  # the remediation
        "SQL FLUSH BINARY LOGS",  # off it again: returns once MariaDB could write
        *UNDO_AFTER_ROTATION,
    ]
    assert slept == [0.2, 7]  # polled until full, then kept full for fault_s
    # The copy is compared with its source before the tmpfs goes.
    assert r.calls.index([*NS, "cmp", f"{MNT}/mysql-bin.000008", LINK]) < r.calls.index([*NS, "umount", MNT])
    assert (f.action, f.node, f.killed) == ("disk-full", "node1", {})
    assert f.start <= f.end and "binlog mysql-bin.000008 on a 256 KiB tmpfs" in f.detail
    assert "tmpfs unmounted" in f.detail


def test_interrupted_while_full_the_undo_grows_rotates_copies_back_and_unmounts() -> None:
    r = BinlogRunner()

    def interrupted(s: float) -> None:
        if s == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        disk_full(NODE, r, 7, sleep=interrupted)
    tail = r.changes()[4:]
    assert tail == [
        f"nsenter --target=700 --mount -- mount -o remount,size={GROWN_BYTES} {MNT}",
        "SQL FLUSH BINARY LOGS",
        *UNDO_AFTER_ROTATION,
    ]


def test_a_tmpfs_that_does_not_fill_fails_the_fault_and_is_still_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drilldisk, "FILL_BOUND_S", 0.0)
    r = BinlogRunner(free=(100_000,))
    with pytest.raises(FaultError, match="did not fill within 0s \\(98304 bytes left\\)"):
        disk_full(NODE, r, 7, sleep=lambda _: None)
    assert r.changes()[-len(UNDO_AFTER_ROTATION) - 2:] == [
        f"nsenter --target=700 --mount -- mount -o remount,size={GROWN_BYTES} {MNT}",
        "SQL FLUSH BINARY LOGS",
        *UNDO_AFTER_ROTATION,
    ]


def test_a_mount_that_is_not_the_small_tmpfs_is_refused_before_the_binlog_moves() -> None:
    r = BinlogRunner(fs="ext2/ext3")
    with pytest.raises(FaultError, match="is ext2/ext3 of 262144 bytes, not the small tmpfs just mounted"):
        disk_full(NODE, r, 7, sleep=lambda _: None)
    changes = r.changes()
    assert not any(c.startswith("ln ") or "FLUSH" in c for c in changes)  # MariaDB never wrote there
    assert changes[-3:] == [f"nsenter --target=700 --mount -- umount {MNT}", f"rmdir {MNT}",
                            "rmdir /var/lib/payctl-lab/node1/drill"]  # fmt: skip


def test_an_undo_step_that_fails_is_an_error_naming_what_is_left() -> None:
    r = BinlogRunner(fail=("umount",))
    with pytest.raises(FaultError) as exc:
        disk_full(NODE, r, 7, sleep=lambda _: None)
    assert "the disk-full fault was not fully undone: umount" in exc.value.message
    assert "nsenter --target=700 --mount" in (exc.value.hint or "")
    assert not any(c[0] == "rmdir" for c in r.calls)  # never remove a directory something is still mounted on


def test_a_copy_that_fails_leaves_the_tmpfs_mounted_and_says_so() -> None:
    r = BinlogRunner(fail=("cp --preserve",))
    with pytest.raises(FaultError, match="copy the binlog back: cp"):
        disk_full(NODE, r, 7, sleep=lambda _: None)
    assert not any("umount" in c for c in r.calls) and not any(c[0] == "mv" for c in r.calls)


def test_sizes_are_bounded_and_binlog_names_advance() -> None:
    with pytest.raises(FaultError, match="tmpfs sizes must be"):
        disk_full(NODE, BinlogRunner(), 7, small=1024, grown=512 * 1024 * 1024)
    assert next_binlog("mysql-bin.000007") == "mysql-bin.000008"
    assert next_binlog("mysql-bin.999999") == "mysql-bin.1000000"
    with pytest.raises(FaultError, match="unexpected binlog file name"):
        next_binlog("mysql-bin")
