"""TLS at nginx: inventory fields, rendered config, real validation, the shipped pair, and a real nginx serving HTTPS.

The real-nginx test runs nginx inside a throwaway network namespace of its own whose ``lo`` holds the lab address
10.77.0.11/32 (no veth: nothing outside the namespace is reachable from it, nor it from the lab), with a tiny HTTP
upstream on the app port; the probes run inside the namespace too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from payctl import tls
from payctl.errors import ConfigError, PayctlError
from payctl.inventory import Inventory, load_inventory, parse_inventory
from payctl.phase import load_phase
from payctl.plan import make_plan
from payctl.render import FileKind, RenderedFile, render
from payctl.validate import validate_files

REPO = Path(__file__).resolve().parents[2]
LAB_ADDR = "10.77.0.11"


def _lab_inventory(tls_section: dict[str, object] | None) -> Inventory:
    data = yaml.safe_load((REPO / "inventories" / "lab-1node.yml").read_text())
    if tls_section is not None:
        data["tls"] = tls_section
    return parse_inventory(data)


def _nginx(inv: Inventory) -> RenderedFile:
    return render(make_plan(inv, load_phase(1)))["node1/nginx/nginx.conf"]


# ------------------------------------------------------------------------------------------------ inventory


def test_tls_fields_are_validated_like_other_paths() -> None:
    with pytest.raises(ConfigError) as err:
        _lab_inventory({"enabled": True, "certificate": "tls/$(reboot).pem", "key": "../k.pem", "ciphers": "x"})
    assert sorted(err.value.problems) == [
        "tls.certificate: must be a plain path (letters, digits, . _ / + -; no whitespace, quotes, $ or backticks)",
        "tls.ciphers: unknown key",
        "tls.key: must not contain '..'",
    ]
    with pytest.raises(ConfigError) as err:
        _lab_inventory({"enabled": True, "certificate": "tls/c.pem"})
    assert err.value.problems == [
        "tls: give both certificate and key, or neither (a self-signed pair is then generated)"
    ]
    inv = load_inventory("ktcloud-1node")  # files need not exist to load, plan or render
    assert inv.tls.enabled and inv.tls.certificate_path(Path("/h")) == Path("/h/ktcloud-pay/tls/fullchain.pem")
    assert not load_inventory("lab-1node").tls.enabled


# ------------------------------------------------------------------------------------------------ render + validate


def test_ktcloud_serves_https_only_and_validates_with_a_throwaway_pair() -> None:
    inv = load_inventory("ktcloud-2node")
    files = render(make_plan(inv, load_phase(5)))
    conf = files["node1/nginx/nginx.conf"].text
    assert "listen 203.0.113.10:443 ssl;" in conf
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert 'add_header Strict-Transport-Security "max-age=63072000" always;' in conf
    assert "location / { return 301 https://$host$request_uri; }" in conf
    # Port 80 proxies nothing: its only server block redirects (and keeps /metrics, /admin at 404).
    http_block = conf.split("listen 203.0.113.10:80;")[1].split("}\n\n")[0]
    assert "proxy_pass" not in http_block and "location = /metrics { return 404; }" in http_block
    [result] = validate_files({k: f for k, f in files.items() if k == "node1/nginx/nginx.conf"})
    assert result.ok, result.detail
    assert "throwaway self-signed pair" in result.detail


def test_lab_serves_plain_http_unless_tls_is_on() -> None:
    off = _nginx(_lab_inventory(None))
    assert f"listen {LAB_ADDR}:80;" in off.text and "ssl" not in off.text and "443" not in off.text
    [result] = validate_files({off.key: off})
    assert result.ok and result.detail == "", result.detail
    on = _nginx(_lab_inventory({"enabled": True}))
    assert f"listen {LAB_ADDR}:443 ssl;" in on.text


def test_validate_uses_the_shipped_pair_and_rejects_a_mismatched_one(tmp_path: Path) -> None:
    conf = _nginx(_lab_inventory({"enabled": True}))
    cert_a, key_a = tls.generate_pair("a", (LAB_ADDR,))
    _, key_b = tls.generate_pair("b", (LAB_ADDR,))

    def check(cert: str, key: str) -> dict[str, tuple[bool, str]]:
        files = {
            conf.key: conf,
            f"node1/{tls.CERT_PATH}": RenderedFile("node1", tls.CERT_PATH, FileKind.TLS_CERT, cert),
            f"node1/{tls.KEY_PATH}": RenderedFile("node1", tls.KEY_PATH, FileKind.TLS_KEY, key, mode=0o600),
        }
        return {r.key: (r.ok, r.detail) for r in validate_files(files)}

    good = check(cert_a, key_a)
    assert all(ok for ok, _ in good.values()), good
    assert good[conf.key] == (True, "")  # the real pair was used, no throwaway
    bad = check(cert_a, key_b)  # nginx -t refuses a key that does not belong to the certificate
    assert bad[conf.key][0] is False and "key values mismatch" in bad[conf.key][1], bad[conf.key]
    broken = check("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", key_a)
    assert broken[f"node1/{tls.CERT_PATH}"][0] is False


# ------------------------------------------------------------------------------------------------ shipped files


def test_node_files_generate_the_lab_pair_once_and_never_need_files_for_a_dry_run(tmp_path: Path) -> None:
    inv = _lab_inventory({"enabled": True})
    plan = make_plan(inv, load_phase(1))
    dry = tls.node_files(plan, inv, tmp_path, dry_run=True)
    assert [f.text for f in dry] == [tls.PLACEHOLDER % "certificate", tls.PLACEHOLDER % "key"]
    assert not (tmp_path / "lab").exists()  # a dry run generates nothing
    cert, key = tls.node_files(plan, inv, tmp_path, dry_run=False)
    assert (cert.path, cert.mode, key.path, key.mode) == (tls.CERT_PATH, 0o644, tls.KEY_PATH, 0o600)
    d = tmp_path / "lab" / "tls"
    assert (d.stat().st_mode & 0o777, (d / "server.key").stat().st_mode & 0o777) == (0o700, 0o600)
    assert cert.text == (d / "server.crt").read_text() and "BEGIN CERTIFICATE" in cert.text
    assert "PRIVATE KEY" in key.text
    again = tls.node_files(plan, inv, tmp_path, dry_run=False)
    assert [f.text for f in again] == [cert.text, key.text]  # generated once, then reused
    # TLS off: nothing ships.
    off = _lab_inventory(None)
    assert tls.node_files(make_plan(off, load_phase(1)), off, tmp_path, dry_run=False) == []


def test_configured_files_must_exist_to_apply(tmp_path: Path) -> None:
    inv = load_inventory("ktcloud-1node")
    plan = make_plan(inv, load_phase(1))
    assert len(tls.node_files(plan, inv, tmp_path, dry_run=True)) == 2
    with pytest.raises(PayctlError) as err:
        tls.node_files(plan, inv, tmp_path, dry_run=False)
    assert err.value.message == (
        f"TLS is on but {tmp_path}/ktcloud-pay/tls/fullchain.pem and {tmp_path}/ktcloud-pay/tls/privkey.pem "
        "do not exist"
    )
    assert "tls.certificate/tls.key" in err.value.hint
    tls.write_pair(tmp_path / "ktcloud-pay" / "tls", *tls.generate_pair("pay.example", ()), "fullchain.pem",
                   "privkey.pem")  # fmt: skip
    cert, key = tls.node_files(plan, inv, tmp_path, dry_run=False)
    assert cert.node == "node1" and "BEGIN CERTIFICATE" in cert.text and key.mode == 0o600


# ------------------------------------------------------------------------------------------------ real nginx

UPSTREAM = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "path": self.path}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""

PROBE = r"""
import http.client, json, socket, ssl, sys, threading, warnings
warnings.simplefilter("ignore", DeprecationWarning)
addr, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
V = {"1.1": ssl.TLSVersion.TLSv1_1, "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
def client(v):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    c.minimum_version = c.maximum_version = V[v]; c.set_ciphers("DEFAULT:@SECLEVEL=0")
    return c
def handshake(v, host, port):
    try:
        with socket.create_connection((host, port), timeout=5) as s, client(v).wrap_socket(s) as t:
            return t.version()
    except (ssl.SSLError, OSError) as e:
        return "refused: " + type(e).__name__
out = {v: handshake(v, addr, 443) for v in V}
# Control: the same TLSv1.1 client against a server that allows 1.1, so "refused" above is nginx's doing.
srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); srv.minimum_version = V["1.1"]; srv.set_ciphers("DEFAULT:@SECLEVEL=0")
srv.load_cert_chain(cert, key)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
def serve():
    s, _ = ls.accept()
    try: srv.wrap_socket(s, server_side=True).close()
    except Exception: pass
