"""Inventories: the hosts of one deployment, loaded once into frozen, validated objects.

``load_inventory(path_or_name)`` reads a YAML file (a bare name such as ``lab-1node`` finds the bundled file; a path
wins when it exists) and returns an ``Inventory`` or raises ONE ``ConfigError`` listing every problem by its path in
the file (``nodes[1].memory_gb: must be > 0``). Inventory files are data that ends up in templates and shell commands,
so every string is constrained: node names by a pattern, addresses parsed by ``ipaddress``, paths absolute and free
of whitespace, quotes, ``$`` and backticks. Nothing here touches a host or needs the SSH key files to exist.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from payctl.errors import ConfigError
from payctl.paths import data_dir, payctl_home

Role = Literal["app", "consumer", "mariadb", "redis", "kafka", "lb", "monitoring", "witness"]
Runtime = Literal["compose", "native"]
Component = Literal[
    "app", "relay", "consumer", "mariadb", "redis", "sentinel", "kafka", "nginx", "prometheus", "exporters", "grafana"
]

ROLES: tuple[Role, ...] = ("app", "consumer", "mariadb", "redis", "kafka", "lb", "monitoring", "witness")
# Roles some node must carry in every inventory (monitoring is required by the phases that need it, see plan.py).
REQUIRED_ROLES: tuple[Role, ...] = ("app", "consumer", "mariadb", "redis", "kafka", "lb")
# One load balancer (the node holding the public address) and one Prometheus per deployment.
SINGLE_ROLES: tuple[Role, ...] = ("lb", "monitoring")

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Absolute or relative paths of plain characters: nothing a shell or a template could interpret.
PATH_RE = re.compile(r"^[A-Za-z0-9._/+-]+$")

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _check_path(value: str, *, absolute: bool) -> str:
    if not PATH_RE.fullmatch(value):
        raise ValueError("must be a plain path (letters, digits, . _ / + -; no whitespace, quotes, $ or backticks)")
    if absolute and not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if ".." in PurePosixPath(value).parts:
        raise ValueError("must not contain '..'")
    return value.rstrip("/") or "/"


def _check_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an IP address written as a string")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        raise ValueError(f"{value} cannot address a host (unspecified, loopback or multicast)")
    return str(addr)


class SSH(BaseModel):
    """How payctl reaches a node over SSH."""

    model_config = _FROZEN

    user: str = Field(default="root", description="Login user on the node.")
    key: str = Field(
        default=...,
        description="Private key file: absolute, `~/...`, or relative to PAYCTL_HOME (default ./.payctl); "
        "lab inventories use lab/id_ed25519, which `payctl lab up` generates. Need not exist for plan/render/dry-run.",
    )
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not USER_RE.fullmatch(v):
            raise ValueError(f"must match {USER_RE.pattern}")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v.startswith("~/"):
            return "~/" + _check_path(v[2:], absolute=False)
        return _check_path(v, absolute=False)

    def key_path(self, home: Path | None = None) -> Path:
        """The key file: absolute as written, ``~/`` in the user's home, or relative to ``home`` (PAYCTL_HOME)."""
        p = Path(self.key).expanduser()
        return p if p.is_absolute() else (home or payctl_home()) / p


class Node(BaseModel):
    """One host of the deployment."""

    model_config = _FROZEN

    name: str = Field(..., description="Node name, `^[a-z][a-z0-9-]{0,30}$` (node1, node2, witness).")
    public_address: str | None = Field(
        default=None, description="Public IP address; absent for a node reachable only through a jump host."
    )
    private_address: str = Field(..., description="Private IP address; the nodes talk to each other on it.")
    ssh: SSH = Field(..., description="SSH access: {user, key, port}.")
    via: str | None = Field(default=None, description="Name of the node used as SSH jump host (e.g. node2 via node1).")
    cpus: float = Field(..., gt=0, le=512, description="CPUs of the node (the plan keeps an OS reserve).")
    memory_gb: float = Field(..., gt=0, le=4096, description="Memory of the node in GB.")
    disk_gb: float = Field(..., gt=0, le=100_000, description="Disk of the node in GB (the plan budgets it).")
    roles: tuple[Role, ...] = Field(
        default=...,
        min_length=1,
        description="What the node runs: app, consumer, mariadb, redis, kafka, lb, monitoring; or witness alone "
        "(a small host with a Redis Sentinel and a Kafka controller only).",
    )
    prefix: str | None = Field(
        default=None,
        description="Overrides the inventory's prefix for this node (lab hosts share one filesystem, so each has "
        "its own).",
    )

    @field_validator("name", "via")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.fullmatch(v):
            raise ValueError(f"must match {NAME_RE.pattern}")
        return v

    @field_validator("public_address", mode="before")
    @classmethod
    def _public(cls, v: object) -> str | None:
        return None if v is None else _check_address(v)

    @field_validator("private_address", mode="before")
    @classmethod
    def _private(cls, v: object) -> str:
        return _check_address(v)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        return None if v is None else _check_path(v, absolute=True)

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: tuple[Role, ...]) -> tuple[Role, ...]:
        dupes = sorted({r for r in v if v.count(r) > 1})
        if dupes:
            raise ValueError(f"duplicate role(s) {', '.join(dupes)}")
        if "witness" in v and len(v) > 1:
            raise ValueError("a witness carries no other role (it runs only a Redis Sentinel and a Kafka controller)")
        return v

    @property
    def is_witness(self) -> bool:
        return "witness" in self.roles

    @property
    def address(self) -> str:
        """The address payctl connects to: public when the node has one, else private (through ``via``)."""
        return self.public_address or self.private_address


