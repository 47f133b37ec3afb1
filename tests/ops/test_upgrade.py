"""Releases, the rolling upgrade's plan and its refusals, without a lab: release names and retention (pure), the
release shell steps run by /bin/sh on a temporary prefix (switch, prune, facts; install with a real venv and a real
wheel), the node order, nginx's upstream marked down, the plan a user is shown, and the CLI's refusals."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from payctl import releases, rolling, runtimes, upgrade
from payctl.cli import run
from payctl.errors import ConfigError, DeployError, PayctlError
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import Plan, make_plan
from payctl.render import render
from payctl.wheelhouse import MANIFEST

K1, K2, K3 = "1111111111111111", "2222222222222222", "3333333333333333"


def sh(command: str) -> str:
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def plan_of(inventory: str, phase: int) -> Plan:
    return make_plan(load_inventory(inventory), load_phase(phase))


# ------------------------------------------------------------------------------------------------ names, retention


def test_release_names_count_up_and_carry_the_wheelhouse_key() -> None:
    assert releases.next_name([], K1) == f"0001-{K1}"
    assert releases.next_name([f"0001-{K1}", f"0003-{K2}", "junk", f"0002-{K1}.tmp"], K3) == f"0004-{K3}"
    assert releases.next_name([f"0009-{K1}"], K1) == f"0010-{K1}"  # the same build again is a new release
    assert releases.parse(f"0012-{K2}") == releases.Release(12, K2)
    assert releases.parse("current") is None
    with pytest.raises(PayctlError):
        releases.next_name([], "not-a-key")


def test_previous_retention_and_prune() -> None:
    names = [f"000{i}-{K1}" for i in range(1, 6)]
    assert releases.previous(names, names[3]) == names[2]
    assert releases.previous(names, names[0]) is None
    assert releases.keep(names, names[3]) == [names[1], names[2], names[3]]  # KEEP_PREVIOUS = 2 below current
    assert releases.prune(names, names[3]) == [names[0], names[4]]  # a newer one (failed upgrade) goes too
    assert releases.keep(names, names[0]) == [names[0]]
    assert releases.KEEP_PREVIOUS >= 2


# ------------------------------------------------------------------------------------------------ shell steps


def fake_release(prefix: Path, name: str, manifest: str = "m  payapp.whl\n", complete: bool = True) -> None:
    d = prefix / releases.RELEASES / name
    (d / "bin").mkdir(parents=True)
    (d / "bin" / "payapp").write_text("#!/bin/sh\necho payapp\n")
    (d / "bin" / "payapp").chmod(0o755)
    if complete:
        (d / releases.RELEASE_MANIFEST).write_text(manifest)


def facts(prefix: Path) -> runtimes.NodeFacts:
    return runtimes.parse_facts(sh(runtimes.facts_script(str(prefix), "127.0.0.1")))


def test_switch_is_one_rename_and_replaces_a_legacy_venv(tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)  # the layout before releases
    fake_release(tmp_path, f"0001-{K1}", "first\n")
    fake_release(tmp_path, f"0002-{K2}", "second\n")
    fake_release(tmp_path, f"0003-{K3}", complete=False)  # a crashed install
    sh(releases.switch_command(str(tmp_path), f"0001-{K1}"))
    assert os.readlink(tmp_path / "current") == f"releases/0001-{K1}"
    assert os.readlink(tmp_path / "venv") == "current"
    f = facts(tmp_path)
    assert f.release_current == f"0001-{K1}" and f.release_ok
    assert f.release_manifest == hashlib.sha256(b"first\n").hexdigest()
    assert f.releases == (f"0001-{K1}", f"0002-{K2}")  # the incomplete one is not a release
    sh(releases.switch_command(str(tmp_path), f"0002-{K2}"))
    assert os.readlink(tmp_path / "current") == f"releases/0002-{K2}"
    assert (tmp_path / "venv" / "bin" / "payapp").read_text() == "#!/bin/sh\necho payapp\n"
    refused = subprocess.run(["sh", "-c", releases.switch_command(str(tmp_path), f"0003-{K3}")],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert refused.returncode != 0 and "not complete" in refused.stderr
    assert os.readlink(tmp_path / "current") == f"releases/0002-{K2}"


def test_prune_keeps_what_it_is_told_and_never_current(tmp_path: Path) -> None:
    for name in (f"0001-{K1}", f"0002-{K2}", f"0003-{K3}"):
        fake_release(tmp_path, name)
    fake_release(tmp_path, f"0004-{K1}", complete=False)
    (tmp_path / releases.RELEASES / ".0005-x.tmp").mkdir()
    sh(releases.switch_command(str(tmp_path), f"0002-{K2}"))
    sh(releases.prune_command(str(tmp_path), [f"0003-{K3}"]))  # current is not listed: kept anyway
    assert sorted(p.name for p in (tmp_path / releases.RELEASES).iterdir()) == [f"0002-{K2}", f"0003-{K3}"]
    sh(releases.prune_command(str(tmp_path / "nowhere"), []))  # no releases dir: nothing to do, no error


def tiny_wheel(directory: Path) -> Path:
    """A real (pure) payapp wheel with a console script; the release step installs it with pip --no-index."""
    files = {
        "payapp/__init__.py": "",
        "payapp/cli.py": "def main() -> None:\n    print('payapp ok')\n",
        "payapp-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: payapp\nVersion: 0.0.1\n",
        "payapp-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n",
        "payapp-0.0.1.dist-info/entry_points.txt": "[console_scripts]\npayapp = payapp.cli:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("payapp-0.0.1.dist-info/RECORD,,")
    path = directory / "payapp-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("payapp-0.0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.slow
def test_install_makes_a_complete_release_and_a_failed_one_is_not_listed(tmp_path: Path) -> None:
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    wheel = tiny_wheel(wh)
    (wh / MANIFEST).write_text(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    name = f"0001-{K1}"
    sh(releases.install_command(str(tmp_path), name, str(wh)) + " && " + releases.switch_command(str(tmp_path), name))
    assert sh(f"{tmp_path}/current/bin/payapp").strip() == "payapp ok"
    f = facts(tmp_path)
    assert f.releases == (name,) and f.release_ok
    assert f.release_manifest == runtimes.sha256_text((wh / MANIFEST).read_text())
    wheel.unlink()  # the next install finds no wheel: pip fails, no manifest copy, no release
    bad = subprocess.run(["sh", "-c", releases.install_command(str(tmp_path), f"0002-{K2}", str(wh))],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode != 0
    assert facts(tmp_path).releases == (name,)


# ------------------------------------------------------------------------------------------------ LB, order, plan


def test_upstream_down_touches_exactly_one_server_line() -> None:
    files = render(plan_of("lab-2node", 5))
    conf = next(f.text for f in files.values() if f.node == "node1" and f.path == "nginx/nginx.conf")
    down = rolling.with_upstream_down(conf, "10.77.0.12:8080")
    changed = [(a, b) for a, b in zip(conf.splitlines(), down.splitlines(), strict=True) if a != b]
    assert len(changed) == 1
    before, after = changed[0]
    assert before.strip().startswith("server 10.77.0.12:8080 ") and after == before[:-1] + " down;"
    assert rolling.with_upstream_down(down, "10.77.0.12:8080") == down  # already down: unchanged
    with pytest.raises(DeployError, match=r"0 upstream lines for 10\.77\.0\.13:8080"):
        rolling.with_upstream_down(conf, "10.77.0.13:8080")


def test_node_order_puts_the_lb_and_primary_node_last() -> None:
    assert upgrade.node_order(plan_of("lab-2node", 5)) == ("node2", "node1")
    assert upgrade.node_order(plan_of("ktcloud-2node", 5)) == ("node2", "node1")
    assert upgrade.node_order(plan_of("lab-1node", 3)) == ("node1",)


def live(current: str, *names: str) -> runtimes.NodeFacts:
    return runtimes.NodeFacts(python="3.11", release_current=current, releases=names or (current,))


def test_upgrade_plan_and_what_the_user_sees() -> None:
    facts_ = {"node1": live(f"0002-{K1}", f"0001-{K2}", f"0002-{K1}"), "node2": live(f"0001-{K1}")}
    up = upgrade.make_upgrade_plan("upgrade", plan_of("lab-2node", 5), facts_, phase=5, key=K3,
                                   source="/src/app", version="0.1.1")  # fmt: skip
    assert [(s.node, s.current, s.target, s.in_lb, s.migrate) for s in up.nodes] == [
        ("node2", f"0001-{K1}", f"0002-{K3}", True, True),
        ("node1", f"0002-{K1}", f"0003-{K3}", True, False),
    ]
    assert not up.in_place and up.lb == "node1" and up.primary == "node1"
    lines = upgrade.describe(up)
    assert lines[0] == (f"upgrade to payapp 0.1.1 (wheelhouse {K3}, from /src/app): deployment lab, phase 5, "
                        "node order node2, node1")  # fmt: skip
    assert lines[1] == (f"  1. [node2] install releases/0002-{K3}; payapp migrate (once); out of the LB (node1: "
                        "upstream 10.77.0.12:8080 down, nginx reload); drain and stop payctl-app, payctl-relay, "
                        f"payctl-consumer, payctl-reconcile; current 0001-{K1} -> 0002-{K3}; start, health check, "
                        "back into the LB")  # fmt: skip
    assert "payapp migrate" not in lines[2]
    assert any("expand now, contract in a later release" in line for line in lines)


def test_one_app_node_restarts_in_place() -> None:
    up = upgrade.make_upgrade_plan("upgrade", plan_of("lab-1node", 3), {"node1": live(f"0001-{K1}")}, phase=3, key=K2)
    assert up.in_place and [(s.in_lb, s.migrate) for s in up.nodes] == [(False, True)]
    assert any("no peer carries traffic" in n for n in up.notes)


def test_rollback_targets_the_previous_release_and_refuses_without_one() -> None:
    facts_ = {"node1": live(f"0003-{K2}", f"0001-{K1}", f"0002-{K1}", f"0003-{K2}"),
              "node2": live(f"0002-{K2}", f"0001-{K1}", f"0002-{K2}")}  # fmt: skip
    up = upgrade.make_upgrade_plan("rollback", plan_of("lab-2node", 5), facts_, phase=5)
    assert [(s.node, s.target, s.migrate) for s in up.nodes] == [("node2", f"0001-{K1}", False),
                                                                  ("node1", f"0002-{K1}", False)]  # fmt: skip
    facts_["node2"] = live(f"0001-{K1}")
    with pytest.raises(upgrade.UpgradeRefused) as err:
        upgrade.make_upgrade_plan("rollback", plan_of("lab-2node", 5), facts_, phase=5)
    assert err.value.message == f"node2 keeps no release older than 0001-{K1}: nothing to roll back to"
    assert err.value.exit_code == 2


def test_a_node_without_the_release_layout_is_refused() -> None:
    facts_ = {"node1": live(f"0001-{K1}"), "node2": runtimes.NodeFacts(python="3.11")}
    with pytest.raises(upgrade.UpgradeRefused, match="node2 has no payapp release"):
        upgrade.make_upgrade_plan("upgrade", plan_of("lab-2node", 5), facts_, phase=5, key=K2)


def test_version_is_a_git_ref_of_the_checkout() -> None:
    with upgrade.payapp_tree("HEAD") as (tree, source):
        assert (tree / "pyproject.toml").is_file() and (tree / "payapp" / "api.py").is_file()
        assert source.startswith("git HEAD (")
    with pytest.raises(ConfigError, match="no such tag, branch or commit"), upgrade.payapp_tree("no-such-ref-xyz"):
        pass


# ------------------------------------------------------------------------------------------------ CLI refusals


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["upgrade", "-i", "lab-2node"], 2,
         "error: payctl upgrade changes hosts and asks first, but stdin is not a terminal"),
        (["rollback", "-i", "ktcloud-2node", "--yes"], 2,
         "error: payctl rollback handles the native runtime; 'ktcloud-pay' runs compose"),
        (["upgrade", "-i", "lab-2node", "--yes"], 2,
         "error: no phase of 'lab' is recorded as applied in"),
    ],
)  # fmt: skip
def test_cli_refusals(argv: list[str], code: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    assert run(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "hint:" in err


# ------------------------------------------------------------------------------------------------ programs


def local_node(prefix: Path) -> rolling.NodeShell:
    """A NodeShell whose shell is /bin/sh on this machine (the seam a node's SSH shell fills)."""
    node = object.__new__(rolling.NodeShell)
    node.node, node.prefix, node.lab = "local", str(prefix), True

    def shell(command: str) -> tuple[bool, str, str]:
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=False)
        return proc.returncode == 0, proc.stdout, proc.stderr

    node.shell = shell
    node.host = LocalHost()  # type: ignore[assignment]
    return node


