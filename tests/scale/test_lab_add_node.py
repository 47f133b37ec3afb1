"""`payctl scale add-node` on the lab: from the session's running 1-node deployment (the shared lab-1node at phase 4)
to node2 added while k6 (the drills' script) sends payments via nginx (`payctl phase5 apply -i lab-2node`, which goes
through scale add-node). No failed payment; every acknowledged payment is on node2's replica; nginx serves from both
nodes (each app's own /metrics counts the authorizations it served); three Sentinels agree on the master; three KRaft
voters and every partition with 2 in-sync replicas. The grown deployment becomes the shared lab-2node phase 5 one.

Then node2's broker stopped (events wait in the outbox, delivered once after). After the upgrade tests (which want it
healthy) the fault tests run on it: the Redis master stopped (Sentinel promotes the other replica, payments keep
flowing, the shared limiter counts on the new master), a planned DB switchover under load, node1's app stopped (nginx
serves from node2 without an error), and a forced DB promotion."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from payctl import kafkajoin, lab
from payctl.cli import run
from payctl.inventory import load_inventory
from payctl.secrets import load_or_create
from tests.scale.conftest import LocalIO
from tests.support.kafka import ensure_jars
from tests.support.labs import MANAGER, SharedLab, mariadb_sql
from tests.support.loads import K6Load, Load, authorize

# After the lab-1node phase-4 tests, before the upgrade tests (order 1); the fault tests below come after those
# (order 2): they leave the deployment changed (primaries moved, node2's MariaDB fenced).
pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.shared_lab("lab-2node", 5)]
LATER = pytest.mark.shared_lab("lab-2node", 5, order=2)
LAST = pytest.mark.shared_lab("lab-2node", 5, order=4)  # after the kill-db-primary drill (tests/drills, order 3)

NODE1 = Path("/var/lib/payctl-lab/node1")
NODE2 = Path("/var/lib/payctl-lab/node2")
ADDRESSES = {"node1": "10.77.0.11", "node2": "10.77.0.12", "witness": "10.77.0.13"}


def secret(home: Path, name: str) -> str:
    return load_or_create(home, "lab", allow_create=False)[name].reveal()


def sentinel_masters(home: Path) -> dict[str, dict[str, Any]]:
    """``SENTINEL master payctl`` as each lab node's Sentinel answers it (as the `sentinel` ACL user)."""
    out: dict[str, dict[str, Any]] = {}
    for node, address in ADDRESSES.items():
        s = redis.Redis(host=address, port=26379, username="sentinel", password=secret(home, "redis_sentinel"),
                        socket_timeout=2, decode_responses=True)  # fmt: skip
        try:
            m = s.sentinel_master("payctl")
            assert isinstance(m, dict)
            out[node] = m
        finally:
            s.close()
    return out


