"""render(plan): what each file must say, live roles, secrets, and that the templates stay logic-free."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from payctl.errors import PayctlError
from payctl.inventory import load_inventory, parse_inventory
from payctl.paths import data_dir
from payctl.phase import load_phase
from payctl.plan import LiveRoles, Plan, make_plan
from payctl.render import FileKind, RenderedFile, kafka_cluster_id, render
from payctl.validate import validate_files
from tests.support.services import MariaDB

REPO = Path(__file__).resolve().parents[2]


def plan_for(inv: str, phase: int, live: LiveRoles | None = None) -> Plan:
    return make_plan(load_inventory(REPO / "inventories" / f"{inv}.yml"), load_phase(phase), live_roles=live)


@pytest.fixture(scope="module")
def kt2() -> dict[str, RenderedFile]:
    return render(plan_for("ktcloud-2node", 5))


def test_keys_are_node_slash_relative_path(kt2: dict[str, RenderedFile]) -> None:
    for key, f in kt2.items():
        assert key == f"{f.node}/{f.path}"
        assert not f.path.startswith("/") and ".." not in f.path.split("/")
    assert {f.node for f in kt2.values()} == {"node1", "node2", "witness"}


def test_phase1_renders_only_the_first_node() -> None:
    files = render(plan_for("ktcloud-2node", 1))
    assert {f.node for f in files.values()} == {"node1"}
    assert "node1/redis/sentinel.conf" not in files
    assert "node1/prometheus/prometheus.yml" not in files  # monitoring arrives in phase 4
    assert "node1/prometheus/prometheus.yml" in render(plan_for("ktcloud-1node", 4))


def test_compose_limits_are_the_plans(kt2: dict[str, RenderedFile]) -> None:
    plan = plan_for("ktcloud-2node", 5)
    for node in plan.active_nodes:
        doc = yaml.safe_load(kt2[f"{node.name}/docker-compose.yml"].text)
        for name, svc in doc["services"].items():
            assert svc["network_mode"] == "host"
            assert "restart" in svc and "logging" in svc
            if name in ("app", "relay", "consumer", "mariadb", "redis", "sentinel", "kafka", "nginx", "prometheus"):
                comp = node.component(name)
                assert comp is not None, (node.name, name)
                limits = svc["deploy"]["resources"]["limits"]
                assert float(limits["cpus"]) == pytest.approx(comp.cpus)
                assert limits["memory"] == f"{comp.memory_mb}M"
            if name == "reconcile":  # the hourly reconciliation runs under the consumer's caps, has no port to probe
                assert svc["command"] == ["payapp", "reconcile", "--schedule"] and "healthcheck" not in svc
                assert svc["deploy"]["resources"] == doc["services"]["consumer"]["deploy"]["resources"]
            elif name not in ("kafka-format", "nginx-exporter"):
                assert "healthcheck" in svc, (node.name, name)
    node1 = yaml.safe_load(kt2["node1/docker-compose.yml"].text)
    assert node1["services"]["app"]["build"] == {"context": "./payapp"}
    assert node1["services"]["app"]["env_file"] == ["app.env"]


def test_mariadb_primary_and_replica(kt2: dict[str, RenderedFile]) -> None:
    primary, replica = kt2["node1/mariadb/my.cnf"].text, kt2["node2/mariadb/my.cnf"].text
    for text in (primary, replica):
        for line in ("binlog_format = ROW", "gtid_strict_mode = ON", "log_slave_updates = ON", "sync_binlog = 1",
                     "innodb_flush_log_at_trx_commit = 1", "rpl_semi_sync_master_wait_point = AFTER_SYNC"):
            assert line in text
    assert "read_only = OFF" in primary and "read_only = ON" in replica
    assert "server_id = 1" in primary and "server_id = 2" in replica
    assert "MASTER_USE_GTID = slave_pos" in kt2["node2/mariadb/replica.sql"].text
    # CHANGE MASTER only ever on the replica
    assert not any("CHANGE MASTER" in f.text for f in kt2.values() if f.node != "node2")
    assert "node1/mariadb/replica.sql" not in kt2
    assert "GRANT REPLICATION SLAVE ON *.* TO 'replication'@'198.51.100.12'" in kt2[
        "node1/mariadb/replication-primary.sql"].text
    # no semi-sync before there is a replica
    assert "rpl_semi_sync" not in render(plan_for("ktcloud-2node", 4))["node1/mariadb/my.cnf"].text


def test_live_roles_win_after_a_failover() -> None:
    files = render(plan_for("ktcloud-2node", 5, LiveRoles(mariadb_primary="node2", redis_master="node2")))
    assert "read_only = OFF" in files["node2/mariadb/my.cnf"].text
    assert "read_only = ON" in files["node1/mariadb/my.cnf"].text
    assert "MASTER_HOST = '198.51.100.12'" in files["node1/mariadb/replica.sql"].text
    assert "node2/mariadb/replica.sql" not in files
    assert "replicaof 198.51.100.12 6379" in files["node1/redis/redis.conf"].text
    assert "replicaof" not in files["node2/redis/redis.conf"].text
    assert "@198.51.100.12:3306/payments" in files["node1/app.env"].text


def test_redis_and_sentinel(kt2: dict[str, RenderedFile]) -> None:
    master, replica = kt2["node1/redis/redis.conf"].text, kt2["node2/redis/redis.conf"].text
    assert "appendfsync everysec" in master and "maxmemory " in master
    assert "replicaof" not in master and "replicaof 198.51.100.11 6379" in replica
    assert "user app on >{{SECRET:redis_app}}" in master
    sentinels = [f for f in kt2.values() if f.kind is FileKind.SENTINEL_CONF]
    assert {f.node for f in sentinels} == {"node1", "node2", "witness"}
    assert all(f.write_once and f.mode == 0o600 for f in sentinels)
    assert all("sentinel monitor payctl 198.51.100.11 6379 2" in f.text for f in sentinels)


def test_kafka_quorum_and_witness_controller(kt2: dict[str, RenderedFile]) -> None:
    one = render(plan_for("ktcloud-1node", 1))
    assert "controller.quorum.bootstrap.servers=198.51.100.11:9093" in one["node1/kafka/server.properties"].text
    compose = yaml.safe_load(one["node1/docker-compose.yml"].text)
    assert "--standalone" in compose["services"]["kafka-format"]["command"]
    assert kafka_cluster_id("ktcloud-pay") in compose["services"]["kafka-format"]["command"]
    witness = kt2["witness/kafka/controller.properties"].text
    assert "process.roles=controller\n" in witness and "advertised.listeners" not in witness
    assert "default.replication.factor=2" in kt2["node1/kafka/server.properties"].text
    w = yaml.safe_load(kt2["witness/docker-compose.yml"].text)
    assert set(w["services"]) == {"sentinel", "kafka-format", "kafka", "node-exporter"}
    assert "--no-initial-controllers" in w["services"]["kafka-format"]["command"]


def test_nginx_lb(kt2: dict[str, RenderedFile]) -> None:
    text = kt2["node1/nginx/nginx.conf"].text
    assert "server 198.51.100.11:8080 max_fails=" in text and "server 198.51.100.12:8080 max_fails=" in text
    assert "listen 203.0.113.10:80;" in text
    assert re.search(r"keepalive \d+;", text)
    assert "location = /metrics { return 404; }" in text
    [directive] = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("proxy_next_upstream ")]
    assert directive.startswith("proxy_next_upstream error timeout") and "non_idempotent" not in directive


def test_app_env(kt2: dict[str, RenderedFile]) -> None:
    env = dict(line.split("=", 1) for line in kt2["node2/app.env"].text.splitlines() if "=" in line and
               not line.startswith("#"))
    assert env["PAYAPP_DB_URL"] == "mysql://app:{{SECRET:mariadb_app}}@198.51.100.11:3306/payments"
    assert env["PAYAPP_REDIS_SENTINELS"] == "198.51.100.11:26379,198.51.100.12:26379,198.51.100.13:26379"
    assert env["PAYAPP_KAFKA_BOOTSTRAP"] == "198.51.100.11:9092,198.51.100.12:9092"
    assert kt2["node2/app.env"].mode == 0o600


def test_secrets_are_placeholders_or_substituted() -> None:
    plan = plan_for("ktcloud-2node", 5)
    secrets = {name: f"s3cret-{name}" for name in re.findall(
        r"\{\{SECRET:(\w+)\}\}", "".join(f.text for f in render(plan).values()))}
    real = render(plan, secrets)
    assert not any("{{SECRET:" in f.text for f in real.values())
    assert "s3cret-mariadb_replication" in real["node2/mariadb/replica.sql"].text
    with pytest.raises(PayctlError, match="secret 'mariadb_app' is missing"):
        render(plan, {k: v for k, v in secrets.items() if k != "mariadb_app"})
    with pytest.raises(PayctlError, match="unsafe"):
        render(plan, {**secrets, "redis_app": "a b'c"})
    # Every file holding a secret is 0600.
    for f in real.values():
        if any(v in f.text for v in secrets.values()):
            assert f.mode == 0o600, f.key


def test_lab_uses_supervisor_and_vms_use_systemd() -> None:
    lab = render(plan_for("lab-2node", 5))
    assert "node1/supervisor/supervisord.conf" in lab
    assert not any(f.kind is FileKind.SYSTEMD_UNIT or f.kind is FileKind.COMPOSE for f in lab.values())
    data = yaml.safe_load((REPO / "inventories" / "ktcloud-2node.yml").read_text())
    data["runtime"] = "native"
    vm = render(make_plan(parse_inventory(data), load_phase(5)))
    units = [f for f in vm.values() if f.kind is FileKind.SYSTEMD_UNIT]
    assert {"node1/systemd/payctl-mariadb.service", "node1/systemd/payctl-app.service",
            "witness/systemd/payctl-sentinel.service"} <= {f.key for f in units}
    app = vm["node1/systemd/payctl-app.service"].text
    assert "ExecStart=/opt/payctl/current/bin/payapp serve --env-file /opt/payctl/app.env" in app
    assert re.search(r"CPUQuota=\d+%", app) and re.search(r"MemoryMax=\d+M", app)
    results = validate_files({f.key: f for f in units})
    assert all(r.ok for r in results), [(r.key, r.detail) for r in results if not r.ok]


def test_the_hourly_reconciliation_runs_wherever_a_consumer_does_from_phase_2() -> None:
    """Phase 2 is settlement + hourly reconciliation: every node with a consumer runs ``payapp reconcile --schedule``
    (the lease row lets one of them reconcile each hour); phase 1 has neither."""
    for phase in (1, 2, 5):
        plan = plan_for("lab-2node" if phase == 5 else "lab-1node", phase)
        files = render(plan)
        for node in plan.active_nodes:
            conf = files.get(f"{node.name}/supervisor/supervisord.conf")
            text = conf.text if conf is not None else ""
            want = node.consumer is not None
            assert ("[program:payctl-reconcile]" in text) == want, (phase, node.name)
            assert ("[program:payctl-consumer]" in text) == want, (phase, node.name)
            if want:
                assert f"payapp reconcile --schedule --env-file {node.prefix}/app.env" in text
        assert any(n.consumer is not None for n in plan.active_nodes) == (phase >= 2)
    data = yaml.safe_load((REPO / "inventories" / "ktcloud-2node.yml").read_text())
    data["runtime"] = "native"
    vm = render(make_plan(parse_inventory(data), load_phase(5)))
    unit = vm["node2/systemd/payctl-reconcile.service"].text
    assert "payapp reconcile --schedule --env-file" in unit and "Restart=" in unit


def test_every_kafka_jvm_exits_on_out_of_memory_and_a_broker_heap_is_at_least_320_mb() -> None:
    """A broker out of heap stays up thrashing in GC, answering nothing (lab node1 after add-node at a 192 MB heap):
    it must exit so its supervisor restarts it, and a broker's heap is never that small again."""
    data = yaml.safe_load((REPO / "inventories" / "ktcloud-2node.yml").read_text())
    data["runtime"] = "native"
    renders = {"lab": render(plan_for("lab-2node", 5)), "compose": render(plan_for("ktcloud-2node", 5)),
               "systemd": render(make_plan(parse_inventory(data), load_phase(5)))}  # fmt: skip
    seen = []
    for how, files in renders.items():
        for f in files.values():
            for line in f.text.splitlines():
                if "kafka.Kafka" in line or "KAFKA_HEAP_OPTS" in line:
                    seen.append((how, f.key))
                    assert "-XX:+ExitOnOutOfMemoryError" in line, (how, f.key, line)
                    heap = int(re.search(r"-Xmx(\d+)m", line).group(1))  # type: ignore[union-attr]
                    assert heap >= (256 if "witness" in f.key else 320), (how, f.key, line)
    assert {how for how, _ in seen} == set(renders) and len(seen) >= 9, seen