class LocalHost:
    """pyinfra Host.put_file's contract (a path or a file object -> the remote path), on this machine."""

    def put_file(self, src: object, remote: str) -> bool:
        data = Path(src).read_bytes() if isinstance(src, str) else src.read()  # type: ignore[attr-defined]
        Path(remote).write_bytes(data)
        return True


@pytest.mark.slow
def test_programs_start_in_parallel_and_errors_are_named(tmp_path: Path) -> None:
    """A real supervisord: three programs with startsecs=2 start in about 2 s (not 6: that time is out of the LB);
    stopping stopped programs is fine; a program that cannot start is an error naming it."""
    for d in ("supervisor", "logs", "run"):
        (tmp_path / d).mkdir()
    programs = "".join(f"\n[program:payctl-{n}]\ncommand=sleep 600\nautostart=false\nstartsecs=2\n"
                       for n in ("app", "relay", "consumer"))  # fmt: skip
    (tmp_path / "supervisor" / "supervisord.conf").write_text(
        "[supervisord]\nnodaemon=true\nlogfile=%(here)s/../logs/s.log\npidfile=%(here)s/../run/s.pid\n"
        "[unix_http_server]\nfile=%(here)s/../run/supervisor.sock\n[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        "[supervisorctl]\nserverurl=unix://%(here)s/../run/supervisor.sock\n" + programs
        + "\n[program:payctl-broken]\ncommand=/nonexistent/payapp\nautostart=false\nstartsecs=1\nstartretries=0\n"
    )
    sup = subprocess.Popen(["supervisord", "-c", str(tmp_path / "supervisor" / "supervisord.conf")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            if (tmp_path / "run" / "supervisor.sock").exists():
                break
            time.sleep(0.1)
        node = local_node(tmp_path)
        names = ("payctl-app", "payctl-relay", "payctl-consumer")
        node.programs("start", names)
        # Parallel, read from supervisord's own log (not a wall clock on this shared box): one after the other, each
        # waits startsecs=2 before the next is spawned, so the spawns would spread over 4 s or more.
        log = (tmp_path / "logs" / "s.log").read_text().splitlines()
        spawned = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in log if "spawned: 'payctl-" in line]
        assert len(spawned) == 3 and (max(spawned) - min(spawned)).total_seconds() < 1.9, spawned
        status = sh(f"supervisorctl -c {tmp_path}/supervisor/supervisord.conf status || true")
        assert status.count("RUNNING") == 3, status
        node.programs("stop", names)
        node.programs("stop", names)  # already stopped: "not running" is not an error
        with pytest.raises(DeployError, match="payctl-broken"):
            node.programs("start", ("payctl-broken",))
    finally:
        sup.terminate()
        sup.wait(30)


@pytest.mark.slow
def test_take_out_and_put_back_reload_a_real_nginx_and_restore_the_file_byte_for_byte(tmp_path: Path) -> None:
    from tests.support.services import free_port

    port, up1, up2 = free_port(), free_port(), free_port()
    nginx = tmp_path / "nginx"
    for d in ("logs", "run", "tmp"):
        (nginx / d).mkdir(parents=True)
    conf = nginx / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\npid run/nginx.pid;\nerror_log logs/error.log warn;\nevents { worker_connections 64; }\n"
        "http {\n    access_log off;\n    client_body_temp_path tmp/body;\n    proxy_temp_path tmp/proxy;\n"
        "    fastcgi_temp_path tmp/fastcgi;\n    uwsgi_temp_path tmp/uwsgi;\n    scgi_temp_path tmp/scgi;\n"
        f"    upstream payapp {{\n        server 127.0.0.1:{up1} max_fails=3 fail_timeout=10s;\n"
        f"        server 127.0.0.1:{up2} max_fails=3 fail_timeout=10s;\n    }}\n"
        f"    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://payapp; }} }}\n}}\n\n"
    )
    conf.chmod(0o640)
    original = conf.read_bytes()
    master = subprocess.Popen(["nginx", "-p", f"{nginx}/", "-c", str(conf), "-g", "daemon off;"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            if (nginx / "run" / "nginx.pid").exists():
                break
            time.sleep(0.1)
        workers = sh(f"ps -o pid= --ppid {master.pid}").split()
        node = local_node(tmp_path)
        assert rolling.take_out(node, f"127.0.0.1:{up2}", 10) == ""
        assert f"server 127.0.0.1:{up2} max_fails=3 fail_timeout=10s down;" in conf.read_text()
        assert oct(conf.stat().st_mode & 0o777) == "0o640"
        after = sh(f"ps -o pid= --ppid {master.pid}").split()
        assert after and not set(after) & set(workers)  # the old workers were waited for: all gone
        rolling.take_out(node, f"127.0.0.1:{up2}", 10)  # a re-run after an interrupted one keeps the original
        assert rolling.put_back(node, 10) == ""
        assert conf.read_bytes() == original
        assert not (nginx / "nginx.conf.payctl-keep").exists()
        bad = tmp_path / "bad"
        (bad / "nginx").mkdir(parents=True)
        bad_conf = "events {}\nhttp {\n upstream payapp {\n  server 127.0.0.1:1 junk=1;\n }\n}\n"
        (bad / "nginx" / "nginx.conf").write_text(bad_conf)
        with pytest.raises(DeployError, match="nginx -t"):
            rolling.take_out(local_node(bad), "127.0.0.1:1", 5)
        assert not (bad / "nginx" / "nginx.conf.payctl-new").exists()
    finally:
        master.terminate()
        master.wait(30)
