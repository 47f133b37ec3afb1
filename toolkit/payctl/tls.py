"""TLS at the load balancer: the nginx settings, the certificate/key files shipped to the lb node, self-signed pairs.

An inventory turns HTTPS on with ``tls: {enabled: true}`` and, for a real deployment, names a local certificate and
key (``tls.certificate``/``tls.key``, relative to PAYCTL_HOME unless absolute). Without them (labs) a self-signed pair
is generated once under ``$PAYCTL_HOME/<deployment>/tls/`` (directory 0700, key 0600) by ``node_files`` when a deploy
really applies; plan, render and dry-runs never need the files (they show a placeholder instead).

On the node the pair lives at ``<prefix>/nginx/tls/server.{crt,key}`` (key 0600); nginx runs with ``-p <prefix>/nginx/``
so its config names them ``tls/server.crt`` and ``tls/server.key`` (the same in the compose container, whose
/etc/payctl/nginx is the node's ./nginx).

Keys are made with python ``cryptography`` (a dependency of paramiko, hence always in payctl's environment).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from payctl.errors import PayctlError
from payctl.render import FileKind, RenderedFile

if TYPE_CHECKING:
    from payctl.inventory import Inventory
    from payctl.plan import Plan

#: Paths of the pair on a node, relative to its prefix, and as nginx (prefix <prefix>/nginx/) names them.
CERT_PATH: Final = "nginx/tls/server.crt"
KEY_PATH: Final = "nginx/tls/server.key"
NGINX_CERT: Final = "tls/server.crt"
NGINX_KEY: Final = "tls/server.key"
KEY_MODE: Final = 0o600
CERT_MODE: Final = 0o644
DIR_MODE: Final = 0o700
#: Modern protocols only (no TLSv1.0/1.1, no SSL).
PROTOCOLS: Final = "TLSv1.2 TLSv1.3"
#: TLSv1.2 suites with forward secrecy and AEAD only (Mozilla "intermediate"); TLSv1.3 suites are all sound.
CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: Strict-Transport-Security max-age: two years.
HSTS_MAX_AGE_S: Final = 63072000
SELF_SIGNED_DAYS: Final = 825
PLACEHOLDER: Final = "{{TLS:%s not present locally}}\n"


def nginx_context(enabled: bool) -> dict[str, object]:
    """The ``nginx.tls`` values of the template (no defaults in templates)."""
    return {
        "enabled": enabled,
        "certificate": NGINX_CERT,
        "key": NGINX_KEY,
        "protocols": PROTOCOLS,
        "ciphers": CIPHERS,
        "hsts_max_age_s": HSTS_MAX_AGE_S,
    }


@functools.cache
def _throwaway() -> tuple[str, str]:
    return generate_pair("payctl-check", ())


def generate_pair(common_name: str, addresses: tuple[str, ...]) -> tuple[str, str]:
    """A self-signed (certificate PEM, key PEM) for ``common_name`` with the addresses as IP subject alt names."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    sans.append(x509.DNSName(common_name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert_pem, key_pem


def write_pair(directory: Path, cert_pem: str, key_pem: str, cert_name: str = "server.crt",
               key_name: str = "server.key") -> tuple[Path, Path]:  # fmt: skip
    """Write a pair: the key created 0600 from the start (never readable by others, even briefly)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / cert_name, directory / key_name
    cert.write_text(cert_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(key_pem)
    os.chmod(key, KEY_MODE)
    return cert, key


def write_throwaway(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed pair (one per process) for ``nginx -t`` when the real files are not at hand."""
    cert_pem, key_pem = _throwaway()
    return write_pair(directory, cert_pem, key_pem)


def self_signed_dir(home: Path, deployment: str) -> Path:
    return home / deployment / "tls"


def local_pair(inv: Inventory, home: Path) -> tuple[Path, Path]:
    """The local (certificate, key) files of the inventory: configured, else the self-signed location."""
    cert, key = inv.tls.certificate_path(home), inv.tls.key_path(home)
    if cert is not None and key is not None:
        return cert, key
    d = self_signed_dir(home, inv.deployment)
    return d / "server.crt", d / "server.key"


def ensure_self_signed(inv: Inventory, home: Path, addresses: tuple[str, ...]) -> tuple[Path, Path]:
    """The self-signed pair of a deployment without configured files, generated on first use."""
    cert, key = local_pair(inv, home)
    if not (cert.is_file() and key.is_file()):
        d = self_signed_dir(home, inv.deployment)
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(DIR_MODE)
        cert_pem, key_pem = generate_pair(inv.deployment, addresses)
        write_pair(d, cert_pem, key_pem)
    return cert, key


def node_files(plan: Plan, inv: Inventory, home: Path, *, dry_run: bool) -> list[RenderedFile]:
    """The certificate and key as files of the lb node (empty when TLS is off or no active node runs nginx).

    Apply: configured files must exist (else a PayctlError with a hint); without configured files the self-signed
    pair is generated. Dry run: files are read when present, else a placeholder stands in (nothing is generated).
    """
    lb = next((n for n in plan.active_nodes if n.nginx is not None and n.nginx.tls), None)
    if lb is None or lb.nginx is None:
        return []
    configured = inv.tls.certificate is not None
    cert, key = local_pair(inv, home)
    if not dry_run:
        if not configured:
            addresses = tuple(a for a in (lb.nginx.listen_address, lb.private_address) if a)
            cert, key = ensure_self_signed(inv, home, addresses)
        missing = [str(p) for p in (cert, key) if not p.is_file()]
        if missing:
            raise PayctlError(
                f"TLS is on but {' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist",
                hint="put the certificate (with its chain) and its key there, or fix tls.certificate/tls.key in the "
                "inventory (paths relative to PAYCTL_HOME unless absolute)",
            )
    texts: dict[str, str] = {}
    for label, path in (("certificate", cert), ("key", key)):
        try:
            texts[label] = path.read_text()
        except FileNotFoundError:
            texts[label] = PLACEHOLDER % label
        except OSError as exc:
            raise PayctlError(f"cannot read the TLS {label} {path}: {exc.strerror}",
                              hint="check the file's permissions") from None  # fmt: skip
    return [
        RenderedFile(lb.name, CERT_PATH, FileKind.TLS_CERT, texts["certificate"], mode=CERT_MODE,
                     description="TLS certificate (nginx)"),
        RenderedFile(lb.name, KEY_PATH, FileKind.TLS_KEY, texts["key"], mode=KEY_MODE,
                     description="TLS private key (nginx)"),
    ]  # fmt: skip