def test_hostile_inventory_strings_never_reach_a_template() -> None:
    data = yaml.safe_load((REPO / "inventories" / "ktcloud-1node.yml").read_text())
    for field, value in (("name", "node1;rm -rf /"), ("private_address", "198.51.100.11\nbind 0.0.0.0")):
        bad = {**data, "nodes": [{**data["nodes"][0], field: value}]}
        with pytest.raises(PayctlError):
            parse_inventory(bad)
    with pytest.raises(PayctlError):
        parse_inventory({**data, "prefix": "/opt/pay ctl/{{ x }}"})


_EXPR = re.compile(r"\{\{(.*?)\}\}|\{%(.*?)%\}", re.S)
_LOGIC = re.compile(r"(?<![\w.])-?\d+\s*[-+*/%]|[-+*/%]\s*\d|\w\s*[+*/%]\s*\w|\bdefault\b|\|\s*d\b")


def _has_logic(expr: str) -> bool:
    code = re.sub(r"'[^']*'|\"[^\"]*\"", "''", expr)  # string literals are not arithmetic
    return bool(_LOGIC.search(code))


@pytest.mark.parametrize(
    ("expr", "bad"),
    [("a * 2", True), ("x | default(1)", True), ("a + b", True), ("n // 2", True), ("x|d('y')", True),
     ("ports.app", False), ("u", False), ("'{{'", False), ("secret('redis_app') | sql_string", False),
     ("for k, v in app.env", False)],
)
def test_logic_detector(expr: str, bad: bool) -> None:
    assert _has_logic(expr) is bad


