"""`payctl restore --force` without a lab: the plan an operator reads, the refusals, the confirmation, and the swap's
order of steps and its undo on failure, through a fake ``SwapNodes`` (the seam payctl owns: commands, program
control and health; SSH + supervisorctl in a deployment). The datadir moves themselves run in a real shell on real
directories; the binlog/GTID step against a real MariaDB is in test_restore_swap_mariadb.py."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from payctl import backup, restore, restoreswap
from payctl.cli import run
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.restoreswap import SwapFailed, SwapPlan, SwapRefused

MANIFEST = backup.Manifest("20261125T170312Z", "lab", "2026-11-25T17:03:12+00:00", "2026-11-25T17:03:18+00:00",
                           "node1", "primary", "0-1-310", "mysql-bin.000003", 385, ("mysql-bin.000003",),
                           (backup.FileEntry(backup.BASE, 1, "a" * 64),))  # fmt: skip
UNTIL = datetime(2026, 11, 25, 17, 5, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 25, 18, 0, 0, tzinfo=UTC)
DAYS = (date(2026, 11, 26), date(2026, 11, 26))


def lab_plan(prefix: str | None = None) -> SwapPlan:
    sp = restoreswap.make_swap_plan(make_plan(load_inventory("lab-1node"), load_phase(4)), MANIFEST, UNTIL, None,
                                    NOW, lab=True)  # fmt: skip
    if prefix is None:
        return sp
    datadir = f"{prefix}/data/mariadb"
    return SwapPlan(**{**sp.__dict__, "prefix": prefix, "datadir": datadir, "kept": f"{datadir}.replaced-X",
                       "failed": f"{datadir}.restore-failed-X", "scratch": f"{prefix}/restore/{MANIFEST.id}"})


def test_the_plan_says_what_stops_what_is_replaced_and_where_the_old_datadir_is_kept() -> None:
    sp = lab_plan()
    p = "/var/lib/payctl-lab/node1"
    writers = ("payctl-app", "payctl-relay", "payctl-consumer", "payctl-reconcile", "payctl-backup")
    assert sp.writers == (("node1", writers),)
    assert restoreswap.describe(sp) == [
        "restore --force on deployment 'lab': backup 20261125T170312Z up to 2026-11-25 17:05:30 UTC REPLACES the "
        "data of the MariaDB primary node1",
        "  1. restore into a scratch instance on node1:3307 while the deployment serves; stop here unless its "
        "ledger and reconciliation are balanced",
        "  2. stop the writers (node1: payctl-app, payctl-relay, payctl-consumer, payctl-reconcile, payctl-backup): "
        "payments fail from here until step 6",
        "  3. stop payctl-mariadb on node1",
        f"  4. keep the old datadir {p}/data/mariadb as {p}/data/mariadb.replaced-20261125T180000Z (never deleted); "
        "move the restored one in",
        "  5. start payctl-mariadb: binlog files and GTID sequence continue after the old server's; check payments, "
        "ledger and payapp reconcile",
        "  6. start the writers; health of every node",
        "  payments committed after 2026-11-25 17:05:30 UTC are NOT in the restored data; replicas: none",
        "  a failure after step 2 puts the old datadir back and starts everything again",
    ]


def test_a_deployment_with_replicas_or_another_node_is_refused() -> None:
    plan = make_plan(load_inventory("lab-2node"), load_phase(5))
    with pytest.raises(SwapRefused) as exc:
        restoreswap.make_swap_plan(plan, MANIFEST, UNTIL, None, NOW, lab=True)
    assert exc.value.message == ("deployment 'lab' has MariaDB replicas (node2): they hold the old data and would "
                                 "diverge from a restored primary")  # fmt: skip
    assert "docs/operations.md, 'Restore with replicas'" in exc.value.hint and exc.value.exit_code == 2
    with pytest.raises(SwapRefused) as exc:
        restoreswap.make_swap_plan(make_plan(load_inventory("lab-1node"), load_phase(4)), MANIFEST, UNTIL, "node2",
                                   NOW, lab=True)  # fmt: skip
    assert exc.value.message.startswith("--force replaces the primary's data: --node must be node1")


class FakeNodes:
    """Records every call; answers the swap's queries like a node would; ``fail`` makes one step fail."""

    def __init__(self, fail: str = "", figures: str = "25\t25\n25000\t25000\n", put_back_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.figures = figures
        self.put_back_fails = put_back_fails
        self.health = [fail != "health", True]

    def run(self, node: str, command: str) -> tuple[bool, str, str]:
        kind = ("scratch-stop" if "kill -0" in command and "ibdata1" in command else
                "swap" if command.startswith("set -e; test ! -e") else
                "put-back" if "[ -e" in command and "exit 0;" in command else
                "prime" if "--skip-networking" in command else
                "state" if "gtid_binlog_state" in command else
                "figures" if "ledger_entry" in command else
                "reconcile" if " reconcile " in command else
                "wait" if "SELECT 1" in command else
                "rm-scratch" if command.startswith("rm -rf") else command)  # fmt: skip
        if kind == "state":
            kind = "state-new" if any(c == "run node1 prime" for c in self.calls) else "state-old"
        self.calls.append(f"run {node} {kind}")
        if kind == "put-back" and self.put_back_fails:
            return False, "", "put-back broke"
        if kind == self.fail:
            self.fail = ""  # once: the undo must be able to do the same step
            return False, "", f"{kind} broke"
        return True, {
            "state-old": "0-1-480\nmysql-bin.000007\t1234\t\t\n",
            "state-new": "0-1-480\nmysql-bin.000009\t351\t\t\n",
            "figures": self.figures,
            "reconcile": "report 7 2026-11-26 balanced=true debit=25000 credit=25000 payments=25 captures=0 "
                         "mismatched=-\n",
        }.get(kind, ""), ""  # fmt: skip

    def programs(self, node: str, verb: str, programs: tuple[str, ...]) -> None:
        self.calls.append(f"{verb} {node} {','.join(programs)}")
        if self.fail == f"{verb} {','.join(programs)}":
            self.fail = ""
            raise restoreswap.PayctlError(f"{node}: supervisorctl {verb} failed")

    def healthy(self, timeout_s: float) -> tuple[bool, str]:
        self.calls.append("health")
        ok = self.health.pop(0)
        return ok, "" if ok else "node1 app: /health 503"


def restored(balanced: bool = True) -> restore.RestoreResult:
    r = restore.RestoreResult(MANIFEST.id, "node1", 3307, "/s", UNTIL, MANIFEST.gtid, payments=25, last_payment_id=25,
                              total_debit=25000, total_credit=25000 if balanced else 24000, reconciled=balanced)
    return r


WRITERS = "payctl-app,payctl-relay,payctl-consumer,payctl-reconcile,payctl-backup"


def test_the_swap_stops_writers_first_and_starts_them_last() -> None:
    nodes = FakeNodes()
    r = restoreswap.swap(lab_plan(), restored(), DAYS, nodes)
    assert r.applied and r.rolled_back is None
    assert nodes.calls == [
        "run node1 scratch-stop", f"stop node1 {WRITERS}", "run node1 state-old", "stop node1 payctl-mariadb",
        "run node1 swap", "run node1 prime", "start node1 payctl-mariadb", "run node1 wait", "run node1 state-new",
        "run node1 figures", "run node1 reconcile", f"start node1 {WRITERS}", "health", "run node1 rm-scratch",
    ]
    assert (r.old_gtid_state, r.first_binlog, r.payments, r.reconciled) == ("0-1-480", "mysql-bin.000009", 25, True)


@pytest.mark.parametrize("fail", ["health", "figures", "reconcile", "prime", "swap", "start payctl-mariadb",
                                  "stop payctl-mariadb"])  # fmt: skip
def test_any_failure_after_the_stop_puts_the_old_datadir_back_and_starts_everything(fail: str) -> None:
    nodes = FakeNodes(fail=fail, figures="24\t24\n24000\t24000\n" if fail == "figures" else "25\t25\n25000\t25000\n")
    if fail == "figures":
        nodes.fail = ""
    with pytest.raises(SwapFailed) as exc:
        restoreswap.swap(lab_plan(), restored(), DAYS, nodes)
    msg = exc.value.message
    assert msg.startswith("restore --force failed: ")
    p = "/var/lib/payctl-lab/node1/data/mariadb"
    assert msg.endswith(f"the old datadir is back in service at {p} and the deployment is healthy (the restored data "
                        f"is kept in {p}.restore-failed-20261125T180000Z)"), msg  # fmt: skip
    undo = nodes.calls[nodes.calls.index("run node1 put-back") - 2:]
    assert undo == [f"stop node1 {WRITERS}", "stop node1 payctl-mariadb", "run node1 put-back",
                    "start node1 payctl-mariadb", "run node1 wait", f"start node1 {WRITERS}", "health"]
    assert "run node1 rm-scratch" not in nodes.calls


def test_a_failed_put_back_says_so() -> None:
    nodes = FakeNodes(fail="health", put_back_fails=True)
    with pytest.raises(SwapFailed) as exc:
        restoreswap.swap(lab_plan(), restored(), DAYS, nodes)
    assert "putting the old datadir back did not fully work: moving " in exc.value.message
    assert "the old datadir is never deleted" in exc.value.hint


def test_nothing_stops_when_the_restore_is_unbalanced_or_the_scratch_server_will_not_stop() -> None:
    nodes = FakeNodes()
    with pytest.raises(SwapRefused) as refused:
        restoreswap.swap(lab_plan(), restored(balanced=False), DAYS, nodes)
    assert "not balanced" in refused.value.message and "nothing was stopped" in refused.value.message
    assert nodes.calls == []
    nodes = FakeNodes(fail="scratch-stop")
    with pytest.raises(SwapFailed, match="stopping the scratch server failed"):
        restoreswap.swap(lab_plan(), restored(), DAYS, nodes)
    assert nodes.calls == ["run node1 scratch-stop"]


def bash(command: str) -> tuple[bool, str, str]:
    p = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    return p.returncode == 0, p.stdout, p.stderr


def test_the_datadir_moves_on_real_directories(tmp_path: Path) -> None:
    sp = lab_plan(str(tmp_path))
    old, new = Path(sp.datadir), Path(sp.scratch) / "data"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "ibdata1").write_text("old")
    (new / "ibdata1").write_text("restored")
    old.chmod(0o750)
    new.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(old, 1234, 1234)
    assert bash(restoreswap.swap_command(sp))[0]
    assert (old / "ibdata1").read_text() == "restored" and Path(sp.kept, "ibdata1").read_text() == "old"
    assert old.stat().st_mode & 0o777 == 0o750
    if os.geteuid() == 0:
        assert (old.stat().st_uid, (old / "ibdata1").stat().st_uid) == (1234, 1234)
    ok = bash(restoreswap.swap_command(sp))[0]  # a second swap would overwrite the kept datadir: refused
    assert not ok and Path(sp.kept, "ibdata1").read_text() == "old"
    assert bash(restoreswap.put_back_command(sp))[0]
    assert (old / "ibdata1").read_text() == "old" and Path(sp.failed, "ibdata1").read_text() == "restored"
    assert bash(restoreswap.put_back_command(sp))[0]  # nothing kept any more: changes nothing
    assert (old / "ibdata1").read_text() == "old"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    return tmp_path


