"""Report files exist and parse; report.html is self-contained and its plots render in headless Chromium."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from payctl.gate import Criterion, GateSpec, K6Summary, judge
from payctl.loadrun import LoadResult
from payctl.report import ServerSeries, VerifyRun, report_dir_name, write_report
from payctl.timeseries import Point

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def make_run(server: ServerSeries | None = None, extra: list[Criterion] | None = None) -> VerifyRun:
    spec = GateSpec(rps=50, duration_s=2.0, warmup_s=1.0, p95_ms=150.0, p99_ms=300.0, max_error_rate=0.01)
    raw = json.loads((DATA / "k6-summary-pass.json").read_text())
    summary = K6Summary.from_k6(raw, duration_s=2.0, offered_rps=50)
    series = [
        Point(float(t), "warmup" if t < 1 else "measure", 50.0 + t, 50, t % 2, 0.01 * (t % 3), 1.0 + t / 10,
              3.0 + t / 5, 6.0 + t / 3)
        for t in range(30)
    ]  # fmt: skip
    series[7] = Point(7.0, "measure", 0.0, 0, 50, 0.0, None, None, None)  # a second without requests: a gap
    result = LoadResult(summary, series, 0, {"503": 2}, 1764064800.0, 4.2, raw)
    criteria = judge(summary, spec) + (extra or [])
    return VerifyRun("lab", 1, "http://127.0.0.1:8080", spec, result, criteria, ("k6 shares a node",),
                     server or ServerSeries())  # fmt: skip


def test_report_dir_name_is_utc_time_deployment_phase() -> None:
    assert report_dir_name(make_run()) == "20251125T100000Z-lab-phase1"


def test_report_files_exist_and_parse(tmp_path: Path) -> None:
    failing = Criterion("reconciliation balanced", False, "not balanced: exit 3 (report 43)", "balanced")
    out = write_report(make_run(extra=[failing]), base=tmp_path)
    assert out == tmp_path / "20251125T100000Z-lab-phase1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "fail" and summary["exit_code"] == 1
    assert summary["failed"] == ["reconciliation balanced"]
    assert summary["measured"]["achieved_rps"] == pytest.approx(50.5)
    assert summary["gate"]["p95_ms"] == 150.0 and len(summary["series"]) == 30
    assert summary["series"][7]["p95_ms"] is None
    md = (out / "report.md").read_text()
    assert md.startswith("# verify lab phase 1: FAIL")
    assert "| reconciliation balanced | FAIL | not balanced: exit 3 (report 43) | balanced |" in md
    assert "Failed requests by status: 503: 2" in md
    html = (out / "report.html").read_text()
    # self-contained: nothing fetched
    for needle in ("<script", "<link", "src=", "@import", "url("):
        assert needle not in html
    assert html.count('<path class="series"') == 3 + 4 + 2  # rate (3), latency (4), errors (2)
    assert "not available: no monitoring series" in html


def test_server_series_fill_their_sections(tmp_path: Path) -> None:
    server = ServerSeries(
        cpu_percent={"node1": [(0, 50.0), (1, 80.0)], "node2": [(0, 40.0), (1, 45.0)]},
        memory_mb={"node1": [(0, 900.0), (1, 950.0)]},
        consumer_lag=[(0, 10.0), (1, 0.0)],
    )
    html = (write_report(make_run(server), directory=tmp_path / "r") / "report.html").read_text()
    assert "not available" not in html
    assert 'data-label="node2"' in html and html.count('<path class="series"') == 9 + 2 + 1 + 1


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Rows of an 8-bit RGB/RGBA PNG (what Chromium writes), unfiltered."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, bpp = 8, b"", 0, 0, 4
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.slow
def test_html_plots_render_in_headless_chromium(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (Debian package chromium)")
    out = write_report(make_run(), directory=tmp_path / "r")
    url = (out / "report.html").resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<path class="series"') == 9
    assert "<svg" in dom.stdout and "Latency percentiles per second" in dom.stdout
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, "--window-size=900,1400", "--force-device-scale-factor=0.5", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    width, bpp, rows = _png_pixels(shot.read_bytes())
    # The plots draw coloured lines: count pixels of the palette's blue (p50/iterations) and red (p95/errors).
    blue = red = 0
    for row in rows:
        for x in range(0, width * bpp, bpp):
            r, g, b = row[x], row[x + 1], row[x + 2]
            blue += b > 150 and r < 90 and g < 160
            red += r > 180 and g < 80 and b < 80
    assert blue > 120, f"no plotted blue line in the screenshot ({blue} px)"
    assert red > 60, f"no plotted red line in the screenshot ({red} px)"
