"""Golden files: every rendered file of ktcloud-1node and ktcloud-2node at every phase, compared byte for byte.

`pytest tests/toolkit/test_golden.py --update-golden` rewrites them; review the diff like code.
Layout: tests/golden/<inventory>/phase<N>/<node>/<path> (secrets are {{SECRET:name}} placeholders).
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

from payctl.errors import ConfigError
from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import render

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CASES = [(inv, phase) for inv in ("ktcloud-1node", "ktcloud-2node") for phase in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(("inventory", "phase"), CASES)
def test_golden(inventory: str, phase: int, update_golden: bool) -> None:
    inv = load_inventory(REPO / "inventories" / f"{inventory}.yml")
    root = GOLDEN / inventory / f"phase{phase}"
    try:
        plan = make_plan(inv, load_phase(phase))
    except ConfigError as exc:
        # A 1-node inventory cannot carry phase 5: that refusal is the golden outcome.
        assert phase == 5 and inventory == "ktcloud-1node", exc.message
        assert not root.exists()
        return
    files = {f.key: f.text for f in render(plan).values()}
    if update_golden:
        shutil.rmtree(root, ignore_errors=True)
        for key, text in files.items():
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_text(text)
        return
    assert root.is_dir(), f"no golden files for {inventory} phase {phase}: run pytest --update-golden"
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(files), "rendered file set differs from the golden set (--update-golden)"
    for key, text in files.items():
        expected = (root / key).read_text()
        if expected != text:
            diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "now"))
            pytest.fail(f"{inventory} phase {phase}: {key} differs from its golden file (--update-golden):\n{diff}")
