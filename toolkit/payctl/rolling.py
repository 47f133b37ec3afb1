"""Node-level steps of a rolling change (``payctl upgrade``/``rollback``, and an apply's app restarts when several
nodes serve behind the LB): commands on one node, its programs stopped and started (supervisorctl in the lab,
systemctl on VMs), and a node taken out of the nginx load balancer and put back.

Out of the LB: the LB node's nginx.conf with that node's upstream marked ``down`` (checked with ``nginx -t``), then
SIGHUP: nginx starts new workers with the new file and the old ones finish their requests and exit; we wait for
exactly those old workers (their pids, read before the signal) to be gone, so no request is still on its way to the
node when its app is drained. Back in: the original file, byte for byte, and another SIGHUP.
"""

from __future__ import annotations

import io
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from payctl import components, hosts, runtimes
from payctl.errors import DeployError

#: supervisorctl answers that mean the program is already where we want it.
HARMLESS = ("not running", "already started")


class NodeShell:
    """Commands on one node over the deploy engine's shell; failures raise DeployError with the output."""

    def __init__(self, conn: hosts.Connected, node: str, prefix: str, lab: bool) -> None:
        self.node, self.prefix, self.lab = node, prefix, lab
        self.host = conn.host(node)
        self.shell = hosts.shell_of(self.host)

    def run(self, command: str, what: str) -> str:
        ok, out, err = self.shell(command)
        if not ok:
            raise DeployError(f"{self.node}: {what} failed: {(err.strip() or out.strip())[-600:] or 'no output'}")
        return out

    def programs(self, verb: str, programs: tuple[str, ...]) -> None:
        """``stop`` waits for each program to exit (SIGTERM: payapp drains); ``start`` for it to be up."""
        names = " ".join(shlex.quote(p) for p in programs)
        if not self.lab:
            self.run(f"systemctl {verb} {names}", f"systemctl {verb}")
            return
        conf = shlex.quote(f"{self.prefix}/supervisor/supervisord.conf")
        # One supervisorctl per program, in parallel: `supervisorctl start a b c` waits startsecs for each in turn
        # (9 s for the three app programs), all of it time the node is out of the load balancer.
        # supervisorctl's exit code is not reliable across versions: read its per-program lines.
        _, out, err = self.shell(f"for p in {names}; do supervisorctl -c {conf} {verb} \"$p\" & done; wait")
        bad = [ln for ln in out.splitlines() if "ERROR" in ln and not any(ok in ln for ok in HARMLESS)]
        if bad or not out.strip():
            raise DeployError(f"{self.node}: supervisorctl {verb} failed: {'; '.join(bad) or err.strip()[-400:]}")

    def put(self, local: Path, remote: str) -> None:
        if not self.host.put_file(str(local), remote):
            raise DeployError(f"{self.node}: uploading {local.name} to {remote} failed")

    def put_text(self, text: str, remote: str) -> None:
        self.run(f"umask 077 && : > {shlex.quote(remote)}", f"creating {remote}")
        if not self.host.put_file(io.BytesIO(text.encode()), remote):
            raise DeployError(f"{self.node}: uploading {remote} failed")


def _server_line(upstream: str) -> re.Pattern[str]:
    """``server <upstream> ...;`` in nginx.conf (group 1: up to a ``down`` mark, group 2: the mark)."""
    return re.compile(rf"^(\s*server\s+{re.escape(upstream)}\s[^;\n]*?)(\s+down)?;", re.M)


def with_upstream_down(conf: str, upstream: str) -> str:
    """nginx.conf with ``server <upstream> ...;`` of the ``payapp`` upstream marked ``down`` (exactly one such line)."""
    pattern = _server_line(upstream)
    found = pattern.findall(conf)
    if len(found) != 1:
        raise DeployError(f"the LB's nginx.conf has {len(found)} upstream lines for {upstream}, expected one",
                          hint="re-apply the phase to restore the rendered nginx.conf")  # fmt: skip
    return pattern.sub(lambda m: f"{m.group(1)} down;", conf)


def _nginx_paths(lb: NodeShell) -> tuple[str, str, str, str]:
    nginx = f"{lb.prefix}/nginx"
    return nginx, f"{nginx}/nginx.conf", f"{nginx}/nginx.conf.payctl-new", f"{nginx}/nginx.conf.payctl-keep"


def _activate(lb: NodeShell, timeout_s: float) -> str:
    """``nginx.conf.payctl-new`` checked with ``nginx -t``, moved over nginx.conf (one rename), SIGHUP; then wait for
    the old workers (pids read before the signal) to finish their requests and exit.

    Returns "" or a note when old workers were still busy at the deadline (the app's own drain covers them)."""
    q = shlex.quote
    nginx, conf, new, _ = _nginx_paths(lb)
    lb.run(f"nginx -t -q -c {q(new)} -p {q(nginx + '/')} 2>&1 || {{ rc=$?; rm -f {q(new)}; exit $rc; }}",
           "nginx -t on the new nginx.conf")  # fmt: skip
    ticks = int(timeout_s * 10)
    out = lb.run(
        f"set -e; m=$(cat {q(nginx + '/run/nginx.pid')}); old=$(ps -o pid= --ppid \"$m\" | tr '\\n' ' '); "
        f"mv -f {q(new)} {q(conf)}; kill -HUP \"$m\"; set +e; "
        f"for i in $(seq 1 {ticks}); do busy=; for w in $old; do kill -0 \"$w\" 2>/dev/null && busy=\"$busy $w\"; "
        f'done; [ -z "$busy" ] && exit 0; sleep 0.1; done; echo "BUSY$busy"',
        "nginx reload",
    )
    return f"old nginx workers{out.strip()[4:]} still busy after {timeout_s:.0f}s" if out.startswith("BUSY") else ""


