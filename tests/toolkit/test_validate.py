"""Every validator accepts a good file and rejects a broken one, with the real programs."""

from __future__ import annotations

import json
import subprocess

import pytest

from payctl.render import FileKind, RenderedFile
from payctl.validate import CheckResult, check_kafka_properties, validate_files


def check(kind: FileKind, text: str, path: str = "f", **kw: object) -> CheckResult:
    f = RenderedFile(node="n1", path=path, kind=kind, text=text, **kw)  # type: ignore[arg-type]
    [result] = validate_files({f.key: f}, jobs=1)
    return result


def check_many(*files: RenderedFile) -> dict[str, CheckResult]:
    return {r.key: r for r in validate_files({f.key: f for f in files})}


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith("payctl-chk-")]


# --- MariaDB -------------------------------------------------------------------------------------------------------

MYCNF = "[mysqld]\ninnodb_buffer_pool_size = 1073741824\nmax_connections = 300\nlog_bin = mysql-bin\n"


def test_mariadb_good_file_with_matching_effective_values() -> None:
    r = check(FileKind.MARIADB_CNF, MYCNF, "my.cnf",
              expect={"innodb_buffer_pool_size": "1073741824", "max_connections": "300"})
    assert r.ok, r.detail


def test_mariadb_bad_value_fails_although_mariadbd_exits_0() -> None:
    r = check(FileKind.MARIADB_CNF, "[mysqld]\ninnodb_buffer_pool_size = lots\n", "my.cnf")
    assert not r.ok
    assert "[ERROR]" in r.detail


def test_mariadb_adjusted_value_fails() -> None:
    r = check(FileKind.MARIADB_CNF, "[mysqld]\ninnodb_flush_log_at_trx_commit = 7\n", "my.cnf")
    assert not r.ok
    assert "adjusted to 3" in r.detail


def test_mariadb_unknown_variable_fails() -> None:
    r = check(FileKind.MARIADB_CNF, "[mysqld]\ninnodb_buffer_pool_sise = 1G\n", "my.cnf")
    assert not r.ok


def test_mariadb_effective_value_differs_from_plan() -> None:
    # max_connections is silently capped at 100000; the plan asked for more, so the comparison catches it.
    r = check(FileKind.MARIADB_CNF, "[mysqld]\nmax_connections = 300\n", "my.cnf", expect={"max_connections": "301"})
    assert not r.ok
    assert r.detail == "max_connections: asked 301, mariadbd would use 300"


def test_mariadb_client_option_file() -> None:
    text = "[client]\nuser=exporter\npassword=x\n"
    good = check(FileKind.MARIADB_CLIENT_CNF, text, "c.cnf", expect={"user": "exporter"})
    assert good.ok, good.detail
    assert not check(FileKind.MARIADB_CLIENT_CNF, "[client\nuser=exporter\n", "c.cnf").ok
    assert not check(FileKind.MARIADB_CLIENT_CNF, "[client]\nuser=root\n", "c.cnf", expect={"user": "exporter"}).ok


# --- Redis / Sentinel ------------------------------------------------------------------------------------------------

REDIS = (
    "bind 198.51.100.11 127.0.0.1\nport 6379\ndir /var/lib/payctl/redis-does-not-exist\n"
    "logfile /var/log/nope/redis.log\nmaxmemory 1073741824\nappendonly yes\nappendfsync everysec\n"
    "user default off\nuser app on >{{SECRET:redis_app_password}} ~* +@all -@dangerous\n"
    "replicaof 198.51.100.10 6379\n"
)


def test_redis_good_file_in_a_namespace_on_a_copy() -> None:
    r = check(FileKind.REDIS_CONF, REDIS, "redis/redis.conf", addresses=("198.51.100.11",))
    assert r.ok, r.detail
    assert our_namespaces() == []


def test_redis_unknown_directive_fails() -> None:
    r = check(FileKind.REDIS_CONF, REDIS + "maxmemroy 1gb\n", "redis/redis.conf")
    assert not r.ok
    assert "FATAL CONFIG FILE ERROR" in r.detail


def test_redis_bad_value_fails() -> None:
    r = check(FileKind.REDIS_CONF, REDIS.replace("everysec", "sometimes"), "redis/redis.conf")
    assert not r.ok


SENTINEL = (
    "port 26379\nbind 198.51.100.11\ndir /nope\nsentinel monitor payments 198.51.100.10 6379 2\n"
    "sentinel down-after-milliseconds payments 5000\nsentinel auth-pass payments {{SECRET:redis_sentinel_password}}\n"
)


