"""Load goes only to loopback or to an address of the inventory; everything else is refused before any packet."""

from __future__ import annotations

from typing import Any

import pytest

from payctl.cli import run
from payctl.errors import ConfigError
from payctl.gate import check_target, lb_url
from payctl.inventory import load_inventory


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost:9", "http://127.5.6.7", "http://[::1]:8080/"]
)
def test_loopback_is_always_allowed(url: str) -> None:
    t = check_target(url, None)
    assert t.loopback
    assert not t.url.endswith("/")


def test_inventory_addresses_are_allowed() -> None:
    inv = load_inventory("lab-2node")
    assert check_target("http://10.77.0.12:80", inv).host == "10.77.0.12"
    assert lb_url(inv) == "http://10.77.0.11"


@pytest.mark.parametrize(
    ("inventory", "url"),
    [
        (None, "http://10.77.0.11"),  # a lab address, but no inventory says so
        ("lab-1node", "http://10.77.0.12"),  # node2 is not in the 1-node inventory
        ("lab-2node", "http://198.51.100.7"),  # documentation address, in no lab inventory
        ("ktcloud-1node", "http://8.8.8.8"),
    ],
)
def test_other_addresses_are_refused(inventory: str | None, url: str) -> None:
    inv = load_inventory(inventory) if inventory else None
    with pytest.raises(
        ConfigError, match=r"refusing to send load to .*not loopback and not an address of the inventory"
    ):
        check_target(url, inv)


@pytest.mark.parametrize("url", ["http://example.com", "http://node1:80", "http://payments.internal"])
def test_names_are_refused_because_they_could_resolve_anywhere(url: str) -> None:
    with pytest.raises(ConfigError, match="only IP addresses are accepted"):
        check_target(url, load_inventory("lab-1node"))


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:8080", "http://"])
def test_non_http_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="not an http"):
        check_target(url, None)


def test_cli_refuses_with_exit_2_and_never_starts_k6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("run_load must not be reached")

    monkeypatch.setattr("payctl.verification.run_load", boom)
    rc = run(["verify", "-i", "lab-1node", "--url", "http://198.51.100.7", "--rps", "10", "--duration", "1s"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refusing to send load to 198.51.100.7" in err
    assert "10.77.0.11" in err  # the hint lists what is allowed


def test_load_generator_on_a_node_under_test_is_warned_about() -> None:
    # 127.0.0.1 is held by this machine; an inventory listing it would mean k6 runs on the node it measures.
    # Inventories reject loopback addresses, so use whatever non-loopback address this machine has, if any.
    import ipaddress
    import subprocess

    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]
    local = next((a for a in addrs if not ipaddress.ip_address(a).is_loopback), None)
    if local is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    from payctl.inventory import parse_inventory

    data = {
        "deployment": "t", "runtime": "native", "target_rps": 10,
        "nodes": [{"name": "node1", "private_address": local, "ssh": {"key": "k"}, "cpus": 1, "memory_gb": 1,
                   "disk_gb": 5, "roles": ["app", "consumer", "mariadb", "redis", "kafka", "lb"]}],
    }  # fmt: skip
    t = check_target(f"http://{local}", parse_inventory(data))
    assert any("runs on a node under test" in w for w in t.warnings)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "fast"], "error: --duration: cannot read 'fast'"),
        (["--p95", "0ms"], "error: --p95: must be > 0"),
        (["--scenario", "refund-only"], "error: --scenario: unknown 'refund-only'"),
        (["--find-knee", "--from", "1", "--to", "1000", "--step-size", "1"], "at most 25"),
        (["-i", "no-such-inventory"], "error: inventory not found: no-such-inventory"),
    ],
)
def test_usage_errors_exit_2_before_any_load(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("payctl.verification.run_load", lambda *a, **k: pytest.fail("no load on a usage error"))
    rc = run(["verify", "--url", "http://127.0.0.1:9", "--rps", "10", "--p95", "100ms", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
