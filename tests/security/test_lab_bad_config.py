"""Bad situations on a real lab host (lab-1node): a host that already runs something on 3306, an apply interrupted
with Ctrl-C (SIGINT) in the middle, then the same command completing the job; and TLS turned on in a lab inventory
(the generated pair shipped, nginx serving HTTPS on 10.77.0.11).

One module-scoped lab, tests in file order, holding the machine's lab (tests.lab.conftest.exclusive_lab).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from payctl import lab
from payctl.cli import run
from payctl.inventory import load_inventory
from tests.lab.conftest import exclusive_lab
from tests.support.services import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path("/var/lib/payctl-lab/node1")
LOCK_FILE = PREFIX / "payctl" / "lock.json"
APPLY = ["phase1", "apply", "-i", "lab-1node", "--yes", "--no-verify"]
SQUATTER = (
    "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('0.0.0.0', 3306)); s.listen(); print('listening', flush=True); time.sleep(600)"
)


@dataclass(frozen=True)
class Lab:
    home: Path
    namespace: str


@pytest.fixture(scope="module")
def lab1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (CI runs them as root)")
    home = tmp_path_factory.mktemp("payctl-home")
    inv = load_inventory("lab-1node")
    saved = {k: os.environ.get(k) for k in ("PAYCTL_HOME", "PAYCTL_APP_SOURCE")}
    os.environ["PAYCTL_HOME"] = str(home)
    source = home / "app-source"
    shutil.copytree(REPO / "app", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    os.environ["PAYCTL_APP_SOURCE"] = str(source)
    try:
        with exclusive_lab():
            try:
                lab.lab_up(inv, home)
                yield Lab(home, lab.layout(inv)[0].namespace)
            finally:
                lab.lab_down(inv, home)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def last_audit(home: Path) -> dict[str, object]:
    return dict(json.loads((home / "lab" / "audit.jsonl").read_text().splitlines()[-1]))


def test_a_host_already_running_something_on_3306_is_refused_before_any_change(
    lab1: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    squatter = subprocess.Popen(["ip", "netns", "exec", lab1.namespace, sys.executable, "-c", SQUATTER],
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
    assert last_audit(lab1.home)["result"] == "failed"


def test_an_apply_interrupted_with_ctrl_c_releases_the_lock_and_the_same_command_completes(
    lab1: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "PAYCTL_HOME": str(lab1.home)}
    first = subprocess.Popen([str(Path(sys.executable).parent / "payctl"), *APPLY], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # Interrupt once the apply is writing files on the node: a genuinely half-applied phase.
        wait_until((PREFIX / "mariadb" / "my.cnf").exists, timeout=240, what="the apply to write files on node1")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
    assert first.returncode == 130, (out, err)
    assert not LOCK_FILE.exists()  # released on the way out
    record = last_audit(lab1.home)
    assert (record["result"], record["error"]) == ("failed", "interrupted (SIGINT) during the apply")
    # No traceback (gevent printed the interrupted greenlet's before hosts.connect told its hub that KeyboardInterrupt
    # is not an error to print), and one clear line (typer used to turn the interrupt into a silent exit 130).
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "error: interrupted (Ctrl-C) during payctl phase1 apply\n" in err, err
    # The same command completes the job.
    assert run(APPLY) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "health node1: nginx → app /health ok" in out
    with urllib.request.urlopen("http://10.77.0.11/health", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    assert last_audit(lab1.home)["result"] == "ok"


def test_tls_turned_on_in_a_lab_inventory_ships_a_generated_pair_and_serves_https(
    lab1: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
    local = lab1.home / "lab" / "tls"
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