def test_sentinel_good_and_original_untouched() -> None:
    f = RenderedFile("n1", "redis/sentinel.conf", FileKind.SENTINEL_CONF, SENTINEL, addresses=("198.51.100.11",))
    [r] = validate_files({f.key: f})
    assert r.ok, r.detail


def test_sentinel_bad_statement_fails() -> None:
    r = check(FileKind.SENTINEL_CONF, SENTINEL.replace("sentinel monitor", "sentinel monitr"), "sentinel.conf")
    assert not r.ok
    assert "Unrecognized sentinel configuration statement" in r.detail


# --- nginx -----------------------------------------------------------------------------------------------------------

NGINX = """\
worker_processes 1;
pid run/nginx.pid;
error_log stderr;
events { worker_connections 512; }
http {
  access_log logs/access.log;
  types { application/json json; }
  upstream app { server 198.51.100.11:8080 max_fails=3 fail_timeout=10s; keepalive 16; }
  server {
    listen 203.0.113.10:80;
    location / { proxy_pass http://app; proxy_next_upstream error timeout; }
  }
}
"""


def test_nginx_good_inside_namespace_holding_public_address() -> None:
    r = check(FileKind.NGINX_CONF, NGINX, "nginx/nginx.conf", addresses=("203.0.113.10",),
              runtime_dirs=("nginx/run", "nginx/logs"))
    assert r.ok, r.detail


def test_nginx_without_the_address_fails_to_bind() -> None:
    r = check(FileKind.NGINX_CONF, NGINX, "nginx/nginx.conf", runtime_dirs=("nginx/run", "nginx/logs"))
    assert not r.ok
    assert "bind() to 203.0.113.10:80 failed" in r.detail


def test_nginx_syntax_error_fails() -> None:
    r = check(FileKind.NGINX_CONF, NGINX.replace("keepalive 16;", "keepalive 16"), "nginx/nginx.conf",
              addresses=("203.0.113.10",), runtime_dirs=("nginx/run", "nginx/logs"))
    assert not r.ok
    assert "[emerg]" in r.detail


# --- Prometheus ------------------------------------------------------------------------------------------------------

PROM = """\
global: {scrape_interval: 15s}
rule_files: [rules/payments.yml]
scrape_configs:
  - job_name: app
    static_configs: [{targets: ['198.51.100.10:8080']}]
"""
RULES = """\
groups:
  - name: payments
    rules:
      - alert: HighErrorRate
        expr: sum(rate(payapp_requests_total{status=~"5.."}[5m])) > 0.01
        for: 5m
"""


def test_prometheus_config_with_its_rules() -> None:
    rs = check_many(
        RenderedFile("n1", "prometheus/prometheus.yml", FileKind.PROMETHEUS_CONFIG, PROM),
        RenderedFile("n1", "prometheus/rules/payments.yml", FileKind.PROMETHEUS_RULES, RULES),
    )
    assert all(r.ok for r in rs.values()), rs


def test_prometheus_config_missing_rule_file_fails() -> None:
    r = check(FileKind.PROMETHEUS_CONFIG, PROM, "prometheus/prometheus.yml")
    assert not r.ok


def test_bad_promql_fails() -> None:
    r = check(FileKind.PROMETHEUS_RULES, RULES.replace("[5m]))", "[5m]"), "rules.yml")
    assert not r.ok
    assert "parse error" in r.detail


# --- compose ---------------------------------------------------------------------------------------------------------

COMPOSE = """\
services:
  app:
    image: payapp:local
    env_file: [app.env]
    deploy: {resources: {limits: {cpus: '1.5', memory: 2048M}}}
"""


def test_compose_good_with_env_file_next_to_it() -> None:
    rs = check_many(
        RenderedFile("n1", "docker-compose.yml", FileKind.COMPOSE, COMPOSE),
        RenderedFile("n1", "app.env", FileKind.ENV_FILE, "PAYAPP_PORT=8080\n"),
    )
    assert all(r.ok for r in rs.values()), rs


def test_compose_bad_cpus_fails() -> None:
    rs = check_many(
        RenderedFile("n1", "docker-compose.yml", FileKind.COMPOSE, COMPOSE.replace("'1.5'", "'lots'")),
        RenderedFile("n1", "app.env", FileKind.ENV_FILE, "PAYAPP_PORT=8080\n"),
    )
    assert not rs["n1/docker-compose.yml"].ok


