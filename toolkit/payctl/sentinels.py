"""Do the deployment's Redis Sentinels agree? (``payctl scale add-node`` waits for it after starting them.)

Each Sentinel is asked ``SENTINEL master NAME`` as the ``sentinel`` ACL user (the password travels in a 0600 file,
see ``payctl.failover.redis_command``). They agree when every one names the same master address, carries the
planned quorum, and has discovered all the others (``num-other-sentinels`` = count - 1): only then can a majority
fail the master over. Sentinels find each other through the master's hello channel every 2 s, so the check polls
with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from payctl.errors import PayctlError
from payctl.failover import RedisNode, redis_command


class SentinelError(PayctlError):
    """The Sentinels did not come to agree on the master within the deadline."""


@dataclass(frozen=True)
class SentinelView:
    """What one Sentinel says about the monitored master."""

    node: str
    master: str  # "ip:port" ("" when the Sentinel did not answer)
    quorum: int = 0
    other_sentinels: int = 0
    replicas: int = 0
    flags: str = ""
    error: str = ""

    def describe(self) -> str:
        if self.error:
            return f"{self.node}: {self.error}"
        return (f"{self.node}: master {self.master} ({self.flags}), quorum {self.quorum}, "
                f"{self.other_sentinels} other Sentinel(s), {self.replicas} replica(s)")  # fmt: skip


def parse_master(out: str) -> dict[str, str]:
    """``redis-cli SENTINEL master NAME`` output (one field name, then its value, a line each) as a dict."""
    lines = [line.strip() for line in out.strip().splitlines()]
    return dict(zip(lines[0::2], lines[1::2], strict=False))


def view(node: RedisNode, user: str, password: str, master_name: str) -> SentinelView:
    try:
        fields = parse_master(redis_command(node, user, password, f"SENTINEL master {master_name}"))
    except PayctlError as exc:
        return SentinelView(node.name, "", error=" ".join(exc.message.removeprefix(f"{node.name}: ").split())[:200])
    if "ip" not in fields:
        return SentinelView(node.name, "", error=f"no master named {master_name!r}")

    def num(key: str) -> int:
        value = fields.get(key, "0")
        return int(value) if value.isdigit() else 0

    return SentinelView(node.name, f"{fields['ip']}:{fields.get('port', '')}", num("quorum"),
                        num("num-other-sentinels"), num("num-slaves"), fields.get("flags", ""))  # fmt: skip


def agreed(views: Sequence[SentinelView], masters: Collection[str], quorum: int) -> bool:
    """Every Sentinel answered and names the same master, one of ``masters`` (ip:port: any Redis node of the
    deployment, since the Sentinels may rightly have failed over meanwhile), with ``quorum``; each sees all the
    others; nobody flags the master down."""
    n = len(views)
    return bool(views) and len({v.master for v in views}) == 1 and all(
        not v.error and v.master in masters and v.quorum == quorum and v.other_sentinels == n - 1
        and "o_down" not in v.flags and "s_down" not in v.flags
        for v in views
    )  # fmt: skip


def wait_agreed(nodes: Sequence[RedisNode], user: str, password: str, master_name: str, masters: Collection[str],
                quorum: int,
                timeout_s: float = 60.0, sleep: Callable[[float], None] = time.sleep
                ) -> list[SentinelView]:  # fmt: skip
    """Poll every Sentinel until they agree (see ``agreed``); returns the views, or raises SentinelError naming each
    Sentinel's last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        views = [view(n, user, password, master_name) for n in nodes]
        if agreed(views, masters, quorum):
            return views
        if time.monotonic() > deadline:
            raise SentinelError(
                f"the {len(nodes)} Sentinels did not agree on master {' or '.join(sorted(masters))} (quorum {quorum}) "
                f"within "
                f"{timeout_s:.0f}s: " + "; ".join(v.describe() for v in views),
                hint="check each node's logs/payctl-sentinel.log; `payctl phase5 apply` starts missing Sentinels",
            )
        sleep(1.0)
