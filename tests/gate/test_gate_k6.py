"""payctl verify end to end: real k6 against a real `payapp serve` on loopback (short runs: 2 shared cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from payctl.cli import run
from tests.gate.conftest import PayappServer
from tests.support.services import free_port

pytestmark = pytest.mark.slow


def test_gate_passes_at_a_modest_rate_and_writes_the_report(
    payapp_server: PayappServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Latency bounds loosened from phase 1's 150/300 ms: this machine's 2 cores are shared with every other test run.
    rc = run(["verify", "--url", payapp_server.url, "--phase", "1", "--rps", "50", "--duration", "5s",
              "--warmup", "1s", "--merchants", "20", "--p95", "1s", "--p99", "2s", "--quiet",
              "--report-dir", str(tmp_path / "r")])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert f"gate PASS: report in {tmp_path / 'r'}" in captured.out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["verdict"] == "pass" and summary["phase"] == 1
    m = summary["measured"]
    # A shared machine may make k6 drop an iteration or two; the gate allows 2 %.
    assert 49 <= m["achieved_rps"] <= 51 and m["dropped"] <= 5 and m["failed_requests"] == 0
    assert m["functional_passes"] > 200 and m["functional_fails"] == 0
    assert summary["gate"]["scenario"] == "mixed" and summary["gate"]["p95_ms"] == 1000
    assert summary["gate"]["max_error_rate"] == 0.01 and summary["gate"]["mix"]["void"] == 0.05  # from phase 1
    names = [c["name"] for c in summary["criteria"]]
    assert names[:5] == ["achieved rate", "p95 latency", "p99 latency", "error rate", "functional checks"]
    stages = {p["stage"] for p in summary["series"]}
    assert stages == {"warmup", "measure"}
    # The streamed series saw every request: the measured ones plus the 1 s warm-up's (about 50).
    assert m["requests"] <= sum(p["rps"] for p in summary["series"]) <= m["requests"] + 55
    assert (tmp_path / "r" / "report.md").read_text().startswith("# verify local phase 1: PASS")
    assert '<path class="series"' in (tmp_path / "r" / "report.html").read_text()


def test_full_flow_checks_every_step_and_the_idempotent_replay(payapp_server: PayappServer, tmp_path: Path) -> None:
    rc = run(["verify", "--url", payapp_server.url, "--rps", "20", "--duration", "3s", "--p95", "1s",
              "--scenario", "full-flow", "--quiet", "--report-dir", str(tmp_path)])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, summary["criteria"]
    m = summary["measured"]
    # per flow: authorize + replay + capture (+ a refund 30 % of the time)
    assert m["requests"] >= 3 * m["iterations"] and m["iterations"] >= 58
    assert m["functional_fails"] == 0 and m["functional_passes"] >= 6 * m["iterations"]


def test_impossible_p95_fails_with_exit_1_and_lists_measured_vs_limit(
    payapp_server: PayappServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = run(["verify", "--url", payapp_server.url, "--rps", "20", "--duration", "2s", "--p95", "0.01ms",
              "--p99", "300ms", "--json", "--report-dir", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 1
    assert json.loads(captured.out)["verdict"] == "fail"  # --json: only the summary on stdout
    assert "gate failed: p95 latency: measured " in err and ", limit <= 0.01ms" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["failed"] == ["p95 latency"]


def test_unreachable_rate_fails_on_dropped_iterations(
    payapp_server: PayappServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One VU cannot keep 400 requests/s in flight when each takes milliseconds: k6 drops the rest.
    rc = run(["verify", "--url", payapp_server.url, "--rps", "400", "--max-vus", "1", "--duration", "2s",
              "--p95", "150ms", "--quiet", "--report-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "gate failed: achieved rate: measured " in err and "limit >= 392.0/s (98% of 400)" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "achieved rate" in summary["failed"]
    assert summary["measured"]["dropped"] > 0
    assert summary["measured"]["achieved_rps"] < 392


def test_closed_port_is_exit_3_with_a_clear_message_and_no_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    port = free_port()  # bound and released: nothing listens there
    rc = run(["verify", "--url", f"http://127.0.0.1:{port}", "--rps", "10", "--duration", "1s", "--p95", "1s"])
    err = capsys.readouterr().err
    assert rc == 3
    assert (
        f"error: target unreachable: GET http://127.0.0.1:{port}/health failed: [Errno 111] Connection refused" in err
    )
    assert "hint: is the deployment up?" in err
    assert not (tmp_path / "reports").exists()


def test_missing_or_crashing_k6_is_exit_3(
    payapp_server: PayappServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["verify", "--url", payapp_server.url, "--rps", "10", "--duration", "1s", "--p95", "1s", "--quiet"]
    monkeypatch.setenv("PAYCTL_K6", str(tmp_path / "no-such-k6"))
    assert run(argv) == 3
    assert "error: k6 is not installed" in capsys.readouterr().err
    crashing = tmp_path / "k6"
    crashing.write_text("#!/bin/sh\necho 'panic: something broke' >&2\nexit 107\n")
    crashing.chmod(0o755)
    monkeypatch.setenv("PAYCTL_K6", str(crashing))
    assert run(argv) == 3
    assert "error: k6 failed (exit 107): panic: something broke" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
    assert os.environ["PAYCTL_K6"] == str(crashing)


def test_find_knee_steps_until_the_gate_fails_and_reports_the_curve(
    payapp_server: PayappServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Four VUs bound what can be offered: the first step leaves each request 200 ms (and the bounds are loose, as
    # the machine is shared), the second would need under 2 ms per request, so it fails on dropped iterations.
    rc = run(["verify", "--url", payapp_server.url, "--find-knee", "--from", "20", "--to", "2000", "--step-size",
              "1980", "--max-vus", "4", "--duration", "2s", "--p95", "2s", "--p99", "4s", "--scenario", "authorize",
              "--cooldown", "1s", "--quiet", "--report-dir", str(tmp_path)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "knee: 20/s" in text and "calibration not stored" in text
    knee = json.loads((tmp_path / "knee.json").read_text())
    assert knee["knee_rps"] == 20
    assert [s["offered_rps"] for s in knee["steps"]] == [20, 2000]
    assert [s["passed"] for s in knee["steps"]] == [True, False]
    assert "achieved rate" in knee["steps"][1]["failed"]
    assert knee["fit"]["model"] in ("linear", "amdahl", "usl")
    for step in ("step-20rps", "step-2000rps"):
        assert json.loads((tmp_path / step / "summary.json").read_text())["gate"]["rps"] in (20, 2000)
    html = (tmp_path / "report.html").read_text()
    assert "Achieved rate by offered rate" in html and '<path class="series"' in html


def test_a_proxy_in_the_environment_is_never_used(
    payapp_server: PayappServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would be a third host receiving the load: the health check and k6 both go straight to the target.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    rc = run(["verify", "--url", payapp_server.url, "--rps", "10", "--duration", "1s", "--p95", "1s", "--quiet",
              "--report-dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "summary.json").read_text())["measured"]["failed_requests"] == 0