class RateLimits(BaseModel):
    """Requests per minute per merchant, one counter for the whole cluster."""

    model_config = _FROZEN

    authorize: int = Field(default=30000, gt=0, description="Authorize requests per minute per merchant.")
    capture: int = Field(default=30000, gt=0, description="Capture requests per minute per merchant.")
    refund: int = Field(default=15000, gt=0, description="Refund requests per minute per merchant.")
    void: int = Field(default=30000, gt=0, description="Void requests per minute per merchant.")


class Overrides(BaseModel):
    """Values that replace the plan's own choices (each is checked like the computed ones)."""

    model_config = _FROZEN

    cpus: dict[Component, float] = Field(
        default_factory=dict,
        description="CPU limit per component on every node that runs it, e.g. {app: 2, mariadb: 0.5}; the other "
        "components share what is left.",
    )
    memory_mb: dict[Component, int] = Field(
        default_factory=dict, description="Memory limit in MB per component on every node that runs it."
    )
    app_workers: int | None = Field(default=None, ge=1, le=64, description="App worker processes per node.")
    db_pool_per_worker: int | None = Field(default=None, ge=1, le=200, description="DB connections per app worker.")
    kafka_partitions: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Partitions per topic; fixed at the first deployment (keys must not move).",
    )
    average_rps: float | None = Field(
        default=None,
        gt=0,
        description="Average request rate used for data volumes (binlog, Kafka, backups); default 10 % of "
        "target_rps, which is a peak. A lab that only runs short gates can say so here.",
    )
    rate_limits: RateLimits | None = Field(default=None, description="Replaces the phase's rate limits.")
    allow_overcommit: bool = Field(
        default=False,
        description="Turn CPU/memory/disk over-commit from an error into a warning (as --allow-overcommit).",
    )

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: dict[Component, float]) -> dict[Component, float]:
        bad = [k for k, c in v.items() if not 0 < c <= 512]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be > 0 and <= 512")
        return v

    @field_validator("memory_mb")
    @classmethod
    def _mem(cls, v: dict[Component, int]) -> dict[Component, int]:
        bad = [k for k, m in v.items() if not 16 <= m <= 4_194_304]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be >= 16 and <= 4194304")
        return v


class TLS(BaseModel):
    """HTTPS at the load balancer (nginx on the `lb` node). Off: plain HTTP on 80. On: HTTPS on 443 (TLSv1.2 and
    TLSv1.3 only, HSTS) and HTTP on 80 answers only with a redirect to HTTPS."""

    model_config = _FROZEN

    enabled: bool = Field(default=False, description="Serve HTTPS on 443 and redirect HTTP on 80 to it.")
    certificate: str | None = Field(
        default=None,
        description="Local PEM certificate (with its chain) that payctl ships to the lb node: absolute, `~/...`, or "
        "relative to PAYCTL_HOME. Absent (with `key`): a self-signed pair is generated under "
        "PAYCTL_HOME/<deployment>/tls/ (for labs). Need not exist for plan/render/dry-run.",
    )
    key: str | None = Field(
        default=None,
        description="Local PEM private key of `certificate`, same path rules; shipped with mode 0600. Need not exist "
        "for plan/render/dry-run.",
    )

    @field_validator("certificate", "key")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v.startswith("~/"):
            return "~/" + _check_path(v[2:], absolute=False)
        return _check_path(v, absolute=False)

    @model_validator(mode="after")
    def _pair(self) -> TLS:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("give both certificate and key, or neither (a self-signed pair is then generated)")
        return self

    def certificate_path(self, home: Path | None = None) -> Path | None:
        return None if self.certificate is None else _local_path(self.certificate, home)

    def key_path(self, home: Path | None = None) -> Path | None:
        return None if self.key is None else _local_path(self.key, home)


