"""Plan -> rendered config files, with Jinja2 (StrictUndefined, no arithmetic and no defaults in templates).

``render(plan)`` returns ``{"<node>/<path>": RenderedFile}``; a path is relative to the node's prefix directory (the
deploy engine writes ``<prefix>/<path>``). Each file knows its kind (which real validator reads it, see
``payctl.validate``) and the values the plan asked for, so the check can compare what the program understood with
what we meant. The only I/O is reading templates (package ``payctl.templates``).

Roles come from the plan's topology, which already reflects the live roles read from the hosts: after a failover the
promoted node renders as primary/master. ``sentinel.conf`` is marked write-once: Sentinel rewrites it and a deploy must
never template over a running Sentinel.

Secrets: files hold ``{{SECRET:<name>}}`` placeholders unless a secrets mapping is passed (the deploy engine passes the
revealed values right before writing 0600 files on a node). Golden files hold placeholders.

Every inventory-derived string that reaches a template was validated by the inventory model (node names, addresses,
prefixes are constrained patterns); values that go into SQL, YAML or JSON go through a quoting filter of that format.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jinja2

from payctl import backup
from payctl.backup import BACKUP_GRANTS, BACKUP_USER
from payctl.errors import PayctlError
from payctl.paths import data_dir

if TYPE_CHECKING:
    from payctl.plan import NodePlan, Plan


class FileKind(enum.StrEnum):
    MARIADB_CNF = "mariadb_cnf"
    MARIADB_CLIENT_CNF = "mariadb_client_cnf"
    REDIS_CONF = "redis_conf"
    SENTINEL_CONF = "sentinel_conf"
    NGINX_CONF = "nginx_conf"
    KAFKA_PROPERTIES = "kafka_properties"
    COMPOSE = "compose"
    PROMETHEUS_CONFIG = "prometheus_config"
    PROMETHEUS_RULES = "prometheus_rules"
    PROMETHEUS_RULE_TESTS = "prometheus_rule_tests"
    NFTABLES = "nftables"
    SUPERVISOR_CONF = "supervisor_conf"
    SYSTEMD_UNIT = "systemd_unit"
    ENV_FILE = "env_file"
    APP_ENV = "app_env"
    GRAFANA_JSON = "grafana_json"
    GRAFANA_YAML = "grafana_yaml"
    SQL = "sql"
    TLS_CERT = "tls_cert"
    TLS_KEY = "tls_key"
    TEXT = "text"


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class RenderedFile:
    """One file for one node.

    ``expect``: effective values the plan asked for (validators that can read them back compare).
    ``addresses``: IP addresses the program binds or listens on (the check namespace holds them).
    ``runtime_dirs``: directories, relative to the node's prefix, that exist on the host at run time (the deploy
    creates them); the check creates them in its sandbox.
    ``deploy_paths``: absolute path prefixes that the deploy creates (e.g. the node's prefix): a validator does not
    fail because a file under them is absent at check time.
    ``write_once``: written on first deploy only, never re-templated over a running program (sentinel.conf).
    """

    node: str
    path: str
    kind: FileKind
    text: str
    mode: int = 0o644
    expect: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    addresses: tuple[str, ...] = ()
    runtime_dirs: tuple[str, ...] = ()
    deploy_paths: tuple[str, ...] = ()
    write_once: bool = False
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.node}/{self.path}"


# ---------------------------------------------------------------------------------------------- conventions
# Images, file layout and a few fixed protocol settings. Capacity numbers are not here: they come from the plan.

IMAGES: Mapping[str, str] = {
    "mariadb": "mariadb:10.11",
    "redis": "redis:7.0",
    "kafka": "apache/kafka:4.1.1",
    "nginx": "nginx:1.22",
    "prometheus": "prom/prometheus:v2.42.0",
    "grafana": "grafana/grafana:10.4.2",
    "node_exporter": "prom/node-exporter:v1.5.0",
    "mysqld_exporter": "prom/mysqld-exporter:v0.15.1",
    "redis_exporter": "oliver006/redis_exporter:v1.58.0-alpine",
    "nginx_exporter": "nginx/nginx-prometheus-exporter:1.1.0",
    "app_base": "python:3.11-slim",
}
#: The lab (network namespaces on one machine, see ENVIRONMENT.md) uses this range and nothing else does.
LAB_NETWORK = ipaddress.ip_network("10.77.0.0/24")
DATABASE = "payments"
REPLICATION_USER = "replication"
SEMISYNC_TIMEOUT_MS = 1000  # after this a commit falls back to async; monitoring alerts on it
SENTINEL_DOWN_AFTER_MS = 5000
SENTINEL_FAILOVER_TIMEOUT_MS = 60000
SECRET_RE = re.compile(r"^[A-Za-z0-9_.~-]+$")


def kafka_heap_opts(heap_mb: int) -> str:
    """The broker's heap flags: a fixed heap, and exit on OutOfMemoryError so the supervisor restarts it (a JVM out
    of heap otherwise stays up, thrashing in GC and answering nothing)."""
    return f"-Xms{heap_mb}m -Xmx{heap_mb}m -XX:+ExitOnOutOfMemoryError"


def kafka_cluster_id(deployment: str) -> str:
    """The KRaft cluster id of a deployment: stable (derived from its name), so every node formats the same cluster."""
    raw = uuid.uuid5(uuid.NAMESPACE_URL, f"payctl:{deployment}").bytes
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def is_lab(plan: Plan) -> bool:
    """Native runtime on lab hosts (network namespaces, no systemd: supervisor) rather than on VMs."""
    return plan.runtime == "native" and all(
        ipaddress.ip_address(n.private_address) in LAB_NETWORK for n in plan.nodes
    )


# ---------------------------------------------------------------------------------------------- jinja


def _sql_string(value: object) -> str:
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_ident(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise PayctlError(f"not a safe SQL identifier: {text!r}")
    return f"`{text}`"


def _json(value: object) -> str:
    return json.dumps(value)


def environment() -> jinja2.Environment:
    """The Jinja environment for payctl templates: strict, no autoescape, format-specific quoting filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sql_string"] = _sql_string
    env.filters["sql_ident"] = _sql_ident
    env.filters["yaml_str"] = _json  # a JSON string is a valid YAML double-quoted scalar
    env.filters["json"] = _json
    return env


#: secret(name) -> the value, or a ``{{SECRET:name}}`` placeholder when rendering without secrets.
SecretFn = Callable[[str], str]


