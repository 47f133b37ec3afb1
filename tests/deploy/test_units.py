"""The deploy engine's pure parts: the restart model, the lock (against a real shell), audit lines, fact parsing,
wheelhouse cache keys."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from payctl import audit, components, lock, runtimes, wheelhouse
from payctl.errors import LockHeld
from payctl.secrets import Secret, redact_text


def local_shell(command: str) -> tuple[bool, str, str]:
    """The lock's Shell seam, run by /bin/sh on this machine (what a node's shell does over SSH)."""
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=10, check=False)
    return proc.returncode == 0, proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------------ restart model


PROGRAMS = ("payctl-mariadb", "payctl-redis", "payctl-kafka", "payctl-nginx", "payctl-app", "payctl-relay")


def test_a_changed_config_restarts_only_the_programs_that_read_it() -> None:
    assert components.effects(["redis/redis.conf"], PROGRAMS) == components.Effects(("payctl-redis",), ())
    assert components.effects(["app.env"], PROGRAMS).restart == ("payctl-app", "payctl-relay")  # no consumer here
    assert components.effects(["nginx/nginx.conf"], PROGRAMS) == components.Effects((), ("payctl-nginx",))
    assert components.effects(["mariadb/users.sql", "nftables.conf", "redis/sentinel.conf"], PROGRAMS).any is False


def test_restart_wins_over_reload_and_order_follows_the_node() -> None:
    fx = components.effects([components.RELEASE, "mariadb/my.cnf", "kafka/server.properties"], PROGRAMS)
    assert fx.restart == ("payctl-mariadb", "payctl-kafka", "payctl-app", "payctl-relay")
    assert components.effects(["systemd/payctl-app.service"], ["payctl-app"]).restart == ("payctl-app",)


def test_supervisor_programs_and_only_filter() -> None:
    conf = "[supervisord]\nx=1\n\n[program:payctl-app]\ncommand=a\n[program:payctl-redis]\ncommand=b\n"
    assert components.supervisor_programs(conf) == ("payctl-app", "payctl-redis")
    paths = ["app.env", "redis/redis.conf", "nginx/nginx.conf"]
    assert components.files_for_component("redis", paths) == ["redis/redis.conf"]


# ------------------------------------------------------------------------------------------------ lock


def test_second_acquire_fails_naming_the_holder(tmp_path: Path) -> None:
    prefix = str(tmp_path)
    first = lock.new_info("lab", "payctl phase1 apply -i lab-1node")
    assert lock.acquire(local_shell, prefix, first, node="node1") is None
    second = lock.new_info("lab", "payctl phase3 apply -i lab-1node")
    with pytest.raises(LockHeld) as err:
        lock.acquire(local_shell, prefix, second, node="node1")
    assert "deployment 'lab' is locked on node1" in err.value.message
    assert "payctl phase1 apply -i lab-1node" in err.value.message
    assert "payctl lock release" in err.value.hint
    assert lock.status(local_shell, prefix) == first
    assert lock.release(local_shell, prefix, second) is False  # not the holder's token: kept
    assert lock.release(local_shell, prefix, first) is True
    assert lock.status(local_shell, prefix) is None


def test_break_lock_returns_the_stale_holder(tmp_path: Path) -> None:
    stale = lock.new_info("lab", "payctl phase1 apply (died)")
    lock.acquire(local_shell, str(tmp_path), stale, node="node1")
    mine = lock.new_info("lab", "payctl phase1 apply --break-lock")
    assert lock.acquire(local_shell, str(tmp_path), mine, node="node1", break_lock=True) == stale
    assert lock.status(local_shell, str(tmp_path)) == mine


def test_racing_acquires_have_exactly_one_winner(tmp_path: Path) -> None:
    results: list[str] = []

    def contend(i: int) -> None:
        try:
            lock.acquire(local_shell, str(tmp_path), lock.new_info("lab", f"apply {i}"), node="node1")
            results.append("won")
        except LockHeld:
            results.append("held")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held"] * 7 + ["won"]


# ------------------------------------------------------------------------------------------------ audit


def test_audit_line_is_json_with_secrets_redacted(tmp_path: Path) -> None:
    secret = Secret("s3cr3t-value-xyz")
    record = audit.AuditRecord(
        deployment="lab", command="payctl phase1 apply", phase=1, inventory="lab-1node.yml",
        inventory_sha256="ab", nodes=("node1",), result="failed", changed_files=("node1/app.env",),
        error="mysql://app:s3cr3t-value-xyz@10.77.0.11 refused",
    )  # fmt: skip
    line = record.line(lambda s: redact_text(s, [secret]))
    data = json.loads(line)
    assert "s3cr3t" not in line
    assert data["error"] == "mysql://app:********@10.77.0.11 refused"
    assert data["changed_files"] == ["node1/app.env"] and data["phase"] == 1 and data["who"]
    local = audit.append_local(tmp_path, record, lambda s: redact_text(s, [secret]))
    assert audit.read_local(tmp_path, "lab")[-1]["result"] == "failed"
    assert local == tmp_path / "lab" / "audit.jsonl"
    ok, _, err = local_shell(audit.append_command(str(tmp_path / "node"), line))
    assert ok, err
    node_log = tmp_path / "node" / "payctl" / "audit.jsonl"
    assert json.loads(node_log.read_text().splitlines()[-1]) == data
    assert stat.S_IMODE(os.stat(node_log).st_mode) == 0o600


# ------------------------------------------------------------------------------------------------ facts


def test_facts_script_reads_a_prefix(tmp_path: Path) -> None:
    (tmp_path / "data" / "mariadb" / "mysql").mkdir(parents=True)
    (tmp_path / "payctl").mkdir()
    (tmp_path / "payctl" / "deployment.json").write_text('{"deployment": "lab", "secrets": "abc"}\n')
    (tmp_path / "payctl" / "migrated").write_text("f00\n")
    (tmp_path / runtimes.PENDING).write_text("redis/redis.conf\nsupervisor/supervisord.conf\n")
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / wheelhouse.MANIFEST).write_text("x  a.whl\n")
    ok, out, err = local_shell(runtimes.facts_script(str(tmp_path), "127.0.0.1"))
    assert ok, err
    facts = runtimes.parse_facts(out)
    assert facts.mariadb_initialised and facts.live and not facts.kafka_formatted
    assert json.loads(facts.marker)["secrets"] == "abc"
    assert facts.migrated == "f00" and facts.supervisord_pid is None
    assert facts.bundles == {"wheelhouse": runtimes.sha256_text("x  a.whl\n")}
    assert facts.pending == ("redis/redis.conf", "supervisor/supervisord.conf")  # an interrupted apply's files
    assert runtimes.parse_facts("").live is False


# ------------------------------------------------------------------------------------------------ wheelhouse


def test_wheelhouse_key_follows_sources_and_python(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "pkg" / "__pycache__").mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\nname='x'\n")
    (app / "pkg" / "a.py").write_text("A = 1\n")
    (app / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    key = wheelhouse.cache_key(app, "3.11")
    assert [p.name for p in wheelhouse.source_files(app)] == ["pyproject.toml", "a.py"]
    (app / "pkg" / "__pycache__" / "b.pyc").write_bytes(b"more junk")
    assert wheelhouse.cache_key(app, "3.11") == key  # build artefacts do not count
    assert wheelhouse.cache_key(app, "3.12") != key
    (app / "pkg" / "a.py").write_text("A = 2\n")
    assert wheelhouse.cache_key(app, "3.11") != key


def test_state_script_reports_checksums_modes_and_directories(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a").write_text("hi\n")
    (tmp_path / "a").chmod(0o600)
    ok, out, err = local_shell(runtimes.state_script([str(tmp_path / "a"), str(tmp_path / "d"), str(tmp_path / "x")]))
    assert ok, err
    assert runtimes.parse_state(out) == {
        str(tmp_path / "a"): runtimes.sha256_text("hi\n") + " 600",
        str(tmp_path / "d"): "dir",
    }


def test_journal_follow_commands_continue_from_the_cursor() -> None:
    from payctl.operate import journal_command, split_cursor

    assert journal_command("payctl-app", 20, None) == (
        "journalctl -u payctl-app -n 20 --no-pager --show-cursor -o short-iso")
    assert journal_command("payctl-app", 20, "s=ab;i=3") == (
        "journalctl -u payctl-app --after-cursor='s=ab;i=3' --no-pager --show-cursor -o short-iso")  # quoted
    out = ("2026-11-25T10:00:00+0000 node1 payapp[1]: one\n2026-11-25T10:00:01+0000 node1 payapp[1]: two\n"
           "-- cursor: s=ab;i=4\n")
    assert split_cursor(out) == ("2026-11-25T10:00:00+0000 node1 payapp[1]: one\n"
                                 "2026-11-25T10:00:01+0000 node1 payapp[1]: two", "s=ab;i=4")  # fmt: skip
    assert split_cursor("-- No entries --\n") == ("", "")
