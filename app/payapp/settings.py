"""Settings: every ``PAYAPP_*`` variable, read once into a frozen ``Settings``.

Sources, in order of precedence: the process environment, then the file given with ``--env-file`` (``KEY=VALUE``
lines, ``#`` comments, optional ``export`` and quotes), then the defaults below. ``SPECS`` is the one list of
variables, with their parsers and defaults; adding a setting is one line there, one field on ``Settings`` and one
row in docs/api.md's settings table (a test checks every variable is documented).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from payapp.errors import ConfigError

PREFIX = "PAYAPP_"


@dataclass(frozen=True)
class DbTarget:
    """Where a ``mysql://user:pass@host:port/db`` URL points (user and password URL-decoded)."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> DbTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb"):
            raise ValueError("expected mysql://user:pass@host:port/db")
        try:
            port = parts.port or 3306
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        database = parts.path.lstrip("/")
        if not parts.hostname or not database or "/" in database:
            raise ValueError("expected mysql://user:pass@host:port/db (host and database are required)")
        return cls(parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or ""), database)


@dataclass(frozen=True)
class Settings:
    db_url: str
    migrate_db_url: str
    redis_url: str
    kafka_bootstrap: str
    host: str
    port: int
    workers: int
    auth: Literal["off", "apikey"]
    cors_origins: tuple[str, ...]
    rate_limit_authorize: int
    rate_limit_capture: int
    rate_limit_refund: int
    rate_limit_void: int
    rate_limit_fail: Literal["open", "closed"]
    idempotency_lease_seconds: int
    db_pool_size: int
    db_pool_timeout_ms: int
    db_query_timeout_ms: int
    shutdown_timeout: float
    keepalive_timeout: float
    body_timeout: float
    gc_freeze: bool
    gc_threshold: tuple[int, int, int] | None
    json_lib: Literal["orjson", "stdlib"]
    metrics_dir: str
    log_level: str
    access_log: bool
    # Redis through Sentinel (phase 5): the master's address comes from the Sentinels; REDIS_URL gives user/password/db.
    redis_sentinels: tuple[str, ...] = ()  # "host:port" each
    redis_sentinel_master: str = "payctl"
    redis_sentinel_user: str = ""
    redis_sentinel_password: str = ""

    @property
    def db(self) -> DbTarget:
        return DbTarget.parse(self.db_url)

    def rate_limit(self, action: str) -> int:
        """Requests per minute per merchant for one action (authorize, capture, refund, void)."""
        return int(getattr(self, f"rate_limit_{action}"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build Settings from PAYAPP_* variables; every bad value is reported at once in one ConfigError."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for spec in SPECS:
            raw = environ.get(PREFIX + spec.name)
            if raw is None or raw.strip() == "":
                if spec.default is None:
                    problems.append(f"{PREFIX}{spec.name}: required ({spec.doc})")
                    continue
                raw = spec.default
            try:
                values[spec.field] = spec.parse(raw.strip())
            except ValueError as exc:
                problems.append(f"{PREFIX}{spec.name}={raw!r}: {exc}")
        if problems:
            raise ConfigError("invalid payapp settings", "set them in the environment or the --env-file", problems)
        if not values["migrate_db_url"]:
            values["migrate_db_url"] = values["db_url"]
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The PAYAPP_* variables that reproduce these settings (what `payapp serve` hands its workers)."""
        out = {}
        for spec in SPECS:
            value = getattr(self, spec.field)
            out[PREFIX + spec.name] = spec.render(value)
        return out


def load_settings(env_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, falling back to the env file's values, then to the defaults."""
    merged = merged_environ(env_file, environ)
    return Settings.from_env(merged)


def merged_environ(env_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment overlaid on the env file's PAYAPP_* values (the environment wins)."""
    merged = dict(read_env_file(Path(env_file))) if env_file else {}
    merged.update(os.environ if environ is None else environ)
    return merged


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}", "check the --env-file path") from None
    out: dict[str, str] = {}
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            problems.append(f"{path}:{lineno}: expected KEY=VALUE")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    if problems:
        raise ConfigError(f"invalid env file {path}", "each line is KEY=VALUE or a # comment", problems)
    return out


# --- parsers -------------------------------------------------------------------------------------------------------


def _str(raw: str) -> str:
    return raw


def _db_url(raw: str) -> str:
    DbTarget.parse(raw)
    return raw


def _optional_db_url(raw: str) -> str:
    return _db_url(raw) if raw else ""


def _redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected redis://[:password@]host:port/db")
    return raw


def _sentinels(raw: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in (x.strip() for x in raw.split(",") if x.strip()):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port,... (bad entry {item!r})")
        out.append(f"{host}:{int(port)}")
    return tuple(out)


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer {lo}..{hi}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value > 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected on/off (or 1/0, true/false)")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw

    return parse


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError(f"{origin!r} is not an origin like https://shop.example (or *)")
    return origins


def _gc_threshold(raw: str) -> tuple[int, int, int] | None:
    if raw in ("", "default"):
        return None
    parts = raw.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("expected three integers like 50000,20,20 (or 'default')")
    a, b, c = (int(p) for p in parts)
    return (a, b, c)


@dataclass(frozen=True)
class Spec:
    name: str  # without the PAYAPP_ prefix
    field: str
    parse: Callable[[str], Any]
    default: str | None  # None: required
    doc: str

    def render(self, value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if value is None:
            return "default"
        return str(value)


SPECS: tuple[Spec, ...] = (
    Spec("DB_URL", "db_url", _db_url, None, "mysql://user:pass@host:port/db of the service's database"),
    Spec("MIGRATE_DB_URL", "migrate_db_url", _optional_db_url, "",
         "DDL credential for `payapp migrate`; defaults to PAYAPP_DB_URL"),
    Spec("REDIS_URL", "redis_url", _redis_url, "redis://127.0.0.1:6379/0", "Redis for the shared rate limit"),
    Spec("KAFKA_BOOTSTRAP", "kafka_bootstrap", _str, "", "Kafka brokers (host:port,...); only event commands use it"),
    Spec("HOST", "host", _str, "0.0.0.0", "address `payapp serve` listens on"),
    Spec("PORT", "port", int_range(1, 65535), "8080", "port `payapp serve` listens on"),
    Spec("WORKERS", "workers", int_range(1, 256), str(os.cpu_count() or 1),
         "worker processes sharing the port (SO_REUSEPORT); default: one per CPU"),
    Spec("AUTH", "auth", _choice("off", "apikey"), "off",
         "off: trust the merchantId in requests; apikey: Authorization: Bearer <key> decides the merchant"),
    Spec("CORS_ORIGINS", "cors_origins", _origins, "", "comma-separated browser origins allowed to call the API, or *"),
    Spec("RATE_LIMIT_AUTHORIZE", "rate_limit_authorize", int_range(1, 10**9), "30000",
         "authorize requests per minute per merchant"),
    Spec("RATE_LIMIT_CAPTURE", "rate_limit_capture", int_range(1, 10**9), "30000",
         "capture requests per minute per merchant"),
    Spec("RATE_LIMIT_REFUND", "rate_limit_refund", int_range(1, 10**9), "15000",
         "refund requests per minute per merchant"),
    Spec("RATE_LIMIT_VOID", "rate_limit_void", int_range(1, 10**9), "30000", "void requests per minute per merchant"),
    Spec("RATE_LIMIT_FAIL", "rate_limit_fail", _choice("open", "closed"), "open",
         "when Redis is unreachable: open = each worker enforces its share locally; closed = reject with 503"),
    Spec("IDEMPOTENCY_LEASE_SECONDS", "idempotency_lease_seconds", int_range(1, 3600), "10",
         "longest a request may hold its idempotency key idle before MariaDB ends its transaction"),
    Spec("DB_POOL_SIZE", "db_pool_size", int_range(1, 1000), "16", "MariaDB connections per worker"),
    Spec("DB_POOL_TIMEOUT_MS", "db_pool_timeout_ms", int_range(0, 600_000), "0",
         "longest a request waits for a free MariaDB connection before 503 + Retry-After (0: no bound)"),
    Spec("DB_QUERY_TIMEOUT_MS", "db_query_timeout_ms", int_range(0, 600_000), "4000",
         "longest a request holds a MariaDB connection waiting for answers before 503 + Retry-After; the connection "
         "is closed (0: no bound)"),
    Spec("SHUTDOWN_TIMEOUT", "shutdown_timeout", _positive_float, "30",
         "seconds a worker waits for in-flight requests after SIGTERM"),
    Spec("KEEPALIVE_TIMEOUT", "keepalive_timeout", _positive_float, "75", "idle HTTP keep-alive seconds"),
    Spec("BODY_TIMEOUT", "body_timeout", _positive_float, "10",
         "seconds a client may take to send a request body; a slower one gets 408 and is disconnected"),
    Spec("GC_FREEZE", "gc_freeze", _bool, "on", "gc.freeze() after start-up (start-up objects leave the GC's scans)"),
    Spec("GC_THRESHOLD", "gc_threshold", _gc_threshold, "default", "gc.set_threshold(a,b,c), or 'default'"),
    Spec("JSON", "json_lib", _choice("orjson", "stdlib"), "orjson", "JSON library for requests and responses"),
    Spec("METRICS_DIR", "metrics_dir", _str, "",
         "prometheus multiprocess directory; `payapp serve` uses a fresh temporary one when empty"),
    Spec("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Spec("ACCESS_LOG", "access_log", _bool, "off", "log every request (costs throughput)"),
    Spec("REDIS_SENTINELS", "redis_sentinels", _sentinels, "",
         "Sentinels (host:port,...); when set, the Redis master is found through them and REDIS_URL's host is unused"),
    Spec("REDIS_SENTINEL_MASTER", "redis_sentinel_master", _str, "payctl", "the master name the Sentinels monitor"),
    Spec("REDIS_SENTINEL_USER", "redis_sentinel_user", _str, "", "ACL user for the Sentinels (empty: none)"),
    Spec("REDIS_SENTINEL_PASSWORD", "redis_sentinel_password", _str, "", "password of that Sentinel user"),
)

assert {s.field for s in SPECS} == {f.name for f in fields(Settings)}, "SPECS and Settings disagree"