def test_templates_hold_no_arithmetic_and_no_defaults() -> None:
    offenders = []
    for path in sorted(data_dir("templates").rglob("*.j2")):
        for m in _EXPR.finditer(path.read_text()):
            expr = (m.group(1) or m.group(2) or "").strip()
            if _has_logic(expr):
                offenders.append(f"{path.name}: {expr}")
    assert offenders == []


def _mysql(server: MariaDB, sql: str, *args: str) -> str:
    proc = subprocess.run(
        ["mariadb", f"--defaults-extra-file={server.client_cnf}", "-N", "-B", *args],
        input=sql, capture_output=True, text=True, check=True,
    )
    return proc.stdout


def test_users_sql_runs_on_a_real_mariadb_and_grants_least_privilege(mariadb: MariaDB) -> None:
    plan = plan_for("ktcloud-2node", 5)
    secrets: dict[str, Any] = {n: f"pw-{n}" for n in ("mariadb_app", "mariadb_migrate", "mariadb_exporter",
                                                      "mariadb_replication", "mariadb_root", "mariadb_backup",
                                                      "redis_app",
                                                      "redis_replication", "redis_sentinel", "redis_exporter",
                                                      "grafana_admin")}  # fmt: skip
    files = render(plan, secrets)
    users = files["node1/mariadb/users.sql"].text
    # Not the root removal against the shared test server: only the users and grants.
    users = "\n".join(ln for ln in users.splitlines() if "mysql.global_priv" not in ln)
    _mysql(mariadb, users + "\n" + users)  # twice: idempotent
    _mysql(mariadb, files["node1/mariadb/replication-primary.sql"].text)
    grants = _mysql(mariadb, "SHOW GRANTS FOR 'app'@'198.51.100.12';")
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON `payments`.* TO `app`@`198.51.100.12`" in grants
    assert "ALL PRIVILEGES" not in grants and "CREATE" not in grants
    repl = _mysql(mariadb, "SHOW GRANTS FOR 'replication'@'198.51.100.12';")
    assert "GRANT REPLICATION SLAVE ON *.* TO `replication`@`198.51.100.12`" in repl
    ddl = _mysql(mariadb, "SHOW GRANTS FOR 'migrate'@'198.51.100.11';")
    assert "ALTER" in ddl and "ON `payments`.*" in ddl