def _secret_fn(secrets: Mapping[str, str] | None) -> SecretFn:
    def secret(name: str) -> str:
        if secrets is None:
            return f"{{{{SECRET:{name}}}}}"
        if name not in secrets:
            raise PayctlError(f"secret '{name}' is missing from the deployment's secrets", hint="run the deploy once")
        value = secrets[name]
        if not SECRET_RE.fullmatch(value):
            raise PayctlError(f"secret '{name}' has characters that are unsafe in config files")
        return value

    return secret


# ---------------------------------------------------------------------------------------------- per-node context

NGINX_CONNECT_TIMEOUT_S = 2
NGINX_READ_TIMEOUT_S = 15
PROMETHEUS_SCRAPE_INTERVAL = "15s"
#: Lab hosts only: the node's cgroup figures for the node exporter's textfile collector (paths under the prefix).
LAB_CGROUP_SCRIPT = "exporters/lab-cgroup-metrics.py"
LAB_TEXTFILE_DIR = "run/node-exporter"
LAB_CGROUP_INTERVAL_S = 5  # a few samples per 15 s scrape
#: The Prometheus JMX exporter java agent: packaging/kafka/pom.xml copies it with the broker jars into kafka/lib
#: (native runtime); the compose deploy puts it next to the Kafka config, which the containers mount.
JMX_EXPORTER_JAR = "jmx_prometheus_javaagent-1.0.1.jar"
JMX_EXPORTER_CONFIG = "kafka/jmx-exporter.yml"
#: Alert thresholds: the plan's limits (issue: p95 150 ms, errors 1 %, CPU 85 %).
ALERTS: Mapping[str, object] = MappingProxyType({
    "p95_ms": 150, "p95_seconds": "0.15", "error_ratio": "0.01", "error_percent": 1, "cpu_ratio": "0.85",
    "cpu_percent": 85, "disk_free_ratio": "0.10", "disk_free_percent": 10, "consumer_lag": 1000,
    "outbox_age_s": 60, "replica_lag_s": 30,
})  # fmt: skip
MIB = 1024 * 1024


def _addr_of(plan: Plan) -> dict[str, str]:
    return {n.name: n.private_address for n in plan.nodes}


def _native_paths(prefix: str) -> dict[str, str]:
    return {
        "mariadb_data": f"{prefix}/data/mariadb",
        "mariadb_socket": f"{prefix}/run/mariadb.sock",
        "mariadb_pid": f"{prefix}/run/mariadb.pid",
        "mariadb_log": f"{prefix}/logs/mariadb.err",
        "mariadb_binlog": "mysql-bin",
        "mariadb_relaylog": "relay-bin",
        "redis_data": f"{prefix}/data/redis",
        "redis_log": f"{prefix}/logs/redis.log",
        "redis_pid": f"{prefix}/run/redis.pid",
        "sentinel_dir": f"{prefix}/data/sentinel",
        "sentinel_log": f"{prefix}/logs/sentinel.log",
        "sentinel_pid": f"{prefix}/run/sentinel.pid",
        "kafka_data": f"{prefix}/data/kafka",
        "kafka_lib": f"{prefix}/kafka/lib",
        "app_bin": f"{prefix}/current/bin",  # payctl.releases: current -> releases/<id>
    }


def _compose_paths() -> dict[str, str]:
    return {
        "mariadb_binlog": "mysql-bin",
        "mariadb_relaylog": "relay-bin",
        "kafka_data": "/var/lib/kafka/data",
    }


def _user(name: str, host: str, password: str, *grants: tuple[str, str]) -> dict[str, object]:
    return {"name": name, "host": host, "password": password, "grants": list(grants)}


def _mariadb_context(plan: Plan, node: NodePlan, secret: SecretFn) -> dict[str, object]:
    topo = plan.topology
    addr = _addr_of(plan)
    m = node.mariadb
    assert m is not None
    app_hosts = [n.private_address for n in plan.active_nodes if n.app is not None or n.consumer is not None]
    db_hosts = [addr[name] for name in (topo.mariadb_primary, *topo.mariadb_replicas)]
    users: list[dict[str, object]] = []
    dml = ("SELECT, INSERT, UPDATE, DELETE", f"`{DATABASE}`.*")
    ddl = ("SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, DROP, INDEX, REFERENCES, CREATE VIEW, LOCK TABLES, TRIGGER",
           f"`{DATABASE}`.*")  # fmt: skip
    for host in app_hosts:
        users.append(_user("app", host, secret("mariadb_app"), dml))
        users.append(_user("migrate", host, secret("mariadb_migrate"), ddl))
    # mariabackup on every DB node, over the local socket only (payctl.backup: what mariabackup 10.11 checks for).
    users.append(_user(BACKUP_USER, "localhost", secret("mariadb_backup"), (BACKUP_GRANTS, "*.*")))
    for host in db_hosts:
        users.append(_user("exporter", host, secret("mariadb_exporter"),
                           ("PROCESS, REPLICATION CLIENT, SLAVE MONITOR", "*.*"),
                           ("SELECT", "`performance_schema`.*")))  # fmt: skip
    return {
        "role": m.role,
        "server_id": m.server_id,
        "buffer_pool_bytes": m.innodb_buffer_pool_size_mb * MIB,
        "max_connections": m.max_connections,
        "binlog_expire_seconds": m.binlog_expire_days * 86400,
        "semisync": bool(topo.mariadb_replicas),
        "semisync_timeout_ms": SEMISYNC_TIMEOUT_MS,
        "read_only": m.read_only,
        "primary": {"name": topo.mariadb_primary, "private": m.primary_address},
        "replicas": [{"name": r, "private": addr[r]} for r in topo.mariadb_replicas],
        # Every DB node may replicate from the primary of the day (after a failover the old primary is a replica).
        "db_nodes": [{"name": n, "private": addr[n]} for n in (topo.mariadb_primary, *topo.mariadb_replicas)],
        "database": DATABASE,
        "replication_user": REPLICATION_USER,
        "users": users,
    }


