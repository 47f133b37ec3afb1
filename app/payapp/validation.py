"""Request validation: JSON bodies and path/header values into typed values, or VALIDATION_ERROR (400).

Every malformed input ends here as a 400 with a message naming the field, never as a 5xx: wrong JSON, wrong
types (booleans are not numbers, 100.0 is not an integer), out-of-range numbers, strings that cannot be stored
(lone surrogates, control characters in identifiers), unknown currencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from payapp.currencies import CURRENCIES
from payapp.errors import not_found, validation_error

MAX_AMOUNT = 10**15  # far below BIGINT, so sums of amounts cannot overflow
MAX_PAYMENT_ID = 2**63 - 1


def json_object(raw: bytes, loads: Callable[[bytes], Any]) -> dict[str, Any]:
    if not raw.strip():
        raise validation_error("request body must be a JSON object")
    try:
        body = loads(raw)
    except (ValueError, RecursionError):
        raise validation_error("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise validation_error("request body must be a JSON object")
    return body


def _storable(field: str, value: str, identifier: bool) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise validation_error(f"{field}: contains characters that are not valid UTF-8") from None
    if identifier and not value.isprintable():
        raise validation_error(f"{field}: must not contain control characters")
    return value


def text(body: dict[str, Any], field: str, max_len: int, *, required: bool, identifier: bool = True) -> str | None:
    """A string of 1..max_len characters; ``identifier`` strings may not contain control characters."""
    value = body.get(field)
    if value is None:
        if required:
            raise validation_error(f"{field}: required")
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise validation_error(f"{field}: must be a string of 1 to {max_len} characters")
    return _storable(field, value, identifier)


def required_text(body: dict[str, Any], field: str, max_len: int, *, identifier: bool = True) -> str:
    value = text(body, field, max_len, required=True, identifier=identifier)
    assert value is not None
    return value


def header_key(value: str | None, field: str = "Idempotency-Key") -> str | None:
    """The optional Idempotency-Key header of capture, refund and void."""
    if value is None:
        return None
    return text({field: value}, field, 64, required=True)


def amount(body: dict[str, Any], field: str = "amount", *, required: bool) -> int | None:
    value = body.get(field)
    if value is None:
        if required:
            raise validation_error(f"{field}: required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AMOUNT:
        raise validation_error(f"{field}: must be an integer from 1 to {MAX_AMOUNT} (minor units)")
    return value


def required_amount(body: dict[str, Any], field: str = "amount") -> int:
    value = amount(body, field, required=True)
    assert value is not None
    return value


def currency(body: dict[str, Any], field: str = "currency") -> str:
    value = body.get(field)
    if value is None:
        raise validation_error(f"{field}: required")
    if not isinstance(value, str) or len(value) != 3 or value.upper() not in CURRENCIES:
        raise validation_error(f"{field}: must be a 3-letter ISO 4217 currency code such as KRW")
    return value.upper()


def payment_id(raw: str) -> int:
    """A payment id from the path: 400 when it is not a positive integer, 404 when no payment can have it."""
    if not raw.isascii() or not raw.isdigit():
        raise validation_error("paymentId: must be a positive integer")
    if len(raw.lstrip("0")) > len(str(MAX_PAYMENT_ID)):  # int() refuses > 4300 digits (a 500); none is an id
        raise not_found(None)
    value = int(raw)
    if not 1 <= value <= MAX_PAYMENT_ID:
        raise not_found(None)
    return value

