"""The rendered Redis ACL of the app user, applied to a real redis-server: what the app and payctl's facts need."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from payctl.inventory import load_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import render
from payctl.secrets import SECRET_NAMES
from tests.support.services import free_port, wait_until


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    values = {name: f"pw{i}" for i, name in enumerate(SECRET_NAMES)}
    files = render(make_plan(load_inventory("lab-1node"), load_phase(3)), values)
    conf = next(f.text for path, f in files.items() if path.endswith("redis/redis.conf"))
    app_user = next(line for line in conf.splitlines() if line.startswith("user app "))
    base: Path = tmp_path_factory.mktemp("redis-acl")
    port = free_port()
    (base / "redis.conf").write_text(
        f"bind 127.0.0.1\nport {port}\ndir {base}\nsave \"\"\nuser default off\n{app_user}\n"
    )
    proc = subprocess.Popen(["redis-server", str(base / "redis.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                return bool(redis.Redis(port=port, username="app", password=values["redis_app"]).ping())
            except redis.RedisError:
                return False

        wait_until(up, 20, "redis with the rendered app ACL")
        yield port, values["redis_app"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_app_user_can_read_the_replication_role(acl_redis: tuple[int, str]) -> None:
    # payctl's facts read live roles as the app user: without INFO, a re-apply could not see a Sentinel failover.
    port, password = acl_redis
    client = redis.Redis(port=port, username="app", password=password)
    assert client.info("replication")["role"] == "master"


def test_app_user_runs_the_rate_limit_script_but_nothing_dangerous(acl_redis: tuple[int, str]) -> None:
    port, password = acl_redis
    client = redis.Redis(port=port, username="app", password=password)
    assert client.eval("return redis.call('INCR', KEYS[1])", 1, "rl:test") == 1
    for command in (("FLUSHALL",), ("CONFIG", "GET", "dir"), ("KEYS", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