def _context(plan: Plan, node: NodePlan, secret: SecretFn) -> dict[str, Any]:
    from payctl import tls  # imports this module
    from payctl.plan import PORTS

    topo = plan.topology
    addr = _addr_of(plan)
    ctx: dict[str, Any] = {
        "deployment": plan.deployment,
        "phase": plan.phase,
        "runtime": plan.runtime,
        "lab": is_lab(plan),
        "node": {"name": node.name, "private": node.private_address, "public": node.public_address},
        "ports": dict(PORTS),
        "paths": _native_paths(node.prefix) if plan.runtime == "native" else _compose_paths(),
        "secret": secret,
        "alerts": dict(ALERTS),
    }
    if node.mariadb is not None:
        ctx["mariadb"] = _mariadb_context(plan, node, secret)
    if node.redis is not None:
        r = node.redis
        ctx["redis"] = {"role": r.role, "maxmemory_bytes": r.maxmemory_mb * MIB, "maxmemory_policy": r.maxmemory_policy,
                        "master": {"private": r.replicaof or r.master_address}}  # fmt: skip
    if node.sentinel is not None:
        s = node.sentinel
        ctx.setdefault("redis", {})
        ctx["redis"] = {**ctx["redis"], "master_name": s.master_name, "quorum": s.quorum,
                        "master": {"private": s.master_address}, "down_after_ms": SENTINEL_DOWN_AFTER_MS,
                        "failover_timeout_ms": SENTINEL_FAILOVER_TIMEOUT_MS}  # fmt: skip
    if node.kafka is not None:
        k = node.kafka
        ctx["kafka"] = {
            "node_id": k.node_id,
            "process_roles": k.process_roles,
            "broker": "broker" in k.process_roles.split(","),
            "bootstrap_controllers": plan.kafka.controller_quorum_bootstrap,
            "partitions": plan.kafka.partitions,
            "replication_factor": plan.kafka.replication_factor,
            "min_insync_replicas": plan.kafka.min_insync_replicas,
            "retention_hours": k.retention_hours,
            "heap_mb": k.heap_mb,
        }
    if node.nginx is not None:
        n = node.nginx
        ctx["nginx"] = {
            "worker_processes": n.worker_processes,
            "worker_connections": n.worker_connections,
            "listen": n.listen_address,
            "upstreams": list(n.upstreams),
            "upstream_keepalive": n.upstream_keepalive,
            "max_fails": n.max_fails,
            "fail_timeout_s": n.fail_timeout_s,
            "connect_timeout_s": NGINX_CONNECT_TIMEOUT_S,
            "read_timeout_s": NGINX_READ_TIMEOUT_S,
            "pid": "run/nginx.pid",
            "error_log": "logs/error.log" if plan.runtime == "native" else "stderr",
            "access_log": "logs/access.log" if plan.runtime == "native" else "/dev/stdout",
            "temp": "tmp",
            "tls": tls.nginx_context(n.tls),
        }
    if node.app is not None:
        a = node.app
        redis_master = addr[topo.redis_master]
        ctx["app"] = {
            "db_url": f"mysql://app:{secret('mariadb_app')}@{addr[topo.mariadb_primary]}:{PORTS['mariadb']}/{DATABASE}",
            "migrate_db_url": f"mysql://migrate:{secret('mariadb_migrate')}@{addr[topo.mariadb_primary]}:"
            f"{PORTS['mariadb']}/{DATABASE}",
            "redis_url": f"redis://app:{secret('redis_app')}@{redis_master}:{PORTS['redis']}/0",
            "env": _app_env(plan, a.env, secret),
            "base_image": IMAGES["app_base"],
        }
    if node.prometheus is not None:
        p = node.prometheus
        names = {n.private_address: n.name for n in plan.nodes}
        jobs: dict[str, list[dict[str, str]]] = {}
        for job, target in p.targets:
            host = target.rsplit(":", 1)[0]
            jobs.setdefault(job, []).append({"address": target, "node": names.get(host, host)})
        ctx["prometheus"] = {
            "scrape_interval": PROMETHEUS_SCRAPE_INTERVAL,
            "jobs": [{"name": j, "targets": t, "metrics_path": ""} for j, t in jobs.items()],
        }
    monitoring_node = next((n for n in plan.active_nodes if n.prometheus is not None), None)
    if monitoring_node is not None:
        ctx["grafana"] = {
            "prometheus_node": monitoring_node.name,
            "prometheus_url": f"http://{monitoring_node.private_address}:{PORTS['prometheus']}",
        }
    ctx["firewall"] = _firewall(plan, node)
    return ctx


def _app_env(plan: Plan, env: tuple[tuple[str, str], ...], secret: SecretFn) -> list[tuple[str, str]]:
    """The plan's PAYAPP_* settings plus the cluster-wide ones (Kafka, Sentinel) the plan keeps at cluster level."""
    from payctl.plan import PORTS

    topo = plan.topology
    addr = _addr_of(plan)
    extra = [
        ("PAYAPP_KAFKA_BOOTSTRAP", plan.kafka.bootstrap_servers),
        ("PAYAPP_KAFKA_PARTITIONS", str(plan.kafka.partitions)),
        ("PAYAPP_KAFKA_REPLICATION_FACTOR", str(plan.kafka.replication_factor)),
        # payapp creates its topics with this as their own min.insync.replicas, which wins over the broker default.
        ("PAYAPP_KAFKA_MIN_INSYNC_REPLICAS", str(plan.kafka.min_insync_replicas)),
        # The relay's and the consumer's own /metrics (Prometheus scrapes them; the compose healthchecks probe them).
        ("PAYAPP_RELAY_METRICS_PORT", str(PORTS["relay_metrics"])),
        ("PAYAPP_CONSUMER_METRICS_PORT", str(PORTS["consumer_metrics"])),
    ]
    master_name = next((n.sentinel.master_name for n in plan.active_nodes if n.sentinel is not None), "")
    if topo.sentinels and master_name:
        # The app finds the Redis master through Sentinel, authenticating as Sentinel's `sentinel` ACL user.
        extra += [
            ("PAYAPP_REDIS_SENTINELS", ",".join(f"{addr[s]}:{PORTS['sentinel']}" for s in topo.sentinels)),
            ("PAYAPP_REDIS_SENTINEL_MASTER", master_name),
            ("PAYAPP_REDIS_SENTINEL_USER", "sentinel"),
            ("PAYAPP_REDIS_SENTINEL_PASSWORD", secret("redis_sentinel")),
        ]
    have = {k for k, _ in env}
    return [*env, *((k, v) for k, v in extra if k not in have)]


def _firewall(plan: Plan, node: NodePlan) -> dict[str, object]:
    from payctl.plan import PORTS

    public = [22]
    internal: set[int] = set()
    for c in node.components:
        for p in c.ports:
            if p.public:
                public.append(p.port)
            else:
                internal.add(p.port)
    peers = sorted(n.private_address for n in plan.active_nodes if n.name != node.name)
    if node.nginx is not None:
        # The LB answers the public side on 80 (and 443 with TLS) even where the node has no public address (labs).
        public += [PORTS["http"]] + ([PORTS["https"]] if node.nginx.tls else [])
    return {
        "public_ports": sorted(set(public)),
        "internal_ports": sorted(internal - set(public)),
        "peers": peers,
        "forward_policy": "accept" if plan.runtime == "compose" else "drop",
    }


