"""Settings: PAYAPP_* variables and --env-file, exactly as documented; every bad value reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from payapp.errors import ConfigError
from payapp.settings import DbTarget, Settings, load_settings

DB = "mysql://app:s%40cret@db.internal:3307/payments"


def test_defaults_from_the_issue() -> None:
    s = Settings.from_env({"PAYAPP_DB_URL": DB})
    assert (s.port, s.auth, s.rate_limit_fail) == (8080, "off", "open")
    assert (s.rate_limit_authorize, s.rate_limit_capture, s.rate_limit_refund) == (30000, 30000, 15000)
    assert s.migrate_db_url == DB  # falls back to PAYAPP_DB_URL
    assert s.kafka_bootstrap == ""  # migrate and serve need no broker
    assert s.cors_origins == ()


def test_db_url_is_parsed_and_url_decoded() -> None:
    assert DbTarget.parse(DB) == DbTarget("db.internal", 3307, "app", "s@cret", "payments")
    assert DbTarget.parse("mysql://root@localhost/x").port == 3306


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({
            "PAYAPP_DB_URL": "postgres://x/y", "PAYAPP_PORT": "70000", "PAYAPP_AUTH": "maybe",
            "PAYAPP_CORS_ORIGINS": "shop.example", "PAYAPP_RATE_LIMIT_FAIL": "sideways",
            "PAYAPP_WORKERS": "zero",
        })
    problems = "\n".join(err.value.problems)
    for name in ("PAYAPP_DB_URL", "PAYAPP_PORT", "PAYAPP_AUTH", "PAYAPP_CORS_ORIGINS", "PAYAPP_RATE_LIMIT_FAIL",
                 "PAYAPP_WORKERS"):
        assert name in problems
    assert len(err.value.problems) == 6


def test_db_url_is_required() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({})
    assert err.value.problems == ["PAYAPP_DB_URL: required (mysql://user:pass@host:port/db of the service's database)"]


def test_env_file_and_environment_precedence(tmp_path: Path) -> None:
    env_file = tmp_path / "payapp.env"
    env_file.write_text(
        "# comment\n"
        f"PAYAPP_DB_URL={DB}\n"
        "export PAYAPP_PORT=9001\n"
        "PAYAPP_CORS_ORIGINS='https://shop.example, https://admin.example/'\n"
        'PAYAPP_AUTH="apikey"\n'
    )
    s = load_settings(env_file, environ={"PAYAPP_PORT": "9002"})
    assert s.port == 9002  # the environment wins over the file
    assert s.auth == "apikey"
    assert s.cors_origins == ("https://shop.example", "https://admin.example")


def test_bad_env_file_lines_are_named(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("PAYAPP_DB_URL\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env_file, environ={})
    assert err.value.problems == [f"{env_file}:1: expected KEY=VALUE"]
    with pytest.raises(ConfigError, match="cannot read env file"):
        load_settings(tmp_path / "missing.env", environ={})


def test_to_env_round_trips() -> None:
    s = Settings.from_env({"PAYAPP_DB_URL": DB, "PAYAPP_CORS_ORIGINS": "*", "PAYAPP_GC_THRESHOLD": "50000,20,10",
                           "PAYAPP_GC_FREEZE": "off", "PAYAPP_RATE_LIMIT_FAIL": "closed"})
    assert Settings.from_env(s.to_env()) == s


def test_every_setting_is_documented() -> None:
    from payapp.settings import PREFIX, SPECS

    table = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    missing = [PREFIX + s.name for s in SPECS if f"| `{PREFIX}{s.name}` |" not in table]
    assert missing == []