class Firewall(BaseModel):
    """The node firewall payctl renders for every node (`nftables.conf`, its own table `inet payctl`): SSH, and HTTP
    (HTTPS with TLS) on the LB node, from anywhere; DB, Redis, Sentinel, Kafka, the app, exporters and Prometheus
    only from the deployment's other nodes' private addresses (payctl itself reaches them through SSH). Other tables
    (Docker's, the distribution's) are left alone."""

    model_config = _FROZEN

    enabled: bool = Field(
        default=True,
        description="Load the rendered rules on every node during apply (`nft -f`, atomic; again only when the file "
        "changed or the table is gone). Off: the file is still rendered and written, not loaded.",
    )


def _local_path(value: str, home: Path | None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (home or payctl_home()) / p


class Inventory(BaseModel):
    """The hosts of one deployment and how to run on them."""

    model_config = _FROZEN

    deployment: str = Field(
        default=...,
        description="Deployment name, `^[a-z][a-z0-9-]{0,30}$`. The 1-node and 2-node inventories of one "
        "deployment share it; secrets, lock and audit are keyed by it.",
    )
    runtime: Runtime = Field(
        default=...,
        description="compose: Docker Compose on VMs; native: Debian packages under systemd, or supervisor in the lab.",
    )
    target_rps: int = Field(..., gt=0, le=1_000_000, description="Requests per second the deployment must carry.")
    prefix: str = Field(default="/opt/payctl", description="Directory for configs, data, logs on every node.")
    overrides: Overrides = Field(default=Overrides(), description="Replace the plan's own choices.")
    tls: TLS = Field(default=TLS(), description="HTTPS at the load balancer (see below); default off.")
    firewall: Firewall = Field(default=Firewall(), description="The node firewall (nftables, see below); default on.")
    nodes: tuple[Node, ...] = Field(..., min_length=1, description="The hosts (a list).")

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"must match {NAME_RE.pattern}")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return _check_path(v, absolute=True)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_prefix(self, name: str) -> str:
        """The node's own prefix, else the inventory's."""
        return self.node(name).prefix or self.prefix

    def with_role(self, role: Role) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if role in n.roles)