# ---------------------------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class _Program:
    """One long-running process of the native runtime (a systemd unit on VMs, a supervisor program in the lab)."""

    name: str
    component: str
    description: str
    command: str
    env_file: str = ""
    environment: tuple[tuple[str, str], ...] = ()
    user: str = ""
    after: tuple[str, ...] = ()
    stop_timeout_s: int = 30
    start_secs: int = 3
    nofile: int = 65536


def _programs(plan: Plan, node: NodePlan, lab: bool, secret: SecretFn) -> list[_Program]:
    from payctl.plan import PORTS
    from payctl.sizing import broker_metrics

    prefix, priv = node.prefix, node.private_address
    paths = _native_paths(prefix)
    comps = {c.name for c in node.components}
    out: list[_Program] = []
    if "mariadb" in comps:
        user = "root" if lab else "mysql"
        out.append(_Program("payctl-mariadb", "mariadb", "MariaDB",
                            f"/usr/sbin/mariadbd --defaults-file={prefix}/mariadb/my.cnf --user={user}",
                            stop_timeout_s=120, start_secs=5))  # fmt: skip
    if "redis" in comps:
        out.append(_Program("payctl-redis", "redis", "Redis", f"/usr/bin/redis-server {prefix}/redis/redis.conf"))
    if "sentinel" in comps:
        out.append(_Program("payctl-sentinel", "sentinel", "Redis Sentinel",
                            f"/usr/bin/redis-sentinel {prefix}/redis/sentinel.conf"))  # fmt: skip
    if "kafka" in comps and node.kafka is not None:
        heap = node.kafka.heap_mb
        name = "server" if "broker" in node.kafka.process_roles else "controller"
        agent = (f"-javaagent:{paths['kafka_lib']}/{JMX_EXPORTER_JAR}={priv}:{PORTS['kafka_exporter']}:"
                 f"{prefix}/{JMX_EXPORTER_CONFIG} " if broker_metrics(comps) else "")  # fmt: skip
        out.append(_Program("payctl-kafka", "kafka", "Apache Kafka (KRaft)",
                            f"/usr/bin/java {kafka_heap_opts(heap)} {agent}-cp {paths['kafka_lib']}/* kafka.Kafka "
                            f"{prefix}/kafka/{name}.properties", stop_timeout_s=60, start_secs=5))  # fmt: skip
    if "nginx" in comps:
        out.append(_Program("payctl-nginx", "nginx", "nginx load balancer",
                            f'/usr/sbin/nginx -p {prefix}/nginx/ -c {prefix}/nginx/nginx.conf -g "daemon off;"'))
    if "mariadb" in comps and lab:
        # The daily backup (payctl.backup); on VMs a systemd timer runs the same script.
        out.append(_Program("payctl-backup", "mariadb", f"daily MariaDB backup at {backup.SCHEDULE_UTC} UTC",
                            f"/bin/bash {prefix}/mariadb/backup-daily.sh loop", stop_timeout_s=10,
                            start_secs=1))  # fmt: skip
    app_after = tuple(p.name for p in out if p.component in ("mariadb", "redis"))
    for comp, verb, desc in (("app", "serve", "payapp API"), ("relay", "relay", "payapp outbox relay"),
                             ("consumer", "consume", "payapp event consumer")):  # fmt: skip
        if comp in comps:
            out.append(_Program(f"payctl-{comp}", comp, desc,
                                f"{paths['app_bin']}/payapp {verb} --env-file {prefix}/app.env",
                                after=app_after, stop_timeout_s=30))  # fmt: skip
    if "consumer" in comps:
        # The hourly reconciliation, with the consumer's budget (it sleeps between hours): every such node runs it,
        # the lease row `reconcile-schedule` lets exactly one of them reconcile each hour.
        out.append(_Program("payctl-reconcile", "consumer", "payapp hourly reconciliation",
                            f"{paths['app_bin']}/payapp reconcile --schedule --env-file {prefix}/app.env",
                            after=app_after, stop_timeout_s=30))  # fmt: skip
    if "prometheus" in comps and node.prometheus is not None:
        p = node.prometheus
        out.append(_Program("payctl-prometheus", "prometheus", "Prometheus",
                            f"/usr/bin/prometheus --config.file={prefix}/prometheus/prometheus.yml "
                            f"--storage.tsdb.path={prefix}/data/prometheus "
                            f"--storage.tsdb.retention.time={p.retention_days}d "
                            f"--storage.tsdb.retention.size={p.retention_size_gb}GB "
                            f"--web.listen-address={priv}:{PORTS['prometheus']}"))  # fmt: skip
    if "exporters" in comps:
        # Every node the plan lists as a `node` scrape target runs one. Lab hosts share /proc, so there its CPU and
        # memory figures are the whole machine's: a small loop writes the host's own cgroup figures for its textfile
        # collector (templates/exporters/lab-cgroup-metrics.py; the recording rules read them in the lab).
        textfile = f" --collector.textfile.directory={prefix}/{LAB_TEXTFILE_DIR}" if lab else ""
        out.append(_Program("payctl-node-exporter", "exporters", "Prometheus node exporter",
                            f"/usr/bin/prometheus-node-exporter --web.listen-address={priv}:"
                            f"{PORTS['node_exporter']}{textfile}"))  # fmt: skip
        if lab:
            out.append(_Program("payctl-cgroup-metrics", "exporters", "lab host cgroup CPU/memory (textfile)",
                                f"/usr/bin/unshare --mount /usr/bin/python3 {prefix}/{LAB_CGROUP_SCRIPT} "
                                f"--out {prefix}/{LAB_TEXTFILE_DIR}/payctl_lab_cgroup.prom "
                                f"--mount-dir {prefix}/run/cgroup --interval {LAB_CGROUP_INTERVAL_S}"))  # fmt: skip
        if "mariadb" in comps:
            out.append(_Program("payctl-mysqld-exporter", "exporters", "Prometheus MariaDB exporter",
                                f"/usr/bin/prometheus-mysqld-exporter --config.my-cnf={prefix}/mariadb/exporter.cnf "
                                f"--web.listen-address={priv}:{PORTS['mysqld_exporter']}"))  # fmt: skip
        if "redis" in comps:
            out.append(_Program("payctl-redis-exporter", "exporters", "Prometheus Redis exporter",
                                f"/usr/bin/prometheus-redis-exporter -redis.addr redis://{priv}:{PORTS['redis']} "
                                f"-redis.user exporter -web.listen-address {priv}:{PORTS['redis_exporter']}",
                                env_file=f"{prefix}/redis/exporter.env",
                                environment=(("REDIS_PASSWORD", secret("redis_exporter")),) if lab else ()))
        if "nginx" in comps:
            out.append(_Program("payctl-nginx-exporter", "exporters", "Prometheus nginx exporter",
                                f"/usr/bin/prometheus-nginx-exporter -nginx.scrape-uri "
                                f"http://127.0.0.1:{PORTS['nginx_status']}/stub_status "
                                f"-web.listen-address {priv}:{PORTS['nginx_exporter']}"))  # fmt: skip
    return out


