"""After a failover the live roles win over the inventory's order: a re-apply renders node2 as the primary, node1 as
its replica and the app pointing at node2, so it never undoes the failover (no files on a host are needed)."""

from __future__ import annotations

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import LiveRoles, make_plan
from payctl.render import render


def test_rendered_roles_follow_the_live_primary() -> None:
    inv = load_inventory("lab-2node")
    files = render(make_plan(inv, load_phase(5), live_roles=LiveRoles(mariadb_primary="node2")), None)
    assert "read_only = OFF" in files["node2/mariadb/my.cnf"].text
    assert "read_only = ON" in files["node1/mariadb/my.cnf"].text
    assert "MASTER_HOST = '10.77.0.12'" in files["node1/mariadb/replica.sql"].text
    assert "node2/mariadb/replica.sql" not in files
    for node in ("node1", "node2"):
        assert "@10.77.0.12:3306/payments" in files[f"{node}/app.env"].text
    # Without live roles the inventory's order holds (node1 primary): the difference is the failover's.
    plain = render(make_plan(inv, load_phase(5)), None)
    assert "@10.77.0.11:3306/payments" in plain["node2/app.env"].text
