"""The deploy engine against a real lab host (lab-1node: netns + sshd + cgroup, real MariaDB, Redis, Kafka, nginx).

One module-scoped lab; the tests run in file order: a host already running something on 3306 is refused before any
change → phase 1 apply → a payment through nginx → re-apply is a no-op → kill -9 of the app's master → concurrent
apply fails on the lock → bad key / unreachable → missing secrets refused → phase 3 on top, interrupted with Ctrl-C
(SIGINT) half-way, then the same command completes it → status/logs → TLS turned on and off again → down, then lab
down leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from payctl import lab, lock, operate
from payctl.cli import run
from payctl.inventory import Inventory, load_inventory
from tests.support.labs import exclusive_lab
from tests.support.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PREFIX = Path("/var/lib/payctl-lab/node1")
CONF = PREFIX / "supervisor" / "supervisord.conf"
APPLY = ["phase1", "apply", "-i", "lab-1node", "--yes", "--no-verify"]
REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = PREFIX / "payctl" / "lock.json"
SQUATTER = (
    "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('0.0.0.0', 3306)); s.listen(); print('listening', flush=True); time.sleep(600)"
)


@dataclass(frozen=True)
class Deployed:
    home: Path
    inventory: Inventory


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (CI runs them as root)")
    home = tmp_path_factory.mktemp("payctl-home")
    inv = load_inventory("lab-1node")
    old_home = os.environ.get("PAYCTL_HOME")
    os.environ["PAYCTL_HOME"] = str(home)
    # A snapshot of app/: the no-change re-apply must not see edits made to the checkout while the module runs.
    source = home / "app-source"
    shutil.copytree(Path(__file__).resolve().parents[2] / "app", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # fmt: skip
    os.environ["PAYCTL_APP_SOURCE"] = str(source)
    with exclusive_lab(timeout=1200):
        try:
            lab.lab_up(inv, home)
            yield Deployed(home, inv)
        finally:
            try:
                lab.lab_down(inv, home)
            finally:
                os.environ.pop("PAYCTL_APP_SOURCE", None)
                if old_home is None:
                    os.environ.pop("PAYCTL_HOME", None)
                else:
                    os.environ["PAYCTL_HOME"] = old_home


def programs() -> dict[str, tuple[str, int | None]]:
    out = subprocess.run(["supervisorctl", "-c", str(CONF), "status"], capture_output=True, text=True).stdout
    states: dict[str, tuple[str, int | None]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("payctl-"):
            pid = int(parts[3].rstrip(",")) if len(parts) > 3 and parts[2] == "pid" else None
            states[parts[0]] = (parts[1], pid)
    return states


def http(method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def healthy() -> bool:
    try:
        return http("GET", "http://10.77.0.11/health")[1].get("status") == "ok"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def last_audit(home: Path) -> dict[str, object]:
    lines = (home / "lab" / "audit.jsonl").read_text().splitlines()
    return dict(json.loads(lines[-1]))


def test_a_host_already_running_something_on_3306_is_refused_before_any_change(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace = lab.layout(deployed.inventory)[0].namespace
    squatter = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", SQUATTER],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "listening"
        started = time.monotonic()
        rc = run(APPLY)
        took = time.monotonic() - started
        err = capsys.readouterr().err
    finally:
        squatter.kill()
        squatter.wait(timeout=10)
    assert rc == 1, err
    assert (
        f'error: node1: port 3306 on 10.77.0.11 (mariadb) is already taken by "python3" (pid {squatter.pid}), '
        "listening on 0.0.0.0:3306\n" in err.replace("python3.11", "python3")
    ), err
    assert "hint: payctl never takes over a port it did not open" in err
    assert took < 60, took  # refused up front, not after a health-check timeout
    # Nothing was written: no config, no supervisor, no deployment marker; the lock is released.
    assert not (PREFIX / "mariadb" / "my.cnf").exists() and not (PREFIX / "supervisor" / "supervisord.conf").exists()
    assert not (PREFIX / "payctl" / "deployment.json").exists() and not LOCK_FILE.exists()
    assert last_audit(deployed.home)["result"] == "failed"


def test_phase1_apply_serves_a_payment_through_nginx(deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(APPLY)
    out = capsys.readouterr()
    assert rc == 0, out.err + out.out
    assert "run      initialise the MariaDB datadir (mariadb-install-db, once)" in out.out
    assert "applied phase 1 to lab" in out.out
    states = programs()
    assert {"payctl-mariadb", "payctl-redis", "payctl-kafka", "payctl-nginx", "payctl-app"} <= set(states)
    assert all(s == "RUNNING" for s, _ in states.values()), states
    # Started over SSH: inside the node's cgroup, with data under the node's prefix (never /var/lib/mysql).
    app_pid = states["payctl-app"][1]
    assert app_pid is not None
    assert ":memory:/payctl-lab/lab-node1\n" in Path(f"/proc/{app_pid}/cgroup").read_text()
    assert (PREFIX / "data" / "mariadb" / "mysql").is_dir()
    assert oct((deployed.home / "lab" / "secrets.yml").stat().st_mode & 0o777) == "0o600"
    assert oct((PREFIX / "app.env").stat().st_mode & 0o777) == "0o600"
    key = uuid.uuid4().hex
    code, body = http(
        "POST",
        "http://10.77.0.11/payments/authorize",
        {"merchantId": "m-deploy-test", "amount": 1500, "currency": "KRW", "idempotencyKey": key},
    )
    assert code in (200, 201), body
    assert body.get("merchantId") == "m-deploy-test" and body.get("amount") == 1500, body
    assert body.get("paymentId")
    record = last_audit(deployed.home)
    assert record["result"] == "ok" and record["phase"] == 1 and "node1/app.env" in record["changed_files"]  # type: ignore[operator]
    node_record = json.loads((PREFIX / "payctl" / "audit.jsonl").read_text().splitlines()[-1])
    assert node_record == record
    secrets_text = (deployed.home / "lab" / "secrets.yml").read_text()
    for value in [ln.split(": ", 1)[1] for ln in secrets_text.splitlines() if ln.startswith("  ")]:
        assert value not in json.dumps(record)


def test_reapply_with_nothing_changed_changes_no_file_and_restarts_nothing(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    before = programs()
    rc = run(APPLY)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "phase 1 on deployment lab: nothing to change" in out.out
    record = last_audit(deployed.home)
    assert record["result"] == "ok"
    assert record["changed_files"] == [] and record["restarted"] == []
    assert programs() == before  # same pids: nothing restarted


def test_kill9_of_the_app_master_is_restarted_and_leaves_no_orphan_worker(deployed: Deployed) -> None:
    state, master = programs()["payctl-app"]
    assert state == "RUNNING" and master is not None
    workers = children(master)
    assert workers, "payapp serve should have worker processes"
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: not any(alive(w) for w in workers), timeout=15, what="the old workers to exit")
    wait_until(lambda: programs()["payctl-app"][0] == "RUNNING" and programs()["payctl-app"][1] != master,
               timeout=30, what="supervisor to restart payctl-app")  # fmt: skip
    wait_until(healthy, timeout=30, what="/health through nginx")


def test_a_drifted_config_is_restored_and_restarts_only_its_reader(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = PREFIX / "redis" / "redis.conf"
    before = programs()
    conf.write_text(conf.read_text() + "# edited by hand on the node\n")
    rc = run(APPLY)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "restart  payctl-redis" in out.out and "-# edited by hand on the node" in out.out  # diff shown
    record = last_audit(deployed.home)
    assert record["changed_files"] == ["node1/redis/redis.conf"]
    assert record["restarted"] == ["node1/payctl-redis"]
    after = programs()
    assert after["payctl-redis"][1] != before["payctl-redis"][1]
    assert {k: v for k, v in after.items() if k != "payctl-redis"} == {
        k: v for k, v in before.items() if k != "payctl-redis"
    }
    assert "# edited by hand" not in conf.read_text()


def test_a_second_concurrent_apply_fails_on_the_lock(deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    lock_file = PREFIX / "payctl" / "lock.json"
    env = {**os.environ, "PAYCTL_HOME": str(deployed.home)}
    first = subprocess.Popen([str(Path(sys.executable).parent / "payctl"), *APPLY], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until(lock_file.exists, timeout=60, what="the first apply to take the lock")
        rc = run(APPLY)
        err = capsys.readouterr().err
        assert rc == 1
        assert "error: deployment 'lab' is locked on node1:" in err and "payctl phase1 apply -i lab-1node" in err
        assert "payctl lock release -i INV" in err
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert not lock_file.exists()


def test_stale_lock_status_release_and_break_lock(deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    def node_shell(command: str) -> tuple[bool, str, str]:  # lab hosts share this filesystem
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
        return proc.returncode == 0, proc.stdout, proc.stderr

    stale = lock.new_info("lab", "payctl phase1 apply (killed)")
    lock.acquire(node_shell, str(PREFIX), stale, node="node1")
    assert run(["lock", "status", "-i", "lab-1node"]) == 0
    assert "locked on node1 by" in capsys.readouterr().out
    assert run(["lock", "release", "-i", "lab-1node", "--yes"]) == 0
    assert "released the lock of" in capsys.readouterr().out
    assert lock.status(node_shell, str(PREFIX)) is None
    lock.acquire(node_shell, str(PREFIX), stale, node="node1")
    assert run([*APPLY, "--break-lock"]) == 0
    assert "broke the deploy lock of" in capsys.readouterr().out
    assert lock.status(node_shell, str(PREFIX)) is None


def test_dry_run_on_the_lab_reads_real_facts_and_changes_nothing(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    audit_lines = len((deployed.home / "lab" / "audit.jsonl").read_text().splitlines())
    assert run(["phase1", "apply", "-i", "lab-1node", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: operations phase 1 would run" in out and "write app.env  (no change)" in out
    assert "phase 1 on deployment lab: nothing to change" in out
    assert len((deployed.home / "lab" / "audit.jsonl").read_text().splitlines()) == audit_lines


def _variant(deployed: Deployed, tmp_path: Path, **ssh: object) -> Path:
    data = yaml_load(Path(__file__).resolve().parents[2] / "inventories" / "lab-1node.yml")
    data["nodes"][0]["ssh"].update(ssh)
    path = tmp_path / "variant.yml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def yaml_load(path: Path) -> dict:  # type: ignore[type-arg]
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def test_bad_key_and_unreachable_host_are_named(
    deployed: Deployed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    rc = run(["phase1", "apply", "-i", str(_variant(deployed, tmp_path, key=str(other))), "--yes", "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: cannot connect to node1 (root@10.77.0.11:22)" in err and "hint: the host rejected the key" in err
    rc = run(["phase1", "apply", "-i", str(_variant(deployed, tmp_path, port=2222)), "--yes", "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: cannot connect to node1 (root@10.77.0.11:2222)" in err


def test_missing_local_secrets_for_a_live_deployment_is_refused(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = deployed.home / "lab" / "secrets.yml"
    aside = secrets.with_name("secrets.yml.aside")
    shutil.move(secrets, aside)
    try:
        rc = run(APPLY)
        err = capsys.readouterr().err
        assert rc == 1
        assert "error: deployment 'lab' already runs on its hosts but the secrets file is missing" in err
        assert "restore" in err and not secrets.exists()
    finally:
        shutil.move(aside, secrets)


def test_phase3_on_top_interrupted_with_ctrl_c_then_the_same_command_completes_it(
    deployed: Deployed, capsys: pytest.CaptureFixture[str]
) -> None:
    phase3 = ["phase3", "apply", "-i", "lab-1node", "--yes", "--no-verify"]
    env = {**os.environ, "PAYCTL_HOME": str(deployed.home)}
    # SIGINT back to its default in the child: a suite started as a shell's background job (or an xdist worker of
    # one) passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler; a person's payctl has it.
    first = subprocess.Popen([str(Path(sys.executable).parent / "payctl"), *phase3], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        # Interrupt once the apply has written phase 3's supervisor config (the consumer program): half-applied.
        wait_until(lambda: "payctl-consumer" in CONF.read_text(), timeout=240, what="phase 3's supervisor config")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
    lock_file = PREFIX / "payctl" / "lock.json"
    if first.returncode == 0:  # the apply finished before the signal landed: nothing was interrupted
        pytest.fail(f"the phase 3 apply ended before SIGINT reached it; nothing was tested:\n{out[-2000:]}")
    assert first.returncode == 130, (out, err)
    assert not lock_file.exists()  # released on the way out
    record = last_audit(deployed.home)
    assert (record["result"], record["error"]) == ("failed", "interrupted (SIGINT) during the apply")
    # No traceback (gevent printed the interrupted greenlet's before hosts.connect told its hub that KeyboardInterrupt
    # is not an error to print), and one clear line (typer used to turn the interrupt into a silent exit 130).
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "error: interrupted (Ctrl-C) during payctl phase3 apply\n" in err, err
    # The same command completes the job.
    rc = run(phase3)
    out2 = capsys.readouterr()
    assert rc == 0, out2.err + out2.out
    states = programs()
    assert states.get("payctl-consumer", ("absent", None))[0] == "RUNNING", states
    assert states.get("payctl-reconcile", ("absent", None))[0] == "RUNNING", states  # the hourly reconciliation
    assert healthy()
    assert last_audit(deployed.home)["phase"] == 3 and last_audit(deployed.home)["result"] == "ok"


def test_status_and_logs(deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["status", "-i", "lab-1node", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    node = doc["nodes"][0]
    assert node["reachable"] and node["health"] == "ok" and node["roles"]["mariadb"].startswith("primary")
    assert {p["name"]: p["state"] for p in node["programs"]}["payctl-app"] == "RUNNING"
    assert node["versions"]["payapp"]
    assert run(["logs", "-i", "lab-1node", "--component", "app", "-n", "5"]) == 0
    assert "node1| " in capsys.readouterr().out


def test_logs_follow_prints_lines_written_after_it_started(deployed: Deployed) -> None:
    # What `payctl logs -f` runs: over SSH, the last lines first, then only what was appended since.
    marker = f"follow-marker-{uuid.uuid4().hex}"
    chunks = operate.logs(deployed.inventory, deployed.home, True, node=None, component="app", lines=2, follow=True,
                          poll_s=0.2, max_polls=50)  # fmt: skip
    node, first = next(chunks)
    assert node == "node1" and first.startswith("==> payctl-app.log <==") and marker not in first
    with (PREFIX / "logs" / "payctl-app.log").open("a") as fh:
        fh.write(f"{marker}\n")
    later = next((text for _, text in chunks if marker in text), "")
    chunks.close()
    assert later.strip() == marker  # exactly the new line, without the old ones or a header


def test_tls_turned_on_in_a_lab_inventory_ships_a_generated_pair_and_serves_https(
    deployed: Deployed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((REPO / "inventories" / "lab-1node.yml").read_text())
    data["tls"] = {"enabled": True}
    inv_path = tmp_path / "lab-tls.yml"
    inv_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run(["phase1", "apply", "-i", str(inv_path), "--yes", "--no-verify"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "BEGIN" not in out and "PRIVATE KEY" not in out  # the key never shows in the preview
    assert "health node1: nginx → app /health ok" in out
    key = PREFIX / "nginx" / "tls" / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    local = deployed.home / "lab" / "tls"
    assert key.read_text() == (local / "server.key").read_text()
    assert (local / "server.key").stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(cafile=str(local / "server.crt"))  # the self-signed cert names 10.77.0.11
    with urllib.request.urlopen("https://10.77.0.11/health", timeout=5, context=ctx) as resp:
        assert json.loads(resp.read())["status"] == "ok"
        assert resp.headers["Strict-Transport-Security"] == "max-age=63072000"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open("http://10.77.0.11/health", timeout=5)
    assert redirect.value.code == 301 and redirect.value.headers["Location"] == "https://10.77.0.11/health"
    # Back to plain HTTP with the bundled inventory: nginx reloaded, no restart of anything else.
    assert run(APPLY) == 0, capsys.readouterr().err
    with urllib.request.urlopen("http://10.77.0.11/health", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_down_then_lab_down_leave_nothing_behind(deployed: Deployed, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["down", "-i", "lab-1node", "--yes"]) == 0
    assert "node1: stopped (data kept)" in capsys.readouterr().out
    assert not programs()  # supervisord is gone
    assert (PREFIX / "data" / "mariadb" / "mysql").is_dir()  # data kept
    lab.lab_down(deployed.inventory, deployed.home)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "pl-lab-node1" not in netns and "vpl-lab-node1" not in links
    assert not Path("/sys/fs/cgroup/memory/payctl-lab/lab-node1").exists()
    assert not PREFIX.exists()
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(PREFIX).encode() in _read(p)]
    assert leftovers == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""