def _limits(node: NodePlan, component: str, share: int) -> tuple[float, int]:
    """A component's CPU and memory limits from the plan; exporters split theirs evenly between their processes."""
    c = node.component(component)
    if c is None:
        raise PayctlError(f"the plan has no limits for {component} on {node.name}")
    return round(c.cpus / share, 3), c.memory_mb // share


def _program_context(node: NodePlan, programs: list[_Program], prog: _Program) -> dict[str, object]:
    share = sum(1 for p in programs if p.component == prog.component) if prog.component == "exporters" else 1
    cpus, memory_mb = _limits(node, prog.component, share)
    return {
        "name": prog.name,
        "description": prog.description,
        "command": prog.command,
        "env_file": prog.env_file,
        "environment": list(prog.environment),
        "user": prog.user,
        "after": list(prog.after),
        "stop_timeout_s": prog.stop_timeout_s,
        "start_secs": prog.start_secs,
        "nofile": prog.nofile,
        "cpu_quota_percent": round(cpus * 100),
        "memory_mb": memory_mb,
    }


# ---------------------------------------------------------------------------------------------- compose


def _service(node: NodePlan, name: str, component: str, image: str, share: int = 1, **kw: Any) -> dict[str, Any]:
    cpus, memory_mb = _limits(node, component, share)
    svc: dict[str, Any] = {
        "name": name, "image": image, "build": "", "restart": "unless-stopped", "command": None, "user": "",
        "env_file": None, "environment": [], "volumes": [], "depends_on": [], "healthcheck": None,
        "start_period": "30s", "stop_grace_period": "", "cpus": f"{cpus:g}", "memory": f"{memory_mb}M",
    }  # fmt: skip
    svc.update(kw)
    return svc