# --------------------------------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml(text: str) -> Any:
    """Parse YAML data safely, rejecting duplicate keys; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass


_MODELS: dict[str, type[BaseModel]] = {
    "": Inventory,
    "nodes": Node,
    "ssh": SSH,
    "overrides": Overrides,
    "rate_limits": RateLimits,
    "tls": TLS,
    "firewall": Firewall,
}


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _owner_model(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    names = [p for p in loc if isinstance(p, str)]
    return _MODELS.get(names[-1] if names else "")


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        model = _owner_model(loc[:-1])
        key = str(loc[-1])
        close = difflib.get_close_matches(key, list(model.model_fields) if model else [], n=1)
        return "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g}" if isinstance(bound, int | float) else f"must be {op} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


def validation_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors as ``path: message`` lines (``nodes[1].memory_gb: must be > 0``)."""
    problems = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        # pydantic also says "too short after validation" for a list whose items failed: only noise then.
        if err["type"] == "too_short" and any(tuple(o["loc"])[: len(loc)] == loc and o is not err for o in errors):
            continue
        # pydantic adds the literal's value to the path of dict keys: drop that noise (e.g. cpus.`foo`.[key]).
        loc = tuple(p for p in loc if p != "[key]")
        problems.append(f"{_loc(loc) or '(top level)'}: {_message(err)}")
    return problems


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cross_problems(data: Mapping[str, Any]) -> list[str]:
    """Checks across nodes, on the raw data so they are reported together with the per-field problems."""
    problems: list[str] = []
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list | tuple):
        return problems
    nodes = [n if isinstance(n, dict) else {} for n in raw_nodes]
    seen_names: dict[str, int] = {}
    seen_addrs: dict[str, str] = {}
    for i, node in enumerate(nodes):
        name = _str(node.get("name"))
        if name is not None:
            if name in seen_names:
                problems.append(f"nodes[{i}].name: duplicate node name '{name}' (also nodes[{seen_names[name]}])")
            seen_names.setdefault(name, i)
        for field in ("public_address", "private_address"):
            raw = _str(node.get(field))
            try:
                addr = str(ipaddress.ip_address(raw)) if raw is not None else None
            except ValueError:
                addr = None  # reported by the field check
            if addr is None:
                continue
            where = f"nodes[{i}].{field}"
            if addr in seen_addrs:
                problems.append(f"{where}: duplicate address {addr} (also {seen_addrs[addr]})")
            else:
                seen_addrs[addr] = where
    by_name = {_str(n.get("name")): n for n in nodes}
    for i, node in enumerate(nodes):
        via = _str(node.get("via"))
        if via is None:
            continue
        if via == _str(node.get("name")):
            problems.append(f"nodes[{i}].via: a node cannot be its own jump host")
        elif via not in by_name:
            names = ", ".join(sorted(n for n in by_name if n))
            problems.append(f"nodes[{i}].via: unknown node '{via}' (nodes: {names})")
        elif by_name[via].get("via") is not None:
            problems.append(f"nodes[{i}].via: jump host '{via}' itself needs a jump host (one hop only)")
    carried: set[object] = set()
    for n in nodes:
        roles = n.get("roles")
        if isinstance(roles, list | tuple):
            carried.update(r for r in roles if isinstance(r, str))
    for role in REQUIRED_ROLES:
        if role not in carried:
            problems.append(f"nodes: no node has the role '{role}'")
    for role in SINGLE_ROLES:
        holders = [
            f"nodes[{i}]"
            for i, n in enumerate(nodes)
            if isinstance(n.get("roles"), list | tuple) and role in n["roles"]
        ]
        if len(holders) > 1:
            problems.append(f"nodes: only one node may have the role '{role}' ({', '.join(holders)} do)")
    for i, node in enumerate(nodes):
        roles = node.get("roles")
        witness = isinstance(roles, list | tuple) and "witness" in roles
        cpus, mem, disk = _num(node.get("cpus")), _num(node.get("memory_gb")), _num(node.get("disk_gb"))
        if not witness and cpus is not None and 0 < cpus < 1:
            problems.append(f"nodes[{i}].cpus: a node running services needs at least 1 CPU, got {cpus:g}")
        if not witness and mem is not None and 0 < mem < 1:
            problems.append(f"nodes[{i}].memory_gb: a node running services needs at least 1 GB, got {mem:g}")
        if disk is not None and 0 < disk < 2:
            problems.append(f"nodes[{i}].disk_gb: at least 2 GB are needed, got {disk:g}")
    return problems


def _sibling_problems(inv: Inventory, path: Path) -> list[str]:
    """A node present in two inventories of one deployment must be described identically."""
    problems: list[str] = []
    for other in sorted(path.parent.glob("*.yml")):
        if other.resolve() == path.resolve():
            continue
        try:
            data = yaml.safe_load(other.read_text())
            sibling = Inventory.model_validate(data)
        except (OSError, yaml.YAMLError, ValidationError):
            continue  # a broken sibling reports its own problems when it is loaded
        if sibling.deployment != inv.deployment:
            continue
        for key in ("runtime", "prefix"):
            mine, theirs = getattr(inv, key), getattr(sibling, key)
            if mine != theirs:
                problems.append(f"{key}: '{mine}' but {other.name} (same deployment) says '{theirs}'")
        theirs_by_name = {n.name: n for n in sibling.nodes}
        their_index = {n.name: j for j, n in enumerate(sibling.nodes)}
        for i, node in enumerate(inv.nodes):
            twin = theirs_by_name.get(node.name)
            if twin is not None and their_index[node.name] != i:
                # server_id and Kafka node.id come from the position: it must not change when a node is added.
                problems.append(
                    f"nodes[{i}] ({node.name}): is nodes[{their_index[node.name]}] in {other.name} (same deployment); "
                    "keep shared nodes first and in the same order"
                )
            if twin is None or twin == node:
                continue
            mine_d, theirs_d = node.model_dump(), twin.model_dump()
            diffs = [f"{k} {mine_d[k]!r} vs {theirs_d[k]!r}" for k in mine_d if mine_d[k] != theirs_d[k]]
            problems.append(
                f"nodes[{i}] ({node.name}): described differently in {other.name} (same deployment): {'; '.join(diffs)}"
            )
    return problems


def resolve_inventory_path(path_or_name: str | Path) -> Path:
    """A path that exists wins; otherwise a bare name (``lab-1node`` or ``lab-1node.yml``) finds the bundled file."""
    p = Path(path_or_name)
    if p.exists():
        return p
    name = p.name if p.suffix in (".yml", ".yaml") else f"{p.name}.yml"
    if p.parent == Path("."):
        bundled = data_dir("inventories") / name
        if bundled.exists():
            return bundled
    return p


def bundled_inventories() -> list[str]:
    return sorted(p.stem for p in data_dir("inventories").glob("*.yml"))


