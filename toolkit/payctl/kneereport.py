"""The knee-search report: ``knee.json``, ``report.md`` and a self-contained ``report.html`` with the curve.

Plots: achieved against offered rate (with the line where they are equal), p95/p99 against offered rate (with the
bound), and throughput against concurrency with the fitted model. Each step's own gate report sits in
``step-<rate>rps/`` next to these files (written by the CLI as the steps run).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from payctl.calibrate import Calibration
from payctl.svgplot import Chart, Series, render


def knee_dict(cal: Calibration, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    d = cal.as_dict()
    d.update(extra or {})
    return d


def _charts(cal: Calibration, p95_limit_ms: float) -> list[tuple[str, str]]:
    steps = cal.steps
    offered = [float(s.offered_rps) for s in steps]
    out = [
        (
            "Achieved against offered rate",
            render(
                Chart(
                    "Achieved rate by offered rate",
                    "achieved /s",
                    [
                        Series("achieved", [(float(s.offered_rps), s.achieved_rps) for s in steps]),
                        Series("offered", [(x, x) for x in offered], color="#999999", dashed=True),
                    ],
                    x_label="offered rate /s",
                )
            ),
        ),
        (
            "Latency against offered rate",
            render(
                Chart(
                    "Latency by offered rate",
                    "ms",
                    [
                        Series("p95", [(float(s.offered_rps), s.p95_ms) for s in steps], color="#d62728"),
                        Series("p99", [(float(s.offered_rps), s.p99_ms) for s in steps], color="#2ca02c"),
                        Series("p95 limit", [(x, p95_limit_ms) for x in offered], color="#999999", dashed=True),
                    ],
                    x_label="offered rate /s",
                )
            ),
        ),
    ]
    if cal.fit is not None:
        pts = sorted((s.concurrency, s.achieved_rps) for s in steps if s.achieved_rps > 0 and s.mean_ms > 0)
        if pts:
            hi = max(n for n, _ in pts)
            if math.isfinite(cal.fit.peak_concurrency):
                hi = max(hi, min(cal.fit.peak_concurrency * 1.3, hi * 4))
            curve = [(hi * i / 60, cal.fit.predict(hi * i / 60)) for i in range(1, 61)]
            out.append(
                (
                    "Model",
                    render(
                        Chart(
                            f"Throughput by concurrency, {cal.fit.model} fit",
                            "requests/s",
                            [
                                Series("measured", [(n, x) for n, x in pts]),
                                Series(f"{cal.fit.model} model", curve, color="#ff7f0e", dashed=True),
                            ],
                            x_label="concurrency (Little's law: rate x mean latency)",
                        )
                    ),
                )
            )
    return out


def _rows(cal: Calibration) -> list[list[str]]:
    rows = []
    for s in cal.steps:
        p95 = f"{s.p95_ms:.1f}" if s.p95_ms is not None else "-"
        verdict = "pass" if s.passed else "FAIL: " + ", ".join(s.failed)
        rows.append([str(s.offered_rps), f"{s.achieved_rps:.1f}", p95, f"{s.error_rate:.2%}", str(s.dropped),
                     f"{s.concurrency:.2f}", verdict])  # fmt: skip
    return rows


_HEAD = ["offered /s", "achieved /s", "p95 ms", "errors", "dropped", "concurrency", "gate"]


def _summary_lines(cal: Calibration, notes: list[str]) -> list[str]:
    knee = f"{cal.knee_rps}/s" if cal.knee_rps else "none (the first step failed)"
    lines = [f"knee (highest passing rate): {knee}, resolution {cal.step_rps}/s"]
    if cal.fit is not None:
        f = cal.fit
        if not math.isfinite(f.peak_rps):
            peak = "none (throughput still grows with load)"
        elif math.isfinite(f.peak_concurrency):
            peak = f"{f.peak_rps:.0f}/s at concurrency {f.peak_concurrency:.1f}"
        else:
            peak = f"{f.peak_rps:.0f}/s approached as load grows (Amdahl)"
        lines.append(
            f"model {f.model}: lambda {f.lam:.1f}/s, sigma {f.sigma:.4f}, kappa {f.kappa:.6f}, rmse {f.rmse:.1f}/s; "
            f"ceiling {peak}" + (f" (± {cal.peak_stderr:.0f})" if cal.peak_stderr else "")
        )
    return lines + notes


def write_knee_report(
    cal: Calibration, directory: Path, *, p95_limit_ms: float, notes: list[str] | None = None
) -> Path:
    """Write knee.json, report.md and report.html into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    notes = notes or []
    (directory / "knee.json").write_text(json.dumps(knee_dict(cal, {"notes": notes}), indent=2) + "\n")
    title = f"knee search {cal.deployment} ({cal.runtime}, {cal.nodes} node(s), {cal.scenario})"
    md = [f"# {title}", ""] + [f"- {line}" for line in _summary_lines(cal, notes)]
    md += ["", "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in _rows(cal)]
    md += ["", "Each step's gate report: step-<rate>rps/. Plots: report.html.", ""]
    (directory / "report.md").write_text("\n".join(md))
    table = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in _rows(cal))
    head = "".join(f"<th>{escape(h)}</th>" for h in _HEAD)
    items = "".join(f"<li>{escape(line)}</li>" for line in _summary_lines(cal, notes))
    plots = "".join(f"<h2>{escape(t)}</h2>{svg}" for t, svg in _charts(cal, p95_limit_ms))
    style = (
        "body{font-family:sans-serif;margin:24px;color:#222;max-width:820px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}svg.chart{display:block;margin:8px 0 20px}"
    )
    (directory / "report.html").write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title><style>{style}</style>'
        f"</head><body><h1>{escape(title)}</h1><ul>{items}</ul><table><tr>{head}</tr>{table}</table>{plots}"
        "</body></html>"
    )
    return directory