threading.Thread(target=serve, daemon=True).start()
out["control-1.1"] = handshake("1.1", "127.0.0.1", ls.getsockname()[1])
def get(scheme, path):
    if scheme == "https":
        conn = http.client.HTTPSConnection(addr, 443, timeout=5, context=client("1.3"))
    else:
        conn = http.client.HTTPConnection(addr, 80, timeout=5)
    conn.request("GET", path, headers={"Host": "pay.example"})
    r = conn.getresponse(); body = r.read().decode(errors="replace")
    return {"status": r.status, "location": r.getheader("Location"), "hsts": r.getheader("Strict-Transport-Security"),
            "body": body[:200]}
for scheme in ("http", "https"):
    for path in ("/health", "/metrics", "/admin/x"):
        out[f"{scheme} {path}"] = get(scheme, path)
print(json.dumps(out))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"payctl-tlstest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{LAB_ADDR}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_real_nginx_serves_tls12_and_tls13_only_and_redirects_http(netns: str, tmp_path: Path) -> None:
    inv = _lab_inventory({"enabled": True})
    plan = make_plan(inv, load_phase(1))
    conf = render(plan)["node1/nginx/nginx.conf"]
    home, prefix = tmp_path / "home", tmp_path / "nginx"
    for d in ("run", "logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf.text)
    for f in tls.node_files(plan, inv, home, dry_run=False):  # the generated self-signed pair, as a deploy ships it
        target = prefix / Path(f.path).relative_to("nginx")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.text)
        target.chmod(f.mode)
    ns = ["ip", "netns", "exec", netns]
    upstream = subprocess.Popen([*ns, sys.executable, "-c", UPSTREAM, LAB_ADDR, "8080"])
    nginx = subprocess.Popen([*ns, "nginx", "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while not (prefix / "run" / "nginx.pid").is_file():
            assert nginx.poll() is None, (prefix / "logs" / "error.log").read_text()
            assert time.monotonic() < deadline, "nginx did not start within 10 s"
            time.sleep(0.05)
        time.sleep(0.3)  # the upstream's listen socket
        pair = home / "lab" / "tls"
        probe = subprocess.run([*ns, sys.executable, "-c", PROBE, LAB_ADDR, str(pair / "server.crt"),
                                str(pair / "server.key")], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        out = json.loads(probe.stdout)
    finally:
        _stop(nginx, signal.SIGQUIT)
        _stop(upstream)
    assert out["1.2"] == "TLSv1.2" and out["1.3"] == "TLSv1.3", out
    assert out["1.1"].startswith("refused"), out
    assert out["control-1.1"] == "TLSv1.1", out  # the probe can speak 1.1: nginx is the one refusing it
    assert out["http /health"]["status"] == 301
    assert out["http /health"]["location"] == "https://pay.example/health"
    https = out["https /health"]
    assert https["status"] == 200 and json.loads(https["body"]) == {"status": "ok", "path": "/health"}
    assert https["hsts"] == "max-age=63072000"
    for scheme in ("http", "https"):  # internal endpoints are never reachable from the public side
        assert out[f"{scheme} /metrics"]["status"] == 404, out
        assert out[f"{scheme} /admin/x"]["status"] == 404, out