def supervisorctl(prefix: Path, *args: str) -> str:
    out = subprocess.run(["supervisorctl", "-c", f"{prefix}/supervisor/supervisord.conf", *args],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    return out.stdout + out.stderr


def sql(prefix: Path, statement: str) -> str:
    return mariadb_sql(prefix / "run" / "mariadb.sock", statement)


def served(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}:8080/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("payapp_http_requests_total{") and 'method="POST"' in line and "authorize" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class NetnsIO(LocalIO):
    """LocalIO inside a lab node's network namespace (where add-node runs the Kafka tools, over SSH)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def run(self, command: str) -> tuple[bool, str, str]:
        p = subprocess.run(["ip", "netns", "exec", self.namespace, "bash", "-c", command], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        return p.returncode == 0, p.stdout, p.stderr


def quorum_voters(root: kafkajoin.KafkaHost, lab_home: Path) -> set[int]:
    """The KRaft voters, asked from the root namespace; when that does not answer (the pre-stop run of session 3:
    "Timed out waiting for a node assignment" for 240 s while add-node, on node1, had seen them), print what the
    root side sees of node1's controller and ask from inside node1's namespace, as add-node does."""
    try:
        return kafkajoin.voters(root, "10.77.0.11:9093", wait_s=90)
    except kafkajoin.KafkaJoinError as exc:
        print(f"voters from the root namespace: {exc.message}")
    namespace = lab.layout(load_inventory("lab-2node"))[0].namespace
    probe = "timeout 5 bash -c '</dev/tcp/10.77.0.11/9093' && echo open"
    for what, argv in [
        ("root: ip route get", ["ip", "route", "get", "10.77.0.11"]),
        ("node1: listening", ["ip", "netns", "exec", namespace, "ss", "-ltnp"]),
        ("node1: nft", ["ip", "netns", "exec", namespace, "nft", "list", "ruleset"]),
        ("root: connect 9093", ["bash", "-c", probe]),
        ("node1: kafka log", ["tail", "-n", "40", str(NODE1 / "logs" / "payctl-kafka.log")]),
    ]:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        print(f"--- {what}\n{(p.stdout + p.stderr)[-3000:]}")
    inside = kafkajoin.KafkaHost("node1", NetnsIO(namespace), root.lib, root.workdir)
    return kafkajoin.voters(inside, "10.77.0.11:9093", wait_s=150)


def why_failed(apply_output: str) -> None:
    """What the LB and the nodes' supervisors logged while payments failed (CI saw two 502s once, session 4)."""
    print(f"--- the apply's steps\n{apply_output[-6000:]}")
    for what, path in [
        ("node1: nginx error.log", NODE1 / "nginx" / "logs" / "error.log"),
        ("node1: supervisord.log", NODE1 / "logs" / "supervisord.log"),
        ("node2: supervisord.log", NODE2 / "logs" / "supervisord.log"),
    ]:
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else [f"({path} missing)"]
        keep = [ln for ln in lines if "supervisord" not in what or "payctl-app" in ln or "payctl-nginx" in ln]
        print(f"--- {what}\n" + "\n".join(keep[-60:]))


@pytest.fixture
def lab_home(shared_lab: SharedLab) -> Path:
    return shared_lab.home


@pytest.mark.usefixtures("_shared_lab_session")  # the grown lab is torn down at the end even when run alone
def test_add_node_under_load(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Grows the session's lab-1node phase-4 deployment (the gate, monitoring, drills and backup tests ran on it)
    into lab-2node phase 5 under load, then hands it to the later lab-2node tests (MANAGER.adopt)."""
    one = MANAGER.get("lab-1node", 4, tmp_path_factory)
    monkeypatch.setenv("PAYCTL_HOME", str(one.home))
    monkeypatch.setenv("PAYCTL_APP_SOURCE", str(one.app_source))
    try:
        lab.lab_up(load_inventory("lab-2node"), one.home)
        _add_node_under_load(one.home, capsys)
    except BaseException:
        # Half grown: the next lab-2node user gets a fresh deployment. Down with the grown inventory, or node2 and
        # the witness stay up after the session (release() knows lab-1node only).
        MANAGER.adopt(SharedLab("lab-2node", one.home, load_inventory("lab-2node"), 5))
        MANAGER.release()
        raise
    MANAGER.adopt(SharedLab("lab-2node", one.home, load_inventory("lab-2node"), 5))


def _add_node_under_load(lab_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert authorize("m-scale-warm")[0] in (200, 201)
    with K6Load(rps=20, merchant="m-scale") as load:
        started = time.monotonic()
        rc = run(["phase5", "apply", "-i", "lab-2node", "--yes", "--no-verify"])
        took = time.monotonic() - started
        out = capsys.readouterr()
        time.sleep(5)
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    print(f"phase5 apply (scale add-node) under k6 at {load.rps}/s ({load.rps_achieved:.1f}/s sent): {took:.1f} s, "
          f"{len(load.acked)} acknowledged, {len(load.failed)} failed")
    assert "node2 not running yet: payctl phase5 apply adds it with payctl scale add-node" in out.out, out.out
    assert "node2 added to deployment lab" in out.out
    # Three Sentinels, one per node, agree on the Redis master with quorum 2 and see each other. The converge may
    # restart node1's Redis (maxmemory changes), and the Sentinels may rightly fail it over to node2.
    for node in ADDRESSES:
        line = rf"sentinel {node}: master 10\.77\.0\.1[12]:6379 \(master\), quorum 2, 2 other"
        assert re.search(line, out.out), out.out
    masters = sentinel_masters(lab_home)
    master = masters["node1"]["ip"]
    assert master in ("10.77.0.11", "10.77.0.12")
    assert {n: (m["ip"], int(m["port"]), int(m["quorum"]), int(m["num-other-sentinels"]), int(m["num-slaves"]))
            for n, m in masters.items()} == {n: (master, 6379, 2, 2, 1) for n in ADDRESSES}  # fmt: skip
    print(f"Sentinels after add-node: all name {master}:6379 as master")
    # Kafka: three voters (node1, node2, witness), every topic with 2 in-sync replicas, the app's topics min ISR 2.
    tools = kafkajoin.KafkaHost("root", LocalIO(), str(ensure_jars()), str(lab_home / "kafka-tools"))
    assert quorum_voters(tools, lab_home) == {1, 2, 3}
    # add-node waited for 2 in-sync replicas everywhere; a follower that misses replica.lag.time.max.ms (30 s) on
    # this loaded 2-core box drops out of the ISR for a while and rejoins, which is Kafka doing its job: wait for it.
    deadline = time.monotonic() + 180
    while True:
        topics = kafkajoin.describe(tools, "10.77.0.11:9092,10.77.0.12:9092")
        short = [(t.name, p.partition, p.isr) for t in topics for p in t.partitions if sorted(p.isr) != [1, 2]]
        if not short or time.monotonic() > deadline:
            break
        print(f"{len(short)} partitions not at 2 in-sync replicas yet, e.g. {short[:2]}")
        time.sleep(5)
    assert "__consumer_offsets" in {t.name for t in topics} and len(topics) >= 3, [t.name for t in topics]
    assert short == []
    assert {t.name: t.configs.get("min.insync.replicas") for t in topics if not t.name.startswith("__")} == {
        t.name: "2" for t in topics if not t.name.startswith("__")}  # fmt: skip
    assert re.search(r"node2: replica of node1 at GTID 0-\d+-\d+, semi-sync clients 1, seeded now", out.out), out.out
    # 0 failed payments: every authorization k6 sent was acknowledged, at the latest on drill.js's one retry with
    # the same idempotency key, and no answer was a 5xx or 4xx. A first attempt that got no answer at all (status 0)
    # is tolerated when its retry was acknowledged: each graceful nginx reload (the LB step, the rolling restart's
    # out and back in) closes idle client keep-alive connections, and a POST k6 sends on one as it closes gets no
    # answer. Every HTTP client has that race with a server closing keep-alive connections; it is why clients retry
    # with an idempotency key. (Session 4's CI: two 502s on first attempts, nginx's answer while node1's app
    # restarted without leaving the LB; the converge now restarts it out of the LB. Session 5's run of this test:
    # two first attempts without an answer at the take-out reload, both acknowledged on their retry.)
    first = [r for r in load.log.requests if r.name == "authorize" and r.status != 200]
    retries = [r for r in load.log.requests if r.name == "authorize-retry"]
    answered = [f for f in load.failed if not f.startswith("0 authorize at ")]
    if load.failed:
        why_failed(out.out)
        print(f"first attempts without an answer, each retried: {[f for f in load.failed if f not in answered]}")
    assert answered == [], answered[:5]
    assert len(retries) == len(first) and all(r.status == 200 for r in retries), load.failed[:5]
    # The converge restarted node1's app programs out of the load balancer, not under it.
    rolled = r"rolling restart node1: [^\n]*payctl-app[^\n]* restarted out of the load balancer for"
    assert re.search(rolled, out.out), out.out
    assert len(load.acked) > 50
    # Every acknowledged payment is on node2's replica (semi-sync AFTER_SYNC; catch-up is waited for anyway).
    pos = sql(NODE1, "SELECT @@gtid_binlog_pos")
    assert sql(NODE2, f"SELECT MASTER_GTID_WAIT('{pos}', 30)") == "0"
    ids = ",".join(str(int(p)) for p in load.acked)
    count = sql(NODE2, f"SELECT COUNT(*) FROM payments.payment WHERE payment_id IN ({ids})")
    assert int(count) == len(load.acked)
    assert sql(NODE2, "SELECT @@read_only") == "1"
    # The app's accounts reached the replica (through replication: the snapshot holds none), for a later failover.
    assert int(sql(NODE2, "SELECT COUNT(*) FROM mysql.user WHERE User = 'app'")) >= 2
    # nginx now sends to both app nodes.
    before = served("10.77.0.12")
    for i in range(20):
        assert authorize(f"m-scale-after-{i}")[0] in (200, 201)
    assert served("10.77.0.12") > before and served("10.77.0.11") > 0


def test_broker_stopped_outbox_holds_then_delivers_once(lab_home: Path) -> None:
    """After add-node (RF 2, min.insync.replicas 2): node2's broker stopped under the payment loop. Payments are still
    acknowledged, their events wait in the outbox (no acks=all write can reach 2 in-sync replicas), and once the broker
    is back every one of them is published and applied by the consumer (processed_event, one row per event id)."""
    assert "stopped" in supervisorctl(NODE2, "stop", "payctl-kafka")
    try:
        with Load(rps=10, merchant="m-scale") as load:
            time.sleep(12)
        held = int(sql(NODE1, "SELECT COUNT(*) FROM payments.outbox_event WHERE published_at IS NULL"))
    finally:
        assert "started" in supervisorctl(NODE2, "start", "payctl-kafka")
    back = time.monotonic()
    assert load.failed == [], load.failed[:5]
    assert len(load.acked) >= 50
    assert held >= len(load.acked)  # at least each payment's authorized event was held
    ids = ",".join(str(int(p)) for p in load.acked)
    events = int(sql(NODE1, f"SELECT COUNT(*) FROM payments.outbox_event WHERE payment_id IN ({ids})"))
    deadline = time.monotonic() + 180
    pending, applied = events, 0
    while time.monotonic() < deadline:
        pending = int(sql(NODE1, "SELECT COUNT(*) FROM payments.outbox_event "
                                 f"WHERE payment_id IN ({ids}) AND published_at IS NULL"))  # fmt: skip
        applied = int(sql(NODE1, "SELECT COUNT(*) FROM payments.processed_event p JOIN payments.outbox_event o "
                                 f"USING (event_id) WHERE o.payment_id IN ({ids})"))  # fmt: skip
        if pending == 0 and applied == events:
            break
        time.sleep(1)
    print(f"broker node2 stopped 12 s under 10/s: {len(load.acked)} payments acknowledged, {held} events held in "
          f"the outbox; after it returned: {events - pending}/{events} published, {applied} applied in "
          f"{time.monotonic() - back:.1f} s")  # fmt: skip
    assert (pending, applied) == (0, events)


@LATER
def test_redis_master_stopped_sentinel_promotes(lab_home: Path) -> None:
    """Stop the Redis master's server under the payment loop: the Sentinels promote the other node's replica,
    payments keep succeeding (the limiter fails open meanwhile), and the shared limiter counts on the new master
    afterwards. The old master is started again and Sentinel makes it a replica of the new one."""
    old = sentinel_masters(lab_home)["node1"]["ip"]
    old_prefix, new = (NODE1, "10.77.0.12") if old == "10.77.0.11" else (NODE2, "10.77.0.11")
    with Load(merchant="m-scale") as load:
        time.sleep(2)
        stopped = time.monotonic()
        assert "stopped" in supervisorctl(old_prefix, "stop", "payctl-redis")
        promoted = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if {m["ip"] for m in sentinel_masters(lab_home).values()} == {new}:
                    promoted = time.monotonic() - stopped
                    break
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.5)
        time.sleep(5)
    assert promoted is not None, f"the Sentinels did not promote {new} within 90 s"
    print(f"Redis master {old} stopped: all three Sentinels name {new} after {promoted:.1f} s; "
          f"{len(load.acked)} payments acknowledged, {len(load.failed)} failed meanwhile")  # fmt: skip
    assert load.failed == [], load.failed[:5]
    # The limiter counts on the new master (through Sentinel): 5 authorizations of a fresh merchant = counter 5.
    merchant = f"m-rl-{uuid.uuid4().hex[:8]}"
    for _ in range(5):
        assert authorize(merchant)[0] in (200, 201)
    new_master = redis.Redis(host=new, port=6379, username="app", password=secret(lab_home, "redis_app"),
                             socket_timeout=2, decode_responses=True)  # fmt: skip
    try:
        assert new_master.get(f"payapp:rl:authorize:{merchant}") == "5"
    finally:
        new_master.close()
    # The old master returns as a replica of the new one (Sentinel reconfigures it).
    assert "started" in supervisorctl(old_prefix, "start", "payctl-redis")
    deadline = time.monotonic() + 60
    role = ""
    while time.monotonic() < deadline:
        r = redis.Redis(host=old, port=6379, username="sentinel",
                        password=secret(lab_home, "redis_sentinel"), socket_timeout=2)  # fmt: skip
        try:
            info = r.execute_command("ROLE")  # type: ignore[no-untyped-call]
            role = f"{info[0]!r} {info[1]!r}"
            if info[0] in (b"slave", "slave") and info[1] in (new.encode(), new):
                break
        except (redis.RedisError, OSError):
            pass
        finally:
            r.close()
        time.sleep(0.5)
    else:
        pytest.fail(f"{old}'s Redis did not become {new}'s replica within 60 s (ROLE {role})")


@LATER
def test_planned_switchover_under_load(lab_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After add-node: node2 becomes primary under load, node1 its replica; every acknowledged payment is on both;
    payments succeed again after the switch (during it, writes may fail fast as read-only and be retried)."""
    with Load(merchant="m-scale") as load:
        time.sleep(3)
        rc = run(["failover", "db", "-i", "lab-2node", "--promote", "node2", "--planned", "--yes"])
        out = capsys.readouterr()
        time.sleep(3)
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    assert "node2 is the MariaDB primary" in out.out
    assert sql(NODE2, "SELECT @@read_only") == "0" and sql(NODE1, "SELECT @@read_only") == "1"
    status = sql(NODE1, "SHOW SLAVE STATUS")
    assert "10.77.0.12" in status and "Slave_Pos" in status
    assert len(load.acked) > 50
    pos = sql(NODE2, "SELECT @@gtid_binlog_pos")
    assert sql(NODE1, f"SELECT MASTER_GTID_WAIT('{pos}', 30)") == "0"
    ids = ",".join(str(int(p)) for p in load.acked)
    for prefix in (NODE1, NODE2):
        assert int(sql(prefix, f"SELECT COUNT(*) FROM payments.payment WHERE payment_id IN ({ids})")) == len(load.acked)
    # Writes go to node2 now, through either app node.
    results = [authorize(f"m-switch-after-{i}")[0] for i in range(20)]
    assert all(code in (200, 201) for code in results), results
    print(f"switchover under load: {len(load.acked)} acknowledged, {len(load.failed)} failed: {load.failed[:3]}")
    # A re-apply after the failover follows the live roles: node2 stays the primary, node1 its replica.
    rc = run(["phase5", "apply", "-i", "lab-2node", "--yes", "--no-verify"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    assert sql(NODE2, "SELECT @@read_only") == "0" and sql(NODE1, "SELECT @@read_only") == "1"
    status = sql(NODE1, "SHOW SLAVE STATUS")
    assert "10.77.0.12" in status and "\tYes\tYes\t" in status, status
    assert authorize("m-switch-reapply")[0] in (200, 201)


@LAST
def test_app_stopped_on_node1_lb_serves_from_node2(lab_home: Path) -> None:
    """Stop node1's app (its supervisord): nginx keeps serving every payment from node2 (a refused connection is
    retried on the other upstream: nothing was sent), then marks node1 failed for fail_timeout. Started again, node1
    serves again once fail_timeout has passed. The deployment is left with both apps running."""
    before2 = served("10.77.0.12")
    assert "stopped" in supervisorctl(NODE1, "stop", "payctl-app")
    try:
        codes = []
        started = time.monotonic()
        for i in range(40):  # ~4 s at 10/s, the first requests right after the stop
            codes.append(authorize(f"m-lb-{i % 5}")[0])
            time.sleep(0.1)
        window = time.monotonic() - started
        errors = [c for c in codes if c not in (200, 201)]
        print(f"node1 app stopped: {len(codes) - len(errors)} of {len(codes)} payments served in {window:.1f} s, "
              f"errors {errors}")  # fmt: skip
        assert errors == []
        assert served("10.77.0.12") - before2 >= 40  # all of them from node2
    finally:
        assert "started" in supervisorctl(NODE1, "start", "payctl-app")
    # Healthy again: node1's app answers, and nginx sends it traffic after fail_timeout (10 s).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://10.77.0.11:8080/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    time.sleep(11)
    before1 = served("10.77.0.11")
    for i in range(20):
        assert authorize(f"m-lb-back-{i}")[0] in (200, 201)
    assert served("10.77.0.11") > before1


@LAST
def test_forced_promotion_when_the_primary_stops(lab_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whichever node is the primary by now (the switchover and the kill-db-primary drill moved it), its MariaDB
    stopped under the payment loop (its host still answers SSH): `payctl failover db --promote OTHER --force` promotes
    the other node (semi-sync was on, so every acknowledged payment is there), repoints both apps, and rewrites the
    old primary's my.cnf for the replica role: it comes back read-only (fenced). Last test of the module."""
    prefixes = {"node1": NODE1, "node2": NODE2}
    (old,) = [n for n, p in prefixes.items() if sql(p, "SELECT @@read_only") == "0"]
    new = "node2" if old == "node1" else "node1"
    with Load(merchant="m-scale") as load:
        time.sleep(3)
        assert "stopped" in supervisorctl(prefixes[old], "stop", "payctl-mariadb")
        stopped = time.monotonic()
        rc = run(["failover", "db", "-i", "lab-2node", "--promote", new, "--force", "--yes"])
        took = time.monotonic() - stopped
        out = capsys.readouterr()
        writes_back = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if authorize("m-force-probe")[0] in (200, 201):
                writes_back = time.monotonic() - stopped
                break
            time.sleep(0.5)
        time.sleep(3)
    assert rc == 0, out.err[-3000:] + out.out[-2000:]
    print(f"forced promotion of {new}: command {took:.1f} s, writes back {writes_back} s after {old}'s MariaDB "
          f"stopped; {len(load.acked)} acknowledged, {len(load.failed)} refused: {load.failed[:2]}")  # fmt: skip
    assert f"{new} is the MariaDB primary" in out.out
    assert f"{old} not reachable: fence it on return" in out.out
    assert writes_back is not None
    assert sql(prefixes[new], "SELECT @@read_only") == "0"
    ids = ",".join(str(int(p)) for p in load.acked)
    count = sql(prefixes[new], f"SELECT COUNT(*) FROM payments.payment WHERE payment_id IN ({ids})")
    assert int(count) == len(load.acked)
    # The old primary returns fenced: its my.cnf now says replica, so it is read-only and takes no app writes.
    assert "started" in supervisorctl(prefixes[old], "start", "payctl-mariadb")
    sock = prefixes[old] / "run" / "mariadb.sock"
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sql(prefixes[old], "SELECT @@read_only") == "1"
