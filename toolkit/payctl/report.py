"""The verify report: ``reports/<UTC time>-<deployment>-<phase>/`` with summary.json, report.md and report.html.

``write_report(run, ...)`` writes the three files of one finished run (a run that could not reach its target has no
report). ``report.html`` is self-contained: inline SVG plots (``payctl.svgplot``), inline style, no script, nothing
fetched. Server CPU/memory per node and consumer lag are optional series (``ServerSeries``) that the monitoring side
passes in; their sections say "not available" when absent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from payctl.gate import Criterion, GateSpec, passed
from payctl.loadrun import LoadResult
from payctl.svgplot import Chart, Series, render

XY = Sequence[tuple[float, float | None]]


@dataclass(frozen=True)
class ServerSeries:
    """Optional server-side series over the run, seconds from the start of the run."""

    cpu_percent: Mapping[str, XY] = field(default_factory=dict)  # node -> CPU % (100 = one core)
    memory_mb: Mapping[str, XY] = field(default_factory=dict)  # node -> resident memory
    consumer_lag: XY = ()


@dataclass(frozen=True)
class VerifyRun:
    """Everything one verify run produced, as the report shows it."""

    deployment: str
    phase: int | None
    target: str
    spec: GateSpec
    result: LoadResult
    criteria: list[Criterion]
    warnings: tuple[str, ...] = ()
    server: ServerSeries = ServerSeries()

    @property
    def passed(self) -> bool:
        return passed(self.criteria)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def report_dir_name(run: VerifyRun, when: float | None = None) -> str:
    stamp = datetime.fromtimestamp(when if when is not None else run.result.started_at, UTC)
    phase = f"phase{run.phase}" if run.phase is not None else "nophase"
    return f"{stamp:%Y%m%dT%H%M%SZ}-{run.deployment}-{phase}"


def _clean(v: Any) -> Any:  # NaN/inf are not JSON
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def summary_dict(run: VerifyRun) -> dict[str, Any]:
    s = run.result.summary
    out: dict[str, Any] = _clean(
        {
            "verdict": "pass" if run.passed else "fail",
            "exit_code": run.exit_code,
            "deployment": run.deployment,
            "phase": run.phase,
            "target": run.target,
            "started_at": datetime.fromtimestamp(run.result.started_at, UTC).isoformat(),
            "wall_s": round(run.result.wall_s, 3),
            "gate": asdict(run.spec),
            "measured": {
                **asdict(s),
                "achieved_rps": s.achieved_rps,
                "requests_per_s": s.requests_per_s,
            },
            "criteria": [c.as_dict() for c in run.criteria],
            "failed": [c.name for c in run.criteria if not (c.passed or c.skipped)],
            "error_statuses": run.result.error_statuses,
            "k6_exit": run.result.k6_exit,
            "warnings": list(run.warnings),
            "series": [p.as_dict() for p in run.result.series],
        }
    )
    return out


def _criteria_rows(run: VerifyRun) -> list[tuple[str, str, str, str]]:
    rows = []
    for c in run.criteria:
        status = "skipped" if c.skipped else "pass" if c.passed else "FAIL"
        rows.append((c.name, status, c.measured, c.limit + (f" ({c.detail})" if c.detail else "")))
    return rows


def render_markdown(run: VerifyRun, html_name: str = "report.html") -> str:
    s = run.result.summary
    phase = f"phase {run.phase}" if run.phase is not None else "no phase"
    lines = [
        f"# verify {run.deployment} {phase}: {'PASS' if run.passed else 'FAIL'}",
        "",
        f"- target: {run.target}",
        f"- started: {datetime.fromtimestamp(run.result.started_at, UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"- load: {run.spec.scenario} at {run.spec.rps}/s for {run.spec.duration_s:g}s "
        f"after {run.spec.warmup_s:g}s warm-up, {run.spec.merchants} merchants",
        f"- measured: {s.achieved_rps:.1f} iterations/s, {s.requests_per_s:.1f} requests/s, "
        f"p50 {_num(s.p50_ms)} ms, p95 {_num(s.p95_ms)} ms, p99 {_num(s.p99_ms)} ms, "
        f"errors {s.error_rate:.2%}, dropped {s.dropped}",
        "",
        "| criterion | result | measured | limit |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _criteria_rows(run)]
    if run.result.error_statuses:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(run.result.error_statuses.items()))
        lines += ["", f"Failed requests by status: {statuses}"]
    for w in run.warnings:
        lines += ["", f"> warning: {w}"]
    lines += ["", f"Plots over time: [{html_name}]({html_name}). Figures: summary.json.", ""]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}" if v < 10 else f"{v:.1f}"


def charts(run: VerifyRun) -> list[tuple[str, str]]:
    """(section title, svg) for every plot of the report."""
    pts = run.result.series
    warm = [p.t for p in pts if p.stage == "warmup"]
    shade = [(min(warm), max(warm) + 1, "warm-up")] if warm else []
    out = [
        (
            "Achieved rate",
            render(
                Chart(
                    "Achieved rate per second",
                    "per second",
                    [
                        Series("iterations", [(p.t, float(p.iterations)) for p in pts]),
                        Series("requests", [(p.t, p.rps) for p in pts], color="#2ca02c"),
                        Series("dropped", [(p.t, float(p.dropped)) for p in pts], color="#ff7f0e"),
                        Series("offered", [(p.t, float(run.spec.rps)) for p in pts], color="#999999", dashed=True),
                    ],
                    shade=shade,
                )
            ),
        ),
        (
            "Latency",
            render(
                Chart(
                    "Latency percentiles per second",
                    "ms",
                    [
                        Series("p50", [(p.t, p.p50_ms) for p in pts]),
                        Series("p95", [(p.t, p.p95_ms) for p in pts]),
                        Series("p99", [(p.t, p.p99_ms) for p in pts]),
                        Series("p95 limit", [(p.t, run.spec.p95_ms) for p in pts], color="#999999", dashed=True),
                    ],
                    shade=shade,
                )
            ),
        ),
        (
            "Errors",
            render(
                Chart(
                    "Error rate per second",
                    "% of requests failed",
                    [Series("errors", [(p.t, 100 * p.error_rate) for p in pts], color="#d62728")],
                    shade=shade,
                )
            ),
        ),
    ]
    srv = run.server
    if srv.cpu_percent:
        cpu = [Series(n, v) for n, v in srv.cpu_percent.items()]
        out.append(("Server CPU", render(Chart("CPU per node", "% of one core", cpu))))
    if srv.memory_mb:
        out.append(
            ("Server memory", render(Chart("Memory per node", "MB", [Series(n, v) for n, v in srv.memory_mb.items()])))
        )
    if srv.consumer_lag:
        out.append(("Consumer lag", render(Chart("Consumer lag", "events", [Series("lag", srv.consumer_lag)]))))
    return out


_STYLE = (
    "body{font-family:sans-serif;margin:24px;color:#222;max-width:820px}"
    "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    ".pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}.skip{color:#777}"
    ".missing{color:#777;font-style:italic}svg.chart{display:block;margin:8px 0 20px}"
)


def render_html(run: VerifyRun) -> str:
    s = run.result.summary
    verdict = "PASS" if run.passed else "FAIL"
    phase = f"phase {run.phase}" if run.phase is not None else "no phase"
    rows = "".join(
        f'<tr><td>{escape(a)}</td><td class="{"skip" if b == "skipped" else "pass" if b == "pass" else "fail"}">'
        f"{escape(b)}</td><td>{escape(c)}</td><td>{escape(d)}</td></tr>"
        for a, b, c, d in _criteria_rows(run)
    )
    plots = "".join(f"<h2>{escape(title)}</h2>{svg}" for title, svg in charts(run))
    have = {t for t, _ in charts(run)}
    missing = [t for t in ("Server CPU", "Server memory", "Consumer lag") if t not in have]
    missing_html = "".join(
        f'<h2>{escape(t)}</h2><p class="missing">not available: no monitoring series were passed to this run</p>'
        for t in missing
    )
    warn = "".join(f"<p><b>warning:</b> {escape(w)}</p>" for w in run.warnings)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>verify {escape(run.deployment)} {phase}: {verdict}</title><style>{_STYLE}</style></head><body>"
        f'<h1>verify {escape(run.deployment)} {phase}: <span class="{verdict.lower()}">{verdict}</span></h1>'
        f"<p>target {escape(run.target)} · {escape(run.spec.scenario)} at {run.spec.rps}/s for "
        f"{run.spec.duration_s:g}s after {run.spec.warmup_s:g}s warm-up · started "
        f"{datetime.fromtimestamp(run.result.started_at, UTC):%Y-%m-%d %H:%M:%S} UTC</p>"
        f"<p>measured {s.achieved_rps:.1f} iterations/s ({s.requests_per_s:.1f} requests/s), p50 {_num(s.p50_ms)} ms, "
        f"p95 {_num(s.p95_ms)} ms, p99 {_num(s.p99_ms)} ms, errors {s.error_rate:.2%}, dropped {s.dropped}</p>"
        f"{warn}<table><tr><th>criterion</th><th>result</th><th>measured</th><th>limit</th></tr>{rows}</table>"
        f"{plots}{missing_html}</body></html>"
    )


def write_report(run: VerifyRun, *, base: Path = Path("reports"), directory: Path | None = None) -> Path:
    """Write summary.json, report.md and report.html; returns the report directory."""
    out = directory if directory is not None else base / report_dir_name(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary_dict(run), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(run))
    (out / "report.html").write_text(render_html(run))
    return out
