from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import yaml

from payctl.errors import PayctlError
from payctl.secrets import (
    REDACTED,
    SECRET_NAMES,
    Secret,
    load_or_create,
    redact_text,
    secrets_path,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_generates_every_secret_with_private_modes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = load_or_create(home, "lab", allow_create=True)
    path = secrets_path(home, "lab")
    assert path == home / "lab" / "secrets.yml"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert s.names() == SECRET_NAMES
    values = [s[name].reveal() for name in SECRET_NAMES]
    assert len(set(values)) == len(values)
    # token_urlsafe(32): 43 characters of a 64-symbol alphabet = 256 bits >= 128
    assert all(len(v) >= 43 for v in values)
    stored = yaml.safe_load(path.read_text())["secrets"]
    assert stored == {name: s[name].reveal() for name in SECRET_NAMES}


def test_values_are_stable_across_calls(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, "prod", allow_create=True)
    text = secrets_path(tmp_path, "prod").read_text()
    second = load_or_create(tmp_path, "prod", allow_create=True)
    third = load_or_create(tmp_path, "prod", allow_create=False)
    assert first.values == second.values == third.values
    assert secrets_path(tmp_path, "prod").read_text() == text


def test_deployments_do_not_share_secrets(tmp_path: Path) -> None:
    a = load_or_create(tmp_path, "a", allow_create=True)
    b = load_or_create(tmp_path, "b", allow_create=True)
    assert a["mariadb_root"] != b["mariadb_root"]


def test_loose_modes_are_tightened(tmp_path: Path) -> None:
    load_or_create(tmp_path, "lab", allow_create=True)
    path = secrets_path(tmp_path, "lab")
    path.chmod(0o644)
    path.parent.chmod(0o755)
    load_or_create(tmp_path, "lab", allow_create=False)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700


def test_missing_file_for_a_live_deployment_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(PayctlError) as err:
        load_or_create(tmp_path, "lab", allow_create=False)
    assert "deployment 'lab' already runs on its hosts but the secrets file is missing" in err.value.message
    assert "restore" in err.value.hint
    assert not secrets_path(tmp_path, "lab").exists()


def test_a_missing_name_is_refused_for_a_live_deployment_and_added_otherwise(tmp_path: Path) -> None:
    s = load_or_create(tmp_path, "lab", allow_create=True)
    path = secrets_path(tmp_path, "lab")
    doc = yaml.safe_load(path.read_text())
    del doc["secrets"]["redis_sentinel"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PayctlError, match="secrets redis_sentinel are missing"):
        load_or_create(tmp_path, "lab", allow_create=False)
    again = load_or_create(tmp_path, "lab", allow_create=True)
    assert again["mariadb_root"] == s["mariadb_root"]
    assert again["redis_sentinel"] != s["redis_sentinel"]


def test_malformed_file_error_does_not_quote_its_content(tmp_path: Path) -> None:
    path = secrets_path(tmp_path, "lab")
    path.parent.mkdir(parents=True)
    path.write_text("secrets: [hunter2-very-secret\n")
    with pytest.raises(PayctlError) as err:
        load_or_create(tmp_path, "lab", allow_create=True)
    assert "hunter2" not in err.value.message + err.value.hint


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../x", "-x"])
def test_deployment_names_cannot_escape_home(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PayctlError, match="invalid deployment name"):
        load_or_create(tmp_path, bad, allow_create=True)


def test_secret_repr_str_format_and_logging_are_redacted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = load_or_create(tmp_path, "lab", allow_create=True)
    secret = s["mariadb_app"]
    clear = secret.reveal()
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", repr(s), repr(s.values), str([secret])]
    assert all(clear not in text for text in shown)
    assert str(secret) == REDACTED
    with caplog.at_level(logging.INFO):
        logging.getLogger("payctl.test").info("password is %s", secret)
    assert clear not in caplog.text
    assert REDACTED in caplog.text


def test_redact_replaces_every_value_in_text(tmp_path: Path) -> None:
    s = load_or_create(tmp_path, "lab", allow_create=True)
    root, app = s["mariadb_root"].reveal(), s["redis_app"].reveal()
    text = f"mysql -p{root} ... AUTH app {app}\n{root}"
    out = s.redact(text)
    assert root not in out and app not in out
    assert out == f"mysql -p{REDACTED} ... AUTH app {REDACTED}\n{REDACTED}"


def test_redact_text_prefers_longer_values() -> None:
    assert redact_text("abcdef", [Secret("abc"), "abcdef"]) == REDACTED


def test_secrets_are_not_picklable() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(Secret("x" * 20))
