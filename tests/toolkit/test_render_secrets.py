"""Every secret a rendered file needs is one the deployment's secrets store generates.

Rendering with placeholders (goldens, --check) hides a name the store does not know; a real apply would then fail
half-way. Render every bundled inventory at every phase with the store's names and look for leftovers.
"""

from __future__ import annotations

import pytest

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import render
from payctl.secrets import SECRET_NAMES

INVENTORIES = ["ktcloud-1node", "ktcloud-2node", "lab-1node", "lab-2node"]


@pytest.mark.parametrize("inventory", INVENTORIES)
@pytest.mark.parametrize("number", [1, 2, 3, 4, 5])
def test_rendering_needs_only_secrets_the_store_has(inventory: str, number: int) -> None:
    inv = load_inventory(inventory)
    if number == 5 and len(inv.nodes) < 2:
        pytest.skip("phase 5 needs a second node")
    values = {name: f"value{i}x" for i, name in enumerate(SECRET_NAMES)}
    files = render(make_plan(inv, load_phase(number)), values)
    leftovers = [path for path, f in files.items() if "{{SECRET:" in f.text]
    assert leftovers == []
    # and they really are used: at least the app's database password reaches a file
    assert any(values["mariadb_app"] in f.text for f in files.values())