def test_compose_missing_env_file_fails() -> None:
    r = check(FileKind.COMPOSE, COMPOSE, "docker-compose.yml")
    assert not r.ok


# --- nftables, supervisor, systemd -----------------------------------------------------------------------------------

NFT = """\
table inet payctl {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    tcp dport { 22, 80, 443 } accept
  }
}
"""


def test_nft_good_and_syntax_error() -> None:
    assert check(FileKind.NFTABLES, NFT, "nftables.conf").ok
    r = check(FileKind.NFTABLES, NFT.replace("accept\n  }", "acept\n  }"), "nftables.conf")
    assert not r.ok


SUPERVISOR = """\
[supervisord]
logfile=%(here)s/../logs/supervisord.log
pidfile=%(here)s/../run/supervisord.pid
nodaemon=true

[program:redis]
command=/usr/bin/redis-server %(here)s/../redis/redis.conf
autorestart=true
"""


def test_supervisor_good_and_bad() -> None:
    good = check(FileKind.SUPERVISOR_CONF, SUPERVISOR, "supervisor/supervisord.conf", runtime_dirs=("logs", "run"))
    assert good.ok, good.detail
    bad = check(FileKind.SUPERVISOR_CONF, SUPERVISOR.replace("autorestart=true", "autorestart=sometimes"),
                "supervisor/supervisord.conf", runtime_dirs=("logs", "run"))
    assert not bad.ok
    assert "autorestart" in bad.detail or "sometimes" in bad.detail