def test_cli_refusals_before_any_host(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    argv = ["restore", "-i", "lab-1node", "--backup", MANIFEST.id, "--force"]
    assert run(argv) == 2  # no terminal, no --yes: refused before anything is contacted
    err = capsys.readouterr().err
    assert "error: payctl restore --force replaces the primary's data and asks first, but stdin is not a " in err
    assert "hint: add --yes to go ahead without asking, or --dry-run to only see the plan" in err
    assert run([*argv, "--discard", "--yes"]) == 2
    assert "error: --force and --discard do not go together" in capsys.readouterr().err
    assert run(["restore", "-i", "lab-1node", "--backup", MANIFEST.id, "--dry-run", "--yes"]) == 2
    assert "error: --dry-run goes with --force" in capsys.readouterr().err
    assert run([*argv, "--port", "3306", "--yes"]) == 2
    assert "error: --port 3306 is the live MariaDB's" in capsys.readouterr().err


class Terminal:
    """stdin of an operator at a terminal, typing ``answer``."""

    def __init__(self, answer: str) -> None:
        self.lines = [answer + "\n"]

    def isatty(self) -> bool:
        return True

    def readline(self, *_: object) -> str:
        return self.lines.pop(0) if self.lines else ""


@pytest.mark.parametrize(("typed", "runs"), [("lab", True), ("yes", False), ("", False)])
def test_the_typed_confirmation_is_the_deployment_name(typed: str, runs: bool, home: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The plan is printed before the question; only the deployment's name goes ahead (prepare and run_force, the
    parts that reach hosts, are replaced: both are payctl's own)."""
    sp = lab_plan()
    prep = restoreswap.Prepared(sp, MANIFEST, make_plan(load_inventory("lab-1node"), load_phase(4)), 4, "Asia/Seoul")
    ran: list[restoreswap.ForceRequest] = []
    monkeypatch.setattr(restoreswap, "prepare", lambda req: prep)

    def fake_run(req: restoreswap.ForceRequest, p: restoreswap.Prepared, hooks: object) -> object:
        ran.append(req)
        done = restoreswap.SwapResult(sp, True, None, "0-1-480", "mysql-bin.000009", 25, 25, 25000, 25000,
                                      ["report 7 2026-11-26 balanced=true debit=25000 credit=25000 payments=25"],
                                      True, 12.34)  # fmt: skip
        return restored(), done

    monkeypatch.setattr(restoreswap, "run_force", fake_run)
    monkeypatch.setattr("sys.stdin", Terminal(typed))
    code = run(["restore", "-i", "lab-1node", "--backup", MANIFEST.id, "--until", UNTIL.isoformat(), "--force"])
    out = capsys.readouterr().out
    assert out.index("REPLACES the data of the MariaDB primary node1") < out.index("type the deployment name (lab)")
    if runs:
        assert code == 0 and len(ran) == 1
        assert ran[0].command == ("payctl restore -i lab-1node --backup 20261125T170312Z --force --until "
                                  "2026-11-25T17:05:30+00:00")  # fmt: skip
        kept = "/var/lib/payctl-lab/node1/data/mariadb.replaced-20261125T180000Z"
        assert out.splitlines()[-6:] == [
            "in service on node1: backup 20261125T170312Z up to -; 25 payments, last payment id 25, ledger debit "
            "25000 credit 25000",
            "  reconcile (in service): report 7 2026-11-26 balanced=true debit=25000 credit=25000 payments=25",
            f"  old datadir kept as {kept}",
            "  binlog continues in mysql-bin.000009, GTIDs after 0-1-480 (none of the old timeline reused)",
            "  writers out of service 12.3 s; every node healthy",
            "  next: take a backup of the new timeline: payctl backup -i lab-1node --yes",
        ]
    else:
        assert code == 1 and not ran and "nothing changed (aborted)" in out
