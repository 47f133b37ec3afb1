"""`payctl phaseN apply --dry-run` on the KT Cloud inventory: pyinfra's fake connector, operations printed, no host
contacted, no local state created; and the confirmation rule for non-interactive runs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from payctl.cli import run


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any socket connection attempt fails the test (recorded, then refused)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"dry run tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.mark.parametrize("phase", [1, 2, 3, 4])
def test_dry_run_prints_operations_and_contacts_nothing(
    phase: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_network: list[Any],
) -> None:  # fmt: skip
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    rc = run([f"phase{phase}", "apply", "-i", "ktcloud-1node", "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert no_network == []
    assert f"dry run (fake connector: no host contacted): operations phase {phase} would run" in out.out
    for op in ("Docker Engine + Compose v2", "write docker-compose.yml", "write mariadb/my.cnf",
               "docker compose up -d --wait"):  # fmt: skip
        assert op in out.out
    if phase >= 4:
        assert "write prometheus/prometheus.yml" in out.out
        # the Kafka container's JMX exporter agent (KAFKA_OPTS) goes next to its config, with its rules
        assert "Kafka JMX exporter agent kafka/jmx_prometheus_javaagent-" in out.out
        assert "write kafka/jmx-exporter.yml" in out.out
    else:
        assert "JMX exporter" not in out.out
    assert not (tmp_path / "ktcloud-pay" / "secrets.yml").exists()  # a dry run creates no deployment identity
    assert not (tmp_path / "ktcloud-pay" / "audit.jsonl").exists()


@pytest.mark.slow  # builds the payapp wheelhouse (pip wheel) in a fresh PAYCTL_HOME
def test_dry_run_of_a_native_vm_inventory_uses_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    src = Path(__file__).resolve().parents[2] / "inventories" / "ktcloud-1node.yml"
    inv = tmp_path / "vm-native.yml"
    inv.write_text(src.read_text().replace("runtime: compose", "runtime: native").replace("ktcloud-pay", "vm-pay"))
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path / "home"))
    rc = run(["phase1", "apply", "-i", str(inv), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "unit payctl-mariadb" in out.out and "systemd payctl-app" in out.out
    assert "stop and disable Debian's mariadb" in out.out
    assert "install payapp release 0001-" in out.out and "(pip --no-index), switch current to it" in out.out
    assert "write supervisor/supervisord.conf" not in out.out


def test_apply_without_yes_and_without_a_terminal_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    monkeypatch.setenv("PAYCTL_HOME", str(tmp_path))
    rc = run(["phase1", "apply", "-i", "ktcloud-1node"])  # pytest's stdin is not a terminal
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: payctl phase1 apply changes hosts and asks first, but stdin is not a terminal" in err
    assert "hint: add --yes to apply without asking, or --dry-run to only see what would change" in err
    assert no_network == []