def parse_inventory(data: object, source: str = "inventory") -> Inventory:
    """Validate already-parsed YAML data (no sibling check); raises one ConfigError with every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the inventory must be a mapping (deployment, runtime, target_rps, nodes ...)",
            hint="see docs/inventory.md for the keys",
        )
    problems: list[str] = []
    inv: Inventory | None = None
    try:
        inv = Inventory.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
    problems += _cross_problems(data)
    if problems or inv is None:
        raise ConfigError(
            f"{source}: invalid inventory",
            hint="fix the keys listed above; docs/inventory.md describes every key",
            problems=problems,
        )
    return inv


def load_inventory(path_or_name: str | Path) -> Inventory:
    """Read and validate an inventory file; raises one ConfigError (exit 2) listing every problem."""
    path = resolve_inventory_path(path_or_name)
    if not path.is_file():
        raise ConfigError(
            f"inventory not found: {path_or_name}",
            hint=f"give a path to a YAML file, or a bundled inventory name: {', '.join(bundled_inventories())}",
        )
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path}: invalid YAML{where}: {problem}",
            hint="fix the YAML (indentation, a missing ':', an unclosed quote, a key given twice)",
        ) from None
    inv = parse_inventory(data, str(path))
    problems = _sibling_problems(inv, path)
    if problems:
        raise ConfigError(
            f"{path}: inventory disagrees with another inventory of deployment '{inv.deployment}'",
            hint="a node that appears in the 1-node and 2-node inventories must be described identically",
            problems=problems,
        )
    return inv


# --------------------------------------------------------------------------------------------------- reference doc

_DOC_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("top level", Inventory),
    ("nodes[]", Node),
    ("nodes[].ssh", SSH),
    ("overrides", Overrides),
    ("overrides.rate_limits", RateLimits),
    ("tls", TLS),
    ("firewall", Firewall),
)

_DOC_HEAD = """\
# Inventory reference

<!-- Generated by payctl.inventory.inventory_reference() from the pydantic models; do not edit by hand.
     Regenerate: .venv/bin/pytest tests/toolkit/test_inventory.py --update-golden -->

An inventory describes the hosts of one deployment: `inventories/*.yml`, or any YAML file given with `-i`. A bare
name (`-i lab-1node`) finds the inventory bundled with payctl; a path that exists wins. Unknown keys are errors (with
a suggestion), and every problem is reported at once by its path (`nodes[1].memory_gb: must be > 0`), exit code 2.

Rules beyond the types below:

- node names and `deployment` match `^[a-z][a-z0-9-]{0,30}$`; addresses are IP addresses (parsed, not resolved);
  paths use only letters, digits and `. _ / + -` (nothing a shell or template could interpret), `prefix` absolute;
- node names and addresses are unique; `via` names another node, which itself has no `via` (one hop);
- some node carries each of the roles app, consumer, mariadb, redis, kafka and lb (monitoring: from phase 4); at
  most one node carries lb, and at most one monitoring;
  a `witness` carries no other role; a node running services has at least 1 CPU and 1 GB; every node 2 GB of disk;
- inventories of one deployment in the same folder (1-node and 2-node) agree on `runtime` and `prefix`, and a node
  present in both is described identically and at the same position (MariaDB `server_id` and Kafka `node.id` come
  from it);
- SSH key files and TLS certificate/key files need not exist for `plan`, `render` or dry-runs.
"""


def _type_name(annotation: object) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map {_type_name(args[0])} → {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (see below)"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "all defaults"
    if value is None:
        return "none"
    if value == {} or value == ():
        return "empty"
    return f"`{value}`"


def _bounds(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                out.append(f"{op} {bound:g}" if isinstance(bound, float) else f"{op} {bound}")
    return f" ({', '.join(out)})" if out else ""


def inventory_reference() -> str:
    """docs/inventory.md: every key with its type, default and meaning, from the models themselves."""
    parts = [_DOC_HEAD]
    for title, model in _DOC_SECTIONS:
        doc = (model.__doc__ or "").strip()
        parts.append(f"\n## `{title}`\n\n{doc}\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for name, info in model.model_fields.items():
            meaning = (info.description or "").replace("|", "\\|")
            parts.append(
                f"| `{name}` | {_type_name(info.annotation)}{_bounds(info)} | {_default(info)} | {meaning} |\n"
            )
    parts.append("\n## Example (`inventories/lab-2node.yml`)\n\n```yaml\n")
    parts.append((data_dir("inventories") / "lab-2node.yml").read_text())
    parts.append("```\n")
    return "".join(parts)
