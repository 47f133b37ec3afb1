"""Which process reads which file, and what a change to it costs: the restart model of the native runtime.

A rendered file (path relative to the node's prefix) is read by one or more programs (supervisor programs in the
lab, systemd units on VMs; both are named ``payctl-<component>``). When the file changes, exactly those programs are
restarted, or reloaded where the program can re-read its config without dropping work (nginx, Prometheus: SIGHUP).
Files nobody re-reads at runtime (SQL applied once, write-once Sentinel config, the firewall file) restart nothing.
Artefacts that are not rendered files (the payapp release ``current`` points at, the Kafka jars) are modelled the
same way. ``payctl upgrade``/``rollback`` switch ``current`` themselves, node by node, and restart ``APP_PROGRAMS``.

Pure data and functions: the deploy engine asks ``effects(changed_paths, programs)`` and gets the restart/reload
sets; the preview shows the same sets the apply then executes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Action = Literal["restart", "reload"]

#: The payapp programs and the plan attribute of a node that runs them (``payctl-reconcile``: the hourly reconciliation,
#: ``payapp reconcile --schedule``, wherever a consumer runs; the lease row lets one node run each hour).
APP_PROGRAM_OF = (("app", "payctl-app"), ("relay", "payctl-relay"), ("consumer", "payctl-consumer"),
                  ("consumer", "payctl-reconcile"))  # fmt: skip
APP_PROGRAMS = tuple(program for _, program in APP_PROGRAM_OF)


def app_programs_of(node: object) -> tuple[str, ...]:
    """The payapp programs a plan node runs (its ``app``/``relay``/``consumer`` plans that are not None)."""
    return tuple(program for attr, program in APP_PROGRAM_OF if getattr(node, attr) is not None)

#: Artefacts that are not rendered files but change what a program runs.
RELEASE = "current"  # the payapp release (a virtualenv from the wheelhouse) that <prefix>/current points at
KAFKA_LIB = "kafka/lib"  # the Kafka jar bundle


@dataclass(frozen=True)
class Reader:
    programs: tuple[str, ...]
    action: Action = "restart"


#: Path pattern (relative to the prefix) -> who reads it and how a change reaches them. First match wins.
READERS: Mapping[str, Reader] = MappingProxyType({
    "mariadb/my.cnf": Reader(("payctl-mariadb",)),
    "mariadb/exporter.cnf": Reader(("payctl-mysqld-exporter",)),
    "mariadb/*.sql": Reader(()),  # applied with the mariadb client when it changes (users are idempotent SQL)
    "redis/redis.conf": Reader(("payctl-redis",)),
    "redis/exporter.env": Reader(("payctl-redis-exporter",)),
    "redis/sentinel.conf": Reader(()),  # write-once: Sentinel owns it after the first start
    "kafka/*.properties": Reader(("payctl-kafka",)),
    "kafka/jmx-exporter.yml": Reader(("payctl-kafka",)),  # the JMX exporter agent reads it at JVM start
    KAFKA_LIB: Reader(("payctl-kafka",)),
    "nginx/nginx.conf": Reader(("payctl-nginx",), "reload"),
    "nginx/tls/*": Reader(("payctl-nginx",), "reload"),  # certificate and key (payctl.tls): SIGHUP re-reads them
    "app.env": Reader(APP_PROGRAMS),
    RELEASE: Reader(APP_PROGRAMS),
    "prometheus/prometheus.yml": Reader(("payctl-prometheus",), "reload"),
    "prometheus/rules/*.rules.yml": Reader(("payctl-prometheus",), "reload"),
    "prometheus/rules/*.test.yml": Reader(()),  # promtool's unit tests, not read by Prometheus
    "exporters/lab-cgroup-metrics.py": Reader(("payctl-cgroup-metrics",)),  # lab hosts only (payctl.render)
    "nftables.conf": Reader(()),  # loaded by nft when applied, not by a service
    "supervisor/supervisord.conf": Reader(()),  # `supervisorctl update` restarts the programs whose section changed
    "systemd/*.service": Reader(()),  # handled per unit: the unit named by the file restarts (see unit_of)
    "docker-compose.yml": Reader(()),  # compose recreates the services whose definition changed
})  # fmt: skip

_UNIT = re.compile(r"^systemd/(?P<name>[A-Za-z0-9_.@-]+)\.service$")
_PROGRAM = re.compile(r"^\[program:(?P<name>[A-Za-z0-9_.-]+)\]\s*$", re.M)


def reader(path: str) -> Reader:
    """Who reads ``path``; an unknown file restarts nothing (and is listed as changed)."""
    for pattern, r in READERS.items():
        if fnmatch.fnmatchcase(path, pattern):
            return r
    return Reader(())


def unit_of(path: str) -> str | None:
    """``systemd/payctl-app.service`` -> ``payctl-app``."""
    m = _UNIT.match(path)
    return m.group("name") if m else None


def supervisor_programs(conf_text: str) -> tuple[str, ...]:
    """The program names a rendered supervisord.conf defines, in file order."""
    return tuple(m.group("name") for m in _PROGRAM.finditer(conf_text))


@dataclass(frozen=True)
class Effects:
    restart: tuple[str, ...]
    reload: tuple[str, ...]

    @property
    def any(self) -> bool:
        return bool(self.restart or self.reload)


def effects(changed: Iterable[str], programs: Iterable[str]) -> Effects:
    """The programs (of those that exist on the node) to restart and to reload for these changed paths.

    A program that is restarted is not also reloaded.
    """
    present = tuple(programs)
    restart: set[str] = set()
    reload: set[str] = set()
    for path in changed:
        unit = unit_of(path)
        if unit is not None:
            restart.add(unit)
            continue
        r = reader(path)
        (restart if r.action == "restart" else reload).update(r.programs)
    order = {p: i for i, p in enumerate(present)}
    return Effects(
        tuple(sorted((p for p in restart if p in order), key=order.__getitem__)),
        tuple(sorted((p for p in reload - restart if p in order), key=order.__getitem__)),
    )


def component_of(program: str) -> str:
    """``payctl-mysqld-exporter`` -> ``mysqld-exporter``; the name users pass to --component."""
    return program.removeprefix("payctl-")


def files_for_component(component: str, paths: Iterable[str]) -> list[str]:
    """The rendered paths whose readers include ``payctl-<component>`` (for ``apply --only``)."""
    program = f"payctl-{component}"
    return [p for p in paths if program in reader(p).programs or unit_of(p) == program]
