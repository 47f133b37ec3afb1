"""Plan -> rendered config files, with Jinja2 (StrictUndefined, no arithmetic in templates).

``render(plan)`` returns ``{"<node>/<path>": RenderedFile}``; a path is relative to the node's prefix directory. Each
file knows its kind (which real validator reads it, see ``payctl.validate``) and the values the plan asked for, so the
check can compare what the program actually understood with what we meant.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class FileKind(enum.StrEnum):
    MARIADB_CNF = "mariadb_cnf"
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
    GRAFANA_JSON = "grafana_json"
    GRAFANA_YAML = "grafana_yaml"
    SQL = "sql"
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