def take_out(lb: NodeShell, upstream: str, timeout_s: float) -> str:
    """The LB's nginx.conf kept aside byte for byte, then the same file with ``upstream`` marked ``down`` activated."""
    q = shlex.quote
    _, conf, new, keep = _nginx_paths(lb)
    # A rendered nginx.conf never says "down": if it does, an interrupted run left the original in keep.
    lb.run(f"if grep -q ' down;' {q(conf)} && [ -f {q(keep)} ]; then :; else cp -p {q(conf)} {q(keep)}; fi",
           "keeping nginx.conf")  # fmt: skip
    text = lb.run(f"cat {q(conf)}", "reading nginx.conf")
    lb.put_text(with_upstream_down(text if text.endswith("\n") else text + "\n", upstream), new)
    lb.run(f"chmod --reference={q(conf)} {q(new)}", "nginx.conf mode")
    return _activate(lb, timeout_s)


def put_back(lb: NodeShell, timeout_s: float) -> str:
    """The nginx.conf kept by ``take_out`` activated again (identical bytes: a later phase apply sees no drift)."""
    q = shlex.quote
    _, _, new, keep = _nginx_paths(lb)
    lb.run(f"cp -p {q(keep)} {q(new)}", "restoring nginx.conf")
    note = _activate(lb, timeout_s)
    lb.run(f"rm -f {q(keep)}", "removing the kept nginx.conf")
    return note


def _in_lb(lb: NodeShell, upstream: str) -> bool:
    """The LB's nginx runs and its nginx.conf sends to ``upstream`` (a node added later is not in it yet)."""
    q = shlex.quote
    nginx, conf, _, _ = _nginx_paths(lb)
    ok, out, _ = lb.shell(f"pid=$(cat {q(nginx + '/run/nginx.pid')} 2>/dev/null) && kill -0 \"$pid\" 2>/dev/null && "
                          f"cat {q(conf)}")  # fmt: skip
    return ok and len(_server_line(upstream).findall(out)) == 1


@dataclass
class Restarted:
    """What ``restart_behind_lb`` did on one node."""

    node: str
    programs: list[str] = field(default_factory=list)  # restarted (stop, start) or updated by supervisorctl
    out_of_lb_s: float | None = None  # None: the node was not in the LB (nothing to drain there)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = (f"out of the load balancer for {self.out_of_lb_s:.1f} s" if self.out_of_lb_s is not None
                 else "in place (not in the load balancer)")  # fmt: skip
        return f"{self.node}: {', '.join(self.programs)} restarted {where}" + "".join(f"; {n}" for n in self.notes)


def restart_behind_lb(n: NodeShell, lb: NodeShell | None, upstream: str, programs: tuple[str, ...], *, update: bool,
                      healthy: Callable[[], tuple[bool, str]], step: Callable[[str, str], None],
                      timeout_s: float = 30.0) -> Restarted:  # fmt: skip
    """Restart a node's app programs with the node out of the LB: nginx stops sending to it first (graceful reload,
    old workers finish), so no request meets an app that is going away (a worker that closes its SO_REUSEPORT
    listener resets the connections still in its accept queue, a keep-alive connection can be closed as a request
    goes out on it: nginx has sent that POST and never replays it, the client gets a 502). With ``update`` (lab),
    supervisord.conf changed: the app groups whose sections changed are updated (added, restarted, removed) too.
    Healthy again, the node goes back in; unhealthy, it stays out and DeployError says so. Clears the node's
    pending-effects record."""
    q = shlex.quote
    ctl = f"supervisorctl -c {q(n.prefix + '/supervisor/supervisord.conf')}"
    groups: list[str] = []
    if update and n.lab:
        out = n.run(f"{ctl} reread", "supervisorctl reread")
        changed = re.findall(r"^([^:\s]+): (?:changed|available|disappeared)$", out, re.M)
        groups = [g for g in changed if g in components.APP_PROGRAMS]
    rest = [p for p in programs if p not in groups]
    done = Restarted(n.node, [*groups, *rest])
    if done.programs:
        out_lb = lb if lb is not None and _in_lb(lb, upstream) else None
        out_at = 0.0
        if out_lb is not None:
            step(out_lb.node, f"take {n.node} out of the load balancer (graceful reload)")
            note = take_out(out_lb, upstream, timeout_s)
            out_at = time.monotonic()
            if note:
                done.notes.append(note)
        step(n.node, f"restart {', '.join(done.programs)}" + (" (out of the load balancer)" if out_lb else ""))
        if groups:  # supervisord already reread above: update just these groups
            n.run(f"{ctl} update {' '.join(q(g) for g in groups)}", "supervisorctl update")
        if rest:
            n.programs("stop", tuple(rest))
            n.programs("start", tuple(rest))
        ok, detail = healthy()
        if not ok:
            where = ", so it stays OUT of the load balancer" if out_lb else ""
            raise DeployError(f"{n.node}: the app was not healthy after its restart ({detail}){where}",
                              hint=f"see `payctl logs -i INV --node {n.node} --component app`; fix and re-apply "
                              "(the apply puts the rendered nginx.conf back)")  # fmt: skip
        if out_lb is not None:
            step(out_lb.node, f"put {n.node} back into the load balancer")
            note = put_back(out_lb, timeout_s)
            done.out_of_lb_s = round(time.monotonic() - out_at, 2)
            if note:
                done.notes.append(note)
    n.run(f"rm -f {q(n.prefix + '/' + runtimes.PENDING)}", "clearing the pending restarts")
    return done