UNIT = """\
[Unit]
Description=payapp
After=network-online.target

[Service]
ExecStart=/opt/payctl/venv/bin/payapp serve --env-file /opt/payctl/app.env
CPUQuota=200%
MemoryMax=4G
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def test_systemd_unit_good_and_bad() -> None:
    good = check(FileKind.SYSTEMD_UNIT, UNIT, "systemd/payctl-app.service", deploy_paths=("/opt/payctl/",))
    assert good.ok, good.detail
    bad = check(FileKind.SYSTEMD_UNIT, UNIT.replace("200%", "lots"), "systemd/payctl-app.service",
                deploy_paths=("/opt/payctl/",))
    assert not bad.ok
    missing = check(FileKind.SYSTEMD_UNIT, UNIT, "systemd/payctl-app.service")
    assert not missing.ok  # the venv is not under a declared deploy path: the missing binary counts


# --- Kafka, env, JSON, YAML, SQL -------------------------------------------------------------------------------------

KAFKA = """\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=198.51.100.10:9093
listeners=PLAINTEXT://198.51.100.10:9092,CONTROLLER://198.51.100.10:9093
advertised.listeners=PLAINTEXT://198.51.100.10:9092
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=/var/lib/kafka
num.partitions=12
min.insync.replicas=1
"""


def test_kafka_good() -> None:
    assert check_kafka_properties(KAFKA, {"num.partitions": "12"}) == []
    assert check(FileKind.KAFKA_PROPERTIES, KAFKA, "kafka/server.properties").ok


@pytest.mark.parametrize(
    ("mutation", "problem"),
    [
        (("num.partitions=12", "num.partitons=12"), "unknown key num.partitons"),
        (("node.id=1\n", ""), "missing required key node.id"),
        (("controller.quorum.bootstrap.servers", "x.y"), "missing controller.quorum.bootstrap.servers"),
        (("min.insync.replicas=1", "min.insync.replicas=two"), "min.insync.replicas: 'two' is not an integer"),
        (("CONTROLLER://198.51.100.10:9093", "C2://198.51.100.10:9093"), "a controller needs one of"),
    ],
)
def test_kafka_bad(mutation: tuple[str, str], problem: str) -> None:
    text = KAFKA.replace(*mutation)
    assert any(p.startswith(problem) for p in check_kafka_properties(text)), check_kafka_properties(text)
    assert not check(FileKind.KAFKA_PROPERTIES, text, "kafka/server.properties").ok


def test_env_file() -> None:
    assert check(FileKind.ENV_FILE, "# c\nPAYAPP_PORT=8080\n", "app.env", expect={"PAYAPP_PORT": "8080"}).ok
    assert not check(FileKind.ENV_FILE, "payapp port = 8080\n", "app.env").ok
    assert not check(FileKind.ENV_FILE, "PAYAPP_PORT=8081\n", "app.env", expect={"PAYAPP_PORT": "8080"}).ok


def test_dashboard_json() -> None:
    good = {"title": "t", "panels": [{"id": 1, "title": "p95", "type": "timeseries", "gridPos": {},
                                      "targets": [{"expr": "up"}]}]}
    assert check(FileKind.GRAFANA_JSON, json.dumps(good), "d.json").ok
    assert not check(FileKind.GRAFANA_JSON, "{", "d.json").ok
    good["panels"][0]["targets"] = []  # type: ignore[index]
    assert not check(FileKind.GRAFANA_JSON, json.dumps(good), "d.json").ok


def test_grafana_yaml() -> None:
    assert check(FileKind.GRAFANA_YAML, "apiVersion: 1\ndatasources: []\n", "ds.yml").ok
    assert not check(FileKind.GRAFANA_YAML, "apiVersion: [\n", "ds.yml").ok


def test_sql() -> None:
    assert check(FileKind.SQL, "-- x\nCREATE USER 'r'@'%';\nSELECT 1;\n", "a.sql").ok
    assert not check(FileKind.SQL, "SELECT 'x;\n", "a.sql").ok
    assert not check(FileKind.SQL, "SELECT 1\n", "a.sql").ok


def test_namespaces_are_removed_even_after_failures() -> None:
    check(FileKind.NGINX_CONF, "garbage", "nginx/nginx.conf", addresses=("203.0.113.10",))
    assert our_namespaces() == []


def test_app_env_goes_through_payapps_own_parser() -> None:
    good = "PAYAPP_DB_URL=mysql://app:{{SECRET:mariadb_app}}@198.51.100.11:3306/payments\nPAYAPP_WORKERS=2\n"
    r = check(FileKind.APP_ENV, good, "app.env", expect={"PAYAPP_WORKERS": "2"})
    assert r.ok, r.detail
    bad = check(FileKind.APP_ENV, good.replace("PAYAPP_WORKERS=2", "PAYAPP_WORKERS=0"), "app.env")
    assert not bad.ok
    assert "PAYAPP_WORKERS" in bad.detail
    no_db = check(FileKind.APP_ENV, "PAYAPP_WORKERS=2\n", "app.env")
    assert not no_db.ok and "PAYAPP_DB_URL" in no_db.detail


RULE_TEST = """\
rule_files: [payments.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'payapp_requests_total{status="500"}'
        values: '0+10x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: HighErrorRate
        exp_alerts: [{exp_labels: {}}]
"""


def test_promtool_rule_tests_pass_and_fail() -> None:
    rules = RenderedFile("n1", "prometheus/rules/payments.yml", FileKind.PROMETHEUS_RULES, RULES)
    good = RenderedFile("n1", "prometheus/rules/t.yml", FileKind.PROMETHEUS_RULE_TESTS, RULE_TEST)
    rs = check_many(rules, good)
    assert rs["n1/prometheus/rules/t.yml"].ok, rs["n1/prometheus/rules/t.yml"].detail
    # The alert would need 10 more minutes of errors than the input gives: the unit test must fail.
    bad = RenderedFile("n1", "prometheus/rules/t.yml", FileKind.PROMETHEUS_RULE_TESTS,
                       RULE_TEST.replace("eval_time: 15m", "eval_time: 3m"))
    rs = check_many(rules, bad)
    assert not rs["n1/prometheus/rules/t.yml"].ok


def test_leftover_namespace_of_a_dead_payctl_is_reaped_and_others_are_left_alone() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover, foreign = f"payctl-chk-{dead.pid}-1", f"payctl-other-{dead.pid}"
    for name in (leftover, foreign):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert check(FileKind.NFTABLES, NFT, "nftables.conf").ok
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert leftover not in names
        assert foreign in names
    finally:
        for name in (leftover, foreign):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.slow
def test_every_known_kafka_key_is_a_string_in_kafkas_own_jars() -> None:
    """The key list the fast validator trusts is checked against Apache Kafka itself: each key occurs in the class
    files of the broker jars (the ones scripts/fetch-kafka brings); a typo does not."""
    import zipfile

    from payctl.validate import KAFKA_KNOWN
    from tests.support.kafka import ensure_jars

    blobs = []
    for jar in sorted(ensure_jars().glob("kafka*.jar")):
        with zipfile.ZipFile(jar) as z:
            blobs += [z.read(n) for n in z.namelist() if n.endswith(".class")]
    classes = b"\n".join(blobs)
    assert [k for k in sorted(KAFKA_KNOWN) if k.encode() not in classes] == []
    assert b"num.partitons" not in classes  # the check can fail