@pytest.mark.slow
def test_rendered_server_properties_runs_a_real_kraft_broker(tmp_path: Path) -> None:
    """The rendered node1 server.properties (addresses moved to loopback, data to a temp dir) starts a real Apache
    Kafka broker+controller formatted with --standalone: a dynamic quorum Kafka accepts, not only our key list."""
    from tests.support.kafka import Kafka, KafkaNode

    text = render(plan_for("ktcloud-1node", 1))["node1/kafka/server.properties"].text

    class RenderedKafka(Kafka):
        def _write(self, node: KafkaNode) -> None:
            super()._write(node)  # log4j config and directories
            assert node.port is not None and node.controller_port is not None
            node.properties.write_text(
                text.replace("198.51.100.11:9092", f"127.0.0.1:{node.port}")
                .replace("198.51.100.11:9093", f"127.0.0.1:{node.controller_port}")
                .replace("log.dirs=/var/lib/kafka/data", f"log.dirs={node.base / 'data'}")
            )

    kafka = RenderedKafka(tmp_path / "kafka", cluster_id=kafka_cluster_id("ktcloud-pay"))
    try:
        kafka.start(timeout=120)
        assert "num.partitions=12" in kafka.nodes[0].properties.read_text()
    finally:
        kafka.remove()


def _start_redis(conf: str, base: Path, port: int, master_port: int | None) -> subprocess.Popen[bytes]:
    """Run a rendered redis.conf on loopback: addresses and paths moved, everything else as rendered."""
    base.mkdir(parents=True)
    text = (conf.replace("bind 198.51.100.11 127.0.0.1", "bind 127.0.0.1")
            .replace("bind 198.51.100.12 127.0.0.1", "bind 127.0.0.1")
            .replace("port 6379\n", f"port {port}\n")
            .replace("replica-announce-ip 198.51.100.12", "replica-announce-ip 127.0.0.1")
            .replace("replica-announce-ip 198.51.100.11", "replica-announce-ip 127.0.0.1"))  # fmt: skip
    if master_port is not None:
        text = text.replace("replicaof 198.51.100.11 6379", f"replicaof 127.0.0.1 {master_port}")
    lines = []
    for line in text.splitlines():
        word = line.split(" ", 1)[0]
        lines.append({"dir": f"dir {base}", "logfile": f"logfile {base / 'redis.log'}",
                      "pidfile": f"pidfile {base / 'redis.pid'}"}.get(word, line))  # fmt: skip
    assert "198.51.100" not in "\n".join(lines)
    (base / "redis.conf").write_text("\n".join(lines) + "\n")
    return subprocess.Popen(["redis-server", str(base / "redis.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


@pytest.mark.slow  # the master waits repl-diskless-sync-delay (5 s) before the first full sync
def test_rendered_redis_acls_and_replication_on_real_servers(tmp_path: Path) -> None:
    """Master and replica from the rendered files: the replica syncs with its `replication` user, the app user can
    run the app's rate-limit script, and the other users get only what they need."""
    import os
    import urllib.request

    import redis

    from tests.support.services import free_port, wait_until

    secrets = {n: f"pw-{n}" for n in ("redis_app", "redis_replication", "redis_sentinel", "redis_exporter",
                                      "mariadb_app", "mariadb_migrate", "mariadb_exporter", "mariadb_replication",
                                      "mariadb_root", "mariadb_backup", "grafana_admin")}  # fmt: skip
    files = render(plan_for("ktcloud-2node", 5), secrets)
    mport, rport = free_port(), free_port()
    procs = [_start_redis(files["node1/redis/redis.conf"].text, tmp_path / "master", mport, None)]
    procs.append(_start_redis(files["node2/redis/redis.conf"].text, tmp_path / "replica", rport, mport))
    try:
        def client(port: int, user: str | None = None) -> redis.Redis:
            pw = secrets[f"redis_{user}"] if user else None
            return redis.Redis(port=port, username=user, password=pw, socket_timeout=5)

        wait_until(lambda: _ping(client(mport)) and _ping(client(rport)), 20, "rendered redis servers")
        app = client(mport, "app")
        script = app.register_script("local n = redis.call('INCR', KEYS[1]); redis.call('PEXPIRE', KEYS[1], "
                                     "ARGV[1]); return {n, redis.call('PTTL', KEYS[1])}")  # fmt: skip
        assert script(keys=["rl:m1:authorize"], args=[60000])[0] == 1
        app.set("idem:m1:k1", "x", nx=True, px=10000)
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client(mport).get("idem:m1:k1")  # default user: PING only
        with pytest.raises(redis.exceptions.NoPermissionError):
            client(mport, "replication").get("idem:m1:k1")
        assert "redis_version" in client(mport, "exporter").info()
        wait_until(lambda: client(rport, "exporter").info("replication").get("master_link_status") == "up", 20,
                   "replica link up")  # fmt: skip
        wait_until(lambda: client(rport, "app").get("idem:m1:k1") == b"x", 20, "key replicated")
        with pytest.raises(redis.exceptions.ReadOnlyError):
            client(rport, "app").set("k", "v")
        # A Sentinel from the rendered file, monitoring the master with its own ACL user on both sides.
        sport = free_port()
        sbase = tmp_path / "sentinel"
        sbase.mkdir()
        sconf = files["node1/redis/sentinel.conf"].text
        sconf = (sconf.replace("bind 198.51.100.11", "bind 127.0.0.1").replace("port 26379", f"port {sport}")
                 .replace("announce-ip 198.51.100.11", "announce-ip 127.0.0.1")
                 .replace("198.51.100.11 6379", f"127.0.0.1 {mport}"))  # fmt: skip
        sconf = "\n".join({"dir": f"dir {sbase}", "logfile": f"logfile {sbase / 's.log'}",
                           "pidfile": f"pidfile {sbase / 's.pid'}"}.get(ln.split(" ", 1)[0], ln)
                          for ln in sconf.splitlines()) + "\n"  # fmt: skip
        assert "198.51.100" not in sconf
        (sbase / "sentinel.conf").write_text(sconf)
        procs.append(subprocess.Popen(["redis-sentinel", str(sbase / "sentinel.conf")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))  # fmt: skip
        wait_until(lambda: _ping(client(sport)), 20, "rendered sentinel")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client(sport).execute_command("SENTINEL", "MASTERS")  # default user: PING only
        sentinel = redis.Redis(port=sport, username="sentinel", password=secrets["redis_sentinel"], socket_timeout=5)
        assert sentinel.sentinel_get_master_addr_by_name("payctl") == (b"127.0.0.1", mport)

        def sees_replica() -> bool:
            master = sentinel.sentinel_master("payctl")
            return bool(master["num-slaves"] == 1 and not master["is_sdown"] and not master["is_odown"])

        wait_until(sees_replica, 20, "sentinel authenticated to the master and found the replica")
        # The Debian redis exporter as the rendered `exporter` ACL user: scrapes without a permission error.
        eport = free_port()
        procs.append(subprocess.Popen(["prometheus-redis-exporter", "-redis.addr", f"redis://127.0.0.1:{mport}",
                                       "-redis.user", "exporter", "-web.listen-address", f"127.0.0.1:{eport}"],
                                      env={**os.environ, "REDIS_PASSWORD": secrets["redis_exporter"]},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        scraped: dict[str, str] = {}

        def exporter_scraped() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{eport}/metrics", timeout=3) as resp:
                    text = resp.read().decode()
            except OSError:
                return False
            scraped.update(ln.split(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
            return "redis_up" in scraped

        wait_until(exporter_scraped, 20, "redis exporter scrape")
        assert scraped["redis_up"] == "1"
        errors = {k: v for k, v in scraped.items() if k.startswith("redis_exporter_last_scrape_error")}
        assert errors and all(v == "0" for v in errors.values()), errors
        assert "redis_connected_slaves" in scraped
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _ping(c: Any) -> bool:
    try:
        return bool(c.ping())
    except Exception:
        return False


_UPSTREAM = r"""
import sys, http.server
name, mode, log = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _reply(self, code, body):
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._reply(200, name.encode())
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        open(log, "a").write("post\n")
        if mode == "drop-post":  # a node that dies after receiving the request: nothing comes back
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._reply(200, name.encode())
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[4], int(sys.argv[5])), H).serve_forever()
"""


@pytest.mark.slow
def test_rendered_nginx_balances_and_never_replays_a_sent_post(tmp_path: Path) -> None:
    """lab-2node phase 5 nginx.conf, run by the real nginx inside a namespace of ours holding the lab addresses: GETs
    reach both app nodes, /metrics is not exposed, and a POST that node2 received but never answered is NOT replayed
    on node1 (the client gets 502 and retries with its idempotency key)."""
    import os

    from tests.support.services import wait_until

    conf = render(plan_for("lab-2node", 5))["node1/nginx/nginx.conf"].text
    prefix = tmp_path / "nginx"
    for d in ("run", "logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf)
    ns = f"payctl-test-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        for addr in ("10.77.0.11", "10.77.0.12"):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        for name, addr, mode in (("node1", "10.77.0.11", "ok"), ("node2", "10.77.0.12", "drop-post")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", _UPSTREAM, name, mode,
                                           str(tmp_path / f"{name}.log"), addr, "8080"]))  # fmt: skip
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "nginx", "-p", f"{prefix}/", "-c",
                                       str(prefix / "nginx.conf"), "-g", "daemon off;"]))  # fmt: skip

        def request(method: str, path: str) -> tuple[int, str]:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "python3", "-c",
                 "import sys, http.client; c = http.client.HTTPConnection('10.77.0.11', 80, timeout=5); "
                 "c.request(sys.argv[1], sys.argv[2], body=b'{}' if sys.argv[1] == 'POST' else None); "
                 "r = c.getresponse(); print(r.status, r.read().decode())", method, path],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            status, _, body = out.stdout.strip().partition(" ")
            return int(status), body

        def up() -> bool:
            try:
                return request("GET", "/health")[0] == 200 and request("GET", "/health")[0] == 200
            except subprocess.CalledProcessError:
                return False

        wait_until(up, 20, "nginx and both upstreams in the namespace")
        served = {request("GET", "/payments/1")[1] for _ in range(6)}
        assert served == {"node1", "node2"}
        assert request("GET", "/metrics")[0] == 404
        statuses = [request("POST", "/payments/authorize")[0] for _ in range(6)]
        node1_posts = len((tmp_path / "node1.log").read_text().splitlines()) if (tmp_path / "node1.log").exists() else 0
        node2_posts = len((tmp_path / "node2.log").read_text().splitlines())
        assert node2_posts >= 1 and 502 in statuses  # node2 got a POST and dropped it
        assert statuses.count(200) == node1_posts  # ... and nginx did not replay it on node1
        assert node1_posts + node2_posts == len(statuses)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.slow
def test_rendered_mariadb_primary_and_replica_replicate_with_gtid_and_semisync(tmp_path: Path) -> None:
    """lab-2node phase 5: the rendered my.cnf, users, replication user and CHANGE MASTER, run by real mariadbd in two
    namespaces of ours joined by a veth pair and holding the lab addresses (only the prefix is moved to a temp dir):
    the replica follows the primary by GTID with semi-sync on; the app user cannot write on the read-only replica."""
    import os

    from tests.support.services import wait_until

    secrets = {n: f"pw-{n}" for n in ("mariadb_app", "mariadb_migrate", "mariadb_exporter", "mariadb_replication",
                                      "mariadb_root", "mariadb_backup", "redis_app", "redis_replication",
                                      "redis_sentinel",
                                      "redis_exporter")}  # fmt: skip
    files = render(plan_for("lab-2node", 5), secrets)
    ns = {"node1": f"payctl-tdb1-{os.getpid()}", "node2": f"payctl-tdb2-{os.getpid()}"}
    addr = {"node1": "10.77.0.11", "node2": "10.77.0.12"}
    procs: list[subprocess.Popen[bytes]] = []

    def sql(node: str, statements: str, user: str = "root", host: str = "", names: bool = False) -> str:
        args = ["ip", "netns", "exec", ns[node], "mariadb", "--no-defaults", f"-u{user}"]
        args += [] if names else ["-N", "-B"]
        env = dict(os.environ)
        if host:
            args += [f"-h{host}", "-P3306"]
            env["MYSQL_PWD"] = secrets[f"mariadb_{user}"]
        else:
            args.append(f"--socket={tmp_path / node / 'run' / 'mariadb.sock'}")
        proc = subprocess.run(args, input=statements, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip())
        return proc.stdout

    for name in ns.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", ns["node1"], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                        "netns", ns["node2"]], check=True)  # fmt: skip
        for node in ("node1", "node2"):
            for args in (["link", "set", "lo", "up"], ["addr", "add", f"{addr[node]}/24", "dev", "eth0"],
                         ["link", "set", "eth0", "up"]):  # fmt: skip
                subprocess.run(["ip", "-n", ns[node], *args], check=True)
            for d in ("data/mariadb", "run", "logs", "mariadb"):
                (tmp_path / node / d).mkdir(parents=True, exist_ok=True)
            cnf = tmp_path / node / "mariadb" / "my.cnf"
            cnf.write_text(files[f"{node}/mariadb/my.cnf"].text.replace(f"/var/lib/payctl-lab/{node}",
                                                                         str(tmp_path / node)))  # fmt: skip
            subprocess.run(["mariadb-install-db", f"--defaults-file={cnf}", "--user=root", "--skip-test-db"],
                           check=True, capture_output=True)  # fmt: skip
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns[node], "mariadbd", f"--defaults-file={cnf}",
                                           "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for node in ("node1", "node2"):
            sock = tmp_path / node / "run" / "mariadb.sock"
            wait_until(sock.exists, 60, f"mariadbd {node} (log {tmp_path / node / 'logs'})")
        sql("node1", files["node1/mariadb/users.sql"].text)
        sql("node1", files["node1/mariadb/replication-primary.sql"].text)
        sql("node2", files["node2/mariadb/replica.sql"].text)

        def running() -> bool:
            status = sql("node2", "SHOW SLAVE STATUS\\G", names=True)
            return "Slave_IO_Running: Yes" in status and "Slave_SQL_Running: Yes" in status

        try:
            wait_until(running, 30, "replica threads running")
        except TimeoutError:
            pytest.fail(sql("node2", "SHOW SLAVE STATUS\\G", names=True))
        sql("node1", "CREATE TABLE payments.t (id INT PRIMARY KEY) ENGINE=InnoDB;", user="migrate", host=addr["node1"])
        sql("node1", "INSERT INTO payments.t VALUES (1);", user="app", host=addr["node1"])
        def replicated() -> bool:
            try:
                return sql("node2", "SELECT COUNT(*) FROM payments.t").strip() == "1"
            except RuntimeError:  # the table itself may not have arrived yet
                return False

        wait_until(replicated, 20, "row on the replica")
        assert "Using_Gtid: Slave_Pos" in sql("node2", "SHOW SLAVE STATUS\\G", names=True)
        assert sql("node1", "SELECT @@bind_address").strip() == "10.77.0.11,127.0.0.1"
        assert sql("node1", "SHOW STATUS LIKE 'Rpl_semi_sync_master_status'").split() == [
            "Rpl_semi_sync_master_status", "ON"]
        with pytest.raises(RuntimeError, match="read-only"):
            sql("node2", "INSERT INTO payments.t VALUES (2);", user="app", host=addr["node2"])
        with pytest.raises(RuntimeError, match="command denied"):
            sql("node1", "DROP TABLE payments.t;", user="app", host=addr["node1"])
        # The Debian mysqld exporter with the rendered credentials file reaches the primary as `exporter`.
        exporter_cnf = tmp_path / "node1" / "mariadb" / "exporter.cnf"
        exporter_cnf.write_text(files["node1/mariadb/exporter.cnf"].text)
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns["node1"], "prometheus-mysqld-exporter",
                                       f"--config.my-cnf={exporter_cnf}", "--web.listen-address=10.77.0.11:9104"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip

        def mysql_up() -> bool:
            out = subprocess.run(["ip", "netns", "exec", ns["node1"], "python3", "-c",
                                  "import urllib.request; print(urllib.request.urlopen("
                                  "'http://10.77.0.11:9104/metrics', timeout=3).read().decode())"],
                                 capture_output=True, text=True, check=False)  # fmt: skip
            return "\nmysql_up 1" in out.stdout

        wait_until(mysql_up, 20, "mysqld exporter reporting mysql_up 1")
    finally:
        for p in procs:
            p.terminate()
            p.wait(60)
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_template_error_names_the_template_and_file() -> None:
    import jinja2

    from payctl.render import environment, node_files

    plan = plan_for("ktcloud-1node", 1)
    real = environment()
    broken = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.DictLoader({"mariadb/my.cnf.j2": "x = {{ mariadb.no_such_value }}\n"}),
                                    real.loader]),
        undefined=jinja2.StrictUndefined,
    )
    broken.filters.update(real.filters)
    with pytest.raises(PayctlError, match=r"template mariadb/my.cnf.j2 for node1/mariadb/my.cnf: .*no_such_value"):
        node_files(plan, plan.node("node1"), broken, lambda name: f"{{{{SECRET:{name}}}}}")


