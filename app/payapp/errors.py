"""payapp's errors.

Two families, never mixed:

    PayappError            an operator can act on it (bad setting, unreachable database, failed migration).
    └── ConfigError        a PAYAPP_* setting or a command-line value is wrong; carries every problem found.
                           Raised by the core, printed once by ``payapp.cli`` with its hint and exit code.

    ApiError               an HTTP request failed in a way the client must see: status, code, message and
                           (when it concerns one payment) its id. Rendered by the API's error middleware in the one
                           shape ``{code, message, paymentId?}``.
"""

from __future__ import annotations


class PayappError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(PayappError):
    exit_code = 2

    def __init__(self, message: str, hint: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = problems or []


class ApiError(Exception):
    """An error response: HTTP status, machine-readable code, message, optional payment id."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        payment_id: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.payment_id = payment_id
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.payment_id is not None:
            out["paymentId"] = self.payment_id
        return out


def validation_error(message: str) -> ApiError:
    return ApiError(400, "VALIDATION_ERROR", message)


def not_found(payment_id: int | None = None, message: str = "payment not found") -> ApiError:
    return ApiError(404, "NOT_FOUND", message, payment_id)


def invalid_state(message: str, payment_id: int) -> ApiError:
    return ApiError(409, "INVALID_STATE", message, payment_id)