def _compose_services(plan: Plan, node: NodePlan) -> tuple[list[dict[str, Any]], list[str]]:
    from payctl.plan import PORTS
    from payctl.sizing import broker_metrics

    priv = node.private_address
    comps = {c.name for c in node.components}
    services: list[dict[str, Any]] = []
    volumes: list[str] = []
    db_deps: list[tuple[str, str]] = []
    if "mariadb" in comps and node.mariadb is not None:
        cb = COMPOSE_BACKUP
        vols = ["./mariadb/my.cnf:/etc/mysql/conf.d/zz-payctl.cnf:ro", "mariadb-data:/var/lib/mysql",
                f"./mariadb/backup.cnf:{cb['cnf']}:ro", f"./mariadb/backup.sh:{cb['script']}:ro",
                f"./mariadb/backup-daily.sh:{cb['daily']}:ro", f"./backups:{cb['backups']}"]  # fmt: skip
        if node.mariadb.role == "primary":
            vols.append("./mariadb/users.sql:/docker-entrypoint-initdb.d/10-users.sql:ro")
        services.append(_service(node, "mariadb", "mariadb", IMAGES["mariadb"], env_file=["mariadb/mariadb.env"],
                                 volumes=vols, stop_grace_period="120s",
                                 healthcheck=["CMD", "healthcheck.sh", "--connect", "--innodb_initialized"]))
        volumes.append("mariadb-data")
        db_deps.append(("mariadb", "service_healthy"))
    if "redis" in comps:
        services.append(_service(node, "redis", "redis", IMAGES["redis"],
                                 command=["redis-server", "/usr/local/etc/redis/redis.conf"],
                                 volumes=["./redis/redis.conf:/usr/local/etc/redis/redis.conf", "redis-data:/data"],
                                 healthcheck=["CMD-SHELL",
                                              f"redis-cli -h {priv} -p {PORTS['redis']} ping | grep -q PONG"]))
        volumes.append("redis-data")
        db_deps.append(("redis", "service_healthy"))
    if "sentinel" in comps:
        services.append(_service(node, "sentinel", "sentinel", IMAGES["redis"],
                                 command=["redis-sentinel", "/etc/payctl/redis/sentinel.conf"],
                                 volumes=["./redis:/etc/payctl/redis"],
                                 healthcheck=["CMD-SHELL",
                                              f"redis-cli -h {priv} -p {PORTS['sentinel']} ping | grep -q PONG"]))
    if "kafka" in comps and node.kafka is not None:
        k = node.kafka
        props = "server" if "broker" in k.process_roles else "controller"
        first = plan.topology.kafka_controllers[:1] == (node.name,)
        fmt = ["--standalone"] if first else ["--no-initial-controllers"]
        services.append(_service(node, "kafka-format", "kafka", IMAGES["kafka"], restart="no",
                                 command=["/opt/kafka/bin/kafka-storage.sh", "format", "--ignore-formatted",
                                          "--cluster-id", kafka_cluster_id(plan.deployment), *fmt,
                                          "--config", f"/etc/payctl/kafka/{props}.properties"],
                                 volumes=["./kafka:/etc/payctl/kafka:ro", "kafka-data:/var/lib/kafka/data"],
                                 start_period="30s"))  # fmt: skip
        check = (f"/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server {priv}:{PORTS['kafka']}"
                 if "broker" in k.process_roles else
                 f"/opt/kafka/bin/kafka-metadata-quorum.sh --bootstrap-controller {priv}:{PORTS['kafka_controller']}"
                 " describe --status")  # fmt: skip
        kenv = [("KAFKA_HEAP_OPTS", kafka_heap_opts(k.heap_mb))]
        if broker_metrics(comps):
            # The agent jar and its rules sit in ./kafka (mounted at /etc/payctl/kafka). The image's tool scripts
            # read KAFKA_OPTS too: the healthcheck clears it, or its JVM would try to bind the agent's port again.
            kenv.append(("KAFKA_OPTS", f"-javaagent:/etc/payctl/kafka/{JMX_EXPORTER_JAR}={priv}:"
                                       f"{PORTS['kafka_exporter']}:/etc/payctl/{JMX_EXPORTER_CONFIG}"))
            check = f"KAFKA_OPTS= {check}"
        services.append(_service(node, "kafka", "kafka", IMAGES["kafka"],
                                 command=["/opt/kafka/bin/kafka-server-start.sh",
                                          f"/etc/payctl/kafka/{props}.properties"],
                                 environment=kenv,
                                 volumes=["./kafka:/etc/payctl/kafka:ro", "kafka-data:/var/lib/kafka/data"],
                                 depends_on=[("kafka-format", "service_completed_successfully")],
                                 healthcheck=["CMD-SHELL", f"{check} >/dev/null"], start_period="60s",
                                 stop_grace_period="60s"))  # fmt: skip
        volumes.append("kafka-data")
        if "broker" in k.process_roles:
            db_deps.append(("kafka", "service_healthy"))
    if "nginx" in comps:
        services.append(_service(node, "nginx", "nginx", IMAGES["nginx"],
                                 command=["nginx", "-p", "/etc/payctl/nginx/", "-c", "/etc/payctl/nginx/nginx.conf",
                                          "-g", "daemon off;"],
                                 volumes=["./nginx:/etc/payctl/nginx"],
                                 healthcheck=["CMD-SHELL", f"curl -fsS http://127.0.0.1:{PORTS['nginx_status']}"
                                              "/stub_status >/dev/null"]))  # fmt: skip
    image = f"payapp:{plan.deployment}"
    local_deps = [d for d in db_deps if d[0] != "kafka"]
    for comp, verb, url in (("app", "serve", f"{PORTS['app']}/health"),
                            ("relay", "relay", f"{PORTS['relay_metrics']}/metrics"),
                            ("consumer", "consume", f"{PORTS['consumer_metrics']}/metrics")):  # fmt: skip
        if comp in comps:
            health = ["CMD", "python", "-c", f"import urllib.request; urllib.request.urlopen('http://{priv}:{url}', "
                      "timeout=2)"]  # fmt: skip
            # Each of the three names the same build: compose would otherwise try to pull payapp:<deployment> for
            # relay/consumer from a registry (the image exists only once built on the node).
            services.append(_service(node, comp, comp, image, build="./payapp",
                                     command=["payapp", verb], env_file=["app.env"], depends_on=list(local_deps),
                                     healthcheck=health, stop_grace_period="30s"))
    if "consumer" in comps:
        # The hourly reconciliation (as payctl-reconcile on the native runtime): no port, so no healthcheck; the
        # consumer's limits are its caps (it sleeps between hours).
        services.append(_service(node, "reconcile", "consumer", image, build="./payapp",
                                 command=["payapp", "reconcile", "--schedule"], env_file=["app.env"],
                                 depends_on=list(local_deps), stop_grace_period="30s"))
    if "prometheus" in comps and node.prometheus is not None:
        p = node.prometheus
        services.append(_service(node, "prometheus", "prometheus", IMAGES["prometheus"],
                                 command=["--config.file=/etc/prometheus/prometheus.yml",
                                          "--storage.tsdb.path=/prometheus",
                                          f"--storage.tsdb.retention.time={p.retention_days}d",
                                          f"--storage.tsdb.retention.size={p.retention_size_gb}GB",
                                          f"--web.listen-address={priv}:{PORTS['prometheus']}"],
                                 volumes=["./prometheus:/etc/prometheus:ro", "prometheus-data:/prometheus"],
                                 healthcheck=["CMD", "wget", "-qO-", f"http://{priv}:{PORTS['prometheus']}/-/ready"]))
        volumes.append("prometheus-data")
    if "grafana" in comps:
        services.append(_service(node, "grafana", "grafana", IMAGES["grafana"], env_file=["grafana/grafana.env"],
                                 environment=[("GF_SERVER_HTTP_ADDR", priv),
                                              ("GF_SERVER_HTTP_PORT", str(PORTS["grafana"])),
                                              ("GF_AUTH_ANONYMOUS_ENABLED", "false")],
                                 volumes=["./grafana/provisioning:/etc/grafana/provisioning:ro",
                                          "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
                                          "grafana-data:/var/lib/grafana"],
                                 healthcheck=["CMD", "wget", "-qO-", f"http://{priv}:{PORTS['grafana']}/api/health"]))

        volumes.append("grafana-data")
    if "exporters" in comps:
        exporters: list[tuple[str, str, dict[str, Any]]] = [
            ("node-exporter", "node_exporter", {
                "command": [f"--web.listen-address={priv}:{PORTS['node_exporter']}", "--path.rootfs=/host"],
                "volumes": ["/:/host:ro,rslave"]}),
        ]  # fmt: skip
        if "mariadb" in comps:
            exporters.append(("mysqld-exporter", "mysqld_exporter", {
                "command": ["--config.my-cnf=/etc/payctl/exporter.cnf", f"--mysqld.address={priv}:{PORTS['mariadb']}",
                            f"--web.listen-address={priv}:{PORTS['mysqld_exporter']}"],
                "volumes": ["./mariadb/exporter.cnf:/etc/payctl/exporter.cnf:ro"]}))  # fmt: skip
        if "redis" in comps:
            exporters.append(("redis-exporter", "redis_exporter", {
                "env_file": ["redis/exporter.env"],
                "environment": [("REDIS_ADDR", f"redis://{priv}:{PORTS['redis']}"), ("REDIS_USER", "exporter"),
                                ("REDIS_EXPORTER_WEB_LISTEN_ADDRESS", f"{priv}:{PORTS['redis_exporter']}")]}))
        if "nginx" in comps:
            exporters.append(("nginx-exporter", "nginx_exporter", {
                "command": [f"--nginx.scrape-uri=http://127.0.0.1:{PORTS['nginx_status']}/stub_status",
                            f"--web.listen-address={priv}:{PORTS['nginx_exporter']}"]}))  # fmt: skip
        for name, img, kw in exporters:
            port = PORTS[img]
            if name != "nginx-exporter":  # its image has no shell or HTTP client; nginx's own check covers it
                kw["healthcheck"] = ["CMD", "wget", "-qO-", f"http://{priv}:{port}/metrics"]
            services.append(_service(node, name, "exporters", IMAGES[img], share=len(exporters), **kw))
    return services, volumes


# ---------------------------------------------------------------------------------------------- files


