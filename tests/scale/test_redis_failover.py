"""Manual Redis failover (`payctl failover redis`, for inventories without a witness): real master and replica with
the ACL users payctl renders; the replica is promoted as the `sentinel` user, the old master follows it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from payctl.failover import FailoverError, RedisNode, redis_promote
from tests.scale.conftest import LocalIO
from tests.support.services import free_port, wait_until

SENTINEL_ACL = ("user sentinel on >s-pw allchannels -@all +multi +slaveof +ping +exec +subscribe +config|rewrite "
                "+role +publish +info +client|setname +client|kill +script|kill")  # fmt: skip
USERS = (
    "user default on nopass resetchannels -@all +ping\n"
    "user app on >a-pw ~* resetchannels -@all +@read +@write +@string +ping +info\n"
    "user replication on >r-pw resetchannels -@all +psync +replconf +ping\n"
    f"{SENTINEL_ACL}\n"
)


def _server(d: Path, port: int, master: int | None) -> subprocess.Popen[bytes]:
    d.mkdir()
    extra = f"replicaof 127.0.0.1 {master}\n" if master else ""
    (d / "redis.conf").write_text(f"bind 127.0.0.1\nport {port}\ndir {d}\nsave \"\"\nmasteruser replication\n"
                                  f"masterauth r-pw\n{USERS}{extra}")  # fmt: skip
    p = subprocess.Popen(["redis-server", str(d / "redis.conf")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    wait_until(lambda: _ping(port), 20, f"redis on {port}")
    return p


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, username="app", password="a-pw", socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def _app(port: int) -> redis.Redis:
    return redis.Redis(port=port, username="app", password="a-pw", socket_timeout=2, decode_responses=True)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    mport, rport = free_port(), free_port()
    procs = [_server(tmp_path / "m", mport, None)]
    try:
        procs.append(_server(tmp_path / "r", rport, mport))
        _app(mport).set("k", "before")
        wait_until(lambda: _app(rport).get("k") == "before", 20, "the replica to sync")
        (tmp_path / "w").mkdir()
        yield mport, rport, tmp_path / "w"
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_manual_promotion_and_old_master_follows(pair: tuple[int, int, Path]) -> None:
    mport, rport, work = pair
    io = LocalIO()
    old = RedisNode("node1", "127.0.0.1", mport, str(work), io)
    new = RedisNode("node2", "127.0.0.1", rport, str(work), io)
    done = redis_promote(new, [old], "sentinel", "s-pw")
    assert done == ["node2 is the Redis master", "node1 replicates from node2"]
    _app(rport).set("k", "after")  # the new master takes writes
    wait_until(lambda: _app(mport).get("k") == "after", 20, "the old master to follow the new one")
    assert _app(mport).info("replication")["role"] == "slave"
    assert list(work.iterdir()) == []  # the password file is gone


def test_wrong_password_is_an_error_and_nothing_changes(pair: tuple[int, int, Path]) -> None:
    _, rport, work = pair
    new = RedisNode("node2", "127.0.0.1", rport, str(work), LocalIO())
    with pytest.raises(
        FailoverError, match=r"(?s)node2: redis `SLAVEOF NO ONE` failed: NOPERM.*AUTH failed: WRONGPASS"
    ):
        redis_promote(new, [], "sentinel", "wrong")
    assert _app(rport).info("replication")["role"] == "slave"
