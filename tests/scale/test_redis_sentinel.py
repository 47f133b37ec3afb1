"""payapp through Redis Sentinel: a real master, replica and three Sentinels on loopback, with payctl's ACL users.
kill -9 of the master: Sentinel promotes the replica, the app's client reconnects to it, and the shared rate limit
keeps counting (on the new master) and keeps refusing over the limit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from payapp.app import redis_client
from payapp.errors import ApiError, ConfigError
from payapp.metrics import Metrics
from payapp.ratelimit import RateLimiter
from payapp.settings import Settings
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.slow

PW = "redis-pw"
SENTINEL_PW = "sentinel-pw"


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _start(conf: Path, text: str, *argv: str) -> Proc:
    conf.write_text(text)
    return Proc(subprocess.Popen([*argv, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True))  # fmt: skip


@dataclass
class Cluster:
    master: Proc
    master_port: int
    replica_port: int
    sentinel_ports: list[int]


# The ACL users payctl renders for redis.conf and sentinel.conf (templates/redis), with test passwords.
REDIS_USERS = (
    "user default on nopass resetchannels -@all +ping\n"
    f"user app on >{PW} ~* resetchannels -@all +@read +@write +@string +@hash +@scripting +@connection +ping +info "
    "+expire +pexpire -@dangerous\n"
    f"user replication on >{PW} resetchannels -@all +psync +replconf +ping\n"
    f"user sentinel on >{SENTINEL_PW} allchannels -@all +multi +slaveof +ping +exec +subscribe +config|rewrite +role "
    "+publish +info +client|setname +client|kill +script|kill\n"
    f"masteruser replication\nmasterauth {PW}\n"
)


def _redis_conf(d: Path, port: int, master: int | None) -> str:
    replica = f"replicaof 127.0.0.1 {master}\n" if master else ""
    return f'bind 127.0.0.1\nport {port}\ndir {d}\nsave ""\n{REDIS_USERS}{replica}'


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    procs: list[Proc] = []
    try:
        mport, rport = free_port(), free_port()
        for name, port, master in (("master", mport, None), ("replica", rport, mport)):
            (tmp_path / name).mkdir()
            procs.append(_start(tmp_path / name / "redis.conf", _redis_conf(tmp_path / name, port, master),
                                "redis-server"))  # fmt: skip
        sports = [free_port() for _ in range(3)]
        for i, port in enumerate(sports):
            d = tmp_path / f"sentinel{i}"
            d.mkdir()
            procs.append(_start(d / "sentinel.conf",
                                f"bind 127.0.0.1\nport {port}\ndir {d}\nprotected-mode no\nlogfile {d}/s.log\n"
                                "user default on nopass resetchannels -@all +ping\n"
                                f"user sentinel on >{SENTINEL_PW} allchannels +@all\n"
                                f"sentinel sentinel-user sentinel\nsentinel sentinel-pass {SENTINEL_PW}\n"
                                f"sentinel monitor payctl 127.0.0.1 {mport} 2\n"
                                f"sentinel auth-user payctl sentinel\nsentinel auth-pass payctl {SENTINEL_PW}\n"
                                "sentinel down-after-milliseconds payctl 1000\n"
                                "sentinel failover-timeout payctl 4000\n", "redis-sentinel"))  # fmt: skip

        def ready() -> bool:
            try:
                s = redis.Redis(port=sports[0], username="sentinel", password=SENTINEL_PW, socket_timeout=1)
                m = s.sentinel_master("payctl")
                assert isinstance(m, dict)
                return int(m["num-other-sentinels"]) == 2 and int(m["num-slaves"]) == 1
            except (redis.RedisError, OSError, KeyError):
                return False

        wait_until(ready, 30, "three Sentinels that see each other and the replica")
        yield Cluster(procs[0], mport, rport, sports)
    finally:
        for p in procs:
            p.stop()


def _settings(c: Cluster) -> Settings:
    env = {
        "PAYAPP_DB_URL": "mysql://app:pw@127.0.0.1:1/payments",
        "PAYAPP_REDIS_URL": f"redis://app:{PW}@127.0.0.1:1/0",  # the host is unused: Sentinel names the master
        # A Sentinel that is not running comes first (in the lab node1's was not started yet): it must be skipped
        # at once, within the app's 0.5 s health probe.
        "PAYAPP_REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in [free_port(), *c.sentinel_ports]),
        "PAYAPP_REDIS_SENTINEL_MASTER": "payctl",
        "PAYAPP_REDIS_SENTINEL_USER": "sentinel",
        "PAYAPP_REDIS_SENTINEL_PASSWORD": SENTINEL_PW,
    }
    return Settings.from_env(env)


def test_settings_parse_sentinels() -> None:
    s = Settings.from_env({"PAYAPP_DB_URL": "mysql://a:b@h:1/d", "PAYAPP_REDIS_SENTINELS": "10.77.0.11:26379, x:1"})
    assert s.redis_sentinels == ("10.77.0.11:26379", "x:1") and s.redis_sentinel_master == "payctl"
    # `payapp serve` hands its settings to the workers as PAYAPP_* variables: they must parse back the same.
    assert Settings.from_env({"PAYAPP_" + k.removeprefix("PAYAPP_"): v for k, v in s.to_env().items()}) == s
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PAYAPP_DB_URL": "mysql://a:b@h:1/d", "PAYAPP_REDIS_SENTINELS": "h:none"})
    assert info.value.problems == ["PAYAPP_REDIS_SENTINELS='h:none': expected host:port,... (bad entry 'h:none')"]


def test_master_killed_sentinel_promotes_app_reconnects_limit_holds(cluster: Cluster) -> None:
    settings = _settings(cluster)

    async def scenario() -> tuple[int, list[bool]]:
        client = redis_client(settings)
        limiter = RateLimiter(client, {"authorize": 5}, 1, False, Metrics(), retry_seconds=0.2)
        try:
            assert await asyncio.wait_for(client.ping(), 0.5)  # the app's /health budget for Redis
            assert [(await limiter.check("authorize", "m1")).allowed for _ in range(6)] == [True] * 5 + [False]
            # The master dies (SIGKILL): no goodbye to its clients or the Sentinels.
            os.kill(cluster.master.proc.pid, signal.SIGKILL)
            cluster.master.proc.wait(10)
            failures = 0
            deadline = time.monotonic() + 60
            while True:
                try:
                    first = await limiter.check("authorize", "m2")
                    break
                except ApiError as exc:  # fail closed: 503 while there is no master
                    assert exc.status == 503
                    failures += 1
                    assert time.monotonic() < deadline, "no master after 60 s"
                    await asyncio.sleep(0.2)
            assert first.allowed
            after = [(await limiter.check("authorize", "m2")).allowed for _ in range(5)]
            return failures, after
        finally:
            await client.aclose()

    failures, after = asyncio.run(scenario())
    assert failures > 0  # the outage was seen (the test is not vacuous)
    assert after == [True] * 4 + [False]  # the limit still holds: 5 per minute, counted on the new master
    s = redis.Redis(port=cluster.sentinel_ports[1], username="sentinel", password=SENTINEL_PW, socket_timeout=1)
    addr = s.sentinel_get_master_addr_by_name("payctl")
    assert isinstance(addr, tuple) and int(addr[1]) == cluster.replica_port
    role = redis.Redis(port=cluster.replica_port, username="sentinel", password=SENTINEL_PW, socket_timeout=1)
    assert role.execute_command("ROLE")[0] in (b"master", "master")  # type: ignore[no-untyped-call]
    promoted = redis.Redis(port=cluster.replica_port, username="app", password=PW, socket_timeout=1)
    assert int(promoted.get("payapp:rl:authorize:m2") or 0) == 6
