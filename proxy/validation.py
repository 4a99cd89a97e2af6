"""Request checks before anything goes upstream: each failure is a 400 naming its field."""

from __future__ import annotations

import json
from typing import Any

from proxy.errors import InvalidRequest

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_RANGES = (
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
)
# OpenAI's upper bounds; they also keep token estimates and costs exact in the Lua scripts.
MAX_TOKENS = 2**31 - 1
MAX_CHOICES = 128
# Model names become usage-record fields and aggregate names in the store: keep them bounded.
MAX_MODEL_CHARS = 256


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body; anything but a JSON object is a 400, never a 500."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Request body is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    return body


def json_object_or_none(payload: bytes) -> dict[str, Any] | None:
    """An upstream answer as a JSON object, or None when it is not one (never raises)."""
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def is_utf8(text: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot (lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(value: object, maximum: int = MAX_TOKENS) -> bool:
    """A positive integer no larger than `maximum` (OpenAI's own upper bounds)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= maximum


def check_model(body: dict[str, Any]) -> str:
    """The request's model: a non-empty string of at most MAX_MODEL_CHARS (every surface)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("You must specify a model to call", param="model")
    if not is_utf8(model):
        raise InvalidRequest("model must be valid Unicode text", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"model must be at most {MAX_MODEL_CHARS} characters", param="model")
    return model


def check_stream(body: dict[str, Any]) -> bool:
    """Whether the request asks for a stream; `stream`, when present, must be a boolean."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    return stream is True


def check_positive_int(body: dict[str, Any], field: str, maximum: int = MAX_TOKENS) -> None:
    """`field`, when present, is a positive integer no larger than `maximum`."""
    value = body.get(field)
    if value is not None and not _positive_int(value, maximum):
        raise InvalidRequest(
            f"{field} must be a positive integer of at most {maximum}", param=field
        )


def _check_message(index: int, message: object) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of system, user, assistant, tool, developer",
            param=f"{where}.role",
        )
    if "content" not in message or message["content"] is None:
        if role == "assistant" and message.get("tool_calls"):
            return
        raise InvalidRequest(f"{where}.content is required", param=f"{where}.content")
    content = message["content"]
    if not isinstance(content, str | list):
        raise InvalidRequest(
            f"{where}.content must be a string or an array of content parts",
            param=f"{where}.content",
        )


def validate_chat(body: dict[str, Any]) -> str:
    """Check a chat completion request (SPEC §3); returns its model."""
    model = check_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be an array of message objects", param="messages")
    if not messages:
        raise InvalidRequest("Messages array cannot be empty", param="messages")
    for index, message in enumerate(messages):
        _check_message(index, message)
    for field, low, high in _RANGES:
        value = body.get(field)
        if value is not None and (not _is_number(value) or not low <= value <= high):
            raise InvalidRequest(
                f"{field} must be a number between {low:g} and {high:g}", param=field
            )
    for field in ("max_tokens", "max_completion_tokens"):
        check_positive_int(body, field)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list):
            if len(stop) > 4:
                raise InvalidRequest("stop may hold at most 4 sequences", param="stop")
            if not all(isinstance(s, str) for s in stop):
                raise InvalidRequest("stop must be a string or an array of strings", param="stop")
        elif not isinstance(stop, str):
            raise InvalidRequest("stop must be a string or an array of strings", param="stop")
    check_stream(body)
    check_positive_int(body, "n", MAX_CHOICES)
    return model
