"""The ProxyError tree: one class per row of the client-facing error table, rendered once.

Handlers raise these; one Starlette exception handler turns them into OpenAI-style JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

NO_RETRY = {"x-should-retry": "false"}


class ProxyError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def sse_event(self) -> bytes:
        """The one event that ends a stream which failed after its first byte."""
        return b"data: " + self.json_bytes() + b"\n\n"


class InvalidRequest(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(ProxyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Invalid API key provided") -> None:
        super().__init__(message, headers=NO_RETRY)


class InsufficientCredits(ProxyError):
    status_code = 402
    error_type = "insufficient_credits"
    code = "insufficient_credits"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=NO_RETRY)


class BudgetExceeded(InsufficientCredits):
    """Over the key's budget for the period: the credits error's type, retry at the reset."""

    code = "budget_exceeded"

    def __init__(self, message: str, *, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.headers.update(headers)


class ModelNotAllowed(ProxyError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", headers=NO_RETRY)


class NotFound(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ClientClosed(ProxyError):
    """The client went away before its request was read whole; nobody reads this answer."""

    status_code = 499  # nginx's status for a client that closed the connection
    error_type = "invalid_request_error"
    code = "client_closed_request"


class RateLimited(ProxyError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamFailed(ProxyError):
    status_code = 502
    error_type = "upstream_error"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # timeout | connect | status | invalid, the metric's label


class StoreUnavailable(ProxyError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeout(ProxyError):
    status_code = 504
    error_type = "upstream_timeout"
    code = "upstream_timeout"

    def __init__(self, timeout_s: float, message: str | None = None) -> None:
        limit = "3-minute" if timeout_s == 180 else f"{timeout_s:g}-second"
        super().__init__(message or f"Request timed out ({limit} upstream limit)")


class InternalError(ProxyError):
    """Anything unexpected: rendered without internals."""

    def __init__(self) -> None:
        super().__init__("The server had an error while processing your request")