def _env_text(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{k}={v}\n" for k, v in pairs)


def node_files(plan: Plan, node: NodePlan, env: jinja2.Environment, secret: SecretFn) -> list[RenderedFile]:
    """Every file of one node for the plan's phase."""
    from payctl.sizing import broker_metrics
    lab = is_lab(plan)
    ctx = _context(plan, node, secret)
    comps = {c.name for c in node.components}
    prefix = node.prefix
    files: list[RenderedFile] = []

    def add(template: str, path: str, kind: FileKind, description: str, **kw: Any) -> None:
        extra = kw.pop("context", {})
        try:
            text = env.get_template(template).render(**ctx, **extra)
        except jinja2.TemplateError as exc:
            raise PayctlError(
                f"template {template} for {node.name}/{path}: {exc}",
                hint="a template and the plan disagree (StrictUndefined): fix the template or the render context",
            ) from exc
        files.append(RenderedFile(node.name, path, kind, text, description=description, **kw))

    if node.mariadb is not None:
        m = node.mariadb
        expect = {
            "innodb_buffer_pool_size": str(m.innodb_buffer_pool_size_mb * MIB),
            "max_connections": str(m.max_connections),
            "server_id": str(m.server_id),
            "read_only": "ON" if m.read_only else "OFF",
            "gtid_strict_mode": "ON",
            "log_slave_updates": "ON",
            "binlog_format": "ROW",
            "sync_binlog": "1",
            "innodb_flush_log_at_trx_commit": "1",
        }
        add("mariadb/my.cnf.j2", "mariadb/my.cnf", FileKind.MARIADB_CNF, f"MariaDB {m.role}", expect=expect)
        if m.role == "primary":
            add("mariadb/users.sql.j2", "mariadb/users.sql", FileKind.SQL, "database and least-privilege users",
                mode=0o600)
            if plan.topology.mariadb_replicas:
                add("mariadb/replication-primary.sql.j2", "mariadb/replication-primary.sql", FileKind.SQL,
                    "replication user (primary only)", mode=0o600)
        else:
            add("mariadb/replica.sql.j2", "mariadb/replica.sql", FileKind.SQL,
                "CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos (replica only)", mode=0o600)
        if "exporters" in comps:
            # host: the exporter user exists for the node's private address only (not for localhost).
            port = str(ctx["ports"]["mariadb"])
            files.append(RenderedFile(node.name, "mariadb/exporter.cnf", FileKind.MARIADB_CLIENT_CNF,
                                      f"[client]\nuser=exporter\npassword={secret('mariadb_exporter')}\n"
                                      f"host={node.private_address}\nport={port}\n",
                                      mode=0o600, description="mysqld exporter credentials",
                                      expect={"user": "exporter", "host": node.private_address, "port": port}))

        files += _backup_files(plan, node, lab, secret)
        if plan.runtime == "compose":
            files.append(RenderedFile(node.name, "mariadb/mariadb.env", FileKind.ENV_FILE,
                                      _env_text([("MARIADB_ROOT_PASSWORD", secret("mariadb_root")),
                                                 ("MARIADB_ROOT_HOST", "localhost"),
                                                 ("MARIADB_AUTO_UPGRADE", "1")]),
                                      mode=0o600, description="MariaDB container settings (root password)"))
    if node.redis is not None:
        add("redis/redis.conf.j2", "redis/redis.conf", FileKind.REDIS_CONF, f"Redis {node.redis.role}", mode=0o600,
            addresses=(node.private_address,))
        if "exporters" in comps:
            files.append(RenderedFile(node.name, "redis/exporter.env", FileKind.ENV_FILE,
                                  _env_text([("REDIS_PASSWORD", secret("redis_exporter"))]),
                                  mode=0o600, description="redis exporter credentials"))  # fmt: skip
    if node.sentinel is not None:
        add("redis/sentinel.conf.j2", "redis/sentinel.conf", FileKind.SENTINEL_CONF,
            "initial Sentinel config (write-once)", mode=0o600, write_once=True, addresses=(node.private_address,))
    if node.kafka is not None:
        k = node.kafka
        name = "server" if "broker" in k.process_roles else "controller"
        kexpect = {"node.id": str(k.node_id), "process.roles": k.process_roles}
        if "broker" in k.process_roles:
            kexpect |= {"num.partitions": str(plan.kafka.partitions),
                        "min.insync.replicas": str(plan.kafka.min_insync_replicas),
                        "default.replication.factor": str(plan.kafka.replication_factor)}  # fmt: skip
        add("kafka/server.properties.j2", f"kafka/{name}.properties", FileKind.KAFKA_PROPERTIES,
            f"Kafka {k.process_roles}", expect=kexpect)
        if broker_metrics(comps):
            add("kafka/jmx-exporter.yml.j2", JMX_EXPORTER_CONFIG, FileKind.TEXT, "Kafka JMX exporter rules")
    if node.nginx is not None:
        add("nginx/nginx.conf.j2", "nginx/nginx.conf", FileKind.NGINX_CONF, "load balancer",
            addresses=(node.nginx.listen_address, node.private_address),
            runtime_dirs=("nginx/run", "nginx/logs", "nginx/tmp"))
    if node.app is not None:
        add("app/app.env.j2", "app.env", FileKind.APP_ENV, "payapp settings", mode=0o600,
            expect={k: v for k, v in node.app.env})
    if node.prometheus is not None:
        add("prometheus/prometheus.yml.j2", "prometheus/prometheus.yml", FileKind.PROMETHEUS_CONFIG, "scrape config")
        add("prometheus/payctl.rules.yml.j2", "prometheus/rules/payctl.rules.yml", FileKind.PROMETHEUS_RULES,
            "alert rules")
        add("prometheus/payctl.rules.test.yml.j2", "prometheus/rules/payctl.rules.test.yml",
            FileKind.PROMETHEUS_RULE_TESTS, "alert rule unit tests")
    if "grafana" in comps and plan.runtime == "compose":  # Grafana is not packaged for the native runtime
        add("grafana/datasource.yml.j2", "grafana/provisioning/datasources/prometheus.yml", FileKind.GRAFANA_YAML,
            "Grafana datasource")
        add("grafana/dashboards.yml.j2", "grafana/provisioning/dashboards/payctl.yml", FileKind.GRAFANA_YAML,
            "Grafana dashboard provider")
        add("grafana/payments.json.j2", "grafana/dashboards/payments.json", FileKind.GRAFANA_JSON, "dashboard")
        files.append(RenderedFile(node.name, "grafana/grafana.env", FileKind.ENV_FILE,
                                  _env_text([("GF_SECURITY_ADMIN_PASSWORD", secret("grafana_admin"))]),
                                  mode=0o600, description="Grafana admin password"))  # fmt: skip
    if lab and "exporters" in comps:  # a plain script (no Jinja): the same file on every lab host
        script = (data_dir("templates") / LAB_CGROUP_SCRIPT).read_text()
        files.append(RenderedFile(node.name, LAB_CGROUP_SCRIPT, FileKind.TEXT, script, mode=0o755,
                                  description="lab host cgroup CPU/memory for the node exporter"))  # fmt: skip
    add("firewall/nftables.conf.j2", "nftables.conf", FileKind.NFTABLES, "firewall")

    if plan.runtime == "compose":
        services, volumes = _compose_services(plan, node)
        project = {"project": f"payctl-{plan.deployment}", "services": services, "volumes": volumes,
                   "log_max_size": "50m", "log_max_files": "3"}  # fmt: skip
        needs = (*(("payapp",) if node.app is not None else ()), *(("backups",) if node.mariadb is not None else ()))
        add("compose/docker-compose.yml.j2", "docker-compose.yml", FileKind.COMPOSE, "Docker Compose project",
            context={"compose": project}, runtime_dirs=needs)
        if node.app is not None:
            add("app/Dockerfile.j2", "payapp/Dockerfile", FileKind.TEXT, "payapp image (built on the node)")
    else:
        programs = _programs(plan, node, lab, secret)
        pctx = [_program_context(node, programs, p) for p in programs]
        if lab:
            add("supervisor/supervisord.conf.j2", "supervisor/supervisord.conf", FileKind.SUPERVISOR_CONF,
                "supervisor (lab host)", mode=0o600, context={"programs": pctx}, runtime_dirs=("logs", "run"))
        else:
            for p in pctx:
                add("systemd/unit.service.j2", f"systemd/{p['name']}.service", FileKind.SYSTEMD_UNIT,
                    f"systemd unit {p['name']}", context={"program": p}, deploy_paths=(f"{prefix}/",))
    return files


#: Inside the MariaDB container of a compose deployment: the mounted backup files and the backups volume.
COMPOSE_BACKUP: Mapping[str, str] = MappingProxyType({
    "cnf": "/etc/payctl/backup/backup.cnf", "script": "/etc/payctl/backup/backup.sh",
    "daily": "/etc/payctl/backup/backup-daily.sh", "backups": "/var/backups/payctl",
    "lock": "/var/backups/payctl/.backup.lock", "socket": "/run/mysqld/mysqld.sock", "datadir": "/var/lib/mysql",
})  # fmt: skip


def payapp_bin(prefix: str) -> str:
    """The bin directory of the node's current payapp release (native runtime)."""
    return _native_paths(prefix)["app_bin"]


def mariadb_datadir(prefix: str) -> str:
    """The MariaDB datadir of a native DB node (``payctl restore --force`` swaps it)."""
    return _native_paths(prefix)["mariadb_data"]


def backup_layout(node: NodePlan) -> backup.NodeLayout:
    """Where a native DB node keeps its backup account's option file, lock and (app nodes) payapp's python."""
    python = f"{payapp_bin(node.prefix)}/python" if node.app is not None else ""
    return backup.NodeLayout(f"{node.prefix}/mariadb/backup.cnf", f"{node.prefix}/run/backup.lock", python)


def backup_retention(node: NodePlan) -> backup.Retention:
    """Retention from the plan's ``backups`` disk item of the node."""
    gb = next((i.gb for i in node.disk.items if i.name == "backups"), None) if node.disk is not None else None
    return backup.retention_for(gb)


def _backup_files(plan: Plan, node: NodePlan, lab: bool, secret: SecretFn) -> list[RenderedFile]:
    """The backup account's option file, the backup script and the daily schedule (payctl.backup). Compose: the
    same files mounted into the MariaDB container (``COMPOSE_BACKUP``), backups in ``<prefix>/backups``."""
    p = node.prefix
    native = plan.runtime == "native"
    c = COMPOSE_BACKUP
    sock, data = ((_native_paths(p)["mariadb_socket"], _native_paths(p)["mariadb_data"]) if native else
                  (c["socket"], c["datadir"]))  # fmt: skip
    auth = f"user={BACKUP_USER}\npassword={secret('mariadb_backup')}\nsocket={sock}\n"
    layout = backup_layout(node) if native else backup.NodeLayout(c["cnf"], c["lock"])
    script = f"{p}/mariadb/backup.sh" if native else c["script"]
    daily = f"{p}/mariadb/backup-daily.sh" if native else c["daily"]
    out = [
        RenderedFile(node.name, "mariadb/backup.cnf", FileKind.MARIADB_CLIENT_CNF,
                     f"[client]\n{auth}[mariabackup]\n{auth}datadir={data}\n",
                     mode=0o600, description="backup account (mariabackup, socket only)",
                     expect={"user": BACKUP_USER, "socket": sock}),
        RenderedFile(node.name, "mariadb/backup.sh", FileKind.TEXT, backup.node_script(layout), mode=0o700,
                     description="one online backup: mariabackup + binlogs + sha256 (payctl backup runs it too)"),
        RenderedFile(node.name, "mariadb/backup-daily.sh", FileKind.TEXT,
                     backup.daily_script(script, f"{p}/backups" if native else c["backups"], backup_retention(node)),
                     mode=0o700, description=f"daily backup at {backup.SCHEDULE_UTC} UTC with retention"),
    ]  # fmt: skip
    if not lab:
        if native:
            start, after = f"/bin/bash {daily} once", "payctl-mariadb.service"
        else:
            start = (f"/usr/bin/docker compose -p payctl-{plan.deployment} -f {p}/docker-compose.yml exec -T mariadb "
                     f"/bin/bash {daily} once")  # fmt: skip
            after = "docker.service"
        service, timer = backup.systemd_units(start, after)
        out += [
            RenderedFile(node.name, "mariadb/payctl-backup.service", FileKind.SYSTEMD_UNIT, service,
                         description="daily backup (oneshot)",
                         deploy_paths=(f"{p}/",) if native else ("/usr/bin/docker",)),  # compose: apt docker-ce
            RenderedFile(node.name, "mariadb/payctl-backup.timer", FileKind.SYSTEMD_UNIT, timer,
                         description=f"daily backup timer ({backup.SCHEDULE_UTC} UTC)"),
        ]  # fmt: skip
    return out


def render(plan: Plan, secrets: Mapping[str, str] | None = None) -> dict[str, RenderedFile]:
    """Every file of every active node for the plan's phase, keyed by ``<node>/<path>``, in key order."""
    env = environment()
    secret = _secret_fn(secrets)
    files: dict[str, RenderedFile] = {}
    for node in plan.active_nodes:
        for f in node_files(plan, node, env, secret):
            files[f.key] = f
    return dict(sorted(files.items()))
