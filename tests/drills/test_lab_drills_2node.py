"""The kill-db-primary drill on the shared lab-2node phase-5 deployment: k6 through nginx, the MariaDB primary killed
with -9 and kept down, the replica promoted by force (what `payctl failover db --force` does), both apps repointed,
the old primary started again and re-attached as a replica of the new one; then the audit of every acknowledged
payment. Runs after add-node's planned switchover (order 3): the deployment it leaves is whole, roles swapped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.labs import SharedLab, mariadb_sql

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-2node", 5, order=3)]
PREFIX = {"node1": Path("/var/lib/payctl-lab/node1"), "node2": Path("/var/lib/payctl-lab/node2")}


def sql(node: str, statement: str) -> str:
    return mariadb_sql(PREFIX[node] / "run" / "mariadb.sock", statement)


def writable() -> str:
    (primary,) = [n for n in PREFIX if sql(n, "SELECT @@read_only") == "0"]
    return primary


def test_kill_db_primary_promotes_the_replica_and_loses_no_acknowledged_payment(
    shared_lab: SharedLab, tmp_path: Path
) -> None:
    old = writable()
    new = next(n for n in PREFIX if n != old)
    out = tmp_path / "kill-db-primary"
    res = shared_lab.payctl("drill", "-i", shared_lab.name, "kill-db-primary", "--rps", "10", "--duration", "75s",
                            "--warmup", "5s", "--report-dir", str(out), "--yes")  # fmt: skip
    print(res.stdout[-4000:])
    if res.returncode != 0:
        shared_lab.invalidate()
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "drill kill-db-primary PASS" in res.stdout
    row = json.loads((out / "results.json").read_text())[0]
    assert (row["lost"], row["duplicates"], row["reconciliation"], row["verdict"]) == (0, 0, "balanced", "pass")
    assert row["acknowledged"] >= 10 * 50  # the load really ran
    # Roles swapped, and the old primary replicates from the new one (the deployment is whole again).
    assert writable() == new
    status = sql(old, "SHOW SLAVE STATUS")
    assert "Slave_Pos" in status and "\tYes\tYes\t" in status, status