def test_rendered_sentinel_answers_clients_on_its_private_address(tmp_path: Path) -> None:
    """Redis's protected mode refuses every non-loopback client while `default` has no password, even clients that
    authenticate: the rendered Sentinel, run in a namespace of ours on the lab address, must answer its peers."""
    import os

    from tests.support.services import wait_until

    conf = render(plan_for("lab-2node", 5), {n: f"pw-{n}" for n in (
        "mariadb_app", "mariadb_migrate", "mariadb_exporter", "mariadb_replication", "mariadb_root", "mariadb_backup",
        "redis_app",
        "redis_replication", "redis_sentinel", "redis_exporter")})["node1/redis/sentinel.conf"].text
    moved = "\n".join({"dir": f"dir {tmp_path}", "logfile": f"logfile {tmp_path / 's.log'}",
                       "pidfile": f"pidfile {tmp_path / 's.pid'}"}.get(ln.split(" ", 1)[0], ln)
                      for ln in conf.splitlines()) + "\n"  # fmt: skip
    (tmp_path / "sentinel.conf").write_text(moved)
    ns = f"payctl-test-snt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.11/32", "dev", "lo"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "redis-sentinel", str(tmp_path / "sentinel.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        def cli(*args: str) -> str:
            env = {**os.environ, "REDISCLI_AUTH": "pw-redis_sentinel"}
            out = subprocess.run(["ip", "netns", "exec", ns, "redis-cli", "-h", "10.77.0.11", "-p", "26379", *args],
                                 capture_output=True, text=True, env=env, check=False)  # fmt: skip
            return out.stdout + out.stderr

        wait_until(lambda: "Connection refused" not in cli("--user", "sentinel", "ping"), 20, "sentinel listening")
        assert cli("--user", "sentinel", "ping").strip() == "PONG"
        assert "10.77.0.11" in cli("--user", "sentinel", "sentinel", "get-master-addr-by-name", "payctl")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize(("inventory", "phase"), [("lab-2node", 5), ("lab-1node", 4), ("ktcloud-2node", 5)])
def test_every_scrape_target_has_a_process_listening_there(inventory: str, phase: int) -> None:
    """Prometheus scrapes only what the rendered files start: each target address:port of prometheus.yml appears as
    a listen address of a supervisor program / compose service (or is the app port, where payapp listens)."""
    plan = plan_for(inventory, phase)
    files = render(plan)
    prom = yaml.safe_load(next(f.text for f in files.values() if f.path == "prometheus/prometheus.yml"))
    started = "\n".join(f.text for f in files.values() if f.kind in (FileKind.SUPERVISOR_CONF, FileKind.COMPOSE))
    env = "\n".join(f.text for f in files.values() if f.kind is FileKind.APP_ENV)
    for job in prom["scrape_configs"]:
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                if job["job_name"] in ("payapp", "relay", "consumer"):
                    assert f"PAYAPP_HOST={host}" in env, target  # payapp's own ports on the node's address
                else:
                    assert target in started or f"{host}:{port}" in started, (job["job_name"], target)


@pytest.mark.parametrize(("inventory", "phase"), [("lab-2node", 5), ("ktcloud-2node", 5)])
def test_firewalls_let_prometheus_and_the_apps_reach_what_they_use(inventory: str, phase: int) -> None:
    plan = plan_for(inventory, phase)
    files = render(plan)
    by_addr = {n.private_address: n.name for n in plan.active_nodes}
    prom_node = next(n for n in plan.active_nodes if n.prometheus is not None)
    prom = yaml.safe_load(files[f"{prom_node.name}/prometheus/prometheus.yml"].text)
    needs: set[tuple[str, str, str]] = set()  # (from node, to node, port)
    for job in prom["scrape_configs"]:
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                needs.add((prom_node.name, by_addr[host], port))
    for node in plan.active_nodes:
        if node.app is None:
            continue
        env = dict(ln.split("=", 1) for ln in files[f"{node.name}/app.env"].text.splitlines() if "=" in ln)
        db = env["PAYAPP_DB_URL"].rsplit("@", 1)[1].split("/")[0]
        redis_master = env["PAYAPP_REDIS_URL"].rsplit("@", 1)[1].split("/")[0]
        for hostport in [db, redis_master, *env["PAYAPP_KAFKA_BOOTSTRAP"].split(",")]:
            host, port = hostport.rsplit(":", 1)
            needs.add((node.name, by_addr[host], port))
    for src, dst, port in sorted(needs):
        if src == dst:
            continue  # a node reaching its own private address goes through lo, which is accepted
        rules = files[f"{dst}/nftables.conf"].text
        peers = rules.split("elements = {", 1)[1].split("}", 1)[0]
        allowed = rules.split("ip saddr @peers tcp dport {", 1)[1].split("}", 1)[0]
        assert plan.node(src).private_address in peers and port in [p.strip() for p in allowed.split(",")], (
            src, dst, port)
