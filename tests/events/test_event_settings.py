"""Event settings and event parsing: pure, no servers."""

from __future__ import annotations

import pytest

from payapp.errors import ConfigError
from payapp.events import EventSettings, PoisonError, parse_event


def test_defaults_are_valid_on_a_single_broker() -> None:
    s = EventSettings.from_env({"PAYAPP_KAFKA_BOOTSTRAP": "127.0.0.1:9092"})
    assert (s.partitions, s.replication_factor, s.min_insync_replicas) == (1, 1, 1)
    assert (s.idempotence, s.compression, s.batch_size, s.linger_ms) == (True, "lz4", 16384, 10)
    assert (s.reconcile_tz, s.reconcile_settle_lag_s) == ("Asia/Seoul", 60)
    assert s.topic("payment.settled") == "payment.settled"


def test_every_bad_setting_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        EventSettings.from_env({"PAYAPP_KAFKA_PARTITIONS": "0", "PAYAPP_KAFKA_IDEMPOTENCE": "maybe",
                                "PAYAPP_RECONCILE_TZ": "Mars/Olympus", "PAYAPP_KAFKA_COMPRESSION": "brotli"})
    assert [p.split("=")[0] for p in err.value.problems] == [
        "PAYAPP_KAFKA_PARTITIONS", "PAYAPP_KAFKA_IDEMPOTENCE", "PAYAPP_KAFKA_COMPRESSION", "PAYAPP_RECONCILE_TZ"]


def test_missing_bootstrap_is_a_config_error_for_event_commands() -> None:
    with pytest.raises(ConfigError, match="PAYAPP_KAFKA_BOOTSTRAP"):
        EventSettings.from_env({}).require_bootstrap()


GOOD = (b'{"eventId":"0b8f7c1e-4d55-4a8e-9a52-3c1f1f1f1f1f","type":"PaymentCaptured","schemaVersion":1,'
        b'"paymentId":7,"merchantId":"m1","operationId":9,"amount":100,"currency":"KRW","sequence":2,'
        b'"occurredAt":"2026-11-25T00:00:00.000000Z"}')


def test_a_good_event_parses() -> None:
    e = parse_event("payment.captured", GOOD)
    assert (e.payment_id, e.operation_id, e.sequence, e.topic) == (7, 9, 2, "payment.captured")


@pytest.mark.parametrize(("value", "why"), [
    (b"{not json", "not JSON"),
    (b"[1]", "not a JSON object"),
    (GOOD.replace(b'"schemaVersion":1', b'"schemaVersion":2'), "unsupported schemaVersion 2"),
    (GOOD.replace(b'"paymentId":7,', b""), "missing paymentId"),
    (GOOD.replace(b'"amount":100', b'"amount":"100"'), "amount is not a int"),
    (GOOD.replace(b'"amount":100', b'"amount":true'), "amount is not a int"),
    (None, "empty message"),
])
def test_poison_messages_say_what_is_wrong(value: bytes | None, why: str) -> None:
    with pytest.raises(PoisonError, match=why):
        parse_event("payment.captured", value)
